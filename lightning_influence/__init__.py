"""lightning-influence: EK-FAC influence functions for PyTorch Lightning.

The math (``tracking``, ``tasks``, ``factors``, ``statistics``, ``scoring``) works on any
``nn.Module``; the Lightning glue (``InfluenceCallback``, ``InfluenceModule``) and the
W&B reporting sit on top of it.
"""

__version__ = "0.1.0"

from .factors import FactorsError, InfluenceFactors  # noqa: E402
from .scoring import InfluenceScorer, QueryGradients, ScoringError  # noqa: E402
from .statistics import fit_factors  # noqa: E402
from .tasks import CausalLMTask, ClassificationTask, RegressionTask, Task, TaskInputError  # noqa: E402
from .tracking import LayerCapture, TrackedLayer, TrackingError, find_tracked_layers  # noqa: E402

__all__ = [
    "__version__",
    "InfluenceFactors",
    "FactorsError",
    "InfluenceScorer",
    "QueryGradients",
    "ScoringError",
    "fit_factors",
    "Task",
    "ClassificationTask",
    "RegressionTask",
    "CausalLMTask",
    "TaskInputError",
    "LayerCapture",
    "TrackedLayer",
    "TrackingError",
    "find_tracked_layers",
]

from .callback import InfluenceCallback  # noqa: E402
from .module import InfluenceModule  # noqa: E402

__all__ += ["InfluenceCallback", "InfluenceModule"]

from .query_store import QueryStoreError, load_query_gradients, save_query_gradients  # noqa: E402
from .tfidf import TfidfCandidates, filtered_scores  # noqa: E402
from .topk import ScoreShardWriter, StreamingTopK  # noqa: E402

__all__ += ["QueryStoreError", "load_query_gradients", "save_query_gradients", "TfidfCandidates",
            "filtered_scores", "ScoreShardWriter", "StreamingTopK"]
