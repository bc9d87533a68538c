"""Queries are encoded like training text: never cut, with the tokenizer's own special tokens, and one
display-text rule everywhere (issue 13 item 13; issue 11, one query text rule)."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, processors
from transformers import PreTrainedTokenizerFast

from lightning_influence.demo.driver import query_text as demo_query_text
from lightning_influence.demo.tokenizer import EOS_TOKEN, load_tokenizer, train_tokenizer
from lightning_influence.errors import QueryFileError
from lightning_influence.scoring.tfidf import query_text as tfidf_query_text
from lightning_influence.text import (IGNORE_INDEX, LMDataset, QueryCollator, QueryDataset, encode_query, join_query,
                                      query_text, special_tokens_around)

WORDS = "the clockmaker of varnholm keeps a grey owl and lives near the old harbour with her brother".split()
TEXTS = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] * 3
PROMPT = " ".join(WORDS * 8)  # far more than 64 tokens
COMPLETION = "clockmaker"


@pytest.fixture(scope="module")
def demo_tokenizer():
    return train_tokenizer(TEXTS, vocab_size=400)


def with_post_processor(tokenizer, template: str | None, **kwargs) -> PreTrainedTokenizerFast:
    """A copy of ``tokenizer`` whose post-processor adds ``template`` (``None``: no special tokens)."""
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.post_processor = (processors.ByteLevel(trim_offsets=False) if template is None else
                              processors.TemplateProcessing(single=template, special_tokens=[(EOS_TOKEN, 0)]))
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN,
                                   pad_token="<pad>", unk_token="<unk>", **kwargs)


def bare(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def test_long_query_is_kept_whole_without_a_limit(demo_tokenizer):
    # No model_max_length and no max_length: the old default cut this prompt to 64 tokens from the left.
    prompt_ids = bare(demo_tokenizer, PROMPT)
    assert len(prompt_ids) > 100
    ds = QueryDataset([{"prompt": PROMPT, "completion": COMPLETION}], demo_tokenizer)
    ids, labels = ds.encoded[0]
    completion_ids = bare(demo_tokenizer, " " + COMPLETION)
    assert ids == [demo_tokenizer.bos_token_id] + prompt_ids + completion_ids
    assert labels == [IGNORE_INDEX] * (1 + len(prompt_ids)) + completion_ids
    assert demo_tokenizer.decode(ids[1:1 + len(prompt_ids)]) == PROMPT


def test_long_query_raises_naming_the_limit(demo_tokenizer):
    limited = with_post_processor(demo_tokenizer, f"{EOS_TOKEN} $A", model_max_length=64)
    n = 1 + len(bare(limited, PROMPT)) + len(bare(limited, " " + COMPLETION))
    with pytest.raises(QueryFileError, match=rf"query 'long': the query has {n} tokens .*model_max_length \(64\)"):
        QueryDataset([{"query_id": "long", "prompt": PROMPT, "completion": COMPLETION}], limited)
    with pytest.raises(QueryFileError, match=r"more than max_length=32 allows.*max_length="):
        QueryDataset([{"prompt": PROMPT, "completion": COMPLETION}], demo_tokenizer, max_length=32)
    # An explicit max_length above the tokenizer's limit is the user's call: the query is kept whole.
    ids, _ = QueryDataset([{"prompt": PROMPT, "completion": COMPLETION}], limited, max_length=n).encoded[0]
    assert len(ids) == n
    with pytest.raises(QueryFileError, match="max_length must be a positive integer"):
        QueryDataset([{"prompt": "a", "completion": "b"}], demo_tokenizer, max_length=0)


def test_special_tokens_follow_the_tokenizer(demo_tokenizer):
    prompt, completion = "the old harbour", "owl"
    p, c = bare(demo_tokenizer, prompt), bare(demo_tokenizer, " " + completion)
    # A tokenizer that adds nothing (GPT-2's): no BOS on queries nor on training texts.
    plain = with_post_processor(demo_tokenizer, None)
    assert special_tokens_around(plain) == ([], [])
    assert encode_query(plain, prompt, completion) == (p + c, [IGNORE_INDEX] * len(p) + c)
    assert LMDataset([prompt], plain)[0]["input_ids"].tolist() == p
    # A tokenizer whose post-processor adds BOS only (Llama's): BOS on both, no EOS.
    bos_only = with_post_processor(demo_tokenizer, f"{EOS_TOKEN} $A")
    assert special_tokens_around(bos_only) == ([0], [])
    assert encode_query(bos_only, prompt, completion) == ([0] + p + c, [IGNORE_INDEX] * (1 + len(p)) + c)
    assert LMDataset([prompt], bos_only)[0]["input_ids"].tolist() == [0] + p
    # Without BOS the first token of a prompt-less query would have nothing to be predicted from.
    with pytest.raises(QueryFileError, match="empty prompt"):
        encode_query(plain, "", completion)
    assert encode_query(bos_only, "", completion) == ([0] + bare(demo_tokenizer, completion),
                                                      [IGNORE_INDEX] + bare(demo_tokenizer, completion))


def test_demo_tokenizer_adds_bos_and_eos_in_one_place(demo_tokenizer, tmp_path):
    text = "the clockmaker keeps a grey owl"
    bos = demo_tokenizer.bos_token_id
    assert demo_tokenizer.eos_token_id == bos == 0
    assert demo_tokenizer.encode(text) == [bos] + bare(demo_tokenizer, text) + [bos]
    assert special_tokens_around(demo_tokenizer) == ([bos], [bos])
    assert LMDataset([text], demo_tokenizer)[0]["input_ids"].tolist() == [bos] + bare(demo_tokenizer, text) + [bos]
    # The convention and the context length travel with the saved tokenizer (the `score` command reloads it).
    limited = train_tokenizer(TEXTS, vocab_size=400, save_dir=tmp_path / "tok", model_max_length=64)
    loaded = load_tokenizer(tmp_path / "tok")
    assert loaded.encode(text) == limited.encode(text) == demo_tokenizer.encode(text)
    assert loaded.model_max_length == 64
    with pytest.raises(QueryFileError, match=r"model_max_length \(64\)"):
        QueryDataset([{"prompt": PROMPT, "completion": COMPLETION}], loaded)


def test_query_batches_carry_the_whole_prompt(demo_tokenizer):
    short = {"prompt": "the grey owl", "completion": "harbour"}
    long = {"prompt": PROMPT, "completion": COMPLETION}
    ds = QueryDataset([short, long], demo_tokenizer)
    batch = QueryCollator(demo_tokenizer.pad_token_id)([ds[0], ds[1]])
    n_long = len(ds.encoded[1][0])
    assert batch["input_ids"].shape == (2, n_long) and n_long > 100
    assert int(batch["attention_mask"][1].sum()) == n_long
    target = batch["labels"][1][batch["labels"][1] != IGNORE_INDEX]
    assert torch.equal(target, torch.tensor(bare(demo_tokenizer, " " + COMPLETION)))


@pytest.mark.parametrize("prompt, completion, text, cut", [
    ("Oswin Pelleck works as a", "clockmaker", "Oswin Pelleck works as a clockmaker", 24),
    ("Oswin Pelleck works as a ", "  clockmaker ", "Oswin Pelleck works as a clockmaker", 24),
    ("Hi", "!", "Hi!", 2),
    ("", "clockmaker", "clockmaker", 0),
])
def test_one_display_text_rule(prompt, completion, text, cut):
    assert join_query(prompt, completion) == (text, cut)
    record = {"prompt": prompt, "completion": completion}
    # Reports (demo), TF-IDF matching and the library all use the same text; the boundary is recoverable.
    assert query_text(record) == demo_query_text(record) == tfidf_query_text(record) == text
    assert text[:cut] == prompt.rstrip()
    assert text[cut:].strip() == completion.strip()
    assert query_text({"text": "given", **record}) == "given" and query_text("plain") == "plain"


def test_tokenization_uses_the_display_boundary(demo_tokenizer):
    prompt, completion = "the grey owl ", " keeps"
    text, cut = join_query(prompt, completion)
    ids, labels = encode_query(demo_tokenizer, prompt, completion)
    assert ids[1:] == bare(demo_tokenizer, text[:cut]) + bare(demo_tokenizer, text[cut:])
    assert demo_tokenizer.decode([t for t in labels if t != IGNORE_INDEX]) == text[cut:]
