"""The demo: a synthetic corpus with planted facts, a locally trained tokenizer, a tiny GPT-2 and the
driver behind ``make demo``. The library imports nothing from here."""
