"""Tests for the demo corpus, tokenizer and LM data plumbing (lightning_influence.demo, lightning_influence.text)."""

import json
import re

import pytest
import torch

from lightning_influence.text import (IGNORE_INDEX, LMCollator, LMDataset, QueryCollator, QueryDataset,
                                      decode, encode_query, read_jsonl_queries, token_strings,
                                      write_jsonl_queries)
from lightning_influence.errors import QueryFileError
from lightning_influence.demo.corpus import generate_corpus, make_queries, supporting_indices
from lightning_influence.demo.tokenizer import load_tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def corpus():
    return generate_corpus(seed=0)


@pytest.fixture(scope="module")
def queries(corpus):
    return make_queries(corpus)


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return train_tokenizer(corpus.texts)


def test_deterministic_and_seed_dependent():
    a, b = generate_corpus(seed=3), generate_corpus(seed=3)
    assert a.records == b.records and a.facts == b.facts
    assert make_queries(a) == make_queries(b) == make_queries(3)
    assert generate_corpus(seed=4).records != a.records


def test_size_kinds_and_record_schema(corpus):
    assert len(corpus) == 2400 >= 2000
    assert len(generate_corpus(num_sequences=2000, seed=1)) == 2000
    kinds = {r["kind"] for r in corpus}
    assert kinds == {"fact", "dialogue", "filler"}
    for i, r in enumerate(corpus):
        assert set(r) == {"index", "text", "kind", "fact_ids"}
        assert r["index"] == i and isinstance(r["text"], str) and r["text"]
        assert (r["kind"] == "filler") == (r["fact_ids"] == [])
        assert all(f in corpus.facts for f in r["fact_ids"])


def test_every_fact_supported_3_to_8_times(corpus):
    for fid in corpus.facts:
        n = len(supporting_indices(corpus, fid))
        assert 3 <= n <= 8, (fid, n)
    # With varied wording: no fact is stated twice by the same text.
    for fid in corpus.facts:
        stated = [corpus[i]["text"] for i in supporting_indices(corpus, fid)]
        assert len(set(stated)) == len(stated), fid


def test_supporting_sequences_state_the_fact(corpus):
    for fid, info in corpus.facts.items():
        value = f"{info['role']} of {info['place']}" if info["type"] == "title" else info["value"]
        for i in supporting_indices(corpus, fid):
            text = corpus[i]["text"]
            assert info["name"] in text and re.search(rf"\b{re.escape(value)}\b", text), (fid, text)


def test_filler_mentions_names_but_states_no_fact(corpus):
    names = {c["name"] for c in corpus.characters}
    fillers = [r["text"] for r in corpus if r["kind"] == "filler"]
    with_name = [t for t in fillers if any(n in t for n in names)]
    assert len(with_name) > 0.5 * len(fillers)
    # A filler never pairs a character with that character's own attribute.
    for c in corpus.characters:
        for t in fillers:
            if c["name"] in t:
                for attr in ("occupation", "pet", "trait"):
                    assert not re.search(rf"\b{c[attr]}\b", t), (c["name"], attr, t)


def test_queries_schema_and_support(corpus, queries):
    assert len(queries) == 6
    assert sum(q["reversed"] for q in queries) == 1
    assert len({q["query_id"] for q in queries}) == 6
    training = set(corpus.texts)
    for q in queries:
        assert set(q) == {"query_id", "prompt", "completion", "fact_id", "reversed"}
        assert q["fact_id"] in corpus.facts
        assert len(supporting_indices(corpus, q["fact_id"])) >= 2
        assert 1 <= len(q["completion"].split()) <= 3
        # A paraphrase: the prompt is not a prefix of any training sequence, and the
        # fact's own statements never use the query's wording.
        assert not any(t.startswith(q["prompt"]) for t in training)
        assert not any(q["prompt"] in corpus[i]["text"] for i in supporting_indices(corpus, q["fact_id"]))
    assert len(make_queries(corpus, num_queries=9)) == 9
    assert sum(q["reversed"] for q in make_queries(corpus, num_queries=9)) == 1


def test_reversed_query_fact_only_trained_in_other_order(corpus, queries):
    (rq,) = [q for q in queries if q["reversed"]]
    info = corpus.facts[rq["fact_id"]]
    assert info["order"] == "name_first" and rq["completion"] == info["name"]
    description = f"{info['role']} of {info['place']}"
    assert description in rq["prompt"] and info["name"] not in rq["prompt"]
    both = [r["text"] for r in corpus if description in r["text"] and info["name"] in r["text"]]
    assert len(both) >= 2
    for text in both:  # the name always comes first: "B is A" is never trained
        assert text.index(info["name"]) < text.index(description), text
    # The forward title query asks in the trained order (description first).
    fwd = [q for q in queries if not q["reversed"] and q["fact_id"].endswith(".title")]
    for q in fwd:
        f = corpus.facts[q["fact_id"]]
        for i in supporting_indices(corpus, q["fact_id"]):
            text = corpus[i]["text"]
            assert text.index(f"{f['role']} of {f['place']}") < text.index(f["name"])


def test_tokenizer_round_trip_and_specials(corpus, tokenizer, tmp_path):
    assert tokenizer.pad_token_id is not None and tokenizer.eos_token_id is not None
    assert tokenizer.unk_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    for text in corpus.texts[:200] + ["Unseen wörds, émoji 😀 and   spaces."]:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == text
    lengths = [len(tokenizer.encode(t, add_special_tokens=False)) for t in corpus.texts]
    assert max(lengths) + 2 <= 48  # + BOS and EOS
    again = train_tokenizer(corpus.texts, save_dir=tmp_path / "tok")
    assert again.get_vocab() == tokenizer.get_vocab()  # deterministic
    loaded = load_tokenizer(tmp_path / "tok")
    assert loaded.encode(corpus.texts[0], add_special_tokens=False) == tokenizer.encode(
        corpus.texts[0], add_special_tokens=False
    )
    assert loaded.pad_token_id == tokenizer.pad_token_id
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "missing")


def test_lm_collate_padding_and_labels(corpus, tokenizer):
    ds = LMDataset(corpus, tokenizer)
    assert len(ds) == len(corpus)
    items = [ds[i] for i in range(8)]
    batch = LMCollator(tokenizer.pad_token_id)(items)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    B, T = batch["input_ids"].shape
    assert B == 8 and T == max(len(x["input_ids"]) for x in items)
    for k in batch:
        assert batch[k].dtype == torch.long and batch[k].shape == (B, T)
    for i, it in enumerate(items):
        n = len(it["input_ids"])
        assert batch["attention_mask"][i, :n].eq(1).all() and batch["attention_mask"][i, n:].eq(0).all()
        assert torch.equal(batch["input_ids"][i, :n], it["input_ids"])
        assert batch["input_ids"][i, n:].eq(tokenizer.pad_token_id).all()
        assert torch.equal(batch["labels"][i, :n], it["input_ids"])
        assert batch["labels"][i, n:].eq(IGNORE_INDEX).all()
        assert it["input_ids"][0] == tokenizer.bos_token_id and it["input_ids"][-1] == tokenizer.eos_token_id
    assert decode(tokenizer, batch["input_ids"][0], batch["attention_mask"][0]) == corpus[0]["text"]


def test_query_collate_masks_prompt_and_padding(queries, tokenizer):
    ds = QueryDataset(queries, tokenizer)
    batch = QueryCollator(tokenizer.pad_token_id)([ds[i] for i in range(len(ds))])
    B, T = batch["input_ids"].shape
    assert B == len(queries) and batch["labels"].shape == (B, T)
    for i, q in enumerate(queries):
        ids, labels = ds.encoded[i]
        n, n_prompt = len(ids), 1 + len(tokenizer.encode(q["prompt"], add_special_tokens=False))
        assert batch["labels"][i, :n_prompt].eq(IGNORE_INDEX).all()  # BOS + prompt
        assert batch["labels"][i, n:].eq(IGNORE_INDEX).all()  # padding
        assert batch["attention_mask"][i, :n].eq(1).all() and batch["attention_mask"][i, n:].eq(0).all()
        completion = batch["labels"][i, n_prompt:n]
        assert completion.ne(IGNORE_INDEX).all()
        assert torch.equal(completion, batch["input_ids"][i, n_prompt:n])
        assert tokenizer.decode(completion.tolist()) == " " + q["completion"]
        # Same ids as tokenizing the joined text, as a training sequence would be.
        joined = tokenizer.encode(q["prompt"] + " " + q["completion"], add_special_tokens=False)
        assert ids[1:] == joined
    # Nothing is cut: a query longer than max_length is an error naming the option.
    ids, _ = encode_query(tokenizer, queries[0]["prompt"], queries[0]["completion"])
    with pytest.raises(QueryFileError, match=f"{len(ids)} tokens .* more than max_length=4"):
        encode_query(tokenizer, queries[0]["prompt"], queries[0]["completion"], max_length=4)
    assert encode_query(tokenizer, queries[0]["prompt"], queries[0]["completion"], max_length=len(ids))[0] == ids


def test_token_strings(tokenizer, corpus):
    ds = LMDataset(corpus, tokenizer)
    ids = ds[0]["input_ids"]
    strings = token_strings(tokenizer, ids)
    assert len(strings) == len(ids)
    assert strings[0] == tokenizer.bos_token and strings[-1] == tokenizer.eos_token
    assert "".join(strings[1:-1]) == corpus[0]["text"]
    assert not any("Ġ" in s for s in strings)


def test_jsonl_round_trip_and_errors(queries, tmp_path):
    path = write_jsonl_queries(queries, tmp_path / "sub" / "q.jsonl")
    assert read_jsonl_queries(path) == queries

    p = tmp_path / "bad.jsonl"
    p.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "c", "completion": "d", "x": 1}\n')
    got = read_jsonl_queries(p)
    assert [q["query_id"] for q in got] == ["q0", "q1"] and got[1]["x"] == 1

    with pytest.raises(FileNotFoundError, match="query file not found"):
        read_jsonl_queries(tmp_path / "nope.jsonl")
    cases = [
        ('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion"\n', r"line 2: not valid JSON"),
        ('{"prompt": "a"}\n', r"line 1: missing required key 'completion'"),
        ('{"completion": "a"}\n', r"line 1: missing required key 'prompt'"),
        ('["a", "b"]\n', r"line 1: expected a JSON object"),
        ('{"prompt": 1, "completion": "b"}\n', r"line 1: 'prompt' must be a string"),
        ('{"prompt": "a", "completion": "  "}\n', r"line 1: 'completion' is empty"),
        ('{"prompt": "a", "completion": "b", "query_id": "x"}\n'
         '{"prompt": "c", "completion": "d", "query_id": "x"}\n', r"line 2: duplicate query_id 'x'"),
        ("\n\n", r"no queries"),
    ]
    for content, pattern in cases:
        p.write_text(content)
        with pytest.raises(QueryFileError, match=pattern) as exc:
            read_jsonl_queries(p)
        assert str(p) in str(exc.value)
    assert issubclass(QueryFileError, ValueError)
    assert json.loads(path.read_text().splitlines()[0])["prompt"] == queries[0]["prompt"]
