"""A memory plan for the statistics passes and scoring, made before anything is allocated.

From the tracked layers and the options alone (no tensor is created), :func:`plan_memory` gives
the bytes each phase holds on the device that holds it: the statistics being summed, the
eigenbases, the eigenvalues (K-FAC) or Lambda (EK-FAC), and the largest per-batch working set
of our own tensors (captured tokens, per-example gradients in the eigenbasis). The training
run's own activations are not ours and are not counted: the plan is what influence adds.
:meth:`MemoryPlan.check` compares the peak with a budget and refuses, naming the layers that
dominate and the options that would fit, before the first training step.
"""

from __future__ import annotations

import gc
import logging
import math
import os
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Mapping

import torch
from torch import nn

from lightning_influence.capture import TrackedLayer, per_example_chunk
from lightning_influence.curvature import get_strategy
from lightning_influence.curvature.base import CurvatureStrategy
from lightning_influence.errors import InfluenceError

log = logging.getLogger(__name__)

__all__ = ["MemoryPlan", "PhaseMemory", "MemoryBudgetError", "plan_memory", "fit_memory_plan", "measure_batch", "first_batch", "release_freed_memory",
           "default_budget", "resolve_budget", "parse_bytes", "format_bytes"]


class MemoryBudgetError(InfluenceError):
    """The planned memory of the influence passes exceeds the budget."""


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def parse_bytes(value: int | float | str) -> int:
    """``8_000_000_000``, ``"8GB"``, ``"7.5GiB"``, ``"512MiB"`` -> bytes."""
    if isinstance(value, bool):
        raise ValueError(f"a memory budget must be a number of bytes or a string like '8GiB', got {value!r}")
    if isinstance(value, (int, float)):
        if value <= 0:
            raise ValueError(f"a memory budget must be positive, got {value!r}")
        return int(value)
    text = str(value).strip().replace(" ", "")
    units = {"tib": 1024**4, "gib": 1024**3, "mib": 1024**2, "kib": 1024, "tb": 10**12, "gb": 10**9, "mb": 10**6,
             "kb": 10**3, "b": 1}
    for unit, scale in units.items():
        if text.lower().endswith(unit):
            number = text[: -len(unit)]
            break
    else:
        number, scale = text, 1
    try:
        out = int(float(number) * scale)
    except ValueError:
        raise ValueError(f"cannot read the memory budget {value!r}; write e.g. 8GiB, 512MiB or a number of bytes") from None
    if out <= 0:
        raise ValueError(f"a memory budget must be positive, got {value!r}")
    return out


def default_budget(device: torch.device | str, margin: float = 0.9) -> int:
    """What ``device`` can hold now, with a margin: free GPU memory, or the host's available memory."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * margin)
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return int(info["MemAvailable"] * margin)
    except (OSError, KeyError, ValueError, IndexError):
        pages = os.sysconf("SC_AVPHYS_PAGES") if hasattr(os, "sysconf") else 0
        return int(pages * os.sysconf("SC_PAGE_SIZE") * margin) if pages else 1 << 62


@dataclass
class PhaseMemory:
    """One phase of the plan: what it holds on its device, in bytes."""

    phase: str
    device: str
    parts: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.parts.values())


@dataclass
class LayerMemory:
    name: str
    d_out: int
    d_in: int
    statistics: int  # bytes of the layer's saved factors
    sides: str  # "dense" or e.g. "S 50x1024"


@dataclass
class MemoryPlan:
    """The plan: per phase (device, bytes by part), per layer, and the share of the model that is tracked."""

    phases: list[PhaseMemory]
    layers: list[LayerMemory]
    tracked_parameters: int
    model_parameters: int | None
    options: dict
    # What scoring adds per query it holds (preconditioned gradients in the score dtype): at full rank and at
    # query_rank=32; the scoring phase counts the queries it was planned for, usually none at fit time.
    per_query: dict[str, int] = field(default_factory=dict)

    @property
    def peak(self) -> PhaseMemory:
        return max(self.phases, key=lambda p: p.total)

    @property
    def factor_file_bytes(self) -> int:
        return sum(l.statistics for l in self.layers)

    def table(self) -> str:
        """The plan as the log table: one line per phase, then the largest layers."""
        share = (f" ({100 * self.tracked_parameters / self.model_parameters:.1f}% of the model's "
                 f"{self.model_parameters:,} parameters)") if self.model_parameters else ""
        lines = [f"influence memory plan: {len(self.layers)} layers, {self.tracked_parameters:,} tracked parameters"
                 f"{share}; factor files {format_bytes(self.factor_file_bytes)}"]
        width = max(len(p.phase) for p in self.phases)
        for p in self.phases:
            parts = ", ".join(f"{k} {format_bytes(v)}" for k, v in p.parts.items() if v)
            lines.append(f"  {p.phase:<{width}}  {p.device:<6} {format_bytes(p.total):>11}  ({parts or 'nothing'})")
        if self.per_query:
            lines.append("  scoring adds per query: " + ", ".join(f"{format_bytes(v)} at {k}"
                                                              for k, v in self.per_query.items()))
        for l in sorted(self.layers, key=lambda l: -l.statistics)[:5]:
            lines.append(f"  layer {l.name} {l.d_out}x{l.d_in} ({l.sides}): {format_bytes(l.statistics)} of factors")
        return "\n".join(lines)

    def check(self, budget: int, where: str = "") -> None:
        """Raise :class:`MemoryBudgetError` when the peak phase exceeds ``budget`` bytes."""
        peak = self.peak
        if peak.total <= budget:
            return
        biggest = sorted(self.layers, key=lambda l: -l.statistics)[:3]
        names = ", ".join(f"'{l.name}' ({l.d_out}x{l.d_in}, {format_bytes(l.statistics)})" for l in biggest)
        hints = ["track fewer layers (modules='mlp', or exclude=[...] the widest)",
                 "keep wide sides as blocks (block_size=1024 or smaller)"]
        if self.options.get("stats_dtype") == "float64":
            hints.append("stats_dtype='float32' (half the statistics)")
        if self.options.get("batch_size", 1) > 1:
            hints.append("a smaller batch size for the influence passes")
        raise MemoryBudgetError(
            f"the influence passes would need {format_bytes(peak.total)} in their '{peak.phase}' phase on "
            f"{peak.device}{where}, over the budget of {format_bytes(budget)}. The largest layers: {names}. "
            f"Options that shrink it: {'; '.join(hints)}; or raise memory_budget=. Plan:\n{self.table()}"
        )


def _itemsize(dtype: torch.dtype | str) -> int:
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."))
    return torch.empty((), dtype=dtype).element_size()


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def _bytes(shapes: Mapping[str, tuple[int, ...]], itemsize: int) -> int:
    """Bytes of named tensors of ``shapes``; scalar counts are float64 whatever the dtype of the sums."""
    return sum(_numel(shape) * itemsize if shape else 8 for shape in shapes.values())


def plan_memory(
    layers: Mapping[str, TrackedLayer],
    strategy: str | CurvatureStrategy,
    *,
    batch_size: int,
    tokens_per_example: int | Mapping[str, int],
    stats_dtype: torch.dtype | str = torch.float64,
    capture_dtype: torch.dtype | str = torch.float32,
    score_dtype: torch.dtype | str = torch.float32,
    num_queries: int = 0,
    query_rank: int | None = None,
    device: torch.device | str = "cpu",
    model_parameters: int | None = None,
    activations: int = 0,
    offload: bool = False,
) -> MemoryPlan:
    """Bytes each phase holds on ``device`` for ``strategy`` over ``layers`` (nothing is allocated).

    Every size comes from the strategy object: the sums each pass accumulates
    (:meth:`~lightning_influence.curvature.base.CurvatureStrategy.statistics`), the tensors its
    ``finish_pass`` adds (:meth:`~lightning_influence.curvature.base.CurvatureStrategy.factor_shapes`,
    e.g. K-FAC's eigenbases and eigenvalues) and the tensors scoring keeps (``scoring_tensors``),
    so a strategy with other shapes (block-diagonal sides, docs/method.md, section 6) is planned
    by what it declares. A pass holds the factors of earlier passes, its own sums (one copy, in
    ``stats_dtype``), what it reads from earlier passes in ``capture_dtype`` (the bases) and one
    batch's working set; the step after a pass that adds tensors (the eigendecomposition) holds
    the sums, the new tensors and one layer's ``eigh`` at a time, in the strategy's ``eigh_dtype``.

    ``tokens_per_example``: token positions per example, one number or per layer (a Conv2d's
    output positions); 0 leaves the batch working set out (batch shape unknown).
    ``activations``: the bytes autograd saves for one batch's backward (the model's own activations,
    :func:`measure_batch`), held by every pass and by scoring beside the influence tensors.
    ``offload``: the factors of earlier passes are saved and leave memory while a later pass runs
    (``fit_factors`` with ``output_dir``, the callback); they are read back after its last batch
    (the phase ``<pass> end``, beside the pass's sums).
    """
    if isinstance(strategy, str):
        strategy = get_strategy(strategy)
    st, cd, sd = _itemsize(stats_dtype), _itemsize(capture_dtype), _itemsize(score_dtype)
    eigh_size = _itemsize(getattr(strategy, "eigh_dtype", torch.float64))
    dev = str(torch.device(device))

    def tokens(name: str) -> int:
        t = tokens_per_example.get(name, 0) if isinstance(tokens_per_example, Mapping) else tokens_per_example
        return batch_size * int(t)

    def token_bytes(l: TrackedLayer, itemsize: int) -> int:  # one batch's captured a [B, T, d_in] and s [B, T, d_out]
        return tokens(l.name) * (l.d_in + l.d_out) * itemsize

    def per_example(l: TrackedLayer, shapes: Mapping[str, tuple[int, ...]], itemsize: int) -> int:
        # A per-parameter sum (shape d_out x d_in) is a sum over per-example gradients, formed a few examples at
        # a time (capture.squared_per_example_sum), plus the batch's rotated tokens (EK-FAC rotates them first).
        if l.shape not in map(tuple, shapes.values()):
            return 0
        return (per_example_chunk(batch_size, l.d_out, l.d_in) * l.d_out * l.d_in + tokens(l.name) * (l.d_out + l.d_in)
                ) * itemsize

    kept: dict[str, dict[str, tuple[int, ...]]] = {name: {} for name in layers}  # what earlier passes left
    phases: list[PhaseMemory] = []
    for index, spec in enumerate(strategy.passes):
        sums = {n: strategy.statistics(spec.name, l) for n, l in layers.items()}
        earlier = sum(_bytes(kept[n], st) for n in layers)
        # What the updates read from earlier passes (the bases), moved once into the capture dtype.
        inputs = sum(_bytes({k: v for k, v in kept[n].items() if k in strategy.scoring_tensors}, cd)
                     for n in layers) if index else 0
        if spec.forward_side:  # each layer's tokens are summed as soon as they exist, then dropped
            working = max((token_bytes(l, cd) + _bytes(sums[n], cd) for n, l in layers.items()), default=0)
        else:  # every layer's activations wait for the backward; updates run one layer at a time
            working = sum(tokens(n) * l.d_in * cd for n, l in layers.items()) + max(
                (tokens(n) * l.d_out * cd + per_example(l, sums[n], cd) + _bytes(sums[n], cd)
                 for n, l in layers.items()), default=0)
        offloaded = offload and index > 0 and earlier > 0
        phases.append(PhaseMemory(f"{spec.name} pass", dev, {
            "earlier factors": 0 if offloaded else earlier, "sums": sum(_bytes(s, st) for s in sums.values()),
            "pass inputs": inputs, "model activations": activations, "batch working set": working}))
        if offloaded:
            phases.append(PhaseMemory(f"{spec.name} end", dev, {
                "earlier factors": earlier, "sums": sum(_bytes(s, st) for s in sums.values())}))
        added = {n: strategy.factor_shapes(spec.name, l) for n, l in layers.items()}
        # Tensors written into the storage of the sums they replace (K-FAC's eigenbases) take no new memory.
        replaced = {n: strategy.replaced_sums(spec.name, l) for n, l in layers.items()}
        if any(added.values()):
            # eigh of the largest matrix, in the strategy's eigh dtype: its input, eigenvectors and workspace
            largest = max((_numel(shape[-2:]) for a in added.values() for shape in a.values() if len(shape) >= 2),
                          default=0)
            phases.append(PhaseMemory(f"{spec.name} finish", dev, {
                "earlier factors": earlier, "sums": sum(_bytes(s, st) for s in sums.values()),
                "new factors": sum(_bytes({k: v for k, v in added[n].items() if k not in replaced[n]}, st)
                                   for n in layers),
                "one layer's eigh": 3 * largest * eigh_size}))
        for n, l in layers.items():
            kept[n].update(strategy.kept_shapes(spec.name, l))

    per_layer = []
    score_factors = score_queries = score_working = 0
    for n, l in layers.items():
        grad = l.d_out * l.d_in
        # What scoring keeps per layer: the inverse eigenvalues and the bases, in the score dtype.
        basis = _bytes({k: v for k, v in kept[n].items() if k in strategy.scoring_tensors}, sd)
        score_factors += (grad * sd if strategy.passes else 0) + basis
        score_queries += num_queries * (grad if query_rank is None else min(query_rank, l.d_out, l.d_in)
                                        * (l.d_out + l.d_in)) * sd
        score_working = max(score_working, 2 * token_bytes(l, sd) + batch_size * grad * sd)
        sums = {k: v for k, v in kept[n].items()}
        per_layer.append(LayerMemory(n, l.d_out, l.d_in, _bytes(sums, st), _describe_shapes(l, sums)))
    phases.append(PhaseMemory("scoring", dev, {"factors (score dtype)": score_factors, "queries": score_queries,
                                               "model activations": activations,
                                               "batch working set": score_working}))
    return MemoryPlan(
        phases=phases,
        layers=per_layer,
        tracked_parameters=sum(l.d_out * l.d_in for l in layers.values()),
        model_parameters=model_parameters,
        options={"strategy": strategy.name, "stats_dtype": str(stats_dtype).replace("torch.", ""),
                 "batch_size": batch_size, "block_size": getattr(strategy, "block_size", None)},
        per_query={"full rank": sum(l.d_out * l.d_in for l in layers.values()) * sd,
                   "query_rank=32": sum(min(32, l.d_out, l.d_in) * (l.d_out + l.d_in) for l in layers.values()) * sd},
    )


def _describe_shapes(layer: TrackedLayer, shapes: Mapping[str, tuple[int, ...]]) -> str:
    """``dense``, or the blocked sides of a layer (a 3-d matrix ``[k, b, b]`` is ``k`` blocks of ``b``)."""
    blocked = list(dict.fromkeys(f"{key.split('_')[0]} {shape[0]}x{shape[1]}" for key, shape in shapes.items()
                                 if len(shape) == 3 and key.endswith(("_sum", "_eigvecs"))))
    return ", ".join(blocked) if blocked else "dense"


def release_freed_memory() -> bool:
    """Hand the C allocator's freed heap memory back to the system (glibc's ``malloc_trim``); False where there is
    none. A pass frees a batch's activations and temporaries thousands of times; glibc keeps most of what is
    freed for reuse, so without this the memory of the passes' batches stays resident through the
    eigendecompositions and the next pass (on GPT-2 small, gigabytes the plan rightly does not count).
    What only a reference cycle still holds is collected first, in a single process: under a process group a
    collection here sometimes aborted a gloo rank ("terminate called without an active exception", the 2-process
    empty-shard test), and the passes break their own cycles anyway."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        gc.collect()
    return trim_heap()


def trim_heap() -> bool:
    """``malloc_trim`` alone (no garbage collection): cheap enough to call once per layer of a backward."""
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util
        import platform

        _LIBC = False
        if platform.system() == "Linux":
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                _LIBC = libc if hasattr(libc, "malloc_trim") else False
            except OSError:
                pass
    if not _LIBC:
        return False
    _LIBC.malloc_trim(0)
    return True


_LIBC = None


# ---------------------------------------------------------------- the batch shape, from one batch
def measure_batch(model: nn.Module, task: Any, layers: Mapping[str, TrackedLayer], batch: Any,
                  forward_context: Callable[[], ContextManager] | None = None
                  ) -> tuple[int, dict[str, int], Any, int]:
    """Run the task's loss on ``batch`` once (no backward, no step) and count each tracked layer's token positions
    and the bytes autograd keeps for the backward.

    Returns ``(batch_size, tokens per example by layer, loss, activation bytes)``. A layer's positions
    are its output's elements per example over ``d_out`` (``[B, T, d_out]``: ``T``; a Conv2d's
    ``[B, C, H, W]``: ``H*W``). The activation bytes are the distinct storages the forward saves for
    its backward (``torch.autograd.graph.saved_tensors_hooks``), parameters excepted: what every
    pass holds per batch beside the influence tensors. Under inference mode (no graph can be built)
    they are 0. The caller forks the RNG and sets the model's mode.
    """
    batch_size = task.batch_size(batch)
    seen: dict[str, int] = {}

    def hook(name: str, layer: TrackedLayer):
        def record(module, inputs, output):
            if torch.is_tensor(output) and batch_size:
                seen[name] = max(seen.get(name, 0), output.numel() // (batch_size * layer.d_out))
        return record

    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # a tensor without storage (a functional wrapper)
            return t
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        # Not `t` itself: a saved output handed back as it is holds its own grad_fn, a cycle through the graph
        # that Python's collector cannot see, and the whole forward's activations would never be freed.
        return t.detach()

    grad = not torch.is_inference_mode_enabled()
    handles = [model.get_submodule(n).register_forward_hook(hook(n, l)) for n, l in layers.items()]
    try:
        with torch.set_grad_enabled(grad), (torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t) if grad
                                            else nullcontext()), \
                (forward_context() if forward_context is not None else nullcontext()):
            loss = task.train_loss(model, batch, sample=False)
    finally:
        for h in handles:
            h.remove()
    if torch.is_tensor(loss):
        loss = loss.detach()  # the graph (and what it saved) goes now
    return batch_size, seen, loss, sum(saved.values())


def first_batch(batches: Any) -> Any | None:
    """One batch of ``batches`` for the plan's batch shape, drawn without touching the passes' iteration.

    A list or tuple gives its first item; a ``DataLoader`` over a map-style dataset gives its first
    ``batch_size`` examples through its ``collate_fn`` (no sampler, no workers). Anything else (an
    iterator, an iterable dataset, a custom re-iterable) gives ``None``: drawing from it could cost a
    pass's worth of setup or be seen by the caller (``max_batches`` promises no extra batch).
    """
    if isinstance(batches, (list, tuple)):
        return batches[0] if batches else None
    from torch.utils.data import DataLoader, IterableDataset

    if isinstance(batches, DataLoader) and not isinstance(batches.dataset, IterableDataset):
        try:
            n = min(batches.batch_size or 1, len(batches.dataset))
        except TypeError:
            return None
        return batches.collate_fn([batches.dataset[i] for i in range(n)]) if n else None
    return None


def fit_memory_plan(model: nn.Module, task: Any, layers: Mapping[str, TrackedLayer],
                    strategy: str | CurvatureStrategy, batches: Any, *, stats_dtype: torch.dtype,
                    capture_dtype: torch.dtype, device: torch.device | str, offload: bool = False) -> MemoryPlan:
    """The plan of an in-process fit (``fit_factors``): the batch shape from :func:`first_batch`
    (``offload``: see :func:`plan_memory`; ``fit_factors`` offloads when it saves, in one process).

    Without a batch (an iterator), the plan leaves the batch working set out.
    """
    batch_size, tokens, activations = 0, {}, 0
    from lightning.fabric.utilities.apply_func import move_data_to_device  # lazy: importing Lightning is slow

    from lightning_influence.capture import model_mode

    devices = [torch.device(device)] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # a dataset's __getitem__ may draw random numbers
        batch = first_batch(batches)
        if batch is not None:
            with model_mode(model, train=False):
                batch_size, tokens, _, activations = measure_batch(model, task, layers,
                                                                   move_data_to_device(batch, device))
    if batch is None:
        log.info("memory plan without the batch working set: %s cannot be peeked without drawing a batch",
                 type(batches).__name__)
    return plan_memory(layers, strategy, batch_size=batch_size, tokens_per_example=tokens, stats_dtype=stats_dtype,
                       capture_dtype=capture_dtype, device=device, activations=activations, offload=offload,
                       model_parameters=sum(p.numel() for p in model.parameters()))


def resolve_budget(budget: int | str | None, device: torch.device | str) -> int:
    """``memory_budget=`` in bytes: as given (``8_000_000_000``, ``"8GiB"``), or :func:`default_budget`."""
    return default_budget(device) if budget is None else parse_bytes(budget)


def check_fit_memory(model: nn.Module, task: Any, factors: Any, batches: Any, options: Any,
                     device: torch.device | str | None = None, offload: bool = False) -> MemoryPlan:
    """``fit_factors``' plan before its first pass: logged as one table, refused over ``options.memory_budget``.

    ``factors``: the :class:`~lightning_influence.factors.InfluenceFactors` about to be fitted;
    ``options``: the fit's :class:`~lightning_influence.options.FitOptions`. Raises
    :class:`MemoryBudgetError` naming the largest layers and the options that would fit.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    plan = fit_memory_plan(model, task, factors.layers, factors.curvature, batches, stats_dtype=options.stats_dtype,
                           capture_dtype=options.capture_dtype, device=device, offload=offload)
    log.info("%s", plan.table())
    plan.check(resolve_budget(options.memory_budget, device), where=" (fit_factors)")
    return plan
