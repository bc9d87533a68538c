"""The fitted factors of every tracked layer: a container that delegates the math to its strategy.

:class:`InfluenceFactors` holds the tracked layers, each layer's named tensors (sums,
counts, eigenbases), the phase reached, the damping settings, and the strategy object
(``lightning_influence.curvature``) that knows what the tensors mean: its passes, its
eigenvalues and damping heuristic, and how it preconditions (docs/method.md, sections 2-4).

Every statistic is stored as a sum plus a count, so that it reduces across ranks with one
all-reduce and a run can resume after each phase.

Files: one bundle of the persistence layer (``store.py``): ``<dir>/manifest.json`` names the
tensor files it goes with (``factors-<id>-<pass>.safetensors``, one per statistics pass: the
tensors that pass produced), their checksums, and the factors' identity (the weights, data and
options they were fitted from); a save writes the new tensor files first and then atomically
replaces the manifest, so a process killed mid-save leaves the previous bundle loadable. A save
after a later pass writes that pass's file only and keeps the earlier files it saved or loaded,
so each phase's tensors are written once; and while a later pass runs, the earlier passes'
tensors that are safely on disk can leave memory (:meth:`InfluenceFactors.offload`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from lightning_influence.store import (BundleFormat, TensorDigest, new_tensor_name, read_bundle, read_json_or_none,
                                       write_bundle)
from lightning_influence.capture import TrackedLayer
from lightning_influence.curvature import get_strategy, strategy_class
from lightning_influence.curvature.base import COMPLETE, DEFAULT_DAMPING_FACTOR
from lightning_influence.curvature.blocks import DEFAULT_BLOCK_SIZE, DEFAULT_BLOCK_THRESHOLD, DEFAULT_EIGH_DTYPE
from lightning_influence.errors import FactorsError, OptionsError

__all__ = ["InfluenceFactors", "FISHER_TYPES", "check_strategy", "check_fisher", "check_damping"]

FISHER_TYPES = ("sampled", "empirical")
OTHER_GROUP = "other"  # the file of tensors no pass declares (factors built by hand)
FORMAT_NAME = "lightning-influence-factors"
# 2: the store's bundle layout (files, identity); 3: block-diagonal sides (block_size, ...); 4: one file per pass
FORMAT_VERSION = 4
_MANIFEST_KEYS = ("tensor_files", "strategy", "fisher", "damping", "damping_factor", "phase", "modules",
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
            of 1024 for sides wider than 8192 (a 50257-wide head fits; GPT-2's and Llama's MLPs stay dense).
        eigh_dtype: the dtype (``torch.float64``, the default, or ``torch.float32``, or its name) Kronecker
            sides are eigendecomposed in when the covariance pass finishes (docs/method.md, section 2).

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
        eigh_dtype: torch.dtype | str = DEFAULT_EIGH_DTYPE,
    ):
        self.curvature = get_strategy(strategy, block_size=block_size, block_threshold=block_threshold,
                                      eigh_dtype=eigh_dtype)
        self.block_size, self.block_threshold = block_size, block_threshold
        self.eigh_dtype = self.curvature.eigh_dtype
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
        # group (pass name) -> (resolved directory, tensor file) this object's tensors of that group were last
        # saved to or loaded from, unchanged since: a later save into that directory keeps the file.
        self._files: dict[str, tuple[str, str]] = {}
        self._offloaded: dict[str, list[tuple[str, str]]] = {}  # group -> (layer, key) left out of memory
        # Known at a load in another dtype, from the tensors as fitted: their digest (valid while this object
        # holds the very tensors it was made with) and each layer's damping (valid for the same damping options).
        self._digest: tuple[str, dict] | None = None
        self._fitted_damping: tuple[tuple, dict[str, float]] | None = None

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

    def pass_changed(self, pass_name: str) -> None:
        """The tensors of ``pass_name`` were (re)computed: the file they were saved to no longer holds them."""
        self._files.pop(pass_name, None)
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
        """The damping lambda used for a layer (absolute, or the heuristic; 0 for ``identity``).

        Factors loaded in another dtype (``load(dtype=)``) use the value of the tensors as fitted."""
        known = self._fitted_damping
        if known is not None and known[0] == (self.damping, self.damping_factor) and name in known[1]:
            return known[1][name]
        return self.curvature.damping(self.layers[name], self.tensors[name], self.damping, self.damping_factor)

    def tensor_digest(self) -> str:
        """sha256 of every tensor (name, dtype, shape, bytes; layers in order, keys sorted), as fitted.

        Part of :func:`~lightning_influence.store.factors_fingerprint`. For factors loaded in another
        dtype it is the digest of the tensors as saved, taken while reading them, so that the
        fingerprint does not depend on the dtype they were loaded in."""
        if self._digest is not None and self._digest[1] == self._tensor_ids():
            return self._digest[0]
        digest = TensorDigest()
        for name in self.layers:
            for key in sorted(self.tensors.get(name, {})):
                digest.add(f"{name}::{key}", self.tensors[name][key])
        return digest.hexdigest()

    def _tensor_ids(self) -> dict:
        return {(n, k): (id(v), v.dtype, tuple(v.shape)) for n, t in self.tensors.items() for k, v in t.items()}

    def _prepared(self, name: str, device: torch.device, dtype: torch.dtype):
        key = (name, str(device), dtype)
        if key not in self._cache:
            self.require_complete()
            self._cache[key] = self.curvature.prepare(self.layers[name], self.tensors[name], self.damping_for(name),
                                                      device, dtype)
        return self._cache[key]

    def prepare(self, names, device: torch.device | str, dtype: torch.dtype) -> None:
        """Make the scoring tensors of layers ``names`` on ``device`` in ``dtype`` now rather than at first use."""
        for name in names:
            self._prepared(name, torch.device(device), dtype)

    def release_prepared(self) -> None:
        """Drop the tensors prepared for scoring (inverse eigenvalues, bases in the score dtype); made again when
        next needed."""
        self._cache.clear()

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
            "eigh_dtype": str(self.eigh_dtype).removeprefix("torch."),
            "modules": {
                n: {"kind": l.kind, "d_out": l.d_out, "d_in": l.d_in, "has_bias": l.has_bias}
                for n, l in self.layers.items()
            },
            "counts": {
                n: {k: float(v) for k, v in t.items() if k.endswith("_count")} for n, t in self.tensors.items()
            },
            "metadata": metadata,
        }

    def _group_of(self, layer: TrackedLayer, key: str) -> str:
        """The pass whose file holds ``key`` of ``layer``: the pass that sums it or whose finish adds it."""
        for spec in self.curvature.passes:
            if key in self.curvature.statistics(spec.name, layer) or key in self.curvature.factor_shapes(spec.name,
                                                                                                         layer):
                return spec.name
        return OTHER_GROUP

    def _groups(self) -> dict[str, dict[str, torch.Tensor]]:
        """The tensors in memory, flat (``layer::key``), grouped by the pass that produced them."""
        groups: dict[str, dict[str, torch.Tensor]] = {}
        for name, tensors in self.tensors.items():
            for key, value in tensors.items():
                groups.setdefault(self._group_of(self.layers[name], key), {})[f"{name}::{key}"] = value
        return groups

    def _kept_file(self, group: str, directory: Path, listed: dict) -> str | None:
        """The file of ``group`` this object saved to (or loaded from) ``directory``, if its manifest still lists it."""
        where = self._files.get(group)
        if where is None or where[0] != str(directory.resolve()) or where[1] not in listed:
            return None
        return where[1] if (directory / where[1]).is_file() else None

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the factors as one bundle into ``directory`` (created if needed).

        One tensor file per pass; the file of a pass that this object already saved into
        ``directory`` (or loaded from it), unchanged since, is kept rather than written again.
        The bundle's identity is ``metadata["identity"]`` (what the factors were fitted from:
        weights, data, options; see ``passes.fit_identity``). The previous save in the same
        directory stays loadable until the new manifest is in place.
        """
        directory = Path(directory)
        current = read_json_or_none(directory / FACTORS_FORMAT.manifest)
        listed = current.get("files") if isinstance(current, dict) and current.get("format") == FORMAT_NAME else None
        listed = listed if isinstance(listed, dict) else {}
        groups = self._groups()
        names: dict[str, str] = {}
        new: dict[str, dict[str, torch.Tensor]] = {}
        for group in dict.fromkeys([*groups, *self._offloaded]):
            kept = self._kept_file(group, directory, listed)
            if kept is not None:
                names[group] = kept
                continue
            if group in self._offloaded:  # elsewhere on disk only: read it back to write it here
                self.restore()
                return self.save(directory)
            names[group] = new_tensor_name(FACTORS_FORMAT, role=re.sub(r"[^a-z0-9]", "", group.lower()) or "pass")
            new[names[group]] = groups[group]
        write_bundle(FACTORS_FORMAT, directory, {**self.manifest(), "tensor_files": names},
                     identity=self.metadata.get("identity"), tensors=new,
                     keep=[f for f in names.values() if f not in new])
        where = str(directory.resolve())
        self._files = {group: (where, file) for group, file in names.items()}
        return directory

    # ------------------------------------------------------- memory
    def offload(self, keep: str | None = None) -> list[str]:
        """Drop from memory the tensors of every pass (but ``keep``) whose file this object saved or loaded and
        that is still listed by that directory's manifest; :meth:`restore` reads them back (checksums checked).

        A later pass reads only what it needs from earlier ones (the eigenbases, in its compute dtype), so
        the earlier sums and float64 bases need not stay in memory meanwhile. Returns the groups dropped.
        """
        dropped = []
        for group, (where, file) in self._files.items():
            if group == keep or group == OTHER_GROUP or group in self._offloaded:
                continue
            directory = Path(where)
            manifest = read_json_or_none(directory / FACTORS_FORMAT.manifest)
            if not isinstance(manifest, dict) or file not in (manifest.get("files") or {}):
                continue
            keys = [(name, key) for name, tensors in self.tensors.items() for key in tensors
                    if self._group_of(self.layers[name], key) == group]
            for name, key in keys:
                del self.tensors[name][key]
            self._offloaded[group] = keys
            dropped.append(group)
        if dropped:
            self._cache.clear()
        return dropped

    def restore(self) -> None:
        """Read back what :meth:`offload` dropped (nothing to do when nothing was)."""
        for group in list(self._offloaded):
            where, file = self._files[group]
            flat = read_bundle(FACTORS_FORMAT, where).tensors(file)
            for name, key in self._offloaded.pop(group):
                self.tensors[name][key] = flat.pop(f"{name}::{key}")
            del flat

    @classmethod
    def load(cls, directory: str | os.PathLike, map_location: str | torch.device = "cpu",
             identity: dict | None = None, dtype: torch.dtype | None = None,
             damping: tuple[float | None, float] | None = None) -> "InfluenceFactors":
        """Load factors saved by :meth:`save`, verifying the format, version and checksum.

        With ``identity``, the saved identity must equal it (checked before any tensor is read);
        otherwise a :class:`FactorsError` whose ``differences`` name what differs is raised.
        With ``dtype`` (e.g. the scoring dtype), the statistics come in that dtype, read one
        tensor at a time: the float64 file is never held in memory (counts keep their dtype).
        Such factors precondition with the damping and fingerprint of the tensors as saved.
        ``damping`` (``(damping, damping_factor)``) replaces the saved damping options.
        """
        bundle = read_bundle(FACTORS_FORMAT, directory)
        manifest, manifest_path = bundle.manifest, bundle.manifest_path
        missing = [k for k in _MANIFEST_KEYS if k not in manifest]
        if missing:
            raise FactorsError(f"{manifest_path} is corrupt (missing entries: {missing}); refit the factors")
        if identity is not None:
            bundle.check_identity(identity, "were fitted from other weights, data or options")
        files = manifest["tensor_files"]
        if not isinstance(files, dict) or not all(isinstance(g, str) for g in files):
            raise FactorsError(f"{manifest_path} is corrupt (invalid 'tensor_files'); refit the factors")
        flat: dict[str, torch.Tensor] = {}
        readers = {}
        for file in files.values():
            if dtype is None:
                flat.update(bundle.tensors(file, device=map_location))
            else:
                reader = bundle.reader(file)
                readers.update({key: reader for key in reader.keys()})
        try:
            layers = {
                n: TrackedLayer(n, m["kind"], int(m["d_out"]), int(m["d_in"]), bool(m["has_bias"]))
                for n, m in manifest["modules"].items()
            }
        except (AttributeError, KeyError, TypeError, ValueError) as err:
            raise FactorsError(f"{manifest_path} is corrupt (module entry: {err!r}); refit the factors") from None
        tensors: dict[str, dict[str, torch.Tensor]] = {n: {} for n in layers}
        for key, value in [*flat.items(), *((k, None) for k in readers)]:
            name, _, stat = key.rpartition("::")
            if name not in tensors:
                raise FactorsError(f"{manifest_path} holds tensors of module '{name}' absent from the "
                                   "manifest; refit the factors")
            tensors[name][stat] = value
        metadata = dict(manifest.get("metadata") or {})
        if bundle.identity:
            metadata["identity"] = bundle.identity
        damping_options = (manifest["damping"], manifest["damping_factor"]) if damping is None else damping
        try:
            factors = cls(
                manifest["strategy"], layers, fisher=manifest["fisher"], damping=damping_options[0],
                damping_factor=damping_options[1], tensors={} if readers else tensors, phase=manifest["phase"],
                metadata=metadata, block_size=manifest["block_size"], block_threshold=manifest["block_threshold"],
                # factors saved before the option existed were decomposed in float64
                eigh_dtype=manifest.get("eigh_dtype", "float64"),
            )
        except OptionsError as err:
            raise FactorsError(f"{manifest_path} is corrupt ({err}); refit the factors") from None
        if readers:
            factors._read_in_dtype(tensors, readers, dtype, map_location)
        factors._check_shapes(manifest_path)
        where = str(Path(directory).resolve())
        factors._files = {group: (where, file) for group, file in files.items()}
        return factors

    def _read_in_dtype(self, keys: dict[str, dict], readers: dict, dtype: torch.dtype,
                       device: str | torch.device) -> None:
        """Fill the tensors layer by layer from ``readers``, converted to ``dtype``; the digest and the damping
        are taken from each layer's tensors as saved, before they are converted and let go."""
        digest = TensorDigest()
        dampings: dict[str, float] = {}
        for name in self.layers:
            saved = {key: readers[f"{name}::{key}"].read(f"{name}::{key}") for key in sorted(keys.get(name, {}))}
            for key, value in saved.items():
                digest.add(f"{name}::{key}", value)
            self.tensors[name] = saved
            if self.is_complete:
                dampings[name] = self.damping_for(name)
            self.tensors[name] = {key: (value.to(device=device, dtype=dtype) if value.is_floating_point() and value.dim()
                                        else value.to(device)) for key, value in saved.items()}
            del saved
        self._digest = (digest.hexdigest(), self._tensor_ids())
        self._fitted_damping = ((self.damping, self.damping_factor), dampings)

    def in_dtype(self, dtype: torch.dtype) -> "InfluenceFactors":
        """These factors with their statistics in ``dtype``, read from the files they were saved to or loaded
        from (the float64 tensors already in memory are not read, so a lazily loaded file stays on disk).

        ``self`` where the statistics already are in ``dtype``, or where a pass's tensors are in memory only;
        the result preconditions with the same damping and has the same fingerprint."""
        floats = [v for t in self.tensors.values() for v in t.values() if v.is_floating_point() and v.dim()]
        if all(v.dtype == dtype for v in floats) or self._offloaded:
            return self
        groups = set(self._groups())
        places = {self._files[g][0] for g in groups if g in self._files}
        if not groups or not groups <= set(self._files) or len(places) != 1:
            return self
        where = Path(places.pop())
        manifest = read_json_or_none(where / FACTORS_FORMAT.manifest)
        listed = manifest.get("tensor_files") if isinstance(manifest, dict) else None
        if listed != {g: self._files[g][1] for g in groups}:
            return self  # the directory holds other factors now
        device = floats[0].device if floats else "cpu"
        loaded = InfluenceFactors.load(where, map_location=device, dtype=dtype,
                                       damping=(self.damping, self.damping_factor))
        if loaded.phase != self.phase or list(loaded.layers) != list(self.layers):
            return self
        loaded.metadata = dict(self.metadata)
        return loaded

    def _check_shapes(self, where: Path) -> None:
        """Every saved sum has the shape its strategy and block layout declare (a manifest that does not go
        with its tensors would otherwise precondition with the wrong layout)."""
        for p in self.curvature.passes:
            if not self.phase_done(p.phase):
                break
            for name, layer in self.layers.items():
                for key, shape in self.curvature.kept_shapes(p.name, layer).items():
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
            eigh_dtype=self.eigh_dtype,
        )

    def __repr__(self) -> str:
        return (
            f"InfluenceFactors(strategy={self.strategy!r}, fisher={self.fisher!r}, phase={self.phase!r}, "
            f"modules={len(self.layers)}, damping={self.damping!r}, block_size={self.block_size!r})"
        )


# ------------------------------------------------------------------ file helpers
