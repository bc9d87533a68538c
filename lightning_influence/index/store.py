"""The on-disk layout of a gradient index, as bundles of the persistence layer (``store.py``).

A directory holds

* the **index bundle** (``manifest.json``, written by rank 0): the identity, the number of ranks
  and one tensor file ``compression-<id>.safetensors`` (kept rows/columns, side weights,
  projections);
* per rank a **rank bundle** (``rank-<r>.json``): the identity again (each rank checks its own
  files without waiting for rank 0), the shard files in order with the batches each covers, and
  whether the rank finished. Its tensor files are the shards ``shard-r<r>-<id>.safetensors``:
  ``vectors`` ``[n, width]`` (storage dtype), ``examples`` ``[n]`` (dataset positions) and
  ``digests`` ``[n, 32]`` (sha256 of each example's data).

Each completed shard is one :func:`~lightning_influence.store.write_bundle` of its rank bundle
(the new shard, the earlier ones kept by name): a build killed at any moment leaves the rank
manifest of its last completed shard, and resumes after it; a shard written but not yet listed is
swept by the next write. Memory stays flat: at most one shard of vectors is held.

The identity: the factors (their full fingerprint; for the ``query`` placement, whose index side
does not depend on the eigenvalues or the damping, only the eigenbases), the model's weights, the
compression (options and tensors) and, through the per-example digests, the data.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable, Mapping

import torch

from lightning_influence.errors import GradientIndexError
from lightning_influence.factors import InfluenceFactors
from lightning_influence.index.projection import has_eigenbasis
from lightning_influence.store import BundleFormat, factors_fingerprint, tensors_fingerprint

__all__ = ["GradientIndexError", "INDEX_FORMAT", "rank_format", "factors_identity", "example_digests",
           "digests_fingerprint", "compression_fingerprint"]

_REDO = "delete the directory and build the index again (build_index, or InfluenceCallback(index=...))"

INDEX_FORMAT = BundleFormat(
    name="lightning-influence-gradient-index", version=2, error=GradientIndexError, what="gradient index",
    make="Build it first (build_index, InfluenceModule.build_index or InfluenceCallback(index=...)).",
    redo=_REDO, prefix="compression", dir_what="index directory", dir_fix="choose another directory",
)


def rank_format(rank: int) -> BundleFormat:
    """The bundle format of one rank's shards (its own manifest and file prefix, so ranks never sweep each other's)."""
    return BundleFormat(
        name="lightning-influence-gradient-index-rank", version=2, error=GradientIndexError,
        what=f"gradient index shards of rank {rank}",
        make="Run the index build again with the same arguments to resume it.", redo=_REDO,
        prefix=f"shard-r{rank:05d}", manifest=f"rank-{rank:05d}.json",
        dir_what="index directory", dir_fix="choose another directory",
    )


def compression_fingerprint(tensors: Mapping[str, torch.Tensor]) -> str:
    return tensors_fingerprint(((k, tensors[k]) for k in sorted(tensors)))


def factors_identity(factors: InfluenceFactors, placement: str) -> str:
    """What of the factors the index vectors depend on.

    With the ``query`` placement the index side is ``Q_S^T DW Q_A`` (compressed): it depends on the
    eigenbases only, so an index written inside the eigenvalue-correction pass (before ``Lambda``
    exists) is valid for the completed factors, with any damping (its truncation ranks by K-FAC's
    ``L_S L_A``, from the same covariance pass). Otherwise the factors' full fingerprint (statistics
    and damping)."""
    if placement != "query":
        return "factors:" + factors_fingerprint(factors)
    head = {"strategy": factors.strategy,
            "layers": {n: [l.kind, l.d_out, l.d_in, l.has_bias] for n, l in factors.layers.items()}}
    named = []
    if has_eigenbasis(factors):
        for name in factors.layers:
            t = factors.tensors[name]
            if "A_eigvecs" not in t:
                factors.require_complete()  # raises, naming the fix
            named += [(f"{name}::{key}", t[key]) for key in ("A_eigvecs", "S_eigvecs", "A_eigvals", "S_eigvals")]
    return "basis:" + tensors_fingerprint(named, head)


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return b""
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def _leaves(batch: Any, prefix: str = "") -> Iterable[tuple[str, Any]]:
    if isinstance(batch, Mapping):
        for key in sorted(batch, key=str):
            yield from _leaves(batch[key], f"{prefix}/{key}")
    elif isinstance(batch, (list, tuple)) and not (batch and all(isinstance(v, str) for v in batch)):
        for i, value in enumerate(batch):
            yield from _leaves(value, f"{prefix}/{i}")
    else:
        yield prefix, batch


def example_digests(batch: Any, n: int) -> torch.Tensor:
    """``[n, 32]`` uint8: the sha256 of each example's data in a batch of ``n`` examples.

    Tensors whose first dimension is ``n`` are split per example (one copy to the CPU per leaf);
    other leaves (a shared tensor, strings, numbers) count for every example. Independent of batch
    size and rank layout, so a resumed or sharded build is checked example by example."""
    per_example: list[tuple[str, Any]] = []
    shared = hashlib.sha256()
    for path, leaf in _leaves(batch):
        if isinstance(leaf, torch.Tensor) and leaf.dim() >= 1 and leaf.shape[0] == n:
            t = leaf.detach().to("cpu").contiguous()
            rows = t.reshape(n, -1).view(torch.uint8) if t.numel() else t.reshape(n, 0).to(torch.uint8)
            per_example.append((f"{path}:{t.dtype}:{tuple(t.shape[1:])}", rows.numpy()))
        elif isinstance(leaf, torch.Tensor):
            shared.update(f"{path}:{leaf.dtype}:{tuple(leaf.shape)}".encode() + _tensor_bytes(leaf))
        elif isinstance(leaf, (list, tuple)) and len(leaf) == n:  # e.g. a list of strings
            per_example.append((path, leaf))
        else:
            shared.update(f"{path}:{leaf!r}".encode())
    base = shared.digest()
    out = bytearray()
    for j in range(n):
        h = hashlib.sha256(base)
        for path, leaf in per_example:
            item = leaf[j]
            h.update(path.encode())
            h.update(item.tobytes() if hasattr(item, "tobytes") else repr(item).encode())
        out += h.digest()
    return torch.frombuffer(out, dtype=torch.uint8).reshape(n, 32).clone() if n else torch.empty(0, 32,
                                                                                               dtype=torch.uint8)


def digests_fingerprint(examples: torch.Tensor, digests: torch.Tensor) -> str:
    """sha256 over the examples' digests in dataset order (independent of shards and ranks)."""
    order = torch.argsort(examples)
    h = hashlib.sha256(json.dumps(int(examples.numel())).encode())
    h.update(_tensor_bytes(digests[order]))
    return h.hexdigest()
