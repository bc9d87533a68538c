"""Data model for influence reports, independent of how the scores were computed.

An :class:`InfluenceReport` lists, for each query, the training examples with the most
positive and the most negative influence scores. Sign convention (see
``docs/method.md``, section 1): a **positive** score means that training on the example
made the query's completion **more** likely; a negative one, less likely.

Reports are plain dataclasses that round-trip through JSON (:meth:`InfluenceReport.to_dict`,
:meth:`InfluenceReport.from_dict`, :meth:`InfluenceReport.save_json`,
:meth:`InfluenceReport.load_json`) and are rendered by :mod:`.wandb_report` and
:mod:`.html_report`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import torch

from lightning_influence.scoring.topk import _select

log = logging.getLogger(__name__)

__all__ = [
    "TrainInfluence",
    "QueryInfluence",
    "InfluenceReport",
    "build_report",
    "magnitude_curve",
    "layer_shares",
    "atomic_write_text",
]

TrainTexts = Union[Sequence[str], Callable[[int], "str | None"], None]
TokenScoresFn = Callable[[int, int], "tuple[Sequence[str], Sequence[float]] | None"]


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically: temp file in the same directory, then
    ``os.replace``, so readers never see a half-written file (and a crash leaves the old one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


@dataclass
class TrainInfluence:
    """One training example listed for one query.

    Attributes:
        train_index: index of the example in the training set.
        score: total influence score on the query (positive = made the completion more likely).
        rank: 1-based position within its list (top positive or top negative).
        text: decoded training text, if available.
        layer_scores: per tracked module score; these sum to ``score``.
        tokens: decoded tokens of the training sequence.
        token_scores: token-wise influence, same length as ``tokens``, summing to ``score``.
    """

    train_index: int
    score: float
    rank: int
    text: str | None = None
    layer_scores: dict[str, float] | None = None
    tokens: list[str] | None = None
    token_scores: list[float] | None = None

    def __post_init__(self) -> None:
        if (self.tokens is None) != (self.token_scores is None):
            raise ValueError("tokens and token_scores must be given together")
        if self.tokens is not None and len(self.tokens) != len(self.token_scores):
            raise ValueError(
                f"tokens ({len(self.tokens)}) and token_scores ({len(self.token_scores)}) "
                "must have the same length"
            )

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict."""
        return {
            "train_index": int(self.train_index),
            "score": float(self.score),
            "rank": int(self.rank),
            "text": self.text,
            "layer_scores": None
            if self.layer_scores is None
            else {str(k): float(v) for k, v in self.layer_scores.items()},
            "tokens": None if self.tokens is None else [str(t) for t in self.tokens],
            "token_scores": None if self.token_scores is None else [float(s) for s in self.token_scores],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainInfluence:
        """Inverse of :meth:`to_dict`."""
        return cls(
            train_index=int(d["train_index"]),
            score=float(d["score"]),
            rank=int(d["rank"]),
            text=d.get("text"),
            layer_scores=None
            if d.get("layer_scores") is None
            else {str(k): float(v) for k, v in d["layer_scores"].items()},
            tokens=None if d.get("tokens") is None else [str(t) for t in d["tokens"]],
            token_scores=None if d.get("token_scores") is None else [float(s) for s in d["token_scores"]],
        )


@dataclass
class QueryInfluence:
    """The most influential training examples for one query.

    Attributes:
        query_id: identifier of the query.
        query_text: prompt + completion as shown to users.
        top_positive: most positive first.
        top_negative: most negative first.
    """

    query_id: str
    query_text: str
    top_positive: list[TrainInfluence] = field(default_factory=list)
    top_negative: list[TrainInfluence] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict."""
        return {
            "query_id": str(self.query_id),
            "query_text": str(self.query_text),
            "top_positive": [t.to_dict() for t in self.top_positive],
            "top_negative": [t.to_dict() for t in self.top_negative],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QueryInfluence:
        """Inverse of :meth:`to_dict`."""
        return cls(
            query_id=str(d["query_id"]),
            query_text=str(d["query_text"]),
            top_positive=[TrainInfluence.from_dict(t) for t in d.get("top_positive", [])],
            top_negative=[TrainInfluence.from_dict(t) for t in d.get("top_negative", [])],
        )


@dataclass
class InfluenceReport:
    """A full influence report.

    Attributes:
        queries: one entry per query.
        strategy: how scores were computed ("ekfac", "kfac", "diagonal", "identity", ...).
        layer_names: tracked modules, in the order used for ``layer_scores``.
        scores: optional full ``[num_queries, num_train]`` score matrix, used for the
            distribution (sorted magnitude vs rank) plot. Excluded from ``==``.
        layer_totals: optional share of the summed ``|score|`` per layer (sums to 1), for a
            bar chart.
    """

    queries: list[QueryInfluence]
    strategy: str
    layer_names: list[str] = field(default_factory=list)
    # Tensors have no scalar truth value, so keep them out of the generated __eq__.
    scores: torch.Tensor | None = field(default=None, compare=False, repr=False)
    layer_totals: dict[str, float] | None = None

    def to_dict(self, include_scores: bool = True) -> dict[str, Any]:
        """Return a JSON-serialisable dict.

        Args:
            include_scores: also store the full score matrix (can be large) as nested lists.
        """
        d: dict[str, Any] = {
            "strategy": str(self.strategy),
            "layer_names": [str(n) for n in self.layer_names],
            "layer_totals": None
            if self.layer_totals is None
            else {str(k): float(v) for k, v in self.layer_totals.items()},
            "queries": [q.to_dict() for q in self.queries],
            "scores": None,
            "scores_dtype": None,
        }
        if include_scores and self.scores is not None:
            s = self.scores.detach().cpu()
            d["scores"] = s.tolist()
            d["scores_dtype"] = str(s.dtype).removeprefix("torch.")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InfluenceReport:
        """Inverse of :meth:`to_dict`."""
        scores = None
        if d.get("scores") is not None:
            dtype = getattr(torch, d.get("scores_dtype") or "float32", torch.float32)
            scores = torch.tensor(d["scores"], dtype=dtype)
        return cls(
            queries=[QueryInfluence.from_dict(q) for q in d.get("queries", [])],
            strategy=str(d.get("strategy", "")),
            layer_names=[str(n) for n in d.get("layer_names", [])],
            scores=scores,
            layer_totals=None
            if d.get("layer_totals") is None
            else {str(k): float(v) for k, v in d["layer_totals"].items()},
        )

    def save_json(self, path: str | os.PathLike, include_scores: bool = True, indent: int | None = 1) -> Path:
        """Write the report as JSON, atomically (temp file + ``os.replace``). Returns the path."""
        return atomic_write_text(path, json.dumps(self.to_dict(include_scores), indent=indent))

    @classmethod
    def load_json(cls, path: str | os.PathLike) -> InfluenceReport:
        """Read a report written by :meth:`save_json`."""
        with open(path, encoding="utf-8") as fh:
            return cls.from_dict(json.load(fh))

    def iter_entries(self):
        """Yield ``(query_index, query, direction, entry)`` for every listed example, with
        direction ``"positive"`` or ``"negative"``."""
        for qi, q in enumerate(self.queries):
            for direction, entries in (("positive", q.top_positive), ("negative", q.top_negative)):
                for entry in entries:
                    yield qi, q, direction, entry


def _train_text(train_texts: TrainTexts, idx: int) -> str | None:
    if train_texts is None:
        return None
    if callable(train_texts):
        text = train_texts(idx)
    else:
        text = train_texts[idx]
    return None if text is None else str(text)


def _topk_finite(row: torch.Tensor, k: int, largest: bool) -> tuple[list[float], list[int]]:
    """Top-k of a 1-D row ignoring NaNs (TF-IDF-filtered rows are NaN off the candidates), by the
    library's one selection rule (``scoring.topk``: ties go to the lower training index)."""
    keep = torch.nonzero(~torch.isnan(row)).flatten()
    k = min(k, keep.numel())
    if k <= 0:
        return [], []
    vals, idx = _select(row[keep].unsqueeze(0), keep.unsqueeze(0), k, largest)
    return vals[0].tolist(), idx[0].tolist()


def build_report(
    scores: torch.Tensor,
    query_ids: Sequence[str],
    query_texts: Sequence[str],
    train_texts: TrainTexts = None,
    k: int = 10,
    layer_scores: torch.Tensor | None = None,
    layer_names: Sequence[str] | None = None,
    token_scores_fn: TokenScoresFn | None = None,
    strategy: str = "ekfac",
    keep_scores: bool = True,
    strict_sign: bool = False,
) -> InfluenceReport:
    """Build an :class:`InfluenceReport` from a score matrix.

    For every query, lists the ``k`` training examples with the largest scores (most
    positive first) and the ``k`` with the smallest (most negative first); among equal
    scores the lower training index comes first (the rule of ``scoring.topk``). NaN scores
    are never listed.

    Args:
        scores: ``[num_queries, num_train]`` influence scores (positive = training on the
            example made the query's completion more likely).
        query_ids: one id per query.
        query_texts: prompt + completion per query, as shown to users.
        train_texts: decoded training texts, either a sequence indexed by training index or a
            callable ``idx -> str``; only called for listed examples.
        k: number of examples per list (clamped to ``num_train``).
        layer_scores: optional ``[num_layers, num_queries, num_train]`` per-layer scores that
            sum to ``scores`` over the first dimension; carried into each listed entry and
            summarised as ``layer_totals`` (share of the summed ``|score|`` per layer).
        layer_names: names of the layers in ``layer_scores`` (default ``layer_0``, ...).
        token_scores_fn: optional ``(query_idx, train_idx) -> (tokens, token_scores) | None``,
            called only for listed pairs, giving the token-wise decomposition.
        strategy: name of the preconditioning strategy, recorded in the report.
        keep_scores: keep a CPU copy of ``scores`` in the report (for distribution plots).
        strict_sign: drop entries whose sign does not match their list (e.g. a positive
            score in ``top_negative`` when fewer than ``k`` scores are negative).

    Returns:
        The report.
    """
    scores = torch.as_tensor(scores).detach()
    if scores.dim() != 2:
        raise ValueError(f"scores must be [num_queries, num_train], got shape {tuple(scores.shape)}")
    num_queries, num_train = scores.shape
    query_ids = [str(q) for q in query_ids]
    query_texts = [str(t) for t in query_texts]
    if len(query_ids) != num_queries or len(query_texts) != num_queries:
        raise ValueError(
            f"got {len(query_ids)} query ids and {len(query_texts)} query texts for {num_queries} queries"
        )
    if len(set(query_ids)) != len(query_ids):
        raise ValueError("query_ids must be unique")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    k = min(int(k), num_train)
    if torch.isnan(scores).any():
        log.warning("influence scores contain %d NaN values; they are not listed", int(torch.isnan(scores).sum()))

    names: list[str] = [str(n) for n in layer_names] if layer_names is not None else []
    layer_totals: dict[str, float] | None = None
    if layer_scores is not None:
        layer_scores = torch.as_tensor(layer_scores).detach()
        if layer_scores.dim() != 3 or tuple(layer_scores.shape[1:]) != (num_queries, num_train):
            raise ValueError(
                f"layer_scores must be [num_layers, {num_queries}, {num_train}], got {tuple(layer_scores.shape)}"
            )
        if layer_names is None:
            names = [f"layer_{i}" for i in range(layer_scores.shape[0])]
        if len(names) != layer_scores.shape[0]:
            raise ValueError(f"got {len(names)} layer names for {layer_scores.shape[0]} layers")
        layer_totals = layer_shares(layer_scores, names)
        # Index on CPU once; per-entry .item() on an accelerator would sync every time.
        layer_scores = layer_scores.cpu()

    scores_cpu = scores.cpu()
    queries: list[QueryInfluence] = []
    for qi in range(num_queries):
        row = scores_cpu[qi]
        lists: dict[bool, list[TrainInfluence]] = {}
        for largest in (True, False):
            vals, idxs = _topk_finite(row, k, largest)
            entries: list[TrainInfluence] = []
            for val, idx in zip(vals, idxs):
                if strict_sign and ((largest and not val > 0) or (not largest and not val < 0)):
                    break  # sorted, so every later entry has the wrong sign too
                tokens = token_scores = None
                if token_scores_fn is not None:
                    out = token_scores_fn(qi, idx)
                    if out is not None:
                        tokens = [str(t) for t in out[0]]
                        ts = out[1]
                        if isinstance(ts, torch.Tensor):
                            ts = ts.detach().cpu().reshape(-1).tolist()
                        token_scores = [float(s) for s in ts]
                entries.append(
                    TrainInfluence(
                        train_index=int(idx),
                        score=float(val),
                        rank=len(entries) + 1,
                        text=_train_text(train_texts, idx),
                        layer_scores=None
                        if layer_scores is None
                        else {n: float(layer_scores[li, qi, idx]) for li, n in enumerate(names)},
                        tokens=tokens,
                        token_scores=token_scores,
                    )
                )
            lists[largest] = entries
        queries.append(QueryInfluence(query_ids[qi], query_texts[qi], lists[True], lists[False]))

    return InfluenceReport(
        queries=queries,
        strategy=str(strategy),
        layer_names=names,
        scores=scores_cpu.clone() if keep_scores else None,
        layer_totals=layer_totals,
    )


def layer_shares(layer_scores: torch.Tensor, layer_names: Sequence[str]) -> dict[str, float]:
    """Share of the summed absolute score carried by each layer (sums to 1; all 0 if every
    score is 0). ``layer_scores`` is ``[num_layers, ...]``; NaNs are ignored."""
    ls = torch.as_tensor(layer_scores).detach()
    per_layer = torch.nan_to_num(ls.abs().double(), nan=0.0).reshape(ls.shape[0], -1).sum(dim=1)
    total = float(per_layer.sum())
    if total <= 0 or not math.isfinite(total):
        return {str(n): 0.0 for n in layer_names}
    return {str(n): float(v) / total for n, v in zip(layer_names, per_layer.tolist())}


def magnitude_curve(row: torch.Tensor, max_points: int = 200) -> list[tuple[int, float]]:
    """Sorted influence magnitudes vs rank for one query, as ``[(rank, |score|), ...]``.

    Ranks are 1-based, largest magnitude first. To keep plots small the ranks are sampled
    on a logarithmic grid (the curve is meant for log-log axes, like the power-law figure of
    Grosse et al.), always including rank 1 and the last rank. Zero and NaN magnitudes are
    dropped since they have no logarithm.
    """
    mags = torch.as_tensor(row).detach().reshape(-1).abs().double().cpu()
    mags = mags[torch.isfinite(mags) & (mags > 0)]
    n = mags.numel()
    if n == 0 or max_points <= 0:
        return []
    mags = torch.sort(mags, descending=True).values
    if n <= max_points:
        ranks = list(range(1, n + 1))
    else:
        grid = torch.logspace(0, math.log10(n), steps=max_points, dtype=torch.float64)
        ranks = sorted(set(int(r) for r in grid.round().clamp(1, n).tolist()) | {1, n})
    return [(r, float(mags[r - 1])) for r in ranks]
