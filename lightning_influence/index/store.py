"""The on-disk layout of a gradient index, and the identity that ties it to factors, model and data.

A directory holds

* ``manifest.json`` (written by rank 0): format name and version, the identity, the number of
  ranks, and ``compression.safetensors`` (kept rows/columns, side weights, projections) with its
  checksum;
* per rank ``rank-<r>.json``: the identity again (each rank checks its own files without waiting for
  rank 0), the completed shards in order (file, rows, checksum) and whether the rank finished;
* shards ``shard-r<r>-<k>.safetensors``: ``vectors`` ``[n, width]`` (storage dtype), ``examples``
  ``[n]`` (dataset positions) and ``digests`` ``[n, 32]`` (sha256 of each example's data).

Every file is written under a temporary name, fsynced and renamed into place; a rank file names
only shards already in place, so a build killed at any moment resumes after its last shard.

The identity: the factors (their full fingerprint; for the ``query`` placement, whose index side
does not depend on the eigenvalues or the damping, only the eigenbases), the model's weights, the
compression (options and tensors) and, through the per-example digests, the data.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from safetensors.torch import save_file
from torch import nn

from lightning_influence.errors import ScoringError, StoreError
from lightning_influence.factors import InfluenceFactors
from lightning_influence.files import fsync_file
from lightning_influence.scoring.query_store import factors_fingerprint

__all__ = ["GradientIndexError", "FORMAT_NAME", "FORMAT_VERSION", "factors_identity", "model_fingerprint",
           "example_digests", "data_fingerprint", "atomic_save_tensors", "tensors_fingerprint"]

FORMAT_NAME = "lightning-influence-gradient-index"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
COMPRESSION_FILE = "compression.safetensors"
RANK_FILE = "rank-{:05d}.json"
SHARD_FILE = "shard-r{:05d}-{:05d}.safetensors"


class GradientIndexError(ScoringError, StoreError):
    """A gradient index that is missing, corrupt, unfinished, or from other factors, model or data."""


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return b""
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def tensors_fingerprint(tensors: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key]
        h.update(f"|{key}:{t.dtype}:{tuple(t.shape)}|".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def factors_identity(factors: InfluenceFactors, placement: str) -> str:
    """What of the factors the index vectors depend on.

    With the ``query`` placement the index side is ``Q_S^T DW Q_A`` (compressed): it depends on the
    eigenbases only, so an index written inside the eigenvalue-correction pass (before ``Lambda``
    exists) is valid for the completed factors. Otherwise the factors' full fingerprint."""
    if placement != "query":
        return "factors:" + factors_fingerprint(factors)
    h = hashlib.sha256()
    head = {"strategy": factors.strategy,
            "layers": {n: [l.kind, l.d_out, l.d_in, l.has_bias] for n, l in factors.layers.items()}}
    h.update(json.dumps(head, sort_keys=True).encode())
    if factors.strategy in ("kfac", "ekfac"):
        for name in factors.layers:
            t = factors.tensors[name]
            if "A_eigvecs" not in t:
                factors.require_complete()  # raises, naming the fix
            h.update(tensors_fingerprint({"A": t["A_eigvecs"], "S": t["S_eigvecs"]}).encode())
    return "basis:" + h.hexdigest()


def model_fingerprint(model: nn.Module) -> str:
    """sha256 over every parameter and buffer of the model (names, shapes, dtypes and bytes)."""
    return tensors_fingerprint(dict(model.state_dict(keep_vars=False)))


def _leaves(batch: Any, prefix: str = "") -> Iterable[tuple[str, Any]]:
    if isinstance(batch, Mapping):
        for key in sorted(batch, key=str):
            yield from _leaves(batch[key], f"{prefix}/{key}")
    elif isinstance(batch, (list, tuple)):
        for i, value in enumerate(batch):
            yield from _leaves(value, f"{prefix}/{i}")
    else:
        yield prefix, batch


def example_digests(batch: Any, n: int) -> torch.Tensor:
    """``[n, 32]`` uint8: the sha256 of each example's data in a batch of ``n`` examples.

    Tensors whose first dimension is ``n`` are split per example; other leaves (a shared tensor,
    strings, numbers) count for every example. Independent of batch size and rank layout."""
    per_example: list[tuple[str, torch.Tensor]] = []
    shared = hashlib.sha256()
    for path, leaf in _leaves(batch):
        if isinstance(leaf, torch.Tensor) and leaf.dim() >= 1 and leaf.shape[0] == n:
            per_example.append((path, leaf.detach().to("cpu").contiguous()))
        elif isinstance(leaf, torch.Tensor):
            shared.update(f"{path}:{leaf.dtype}:{tuple(leaf.shape)}".encode() + _tensor_bytes(leaf))
        elif isinstance(leaf, (list, tuple)) and len(leaf) == n:  # e.g. a list of strings
            per_example.append((path, leaf))
        else:
            shared.update(f"{path}:{leaf!r}".encode())
    base = shared.digest()
    out = torch.empty(n, 32, dtype=torch.uint8)
    for j in range(n):
        h = hashlib.sha256(base)
        for path, leaf in per_example:
            item = leaf[j]
            if isinstance(item, torch.Tensor):
                h.update(f"{path}:{item.dtype}:{tuple(item.shape)}".encode() + _tensor_bytes(item))
            else:
                h.update(f"{path}:{item!r}".encode())
        out[j] = torch.frombuffer(bytearray(h.digest()), dtype=torch.uint8)
    return out


def data_fingerprint(examples: torch.Tensor, digests: torch.Tensor) -> str:
    """sha256 over the examples' digests in dataset order (independent of shards and ranks)."""
    order = torch.argsort(examples)
    h = hashlib.sha256()
    h.update(str(int(examples.numel())).encode())
    h.update(_tensor_bytes(digests[order]))
    return h.hexdigest()


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors written to a temporary name, fsynced, and renamed into place."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={"format": FORMAT_NAME})
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
