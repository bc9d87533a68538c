"""Curvature factors per tracked layer, their inverse-Hessian-vector products, and their files.

Strategies (``docs/method.md``, sections 2-4):

* ``identity``: no preconditioning; scores are plain gradient dot products.
* ``diagonal``: the diagonal of the (per-sequence) Fisher in the parameter basis.
* ``kfac``: ``G ~ A (x) S``, eigenvalues ``L_S[i] * L_A[j]`` in the Kronecker eigenbasis.
* ``ekfac``: the same eigenbasis with eigenvalues ``Lambda`` re-fitted from per-sequence
  pseudo-gradients.

Every statistic is stored as a float64 sum plus a count, so that it reduces across
ranks with one all-reduce and a run can resume after each phase.

Files: ``<dir>/manifest.json`` names the tensor file it goes with (``factors-<id>.safetensors``);
a save writes the new tensor file first and then atomically replaces the manifest, so a
process killed mid-save leaves the previous pair loadable.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lightning_influence.files import atomic_write_json, ensure_writable_dir, fsync_file, read_manifest, sha256_file
from lightning_influence import __version__
from lightning_influence.capture import TrackedLayer
from lightning_influence.errors import FactorsError

__all__ = ["InfluenceFactors", "STRATEGIES", "FISHER_TYPES", "PHASES_BY_STRATEGY"]

STRATEGIES = ("identity", "diagonal", "kfac", "ekfac")
FISHER_TYPES = ("sampled", "empirical")
FORMAT_NAME = "lightning-influence-factors"
FORMAT_VERSION = 1
_MANIFEST_KEYS = ("tensor_file", "sha256", "strategy", "fisher", "damping", "damping_factor", "phase", "modules")

# The phases each strategy goes through; the last one is "complete".
PHASES_BY_STRATEGY = {
    "identity": ("complete",),
    "diagonal": ("complete",),
    "kfac": ("complete",),
    "ekfac": ("eigen", "complete"),  # eigen: covariances and eigenbases done, Lambda not yet
}



def check_strategy(strategy: str) -> str:
    if strategy not in STRATEGIES:
        raise FactorsError(f"unknown strategy '{strategy}'; choose one of {', '.join(STRATEGIES)}")
    return strategy


def check_fisher(fisher: str) -> str:
    if fisher not in FISHER_TYPES:
        raise FactorsError(
            f"unknown fisher '{fisher}'; choose 'sampled' (labels drawn from the model, the paper's default) "
            "or 'empirical' (the dataset's labels)"
        )
    return fisher


def check_damping(damping: float | None, damping_factor: float) -> None:
    if damping is not None and (
        isinstance(damping, bool) or not isinstance(damping, (int, float)) or not 0 <= damping < float("inf")
    ):
        raise FactorsError(f"damping must be a non-negative number or None (heuristic), got {damping!r}")
    if isinstance(damping_factor, bool) or not isinstance(damping_factor, (int, float)) or not (
        0 <= damping_factor < float("inf")
    ):
        raise FactorsError(f"damping_factor must be non-negative, got {damping_factor!r}")


class InfluenceFactors:
    """The fitted curvature of every tracked layer, and how to precondition with it.

    Args:
        strategy: one of ``identity``, ``diagonal``, ``kfac``, ``ekfac``.
        layers: tracked layers by module name (their matrix shapes).
        fisher: ``sampled`` or ``empirical``, recorded for the manifest.
        damping: absolute damping lambda for every layer, or ``None`` for the paper's
            heuristic ``damping_factor * mean(eigenvalues)`` per layer.
        damping_factor: the heuristic's factor (0.1 in the paper).
        tensors: per module, the named statistic tensors (sums, counts, eigenbases).
        phase: the last completed phase (see ``PHASES_BY_STRATEGY``).
    """

    def __init__(
        self,
        strategy: str,
        layers: dict[str, TrackedLayer],
        fisher: str = "sampled",
        damping: float | None = None,
        damping_factor: float = 0.1,
        tensors: dict[str, dict[str, torch.Tensor]] | None = None,
        phase: str | None = None,
        metadata: dict | None = None,
    ):
        self.strategy = check_strategy(strategy)
        self.fisher = check_fisher(fisher)
        check_damping(damping, damping_factor)
        self.layers = dict(layers)
        self.damping = None if damping is None else float(damping)
        self.damping_factor = float(damping_factor)
        self.tensors = {name: dict(tensors.get(name, {})) if tensors else {} for name in self.layers}
        phases = PHASES_BY_STRATEGY[strategy]
        self.phase = phase if phase is not None else ("complete" if strategy == "identity" else "none")
        if self.phase not in phases + ("none",):
            raise FactorsError(f"phase '{self.phase}' is not a phase of strategy '{strategy}' ({phases})")
        self.metadata = dict(metadata or {})
        self._cache: dict = {}

    # ----------------------------------------------------------------- state
    @property
    def is_complete(self) -> bool:
        return self.phase == "complete"

    def phase_done(self, phase: str) -> bool:
        phases = PHASES_BY_STRATEGY[self.strategy]
        if self.phase == "none":
            return False
        return phases.index(self.phase) >= phases.index(phase)

    def set_phase(self, phase: str) -> None:
        if phase not in PHASES_BY_STRATEGY[self.strategy]:
            raise FactorsError(f"'{phase}' is not a phase of {self.strategy}")
        self.phase = phase
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
        t = self.tensors[name]
        if self.strategy == "ekfac":
            return t["lambda_sum"] / t["lambda_count"]
        if self.strategy == "kfac":
            return torch.outer(t["S_eigvals"].clamp_min(0), t["A_eigvals"].clamp_min(0))
        if self.strategy == "diagonal":
            return t["diag_sum"] / t["diag_count"]
        raise FactorsError("the identity strategy has no eigenvalues")

    def damping_for(self, name: str) -> float:
        """The damping lambda used for a layer (absolute, or the heuristic)."""
        if self.strategy == "identity":
            return 0.0
        if self.damping is not None:
            return self.damping
        return self.damping_factor * float(self.eigenvalues(name).mean())

    def _prepared(self, name: str, device: torch.device, dtype: torch.dtype):
        key = (name, str(device), dtype)
        if key not in self._cache:
            self.require_complete()
            t = self.tensors[name]
            inv = 1.0 / (self.eigenvalues(name) + self.damping_for(name))
            if not torch.isfinite(inv).all():
                raise FactorsError(
                    f"layer '{name}' has zero curvature and zero damping; use damping=None (heuristic) "
                    "or a positive damping"
                )
            entry = {"inv": inv.to(device=device, dtype=dtype)}
            if self.strategy in ("kfac", "ekfac"):
                entry["QA"] = t["A_eigvecs"].to(device=device, dtype=dtype)
                entry["QS"] = t["S_eigvecs"].to(device=device, dtype=dtype)
            self._cache[key] = entry
        return self._cache[key]

    def precondition(self, name: str, grads: torch.Tensor) -> torch.Tensor:
        """``(G + lambda I)^-1 V`` for gradients ``V`` of shape ``[..., d_out, d_in]``."""
        if self.strategy == "identity":
            return grads
        p = self._prepared(name, grads.device, grads.dtype)
        if self.strategy == "diagonal":
            return grads * p["inv"]
        rotated = p["QS"].transpose(0, 1) @ grads @ p["QA"]
        return p["QS"] @ (rotated * p["inv"]) @ p["QA"].transpose(0, 1)

    def inverse_quadratic(self, name: str, grads: torch.Tensor) -> torch.Tensor:
        """``V^T (G + lambda I)^-1 V`` per leading index, for ``V`` of shape ``[B, d_out, d_in]``."""
        if self.strategy == "identity":
            return (grads * grads).flatten(1).sum(1)
        p = self._prepared(name, grads.device, grads.dtype)
        if self.strategy == "diagonal":
            return (grads * grads * p["inv"]).flatten(1).sum(1)
        rotated = p["QS"].transpose(0, 1) @ grads @ p["QA"]
        return (rotated * rotated * p["inv"]).flatten(1).sum(1)

    def dense_matrix(self, name: str) -> torch.Tensor:
        """The layer's curvature as an explicit ``(d_out*d_in)^2`` float64 matrix (row-major vec).

        Only for tests and small layers: it is what the preconditioner inverts (without damping).
        """
        lam = self.eigenvalues(name)
        if self.strategy == "diagonal":
            return torch.diag(lam.flatten())
        t = self.tensors[name]
        q = torch.kron(t["S_eigvecs"], t["A_eigvecs"])
        return q @ torch.diag(lam.flatten()) @ q.T

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
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "library_version": __version__,
            "strategy": self.strategy,
            "fisher": self.fisher,
            "damping": self.damping,
            "damping_factor": self.damping_factor,
            "phase": self.phase,
            "modules": {
                n: {"kind": l.kind, "d_out": l.d_out, "d_in": l.d_in, "has_bias": l.has_bias}
                for n, l in self.layers.items()
            },
            "counts": {
                n: {k: float(v) for k, v in t.items() if k.endswith("_count")} for n, t in self.tensors.items()
            },
            "metadata": self.metadata,
        }

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``manifest.json`` and a safetensors file into ``directory`` (created if needed).

        The previous save in the same directory stays loadable until the new manifest is in place.
        """
        directory = Path(directory)
        ensure_writable_dir(directory, FactorsError, "output directory", "choose another output_dir")
        flat = {
            f"{name}::{key}": value.detach().to("cpu").contiguous()
            for name, t in self.tensors.items()
            for key, value in t.items()
        }
        tensor_file = f"factors-{uuid.uuid4().hex[:12]}.safetensors"
        tmp = directory / (tensor_file + ".tmp")
        try:
            save_file(flat, str(tmp), metadata={"format": FORMAT_NAME})
            fsync_file(tmp)
            os.replace(tmp, directory / tensor_file)
            manifest = self.manifest()
            manifest["tensor_file"] = tensor_file
            manifest["sha256"] = sha256_file(directory / tensor_file)
            atomic_write_json(directory / "manifest.json", manifest)
        except BaseException:
            # The manifest still names the previous tensor file: drop only what this save wrote.
            for leftover in (tmp, directory / tensor_file):
                try:
                    leftover.unlink()
                except OSError:
                    pass
            raise
        # The previous save's tensor file, and any left behind by a save that was killed mid-way.
        for stale in directory.glob("factors-*.safetensors*"):
            if stale.name != tensor_file:
                try:
                    stale.unlink()
                except FileNotFoundError:
                    pass
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> "InfluenceFactors":
        """Load factors saved by :meth:`save`, verifying the format, version and checksum."""
        directory = Path(directory)
        manifest_path = directory / "manifest.json"
        manifest = read_manifest(manifest_path, FactorsError, FORMAT_NAME, FORMAT_VERSION, "factors",
                                 missing="Fit them first (InfluenceCallback or fit_factors) or point to the "
                                         "callback's output_dir.",
                                 redo="refit the factors")
        missing = [k for k in _MANIFEST_KEYS if k not in manifest]
        tensor_file = manifest.get("tensor_file")
        if missing or not isinstance(tensor_file, str) or Path(tensor_file).name != tensor_file or not tensor_file:
            raise FactorsError(
                f"{manifest_path} is corrupt (missing or invalid entries: {missing or ['tensor_file']}); "
                "refit the factors"
            )
        tensor_path = directory / tensor_file
        if not tensor_path.is_file():
            raise FactorsError(f"{tensor_path} named by {manifest_path} is missing; refit the factors")
        if sha256_file(tensor_path) != manifest.get("sha256"):
            raise FactorsError(f"{tensor_path} does not match its checksum (truncated or corrupt); refit the factors")
        try:
            flat = load_file(str(tensor_path), device=str(map_location))
        except Exception as err:  # safetensors raises its own error types
            raise FactorsError(f"{tensor_path} could not be read ({err}); refit the factors") from None
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
                raise FactorsError(f"{tensor_path} holds tensors of module '{name}' absent from the manifest")
            tensors[name][stat] = value
        return cls(
            manifest["strategy"],
            layers,
            fisher=manifest["fisher"],
            damping=manifest["damping"],
            damping_factor=manifest["damping_factor"],
            tensors=tensors,
            phase=manifest["phase"],
            metadata=manifest.get("metadata"),
        )

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
        )

    def __repr__(self) -> str:
        return (
            f"InfluenceFactors(strategy={self.strategy!r}, fisher={self.fisher!r}, phase={self.phase!r}, "
            f"modules={len(self.layers)}, damping={self.damping!r})"
        )


# ------------------------------------------------------------------ file helpers
