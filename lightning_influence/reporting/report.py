"""Data model for influence reports, independent of how the scores were computed.

An :class:`InfluenceReport` lists, for each query, the training examples with the most
positive and the most negative influence scores. Sign convention (docs/method.md, section 1):
a **positive** score means that training on the example made the query's completion
**more** likely; a negative one, less likely. docs/reading-scores.md explains how to read
a score's size; the report carries two per-query normalised views of each listed score
(its share of the query's summed ``|score|`` and its z-score within the query's row).

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

from lightning_influence.errors import ReportError
from lightning_influence.scoring.topk import select_top_k

log = logging.getLogger(__name__)

__all__ = [
    "TrainInfluence",
    "QueryInfluence",
    "InfluenceReport",
    "build_report",
    "magnitude_curve",
    "layer_shares",
    "atomic_write_text",
    "TOKEN_ALIGNMENTS",
]

#: Values of :attr:`InfluenceReport.token_alignment`.
TOKEN_ALIGNMENTS = ("input", "next")

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
            ``token_scores[t]`` is the score at input position ``t`` (see
            :attr:`InfluenceReport.token_alignment` for which token it is about).
        share: ``score / sum |score|`` over every scored training example of the query: the
            fraction of the query's total influence this example carries (signed).
        z_score: ``(score - mean) / std`` over the query's scored training examples.
    """

    train_index: int
    score: float
    rank: int
    text: str | None = None
    layer_scores: dict[str, float] | None = None
    tokens: list[str] | None = None
    token_scores: list[float] | None = None
    share: float | None = None
    z_score: float | None = None

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
            "share": _opt_float(self.share),
            "z_score": _opt_float(self.z_score),
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
            share=_opt_float(d.get("share")),
            z_score=_opt_float(d.get("z_score")),
        )


@dataclass
class QueryInfluence:
    """The most influential training examples for one query.

    Attributes:
        query_id: identifier of the query.
        query_text: prompt + completion as shown to users.
        top_positive: most positive first; only scores ``> 0``.
        top_negative: most negative first; only scores ``< 0`` (so a query with fewer than
            ``k`` negative scores lists fewer than ``k``: see ``num_negative``).
        prompt_length: number of characters of ``query_text`` that are the prompt (the rest
            is the completion whose log-probability is measured); ``None`` if unknown.
        num_scored: training examples with a finite score for this query.
        num_positive: of those, how many have a score ``> 0``.
        num_negative: of those, how many have a score ``< 0``.
        sum_abs: ``sum |score|`` over the scored examples (the denominator of ``share``).
    """

    query_id: str
    query_text: str
    top_positive: list[TrainInfluence] = field(default_factory=list)
    top_negative: list[TrainInfluence] = field(default_factory=list)
    prompt_length: int | None = None
    num_scored: int | None = None
    num_positive: int | None = None
    num_negative: int | None = None
    sum_abs: float | None = None

    def __post_init__(self) -> None:
        if self.prompt_length is not None and not 0 <= self.prompt_length <= len(self.query_text):
            raise ReportError(
                f"query {self.query_id!r}: prompt_length {self.prompt_length} is outside its text "
                f"({len(self.query_text)} characters); give the prompt's length in characters of query_text"
            )

    @property
    def prompt(self) -> str | None:
        """The prompt part of ``query_text`` (``None`` when ``prompt_length`` is unknown)."""
        return None if self.prompt_length is None else self.query_text[: self.prompt_length]

    @property
    def completion(self) -> str | None:
        """The completion part of ``query_text`` (``None`` when ``prompt_length`` is unknown)."""
        return None if self.prompt_length is None else self.query_text[self.prompt_length :]

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict."""
        return {
            "query_id": str(self.query_id),
            "query_text": str(self.query_text),
            "prompt_length": _opt_int(self.prompt_length),
            "num_scored": _opt_int(self.num_scored),
            "num_positive": _opt_int(self.num_positive),
            "num_negative": _opt_int(self.num_negative),
            "sum_abs": _opt_float(self.sum_abs),
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
            prompt_length=_opt_int(d.get("prompt_length")),
            num_scored=_opt_int(d.get("num_scored")),
            num_positive=_opt_int(d.get("num_positive")),
            num_negative=_opt_int(d.get("num_negative")),
            sum_abs=_opt_float(d.get("sum_abs")),
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
        token_alignment: which token ``token_scores[t]`` is about. ``"input"``: the token at
            position ``t`` itself (e.g. a classifier). ``"next"``: the token at ``t + 1``, as in
            a causal LM, where position ``t``'s output predicts the next token, so its score is
            the influence of learning that next token; the renderers then show it on the
            predicted token.
    """

    queries: list[QueryInfluence]
    strategy: str
    layer_names: list[str] = field(default_factory=list)
    # Tensors have no scalar truth value, so keep them out of the generated __eq__.
    scores: torch.Tensor | None = field(default=None, compare=False, repr=False)
    layer_totals: dict[str, float] | None = None
    token_alignment: str = "input"

    def __post_init__(self) -> None:
        if self.token_alignment not in TOKEN_ALIGNMENTS:
            raise ReportError(f"token_alignment must be one of {TOKEN_ALIGNMENTS}, got {self.token_alignment!r}")

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
            "token_alignment": self.token_alignment,
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
            token_alignment=str(d.get("token_alignment") or "input"),
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


def _opt_float(x: Any) -> float | None:
    return None if x is None else float(x)


def _opt_int(x: Any) -> int | None:
    return None if x is None else int(x)


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
    vals, idx = select_top_k(row[keep].unsqueeze(0), keep.unsqueeze(0), k, largest)
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
    strict_sign: bool = True,
    prompt_lengths: Sequence[int | None] | None = None,
    token_alignment: str = "input",
) -> InfluenceReport:
    """Build an :class:`InfluenceReport` from a score matrix.

    For every query, lists the ``k`` training examples with the largest scores (most
    positive first) and the ``k`` with the smallest (most negative first); among equal
    scores the lower training index comes first (the rule of ``scoring.topk``). NaN scores
    are never listed. Each query also records how many of its scores are positive and
    negative, and each listed entry its normalised views (``share`` of the query's summed
    ``|score|``, ``z_score`` within the query's row).

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
        strict_sign: list only positive scores as "most positive" and only negative ones as
            "most negative" (default): a query with 3 negative scores lists 3, and its
            ``num_negative`` says so. ``False`` lists ``k`` either way, as ``torch.topk``.
        prompt_lengths: optional, per query, the number of characters of its text that are
            the prompt (``None`` for a query where it is unknown), so that the renderers can
            mark where the measured completion starts.
        token_alignment: ``"input"`` or ``"next"``, which token a token score is about (see
            :attr:`InfluenceReport.token_alignment`); ``"next"`` for causal LMs.

    Returns:
        The report.

    Raises:
        ReportError: inputs whose shapes, ids or prompt lengths do not fit together.
    """
    scores = torch.as_tensor(scores).detach()
    if scores.dim() != 2:
        raise ReportError(f"scores must be [num_queries, num_train], got shape {tuple(scores.shape)}")
    num_queries, num_train = scores.shape
    query_ids = [str(q) for q in query_ids]
    query_texts = [str(t) for t in query_texts]
    if len(query_ids) != num_queries or len(query_texts) != num_queries:
        raise ReportError(
            f"got {len(query_ids)} query ids and {len(query_texts)} query texts for {num_queries} queries"
        )
    if len(set(query_ids)) != len(query_ids):
        raise ReportError("query_ids must be unique")
    if prompt_lengths is None:
        prompt_lengths = [None] * num_queries
    prompt_lengths = [None if n is None else int(n) for n in prompt_lengths]
    if len(prompt_lengths) != num_queries:
        raise ReportError(f"got {len(prompt_lengths)} prompt lengths for {num_queries} queries")
    for text, n in zip(query_texts, prompt_lengths):
        if n is not None and not 0 <= n <= len(text):
            raise ReportError(
                f"prompt length {n} is outside the query text {text!r} ({len(text)} characters): give the number "
                "of characters of each query text that are its prompt"
            )
    if token_alignment not in TOKEN_ALIGNMENTS:
        raise ReportError(
            f"token_alignment must be one of {TOKEN_ALIGNMENTS} ('next' for causal LMs), got {token_alignment!r}"
        )
    if k < 0:
        raise ReportError(f"k must be >= 0, got {k}")
    k = min(int(k), num_train)
    if torch.isnan(scores).any():
        log.warning("influence scores contain %d NaN values; they are not listed", int(torch.isnan(scores).sum()))

    names: list[str] = [str(n) for n in layer_names] if layer_names is not None else []
    layer_totals: dict[str, float] | None = None
    if layer_scores is not None:
        layer_scores = torch.as_tensor(layer_scores).detach()
        if layer_scores.dim() != 3 or tuple(layer_scores.shape[1:]) != (num_queries, num_train):
            raise ReportError(
                f"layer_scores must be [num_layers, {num_queries}, {num_train}], got {tuple(layer_scores.shape)}"
            )
        if layer_names is None:
            names = [f"layer_{i}" for i in range(layer_scores.shape[0])]
        if len(names) != layer_scores.shape[0]:
            raise ReportError(f"got {len(names)} layer names for {layer_scores.shape[0]} layers")
        layer_totals = layer_shares(layer_scores, names)
        # Index on CPU once; per-entry .item() on an accelerator would sync every time.
        layer_scores = layer_scores.cpu()

    scores_cpu = scores.cpu()
    queries: list[QueryInfluence] = []
    for qi in range(num_queries):
        row = scores_cpu[qi]
        stats = _row_stats(row)
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
                        share=float(val) / stats["sum_abs"] if stats["sum_abs"] > 0 else None,
                        z_score=(float(val) - stats["mean"]) / stats["std"] if stats["std"] > 0 else None,
                    )
                )
            lists[largest] = entries
        queries.append(
            QueryInfluence(
                query_ids[qi],
                query_texts[qi],
                lists[True],
                lists[False],
                prompt_length=prompt_lengths[qi],
                num_scored=stats["num_scored"],
                num_positive=stats["num_positive"],
                num_negative=stats["num_negative"],
                sum_abs=stats["sum_abs"],
            )
        )

    return InfluenceReport(
        queries=queries,
        strategy=str(strategy),
        layer_names=names,
        scores=scores_cpu.clone() if keep_scores else None,
        layer_totals=layer_totals,
        token_alignment=token_alignment,
    )


def _row_stats(row: torch.Tensor) -> dict[str, Any]:
    """Counts and moments of one query's finite scores (float64: a row can hold 1e6-sized
    scores next to tiny ones)."""
    finite = row[torch.isfinite(row)].double()
    n = finite.numel()
    return {
        "num_scored": n,
        "num_positive": int((finite > 0).sum()),
        "num_negative": int((finite < 0).sum()),
        "sum_abs": float(finite.abs().sum()),
        "mean": float(finite.mean()) if n else 0.0,
        # Population std (divide by n): a z-score describes this row, not a sample of rows.
        "std": float(finite.std(correction=0)) if n else 0.0,
    }


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
