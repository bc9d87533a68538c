"""The library's exceptions: one base class, one subclass per area.

Every error the library raises on bad input or bad files is an :class:`InfluenceError`
(a ``ValueError``), so ``except InfluenceError`` catches them all. Lightning entry points
(the callback, ``InfluenceModule``) re-raise configuration errors as Lightning's
``MisconfigurationException``.
"""

from __future__ import annotations

__all__ = [
    "InfluenceError", "TrackingError", "TaskInputError", "FactorsError", "ScoringError", "QueryStoreError",
    "TopKError", "TfidfError", "GradientIndexError", "QueryFileError", "StoreError", "OptionsError",
    "ReportError",
]


class InfluenceError(ValueError):
    """Base class of every lightning-influence error."""


class OptionsError(InfluenceError):
    """An option that has no valid meaning (unknown strategy, negative damping, ...)."""


class TrackingError(InfluenceError):
    """The module selection or a tracked layer cannot be handled."""


class TaskInputError(InfluenceError):
    """A batch the task cannot read, or a loss it cannot use."""


class StoreError(InfluenceError):
    """A saved bundle that is missing, corrupt, from another version, or from another run.

    ``differences`` is ``{key: (saved, expected)}`` when the bundle is intact but its identity
    differs from the one expected (empty otherwise), so that callers can decide to recompute.
    """

    def __init__(self, message: str = "", differences: dict | None = None):
        super().__init__(message)
        self.differences = dict(differences or {})


class FactorsError(StoreError):
    """Factors that are missing, corrupt, unfinished, or do not match the model."""


class ScoringError(InfluenceError):
    """Scoring asked for something the factors or queries cannot give."""


class QueryStoreError(ScoringError, StoreError):
    """Stored query gradients that are missing, corrupt, or do not match the factors."""


class TopKError(ScoringError, StoreError):
    """Score chunks or score files that cannot be consumed, resumed or read."""


class TfidfError(ScoringError, StoreError):
    """A TF-IDF candidate index that cannot be fitted, saved or reused."""


class GradientIndexError(ScoringError, StoreError):
    """A gradient index that is missing, corrupt, unfinished, or from other factors, model or data."""


class QueryFileError(InfluenceError):
    """A JSONL query file that cannot be read."""


class ReportError(InfluenceError):
    """Inputs to an influence report that do not fit together (shapes, ids, prompt lengths)."""
