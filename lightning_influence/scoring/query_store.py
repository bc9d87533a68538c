"""Saving and loading preconditioned query gradients, so queries are computed once.

A directory holds ``manifest.json`` and the tensor file it names
(``query-gradients-<id>.safetensors``). As with the factors, a save writes the new tensor
file first (temporary name, then ``os.replace``) and replaces the manifest last, so a
process killed mid-save leaves the previous pair loadable. Nothing is pickled.

Preconditioned query gradients are only meaningful with the factors that preconditioned
them (``P_q = (G + lambda I)^-1 grad f(z_q)``), so the manifest records a fingerprint of
those factors (:func:`factors_fingerprint`: strategy, damping, layer shapes and every
statistic tensor) and loading against other factors is refused.

Tensor keys: ``full::<layer>`` ``[Q, d_out, d_in]`` (full rank), or ``left::<layer>``
``[Q, d_out, r_l]``, ``right::<layer>`` ``[Q, d_in, r_l]`` and ``errors::<layer>`` ``[Q]``
(low rank; ``r_l`` is the rank kept for that layer, at most ``min(d_out, d_in)``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import uuid
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from safetensors.torch import load_file, save_file

from lightning_influence.files import (atomic_write_json, ensure_writable_dir, fsync_file, read_json_or_none,
                                       read_manifest, sha256_file)
from lightning_influence import __version__
from lightning_influence.factors import InfluenceFactors
from lightning_influence.scoring.queries import QueryGradients
from lightning_influence.errors import QueryStoreError

__all__ = [ "save_query_gradients",
    "load_query_gradients",
    "read_query_manifest",
    "factors_fingerprint",
    "FORMAT_NAME",
    "FORMAT_VERSION",
]

FORMAT_NAME = "lightning-influence-query-gradients"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"



# ---------------------------------------------------------------- fingerprint
def factors_fingerprint(factors: InfluenceFactors) -> str:
    """A sha256 over everything that decides how the factors precondition a gradient.

    Covers the strategy, fisher type, phase, the damping actually used per layer, the layer
    shapes and the bytes of every statistic tensor, so that two factor objects share a
    fingerprint exactly when they precondition identically (a saved-then-loaded copy does;
    the same statistics with another damping do not). It reads every tensor once (about the
    size of the factors' file; a second or so for GPT-2-small-sized factors).
    """
    h = hashlib.sha256()
    head = {
        "strategy": factors.strategy,
        "fisher": factors.fisher,
        "phase": factors.phase,
        "layers": {n: [l.kind, l.d_out, l.d_in, l.has_bias] for n, l in factors.layers.items()},
        "damping": {n: _float_repr(factors.damping_for(n)) for n in factors.layers} if factors.is_complete else None,
    }
    h.update(json.dumps(head, sort_keys=True).encode())
    for name in factors.layers:
        for key in sorted(factors.tensors.get(name, {})):
            t = factors.tensors[name][key].detach().to("cpu").contiguous()
            h.update(f"|{name}::{key}:{t.dtype}:{tuple(t.shape)}|".encode())
            h.update(_tensor_bytes(t))
    return h.hexdigest()


def _float_repr(x: float) -> str:
    return float(x).hex()


def _tensor_bytes(t: torch.Tensor) -> bytes:
    if t.numel() == 0:
        return b""
    # view as bytes without going through numpy (bf16 has no numpy dtype)
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


# ------------------------------------------------------------------- saving
def save_query_gradients(
    qg: QueryGradients,
    directory: str | os.PathLike,
    factors: InfluenceFactors,
    queries_meta: Sequence[dict[str, Any]] | None = None,
) -> Path:
    """Write ``qg`` (full or low rank) to ``directory`` with a manifest tying it to ``factors``.

    Args:
        qg: preconditioned query gradients from :meth:`InfluenceScorer.query_gradients`.
        directory: created if needed; an earlier save there is replaced atomically.
        factors: the factors that preconditioned ``qg`` (fingerprinted into the manifest).
        queries_meta: one JSON-serialisable dict per query (e.g. ``query_id``, ``prompt``,
            ``completion``, ``text``), kept in the manifest in query order.

    Returns the directory.
    """
    directory = Path(directory)
    _check_consistent(qg, factors)
    if queries_meta is not None:
        queries_meta = [dict(m) for m in queries_meta]
        if len(queries_meta) != qg.num_queries:
            raise QueryStoreError(
                f"queries_meta has {len(queries_meta)} entries but the query gradients hold {qg.num_queries} "
                "queries; pass one dict per query, in the order the queries were computed"
            )
        try:
            json.dumps(queries_meta)
        except (TypeError, ValueError) as err:
            raise QueryStoreError(f"queries_meta must be JSON-serialisable ({err}); keep ids and texts only") from None

    flat: dict[str, torch.Tensor] = {}
    layers_info: dict[str, dict] = {}
    for name in qg.layer_names:
        layer = factors.layers[name]
        info: dict[str, Any] = {"d_out": layer.d_out, "d_in": layer.d_in, "kind": layer.kind}
        if qg.low_rank:
            flat[f"left::{name}"] = qg.left[name]
            flat[f"right::{name}"] = qg.right[name]
            info["rank"] = int(qg.left[name].shape[-1])
            info["dtype"] = str(qg.left[name].dtype).removeprefix("torch.")
            if name in qg.errors:
                err = qg.errors[name].detach().to("cpu")
                flat[f"errors::{name}"] = err
                info["relative_frobenius_error"] = [_json_float(e) for e in err.double().tolist()]
                info["max_relative_frobenius_error"] = _json_float(float(err.max())) if err.numel() else 0.0
        else:
            flat[f"full::{name}"] = qg.full[name]
            info["dtype"] = str(qg.full[name].dtype).removeprefix("torch.")
        layers_info[name] = info
    flat = {k: v.detach().to("cpu").contiguous() for k, v in flat.items()}

    ensure_writable_dir(directory, QueryStoreError)
    tensor_file = f"query-gradients-{uuid.uuid4().hex[:12]}.safetensors"
    tmp = directory / (tensor_file + ".tmp")
    try:
        save_file(flat, str(tmp), metadata={"format": FORMAT_NAME})
        fsync_file(tmp)
        os.replace(tmp, directory / tensor_file)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise
    meta = queries_meta or [{} for _ in range(qg.num_queries)]
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "tensor_file": tensor_file,
        "sha256": sha256_file(directory / tensor_file),
        "num_queries": qg.num_queries,
        "query_ids": [str(m.get("query_id", m.get("id", f"q{i}"))) for i, m in enumerate(meta)],
        "query_texts": [m.get("text") for m in meta],
        "queries": queries_meta,
        "representation": "low_rank" if qg.low_rank else "full",
        "rank": qg.rank,
        "layers": layers_info,
        "layer_names": list(qg.layer_names),
        "factors": {
            "fingerprint": factors_fingerprint(factors),
            "strategy": factors.strategy,
            "fisher": factors.fisher,
            "damping": factors.damping,
            "damping_factor": factors.damping_factor,
        },
    }
    old = read_json_or_none(directory / MANIFEST)
    atomic_write_json(directory / MANIFEST, manifest)
    if old and isinstance(old.get("tensor_file"), str) and old["tensor_file"] != tensor_file:
        try:
            (directory / old["tensor_file"]).unlink()
        except (FileNotFoundError, IsADirectoryError):
            pass
    return directory


def _check_consistent(qg: QueryGradients, factors: InfluenceFactors) -> None:
    if qg.num_queries < 1:
        raise QueryStoreError("the query gradients hold no query; nothing to save")
    unknown = [n for n in qg.layer_names if n not in factors.layers]
    if unknown:
        raise QueryStoreError(
            f"layers {unknown} of the query gradients are not in the factors given ({list(factors.layers)[:10]}); "
            "pass the factors the query gradients were computed with"
        )
    for name in qg.layer_names:
        d_out, d_in = factors.layers[name].shape
        if qg.low_rank:
            if name not in qg.left or name not in qg.right:
                raise QueryStoreError(f"low-rank query gradients lack left/right factors of layer '{name}'")
            left, right = qg.left[name], qg.right[name]
            ok = (left.dim() == 3 and right.dim() == 3 and left.shape[:2] == (qg.num_queries, d_out)
                  and right.shape[:2] == (qg.num_queries, d_in) and left.shape[2] == right.shape[2])
            shape = f"left {tuple(left.shape)}, right {tuple(right.shape)}"
        else:
            if name not in qg.full:
                raise QueryStoreError(f"query gradients lack layer '{name}'")
            ok = tuple(qg.full[name].shape) == (qg.num_queries, d_out, d_in)
            shape = str(tuple(qg.full[name].shape))
        if not ok:
            raise QueryStoreError(
                f"query gradients of layer '{name}' have shape {shape}, which does not fit the factors' "
                f"{d_out}x{d_in} layer and {qg.num_queries} queries; pass the factors they were computed with"
            )


# ------------------------------------------------------------------ loading
def read_query_manifest(directory: str | os.PathLike) -> dict:
    """The manifest of stored query gradients (checked for format and version)."""
    return read_manifest(Path(directory) / MANIFEST, QueryStoreError, FORMAT_NAME, FORMAT_VERSION,
                         "query gradients",
                         missing="Compute them with InfluenceScorer.query_gradients and save them with "
                                 "save_query_gradients.",
                         redo="recompute and save the query gradients")


def load_query_gradients(
    directory: str | os.PathLike,
    factors: InfluenceFactors | None = None,
    layers: Iterable[str] | None = None,
    map_location: str | torch.device = "cpu",
) -> tuple[QueryGradients, dict]:
    """Load query gradients saved by :func:`save_query_gradients`.

    Args:
        directory: where they were saved.
        factors: when given, the factors the scores will use: loading fails unless they are
            the factors the query gradients were preconditioned with (same fingerprint) and
            every stored layer has the factors' shape.
        layers: the layers to score with (e.g. ``scorer.layer_names``); a subset of the stored
            layers is selected, a layer that was not stored is an error.
        map_location: device for the tensors.

    Returns ``(query_gradients, manifest)``; ``manifest["queries"]`` holds the ``queries_meta``.
    """
    directory = Path(directory)
    manifest = read_query_manifest(directory)
    stored = list(manifest["layer_names"])
    fix = "recompute the query gradients with these factors (InfluenceScorer(...).query_gradients) and save them again"

    if factors is not None:
        mine = manifest["factors"]
        if mine["strategy"] != factors.strategy:
            raise QueryStoreError(
                f"the query gradients in '{directory}' were preconditioned with {mine['strategy']} factors, "
                f"but {factors.strategy} factors were given; load the {mine['strategy']} factors they came "
                f"from, or {fix}"
            )
        unknown = [n for n in stored if n not in factors.layers]
        if unknown:
            raise QueryStoreError(
                f"stored query-gradient layers {unknown[:10]} are not in the factors given; {fix}"
            )
        for name in stored:
            info = manifest["layers"][name]
            if (info["d_out"], info["d_in"]) != factors.layers[name].shape:
                raise QueryStoreError(
                    f"layer '{name}' is {info['d_out']}x{info['d_in']} in the stored query gradients but "
                    f"{factors.layers[name].d_out}x{factors.layers[name].d_in} in the factors: they belong to "
                    f"another model; {fix}"
                )
        fingerprint = factors_fingerprint(factors)
        if fingerprint != mine["fingerprint"]:
            raise QueryStoreError(
                f"the query gradients in '{directory}' were preconditioned with other factors "
                f"(fingerprint {mine['fingerprint'][:12]}, damping={mine['damping']}) than the ones given "
                f"(fingerprint {fingerprint[:12]}, damping={factors.damping}): refitted factors or another "
                f"damping change every preconditioned gradient; {fix}"
            )

    if layers is None:
        selected = stored
    else:
        layers = list(layers)
        missing = [n for n in layers if n not in stored]
        if missing:
            raise QueryStoreError(
                f"layers {missing[:10]} were not stored in '{directory}' (it holds {stored[:10]}"
                f"{' ...' if len(stored) > 10 else ''}); {fix}, scoring with the same layers"
            )
        selected = [n for n in stored if n in set(layers)]

    tensor_path = directory / manifest["tensor_file"]
    if not tensor_path.is_file():
        raise QueryStoreError(f"{tensor_path} named by {directory / MANIFEST} is missing; "
                              "save the query gradients again")
    if sha256_file(tensor_path) != manifest.get("sha256"):
        raise QueryStoreError(f"{tensor_path} does not match its checksum (truncated or corrupt); "
                              "save the query gradients again")
    try:
        flat = load_file(str(tensor_path), device=str(map_location))
    except Exception as err:  # safetensors raises its own error types
        raise QueryStoreError(f"{tensor_path} could not be read ({err}); save the query gradients again") from None

    q = int(manifest["num_queries"])
    low_rank = manifest["representation"] == "low_rank"
    out = QueryGradients(selected, q, rank=manifest.get("rank") if low_rank else None)
    for name in selected:
        info = manifest["layers"][name]
        d_out, d_in = info["d_out"], info["d_in"]
        if low_rank:
            left, right = flat.get(f"left::{name}"), flat.get(f"right::{name}")
            r = info.get("rank")
            if (left is None or right is None or tuple(left.shape) != (q, d_out, r)
                    or tuple(right.shape) != (q, d_in, r)):
                raise QueryStoreError(f"{tensor_path} lacks or misshapes the low-rank factors of layer '{name}'; "
                                      "save the query gradients again")
            out.left[name], out.right[name] = left, right
            if f"errors::{name}" in flat:
                out.errors[name] = flat[f"errors::{name}"]
        else:
            full = flat.get(f"full::{name}")
            if full is None or tuple(full.shape) != (q, d_out, d_in):
                raise QueryStoreError(f"{tensor_path} lacks or misshapes the query gradients of layer '{name}'; "
                                      "save the query gradients again")
            out.full[name] = full
    return out, manifest


# ------------------------------------------------------------------ helpers
def _json_float(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None
