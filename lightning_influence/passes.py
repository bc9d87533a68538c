"""The statistics passes, generic over curvature strategies.

Nothing here knows about Lightning's ``Trainer`` nor about any one strategy: a pass takes a
model, a task and an iterable of batches, and asks the factors' strategy
(``lightning_influence.curvature``) which sums to accumulate, how each layer's tokens add to
them, and what to do with them at the end (K-FAC's eigendecomposition). Sums live in one
flat buffer (:class:`SumStatistics`), so under data parallelism each rank accumulates its shard
and one ``all_reduce`` gives the global statistics (docs/method.md, section 5); the
eigendecompositions then run on the pass's device, dealt out over the ranks by layer.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from contextlib import nullcontext
from typing import Any, Callable, ContextManager, Iterable

import torch
from torch import nn

from lightning_influence.errors import FactorsError, OptionsError, TaskInputError
from lightning_influence.curvature import get_strategy
from lightning_influence.curvature.blocks import DEFAULT_BLOCK_SIZE, DEFAULT_BLOCK_THRESHOLD, DEFAULT_EIGH_DTYPE
from lightning_influence.factors import InfluenceFactors
from lightning_influence.memory import check_fit_memory, release_freed_memory
from lightning_influence.options import STATS_DTYPES, FitOptions
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


class SumStatistics:
    """Named sums that reduce across data-parallel ranks by addition: one flat buffer, one view per sum.

    Matrices are kept in ``dtype`` (float64 by default) in one flat buffer; scalar counts in a
    float64 buffer beside it, which counts exactly far beyond float32's 2^24 tokens (with
    float64 statistics both are one buffer). :meth:`all_reduce` sums the buffers over the
    process group in place: one collective per buffer and no copy, where a gather of every
    rank's state would hold world-size times the statistics.

    ``flat=False`` (a single process, nothing to reduce) gives every sum a storage of its own
    instead, so that what is written over a sum (K-FAC's bases) leaves memory with its own last
    reference, layer by layer: a view keeps the whole of a flat buffer alive.
    """

    def __init__(self, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype = torch.float64,
                 device: torch.device | str = "cpu", flat: bool = True):
        self.buffers: list[torch.Tensor] = []
        self.views: dict[str, torch.Tensor] = {}
        if not flat:
            for key, shape in shapes.items():
                self.views[key] = torch.zeros(shape, dtype=dtype if len(shape) else torch.float64, device=device)
            return
        sizes = {key: math.prod(shape) for key, shape in shapes.items()}
        matrices = [k for k, shape in shapes.items() if len(shape)]
        counts = [k for k, shape in shapes.items() if not len(shape)]
        groups = [(matrices + counts, dtype)] if dtype == torch.float64 else [(matrices, dtype),
                                                                              (counts, torch.float64)]
        for keys, buffer_dtype in groups:
            if not keys:
                continue
            buffer = torch.zeros(sum(sizes[k] for k in keys), dtype=buffer_dtype, device=device)
            offset = 0
            for key in keys:
                self.views[key] = buffer[offset:offset + sizes[key]].view(shapes[key])
                offset += sizes[key]
            self.buffers.append(buffer)

    def update(self, values: dict[str, torch.Tensor]) -> None:
        for key, value in values.items():
            self.views[key].add_(value)  # add_ casts to the buffer's dtype without a converted copy

    def all_reduce(self) -> None:
        """Sum every rank's buffers in place (nothing to do outside an initialised process group)."""
        if _distributed():
            if not self.buffers and self.views:
                raise RuntimeError("SumStatistics(flat=False) has no buffer to reduce; make it with flat=True")
            for buffer in self.buffers:
                torch.distributed.all_reduce(buffer, op=torch.distributed.ReduceOp.SUM)

    def compute(self) -> dict[str, torch.Tensor]:
        """The sums by name: views into the buffers, not copies."""
        return dict(self.views)


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
    consumer: Any = None,
    on_layer_finished: Callable[[str, float], None] | None = None,
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
    ``consumer`` receives what the pass forms per example, without a pass of its own: for each
    batch ``consumer.begin_batch(batch)`` (the batch before ``transfer``; returns whether it wants
    the batch), the strategy's per-layer calls during the backward (EK-FAC's eigenvalue correction
    hands each layer's rotated tokens to ``consumer.add_rotated_tokens(name, a Q_A, s Q_S)``), then
    ``consumer.end_batch()``. E.g. an :class:`~lightning_influence.index.IndexWriter`. Only for a
    pass whose strategy feeds one (``strategy.feeds_consumer(phase)``) and with the empirical
    Fisher, whose backward is the training-loss gradient the consumer needs.

    ``on_layer_finished(name, seconds)`` is called after each layer's finishing step (K-FAC's
    eigendecomposition) that ran on this rank, e.g. to drive a progress bar over the layers.
    """
    check_stats_dtype(stats_dtype)
    if consumer is not None:
        _check_consumer(factors, phase)
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
    stats = SumStatistics(shapes, dtype=stats_dtype, device=device, flat=_distributed())
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
        # What earlier passes left and this one does not read (their sums, the float64 bases it reads in its
        # compute dtype) leaves memory while the pass runs, when it is saved on disk; read back after the last
        # batch. One process only: in a data-parallel run the other ranks saved nothing.
        earlier = {n: dict(factors.tensors[n]) for n in layers}
        if consumer is None and not _distributed():
            factors.offload(keep=phase)
        # What the updates read from earlier passes (eigenbases), in the compute dtype once per pass; each
        # layer's earlier tensors go as soon as its inputs exist (their own storages: see SumStatistics).
        inputs = {n: strategy.pass_inputs(phase, earlier.pop(n), device, dtype) for n in layers}

        # The capture zeroes padding per layer and counts the real tokens of the layer it hands over.
        def consume(name, a, s):
            fed = {"consumer": consumer} if wanted else {}  # only strategies that feed one take the argument
            update = strategy.gradient_update(phase, layers[name], a, s, cap.token_count, inputs[name], **fed)
            stats.update(_prefixed(name, update))

        def on_forward(name, a):
            stats.update(_prefixed(name, strategy.activation_update(phase, layers[name], a, cap.token_count)))

        capture = None
        try:
            capture = LayerCapture(model, layers, dtype=dtype, on_activation=on_forward if spec.forward_side else None)
            with capture as cap:
                for batch_index, batch in enumerate(_limited(batches, max_batches)):
                    if max_examples is not None and seen_examples >= max_examples:
                        break
                    wanted = consumer is not None and consumer.begin_batch(batch)
                    batch = transfer(batch)
                    cap.next_batch(task.batch_size(batch), task.token_mask(batch))  # masks padding per layer
                    with forward_context() if forward_context is not None else nullcontext():
                        loss = batch_train_loss(task, model, batch, batch_index, sample)
                    cap.backward(loss, consume)
                    if consumer is not None:
                        consumer.end_batch()
                    seen_batches += 1
                    n = task.batch_size(batch)
                    seen_examples += n
                    stats.update({_EXAMPLES: torch.tensor(float(n), dtype=torch.float64)})
                    if progress is not None:
                        progress(n)
        finally:
            # `on_forward` closes over `cap`, which holds `on_forward`: a cycle that would keep `stats` (and with
            # it the bases written into its buffer, offloaded or not) until Python's collector happens to run.
            if capture is not None:
                capture.on_activation = None
            inputs.clear()  # the pass's copies of the bases
            release_freed_memory()  # the batches' freed memory, before the earlier factors come back
            factors.restore()
    stats.all_reduce()  # every rank, an empty shard's too: every rank takes the same decision below
    sums = stats.compute()
    if float(sums.pop(_EXAMPLES)) == 0:
        raise TaskInputError(
            f"the {phase} pass saw no training example"
            + (" on any rank" if _distributed() else "")
            + ": the training dataloader is empty, or an iterator that an earlier pass used up (pass a re-iterable "
            "such as a DataLoader), or max_batches/max_examples stop it before its first batch. "
            "Give the pass data to fit on; no factors were marked complete"
        )
    # The sums stay on the pass's device (views of the reduced buffer) until their layer is finished, so
    # that its eigendecomposition runs there; each layer's tensors then move to the CPU.
    on_device: dict[str, dict[str, torch.Tensor]] = {name: {} for name in layers}
    for key, value in sums.items():
        name, _, stat = key.rpartition("::")
        on_device[name][stat] = value
    del sums
    for name, layer in layers.items():
        strategy.check_pass(phase, layer, {**factors.tensors[name], **on_device[name]})
    finish_layers(strategy, phase, factors, on_device, device, on_layer_finished)
    release_freed_memory()  # the eigendecompositions' workspaces, before the next pass
    factors.pass_changed(phase)
    factors.set_phase(spec.phase)
    log.info("%s pass done: %d batches, %d examples on this rank", phase, seen_batches, seen_examples)


def _check_consumer(factors: InfluenceFactors, phase: str) -> None:
    feeds = getattr(factors.curvature, "feeds_consumer", None)
    if feeds is None or not feeds(phase):
        raise OptionsError(f"the {phase} pass of strategy '{factors.strategy}' feeds no per-example consumer (only "
                           "EK-FAC's eigenvalue-correction pass does); build the index after the fit (build_index)")
    if factors.fisher != "empirical":
        raise OptionsError(f"the {phase} pass with fisher='{factors.fisher}' differentiates sampled labels, not the "
                           "training loss a consumer (the gradient index) needs; use fisher='empirical' or build the "
                           "index after the fit (build_index)")


# A layer's finishing step (eigendecomposition) that takes longer than this is logged with its time.
SLOW_FINISH_SECONDS = 1.0


def finish_layers(strategy: Any, phase: str, factors: InfluenceFactors,
                  on_device: dict[str, dict[str, torch.Tensor]], device: torch.device,
                  on_layer_finished: Callable[[str, float], None] | None = None) -> None:
    """Run the strategy's :meth:`finish_pass` for every layer and move each layer's tensors to the CPU.

    Under an initialised process group with several ranks, a strategy that declares its finish
    outputs (K-FAC's eigendecompositions) has them computed by one rank per layer (layers dealt
    out by cost, largest first) and broadcast from there: every rank enters the same broadcasts in
    the same order. Layers that take long are logged with their time. ``on_device`` holds each
    layer's reduced sums, on ``device`` (where the broadcasts happen).
    """
    layers = factors.layers
    world = torch.distributed.get_world_size() if _distributed() else 1
    outputs = {n: strategy.finish_outputs(phase, layers[n], {**factors.tensors[n], **on_device[n]}) for n in layers}
    owner = _deal_layers(outputs, world) if world > 1 else {}
    rank = _rank()
    done, started = 0, time.perf_counter()
    for name, layer in layers.items():
        tensors = {**factors.tensors[name], **on_device[name]}
        if world == 1 or not outputs[name] or owner[name] == rank:
            start = time.perf_counter()
            strategy.finish_pass(phase, layer, tensors)
            elapsed = time.perf_counter() - start
            done += 1
            if on_layer_finished is not None:
                on_layer_finished(name, elapsed)
            if outputs[name] and elapsed >= SLOW_FINISH_SECONDS:
                log.info("%s pass: layer '%s' (%dx%d) finished in %.1f s (%d of %d on this rank)", phase, name,
                         layer.d_out, layer.d_in, elapsed, done, sum(1 for n in layers if owner.get(n, rank) == rank))
        if world == 1:  # done with this layer on the device: its sums and factors move now, not all at the end
            factors.tensors[name] = {k: v.cpu() for k, v in tensors.items()}
            del on_device[name]
        else:  # kept on the device for the broadcasts below
            on_device[name] = tensors
    if world > 1:
        for name, layer in layers.items():  # the same order on every rank
            if not outputs[name]:
                continue
            replaced = strategy.replaced_sums(phase, layer)
            for key, (shape, dtype) in outputs[name].items():
                if owner[name] == rank:
                    tensor = on_device[name][key].contiguous()
                else:  # received into the storage of the sum it replaces (K-FAC's bases), as the owner wrote it
                    target = on_device[name].pop(replaced[key]) if key in replaced else None
                    if (target is not None and tuple(target.shape) == tuple(shape) and target.dtype == dtype
                            and target.is_contiguous()):
                        tensor = target
                    else:
                        tensor = torch.empty(shape, dtype=dtype, device=device)
                torch.distributed.broadcast(tensor, src=owner[name])
                on_device[name][key] = tensor
    for name in list(on_device):
        factors.tensors[name] = {k: v.cpu() for k, v in on_device.pop(name).items()}
    elapsed = time.perf_counter() - started
    if any(outputs.values()) and elapsed >= SLOW_FINISH_SECONDS:
        log.info("%s pass: %d layers finished in %.1f s", phase, len(layers), elapsed)


def _deal_layers(outputs: dict[str, dict[str, tuple[tuple[int, ...], torch.dtype]]], world: int) -> dict[str, int]:
    """Each layer's owning rank: largest eigendecomposition first, to the least loaded rank."""
    def cost(name):  # cubic in the block size: the sum over matrices of (blocks x block^3)
        return sum(math.prod(shape) * shape[-1] for shape, _ in outputs[name].values() if len(shape) >= 2)

    load = [0] * world
    owner = {}
    for name in sorted(outputs, key=lambda n: (-cost(n), n)):
        rank = min(range(world), key=lambda r: (load[r], r))
        owner[name] = rank
        load[rank] += cost(name)
    return owner


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
    from lightning_influence.options import _positive_int_or_none  # the FitOptions check, for direct run_phase calls

    _positive_int_or_none("max_batches", max_batches)
    _positive_int_or_none("max_examples", max_examples)


def check_stats_dtype(stats_dtype: torch.dtype) -> None:
    if stats_dtype not in STATS_DTYPES:
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
                 dtype: torch.dtype, block_size: int | None = DEFAULT_BLOCK_SIZE,
                 block_threshold: int | None = DEFAULT_BLOCK_THRESHOLD,
                 eigh_dtype: torch.dtype | str = DEFAULT_EIGH_DTYPE) -> dict:
    """What a factor fit depends on, as saved in the factors' bundle and compared on resume:
    the model's weights, the data, and every option that changes the statistics (the strategy's
    own options too: the block layout and the eigendecomposition dtype of K-FAC and EK-FAC)."""
    strategy_options = get_strategy(strategy, block_size=block_size, block_threshold=block_threshold,
                                    eigh_dtype=eigh_dtype).options()
    return {
        "weights": weights_fingerprint(model),
        "data": data_fingerprint(batches),
        "options": {
            "strategy": strategy, "fisher": fisher, "modules": sorted(layers),
            "max_batches": max_batches, "max_examples": max_examples, "seed": seed,
            "stats_dtype": str(stats_dtype).removeprefix("torch."), "capture_dtype": str(dtype).removeprefix("torch."),
            **strategy_options,
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
    ``exclude=``, ``fisher=``, ``damping=``, ``damping_factor=``, ``max_batches=``, ``max_examples=``,
    ``seed=``, ``capture_dtype=``, ``stats_dtype=``, ``block_size=``, ``block_threshold=``,
    ``eigh_dtype=``, ``memory_budget=``). ``batches`` is iterated once per pass of
    the strategy (twice for ``ekfac``), so pass a re-iterable such as a ``DataLoader``. With
    ``output_dir`` the factors are saved after each phase; passing partially fitted ``factors``
    resumes after their last completed phase. An empty ``batches`` (on every rank) raises before
    any factors are marked complete.
    ``block_size``/``block_threshold``: K-FAC and EK-FAC keep sides wider than ``block_threshold``
    (default 8192) as diagonal blocks of ``block_size`` (default 1024; ``None``: always dense),
    docs/method.md, section 6.

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
    block_size, block_threshold, eigh_dtype = options.block_size, options.block_threshold, options.eigh_dtype
    if factors is None:
        layers = find_tracked_layers(model, modules, module_types, options.exclude)
        factors = InfluenceFactors(strategy, layers, fisher=fisher, damping=damping, damping_factor=damping_factor,
                                   metadata={"identity": fit_identity(model, batches, layers, strategy, fisher,
                                                                      max_batches, max_examples, seed,
                                                                      stats_dtype, dtype, block_size,
                                                                      block_threshold, eigh_dtype)},
                                   block_size=block_size, block_threshold=block_threshold, eigh_dtype=eigh_dtype)
    else:
        _check_resumable(factors, model)
        # Resuming continues the factors' own strategy, fisher and modules; the rest must match.
        identity = fit_identity(model, batches, factors.layers, factors.strategy, factors.fisher, max_batches,
                                max_examples, seed, stats_dtype, dtype, block_size, block_threshold, eigh_dtype)
        saved = factors.metadata.get("identity")
        diffs = identity_differences(saved, identity) if saved is not None else {}
        if diffs and not factors.is_complete:
            warnings.warn(f"[lightning-influence] not resuming the factors passed: they were fitted from other "
                          f"weights, data or options ({describe_differences(diffs)}); fitting from scratch")
            factors = InfluenceFactors(factors.strategy, factors.layers, fisher=factors.fisher,
                                       damping=factors.damping, damping_factor=factors.damping_factor,
                                       metadata={**factors.metadata, "identity": identity},
                                       block_size=block_size, block_threshold=block_threshold,
                                       eigh_dtype=eigh_dtype)
        elif saved is None and not factors.is_complete:
            factors.metadata["identity"] = identity
    if remaining_phases(factors):  # the memory plan, before any pass allocates (memory_budget=)
        check_fit_memory(model, task, factors, batches, options, device,
                         offload=output_dir is not None and not _distributed())
    for phase in remaining_phases(factors):
        run_phase(phase, factors, model, task, batches, device=device, dtype=dtype,
                  max_batches=max_batches, max_examples=max_examples, seed=seed, stats_dtype=stats_dtype)
        if output_dir is not None and _rank() == 0:
            factors.save(output_dir)
    if output_dir is not None and _rank() == 0 and not factors.curvature.passes:
        factors.save(output_dir)  # complete without a pass (identity): saved once all the same
    return factors
