"""``kfac``: ``G ~ A (x) S`` per layer, preconditioned in the Kronecker eigenbasis (docs/method.md, section 2).

One pass accumulates ``A = E[a a^T]`` from the activations during the forward and
``S = E[s s^T]`` from the output gradients during the backward, over every (unmasked)
token; then each is eigendecomposed in float64, ``A = Q_A L_A Q_A^T`` and ``S = Q_S L_S Q_S^T``.
The eigenvalue of basis direction ``(i, j)`` is ``L_S[i] L_A[j]``.
"""

from __future__ import annotations

import torch

from lightning_influence.capture import TrackedLayer
from lightning_influence.curvature.base import COMPLETE, CurvatureStrategy, LayerTensors, StatisticsPass
from lightning_influence.errors import TaskInputError

__all__ = ["KFACStrategy", "COVARIANCE_PASS"]

COVARIANCE_PASS = "covariance"


class KFACStrategy(CurvatureStrategy):
    """Kronecker-factored curvature with eigenvalues ``L_S[i] * L_A[j]``."""

    name = "kfac"
    passes = (StatisticsPass(COVARIANCE_PASS, "Influence: covariances", COMPLETE, forward_side=True),)
    scoring_tensors = ("S_eigvecs", "A_eigvecs")

    # ---------------------------------------------------------- accumulation
    def statistics(self, pass_name: str, layer: TrackedLayer) -> dict[str, tuple[int, ...]]:
        return {"A_sum": (layer.d_in, layer.d_in), "S_sum": (layer.d_out, layer.d_out), "A_count": (), "S_count": ()}

    def activation_update(self, pass_name, layer, a, count) -> LayerTensors:
        a2 = a.reshape(-1, a.shape[-1])
        return {"A_sum": a2.T @ a2, "A_count": torch.tensor(float(count), dtype=torch.float64)}

    def gradient_update(self, pass_name, layer, a, s, count, inputs) -> LayerTensors:
        s2 = s.reshape(-1, s.shape[-1])  # the activation side was summed during the forward
        return {"S_sum": s2.T @ s2, "S_count": torch.tensor(float(count), dtype=torch.float64)}

    def finish_pass(self, pass_name: str, layer: TrackedLayer, tensors: LayerTensors) -> None:
        if float(tensors["A_count"]) == 0:
            raise TaskInputError(
                f"the covariance pass counted no tokens for layer '{layer.name}' (every position masked as padding?)"
            )
        # Eigendecompose the mean covariances in float64 (they are ill-conditioned); keep the results in
        # the dtype of the sums.
        for side in ("A", "S"):
            total = tensors[f"{side}_sum"]
            cov = total.to(torch.float64) / tensors[f"{side}_count"]
            cov = 0.5 * (cov + cov.T)
            vals, vecs = torch.linalg.eigh(cov)
            tensors[f"{side}_eigvals"] = vals.to(total.dtype)
            # eigh returns column-major; saved files are row-major
            tensors[f"{side}_eigvecs"] = vecs.to(total.dtype).contiguous()

    def factor_shapes(self, pass_name: str, layer: TrackedLayer) -> dict[str, tuple[int, ...]]:
        if pass_name != COVARIANCE_PASS:
            return {}
        # Each side's eigenbasis has its covariance's shape, its eigenvalues that shape less the last axis.
        sums = self.statistics(COVARIANCE_PASS, layer)
        return {f"{side}_{kind}": sums[f"{side}_sum"][:-1] if kind == "eigvals" else sums[f"{side}_sum"]
                for side in ("S", "A") for kind in ("eigvecs", "eigvals")}

    # ------------------------------------------------------------- curvature
    def eigenvalues(self, layer: TrackedLayer, tensors: LayerTensors) -> torch.Tensor:
        return torch.outer(tensors["S_eigvals"].clamp_min(0), tensors["A_eigvals"].clamp_min(0))

    def precondition(self, prepared: LayerTensors, grads: torch.Tensor) -> torch.Tensor:
        qs, qa = prepared["S_eigvecs"], prepared["A_eigvecs"]
        rotated = qs.transpose(0, 1) @ grads @ qa
        return qs @ (rotated * prepared["inv"]) @ qa.transpose(0, 1)

    def inverse_quadratic(self, prepared: LayerTensors, grads: torch.Tensor) -> torch.Tensor:
        # Q_S and Q_A are orthogonal: V^T (G + lambda I)^-1 V = sum (Q_S^T V Q_A)^2 / (eigenvalues + lambda).
        rotated = prepared["S_eigvecs"].transpose(0, 1) @ grads @ prepared["A_eigvecs"]
        return (rotated * rotated * prepared["inv"]).flatten(1).sum(1)

    def dense_matrix(self, layer: TrackedLayer, tensors: LayerTensors) -> torch.Tensor:
        q = torch.kron(tensors["S_eigvecs"].to(torch.float64), tensors["A_eigvecs"].to(torch.float64))
        lam = self.eigenvalues(layer, tensors).to(torch.float64).flatten()
        return q @ torch.diag(lam) @ q.T
