"""The demo: a synthetic corpus with planted facts, a locally trained tokenizer, a tiny GPT-2 and the
driver behind ``make demo`` (``python -m lightning_influence.demo``, ``lightning-influence demo``).

The library imports nothing from here. Names are imported lazily, on first use, so that
``import lightning_influence.demo`` does not pay for Lightning, transformers or tokenizers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    **dict.fromkeys(["Corpus", "FACT_TYPES", "generate_corpus", "make_queries", "supporting_indices"], "corpus"),
    **dict.fromkeys(["EOS_TOKEN", "PAD_TOKEN", "UNK_TOKEN", "train_tokenizer", "load_tokenizer"], "tokenizer"),
    **dict.fromkeys(["TinyGPT2LM", "FactsDataModule", "DemoResult", "QueryOutcome", "run_demo", "DEMO_MODULES",
                     "recall_at_k", "best_rank", "tfidf_scores", "evaluate_queries", "query_log_probs",
                     "fact_accuracy", "query_text", "format_query_table", "format_summary"], "driver"),
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
