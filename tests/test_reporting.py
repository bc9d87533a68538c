"""Tests for the reporting layer (report model, W&B logging, standalone HTML).

W&B always runs offline here, with its files under pytest's tmp_path. wandb 0.31 writes an
offline run as ``<dir>/wandb/offline-run-<YYYYmmdd_HHMMSS>-<id>/`` and a logged key
``a/b/c`` at step ``s`` as ``files/media/table/a/b/c_<s>_<hash>.table.json`` (Tables, and
the ``<key>_table`` behind each ``wandb.plot`` chart) or ``files/media/html/a/b/c_<s>_<hash>.html``.
"""

from __future__ import annotations

import html
import json
import logging
import math
import re
from pathlib import Path

import pytest
import torch

from lightning_influence.errors import ReportError
from lightning_influence.reporting import (LAYER_TABLE_COLUMNS, QUERY_TABLE_COLUMNS, TABLE_COLUMNS, InfluenceReport,
                                           QueryInfluence, TrainInfluence, build_report, layer_columns,
                                           log_factors_artifact, log_report, magnitude_curve, short_layer_names,
                                           token_heatmap_html, write_html_report)

NUM_QUERIES, NUM_TRAIN, K = 3, 40, 4
LAYERS = ["blocks.0.mlp", "blocks.1.attn"]
QUERY_IDS = ["q0", "q/1 <b>", "q2"]
QUERY_TEXTS = ["What is 2+2? 4", "Say <script>alert(1)</script> & stop", "Paris is the capital of France"]
PROMPT_LENGTHS = [12, 29, None]  # "What is 2+2?" | " 4"; "Say <script>alert(1)</script>" | " & stop"; unknown


def _tokens(q: int, n: int) -> list[str]:
    # Includes markup-looking tokens that must be escaped everywhere.
    return [f"tok{q}_{n}", "<script>", " & ", f"end{n}"]


def _token_scores_fn(calls: list | None = None):
    def fn(q: int, n: int):
        if calls is not None:
            calls.append((q, n))
        if n % 5 == 0:
            return None  # some sequences have no token-wise scores
        total = float(_SCORES[q, n])
        weights = [0.5, 0.25, -0.25, 0.5]  # sums to 1, so token scores sum to the score
        return _tokens(q, n), torch.tensor([w * total for w in weights])

    return fn


def _make_scores():
    g = torch.Generator().manual_seed(0)
    layer = torch.randn(len(LAYERS), NUM_QUERIES, NUM_TRAIN, generator=g, dtype=torch.float64)
    layer[1] *= 3.0  # second layer carries most of the magnitude
    return layer.sum(0), layer


_SCORES, _LAYER_SCORES = _make_scores()


def _report(**kw) -> InfluenceReport:
    args = dict(
        train_texts=[f"training text #{i} <i>raw</i>" for i in range(NUM_TRAIN)],
        k=K,
        layer_scores=_LAYER_SCORES,
        layer_names=LAYERS,
        token_scores_fn=_token_scores_fn(),
        strategy="ekfac",
        prompt_lengths=PROMPT_LENGTHS,
    )
    args.update(kw)
    return build_report(_SCORES, QUERY_IDS, QUERY_TEXTS, **args)


@pytest.fixture
def wandb_env(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))  # belt and braces: never ./wandb
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    from lightning.pytorch.utilities import rank_zero_only

    monkeypatch.setattr(rank_zero_only, "rank", 0, raising=False)
    return tmp_path


def _run_dir(root: Path) -> Path:
    runs = sorted((root / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, f"expected one offline run under {root}, got {runs}"
    return runs[0]


def _read_table(run_dir: Path, key: str) -> dict:
    matches = sorted((run_dir / "files" / "media" / "table").glob(f"{key}_*.table.json"))
    assert len(matches) == 1, f"{key}: {matches}"
    return json.loads(matches[0].read_text())


def _dense_row_views(qi: int, score: float) -> tuple[float, float]:
    """Share of the query's summed |score| and z-score, straight from the dense matrix."""
    row = _SCORES[qi]
    return score / row.abs().sum().item(), (score - row.mean().item()) / row.std(correction=0).item()


def _check_wandb_output(run_dir: Path, report: InfluenceReport) -> None:
    table = _read_table(run_dir, "influence/top_influences")
    # fixed columns, then one numeric column per layer under its short name
    assert table["columns"] == TABLE_COLUMNS + ["layer:blocks.0.mlp", "layer:blocks.1.attn"]
    rows = [dict(zip(table["columns"], r)) for r in table["data"]]
    expected = [(qi, q.query_id, d, e) for qi, q, d, e in report.iter_entries()]
    assert len(rows) == len(expected) == NUM_QUERIES * 2 * K
    for row, (qi, qid, direction, e) in zip(rows, expected):
        assert row["query_id"] == qid
        assert row["direction"] == direction
        assert row["rank"] == e.rank
        assert row["train_index"] == e.train_index
        dense = _SCORES[qi, e.train_index].item()
        assert row["score"] == pytest.approx(dense)
        assert (row["score"] > 0) == (direction == "positive")  # "most negative" never lists a positive score
        share, z = _dense_row_views(qi, dense)
        assert row["share"] == pytest.approx(share) and row["z_score"] == pytest.approx(z)
        assert row["train_text"] == e.text
        # per-layer contributions are numbers (sortable in W&B), from the dense per-layer matrix
        assert row["layer:blocks.0.mlp"] == pytest.approx(_LAYER_SCORES[0, qi, e.train_index].item())
        assert row["layer:blocks.1.attn"] == pytest.approx(_LAYER_SCORES[1, qi, e.train_index].item())
        mags = _LAYER_SCORES[:, qi, e.train_index].abs()
        assert row["top_layer"] == ["blocks.0.mlp", "blocks.1.attn"][int(mags.argmax())]
        assert row["top_layer_share"] == pytest.approx((mags.max() / mags.sum()).item())
        assert bool(row["heatmap_key"]) == (e.tokens is not None)
        n = PROMPT_LENGTHS[qi]
        text = QUERY_TEXTS[qi]
        if n is None:
            assert row["query_text"] == text and row["prompt"] is None and row["completion"] is None
        else:
            assert (row["prompt"], row["completion"]) == (text[:n], text[n:])
            assert row["query_text"] == f"{text[:n]}\u27e6{text[n:]}\u27e7"

    long = _read_table(run_dir, "influence/layer_contributions")
    assert long["columns"] == LAYER_TABLE_COLUMNS
    long_rows = [dict(zip(long["columns"], r)) for r in long["data"]]
    assert len(long_rows) == len(rows) * len(LAYERS)
    qindex = {q: i for i, q in enumerate(QUERY_IDS)}
    for r in long_rows:
        li = LAYERS.index(r["module"])
        assert r["layer"] == ["blocks.0.mlp", "blocks.1.attn"][li] == r["group"]
        assert r["score"] == pytest.approx(_LAYER_SCORES[li, qindex[r["query_id"]], r["train_index"]].item())

    queries = _read_table(run_dir, "influence/queries")
    assert queries["columns"] == QUERY_TABLE_COLUMNS
    for qi, r in enumerate(dict(zip(queries["columns"], r)) for r in queries["data"]):
        assert r["num_scored"] == NUM_TRAIN
        assert r["num_positive"] == int((_SCORES[qi] > 0).sum()) and r["num_negative"] == int((_SCORES[qi] < 0).sum())
        assert r["listed_positive"] == min(K, r["num_positive"]) and r["listed_negative"] == min(K, r["num_negative"])
        assert r["sum_abs_score"] == pytest.approx(_SCORES[qi].abs().sum().item())

    html_dir = run_dir / "files" / "media" / "html"
    html_files = sorted(html_dir.rglob("*.html"))
    with_tokens = [(q, d, e) for _, q, d, e in report.iter_entries() if e.tokens is not None]
    assert 0 < len(with_tokens) < len(expected)
    assert len(html_files) == len(with_tokens)
    keys = {r["heatmap_key"] for r in rows if r["heatmap_key"]}
    key_of = {(r["query_id"], r["direction"], r["rank"]): r["heatmap_key"] for r in rows if r["heatmap_key"]}
    assert set(key_of.values()) == keys
    for q, direction, e in with_tokens:
        key = key_of[(q.query_id, direction, e.rank)]
        assert key.endswith(f"/{direction}_{e.rank:03d}_train{e.train_index}")
        (path,) = [p for p in html_files if str(p.relative_to(html_dir)).startswith(key + "_")]
        text = path.read_text()
        for tok in e.tokens:
            assert html.escape(tok) in text
        # the panel says which query it belongs to, with the completion marked
        n = PROMPT_LENGTHS[QUERY_IDS.index(q.query_id)]
        qtext = q.query_text if n is None else f"{q.query_text[:n]}\u27e6{q.query_text[n:]}\u27e7"
        assert f"query: {html.escape(qtext)}</div>" in text
        assert "<script>" not in text and "&lt;script&gt;" in text
        assert "http" not in text  # self-contained: no injected stylesheet link

    dist = _read_table(run_dir, "influence/magnitude_distribution_table")
    assert dist["columns"][:3] == ["query_id", "rank", "abs_score"]
    first = [r for r in dist["data"] if r[0] == QUERY_IDS[0]]
    assert first[0][1] == 1 and first[0][2] == pytest.approx(_SCORES[0].abs().max().item())
    mags = [r[2] for r in first]
    assert mags == sorted(mags, reverse=True)

    bars = _read_table(run_dir, "influence/layer_shares_table")
    shares = dict(bars["data"])
    assert set(shares) == set(LAYERS)  # nothing to shorten: "blocks" holds the block index
    dense = _LAYER_SCORES.abs().sum(dim=(1, 2))
    assert shares["blocks.1.attn"] == pytest.approx((dense[1] / dense.sum()).item())


# --------------------------------------------------------------------------- report model


def test_build_report_topk_matches_torch_topk():
    calls: list = []
    report = _report(token_scores_fn=_token_scores_fn(calls))
    assert [q.query_id for q in report.queries] == QUERY_IDS
    assert report.layer_names == LAYERS
    for qi, q in enumerate(report.queries):
        assert q.query_text == QUERY_TEXTS[qi]
        pv, pi = torch.topk(_SCORES[qi], K)
        nv, ni = torch.topk(_SCORES[qi], K, largest=False)
        assert [e.train_index for e in q.top_positive] == pi.tolist()
        assert [e.train_index for e in q.top_negative] == ni.tolist()
        assert [e.score for e in q.top_positive] == pytest.approx(pv.tolist())
        assert [e.score for e in q.top_negative] == pytest.approx(nv.tolist())
        for entries in (q.top_positive, q.top_negative):
            assert [e.rank for e in entries] == list(range(1, K + 1))
        assert all(a.score >= b.score for a, b in zip(q.top_positive, q.top_positive[1:]))
        assert all(a.score <= b.score for a, b in zip(q.top_negative, q.top_negative[1:]))
        for e in q.top_positive + q.top_negative:
            assert e.text == f"training text #{e.train_index} <i>raw</i>"
            # layer scores are carried and sum to the score
            assert list(e.layer_scores) == LAYERS
            for li, name in enumerate(LAYERS):
                assert e.layer_scores[name] == pytest.approx(_LAYER_SCORES[li, qi, e.train_index].item())
            assert sum(e.layer_scores.values()) == pytest.approx(e.score)
            if e.train_index % 5 == 0:
                assert e.tokens is None and e.token_scores is None
            else:
                assert e.tokens == _tokens(qi, e.train_index)
                assert sum(e.token_scores) == pytest.approx(e.score)
    # token_scores_fn is only called for listed pairs
    listed = {(qi, e.train_index) for qi, _q, _d, e in report.iter_entries()}
    assert set(calls) == listed and len(calls) == len(listed)
    # layer totals: share of summed |score|
    expected = _LAYER_SCORES.abs().sum(dim=(1, 2))
    expected = expected / expected.sum()
    assert report.layer_totals == pytest.approx(dict(zip(LAYERS, expected.tolist())))
    assert report.scores is not None and torch.equal(report.scores, _SCORES)


def test_build_report_options_and_validation():
    s = torch.tensor([[3.0, 1.0, 2.0, float("nan")], [-1.0, -2.0, 0.5, -3.0]])
    r = build_report(s, ["a", "b"], ["x", "y"], train_texts=lambda i: f"t{i}", k=10, keep_scores=False,
                     strict_sign=False)
    # k is clamped to the number of finite scores, NaN is never listed
    assert [e.train_index for e in r.queries[0].top_positive] == [0, 2, 1]
    assert [e.train_index for e in r.queries[0].top_negative] == [1, 2, 0]
    assert r.queries[1].top_negative[0].text == "t3"
    assert r.scores is None and r.layer_totals is None and r.layer_names == []
    # Default: a list holds only scores of its sign; the counts say how many there are.
    strict = build_report(s, ["a", "b"], ["x", "y"], k=2)
    assert strict.queries[0].top_negative == []
    assert (strict.queries[0].num_scored, strict.queries[0].num_positive, strict.queries[0].num_negative) == (3, 3, 0)
    assert [e.train_index for e in strict.queries[1].top_positive] == [2]
    assert [e.score for e in strict.queries[1].top_negative] == [-3.0, -2.0]
    assert (strict.queries[1].num_positive, strict.queries[1].num_negative) == (1, 3)
    assert strict.queries[1].sum_abs == pytest.approx(6.5)
    assert strict.queries[1].top_negative[0].share == pytest.approx(-3.0 / 6.5)
    with pytest.raises(ReportError, match="2 query texts for 1"):
        build_report(s[:1], ["a"], ["x", "y"])
    with pytest.raises(ReportError, match="layer_scores must be"):
        build_report(s, ["a", "b"], ["x", "y"], layer_scores=torch.zeros(2, 2, 3))
    with pytest.raises(ReportError, match="prompt length 5 is outside"):
        build_report(s, ["a", "b"], ["x", "y"], prompt_lengths=[0, 5])
    with pytest.raises(ReportError, match="2 prompt lengths for 1"):
        build_report(s[:1], ["a"], ["x"], prompt_lengths=[0, 1])
    with pytest.raises(ReportError, match="'next' for causal LMs"):
        build_report(s, ["a", "b"], ["x", "y"], token_alignment="shifted")
    with pytest.raises(ValueError):
        TrainInfluence(0, 1.0, 1, tokens=["a"], token_scores=[1.0, 2.0])


def test_report_json_roundtrip(tmp_path):
    report = _report()
    path = report.save_json(tmp_path / "sub" / "report.json")
    assert path.exists() and not list(path.parent.glob("*.tmp"))
    json.loads(path.read_text())  # valid JSON
    loaded = InfluenceReport.load_json(path)
    assert loaded == report  # dataclass equality (the score matrix is compared separately)
    assert loaded.scores.dtype == report.scores.dtype and torch.equal(loaded.scores, report.scores)
    light = InfluenceReport.from_dict(report.to_dict(include_scores=False))
    assert light.scores is None and light.queries == report.queries


def test_magnitude_curve_log_spaced():
    row = torch.tensor([0.0, -5.0, 1.0, 3.0] + [1e-3] * 1000)
    pts = magnitude_curve(row, max_points=20)
    assert pts[0] == (1, 5.0) and pts[1] == (2, 3.0)
    assert pts[-1][0] == 1003  # zero dropped, last rank kept
    assert len(pts) <= 22
    assert [r for r, _ in pts] == sorted({r for r, _ in pts})


# --------------------------------------------------------------------------- HTML


def test_token_heatmap_html_escapes_and_colours():
    out = token_heatmap_html(["<script>", "a&b", '"q"', "neg"], [2.0, 1.0, 0.0, -1.0], 2.0, "t <1>")
    assert "<script>" not in out and "&lt;script&gt;" in out
    assert "a&amp;b" in out and "&quot;q&quot;" in out and "t &lt;1&gt;" in out
    assert "rgba(220,38,38,0.850)" in out  # max positive token: full red
    assert "rgba(220,38,38,0.425)" in out  # half magnitude: half intensity
    assert "rgba(37,99,235,0.425)" in out  # negative: blue
    assert "score <b>+2</b>" in out
    assert 'title="+2 (50% of the sequence&#x27;s |token scores|)"' in out  # the score on hover
    with pytest.raises(ReportError):
        token_heatmap_html(["a"], [1.0, 2.0])
    with pytest.raises(ReportError, match="alignment"):
        token_heatmap_html(["a"], [1.0], alignment="previous")


def _token_spans(fragment: str) -> list[tuple[str, float | None]]:
    """(token text, shown score) of each token span, read back from the HTML."""
    out = []
    for m in re.finditer(r'<span class="li-tok[^"]*" title="[^"]*"( data-score="([^"]+)")? [^>]*>([^<]*)</span>', fragment):
        out.append((html.unescape(m.group(3)), None if m.group(2) is None else float(m.group(2))))
    return out


def test_token_heatmap_next_token_alignment():
    # Causal LM: the score at input position t is about predicting token t+1. "works as a clockmaker":
    # the largest score sits on " as" (the position that predicts " a") and must be shown on " a".
    tokens = ["<bos>", "Ann", " works", " as", " a", " clockmaker"]
    raw = [0.5, -0.25, 1.0, 4.0, 2.0, 0.0]  # last position predicts nothing: 0
    spans = _token_spans(token_heatmap_html(tokens, raw, alignment="next", legend=False))
    assert [t for t, _ in spans] == tokens  # nothing added: the last score is 0
    assert spans[0][1] is None  # nothing predicts the first token
    assert [s for _, s in spans[1:]] == raw[:-1]
    assert max(spans[1:], key=lambda ts: ts[1])[0] == " a"
    # a non-zero last score is not dropped: it shows on an end marker
    raw[-1] = -3.0
    spans = _token_spans(token_heatmap_html(tokens, raw, alignment="next"))
    assert spans[-1] == ("\u220e", -3.0) and len(spans) == len(tokens) + 1
    # "input" alignment: each token keeps its own score
    spans = _token_spans(token_heatmap_html(tokens, raw, alignment="input"))
    assert [s for _, s in spans] == raw


def test_layer_names_and_groups():
    gpt2 = [f"model.transformer.h.{b}.{m}" for b in range(12) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                                         "mlp.c_proj")]
    short = short_layer_names(gpt2)
    assert short[:4] == ["h.0.attn.c_attn", "h.0.attn.c_proj", "h.0.mlp.c_fc", "h.0.mlp.c_proj"]
    assert short_layer_names(["net.fc"]) == ["net.fc"] and short_layer_names(["a.x", "b.x"]) == ["a.x", "b.x"]
    assert layer_columns(gpt2[:16]) == {s: [i] for i, s in enumerate(short[:16])}  # few: one column each
    by_block = layer_columns(gpt2[:24])  # 6 blocks x 4 layers: per block and kind
    assert list(by_block)[:3] == ["h.0.attn", "h.0.mlp", "h.1.attn"] and by_block["h.2.mlp"] == [10, 11]
    assert layer_columns(gpt2) == {"attn": [i for i in range(48) if i % 4 < 2], "mlp": [i for i in range(48) if i % 4 >= 2]}


def test_many_layers_grouped_columns(wandb_env):
    """48 GPT-2-style layers: the top table sums them into attn/mlp columns, the long table keeps all."""
    import wandb

    names = [f"model.transformer.h.{b}.{m}" for b in range(12) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                                         "mlp.c_proj")]
    g = torch.Generator().manual_seed(1)
    layer = torch.randn(len(names), 2, 10, generator=g, dtype=torch.float64)
    report = build_report(layer.sum(0), ["a", "b"], ["x", "y"], k=2, layer_scores=layer, layer_names=names)
    run = wandb.init(mode="offline", dir=str(wandb_env), project="test")
    try:
        log_report(report, run)
    finally:
        run.finish()
    run_dir = _run_dir(wandb_env)
    table = _read_table(run_dir, "influence/top_influences")
    assert table["columns"] == TABLE_COLUMNS + ["layer:attn", "layer:mlp"]
    attn = [i for i in range(48) if i % 4 < 2]
    for r in (dict(zip(table["columns"], r)) for r in table["data"]):
        qi = ["a", "b"].index(r["query_id"])
        col = layer[:, qi, r["train_index"]]
        assert r["layer:attn"] == pytest.approx(col[attn].sum().item())
        assert r["layer:attn"] + r["layer:mlp"] == pytest.approx(r["score"])
    long = _read_table(run_dir, "influence/layer_contributions")
    assert len(long["data"]) == len(table["data"]) * 48
    assert {r[4] for r in long["data"]} == set(short_layer_names(names))
    groups = dict(_read_table(run_dir, "influence/layer_group_shares_table")["data"])
    dense = layer.abs().sum(dim=(1, 2))
    assert groups["attn"] == pytest.approx((dense[attn].sum() / dense.sum()).item())


def test_write_html_report_self_contained(tmp_path):
    report = _report()
    path = write_html_report(report, tmp_path / "report.html")
    text = path.read_text(encoding="utf-8")
    assert not list(tmp_path.glob("*.tmp"))
    assert text.startswith("<!DOCTYPE html>")
    # self-contained and script-free
    assert "<script" not in text.lower()
    assert "http://" not in text and "https://" not in text and "src=" not in text
    assert "<link" not in text and "@import" not in text
    for qid, qtext, n in zip(QUERY_IDS, QUERY_TEXTS, PROMPT_LENGTHS):
        assert html.escape(qid) in text
        if n is None:
            assert f'<div class="query-text">{html.escape(qtext)}</div>' in text
        else:  # the prompt/completion boundary is marked
            assert f'<span class="prompt" title="prompt">{html.escape(qtext[:n])}</span>' in text
            assert f'measured part (its log-probability)">{html.escape(qtext[n:])}</span>' in text
    for qi, _q, d, e in report.iter_entries():
        if e.tokens is None:
            assert html.escape(e.text) in text
        else:  # the training text is shown as its token heatmap, in the row
            row = re.search(rf'<tr class="entry" id="q{qi}-{d}-{e.rank}">(.*?)</tr>', text).group(1)
            assert [t for t, _ in _token_spans(row)] == e.tokens
        assert f">{e.train_index}<" in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "Most positive influence" in text and "Most negative influence" in text
    # one legend for the page, none per heatmap
    assert text.count("How to read this report") == 1 and "li-legend" not in text
    assert "docs/reading-scores.md" in text
    for qi in range(NUM_QUERIES):
        n_neg = int((_SCORES[qi] < 0).sum())
        assert f"{n_neg} of {NUM_TRAIN} scored training examples have a negative score; showing {min(K, n_neg)}." in text
    for name in LAYERS:
        assert name in text
    # per-layer bar: one segment per layer, width = share of |score| from the dense per-layer matrix
    e = report.queries[0].top_positive[0]
    row = re.search(r'<tr class="entry" id="q0-positive-1">(.*?)</tr>', text).group(1)
    widths = [float(w) for w in re.findall(r'class="lseg"[^>]*width:([0-9.]+)%', row)]
    mags = _LAYER_SCORES[:, 0, e.train_index].abs()
    assert widths == pytest.approx((100 * mags / mags.sum()).tolist(), abs=0.01)
    # the magnitude plot labels every decade the data spans
    assert "<svg" in text
    labels = re.findall(r'<text class="ytick"[^>]*>([^<]*)</text>', text)
    lo = math.floor(math.log10(_SCORES.abs().min().item()))
    hi = math.ceil(math.log10(_SCORES.abs().max().item()))
    assert len(labels) == hi - lo + 1 >= 2
    xlabels = re.findall(r'<text class="xtick"[^>]*>([^<]*)</text>', text)
    assert xlabels == ["1", "10", "10\u00b2"]  # 40 training examples: ranks 1 to 40


def test_report_strict_sign_shows_fewer_rows_and_counts(tmp_path):
    """A query with only 2 negative scores lists 2 "most negative" entries, and says so."""
    s = torch.tensor([[5.0, 4.0, 3.0, -1.0, 2.0, -0.5]])
    report = build_report(s, ["only"], ["Q? A"], k=4, prompt_lengths=[2])
    q = report.queries[0]
    assert [e.score for e in q.top_negative] == [-1.0, -0.5]
    assert [e.score for e in q.top_positive] == [5.0, 4.0, 3.0, 2.0]
    text = write_html_report(report, tmp_path / "r.html").read_text()
    assert "2 of 6 scored training examples have a negative score; showing 2." in text
    assert "4 of 6 scored training examples have a positive score; showing 4." in text


# --------------------------------------------------------------------------- W&B


def test_log_report_wandb_run_offline(wandb_env):
    import wandb

    report = _report()
    run = wandb.init(mode="offline", dir=str(wandb_env), project="test")
    try:
        payload = log_report(report, run)
    finally:
        run.finish()
    assert "influence/top_influences" in payload
    _check_wandb_output(_run_dir(wandb_env), report)


def test_log_report_lightning_wandb_logger(wandb_env):
    from lightning.pytorch.loggers import WandbLogger

    report = _report()
    logger = WandbLogger(offline=True, save_dir=str(wandb_env), project="test")
    try:
        log_report(report, logger)
        factors = wandb_env / "factors"
        factors.mkdir()
        (factors / "layer0.safetensors").write_bytes(b"\0" * 16)
        artifact = log_factors_artifact(logger, factors, metadata={"strategy": "ekfac"})
        assert artifact.type == "influence-factors"
        assert "layer0.safetensors" in artifact.manifest.entries
    finally:
        logger.experiment.finish()
    _check_wandb_output(_run_dir(wandb_env), report)


def test_log_report_caps_rows_and_heatmaps(wandb_env, caplog):
    import wandb

    report = _report()
    run = wandb.init(mode="offline", dir=str(wandb_env), project="test")
    try:
        with caplog.at_level(logging.WARNING, logger="lightning_influence"):
            payload = log_report(report, run, key_prefix="capped", max_rows=5, max_heatmaps=2, log_plots=False)
    finally:
        run.finish()
    assert any("logging only 5" in r.getMessage() for r in caplog.records)
    assert any("logging only 2" in r.getMessage() for r in caplog.records)
    assert len([k for k in payload if k.startswith("capped/heatmaps/")]) == 2
    table = _read_table(_run_dir(wandb_env), "capped/top_influences")
    rows = [dict(zip(table["columns"], r)) for r in table["data"]]
    assert len(rows) == 5
    # the cap keeps rank 1 of every query and direction before any rank 2
    assert all(r["rank"] == 1 for r in rows)
    assert {r["query_id"] for r in rows} == set(QUERY_IDS)


def test_log_report_only_on_rank_zero(monkeypatch):
    from lightning.pytorch.utilities import rank_zero_only

    class Exploding:
        def __getattr__(self, name):
            raise AssertionError(f"touched the run on a non-zero rank: {name}")

    monkeypatch.setattr(rank_zero_only, "rank", 1, raising=False)
    assert log_report(_report(), Exploding()) is None
    assert log_factors_artifact(Exploding(), "/nonexistent") is None


def test_manual_report_renders_without_optional_fields(tmp_path):
    # A report built by hand with no layers, tokens, texts or score matrix.
    report = InfluenceReport(
        queries=[QueryInfluence("only", "prompt", [TrainInfluence(3, 1.5, 1)], [TrainInfluence(7, -0.5, 1)])],
        strategy="identity",
    )
    text = write_html_report(report, tmp_path / "r.html").read_text()
    assert "only" in text and "<svg" not in text
    assert math.isclose(report.queries[0].top_positive[0].score, 1.5)
