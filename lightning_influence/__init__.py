"""lightning-influence: EK-FAC influence functions for PyTorch Lightning.

The math (``tracking``, ``tasks``, ``factors``, ``statistics``, ``scoring``) works on any
``nn.Module``; the Lightning glue (``InfluenceCallback``, ``InfluenceModule``) and the
W&B reporting sit on top of it. Names are imported lazily so that a script that only
needs the core does not pay for importing Lightning, scikit-learn or W&B.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "InfluenceFactors": "factors",
    "FactorsError": "factors",
    "InfluenceScorer": "scoring",
    "QueryGradients": "scoring",
    "ScoringError": "scoring",
    "fit_factors": "statistics",
    "Task": "tasks",
    "ClassificationTask": "tasks",
    "RegressionTask": "tasks",
    "CausalLMTask": "tasks",
    "TaskInputError": "tasks",
    "LayerCapture": "tracking",
    "TrackedLayer": "tracking",
    "TrackingError": "tracking",
    "find_tracked_layers": "tracking",
    "InfluenceCallback": "callback",
    "InfluenceModule": "module",
    "QueryStoreError": "query_store",
    "load_query_gradients": "query_store",
    "save_query_gradients": "query_store",
    "TfidfCandidates": "tfidf",
    "filtered_scores": "tfidf",
    "ScoreShardWriter": "topk",
    "StreamingTopK": "topk",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
