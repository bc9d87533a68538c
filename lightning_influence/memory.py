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

import os
from dataclasses import dataclass, field


import torch

from lightning_influence.capture import TrackedLayer
from lightning_influence.curvature.blocks import SideLayout
from lightning_influence.errors import InfluenceError

__all__ = ["MemoryPlan", "PhaseMemory", "MemoryBudgetError", "plan_memory", "default_budget", "parse_bytes",
           "format_bytes"]


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
    sides: str  # "dense" or e.g. "S 25x2048"


@dataclass
class MemoryPlan:
    """The plan: per phase (device, bytes by part), per layer, and the share of the model that is tracked."""

    phases: list[PhaseMemory]
    layers: list[LayerMemory]
    tracked_parameters: int
    model_parameters: int | None
    options: dict

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
        dtype = getattr(torch, dtype)
    return torch.empty((), dtype=dtype).element_size()


def plan_memory(
    layers: dict[str, TrackedLayer],
    strategy: str,
    *,
    batch_size: int,
    tokens_per_example: int,
    stats_dtype: torch.dtype | str = torch.float64,
    capture_dtype: torch.dtype | str = torch.float32,
    score_dtype: torch.dtype | str = torch.float32,
    block_size: int | None = None,
    block_threshold: int | None = None,
    num_queries: int = 0,
    query_rank: int | None = None,
    device: torch.device | str = "cpu",
    model_parameters: int | None = None,
) -> MemoryPlan:
    """Bytes each phase holds, per device, for ``strategy`` over ``layers`` (nothing is allocated).

    ``block_threshold``/``block_size``: sides wider than the threshold are kept as blocks of
    ``block_size`` (docs/method.md, section 6). Eigendecompositions run one layer at a time in
    float64 on ``device``; the statistics of every layer are held throughout a pass.
    """
    st, cd, sd = _itemsize(stats_dtype), _itemsize(capture_dtype), _itemsize(score_dtype)
    dev = str(torch.device(device))
    tokens = batch_size * tokens_per_example
    kron = strategy in ("kfac", "ekfac")

    def sides(l: TrackedLayer) -> tuple[SideLayout, SideLayout]:
        def side(d):
            blocked = block_size is not None and (block_threshold is None or d > block_threshold)
            return SideLayout(d, block_size if blocked else None)
        return side(l.d_out), side(l.d_in)

    per_layer, covariance, eigen, lam, diag = [], 0, 0, 0, 0
    biggest_eigh = worst_cov_tokens = worst_lambda = worst_score = 0
    for l in layers.values():
        s_side, a_side = sides(l)
        elems_cov = s_side.matrix_elements() + a_side.matrix_elements()
        grad = l.d_out * l.d_in
        stats = 0
        if kron:
            covariance += elems_cov * st
            eigen += elems_cov * st + (s_side.padded + a_side.padded) * st
            stats += 2 * elems_cov * st + (s_side.padded + a_side.padded) * st
            block_elems = max(s_side.block, a_side.block) ** 2
            biggest_eigh = max(biggest_eigh, 3 * block_elems * 8)  # float64 covariance, eigenvectors, workspace
            worst_cov_tokens = max(worst_cov_tokens, 2 * tokens * (l.d_in + l.d_out) * cd
                                   + (max(s_side.block, a_side.block) ** 2) * (cd + st))
        if strategy == "ekfac":
            lam += grad * st
            stats += grad * st
            # rotated tokens and the per-example gradient in the eigenbasis (squared in place)
            worst_lambda = max(worst_lambda, 2 * tokens * (l.d_in + l.d_out) * cd + batch_size * grad * cd)
        if strategy == "diagonal":
            diag += grad * st
            stats += grad * st
            worst_lambda = max(worst_lambda, 2 * tokens * (l.d_in + l.d_out) * cd + batch_size * grad * cd)
        q_bytes = num_queries * (grad if query_rank is None else min(query_rank, l.d_out, l.d_in) * (l.d_out + l.d_in))
        worst_score = max(worst_score, 2 * tokens * (l.d_in + l.d_out) * sd + batch_size * grad * sd)
        desc = "dense" if s_side.dense and a_side.dense else ", ".join(
            f"{n} {x.num_blocks}x{x.block}" for n, x in (("S", s_side), ("A", a_side)) if not x.dense)
        per_layer.append((LayerMemory(l.name, l.d_out, l.d_in, stats, desc), q_bytes, elems_cov, grad))

    phases = []
    if kron:
        phases.append(PhaseMemory("covariance pass", dev, {"covariance sums": covariance,
                                                           "batch working set": worst_cov_tokens}))
        phases.append(PhaseMemory("eigendecomposition", dev, {"covariance sums": covariance,
                                                              "eigenbases": eigen, "one layer's eigh": biggest_eigh}))
    if strategy == "ekfac":
        phases.append(PhaseMemory("eigenvalue correction", dev, {
            "eigenbases (capture dtype)": sum(e for *_, e, _ in per_layer) * cd,
            "Lambda sums": lam, "batch working set": worst_lambda}))
    if strategy == "diagonal":
        phases.append(PhaseMemory("diagonal pass", dev, {"diagonal sums": diag, "batch working set": worst_lambda}))
    factors_for_scoring = sum((e * sd if kron else 0) + g * sd for _, _, e, g in per_layer) if strategy != "identity" else 0
    phases.append(PhaseMemory("scoring", dev, {"factors (score dtype)": factors_for_scoring,
                                               "queries": sum(q for _, q, _, _ in per_layer) * sd,
                                               "batch working set": worst_score}))
    return MemoryPlan(
        phases=phases,
        layers=[p[0] for p in per_layer],
        tracked_parameters=sum(l.d_out * l.d_in for l in layers.values()),
        model_parameters=model_parameters,
        options={"strategy": strategy, "stats_dtype": str(stats_dtype).replace("torch.", ""),
                 "batch_size": batch_size, "block_size": block_size},
    )
