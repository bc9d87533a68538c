"""Streaming top-k of influence scores and resumable on-disk score shards.

A scoring run over N training examples produces ``[Q, B]`` score chunks, one per training
batch. :class:`StreamingTopK` keeps, per query, the k most positive and k most negative
scores seen so far (values and global training indices) in O(Q k) memory;
:class:`ScoreShardWriter` writes every score to ``scores-00000.safetensors``,
``scores-00001.safetensors``, ... (shard ``i`` holds training indices
``[i * shard_size, (i + 1) * shard_size)``) with a manifest listing them.

Both resume: ``StreamingTopK.state_dict()`` is tensors only (safetensors-ready), and a
writer opened on a directory with an unfinished run continues after its last complete shard
(:meth:`ScoreShardWriter.resume_from`), with the top-k state saved alongside every shard so
the two never disagree. The run is one bundle of the persistence layer (``store.py``): each
shard file and the top-k state are written to a temporary file and renamed into place, the
manifest (with every file's checksum) is replaced last. Its identity (what the scores are
computed from: queries, factors, data) is compared on resume, so a directory holding
another query set's scores is never continued.

Ties are broken deterministically: among equal scores the lower training index ranks first.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch

from lightning_influence.errors import TopKError
from lightning_influence.store import (BundleFormat, describe_differences, identity_differences, read_bundle,
                                       read_json_or_none, remove_stale_files, write_bundle)

__all__ = ["StreamingTopK", "ScoreShardWriter", "select_top_k", "read_scores", "read_score_manifest", "scores_identity"]

FORMAT_NAME = "lightning-influence-score-shards"  # version 1 was "lightning-influence-scores" (shared with save_scores)
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
_SHARD = "scores-{:05d}.safetensors"
_TOPK = "topk-{:05d}.safetensors"
# Shard i and the top-k state after it have fixed names: each is written once, before any manifest
# lists it (a restart with another identity first writes a manifest listing none).
SHARDS_FORMAT = BundleFormat(
    FORMAT_NAME, FORMAT_VERSION, TopKError, "score shards", prefix="scores",
    make="Write them with ScoreShardWriter (InfluenceModule.top_k(scores_dir=...)).",
    redo="rerun the scoring into a new directory",
    pattern=r"^(scores|topk)-\d{5}\.safetensors(\.tmp)?$",
)
ON_MISMATCH = ("raise", "restart")



def _as_indices(indices: torch.Tensor | Sequence[int] | int, b: int) -> torch.Tensor:
    if isinstance(indices, int):
        return torch.arange(indices, indices + b, dtype=torch.long)
    idx = torch.as_tensor(indices).to("cpu")
    if idx.dtype.is_floating_point or idx.dtype == torch.bool:
        raise TopKError(f"training indices must be integers, got {idx.dtype}")
    idx = idx.to(torch.long).reshape(-1)
    if idx.numel() != b:
        raise TopKError(f"the chunk has {b} score columns but {idx.numel()} training indices")
    return idx


def _check_finite(scores: torch.Tensor, idx: torch.Tensor) -> None:
    bad = ~torch.isfinite(scores)
    if bad.any():
        cols = torch.nonzero(bad.any(0)).flatten()[:5]
        raise TopKError(
            f"{int(bad.sum())} non-finite scores in the chunk (training indices {idx[cols].tolist()} ...); "
            "check the factors' damping and the model's losses (run in float32 or float64)"
        )


def select_top_k(values: torch.Tensor, indices: torch.Tensor, k: int, largest: bool):
    """The k best of each row: by value (descending if ``largest``), ties by ascending index."""
    by_index = torch.argsort(indices, dim=1, stable=True)
    values, indices = values.gather(1, by_index), indices.gather(1, by_index)
    order = torch.sort(values, dim=1, descending=largest, stable=True).indices[:, :k]
    return values.gather(1, order), indices.gather(1, order)


class StreamingTopK:
    """The k most positive and k most negative scores per query over streamed chunks.

    Args:
        num_queries: Q, the rows of every chunk.
        k: how many to keep on each side (fewer while fewer examples were seen).

    Chunks must arrive in increasing, non-overlapping training-index order (as a
    non-shuffled loader gives them): a chunk reaching back before :attr:`next_index` is
    refused, so a resumed run cannot count an example twice.
    """

    def __init__(self, num_queries: int, k: int):
        if not isinstance(num_queries, int) or num_queries < 1:
            raise TopKError(f"num_queries must be a positive integer, got {num_queries!r}")
        if not isinstance(k, int) or k < 1:
            raise TopKError(f"k must be a positive integer, got {k!r}")
        self.num_queries = num_queries
        self.k = k
        self.reset()

    def reset(self, dtype: torch.dtype = torch.float32) -> None:
        empty_v = torch.empty(self.num_queries, 0, dtype=dtype)
        empty_i = torch.empty(self.num_queries, 0, dtype=torch.long)
        self._pos_v, self._pos_i = empty_v, empty_i
        self._neg_v, self._neg_i = empty_v.clone(), empty_i.clone()
        self.num_seen = 0
        self.next_index = 0

    def update(self, scores: torch.Tensor, indices: torch.Tensor | Sequence[int] | int) -> None:
        """Consume ``scores`` ``[Q, B]`` of training examples ``indices`` (``[B]``, or the first index)."""
        if scores.dim() != 2 or scores.shape[0] != self.num_queries:
            raise TopKError(f"expected a [Q={self.num_queries}, B] score chunk, got shape {tuple(scores.shape)}")
        if not scores.dtype.is_floating_point:
            raise TopKError(f"scores must be floating point, got {scores.dtype}")
        b = scores.shape[1]
        idx = _as_indices(indices, b)
        if b == 0:
            return
        if int(idx.min()) < self.next_index:
            raise TopKError(
                f"this chunk holds training index {int(idx.min())}, but indices below {self.next_index} were "
                "already consumed; resume the scoring run from `next_index` (chunks must not overlap)"
            )
        scores = scores.detach().to("cpu")
        _check_finite(scores, idx)
        dtype = torch.promote_types(scores.dtype, self._pos_v.dtype) if self.num_seen else scores.dtype
        scores = scores.to(dtype)
        rows = idx.unsqueeze(0).expand(self.num_queries, b)
        self._pos_v, self._pos_i = select_top_k(torch.cat([self._pos_v.to(dtype), scores], 1),
                                           torch.cat([self._pos_i, rows], 1), self.k, largest=True)
        self._neg_v, self._neg_i = select_top_k(torch.cat([self._neg_v.to(dtype), scores], 1),
                                           torch.cat([self._neg_i, rows], 1), self.k, largest=False)
        self.num_seen += b
        self.next_index = max(self.next_index, int(idx.max()) + 1)

    def most_positive(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(values, indices)`` ``[Q, min(k, seen)]``, most positive first (most helpful examples)."""
        return self._pos_v.clone(), self._pos_i.clone()

    def most_negative(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(values, indices)`` ``[Q, min(k, seen)]``, most negative first (most harmful examples)."""
        return self._neg_v.clone(), self._neg_i.clone()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Everything needed to resume, as tensors only (e.g. for safetensors)."""
        return {
            "pos_values": self._pos_v.clone(), "pos_indices": self._pos_i.clone(),
            "neg_values": self._neg_v.clone(), "neg_indices": self._neg_i.clone(),
            "num_seen": torch.tensor(self.num_seen, dtype=torch.long),
            "next_index": torch.tensor(self.next_index, dtype=torch.long),
            "k": torch.tensor(self.k, dtype=torch.long),
            "num_queries": torch.tensor(self.num_queries, dtype=torch.long),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = [key for key in ("pos_values", "pos_indices", "neg_values", "neg_indices", "num_seen",
                                   "next_index", "k", "num_queries") if key not in state]
        if missing:
            raise TopKError(f"the top-k state lacks {missing}; it was not written by StreamingTopK.state_dict()")
        if int(state["k"]) != self.k or int(state["num_queries"]) != self.num_queries:
            raise TopKError(
                f"the top-k state is for k={int(state['k'])}, {int(state['num_queries'])} queries; this tracker is "
                f"for k={self.k}, {self.num_queries} queries. Create StreamingTopK with the saved sizes"
            )
        width = min(self.k, int(state["num_seen"]))
        for side in ("pos", "neg"):
            v, i = state[f"{side}_values"], state[f"{side}_indices"]
            if tuple(v.shape) != (self.num_queries, width) or tuple(i.shape) != (self.num_queries, width):
                raise TopKError(f"the top-k state's {side} tensors have shape {tuple(v.shape)}, expected "
                                f"{(self.num_queries, width)}; the state is corrupt")
        self._pos_v, self._pos_i = state["pos_values"].clone(), state["pos_indices"].clone().long()
        self._neg_v, self._neg_i = state["neg_values"].clone(), state["neg_indices"].clone().long()
        self.num_seen = int(state["num_seen"])
        self.next_index = int(state["next_index"])


class ScoreShardWriter:
    """Writes a ``[Q, N]`` score matrix to disk in shards of ``shard_size`` training examples.

    Args:
        directory: created if needed. If it holds an unfinished run of the same identity, the
            writer resumes it: :meth:`resume_from` is the first training index not yet on disk.
        shard_size: training examples per shard file (must match a resumed run).
        num_queries: Q (optional; taken from the first chunk, must match a resumed run).
        topk: also keep a :class:`StreamingTopK` of this ``k``, updated with each shard as it is
            written and saved with it (so top-k and shards always agree after a resume).
        metadata: JSON-serialisable information for the manifest (query ids, the factors' path...).
        identity: what the scores are computed from (JSON: the query gradients', factors' and
            training data's fingerprints, see :func:`scores_identity`), saved in the bundle and
            compared on resume; ``None`` continues the run on disk whatever its identity (only
            its shard size, query count and ``topk`` are checked).
        on_mismatch: what to do when the directory holds a run of another identity, shard size,
            query count or ``topk``: ``"raise"`` (default, a :class:`TopKError` naming what
            differs) or ``"restart"`` (warn naming what differs, discard it and start over).

    Usage::

        writer = ScoreShardWriter(out_dir, shard_size=4096, topk=100, identity={"queries": fp})
        start = writer.resume_from()
        for i0, batch in batches_from(start):      # any batch containing `start` is fine
            writer.write(scorer.score_batch(q, batch).sum(0), start=i0)
        writer.finish(num_train=N)
        scores = writer.read_all()                 # [Q, N]
    """

    def __init__(self, directory: str | os.PathLike, shard_size: int = 4096, num_queries: int | None = None,
                 topk: int | None = None, metadata: dict[str, Any] | None = None,
                 identity: dict[str, Any] | None = None, on_mismatch: str = "raise"):
        if not isinstance(shard_size, int) or shard_size < 1:
            raise TopKError(f"shard_size must be a positive integer, got {shard_size!r}")
        if on_mismatch not in ON_MISMATCH:
            raise TopKError(f"on_mismatch must be one of {ON_MISMATCH}, got {on_mismatch!r}")
        self.directory = Path(directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise TopKError(f"cannot create '{self.directory}' ({err.strerror}); choose another directory") from None
        self.shard_size = shard_size
        self.num_queries = num_queries
        self.k = topk
        self.metadata = dict(metadata or {})
        self.identity = None if identity is None else dict(identity)
        self.topk: StreamingTopK | None = None
        self.shards: list[dict[str, Any]] = []
        self.completed = False
        self.num_train: int | None = None
        self.dtype: torch.dtype | None = None
        self._topk_file: str | None = None
        self._buffer: list[torch.Tensor] = []
        self._buffered = 0
        try:
            json.dumps(self.metadata)
            json.dumps(self.identity)
        except (TypeError, ValueError) as err:
            raise TopKError(f"metadata and identity must be JSON-serialisable ({err})") from None
        if (self.directory / MANIFEST).is_file():
            try:
                bundle = read_bundle(SHARDS_FORMAT, self.directory)
            except TopKError as err:
                # Only a run of ours (an older layout, a corrupt one) may be started over, never
                # another bundle's manifest (the factors', when scores_dir is their output_dir).
                old = read_json_or_none(self.directory / MANIFEST)
                ours = isinstance(old, dict) and old.get("format") in (FORMAT_NAME, "lightning-influence-scores")
                if on_mismatch == "raise" or not ours:
                    raise
                bundle, mismatch = None, err
            mismatch = self._mismatch(bundle) if bundle is not None else mismatch
            if mismatch is None:
                self._resume(bundle)
            elif on_mismatch == "raise":
                raise mismatch
            else:
                warnings.warn(f"[lightning-influence] starting the scores in '{self.directory}' over: {mismatch}")
                # A manifest listing no shard comes first, so no new shard is ever paired with the old run.
                self._write_manifest()
        if self.topk is None and self.k is not None and self.num_queries is not None:
            self.topk = StreamingTopK(self.num_queries, self.k)
        self._remove_stray_files()

    # ------------------------------------------------------------ resume
    def _mismatch(self, bundle) -> TopKError | None:
        """Why the run on disk cannot be continued by this writer (``None`` when it can)."""
        manifest = bundle.manifest
        where = f"the scores in '{self.directory}'"
        if manifest["shard_size"] != self.shard_size:
            return TopKError(f"{where} were written with shard_size={manifest['shard_size']}, not {self.shard_size}; "
                             f"resume with shard_size={manifest['shard_size']} or write to a new directory")
        if self.num_queries is not None and manifest["num_queries"] not in (None, self.num_queries):
            return TopKError(f"{where} hold {manifest['num_queries']} queries, not {self.num_queries}; "
                             "these are other queries: write to a new directory")
        if manifest.get("topk") != self.k:
            return TopKError(f"{where} were written with topk={manifest.get('topk')}, not {self.k}; "
                             f"resume with topk={manifest.get('topk')} or write to a new directory")
        diffs = identity_differences(bundle.identity, self.identity) if self.identity is not None else {}
        if diffs:
            return TopKError(f"{where} were computed from other queries, factors or data "
                             f"({describe_differences(diffs)}); write to a new directory", differences=diffs)
        return None

    def _resume(self, bundle) -> None:
        manifest = bundle.manifest
        self.num_queries = manifest["num_queries"]
        self.shards = list(manifest["shards"])
        for entry in self.shards:
            bundle.require_file(entry["file"])
        self.completed = bool(manifest["completed"])
        self.num_train = manifest.get("num_train")
        self.dtype = getattr(torch, manifest["dtype"]) if manifest.get("dtype") else None
        if not self.metadata:
            self.metadata = dict(manifest.get("metadata") or {})
        if self.identity is None:
            self.identity = dict(bundle.identity)
        self._topk_file = manifest.get("topk_file")
        if self.k is not None and self.num_queries is not None:
            self.topk = StreamingTopK(self.num_queries, self.k)
            if self._topk_file:
                self.topk.load_state_dict(bundle.tensors(self._topk_file))

    def _remove_stray_files(self) -> None:
        """Temporary files of an interrupted write, and shard/top-k files the manifest does not list."""
        keep = {s["file"] for s in self.shards}
        if self._topk_file:
            keep.add(self._topk_file)
        remove_stale_files(SHARDS_FORMAT, self.directory, keep)

    def resume_from(self) -> int:
        """The first training index whose scores are not on disk yet (0 for a new run)."""
        return self.shards[-1]["stop"] if self.shards else 0

    @property
    def next_index(self) -> int:
        """The first training index neither on disk nor buffered: where :meth:`write` continues."""
        return self.resume_from() + self._buffered

    # ------------------------------------------------------------ writing
    def write(self, scores: torch.Tensor, start: int) -> None:
        """Append the scores ``[Q, B]`` of training examples ``start .. start + B - 1``.

        Columns already written (a resumed run restarting from an earlier batch) are skipped;
        a gap after :attr:`next_index` is an error.
        """
        if self.completed:
            raise TopKError(f"the scores in '{self.directory}' are complete; read them with read_all() "
                            "or write a new run to another directory")
        if scores.dim() != 2:
            raise TopKError(f"expected a [Q, B] score chunk, got shape {tuple(scores.shape)}")
        if self.num_queries is None:
            self.num_queries = scores.shape[0]
            if self.k is not None:
                self.topk = StreamingTopK(self.num_queries, self.k)
        if scores.shape[0] != self.num_queries:
            raise TopKError(f"the chunk has {scores.shape[0]} query rows, the run has {self.num_queries}")
        if not scores.dtype.is_floating_point:
            raise TopKError(f"scores must be floating point, got {scores.dtype}")
        expected = self.next_index
        b = scores.shape[1]
        if start > expected:
            raise TopKError(f"the chunk starts at training index {start} but the scores stop at {expected}; "
                            f"feed the batches from index {expected} (resume_from() gives the restart point)")
        skip = expected - start
        if skip >= b:
            return
        if self.dtype is None:
            self.dtype = scores.dtype
        chunk = scores.detach().to("cpu", self.dtype)[:, skip:]
        _check_finite(chunk, torch.arange(expected, expected + chunk.shape[1]))
        self._buffer.append(chunk)
        self._buffered += chunk.shape[1]
        while self._buffered >= self.shard_size:
            self._flush(self.shard_size)

    def _flush(self, width: int) -> None:
        data = torch.cat(self._buffer, 1) if len(self._buffer) > 1 else self._buffer[0]
        shard, rest = data[:, :width].contiguous(), data[:, width:]
        self._buffer = [rest] if rest.shape[1] else []
        self._buffered = rest.shape[1]
        start = self.resume_from()
        number = len(self.shards)
        name = _SHARD.format(number)
        new = {name: {"scores": shard}}
        topk_file = None
        if self.topk is not None:
            self.topk.update(shard, start)
            topk_file = _TOPK.format(number)
            new[topk_file] = self.topk.state_dict()
        kept = [s["file"] for s in self.shards]
        self.shards.append({"file": name, "start": start, "stop": start + shard.shape[1]})
        try:
            self._write_manifest(new, kept, topk_file)
        except BaseException:
            self.shards.pop()
            raise
        self._topk_file = topk_file

    def _write_manifest(self, new: dict | None = None, kept: list[str] | None = None,
                        topk_file: str | None = None) -> None:
        """One atomic bundle write: the new shard and top-k files, then the manifest listing them."""
        keep = list(kept or [])
        if topk_file is None and self._topk_file and not new:
            topk_file = self._topk_file
            keep.append(topk_file)
        write_bundle(SHARDS_FORMAT, self.directory, {
            "num_queries": self.num_queries,
            "shard_size": self.shard_size,
            "dtype": str(self.dtype).removeprefix("torch.") if self.dtype is not None else None,
            "shards": self.shards,
            "completed": self.completed,
            "num_train": self.num_train,
            "topk": self.k,
            "topk_file": topk_file,
            "metadata": self.metadata,
        }, identity=self.identity, tensors=new, keep=keep)

    def finish(self, num_train: int | None = None) -> Path:
        """Write the last (partial) shard and mark the run complete.

        ``num_train`` (the training set's size), when given, must equal the scores written.
        """
        if self.completed:
            return self.directory
        if self._buffered:
            self._flush(self._buffered)
        total = self.resume_from()
        if num_train is not None and num_train != total:
            raise TopKError(f"{total} training examples were scored but num_train={num_train}; "
                            f"feed the remaining batches from index {total} before finish()")
        if total == 0:
            raise TopKError("no scores were written; nothing to finish")
        self.completed = True
        self.num_train = total
        self._write_manifest(kept=[s["file"] for s in self.shards])
        return self.directory

    def read_all(self, allow_incomplete: bool = False) -> torch.Tensor:
        """The scores on disk reassembled as ``[Q, N]`` (see :func:`read_scores`)."""
        return read_scores(self.directory, allow_incomplete=allow_incomplete)


def scores_identity(queries: Any, factors: Any, layers: Sequence[str], train_data: Any,
                    dtype: torch.dtype) -> dict[str, Any]:
    """What a score run depends on, for :class:`ScoreShardWriter`'s ``identity``: the preconditioned
    queries, the factors, the layers scored, the compute dtype and the training data."""
    from lightning_influence.scoring.query_store import query_gradients_fingerprint
    from lightning_influence.store import data_fingerprint, factors_fingerprint

    return {"queries": query_gradients_fingerprint(queries), "factors": factors_fingerprint(factors),
            "layers": list(layers), "dtype": str(dtype).removeprefix("torch."), "data": data_fingerprint(train_data)}


# --------------------------------------------------------------- reading
def read_score_manifest(directory: str | os.PathLike) -> dict:
    """The manifest of a score-shard run (checked for format, version and its file list)."""
    return read_bundle(SHARDS_FORMAT, directory).manifest


def read_scores(directory: str | os.PathLike, allow_incomplete: bool = False) -> torch.Tensor:
    """All shards of a run as one ``[Q, N]`` tensor, checking their ranges and checksums.

    An unfinished run raises unless ``allow_incomplete`` (then the scores written so far).
    """
    directory = Path(directory)
    bundle = read_bundle(SHARDS_FORMAT, directory)
    manifest = bundle.manifest
    if not manifest["completed"] and not allow_incomplete:
        raise TopKError(f"the scoring run in '{directory}' is unfinished (scores up to training index "
                        f"{manifest['shards'][-1]['stop'] if manifest['shards'] else 0}); resume it with "
                        "ScoreShardWriter on the same directory, or pass allow_incomplete=True")
    parts, expected = [], 0
    for entry in manifest["shards"]:
        if entry["start"] != expected:
            raise TopKError(f"{directory / MANIFEST} lists shards that are not contiguous at index {expected}")
        t = bundle.tensors(entry["file"])["scores"]
        if t.shape[1] != entry["stop"] - entry["start"]:
            raise TopKError(f"{directory / entry['file']} holds {t.shape[1]} columns, the manifest says "
                            f"{entry['stop'] - entry['start']}")
        parts.append(t)
        expected = entry["stop"]
    if not parts:
        q = manifest["num_queries"] or 0
        return torch.empty(q, 0, dtype=getattr(torch, manifest["dtype"] or "float32"))
    return torch.cat(parts, 1)
