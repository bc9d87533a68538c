"""``ekfac``: K-FAC's eigenbasis with eigenvalues re-fitted per example (docs/method.md, section 3).

After K-FAC's covariance pass (phase ``eigen``: covariances and eigenbases done), a second
pass accumulates ``Lambda[i, j] = E_examples[(Q_S^T DW Q_A)[i, j]^2]`` with ``DW = sum_t s_t a_t^T``;
``Lambda`` replaces the products ``L_S[i] L_A[j]``.
"""

from __future__ import annotations

import torch

from lightning_influence.capture import TrackedLayer, squared_per_example_sum
from lightning_influence.curvature.base import COMPLETE, LayerTensors, StatisticsPass
from lightning_influence.curvature.blocks import SideLayout
from lightning_influence.curvature.kfac import COVARIANCE_PASS, KFACStrategy, rotation_in_token_space, to_eigenbasis

__all__ = ["EKFACStrategy", "LAMBDA_PASS"]

LAMBDA_PASS = "lambda"


class EKFACStrategy(KFACStrategy):
    """K-FAC with the eigenvalue correction: eigenvalues ``Lambda`` from a second pass."""

    name = "ekfac"
    passes = (
        StatisticsPass(COVARIANCE_PASS, "Influence: covariances", "eigen", forward_side=True),
        StatisticsPass(LAMBDA_PASS, "Influence: eigenvalue correction", COMPLETE),
    )

    def statistics(self, pass_name: str, layer: TrackedLayer) -> dict[str, tuple[int, ...]]:
        if pass_name != LAMBDA_PASS:
            return super().statistics(pass_name, layer)
        return {"lambda_sum": layer.shape, "lambda_count": ()}

    def pass_inputs(self, pass_name, tensors, device, dtype):
        if pass_name != LAMBDA_PASS:
            return super().pass_inputs(pass_name, tensors, device, dtype)
        return tensors["A_eigvecs"].to(device=device, dtype=dtype), tensors["S_eigvecs"].to(device=device, dtype=dtype)

    def feeds_consumer(self, pass_name: str) -> bool:
        """Whether ``gradient_update`` of this pass hands its rotated tokens to a consumer (``run_phase``)."""
        return pass_name == LAMBDA_PASS

    def gradient_update(self, pass_name, layer, a, s, count, inputs, consumer=None) -> LayerTensors:
        if pass_name != LAMBDA_PASS:
            return super().gradient_update(pass_name, layer, a, s, count, inputs)
        qa, qs = inputs
        a_side, s_side = SideLayout.of(qa, layer.d_in), SideLayout.of(qs, layer.d_out)
        if consumer is not None or rotation_in_token_space(a.shape[1], layer.d_out, layer.d_in, s_side.block,
                                                           a_side.block):
            # (Q_S^T DW Q_A) = sum_t (Q_S^T s_t)(Q_A^T a_t)^T: rotating the tokens is cheaper than rotating DW
            # (and a consumer, e.g. the gradient index written in this pass, takes the rotated tokens).
            a_rotated, s_rotated = a_side.rotate(a, qa), s_side.rotate(s, qs)
            if consumer is not None:  # docs/method.md, section 7
                consumer.add_rotated_tokens(layer.name, a_rotated, s_rotated)
            squares = squared_per_example_sum(a_rotated, s_rotated)
        else:  # sequences longer than the layer is wide: rotate the per-example gradient
            squares = squared_per_example_sum(a, s, lambda dw: to_eigenbasis(dw, qs, qa, s_side, a_side))
        return {"lambda_sum": squares,
                "lambda_count": torch.tensor(float(a.shape[0]), dtype=torch.float64)}

    def finish_pass(self, pass_name: str, layer: TrackedLayer, tensors: LayerTensors) -> None:
        if pass_name != LAMBDA_PASS:
            super().finish_pass(pass_name, layer, tensors)

    def eigenvalues(self, layer: TrackedLayer, tensors: LayerTensors) -> torch.Tensor:
        return tensors["lambda_sum"] / tensors["lambda_count"]
