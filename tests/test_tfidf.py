"""TF-IDF candidates and filtered scoring against the unfiltered full score matrix."""

import json

import pytest
import torch

from lightning_influence import CausalLMTask, InfluenceScorer, fit_factors
from lightning_influence.text import collate_lm
from lightning_influence.scoring.tfidf import TfidfCandidates, filtered_scores, tfidf_cache_dir
from lightning_influence.errors import TfidfError

from . import models

WORDS = ("river stone lantern orchard violin harbor meadow copper falcon glacier ember willow "
         "compass thistle marble beacon").split()


def make_texts(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (int(torch.randint(3, 7, (1,), generator=g)),),
                                                          generator=g)) for _ in range(n)]


QUERIES = ["violin harbor ember willow", "glacier copper falcon", "orchard meadow river stone"]
TRAIN = make_texts(14, seed=5)
TRAIN[9] = QUERIES[0]  # planted duplicate of query 0


def encode(text):
    # word -> token id in 1..10 (tiny GPT-2 vocabulary of 11), so that texts are LM sequences
    return torch.tensor([1 + WORDS.index(w) % 10 for w in text.split()], dtype=torch.long)


def collate(items):
    return collate_lm(items, pad_token_id=0)


@pytest.fixture(scope="module")
def lm():
    model = models.tiny_gpt2()
    dataset = [{"input_ids": encode(t)} for t in TRAIN]
    train_batches = [collate(dataset[i:i + 4]) for i in range(0, len(dataset), 4)]
    query_batches = [collate([{"input_ids": encode(q)} for q in QUERIES])]
    task = CausalLMTask()
    factors = fit_factors(model, task, train_batches, strategy="ekfac", fisher="empirical", capture_dtype=torch.float64)
    return model, task, factors, dataset, train_batches, query_batches


def test_planted_duplicate_ranks_first():
    index = TfidfCandidates.fit(TRAIN)
    top = index.top_k(QUERIES, 5)
    assert top.dtype == torch.long and top.shape == (3, 5)
    assert int(top[0, 0]) == 9
    sims = index.similarities(QUERIES)
    assert float(sims[0, 9]) == pytest.approx(1.0)
    for q in range(3):  # most similar first, ties by lower index
        row = sims[q, top[q]]
        assert (row[:-1] >= row[1:]).all()
    assert index.top_k(QUERIES, 100).shape == (3, len(TRAIN))  # k clipped to N
    with pytest.raises(TfidfError, match="positive integer"):
        index.top_k(QUERIES, 0)


def test_ties_break_by_lower_index():
    index = TfidfCandidates.fit(["alpha beta", "gamma delta", "alpha beta", "epsilon", "alpha beta"])
    assert index.top_k(["alpha beta"], 3)[0].tolist() == [0, 2, 4]
    # a query sharing no term: every similarity is 0, so the first k indices
    assert index.top_k(["zzz"], 2)[0].tolist() == [0, 1]


def test_save_load_rebuilds_identical_vectorizer(tmp_path):
    index = TfidfCandidates.fit(TRAIN, ngram_range=(1, 2))
    index.save(tmp_path)
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".json", ".safetensors"]  # no pickle
    loaded = TfidfCandidates.load(tmp_path, texts=TRAIN)
    probe = TRAIN + QUERIES + ["unseen words only", "violin violin violin"]
    diff = abs(loaded.vectorizer.transform(probe) - index.vectorizer.transform(probe))
    assert diff.nnz == 0 or diff.max() == 0
    assert (abs(loaded.matrix - index.matrix)).nnz == 0
    assert torch.equal(loaded.top_k(QUERIES, 6), index.top_k(QUERIES, 6))
    assert loaded.params() == index.params()
    with pytest.raises(TfidfError, match="other training texts"):
        TfidfCandidates.load(tmp_path, texts=TRAIN[:-1])
    idf = loaded.vectorizer.idf_.copy()
    idf[::2] *= 1.5  # not a uniform scaling, which the l2 normalisation would hide
    loaded.vectorizer.idf_ = idf
    with pytest.raises(TfidfError, match="does not reproduce"):
        loaded._verify_probes()
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    tensor_file = tmp_path / manifest["tensor_file"]  # the vocabulary lives in the tensor file
    tensor_file.write_bytes(tensor_file.read_bytes()[:-4])
    with pytest.raises(TfidfError, match="checksum"):
        TfidfCandidates.load(tmp_path)


def test_load_or_fit_caches_next_to_factors(tmp_path, monkeypatch):
    cache = tfidf_cache_dir(tmp_path / "factors")
    first = TfidfCandidates.load_or_fit(cache, TRAIN)
    assert (cache / "manifest.json").is_file()
    monkeypatch.setattr(TfidfCandidates, "fit", classmethod(lambda *a, **k: pytest.fail("refitted")))
    again = TfidfCandidates.load_or_fit(cache, TRAIN)
    assert torch.equal(again.top_k(QUERIES, 4), first.top_k(QUERIES, 4))
    monkeypatch.undo()
    other = TfidfCandidates.load_or_fit(cache, TRAIN, sublinear_tf=False)  # other parameters: refit
    assert other.params()["sublinear_tf"] is False
    assert TfidfCandidates.load(cache).params()["sublinear_tf"] is False


@pytest.mark.parametrize("rank", [None, 2])
def test_filtered_scores_equal_full_matrix_at_candidates(lm, rank):
    model, task, factors, dataset, train_batches, query_batches = lm
    scorer = InfluenceScorer(model, task, factors, score_dtype=torch.float64, query_rank=rank)
    full = scorer.pairwise_scores(query_batches, train_batches)
    queries = scorer.query_gradients(query_batches)
    candidates = TfidfCandidates.fit(TRAIN).top_k(QUERIES, 5)
    seen = []
    scores, indices = filtered_scores(scorer, queries, candidates, dataset, collate, batch_size=3,
                                      progress=seen.append)
    assert torch.equal(indices, candidates)
    assert sum(seen) == len(torch.unique(candidates))  # every candidate scored exactly once
    expected = full.gather(1, indices)
    torch.testing.assert_close(scores, expected, rtol=1e-6, atol=1e-7 * float(full.abs().max()), check_dtype=False)


def test_filtered_scores_validates_candidates(lm):
    model, task, factors, dataset, _, query_batches = lm
    scorer = InfluenceScorer(model, task, factors, score_dtype=torch.float64)
    queries = scorer.query_gradients(query_batches)
    with pytest.raises(ValueError, match=r"LongTensor\[Q, k\] with Q=3"):
        filtered_scores(scorer, queries, torch.zeros(2, 4, dtype=torch.long), dataset, collate, 4)
    with pytest.raises(ValueError, match=r"must lie in \[0, 14\)"):
        filtered_scores(scorer, queries, torch.full((3, 2), 14), dataset, collate, 4)
