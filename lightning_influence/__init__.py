"""lightning-influence: EK-FAC influence functions for PyTorch Lightning.

The math (``capture``, ``tasks``, ``curvature``, ``factors``, ``passes``, ``scoring``) works on
any ``nn.Module``; the Lightning glue (``integration``: ``InfluenceCallback``,
``InfluenceModule``) and the W&B reporting (``reporting``) sit on top of it; the demo lives in
``demo`` and the library imports nothing from it. Names are imported lazily so that a script that only
needs the core does not pay for importing Lightning, scikit-learn or W&B.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "InfluenceError": "errors",
    "OptionsError": "errors",
    "FitOptions": "options",
    "ScoreOptions": "options",
    "FactorsError": "errors",
    "ScoringError": "errors",
    "TaskInputError": "errors",
    "TrackingError": "errors",
    "QueryStoreError": "errors",
    "StoreError": "errors",
    "InfluenceFactors": "factors",
    "InfluenceScorer": "scoring.engine",
    "QueryGradients": "scoring.queries",
    "fit_factors": "passes",
    "Task": "tasks",
    "ClassificationTask": "tasks",
    "RegressionTask": "tasks",
    "CausalLMTask": "tasks",
    "LayerCapture": "capture",
    "TrackedLayer": "capture",
    "find_tracked_layers": "capture",
    "set_token_layout": "capture",
    "InfluenceCallback": "integration.callback",
    "InfluenceModule": "integration.module",
    "load_query_gradients": "scoring.query_store",
    "save_query_gradients": "scoring.query_store",
    "TfidfCandidates": "scoring.tfidf",
    "filtered_scores": "scoring.tfidf",
    "ScoreShardWriter": "scoring.topk",
    "StreamingTopK": "scoring.topk",
    "GradientIndex": "index",
    "GradientIndexError": "index",
    "IndexOptions": "index",
    "build_index": "index",
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
