"""``kfac``: ``G ~ A (x) S`` per layer, preconditioned in the Kronecker eigenbasis (docs/method.md, section 2).

One pass accumulates ``A = E[a a^T]`` from the activations during the forward and
``S = E[s s^T]`` from the output gradients during the backward, over every (unmasked)
token; then each is eigendecomposed in float64 (float32 with ``eigh_dtype``), ``A = Q_A L_A Q_A^T`` and
``S = Q_S L_S Q_S^T``.
The eigenvalue of basis direction ``(i, j)`` is ``L_S[i] L_A[j]``.

A side wider than ``block_threshold`` is kept as diagonal blocks of ``block_size``
(:class:`~lightning_influence.curvature.blocks.SideLayout`, docs/method.md, section 6): its sum,
eigenbasis and eigenvalues are then stored ``[k, b, b]`` / ``[k, b]``, and every rotation goes
through the layout. The layout of stored factors is read from their shapes.
"""

from __future__ import annotations

import logging

import torch

from lightning_influence.capture import TrackedLayer, per_example_chunk, per_example_gradients
from lightning_influence.curvature.base import COMPLETE, CurvatureStrategy, LayerTensors, StatisticsPass
from lightning_influence.curvature.blocks import SideLayout, side_layout
from lightning_influence.errors import TaskInputError

__all__ = ["KFACStrategy", "COVARIANCE_PASS", "rotation_in_token_space", "to_eigenbasis"]

COVARIANCE_PASS = "covariance"
log = logging.getLogger(__name__)


def rotation_in_token_space(tokens: int, d_out: int, d_in: int, block_out: int, block_in: int) -> bool:
    """Whether rotating a sequence's ``tokens`` into the eigenbasis before forming ``DW`` costs fewer
    multiply-adds than rotating ``DW``: ``T (d_in b_A + d_out b_S)`` against ``d_out d_in (b_S + b_A)``
    (forming ``DW`` costs ``T d_out d_in`` either way). For dense square sides: ``T < d``."""
    return tokens * (d_in * block_in + d_out * block_out) < d_out * d_in * (block_out + block_in)


def _eigh(side: SideLayout, total: torch.Tensor, count: torch.Tensor, layer: str,
          eigh_dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """``side.eigh`` (in ``eigh_dtype``, results in the sums' dtype) on the device the sums are on, the
    eigenvectors written over the sums ``total`` (which they replace); on the CPU, saying so, where that
    device cannot."""
    if total.device.type == "cpu":  # block by block into the sums: no second copy of the side
        return side.eigh(total, count, dtype=total.dtype, out=total, eigh_dtype=eigh_dtype)
    try:  # the sums stay intact until every block is done, for the CPU fallback below
        vals, vecs = side.eigh(total, count, dtype=total.dtype, eigh_dtype=eigh_dtype)
    except (RuntimeError, NotImplementedError, TypeError) as err:
        log.warning("%s eigendecomposition of layer '%s' failed on %s (%s); doing it on the CPU",
                    str(eigh_dtype).removeprefix("torch."), layer, total.device,
                    str(err).splitlines()[0] if str(err) else type(err).__name__)
        vals, vecs = side.eigh(total.cpu(), count.cpu() if isinstance(count, torch.Tensor) else count, total.dtype,
                               eigh_dtype=eigh_dtype)
    return vals.to(total.device), total.copy_(vecs)


def to_eigenbasis(grads: torch.Tensor, qs: torch.Tensor, qa: torch.Tensor, s_side: SideLayout,
                  a_side: SideLayout) -> torch.Tensor:
    """``Q_S^T V Q_A`` for ``V`` ``[..., d_out, d_in]``, block by block along a blocked side."""
    if s_side.dense and a_side.dense:
        return qs.transpose(0, 1) @ grads @ qa
    return a_side.rotate(s_side.rotate(grads, qs, axis=-2), qa, axis=-1)


class KFACStrategy(CurvatureStrategy):
    """Kronecker-factored curvature with eigenvalues ``L_S[i] * L_A[j]``."""

    name = "kfac"
    passes = (StatisticsPass(COVARIANCE_PASS, "Influence: covariances", COMPLETE, forward_side=True),)
    scoring_tensors = ("S_eigvecs", "A_eigvecs")

    def options(self) -> dict:
        return {"block_size": self.block_size, "block_threshold": self.block_threshold,
                "eigh_dtype": str(self.eigh_dtype).removeprefix("torch.")}

    def layouts(self, layer: TrackedLayer) -> tuple[SideLayout, SideLayout]:
        """How this strategy's options split the layer's output-gradient side S and activation side A."""
        return (side_layout(layer.d_out, self.block_size, self.block_threshold),
                side_layout(layer.d_in, self.block_size, self.block_threshold))

    # ---------------------------------------------------------- accumulation
    def statistics(self, pass_name: str, layer: TrackedLayer) -> dict[str, tuple[int, ...]]:
        s_side, a_side = self.layouts(layer)
        return {"A_sum": a_side.matrix_shape, "S_sum": s_side.matrix_shape, "A_count": (), "S_count": ()}

    def activation_update(self, pass_name, layer, a, count) -> LayerTensors:
        a2 = a.reshape(-1, a.shape[-1])
        return {"A_sum": self.layouts(layer)[1].outer_sum(a2), "A_count": torch.tensor(float(count), dtype=torch.float64)}

    def gradient_update(self, pass_name, layer, a, s, count, inputs) -> LayerTensors:
        s2 = s.reshape(-1, s.shape[-1])  # the activation side was summed during the forward
        return {"S_sum": self.layouts(layer)[0].outer_sum(s2),
                "S_count": torch.tensor(float(count), dtype=torch.float64)}

    def check_pass(self, pass_name: str, layer: TrackedLayer, tensors: LayerTensors) -> None:
        if pass_name == COVARIANCE_PASS and float(tensors["A_count"]) == 0:
            raise TaskInputError(
                f"the covariance pass counted no tokens for layer '{layer.name}' (every position masked as padding?)"
            )

    def finish_pass(self, pass_name: str, layer: TrackedLayer, tensors: LayerTensors) -> None:
        self.check_pass(pass_name, layer, tensors)
        # Eigendecompose the mean covariances in float64 (they are ill-conditioned; float32 with eigh_dtype: about a
        # third of the time, less accurate, benchmarks/eigh_dtype.py), block by block for a
        # blocked side, on the device the sums are on; the eigenvectors, in the dtype of the sums, take the
        # sums' place and storage: Q diag(L) Q^T gives the covariance back, so keeping both would hold the
        # same information twice (docs/method.md, section 2).
        for side, layout in zip(("S", "A"), self.layouts(layer)):
            total = tensors.pop(f"{side}_sum")
            vals, vecs = _eigh(layout, total, tensors[f"{side}_count"], layer.name, self.eigh_dtype)
            tensors[f"{side}_eigvals"] = vals.to(total.dtype)
            tensors[f"{side}_eigvecs"] = vecs  # row-major: written into the (row-major) sums

    def replaced_sums(self, pass_name: str, layer: TrackedLayer) -> dict[str, str]:
        return {"S_eigvecs": "S_sum", "A_eigvecs": "A_sum"} if pass_name == COVARIANCE_PASS else {}

    def finish_outputs(self, pass_name, layer, tensors):
        if pass_name != COVARIANCE_PASS:
            return {}
        dtype = tensors["A_sum"].dtype
        out = {}
        for side, layout in zip(("S", "A"), self.layouts(layer)):
            out[f"{side}_eigvals"] = (layout.vector_shape, dtype)
            out[f"{side}_eigvecs"] = (layout.matrix_shape, dtype)
        return out

    def factor_shapes(self, pass_name: str, layer: TrackedLayer) -> dict[str, tuple[int, ...]]:
        if pass_name != COVARIANCE_PASS:
            return {}
        # Each side's eigenbasis has its covariance's shape, its eigenvalues that shape less the last axis.
        sums = self.statistics(COVARIANCE_PASS, layer)
        return {f"{side}_{kind}": sums[f"{side}_sum"][:-1] if kind == "eigvals" else sums[f"{side}_sum"]
                for side in ("S", "A") for kind in ("eigvecs", "eigvals")}

    # ------------------------------------------------------------- curvature
    @staticmethod
    def stored_layouts(layer: TrackedLayer, tensors: LayerTensors) -> tuple[SideLayout, SideLayout]:
        """The layouts of fitted (or prepared) factors, read from their eigenbases' shapes."""
        return SideLayout.of(tensors["S_eigvecs"], layer.d_out), SideLayout.of(tensors["A_eigvecs"], layer.d_in)

    def eigenvalues(self, layer: TrackedLayer, tensors: LayerTensors) -> torch.Tensor:
        s_side, a_side = self.stored_layouts(layer, tensors)
        return torch.outer(s_side.eigenvalues(tensors["S_eigvals"]).clamp_min(0),
                           a_side.eigenvalues(tensors["A_eigvals"]).clamp_min(0))

    @staticmethod
    def _sides(prepared: LayerTensors) -> tuple[SideLayout, SideLayout]:
        d_out, d_in = prepared["inv"].shape[-2:]
        return SideLayout.of(prepared["S_eigvecs"], d_out), SideLayout.of(prepared["A_eigvecs"], d_in)

    @classmethod
    def to_eigenbasis(cls, prepared: LayerTensors, grads: torch.Tensor) -> torch.Tensor:
        """``Q_S^T V Q_A`` for ``V`` ``[..., d_out, d_in]`` (block by block on a blocked side)."""
        return to_eigenbasis(grads, prepared["S_eigvecs"], prepared["A_eigvecs"], *cls._sides(prepared))

    @classmethod
    def from_eigenbasis(cls, prepared: LayerTensors, rotated: torch.Tensor) -> torch.Tensor:
        """``Q_S R Q_A^T``: back to the parameter basis."""
        qs, qa = prepared["S_eigvecs"], prepared["A_eigvecs"]
        s_side, a_side = cls._sides(prepared)
        if s_side.dense and a_side.dense:
            return qs @ rotated @ qa.transpose(0, 1)
        return a_side.unrotate(s_side.unrotate(rotated, qs, axis=-2), qa, axis=-1)

    @classmethod
    def tokens_to_eigenbasis(cls, prepared: LayerTensors, a: torch.Tensor, s: torch.Tensor):
        """``(start, Q_S^T DW Q_A)`` for the examples from ``start`` on, a chunk of them at a time
        (:func:`~lightning_influence.capture.per_example_chunk`: a wide head's ``[B, d_out, d_in]`` is GiBs):
        ``Q_S^T DW Q_A = sum_t (Q_S^T s_t)(Q_A^T a_t)^T``, the tokens rotated once for the whole batch."""
        s_side, a_side = cls._sides(prepared)
        a_rot, s_rot = a_side.rotate(a, prepared["A_eigvecs"]), s_side.rotate(s, prepared["S_eigvecs"])
        step = per_example_chunk(a.shape[0], s_rot.shape[-1], a_rot.shape[-1])
        for i in range(0, a.shape[0], step):
            yield i, per_example_gradients(a_rot[i:i + step], s_rot[i:i + step])

    @classmethod
    def _tokens_first(cls, prepared: LayerTensors, a: torch.Tensor) -> bool:
        s_side, a_side = cls._sides(prepared)
        return rotation_in_token_space(a.shape[1], s_side.dim, a_side.dim, s_side.block, a_side.block)

    def precondition(self, prepared: LayerTensors, grads: torch.Tensor) -> torch.Tensor:
        return self.from_eigenbasis(prepared, self.to_eigenbasis(prepared, grads) * prepared["inv"])

    def inverse_quadratic(self, prepared: LayerTensors, grads: torch.Tensor) -> torch.Tensor:
        # Q_S and Q_A are orthogonal: V^T (G + lambda I)^-1 V = sum (Q_S^T V Q_A)^2 / (eigenvalues + lambda).
        rotated = self.to_eigenbasis(prepared, grads)  # a new tensor: squared and weighted in place
        return rotated.square_().mul_(prepared["inv"]).flatten(1).sum(1)

    def precondition_tokens(self, prepared: LayerTensors, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        if not self._tokens_first(prepared, a):
            return super().precondition_tokens(prepared, a, s)
        # A chunk of examples at a time: the rotations back hold a few copies of what they rotate.
        out = None
        for i, rotated in self.tokens_to_eigenbasis(prepared, a, s):
            back = self.from_eigenbasis(prepared, rotated.mul_(prepared["inv"]))
            if i == 0 and back.shape[0] == a.shape[0]:
                return back  # the whole batch in one chunk
            if out is None:
                out = torch.empty(a.shape[0], *back.shape[1:], dtype=back.dtype, device=back.device)
            out[i:i + back.shape[0]] = back
        return out

    def inverse_quadratic_tokens(self, prepared: LayerTensors, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        if not self._tokens_first(prepared, a):
            return super().inverse_quadratic_tokens(prepared, a, s)
        return torch.cat([rotated.square_().mul_(prepared["inv"]).flatten(1).sum(1)
                          for _, rotated in self.tokens_to_eigenbasis(prepared, a, s)])

    def dense_matrix(self, layer: TrackedLayer, tensors: LayerTensors) -> torch.Tensor:
        s_side, a_side = self.stored_layouts(layer, tensors)
        q = torch.kron(s_side.dense_matrix(tensors["S_eigvecs"].to(torch.float64)),
                       a_side.dense_matrix(tensors["A_eigvecs"].to(torch.float64)))
        lam = self.eigenvalues(layer, tensors).to(torch.float64).flatten()
        return q @ torch.diag(lam) @ q.T
