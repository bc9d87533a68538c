"""The fitted factors of every tracked layer: a container that delegates the math to its strategy.

:class:`InfluenceFactors` holds the tracked layers, each layer's named tensors (sums,
counts, eigenbases), the phase reached, the damping settings, and the strategy object
(``lightning_influence.curvature``) that knows what the tensors mean: its passes, its
eigenvalues and damping heuristic, and how it preconditions (docs/method.md, sections 2-4).

Every statistic is stored as a sum plus a count, so that it reduces across ranks with one
all-reduce and a run can resume after each phase.

Files: one bundle of the persistence layer (``store.py``): ``<dir>/manifest.json`` names the
tensor file it goes with (``factors-<id>.safetensors``), its checksum, and the factors'
identity (the weights, data and options they were fitted from); a save writes the new tensor
file first and then atomically replaces the manifest, so a process killed mid-save leaves the
previous pair loadable.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from lightning_influence.store import BundleFormat, new_tensor_name, read_bundle, write_bundle
from lightning_influence.capture import TrackedLayer
from lightning_influence.curvature import get_strategy, strategy_class
from lightning_influence.curvature.base import COMPLETE, DEFAULT_DAMPING_FACTOR
from lightning_influence.curvature.blocks import DEFAULT_BLOCK_SIZE, DEFAULT_BLOCK_THRESHOLD
from lightning_influence.errors import FactorsError, OptionsError

__all__ = ["InfluenceFactors", "FISHER_TYPES", "check_strategy", "check_fisher", "check_damping"]

FISHER_TYPES = ("sampled", "empirical")
FORMAT_NAME = "lightning-influence-factors"
FORMAT_VERSION = 3  # 2: the store's bundle layout (files, identity); 3: block-diagonal sides (block_size, ...)
_MANIFEST_KEYS = ("tensor_file", "strategy", "fisher", "damping", "damping_factor", "phase", "modules",
                  "block_size", "block_threshold")
FACTORS_FORMAT = BundleFormat(
    FORMAT_NAME, FORMAT_VERSION, FactorsError, "factors", prefix="factors",
    make="Fit them first (InfluenceCallback or fit_factors) or point to the callback's output_dir.",
    redo="refit the factors", dir_what="output directory", dir_fix="choose another output_dir",
)


def check_strategy(strategy: str) -> str:
    """``strategy`` if it is a registered strategy name; ``UnknownStrategyError`` listing the names otherwise."""
    strategy_class(strategy)
    return strategy


def check_fisher(fisher: str) -> str:
    if fisher not in FISHER_TYPES:
        raise FactorsError(
            f"unknown fisher '{fisher}'; choose 'sampled' (labels drawn from the model, the paper's default) "
            "or 'empirical' (the dataset's labels)"
        )
    return fisher


def check_damping(damping: float | None, damping_factor: float | None = None) -> None:
    if damping is not None and (
        isinstance(damping, bool) or not isinstance(damping, (int, float)) or not 0 <= damping < float("inf")
    ):
        raise FactorsError(f"damping must be a non-negative number or None (heuristic), got {damping!r}")
    if damping_factor is not None and (
        isinstance(damping_factor, bool) or not isinstance(damping_factor, (int, float))
        or not 0 <= damping_factor < float("inf")
    ):
        raise FactorsError(f"damping_factor must be non-negative, got {damping_factor!r}")


class InfluenceFactors:
    """The fitted curvature of every tracked layer, and how to precondition with it.

    Args:
        strategy: a registered strategy name (``identity``, ``diagonal``, ``kfac``, ``ekfac``, or one added
            with :func:`lightning_influence.curvature.register_strategy`).
        layers: tracked layers by module name (their matrix shapes).
        fisher: ``sampled`` or ``empirical``, recorded for the manifest.
        damping: absolute damping lambda for every layer, or ``None`` for the paper's
            heuristic ``damping_factor * mean(eigenvalues)`` per layer.
        damping_factor: the heuristic's factor (``None``: the paper's 0.1, ``curvature.base.DEFAULT_DAMPING_FACTOR``).
        tensors: per module, the named statistic tensors (sums, counts, eigenbases).
        phase: the last completed phase (one of ``self.curvature.phases``; default: nothing fitted yet).
        block_size / block_threshold: Kronecker sides (K-FAC, EK-FAC) wider than ``block_threshold`` are kept
            as diagonal blocks of ``block_size`` (docs/method.md, section 6); ``block_size=None`` keeps every
            side dense, ``block_threshold=None`` blocks every side wider than ``block_size``. Defaults: blocks
            of 2048 for sides wider than 8192 (a 50257-wide head fits; GPT-2's and Llama's MLPs stay dense).

    Attributes:
        strategy: the strategy's name.
        curvature: the strategy object (:class:`~lightning_influence.curvature.base.CurvatureStrategy`).
    """

    def __init__(
        self,
        strategy: str,
        layers: dict[str, TrackedLayer],
        fisher: str = "sampled",
        damping: float | None = None,
        damping_factor: float | None = None,
        tensors: dict[str, dict[str, torch.Tensor]] | None = None,
        phase: str | None = None,
        metadata: dict | None = None,
        block_size: int | None = DEFAULT_BLOCK_SIZE,
        block_threshold: int | None = DEFAULT_BLOCK_THRESHOLD,
    ):
        self.curvature = get_strategy(strategy, block_size=block_size, block_threshold=block_threshold)
        self.block_size, self.block_threshold = block_size, block_threshold
        self.strategy = self.curvature.name
        self.fisher = check_fisher(fisher)
        check_damping(damping, damping_factor)
        self.layers = dict(layers)
        self.damping = None if damping is None else float(damping)
        self.damping_factor = DEFAULT_DAMPING_FACTOR if damping_factor is None else float(damping_factor)
        self.tensors = {name: dict(tensors.get(name, {})) if tensors else {} for name in self.layers}
        self.phase = self.curvature.check_phase(self.curvature.initial_phase if phase is None else phase)
        self.metadata = dict(metadata or {})
        self._cache: dict = {}

    # ----------------------------------------------------------------- state
    @property
    def is_complete(self) -> bool:
        return self.phase == COMPLETE

    def phase_done(self, phase: str) -> bool:
        """Whether ``phase`` (or a later phase of the strategy) has been reached."""
        return self.curvature.phase_reached(self.phase, phase)

    def set_phase(self, phase: str) -> None:
        self.phase = self.curvature.check_phase(phase)
        self._cache.clear()

    def require_complete(self) -> None:
        if not self.is_complete:
            raise FactorsError(
                f"the {self.strategy} factors are unfinished (last completed phase: '{self.phase}'). "
                "Run the statistics pass to completion first (InfluenceCallback.fit_factors or fit_factors())."
            )

    # -------------------------------------------------------- eigenvalues
    def eigenvalues(self, name: str) -> torch.Tensor:
        """``[d_out, d_in]`` curvature eigenvalues of a layer in its preconditioning basis (statistics dtype)."""
        return self.curvature.eigenvalues(self.layers[name], self.tensors[name])

    def damping_for(self, name: str) -> float:
        """The damping lambda used for a layer (absolute, or the heuristic; 0 for ``identity``)."""
        return self.curvature.damping(self.layers[name], self.tensors[name], self.damping, self.damping_factor)

    def _prepared(self, name: str, device: torch.device, dtype: torch.dtype):
        key = (name, str(device), dtype)
        if key not in self._cache:
            self.require_complete()
            self._cache[key] = self.curvature.prepare(self.layers[name], self.tensors[name], self.damping_for(name),
                                                      device, dtype)
        return self._cache[key]

    def precondition(self, name: str, grads: torch.Tensor) -> torch.Tensor:
        """``(G + lambda I)^-1 V`` for gradients ``V`` of shape ``[..., d_out, d_in]``."""
        return self.curvature.precondition(self._prepared(name, grads.device, grads.dtype), grads)

    def inverse_quadratic(self, name: str, grads: torch.Tensor) -> torch.Tensor:
        """``V^T (G + lambda I)^-1 V`` per leading index, for ``V`` of shape ``[B, d_out, d_in]``."""
        return self.curvature.inverse_quadratic(self._prepared(name, grads.device, grads.dtype), grads)

    def precondition_tokens(self, name: str, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """:meth:`precondition` of the per-example gradients ``sum_t s_t a_t^T`` of tokens ``a`` ``[B, T, d_in]``
        and ``s`` ``[B, T, d_out]``, rotating the tokens into the eigenbasis first where that is cheaper."""
        return self.curvature.precondition_tokens(self._prepared(name, a.device, a.dtype), a, s)

    def inverse_quadratic_tokens(self, name: str, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """:meth:`inverse_quadratic` of the per-example gradients of tokens ``a``, ``s`` (self-influence)."""
        return self.curvature.inverse_quadratic_tokens(self._prepared(name, a.device, a.dtype), a, s)

    def dense_matrix(self, name: str) -> torch.Tensor:
        """The layer's curvature as an explicit ``(d_out*d_in)^2`` float64 matrix (row-major vec).

        Only for tests and small layers: it is what the preconditioner inverts (without damping).
        """
        return self.curvature.dense_matrix(self.layers[name], self.tensors[name])

    # --------------------------------------------------------- checking
    def check_model(self, layers: dict[str, TrackedLayer]) -> None:
        """Raise :class:`FactorsError` unless ``layers`` are exactly the layers these factors are for."""
        mine, theirs = set(self.layers), set(layers)
        if mine != theirs:
            missing, extra = sorted(mine - theirs), sorted(theirs - mine)
            raise FactorsError(
                "these factors were fitted on other modules than the ones tracked now"
                + (f"; in the factors only: {missing[:10]}" if missing else "")
                + (f"; tracked now only: {extra[:10]}" if extra else "")
                + ". Use the same `modules=` selection as when fitting, or refit the factors."
            )
        for name, layer in layers.items():
            if self.layers[name].shape != layer.shape or self.layers[name].kind != layer.kind:
                raise FactorsError(
                    f"module '{name}' is {layer.kind} {layer.shape} in the model but "
                    f"{self.layers[name].kind} {self.layers[name].shape} in the factors: they come from another "
                    "model. Refit the factors for this model."
                )

    # -------------------------------------------------------- persistence
    def manifest(self) -> dict:
        """The factors' own manifest fields (the store adds format, version, files and identity)."""
        metadata = {k: v for k, v in self.metadata.items() if k != "identity"}
        return {
            "strategy": self.strategy,
            "fisher": self.fisher,
            "damping": self.damping,
            "damping_factor": self.damping_factor,
            "phase": self.phase,
            "block_size": self.block_size,
            "block_threshold": self.block_threshold,
            "modules": {
                n: {"kind": l.kind, "d_out": l.d_out, "d_in": l.d_in, "has_bias": l.has_bias}
                for n, l in self.layers.items()
            },
            "counts": {
                n: {k: float(v) for k, v in t.items() if k.endswith("_count")} for n, t in self.tensors.items()
            },
            "metadata": metadata,
        }

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the factors as one bundle into ``directory`` (created if needed).

        The bundle's identity is ``metadata["identity"]`` (what the factors were fitted from:
        weights, data, options; see ``passes.fit_identity``). The previous save in the same
        directory stays loadable until the new manifest is in place.
        """
        directory = Path(directory)
        flat = {
            f"{name}::{key}": value
            for name, t in self.tensors.items()
            for key, value in t.items()
        }
        tensor_file = new_tensor_name(FACTORS_FORMAT)
        write_bundle(FACTORS_FORMAT, directory, {**self.manifest(), "tensor_file": tensor_file},
                     identity=self.metadata.get("identity"), tensors={tensor_file: flat})
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, map_location: str | torch.device = "cpu",
             identity: dict | None = None) -> "InfluenceFactors":
        """Load factors saved by :meth:`save`, verifying the format, version and checksum.

        With ``identity``, the saved identity must equal it (checked before any tensor is read);
        otherwise a :class:`FactorsError` whose ``differences`` name what differs is raised.
        """
        bundle = read_bundle(FACTORS_FORMAT, directory)
        manifest, manifest_path = bundle.manifest, bundle.manifest_path
        missing = [k for k in _MANIFEST_KEYS if k not in manifest]
        if missing:
            raise FactorsError(f"{manifest_path} is corrupt (missing entries: {missing}); refit the factors")
        if identity is not None:
            bundle.check_identity(identity, "were fitted from other weights, data or options")
        flat = bundle.tensors(manifest["tensor_file"], device=map_location)
        try:
            layers = {
                n: TrackedLayer(n, m["kind"], int(m["d_out"]), int(m["d_in"]), bool(m["has_bias"]))
                for n, m in manifest["modules"].items()
            }
        except (AttributeError, KeyError, TypeError, ValueError) as err:
            raise FactorsError(f"{manifest_path} is corrupt (module entry: {err!r}); refit the factors") from None
        tensors: dict[str, dict[str, torch.Tensor]] = {n: {} for n in layers}
        for key, value in flat.items():
            name, _, stat = key.rpartition("::")
            if name not in tensors:
                raise FactorsError(f"{manifest['tensor_file']} holds tensors of module '{name}' absent from the "
                                   "manifest; refit the factors")
            tensors[name][stat] = value
        metadata = dict(manifest.get("metadata") or {})
        if bundle.identity:
            metadata["identity"] = bundle.identity
        try:
            factors = cls(
                manifest["strategy"], layers, fisher=manifest["fisher"], damping=manifest["damping"],
                damping_factor=manifest["damping_factor"], tensors=tensors, phase=manifest["phase"],
                metadata=metadata, block_size=manifest["block_size"], block_threshold=manifest["block_threshold"],
            )
        except OptionsError as err:
            raise FactorsError(f"{manifest_path} is corrupt ({err}); refit the factors") from None
        factors._check_shapes(manifest_path)
        return factors

    def _check_shapes(self, where: Path) -> None:
        """Every saved sum has the shape its strategy and block layout declare (a manifest that does not go
        with its tensors would otherwise precondition with the wrong layout)."""
        for p in self.curvature.passes:
            if not self.phase_done(p.phase):
                break
            for name, layer in self.layers.items():
                for key, shape in self.curvature.statistics(p.name, layer).items():
                    value = self.tensors[name].get(key)
                    if value is None or tuple(value.shape) != tuple(shape):
                        got = "missing" if value is None else tuple(value.shape)
                        raise FactorsError(f"{where}: '{name}::{key}' is {got}, the {self.strategy} factors with "
                                           f"block_size={self.block_size}, block_threshold={self.block_threshold} "
                                           f"need {tuple(shape)}; the files are corrupt, refit the factors")

    def with_damping(self, damping: float | None, damping_factor: float | None = None) -> "InfluenceFactors":
        """A view of the same statistics with another damping (no copy of the tensors)."""
        return InfluenceFactors(
            self.strategy,
            self.layers,
            self.fisher,
            damping,
            self.damping_factor if damping_factor is None else damping_factor,
            self.tensors,
            self.phase,
            self.metadata,
            block_size=self.block_size,
            block_threshold=self.block_threshold,
        )

    def __repr__(self) -> str:
        return (
            f"InfluenceFactors(strategy={self.strategy!r}, fisher={self.fisher!r}, phase={self.phase!r}, "
            f"modules={len(self.layers)}, damping={self.damping!r}, block_size={self.block_size!r})"
        )


# ------------------------------------------------------------------ file helpers
