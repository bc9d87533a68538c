"""What a curvature strategy is: the one interface the statistics passes and the preconditioner ask.

A strategy says which passes over the training data it needs (each with its progress-bar
title and the phase saved after it, the point a killed run resumes from), which sums each
pass accumulates per layer and how one batch adds to them, how a pass's sums become factors,
and how the factors precondition a gradient (docs/method.md, sections 2-4). A strategy holds
no fitted state: every method gets one layer's tensors (``dict`` name -> tensor, the same
dict that :class:`~lightning_influence.factors.InfluenceFactors` keeps and saves).

Every tracked layer is a matrix ``W`` of shape ``(d_out, d_in)``; gradients ``V`` come as
``[..., d_out, d_in]``. Sums are stored with a ``*_count`` so that they reduce across
data-parallel ranks by addition and the means are taken after the reduction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from lightning_influence.capture import TrackedLayer, per_example_gradients
from lightning_influence.curvature.blocks import (DEFAULT_BLOCK_SIZE, DEFAULT_BLOCK_THRESHOLD, DEFAULT_EIGH_DTYPE,
                                                  check_block_options, check_eigh_dtype)
from lightning_influence.errors import FactorsError

__all__ = ["CurvatureStrategy", "StatisticsPass", "DEFAULT_DAMPING_FACTOR", "NOT_STARTED", "COMPLETE"]

# The paper's damping heuristic: lambda = 0.1 x the mean eigenvalue of each layer (docs/method.md, section 4).
DEFAULT_DAMPING_FACTOR = 0.1
# The phase of factors no pass has run for, and the phase of factors ready to precondition.
NOT_STARTED = "none"
COMPLETE = "complete"

LayerTensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class StatisticsPass:
    """One accumulation pass over the training data.

    Attributes:
        name: what the pass is called (``run_phase``'s first argument, log lines).
        title: the progress bar's title.
        phase: the phase the factors are in once this pass is done (saved: a rerun resumes after it).
        forward_side: part of the sums is taken from the activations during the forward
            (:meth:`CurvatureStrategy.activation_update`); the backward then gets ``a=None``.
    """

    name: str
    title: str
    phase: str
    forward_side: bool = False


class CurvatureStrategy:
    """Base class of the curvature strategies (identity, diagonal, K-FAC, EK-FAC, ...).

    A new strategy subclasses this, sets :attr:`name` and :attr:`passes`, implements the
    accumulation methods for its passes and :meth:`eigenvalues`; strategies whose
    preconditioning basis is not the parameter basis also override :meth:`precondition`,
    :meth:`inverse_quadratic` and :meth:`dense_matrix` (see ``kfac.py``). It is then
    registered with :func:`lightning_influence.curvature.register_strategy`. For example, one
    scalar per layer, the mean of the diagonal Fisher (``G = c I``)::

        @register_strategy
        class ScalarStrategy(CurvatureStrategy):
            name = "scalar"
            passes = (StatisticsPass("squares", "Influence: mean squared gradient", COMPLETE),)

            def statistics(self, pass_name, layer):
                return {"square_sum": (), "example_count": ()}

            def gradient_update(self, pass_name, layer, a, s, count, inputs):
                return {"square_sum": per_example_gradients(a, s).square().sum(),
                        "example_count": torch.tensor(float(a.shape[0]))}

            def eigenvalues(self, layer, tensors):
                c = tensors["square_sum"] / (tensors["example_count"] * layer.d_out * layer.d_in)
                return c.expand(layer.shape)

    after which ``fit_factors(..., strategy="scalar")``, the callback, scoring and the factor files
    all work with it.
    """

    #: the strategy's name (``strategy=`` everywhere, and in the factors' manifest)
    name: ClassVar[str] = ""
    #: the passes, in order; the last one's phase must be :data:`COMPLETE`. No passes: complete from the start.
    passes: ClassVar[tuple[StatisticsPass, ...]] = ()
    #: the layer tensors scoring moves to its device, beside the inverse eigenvalues (e.g. eigenbases)
    scoring_tensors: ClassVar[tuple[str, ...]] = ()

    def __init__(self, block_size: int | None = DEFAULT_BLOCK_SIZE,
                 block_threshold: int | None = DEFAULT_BLOCK_THRESHOLD,
                 eigh_dtype: torch.dtype | str = DEFAULT_EIGH_DTYPE):
        """``block_size``/``block_threshold``: Kronecker sides wider than the threshold are kept as diagonal
        blocks of ``block_size`` (docs/method.md, section 6); ``eigh_dtype``: the dtype (``float64`` or
        ``float32``) those sides' covariances are eigendecomposed in (docs/method.md, section 2); strategies
        without Kronecker sides ignore them. A subclass that defines its own ``__init__`` takes these three
        keywords and passes them on here: :class:`~lightning_influence.factors.InfluenceFactors` always gives them."""
        check_block_options(block_size, block_threshold)
        self.block_size = block_size
        self.block_threshold = block_threshold
        self.eigh_dtype = check_eigh_dtype(eigh_dtype)

    def options(self) -> dict[str, Any]:
        """The strategy's own options that change its factors (saved in the fit identity; none by default)."""
        return {}

    # ---------------------------------------------------------------- phases
    @property
    def phases(self) -> tuple[str, ...]:
        """Every phase label in order: nothing fitted yet, then the one reached after each pass."""
        if not self.passes:
            return (COMPLETE,)
        return (NOT_STARTED,) + tuple(p.phase for p in self.passes)

    @property
    def initial_phase(self) -> str:
        """The phase of factors that no pass has run for."""
        return self.phases[0]

    def check_phase(self, phase: str) -> str:
        if phase not in self.phases:
            raise FactorsError(f"phase '{phase}' is not a phase of strategy '{self.name}' {self.phases}")
        return phase

    def phase_reached(self, current: str, phase: str) -> bool:
        """Whether factors in phase ``current`` have done phase ``phase`` (or a later one)."""
        return self.phases.index(self.check_phase(current)) >= self.phases.index(self.check_phase(phase))

    def remaining_passes(self, phase: str) -> tuple[StatisticsPass, ...]:
        """The passes still to run for factors in phase ``phase`` (resuming after the last saved one)."""
        # passes[i] brings the factors from phases[i] to phases[i + 1]
        return self.passes[self.phases.index(self.check_phase(phase)):] if self.passes else ()

    def get_pass(self, name: str) -> StatisticsPass:
        for p in self.passes:
            if p.name == name:
                return p
        known = ", ".join(p.name for p in self.passes) or "none"
        raise FactorsError(f"strategy '{self.name}' has no '{name}' pass (its passes: {known})")

    # ---------------------------------------------------------- accumulation
    def statistics(self, pass_name: str, layer: TrackedLayer) -> dict[str, tuple[int, ...]]:
        """The sums pass ``pass_name`` accumulates for ``layer``: tensor name -> shape (``()`` for a count)."""
        raise NotImplementedError(f"{type(self).__name__} accumulates no statistics")

    def pass_inputs(self, pass_name: str, tensors: LayerTensors, device: torch.device, dtype: torch.dtype) -> Any:
        """What a pass's updates read from earlier passes (e.g. eigenbases), moved once per pass, not per batch."""
        return None

    def activation_update(self, pass_name: str, layer: TrackedLayer, a: torch.Tensor, count: float) -> LayerTensors:
        """Forward-side sums of one batch (passes with ``forward_side``), from the activations ``a`` ``[B, T, d_in]``.

        Padding tokens of ``a`` are already zero; ``count`` is the number of real tokens among them.
        """
        raise NotImplementedError(f"{type(self).__name__} has no forward-side statistics")

    def gradient_update(self, pass_name: str, layer: TrackedLayer, a: torch.Tensor | None, s: torch.Tensor,
                        count: float, inputs: Any) -> LayerTensors:
        """Backward-side sums of one batch, from ``a`` ``[B, T, d_in]`` (``None`` after a forward-side update)
        and the output gradients ``s`` ``[B, T, d_out]``; padding tokens already zero, ``count`` real tokens;
        ``inputs`` is what :meth:`pass_inputs` returned for this layer."""
        raise NotImplementedError(f"{type(self).__name__} accumulates no statistics")

    def check_pass(self, pass_name: str, layer: TrackedLayer, tensors: LayerTensors) -> None:
        """Raise on rank-reduced sums that cannot become factors (run on every rank, before :meth:`finish_pass`)."""

    def finish_pass(self, pass_name: str, layer: TrackedLayer, tensors: LayerTensors) -> None:
        """Turn the (rank-reduced) sums of a pass, already in ``tensors``, into factors, in place.

        The sums are on the pass's device; what this adds may stay there (the pass moves it to the CPU).
        """

    def finish_outputs(self, pass_name: str, layer: TrackedLayer,
                       tensors: LayerTensors) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """The tensors :meth:`finish_pass` adds (name -> shape, dtype) when it is expensive enough to be
        spread over data-parallel ranks by layer: one rank computes a layer's and broadcasts them. Empty
        (the default): every rank runs :meth:`finish_pass` itself."""
        return {}

    def factor_shapes(self, pass_name: str, layer: TrackedLayer) -> dict[str, tuple[int, ...]]:
        """The tensors :meth:`finish_pass` adds for ``layer`` beside the sums (name -> shape, in the dtype of
        the sums); the memory plan counts them. None by default."""
        return {}

    def replaced_sums(self, pass_name: str, layer: TrackedLayer) -> dict[str, str]:
        """Sums that :meth:`finish_pass` replaces by a tensor it adds, written into the sum's own storage
        (added name -> sum name; same shape and dtype): after the finish the sum is gone, and the memory
        plan counts the pair once. E.g. K-FAC's eigenbases over its covariance sums. None by default."""
        return {}

    def kept_shapes(self, pass_name: str, layer: TrackedLayer) -> dict[str, tuple[int, ...]]:
        """What a layer holds from pass ``pass_name`` once it is finished: its sums but the replaced ones,
        and what the finish adds."""
        gone = set(self.replaced_sums(pass_name, layer).values())
        kept = {k: v for k, v in self.statistics(pass_name, layer).items() if k not in gone}
        return {**kept, **self.factor_shapes(pass_name, layer)}

    # ------------------------------------------------------------- curvature
    def eigenvalues(self, layer: TrackedLayer, tensors: LayerTensors) -> torch.Tensor:
        """``[d_out, d_in]`` curvature eigenvalues of a layer in its preconditioning basis."""
        raise NotImplementedError

    def damping(self, layer: TrackedLayer, tensors: LayerTensors, damping: float | None,
                damping_factor: float) -> float:
        """The damping lambda of a layer: ``damping`` as given, or ``damping_factor`` x the mean eigenvalue."""
        if damping is not None:
            return damping
        return damping_factor * float(self.eigenvalues(layer, tensors).mean())

    def prepare(self, layer: TrackedLayer, tensors: LayerTensors, damping: float, device: torch.device,
                dtype: torch.dtype) -> LayerTensors:
        """What scoring keeps on its device for a layer: ``inv = 1 / (eigenvalues + damping)`` and the
        :attr:`scoring_tensors`, in ``dtype``."""
        inv = 1.0 / (self.eigenvalues(layer, tensors) + damping)
        if not torch.isfinite(inv).all():
            raise FactorsError(
                f"layer '{layer.name}' has zero curvature and zero damping; use damping=None (heuristic) "
                "or a positive damping"
            )
        prepared = {"inv": inv.to(device=device, dtype=dtype)}
        prepared.update({key: tensors[key].to(device=device, dtype=dtype) for key in self.scoring_tensors})
        return prepared

    def precondition(self, prepared: LayerTensors, grads: torch.Tensor) -> torch.Tensor:
        """``(G + lambda I)^-1 V`` for ``V`` ``[..., d_out, d_in]``; the default: eigenvalues in the parameter basis."""
        return grads * prepared["inv"]

    def inverse_quadratic(self, prepared: LayerTensors, grads: torch.Tensor) -> torch.Tensor:
        """``V^T (G + lambda I)^-1 V`` per leading index, for ``V`` ``[B, d_out, d_in]``."""
        return (grads * grads * prepared["inv"]).flatten(1).sum(1)

    def precondition_tokens(self, prepared: LayerTensors, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """:meth:`precondition` of the per-example gradients ``DW = sum_t s_t a_t^T`` of tokens ``a`` ``[B, T, d_in]``,
        ``s`` ``[B, T, d_out]``; strategies with a rotated basis may rotate the tokens instead (cheaper when T < d)."""
        return self.precondition(prepared, per_example_gradients(a, s))

    def inverse_quadratic_tokens(self, prepared: LayerTensors, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """:meth:`inverse_quadratic` of the per-example gradients of tokens ``a``, ``s`` (self-influence)."""
        return self.inverse_quadratic(prepared, per_example_gradients(a, s))

    def dense_matrix(self, layer: TrackedLayer, tensors: LayerTensors) -> torch.Tensor:
        """The layer's curvature ``G`` as an explicit ``(d_out*d_in)^2`` float64 matrix (row-major vec of ``V``).

        Only for tests and small layers: it is what :meth:`precondition` inverts (before damping).
        """
        return torch.diag(self.eigenvalues(layer, tensors).to(torch.float64).flatten())

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"
