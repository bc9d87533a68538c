"""The statistics passes: covariances, eigendecomposition, eigenvalue correction.

Nothing here knows about Lightning's ``Trainer``: a pass takes a model, a task and an
iterable of batches. Sums live in a torchmetrics ``Metric`` with ``dist_reduce_fx="sum"``
states, so under data parallelism each rank accumulates its shard and one reduction
gives the global statistics (``../shared/ekfac-reference.md``, section 5).
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import Any, Callable, ContextManager, Iterable

import torch
from torch import nn
from torchmetrics import Metric

from lightning_influence.errors import FactorsError, TaskInputError
from lightning_influence.factors import InfluenceFactors
from lightning_influence.options import FitOptions
from lightning_influence.batches import move_to_device
from lightning_influence.tasks import Task
from lightning_influence.capture import LayerCapture, TrackedLayer, find_tracked_layers

log = logging.getLogger(__name__)
from lightning_influence.capture import masked_tokens, model_mode, per_example_gradients, token_count
from lightning_influence.tasks import checked_loss

__all__ = [
    "SumStatistics", "fit_factors", "run_phase", "remaining_phases",
]


class SumStatistics(Metric):
    """Named sums that reduce across data-parallel ranks by addition.

    Matrices are kept in ``dtype`` (float64 by default); scalar counts always in float64,
    which counts exactly far beyond float32's 2^24 tokens.
    """

    full_state_update = False
    # The states are statistics of a dataset, not of a metric's per-step values.
    is_differentiable = False

    def __init__(self, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype = torch.float64):
        super().__init__(sync_on_compute=True)
        self._keys = {key: f"stat{i}" for i, key in enumerate(shapes)}
        for key, shape in shapes.items():
            state_dtype = dtype if len(shape) else torch.float64
            self.add_state(self._keys[key], default=torch.zeros(shape, dtype=state_dtype), dist_reduce_fx="sum")

    def update(self, values: dict[str, torch.Tensor]) -> None:  # type: ignore[override]
        for key, value in values.items():
            state = getattr(self, self._keys[key])
            state += value.to(state.dtype)

    def compute(self) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return {key: getattr(self, attr).clone() for key, attr in self._keys.items()}


def _phase_shapes(phase: str, layers: dict[str, TrackedLayer]) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for name, l in layers.items():
        if phase == "covariance":
            shapes.update({f"{name}::A_sum": (l.d_in, l.d_in), f"{name}::S_sum": (l.d_out, l.d_out),
                           f"{name}::A_count": (), f"{name}::S_count": ()})
        elif phase == "lambda":
            shapes.update({f"{name}::lambda_sum": (l.d_out, l.d_in), f"{name}::lambda_count": ()})
        elif phase == "diagonal":
            shapes.update({f"{name}::diag_sum": (l.d_out, l.d_in), f"{name}::diag_count": ()})
    return shapes


def _activation_update(name: str, a: torch.Tensor, mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Covariance pass, forward side: the layer's ``sum_t a_t a_t^T`` and token count."""
    a = masked_tokens(a, mask)
    a2 = a.reshape(-1, a.shape[-1])
    return {f"{name}::A_sum": a2.T @ a2, f"{name}::A_count": torch.tensor(token_count(a, mask), dtype=torch.float64)}


def _layer_update(phase: str, eigvecs: dict[str, tuple[torch.Tensor, torch.Tensor]], name: str,
                  a: torch.Tensor | None, s: torch.Tensor, mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """One layer's contribution to a pass's sums, from its tokens ``a`` ``[B, T, d_in]`` and ``s`` ``[B, T, d_out]``.

    ``eigvecs[name]`` holds the layer's ``(Q_A, Q_S)`` in the compute dtype (Lambda pass only)."""
    s = masked_tokens(s, mask)
    if phase == "covariance":  # the activation side was summed during the forward
        s2 = s.reshape(-1, s.shape[-1])
        return {f"{name}::S_sum": s2.T @ s2, f"{name}::S_count": torch.tensor(token_count(s, mask), dtype=torch.float64)}
    a = masked_tokens(a, mask)
    if phase == "lambda":
        qa, qs = eigvecs[name]
        # Rotate tokens first: (Q_S^T DW Q_A) = sum_t (Q_S^T s_t)(Q_A^T a_t)^T, cheaper than rotating DW.
        rotated = per_example_gradients(a @ qa, s @ qs)
        return {f"{name}::lambda_sum": rotated.square_().sum(0),
                f"{name}::lambda_count": torch.tensor(float(a.shape[0]), dtype=torch.float64)}
    dw = per_example_gradients(a, s)  # diagonal
    return {f"{name}::diag_sum": dw.square_().sum(0), f"{name}::diag_count": torch.tensor(float(a.shape[0]), dtype=torch.float64)}


def run_phase(
    phase: str,
    factors: InfluenceFactors,
    model: nn.Module,
    task: Task,
    batches: Iterable[Any],
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    max_batches: int | None = None,
    max_examples: int | None = None,
    seed: int = 0,
    transfer: Callable[[Any], Any] | None = None,
    progress: Callable[[int], None] | None = None,
    forward_context: Callable[[], ContextManager] | None = None,
    stats_dtype: torch.dtype = torch.float64,
) -> None:
    """Run one accumulation pass (``covariance``, ``lambda`` or ``diagonal``) and store it in ``factors``.

    The model's weights are never changed and its train/eval mode is restored after.
    Under ``torch.distributed`` each rank passes its own shard; the sums are all-reduced.
    ``progress(n)`` is called after each batch with the number of examples processed;
    ``forward_context()`` wraps each forward (e.g. the trainer's autocast for bf16-mixed).
    ``stats_dtype`` is the dtype the sums are kept (and saved) in: float64, or float32 for
    half the memory (eigendecompositions are done in float64 either way).
    """
    check_stats_dtype(stats_dtype)
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    if transfer is None:
        transfer = lambda b: move_to_device(b, device)  # noqa: E731
    stats = SumStatistics(_phase_shapes(phase, factors.layers), dtype=stats_dtype).to(device)
    sample = factors.fisher == "sampled"
    seen_batches = seen_examples = 0
    # Sampled labels come from a fixed seed so that a rerun gives identical factors.
    fork_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices), model_mode(model, train=False), torch.enable_grad():
        # Seed only the generators fork_rng restores (CPU and this pass's device), not every GPU's.
        torch.random.default_generator.manual_seed(seed + _rank())
        if device.type == "cuda":
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed + _rank())
        # Each layer's sums are taken as soon as its tensors exist (activations in the forward for the
        # covariance pass, everything else in the backward) and its captured tokens dropped right after,
        # so a batch never holds every layer's activations and gradients at once.
        mask: list[torch.Tensor | None] = [None]  # the current batch's token mask
        # The eigenbases in the compute dtype once per pass, not once per batch and layer.
        eigvecs = {n: (t["A_eigvecs"].to(device=device, dtype=dtype), t["S_eigvecs"].to(device=device, dtype=dtype))
                   for n, t in factors.tensors.items() if n in factors.layers} if phase == "lambda" else {}

        def consume(name, a, s):
            stats.update(_layer_update(phase, eigvecs, name, a, s, mask[0]))

        on_activation = None
        if phase == "covariance":
            on_activation = lambda name, a: stats.update(_activation_update(name, a, mask[0]))  # noqa: E731

        with LayerCapture(model, factors.layers, dtype=dtype, on_activation=on_activation) as cap:
            for batch_index, batch in enumerate(_limited(batches, max_batches)):
                if max_examples is not None and seen_examples >= max_examples:
                    break
                batch = transfer(batch)
                mask[0] = task.token_mask(batch)
                with forward_context() if forward_context is not None else nullcontext():
                    loss = checked_loss(task.train_loss(model, batch, sample=sample), batch_index)
                cap.backward(loss, consume)
                seen_batches += 1
                n = task.batch_size(batch)
                seen_examples += n
                if progress is not None:
                    progress(n)
    if stats._update_count == 0 and not _distributed():
        raise TaskInputError(
            f"the {phase} pass saw no batch: the training dataloader is empty (or max_batches/max_examples is 0)"
        )
    shapes = _phase_shapes(phase, factors.layers)
    # torchmetrics squeezes one-element results: restore the declared shapes (1x1 covariances of 1-output layers).
    sums = {k: v.reshape(shapes[k]).cpu() for k, v in stats.compute().items()}
    for key, value in sums.items():
        name, _, stat = key.rpartition("::")
        factors.tensors[name][stat] = value
    if phase == "covariance":
        if any(float(factors.tensors[n]["A_count"]) == 0 for n in factors.layers):
            raise TaskInputError("the covariance pass counted no tokens (every position masked as padding?)")
        _eigendecompose(factors)
        factors.set_phase("complete" if factors.strategy == "kfac" else "eigen")
    else:
        factors.set_phase("complete")
    log.info("%s pass done: %d batches, %d examples on this rank", phase, seen_batches, seen_examples)


def _limited(batches: Iterable[Any], max_batches: int | None) -> Iterable[Any]:
    """At most ``max_batches`` batches, without drawing one more from the loader than is used."""
    if max_batches is None:
        yield from batches
        return
    if max_batches <= 0:
        return
    for i, batch in enumerate(batches):
        yield batch
        if i + 1 >= max_batches:
            return


def _eigendecompose(factors: InfluenceFactors) -> None:
    """Eigendecompose the mean covariances in float64 (they are ill-conditioned), one layer at a time;
    the results are kept in the dtype of the sums."""
    for name in factors.layers:
        t = factors.tensors[name]
        for side in ("A", "S"):
            total = t[f"{side}_sum"]
            cov = total.to(torch.float64) / t[f"{side}_count"]
            cov = 0.5 * (cov + cov.T)
            vals, vecs = torch.linalg.eigh(cov)
            t[f"{side}_eigvals"] = vals.to(total.dtype)
            # eigh returns column-major; saved files are row-major
            t[f"{side}_eigvecs"] = vecs.to(total.dtype).contiguous()


def check_stats_dtype(stats_dtype: torch.dtype) -> None:
    if stats_dtype not in (torch.float64, torch.float32):
        raise FactorsError(f"stats_dtype must be torch.float64 or torch.float32 (sums over millions of tokens "
                           f"need at least float32), got {stats_dtype!r}")


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _rank() -> int:
    return torch.distributed.get_rank() if _distributed() else 0


def remaining_phases(factors: InfluenceFactors) -> list[str]:
    """The accumulation passes still to run for ``factors`` (resuming after the last saved phase)."""
    if factors.is_complete:
        return []
    if factors.strategy == "ekfac":
        return ["lambda"] if factors.phase_done("eigen") else ["covariance", "lambda"]
    return {"diagonal": ["diagonal"], "kfac": ["covariance"]}[factors.strategy]


def _check_resumable(factors: InfluenceFactors, model: nn.Module) -> None:
    """Partially fitted factors can only be resumed on the model (modules and shapes) they started on."""
    modules = dict(model.named_modules())
    absent = [n for n in factors.layers if n not in modules]
    if absent:
        raise FactorsError(
            f"the factors to resume track module(s) {absent[:10]} that {type(model).__name__} does not have; "
            "resume on the model they were fitted on, or fit new factors (factors=None)"
        )
    factors.check_model(find_tracked_layers(model, list(factors.layers)))


def fit_factors(
    model: nn.Module,
    task: Task,
    batches: Iterable[Any],
    options: FitOptions | None = None,
    *,
    device: torch.device | str | None = None,
    output_dir: str | None = None,
    factors: InfluenceFactors | None = None,
    **option_values: Any,
) -> InfluenceFactors:
    """Fit influence factors in-process (no Lightning needed).

    ``options`` is a :class:`~lightning_influence.options.FitOptions`; single options may be
    given by keyword instead or on top (``strategy=``, ``modules=``, ``module_types=``,
    ``fisher=``, ``damping=``, ``damping_factor=``, ``max_batches=``, ``max_examples=``,
    ``seed=``, ``capture_dtype=``, ``stats_dtype=``). ``batches`` is iterated once per pass
    (twice for ``ekfac``), so pass a re-iterable such as a ``DataLoader``. With ``output_dir``
    the factors are saved after each phase; passing partially fitted ``factors`` resumes after
    their last completed phase.
    """
    options = FitOptions.merged(options, option_values)
    strategy, modules, module_types, fisher = options.strategy, options.modules, options.module_types, options.fisher
    damping, damping_factor, seed = options.damping, options.damping_factor, options.seed
    max_batches, max_examples = options.max_batches, options.max_examples
    dtype, stats_dtype = options.capture_dtype, options.stats_dtype
    if factors is None:
        layers = find_tracked_layers(model, modules, module_types)
        factors = InfluenceFactors(strategy, layers, fisher=fisher, damping=damping, damping_factor=damping_factor)
    else:
        _check_resumable(factors, model)
    for phase in remaining_phases(factors):
        run_phase(phase, factors, model, task, batches, device=device, dtype=dtype,
                  max_batches=max_batches, max_examples=max_examples, seed=seed, stats_dtype=stats_dtype)
        if output_dir is not None and _rank() == 0:
            factors.save(output_dir)
    if output_dir is not None and _rank() == 0 and factors.strategy == "identity":
        factors.save(output_dir)
    return factors
