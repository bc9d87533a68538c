"""The statistics passes, generic over curvature strategies.

Nothing here knows about Lightning's ``Trainer`` nor about any one strategy: a pass takes a
model, a task and an iterable of batches, and asks the factors' strategy
(``lightning_influence.curvature``) which sums to accumulate, how each layer's tokens add to
them, and what to do with them at the end (K-FAC's eigendecomposition). Sums live in a
torchmetrics ``Metric`` with ``dist_reduce_fx="sum"`` states, so under data parallelism each
rank accumulates its shard and one reduction gives the global statistics (docs/method.md,
section 5).
"""

from __future__ import annotations

import logging
import warnings
from contextlib import nullcontext
from typing import Any, Callable, ContextManager, Iterable

import torch
from torch import nn
from torchmetrics import Metric

from lightning_influence.errors import FactorsError, OptionsError, TaskInputError
from lightning_influence.factors import InfluenceFactors
from lightning_influence.memory import check_fit_memory
from lightning_influence.options import FitOptions
from lightning_influence.tasks import Task
from lightning_influence.capture import LayerCapture, find_tracked_layers

log = logging.getLogger(__name__)
from lightning_influence.capture import model_mode
from lightning_influence.tasks import batch_train_loss
from lightning_influence.store import data_fingerprint, describe_differences, identity_differences, weights_fingerprint

__all__ = [
    "SumStatistics", "fit_factors", "fit_identity", "run_phase", "remaining_phases",
]

# The examples a pass saw, summed over ranks: the global count decides whether the pass saw any data.
_EXAMPLES = "::examples"


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


def _pass_shapes(factors: InfluenceFactors, phase: str) -> dict[str, tuple[int, ...]]:
    """Every layer's sums for pass ``phase``, keyed ``<module>::<statistic>``, and the example count."""
    shapes = {f"{name}::{key}": shape for name, layer in factors.layers.items()
              for key, shape in factors.curvature.statistics(phase, layer).items()}
    shapes[_EXAMPLES] = ()
    return shapes


def _prefixed(name: str, update: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{name}::{key}": value for key, value in update.items()}


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
    """Run the strategy's pass named ``phase`` (e.g. ``covariance``, ``lambda``) and store it in ``factors``.

    The model's weights are never changed and its train/eval mode is restored after.
    Under ``torch.distributed`` each rank passes its own shard; the sums are all-reduced, and a
    pass that saw no example on any rank raises :class:`TaskInputError` on every rank, before
    the factors' phase moves on.
    ``progress(n)`` is called after each batch with the number of examples processed;
    ``forward_context()`` wraps each forward (e.g. the trainer's autocast for bf16-mixed).
    ``stats_dtype`` is the dtype the sums are kept (and saved) in: float64, or float32 for
    half the memory (eigendecompositions are done in float64 either way).
    """
    check_stats_dtype(stats_dtype)
    check_limits(max_batches, max_examples)
    strategy = factors.curvature
    spec = strategy.get_pass(phase)
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    if transfer is None:
        from lightning.fabric.utilities.apply_func import move_data_to_device  # lazy: importing Lightning is slow
        transfer = lambda b: move_data_to_device(b, device)  # noqa: E731
    shapes = _pass_shapes(factors, phase)
    stats = SumStatistics(shapes, dtype=stats_dtype).to(device)
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
        # Each layer's sums are taken as soon as its tensors exist (activations in the forward for a
        # forward-side pass, everything else in the backward) and its captured tokens dropped right after,
        # so a batch never holds every layer's activations and gradients at once.
        layers = factors.layers
        # What the updates read from earlier passes (eigenbases), in the compute dtype once per pass.
        inputs = {n: strategy.pass_inputs(phase, factors.tensors[n], device, dtype) for n in layers}

        # The capture zeroes padding per layer and counts the real tokens of the layer it hands over.
        def consume(name, a, s):
            update = strategy.gradient_update(phase, layers[name], a, s, cap.token_count, inputs[name])
            stats.update(_prefixed(name, update))

        def on_forward(name, a):
            stats.update(_prefixed(name, strategy.activation_update(phase, layers[name], a, cap.token_count)))

        with LayerCapture(model, layers, dtype=dtype, on_activation=on_forward if spec.forward_side else None) as cap:
            for batch_index, batch in enumerate(_limited(batches, max_batches)):
                if max_examples is not None and seen_examples >= max_examples:
                    break
                batch = transfer(batch)
                cap.next_batch(task.batch_size(batch), task.token_mask(batch))  # the capture masks padding per layer
                with forward_context() if forward_context is not None else nullcontext():
                    loss = batch_train_loss(task, model, batch, batch_index, sample)
                cap.backward(loss, consume)
                seen_batches += 1
                n = task.batch_size(batch)
                seen_examples += n
                stats.update({_EXAMPLES: torch.tensor(float(n), dtype=torch.float64)})
                if progress is not None:
                    progress(n)
    with warnings.catch_warnings():
        # A rank with an empty shard never called update(); what counts is the reduced count, checked below.
        warnings.filterwarnings("ignore", message=r".*compute.* was called before the ..update.. method")
        sums = stats.compute()  # reduced over ranks: every rank takes the same decision below
    if float(sums.pop(_EXAMPLES)) == 0:
        raise TaskInputError(
            f"the {phase} pass saw no training example"
            + (" on any rank" if _distributed() else "")
            + ": the training dataloader is empty, or an iterator that an earlier pass used up (pass a re-iterable "
            "such as a DataLoader), or max_batches/max_examples stop it before its first batch. "
            "Give the pass data to fit on; no factors were marked complete"
        )
    for key, value in sums.items():
        name, _, stat = key.rpartition("::")
        # torchmetrics squeezes one-element results: restore the declared shapes (1x1 covariances).
        factors.tensors[name][stat] = value.reshape(shapes[key]).cpu()
    for name, layer in layers.items():
        strategy.finish_pass(phase, layer, factors.tensors[name])
    factors.set_phase(spec.phase)
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


def check_limits(max_batches: int | None, max_examples: int | None) -> None:
    """A pass capped at zero batches or examples would fit factors from nothing: refuse it up front."""
    for name, value in (("max_batches", max_batches), ("max_examples", max_examples)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise OptionsError(f"{name} must be a positive integer or None (no cap), got {value!r}")


def check_stats_dtype(stats_dtype: torch.dtype) -> None:
    if stats_dtype not in (torch.float64, torch.float32):
        raise FactorsError(f"stats_dtype must be torch.float64 or torch.float32 (sums over millions of tokens "
                           f"need at least float32), got {stats_dtype!r}")


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _rank() -> int:
    return torch.distributed.get_rank() if _distributed() else 0


def remaining_phases(factors: InfluenceFactors) -> list[str]:
    """The names of the passes still to run for ``factors`` (resuming after the last saved phase)."""
    return [p.name for p in factors.curvature.remaining_passes(factors.phase)]


def pass_title(factors: InfluenceFactors, phase: str) -> str:
    """The progress-bar title of the strategy's pass named ``phase``."""
    return factors.curvature.get_pass(phase).title


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


def fit_identity(model: nn.Module, batches: Any, layers: Iterable[str], strategy: str, fisher: str,
                 max_batches: int | None, max_examples: int | None, seed: int, stats_dtype: torch.dtype,
                 dtype: torch.dtype) -> dict:
    """What a factor fit depends on, as saved in the factors' bundle and compared on resume:
    the model's weights, the data, and every option that changes the statistics."""
    return {
        "weights": weights_fingerprint(model),
        "data": data_fingerprint(batches),
        "options": {
            "strategy": strategy, "fisher": fisher, "modules": sorted(layers),
            "max_batches": max_batches, "max_examples": max_examples, "seed": seed,
            "stats_dtype": str(stats_dtype).removeprefix("torch."), "capture_dtype": str(dtype).removeprefix("torch."),
        },
    }


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
    ``seed=``, ``capture_dtype=``, ``stats_dtype=``, ``memory_budget=``). ``batches`` is iterated once per pass of
    the strategy (twice for ``ekfac``), so pass a re-iterable such as a ``DataLoader``. With
    ``output_dir`` the factors are saved after each phase; passing partially fitted ``factors``
    resumes after their last completed phase. An empty ``batches`` (on every rank) raises before
    any factors are marked complete.

    Before the first pass, the memory plan (``lightning_influence.memory``) is logged as one table
    and a plan over ``memory_budget`` raises :class:`~lightning_influence.memory.MemoryBudgetError`.

    Partial ``factors`` are resumed only when they were fitted from the same weights, data and
    options (their ``metadata["identity"]``, see :func:`fit_identity`); otherwise the fit starts
    over, with a warning naming what differed.
    """
    options = FitOptions.merged(options, option_values)
    strategy, modules, module_types, fisher = options.strategy, options.modules, options.module_types, options.fisher
    damping, damping_factor, seed = options.damping, options.damping_factor, options.seed
    max_batches, max_examples = options.max_batches, options.max_examples
    dtype, stats_dtype = options.capture_dtype, options.stats_dtype
    check_limits(max_batches, max_examples)
    if factors is None:
        layers = find_tracked_layers(model, modules, module_types)
        factors = InfluenceFactors(strategy, layers, fisher=fisher, damping=damping, damping_factor=damping_factor,
                                   metadata={"identity": fit_identity(model, batches, layers, strategy, fisher,
                                                                      max_batches, max_examples, seed,
                                                                      stats_dtype, dtype)})
    else:
        _check_resumable(factors, model)
        # Resuming continues the factors' own strategy, fisher and modules; the rest must match.
        identity = fit_identity(model, batches, factors.layers, factors.strategy, factors.fisher, max_batches,
                                max_examples, seed, stats_dtype, dtype)
        saved = factors.metadata.get("identity")
        diffs = identity_differences(saved, identity) if saved is not None else {}
        if diffs and not factors.is_complete:
            warnings.warn(f"[lightning-influence] not resuming the factors passed: they were fitted from other "
                          f"weights, data or options ({describe_differences(diffs)}); fitting from scratch")
            factors = InfluenceFactors(factors.strategy, factors.layers, fisher=factors.fisher,
                                       damping=factors.damping, damping_factor=factors.damping_factor,
                                       metadata={**factors.metadata, "identity": identity})
        elif saved is None and not factors.is_complete:
            factors.metadata["identity"] = identity
    if remaining_phases(factors):  # the memory plan, before any pass allocates (memory_budget=)
        check_fit_memory(model, task, factors, batches, options, device)
    for phase in remaining_phases(factors):
        run_phase(phase, factors, model, task, batches, device=device, dtype=dtype,
                  max_batches=max_batches, max_examples=max_examples, seed=seed, stats_dtype=stats_dtype)
        if output_dir is not None and _rank() == 0:
            factors.save(output_dir)
    if output_dir is not None and _rank() == 0 and not factors.curvature.passes:
        factors.save(output_dir)  # complete without a pass (identity): saved once all the same
    return factors
