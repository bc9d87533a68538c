"""``diagonal``: the diagonal of the Fisher in the parameter basis (docs/method.md, section 4).

One pass: per example, the layer's gradient ``DW = sum_t s_t a_t^T``; the eigenvalues are
the mean over examples of ``DW**2``, elementwise.
"""

from __future__ import annotations

import torch

from lightning_influence.capture import TrackedLayer, squared_per_example_sum
from lightning_influence.curvature.base import COMPLETE, CurvatureStrategy, LayerTensors, StatisticsPass

__all__ = ["DiagonalStrategy"]


class DiagonalStrategy(CurvatureStrategy):
    """Eigenvalues ``E_examples[DW**2]`` per parameter, in the parameter basis."""

    name = "diagonal"
    passes = (StatisticsPass("diagonal", "Influence: diagonal Fisher", COMPLETE),)

    def statistics(self, pass_name: str, layer: TrackedLayer) -> dict[str, tuple[int, ...]]:
        return {"diag_sum": layer.shape, "diag_count": ()}

    def gradient_update(self, pass_name, layer, a, s, count, inputs) -> LayerTensors:
        return {"diag_sum": squared_per_example_sum(a, s), "diag_count": torch.tensor(float(a.shape[0]), dtype=torch.float64)}

    def eigenvalues(self, layer: TrackedLayer, tensors: LayerTensors) -> torch.Tensor:
        return tensors["diag_sum"] / tensors["diag_count"]
