"""``identity``: no preconditioning, so a score is a plain gradient dot product (docs/method.md, section 4).

A baseline to compare the curvature strategies with; it needs no pass over the training data.
"""

from __future__ import annotations

import torch

from lightning_influence.capture import TrackedLayer
from lightning_influence.curvature.base import CurvatureStrategy, LayerTensors

__all__ = ["IdentityStrategy"]


class IdentityStrategy(CurvatureStrategy):
    """``G = I`` and no damping: ``(G + lambda I)^-1 V = V``."""

    name = "identity"
    passes = ()

    def eigenvalues(self, layer: TrackedLayer, tensors: LayerTensors) -> torch.Tensor:
        return torch.ones(layer.shape, dtype=torch.float64)

    def damping(self, layer: TrackedLayer, tensors: LayerTensors, damping: float | None,
                damping_factor: float) -> float:
        return 0.0  # nothing to regularise: any damping would only rescale every score

    def prepare(self, layer: TrackedLayer, tensors: LayerTensors, damping: float, device: torch.device,
                dtype: torch.dtype) -> LayerTensors:
        return {}

    def precondition(self, prepared: LayerTensors, grads: torch.Tensor) -> torch.Tensor:
        return grads

    def inverse_quadratic(self, prepared: LayerTensors, grads: torch.Tensor) -> torch.Tensor:
        return (grads * grads).flatten(1).sum(1)
