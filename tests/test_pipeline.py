"""run_queries: files written, TF-IDF-filtered and layer-restricted scoring agree with the full path."""

import json

import pytest
import torch
from torch.utils.data import DataLoader

from lightning_influence import CausalLMTask, InfluenceModule, fit_factors
from lightning_influence.integration.pipeline import QuerySet, load_scores, run_queries

from . import models
from .test_module_tools import DictRows, collate

WORDS = ["apple", "river", "stone", "cloud", "ember", "frost"]


@pytest.fixture(scope="module")
def case():
    model = models.tiny_gpt2().float()
    train = DictRows(models.lm_batch(18, vocab=11, max_len=9, pad_to=9, seed=1))
    train.texts = [f"{WORDS[i % 6]} {WORDS[(i * 5) % 6]} row{i}" for i in range(18)]
    queries = DictRows(models.lm_batch(3, vocab=11, max_len=7, pad_to=7, seed=3, prompt_len=3))
    tl = DataLoader(train, batch_size=6, collate_fn=collate)
    ql = DataLoader(queries, batch_size=3, collate_fn=collate)
    task = CausalLMTask()
    factors = fit_factors(model, task, tl, strategy="ekfac", fisher="empirical")
    full = InfluenceModule(model, task=task, factors=factors).pairwise_scores(ql, tl, per_layer=True)
    qs = QuerySet(ql, ["qa", "qb", "qc"], ["apple river", "stone cloud", "ember frost"])
    return model, task, factors, tl, qs, full


def test_outputs_written_and_consistent(case, tmp_path):
    model, task, factors, tl, qs, full = case
    scores, report = run_queries(model, task, factors, qs, tl, tmp_path, top_k=3)
    torch.testing.assert_close(scores, full.sum(0))
    saved = load_scores(tmp_path)
    torch.testing.assert_close(saved.scores, scores)
    # The end-of-run path streams: no [L, Q, N] layer scores are built or saved (the report's layer
    # breakdown is checked against `full` in test_streams_without_layer_score_matrix).
    assert saved.layer_scores is None
    assert saved.layer_names == list(factors.layers)
    assert json.loads((tmp_path / "scores.json").read_text())["query_ids"] == ["qa", "qb", "qc"]
    assert (tmp_path / "queries" / "manifest.json").is_file()
    html = (tmp_path / "report.html").read_text()
    for q, entry in enumerate(report.queries):
        assert entry.top_positive[0].train_index == int(scores[q].argmax())
        assert entry.top_negative[0].train_index == int(scores[q].argmin())
        assert entry.top_positive[0].text == tl.dataset.texts[entry.top_positive[0].train_index]
        assert entry.query_id in html


def test_tfidf_candidates_match_full_scores(case, tmp_path):
    model, task, factors, tl, qs, full = case
    scores, _ = run_queries(model, task, factors, qs, tl, tmp_path, top_k=2, tfidf_candidates=5)
    finite = torch.isfinite(scores)
    assert (finite.sum(1) == 5).all()
    expected = full.sum(0)
    torch.testing.assert_close(scores[finite], expected[finite], rtol=1e-5, atol=1e-6 * float(expected.abs().max()))
    assert (tmp_path / "tfidf").is_dir()


def test_layer_subset(case, tmp_path):
    model, task, factors, tl, qs, full = case
    mlp_layers = [n for n in factors.layers if ".mlp." in n]
    scores, _ = run_queries(model, task, factors, qs, tl, tmp_path, layers=mlp_layers)
    keep = [i for i, n in enumerate(factors.layers) if n in mlp_layers]
    torch.testing.assert_close(scores, full[keep].sum(0))


def test_streams_without_layer_score_matrix(case, tmp_path, monkeypatch):
    """No [L, Q, N]: the rows come back from the shards, the listed entries are re-scored per layer."""
    from lightning_influence.reporting import layer_shares

    model, task, factors, tl, qs, full = case
    monkeypatch.setattr(InfluenceModule, "pairwise_scores",
                        lambda *a, **k: pytest.fail("run_queries materialised the score matrix"))
    scores, report = run_queries(model, task, factors, qs, tl, tmp_path, top_k=3)
    torch.testing.assert_close(scores, full.sum(0))
    names = list(factors.layers)
    for qi, _, _, entry in report.iter_entries():
        assert list(entry.layer_scores) == names
        expected = full[:, qi, entry.train_index]
        torch.testing.assert_close(torch.tensor(list(entry.layer_scores.values())), expected,
                                   rtol=1e-5, atol=1e-6 * float(full.abs().max()))
    assert report.layer_totals == pytest.approx(layer_shares(full, names), rel=1e-5)
    assert (tmp_path / "score_shards" / "manifest.json").is_file()


def test_rerun_with_other_queries_never_reuses_shards(case, tmp_path):
    model, task, factors, tl, qs, full = case
    run_queries(model, task, factors, qs, tl, tmp_path, top_k=2)
    # Other queries, same count: the scores must be theirs, not the first run's.
    others = DictRows(models.lm_batch(3, vocab=11, max_len=7, pad_to=7, seed=9, prompt_len=3))
    ol = DataLoader(others, batch_size=3, collate_fn=collate)
    expected = InfluenceModule(model, task=task, factors=factors).pairwise_scores(ol, tl)
    scores, _ = run_queries(model, task, factors, QuerySet(ol, ["x", "y", "z"], ["a", "b", "c"]), tl, tmp_path, top_k=2)
    torch.testing.assert_close(scores, expected)
    assert not torch.allclose(scores, full.sum(0))


class _Rank:
    """A stand-in for ``trainer.strategy`` on one rank, recording the order of events."""

    def __init__(self, rank, events):
        self.global_rank, self.is_global_zero, self.world_size, self.events = rank, rank == 0, 2, events

    def barrier(self, name=None):
        self.events.append(("barrier", self.global_rank))


def test_tfidf_cache_written_by_rank_zero_only(tmp_path, monkeypatch):
    from lightning_influence.errors import TfidfError
    from lightning_influence.integration.pipeline import _tfidf_index
    from lightning_influence.scoring.tfidf import TfidfCandidates

    texts = [f"{WORDS[i % 6]} {WORDS[(i * 5) % 6]} row{i}" for i in range(12)]
    events = []
    # A rank other than zero never fits nor writes: without rank zero's cache it cannot go on.
    monkeypatch.setattr(TfidfCandidates, "save", lambda *a, **k: pytest.fail("rank one wrote the cache"))
    with pytest.raises(TfidfError):
        _tfidf_index(tmp_path / "tfidf", texts, _Rank(1, events))
    monkeypatch.undo()
    zero = _tfidf_index(tmp_path / "tfidf", texts, _Rank(0, events))
    assert (tmp_path / "tfidf").is_dir()
    monkeypatch.setattr(TfidfCandidates, "fit", lambda *a, **k: pytest.fail("rank one fitted the index"))
    one = _tfidf_index(tmp_path / "tfidf", texts, _Rank(1, events))
    assert events == [("barrier", 1), ("barrier", 0), ("barrier", 1)]
    assert torch.equal(one.top_k(["apple river"], 4), zero.top_k(["apple river"], 4))
