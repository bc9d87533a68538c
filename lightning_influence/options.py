"""The fitting options and the scoring options, each validated once.

:class:`FitOptions` holds what decides the fitted factors (strategy, tracked layers, Fisher,
damping, how much data, seed, dtypes); :class:`ScoreOptions` what decides the scores (query
rank and its SVD, the scoring dtype, the layers scored through, top-k, TF-IDF candidates).
``fit_factors``, ``InfluenceCallback``, ``InfluenceModule``, ``run_queries`` and the command
line all build or take these two objects, so every option is checked in ``__post_init__``
and nowhere else. Bad values raise :class:`~lightning_influence.errors.OptionsError` naming
the valid ones (Lightning entry points re-raise it as ``MisconfigurationException``).

Dtypes are accepted as ``torch.dtype`` or by name (``"float32"``, ``"torch.bfloat16"``) and
stored as ``torch.dtype``. Names: ``capture_dtype`` is the dtype activations and output
gradients are captured (and summed) in when fitting; ``stats_dtype`` the dtype the statistics
are kept and saved in; ``eigh_dtype`` the dtype K-FAC/EK-FAC eigendecompose the covariances in;
``score_dtype`` the scoring compute dtype.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

# The default strategy and the paper's heuristic damping factor live with the strategies (one place each).
from lightning_influence.curvature import DEFAULT_STRATEGY
from lightning_influence.curvature.base import DEFAULT_DAMPING_FACTOR
from lightning_influence.curvature.blocks import (DEFAULT_BLOCK_SIZE, DEFAULT_BLOCK_THRESHOLD, DEFAULT_EIGH_DTYPE,
                                                  EIGH_DTYPES, check_block_options)
from lightning_influence.errors import InfluenceError, OptionsError
from lightning_influence.scoring.queries import QUERY_SVD_METHODS

__all__ = ["FitOptions", "ScoreOptions", "as_dtype", "DEFAULT_DAMPING_FACTOR",
           "CAPTURE_DTYPES", "STATS_DTYPES", "SCORE_DTYPES", "EIGH_DTYPES", "QUERY_SVD_METHODS"]

# Statistics never accumulate in less than float32: sums over millions of tokens would lose the small terms.
CAPTURE_DTYPES = (torch.float32, torch.float64)
STATS_DTYPES = (torch.float64, torch.float32)
SCORE_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def as_dtype(value: torch.dtype | str, option: str, allowed: Sequence[torch.dtype]) -> torch.dtype:
    """``value`` (a ``torch.dtype`` or its name) as a ``torch.dtype`` in ``allowed``, else :class:`OptionsError`."""
    dtype = value
    if isinstance(value, str):
        dtype = getattr(torch, value.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or dtype not in allowed:
        names = ", ".join(_dtype_name(d) for d in allowed)
        raise OptionsError(f"{option} must be one of {names} (a torch.dtype or its name), got {value!r}")
    return dtype


def _positive_int_or_none(option: str, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise OptionsError(f"{option} must be a positive integer or None, got {value!r}")


def _non_negative_number(option: str, value: Any, none_means: str | None = None) -> None:
    if value is None and none_means is not None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
        allowed = f"a non-negative number or None ({none_means})" if none_means else "a non-negative number"
        raise OptionsError(f"{option} must be {allowed}, got {value!r}")


def _name_list(option: str, value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise OptionsError(f"{option} must be a module name pattern, a list of them, or None; got {value!r}")
    return list(value)


class _Options:
    """What both option classes share: building from keyword overrides, and a JSON view."""

    @classmethod
    def merged(cls, options: Any = None, overrides: Mapping[str, Any] | None = None):
        """``options`` (or the defaults) with ``overrides`` applied, validated; unknown names raise."""
        overrides = dict(overrides or {})
        if options is not None and not isinstance(options, cls):
            raise OptionsError(f"options must be a {cls.__name__}, got {type(options).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            hint = {"dtype": " (renamed: capture_dtype when fitting, score_dtype when scoring)"}
            raise OptionsError(
                f"unknown {cls.__name__} option(s) {unknown}{''.join(hint.get(u, '') for u in unknown)}; "
                f"valid options are {', '.join(sorted(known))}"
            )
        if options is None:
            return cls(**overrides)
        return dataclasses.replace(options, **overrides) if overrides else options

    def to_json(self) -> dict[str, Any]:
        """The options as JSON-ready values (dtypes by name, module classes by qualified name)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.dtype):
                value = _dtype_name(value)
            elif f.name == "module_types" and value is not None:
                value = [f"{t.__module__}.{t.__qualname__}" for t in value]
            out[f.name] = value
        return out


@dataclass(frozen=True)
class FitOptions(_Options):
    """How the influence factors are fitted.

    Args:
        strategy: ``ekfac`` (default), ``kfac``, ``diagonal`` or ``identity``.
        modules: glob pattern(s) of module names to track (``None``: every supported layer).
        module_types: module classes to track (with or instead of ``modules``).
        exclude: glob pattern(s) of module names to leave out of the selection.
        fisher: ``sampled`` (labels drawn from the model, the paper's default) or ``empirical``.
        damping: absolute damping, or ``None`` for ``damping_factor`` x the mean eigenvalue per layer.
        damping_factor: the heuristic's factor (0.1, the paper's).
        max_batches / max_examples: cap each statistics pass.
        seed: seed of the label sampling (same seed, same factors).
        capture_dtype: dtype activations and output gradients are captured in (float32 or float64).
        stats_dtype: dtype the statistics are summed and saved in (float64 default, or float32).
        block_size / block_threshold: K-FAC/EK-FAC sides wider than ``block_threshold`` (8192) are kept
            as diagonal blocks of ``block_size`` (1024; ``None``: always dense), docs/method.md, section 6.
        eigh_dtype: dtype K-FAC/EK-FAC eigendecompose each covariance side in: float64 (default) or float32
            (about a third of the CPU time on GPT-2's 2304-3072-wide sides, less accurate), docs/method.md, section 2.
        memory_budget: the most memory the passes may plan to hold on their device, in bytes or as text
            (``"8GiB"``); ``None`` (default): what the device has free, less a 10% margin. A fit whose
            memory plan exceeds it is refused before its first pass.
    """

    strategy: str = DEFAULT_STRATEGY
    modules: str | list[str] | None = None
    module_types: tuple[type, ...] | None = None
    exclude: str | list[str] | None = None
    fisher: str = "sampled"
    damping: float | None = None
    damping_factor: float = DEFAULT_DAMPING_FACTOR
    max_batches: int | None = None
    max_examples: int | None = None
    seed: int = 0
    capture_dtype: torch.dtype = torch.float32
    stats_dtype: torch.dtype = torch.float64
    block_size: int | None = DEFAULT_BLOCK_SIZE
    block_threshold: int | None = DEFAULT_BLOCK_THRESHOLD
    eigh_dtype: torch.dtype = DEFAULT_EIGH_DTYPE
    memory_budget: int | str | None = None

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen dataclass)
        # The curvature registry's lookup: the one place strategy names are checked.
        from lightning_influence.factors import check_strategy

        try:
            check_strategy(self.strategy)
        except InfluenceError as err:
            raise OptionsError(str(err)) from None
        if self.fisher not in ("sampled", "empirical"):
            raise OptionsError(f"unknown fisher {self.fisher!r}; choose 'sampled' (labels drawn from the model, "
                               "the paper's default) or 'empirical' (the dataset's labels)")
        modules = _name_list("modules", self.modules)
        set_("modules", modules[0] if isinstance(self.modules, str) else modules)
        exclude = _name_list("exclude", self.exclude)
        set_("exclude", exclude[0] if isinstance(self.exclude, str) else exclude)
        if self.module_types is not None:
            types = tuple(self.module_types) if isinstance(self.module_types, (list, tuple)) else (self.module_types,)
            if not all(isinstance(t, type) for t in types):
                raise OptionsError(f"module_types must be module classes (e.g. [torch.nn.Linear]), got {self.module_types!r}")
            set_("module_types", types)
        _non_negative_number("damping", self.damping, none_means="the heuristic damping_factor x mean eigenvalue")
        _non_negative_number("damping_factor", self.damping_factor)
        set_("damping", None if self.damping is None else float(self.damping))
        set_("damping_factor", float(self.damping_factor))
        _positive_int_or_none("max_batches", self.max_batches)
        _positive_int_or_none("max_examples", self.max_examples)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise OptionsError(f"seed must be a non-negative integer, got {self.seed!r}")
        set_("capture_dtype", as_dtype(self.capture_dtype, "capture_dtype", CAPTURE_DTYPES))
        set_("stats_dtype", as_dtype(self.stats_dtype, "stats_dtype", STATS_DTYPES))
        set_("eigh_dtype", as_dtype(self.eigh_dtype, "eigh_dtype", EIGH_DTYPES))
        try:
            check_block_options(self.block_size, self.block_threshold)
        except InfluenceError as err:
            raise OptionsError(str(err)) from None
        if self.memory_budget is not None:
            from lightning_influence.memory import parse_bytes

            try:
                set_("memory_budget", parse_bytes(self.memory_budget))
            except ValueError as err:
                raise OptionsError(f"memory_budget: {err}") from None


@dataclass(frozen=True)
class ScoreOptions(_Options):
    """How influence scores are computed and reported.

    Args:
        query_rank: ``None`` keeps preconditioned query gradients at full rank; an int stores them
            at that rank (query batching; the paper uses 32).
        query_svd: ``randomized`` (default, ``torch.svd_lowrank``) or ``exact`` SVD for ``query_rank``.
        score_dtype: scoring compute dtype: float32 (default), float64, bfloat16 or float16.
        layers: score through these tracked layers only (``None``: all of the factors' layers).
        top_k: how many most positive / most negative training examples to keep per query.
        tfidf_candidates: score each query only against its k most TF-IDF-similar training texts.
        shard_size: training examples per score shard file when scores are written to disk.
    """

    query_rank: int | None = None
    query_svd: str = "randomized"
    score_dtype: torch.dtype = torch.float32
    layers: list[str] | None = None
    top_k: int = 10
    tfidf_candidates: int | None = None
    shard_size: int = 4096

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen dataclass)
        _positive_int_or_none("query_rank", self.query_rank)
        if self.query_svd not in QUERY_SVD_METHODS:
            raise OptionsError(f"query_svd must be one of {QUERY_SVD_METHODS}, got {self.query_svd!r}")
        set_("score_dtype", as_dtype(self.score_dtype, "score_dtype", SCORE_DTYPES))
        set_("layers", _name_list("layers", self.layers))
        if self.top_k is None:
            raise OptionsError("top_k must be a positive integer, got None")
        _positive_int_or_none("top_k", self.top_k)
        _positive_int_or_none("tfidf_candidates", self.tfidf_candidates)
        if self.shard_size is None:
            raise OptionsError("shard_size must be a positive integer, got None")
        _positive_int_or_none("shard_size", self.shard_size)

