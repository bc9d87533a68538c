"""``InfluenceModule.report``: one call that scores, builds the report and logs it to W&B.

The report's scores are checked against an explicit dense computation (``tests/dense.py``),
and what W&B received is read back from the offline run directory (real wandb, offline,
under pytest's tmp_path; the file layout is described in tests/test_reporting.py).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from lightning_influence import CausalLMTask, InfluenceModule, fit_factors
from lightning_influence.capture import find_tracked_layers
from lightning_influence.integration import pipeline
from lightning_influence.reporting import TABLE_COLUMNS, InfluenceReport

from . import dense, models, test_reporting
from .test_module_tools import DictRows, collate
from .test_reporting import _read_table, _run_dir
from .test_scores_dense import lm_loss, lm_measure

K = 3
wandb_env = test_reporting.wandb_env  # the offline W&B fixture, shared


@pytest.fixture(scope="module")
def case():
    model = models.tiny_gpt2()  # float64: the dense reference is exact
    train_batch = models.lm_batch(12, vocab=11, max_len=8, pad_to=8, seed=1)
    query_batch = models.lm_batch(3, vocab=11, max_len=7, pad_to=7, seed=3, prompt_len=3)
    train = DictRows(train_batch)
    train.texts = [f"training row {i}" for i in range(12)]
    tl = DataLoader(train, batch_size=5, collate_fn=collate)
    ql = DataLoader(DictRows(query_batch), batch_size=2, collate_fn=collate)
    task = CausalLMTask()
    factors = fit_factors(model, task, tl, strategy="ekfac", fisher="empirical", capture_dtype=torch.float64)
    module = InfluenceModule(model, task=task, factors=factors, score_dtype=torch.float64, show_progress=False)
    modules = {n: model.get_submodule(n) for n in find_tracked_layers(model)}
    expected = dense.dense_scores("ekfac", model, modules, lm_loss, lm_measure, train_batch, query_batch,
                                  train_batch["attention_mask"])
    return module, tl, ql, expected


def _check_against_dense(report: InfluenceReport, expected: torch.Tensor, texts: list[str]) -> None:
    scale = float(expected.abs().max())
    for qi, q in enumerate(report.queries):
        positives = [e.train_index for e in q.top_positive]
        order = torch.argsort(expected[qi], descending=True).tolist()
        assert positives == [i for i in order if expected[qi, i] > 0][:K]
        negatives = [e.train_index for e in q.top_negative]
        assert negatives == [i for i in reversed(order) if expected[qi, i] < 0][:K]
        for e in q.top_positive + q.top_negative:
            assert e.score == pytest.approx(float(expected[qi, e.train_index]), rel=1e-6, abs=1e-9 * scale)
            assert e.text == texts[e.train_index]
            assert sum(e.layer_scores.values()) == pytest.approx(e.score, rel=1e-6, abs=1e-9 * scale)


def test_report_logs_to_the_active_wandb_init_run(case, wandb_env, monkeypatch):
    import wandb

    module, tl, ql, expected = case
    monkeypatch.chdir(wandb_env)
    run = wandb.init(mode="offline", dir=str(wandb_env), project="test")
    try:
        report = module.report(ql, tl, top_k=K, query_ids=["qa", "qb", "qc"])  # no wandb= : the active run
    finally:
        run.finish()
    _check_against_dense(report, expected, tl.dataset.texts)
    run_dir = _run_dir(wandb_env)
    table = _read_table(run_dir, "influence/top_influences")
    assert table["columns"][:len(TABLE_COLUMNS)] == TABLE_COLUMNS
    rows = [dict(zip(table["columns"], r)) for r in table["data"]]
    listed = [(q.query_id, d, e) for _, q, d, e in report.iter_entries()]
    assert len(rows) == len(listed) > 0
    for row, (qid, direction, e) in zip(rows, listed):
        qi = ["qa", "qb", "qc"].index(qid)
        assert (row["query_id"], row["direction"], row["train_index"]) == (qid, direction, e.train_index)
        assert row["score"] == pytest.approx(float(expected[qi, e.train_index]), rel=1e-6)
    queries = _read_table(run_dir, "influence/queries")
    assert [r[0] for r in queries["data"]] == ["qa", "qb", "qc"]
    # Without output_dir nothing but the W&B run is written.
    assert sorted(p.name for p in wandb_env.iterdir()) == ["wandb"]


def test_report_logs_to_an_explicit_logger(case, wandb_env):
    from lightning.pytorch.loggers import WandbLogger

    module, tl, ql, expected = case
    logger = WandbLogger(offline=True, save_dir=str(wandb_env), project="test")
    try:
        report = module.report(ql, tl, top_k=K, wandb=logger, output_dir=wandb_env / "out")
    finally:
        logger.experiment.finish()
    _check_against_dense(report, expected, tl.dataset.texts)
    rows = _read_table(_run_dir(wandb_env), "influence/top_influences")["data"]
    assert len(rows) == sum(len(q.top_positive) + len(q.top_negative) for q in report.queries)
    saved = pipeline.load_scores(wandb_env / "out")
    torch.testing.assert_close(saved.scores, expected, rtol=1e-6, atol=1e-9 * float(expected.abs().max()))
    assert (wandb_env / "out" / "report.html").is_file()


def test_report_without_a_run_logs_nothing(case, wandb_env, monkeypatch):
    import wandb

    module, tl, ql, expected = case
    monkeypatch.chdir(wandb_env)
    assert wandb.run is None
    report = module.report(ql, tl, top_k=K)
    _check_against_dense(report, expected, tl.dataset.texts)
    assert not (wandb_env / "wandb").exists()
    # wandb=False keeps an active run untouched.
    run = wandb.init(mode="offline", dir=str(wandb_env), project="test")
    try:
        module.report(ql, tl, top_k=K, wandb=False)
    finally:
        run.finish()
    assert not (_run_dir(wandb_env) / "files" / "media").exists()


def test_run_queries_takes_the_same_path(case, tmp_path, monkeypatch):
    """run_queries (the callback's and the CLI's path) and module.report build the same report in one function."""
    module, tl, ql, expected = case
    calls = []
    original = pipeline.report_queries

    def spy(*args, **kwargs):
        calls.append(kwargs.get("output_dir"))
        return original(*args, **kwargs)

    monkeypatch.setattr(pipeline, "report_queries", spy)
    direct = module.report(ql, tl, top_k=K)
    scores, via_pipeline = pipeline.run_queries(module.model, module.task, module.factors,
                                                pipeline.query_set_from_loader(ql), tl, tmp_path, top_k=K,
                                                score_dtype=torch.float64, show_progress=False, wandb_run=False)
    assert calls == [None, tmp_path]
    torch.testing.assert_close(scores, expected, rtol=1e-6, atol=1e-9 * float(expected.abs().max()))
    assert via_pipeline.to_dict(include_scores=False) == direct.to_dict(include_scores=False)


def test_report_rejects_mismatched_query_ids(case):
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    module, tl, ql, _ = case
    with pytest.raises(MisconfigurationException, match="3 queries in the loader but 2 query ids"):
        module.report(ql, tl, query_ids=["a", "b"])


def test_report_with_tfidf_candidates_lists_only_candidates(case, tmp_path, monkeypatch):
    """tfidf_candidates without output_dir: the index lives in a temporary directory, nothing stays behind."""
    from lightning_influence.scoring.tfidf import TfidfCandidates

    module, tl, ql, expected = case
    monkeypatch.chdir(tmp_path)
    texts = ["training row 1", "training row 5", "row 9"]
    filtered = InfluenceModule(module.model, task=module.task, factors=module.factors, score_dtype=torch.float64,
                               tfidf_candidates=4, show_progress=False)
    report = filtered.report(ql, tl, top_k=2, query_texts=texts, wandb=False)
    candidates = TfidfCandidates.fit(tl.dataset.texts).top_k(texts, 4)
    scale = float(expected.abs().max())
    for qi, q in enumerate(report.queries):
        pool = candidates[qi].tolist()
        listed = q.top_positive + q.top_negative
        assert listed and all(e.train_index in pool for e in listed)
        best = max(pool, key=lambda i: float(expected[qi, i]))
        if expected[qi, best] > 0:
            assert q.top_positive[0].train_index == best
        for e in listed:
            assert e.score == pytest.approx(float(expected[qi, e.train_index]), rel=1e-6, abs=1e-9 * scale)
    assert list(tmp_path.iterdir()) == []
