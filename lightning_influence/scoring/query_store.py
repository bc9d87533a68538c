"""Saving and loading preconditioned query gradients, so queries are computed once.

A directory holds one bundle of the persistence layer (``store.py``): ``manifest.json`` and
the tensor file it names (``query-gradients-<id>.safetensors``), written atomically as a
whole, so a process killed mid-save leaves the previous pair loadable. Nothing is pickled.

Preconditioned query gradients are only meaningful with the factors that preconditioned
them (``P_q = (G + lambda I)^-1 grad f(z_q)``), so the bundle's identity is a fingerprint of
those factors (:func:`factors_fingerprint`: strategy, damping, layer shapes and every
statistic tensor) and loading against other factors is refused.

Tensor keys: ``full::<layer>`` ``[Q, d_out, d_in]`` (full rank), or ``left::<layer>``
``[Q, d_out, r_l]``, ``right::<layer>`` ``[Q, d_in, r_l]`` and ``errors::<layer>`` ``[Q]``
(low rank; ``r_l`` is the rank kept for that layer, at most ``min(d_out, d_in)``).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from lightning_influence.factors import InfluenceFactors
from lightning_influence.store import (BundleFormat, factors_fingerprint, new_tensor_name, read_bundle,
                                       tensors_fingerprint, write_bundle)
from lightning_influence.scoring.queries import QueryGradients
from lightning_influence.errors import QueryStoreError

__all__ = [ "save_query_gradients",
    "load_query_gradients",
    "read_query_manifest",
    "factors_fingerprint",
    "query_gradients_fingerprint",
    "FORMAT_NAME",
    "FORMAT_VERSION",
]

FORMAT_NAME = "lightning-influence-query-gradients"
FORMAT_VERSION = 2  # 2: the store's bundle layout (files, identity)
MANIFEST = "manifest.json"
QUERY_GRADIENTS_FORMAT = BundleFormat(
    FORMAT_NAME, FORMAT_VERSION, QueryStoreError, "query gradients", prefix="query-gradients",
    make="Compute them with InfluenceScorer.query_gradients and save them with save_query_gradients.",
    redo="recompute and save the query gradients",
)



# ---------------------------------------------------------------- fingerprint
def query_gradients_fingerprint(qg: QueryGradients) -> str:
    """A sha256 over the layers, representation and every tensor of preconditioned query gradients.

    Two query sets share it exactly when they score identically (other queries of the same
    count do not); it goes into the identity of score shards computed from them.
    """
    parts = []
    for name in qg.layer_names:
        if qg.low_rank:
            parts += [(f"left::{name}", qg.left[name]), (f"right::{name}", qg.right[name])]
        else:
            parts.append((f"full::{name}", qg.full[name]))
    return tensors_fingerprint(parts, {"num_queries": qg.num_queries, "rank": qg.rank, "layers": list(qg.layer_names)})


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
    meta = queries_meta or [{} for _ in range(qg.num_queries)]
    fingerprint = factors_fingerprint(factors)
    tensor_file = new_tensor_name(QUERY_GRADIENTS_FORMAT)
    fields = {
        "tensor_file": tensor_file,
        "num_queries": qg.num_queries,
        "query_ids": [str(m.get("query_id", m.get("id", f"q{i}"))) for i, m in enumerate(meta)],
        "query_texts": [m.get("text") for m in meta],
        "queries": queries_meta,
        "representation": "low_rank" if qg.low_rank else "full",
        "rank": qg.rank,
        "layers": layers_info,
        "layer_names": list(qg.layer_names),
        "factors": {
            "fingerprint": fingerprint,
            "strategy": factors.strategy,
            "fisher": factors.fisher,
            "damping": factors.damping,
            "damping_factor": factors.damping_factor,
        },
    }
    # Preconditioned gradients are only meaningful with the factors that preconditioned them.
    write_bundle(QUERY_GRADIENTS_FORMAT, directory, fields, identity={"factors": fingerprint},
                 tensors={tensor_file: flat})
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
    """The manifest of stored query gradients (checked for format, version and its file list)."""
    return read_bundle(QUERY_GRADIENTS_FORMAT, directory).manifest


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
    bundle = read_bundle(QUERY_GRADIENTS_FORMAT, directory)
    manifest = bundle.manifest
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
        if bundle.differences({"factors": fingerprint}):
            raise QueryStoreError(
                f"the query gradients in '{directory}' were preconditioned with other factors "
                f"(fingerprint {mine['fingerprint'][:12]}, damping={mine['damping']}) than the ones given "
                f"(fingerprint {fingerprint[:12]}, damping={factors.damping}): refitted factors or another "
                f"damping change every preconditioned gradient; {fix}",
                differences=bundle.differences({"factors": fingerprint}),
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

    tensor_path = bundle.require_file(manifest["tensor_file"])
    flat = bundle.tensors(manifest["tensor_file"], device=map_location)

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
