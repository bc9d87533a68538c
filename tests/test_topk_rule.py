"""One top-k rule: the report and the demo rank scores as the streaming top-k does (most extreme first,
ties to the lower training index, NaN never listed), checked against an explicit sort."""

from __future__ import annotations

import math

import torch

from lightning_influence.demo.driver import best_rank, evaluate_queries, recall_at_k
from lightning_influence.reporting import build_report
from lightning_influence.scoring.topk import StreamingTopK


def explicit_top(row: list[float], k: int, largest: bool) -> list[int]:
    """The k best indices by value, ties by ascending index, NaN left out: plain Python sorting."""
    finite = [(v, i) for i, v in enumerate(row) if not math.isnan(v)]
    finite.sort(key=lambda vi: ((-vi[0] if largest else vi[0]), vi[1]))
    return [i for _, i in finite[:k]]


def tied_scores() -> torch.Tensor:
    # Many exact ties (torch.topk returns tied entries in no particular order) and some NaN.
    g = torch.Generator().manual_seed(3)
    row = torch.randint(-2, 3, (2, 300), generator=g).to(torch.float64)
    row[0, ::7] = float("nan")
    return row


def test_report_lists_ties_by_lower_index_and_skips_nan():
    scores = tied_scores()
    k = 12
    report = build_report(scores, ["a", "b"], ["text a", "text b"], k=k)
    for qi, q in enumerate(report.queries):
        row = scores[qi].tolist()
        assert [e.train_index for e in q.top_positive] == explicit_top(row, k, True)
        assert [e.train_index for e in q.top_negative] == explicit_top(row, k, False)
    # The same lists as the streaming top-k of the library (on the finite query).
    top = StreamingTopK(1, k)
    top.update(scores[1:], 0)
    assert [e.train_index for e in report.queries[1].top_positive] == top.most_positive()[1][0].tolist()
    assert [e.train_index for e in report.queries[1].top_negative] == top.most_negative()[1][0].tolist()


def test_report_with_fewer_finite_scores_than_k():
    scores = torch.full((1, 10), float("nan"), dtype=torch.float64)
    scores[0, [2, 5, 7]] = torch.tensor([1.0, 1.0, -3.0], dtype=torch.float64)
    q = build_report(scores, ["a"], ["text"], k=5, strict_sign=False).queries[0]
    assert [e.train_index for e in q.top_positive] == [2, 5, 7]
    assert [e.train_index for e in q.top_negative] == [7, 2, 5]
    strict = build_report(scores, ["a"], ["text"], k=5).queries[0]  # the default: each list keeps its own sign
    assert [e.train_index for e in strict.top_positive] == [2, 5]
    assert [e.train_index for e in strict.top_negative] == [7]


def test_demo_ranking_follows_the_same_rule():
    scores = tied_scores()
    row = scores[0]
    expected = explicit_top(row.tolist(), 10, True)
    # recall@10: exactly the supporting indices among the explicit top 10 count.
    supporting = expected[:3] + [i for i in range(300) if i not in expected and not math.isnan(row[i])][:2]
    assert recall_at_k(row, supporting, k=10) == 3 / 5
    order = explicit_top(row.tolist(), 300, True)
    assert best_rank(row, [order[4], order[9]]) == 5
    queries = [{"query_id": "q0", "prompt": "alpha", "completion": "beta"},
               {"query_id": "q1", "prompt": "gamma", "completion": "delta"}]
    texts = [f"alpha beta {i}" for i in range(300)]
    outcomes = evaluate_queries(scores, queries, texts, [supporting, None], top=7)
    for qi, o in enumerate(outcomes):
        assert [i for i, _ in o.top] == explicit_top(scores[qi].tolist(), 7, True)
