"""The built-in demo, end to end in quick mode: outputs, W&B offline run, recall, printed tables."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import pytest
import torch
from lightning_influence.integration.pipeline import load_scores

from lightning_influence.demo.driver import (FactsDataModule, TinyGPT2LM, best_rank, recall_at_k, run_demo,
                                             tfidf_scores)
from lightning_influence.reporting import TABLE_COLUMNS

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    lines: list[str] = []
    threads = torch.get_num_threads()
    result = run_demo(output_dir=out, quick=True, progress_bar=False, echo=lines.append)
    assert torch.get_num_threads() == threads  # the demo restores the thread setting
    return result, "\n".join(lines)


def test_scores_and_factors_are_saved(demo):
    result, _ = demo
    scores = load_scores(result.output_dir).scores
    assert scores.shape == (6, 300)
    assert torch.isfinite(scores).all()
    assert (result.factors_dir / "manifest.json").is_file()
    assert json.loads((result.factors_dir / "manifest.json").read_text())["strategy"] == "ekfac"
    report = json.loads(result.report_json.read_text())
    for qi, q in enumerate(report["queries"]):  # the report lists the top of the saved scores
        assert q["top_positive"][0]["train_index"] == int(scores[qi].argmax())


def test_html_report_shows_queries_and_tokens(demo):
    result, _ = demo
    page = result.report_html.read_text(encoding="utf-8")
    for q in result.queries:
        assert q.query_id in page
        assert html.escape(q.text) in re.sub(r"<[^>]+>", "", page)  # the text, split at the completion by markup
    # Token heatmaps of the listed training sequences: the queried names appear as tokens.
    name = result.queries[0].text.split()[0]
    assert name in page


def test_wandb_offline_run_holds_the_table(demo):
    result, _ = demo
    run_dir = result.wandb_run_dir
    assert run_dir is not None and run_dir.is_dir()
    assert run_dir.parent == result.output_dir / "wandb" and run_dir.name.startswith("offline-run-")
    assert not (Path.cwd() / "wandb").exists() or (Path.cwd() / "wandb").resolve() != run_dir.parent.resolve()
    tables = list(run_dir.glob("files/media/table/influence/top_influences_*.table.json"))
    assert len(tables) == 1
    table = json.loads(tables[0].read_text())
    assert table["columns"][:len(TABLE_COLUMNS)] == TABLE_COLUMNS  # then one numeric column per layer
    report = json.loads(result.report_json.read_text())
    expected = [(q["query_id"], d, e["rank"], e["train_index"]) for q in report["queries"]
                for d in ("positive", "negative") for e in q[f"top_{d}"]]
    col = {c: i for i, c in enumerate(table["columns"])}
    rows = [(r[col["query_id"]], r[col["direction"]], r[col["rank"]], r[col["train_index"]]) for r in table["data"]]
    assert rows == expected
    assert len(rows) == 6 * 2 * 10
    assert all(r[col["train_text"]] for r in table["data"])  # the reports show the training text
    # Offline runs keep the summary in the run's record file (uploaded by `wandb sync`).
    records = b"".join(p.read_bytes() for p in run_dir.glob("run-*.wandb"))
    assert b"demo/mean_recall_at_10" in records and b"influence/top_influences" in records


def test_influence_traces_the_planted_facts(demo):
    result, _ = demo
    forward = [q for q in result.queries if not q.reversed]
    reversed_ = [q for q in result.queries if q.reversed]
    assert len(forward) == 5 and len(reversed_) == 1
    assert result.mean_recall > 0
    assert sum(q.recall > 0 for q in forward) >= 3
    assert min(q.best_rank for q in forward) == 1  # some fact's own statement tops its list
    assert all(q.tfidf_recall is not None for q in result.queries)
    # The model learned the trained direction far better than the reversed one.
    assert reversed_[0].log_prob < min(q.log_prob for q in forward)


def test_printed_tables(demo):
    result, text = demo
    for q in result.queries:
        assert f"Query {q.query_id}" in text
        assert q.text in text
    assert text.count("states fact?  training sequence") == 6  # one table per query
    assert "YES" in text
    assert "recall@10" in text and "TF-IDF" in text
    assert "mean (trained order)" in text
    assert "reversal-curse" in text and "<- reversed order" in text
    assert "Did the model learn the facts?" in text
    assert f"HTML report:       {result.report_html}" in text
    assert f"W&B offline run:   {result.wandb_run_dir}" in text


def test_saved_model_reloads_without_pickle(demo):
    result, _ = demo
    from_ckpt = TinyGPT2LM.load_from_checkpoint(str(result.checkpoint), map_location="cpu", weights_only=True)
    from_dir = TinyGPT2LM.from_pretrained(result.model_dir)
    a, b = from_ckpt.state_dict(), from_dir.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (result.tokenizer_dir / "tokenizer.json").is_file()
    assert len(result.train_texts.read_text().splitlines()) == 300


def test_recall_helpers():
    scores = torch.tensor([0.1, 5.0, float("nan"), 3.0, -1.0])
    assert recall_at_k(scores, [1, 3], k=2) == 1.0
    assert recall_at_k(scores, [1, 4], k=2) == 0.5
    assert recall_at_k(scores, [2], k=4) == 0.0  # NaN never ranks
    assert best_rank(scores, [4, 3]) == 2
    sims = tfidf_scores(["the cat sat", "a dog ran", "the dog sat"], ["dog sat"])
    assert sims.shape == (1, 3) and int(sims[0].argmax()) == 2


def test_example_queries_match_the_default_corpus():
    dm = FactsDataModule()  # defaults: 2000 sequences, seed 0
    shipped = [json.loads(line) for line in (REPO / "examples" / "queries.jsonl").read_text().splitlines()]
    expected = [{k: q[k] for k in ("query_id", "prompt", "completion", "fact_id", "reversed")} for q in dm.queries]
    assert shipped == expected
    assert sum(q["reversed"] for q in shipped) == 1
