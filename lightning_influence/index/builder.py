"""Building a gradient index: one pass over the training data, shards written as they fill.

:class:`IndexWriter` is the per-batch step, usable from any backward that has a training batch's
per-layer tensors: from captured tokens (:meth:`IndexWriter.add_tokens`, what :func:`build_index`
feeds it through the scorer's capture) or from per-example gradients already rotated into the
eigenbasis (:meth:`IndexWriter.add_rotated`, what the EK-FAC eigenvalue-correction pass forms), so
that the index can be written inside that pass with no extra pass over the data.

Memory stays flat: at most one shard of vectors (``shard_size`` rows) is held. Each rank writes its
own rank bundle and shards (``index/store.py``); a writer opened on a directory with an interrupted
build of the same identity keeps the completed shards and checks that the batches it skips hold the
same data.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler

from lightning_influence.errors import GradientIndexError
from lightning_influence.factors import InfluenceFactors
from lightning_influence.store import (ensure_writable_dir, new_tensor_name, read_bundle,
                                       weights_fingerprint, write_bundle)
from lightning_influence.tasks import Task
from lightning_influence.index.projection import Compression, IndexOptions, block_layouts
from lightning_influence.index.store import (INDEX_FORMAT, compression_fingerprint, digests_fingerprint,
                                             example_digests, factors_identity, rank_format)

log = logging.getLogger(__name__)

__all__ = ["IndexWriter", "PassFeed", "build_index", "index_identity"]


def index_identity(factors: InfluenceFactors, model: nn.Module, compression: Compression,
                   compression_tensors: dict[str, torch.Tensor]) -> dict:
    """What an index's vectors depend on (the data is checked per example, through the shards' digests)."""
    options = compression.options
    return {
        "factors": factors_identity(factors, options.preconditioner),
        "weights": weights_fingerprint(model),
        "compression": compression_fingerprint(compression_tensors),
        "options": options.compression_json(),
        "strategy": factors.strategy,
        "blocks": block_layouts(factors),  # per layer [S block, A block], None for a dense side
        "layers": {n: list(c.out_shape) for n, c in compression.layers.items()},
        "width": compression.width,
    }


class IndexWriter:
    """Writes one rank's share of a gradient index, batch by batch.

    Use::

        writer = IndexWriter(directory, factors, model, options)
        for batch in loader:
            if writer.begin_batch(batch):          # False: already in a completed shard (resume)
                ...  # in the batch's backward, per layer:
                writer.add_tokens(name, a, s)       # or add_rotated(name, Q_S^T DW Q_A),
                                                    # or add_rotated_tokens(name, a Q_A, s Q_S)
            writer.end_batch()
        writer.close()

    The per-layer tensors must be those of the training loss with the dataset's labels (the
    gradient the exact scores use), padding tokens zeroed.

    Args:
        directory: the index directory (created if needed).
        factors: the factors the compression is chosen from: complete ones, or EK-FAC factors whose
            eigenbases are fitted (phase ``eigen``) with ``preconditioner="query"``.
        model: fingerprinted into the identity.
        options: :class:`IndexOptions`.
        rank, world_size: this process's share under data parallelism (each rank writes its own
            rank bundle and shards; rank 0 also writes the index bundle, ``manifest.json``).
        device, dtype: where and in which dtype vectors are computed (stored in ``options.dtype``).
    """

    def __init__(self, directory: str | os.PathLike, factors: InfluenceFactors, model: nn.Module,
                 options: IndexOptions | None = None, rank: int = 0, world_size: int = 1,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        options = options or IndexOptions()
        if not isinstance(world_size, int) or world_size < 1 or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise GradientIndexError(f"rank must be in [0, world_size) and world_size >= 1, got rank={rank!r}, "
                                     f"world_size={world_size!r}")
        self.directory = Path(directory)
        ensure_writable_dir(self.directory, GradientIndexError, "index directory", "choose another directory")
        self.factors = factors
        self.options = options
        self.rank, self.world_size = rank, world_size
        self.format = rank_format(rank)
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.dtype = dtype
        self.compression = Compression.from_factors(factors, options)
        compression_tensors = self.compression.tensors()
        self.identity = index_identity(factors, model, self.compression, compression_tensors)
        self._eigvecs = {n: self.compression.eigvecs(factors, n, self.device, dtype) for n in factors.layers}
        if rank == 0:
            self._write_index_bundle(compression_tensors)
        self._shards: list[dict] = []
        self._done_digests = torch.empty(0, 32, dtype=torch.uint8)  # of the examples in completed shards
        self._done_examples = torch.empty(0, dtype=torch.long)
        self._resume()
        self._batch_index = 0
        self._next_example = 0
        self._pending: dict[str, torch.Tensor] | None = None
        self._buffer: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._buffer_rows = 0
        self._buffer_first_batch = 0
        self.closed = False

    # ----------------------------------------------------------------- opening
    def _write_index_bundle(self, compression_tensors: dict[str, torch.Tensor]) -> None:
        if (self.directory / INDEX_FORMAT.manifest).exists():
            try:
                existing = read_bundle(INDEX_FORMAT, self.directory)
            except GradientIndexError as err:
                raise GradientIndexError(f"'{self.directory}' already holds other files ({err}); choose another "
                                         "directory for the index") from None
            if existing.identity != self.identity or existing.manifest.get("world_size") != self.world_size:
                other = "another number of ranks" if existing.identity == self.identity else \
                    "an index of other factors, model or options"
                raise GradientIndexError(f"'{self.directory}' already holds {other}; delete it or choose another "
                                         "directory")
            return
        name = new_tensor_name(INDEX_FORMAT)
        write_bundle(INDEX_FORMAT, self.directory, {"world_size": self.world_size, "compression_file": name},
                     self.identity, {name: compression_tensors})

    def _resume(self) -> None:
        if (self.directory / self.format.manifest).exists():
            try:
                state = read_bundle(self.format, self.directory)
            except GradientIndexError as err:
                log.warning("not resuming the index build of rank %d: %s", self.rank, err)
                state = None
            if state is not None:
                if state.identity != self.identity:
                    raise GradientIndexError(
                        f"'{self.directory}' holds an interrupted build for other factors, model or options (rank "
                        f"{self.rank}); delete it or choose another directory"
                    )
                for shard in state.manifest.get("shards", []):
                    try:
                        done = state.tensors(shard["file"])
                    except GradientIndexError:
                        break  # a damaged shard: redo it and everything after it
                    self._done_digests = torch.cat([self._done_digests, done["digests"]])
                    self._done_examples = torch.cat([self._done_examples, done["examples"]])
                    self._shards.append(shard)
                if self._shards:
                    log.info("resuming the index build of rank %d after %d completed shards (%d examples)",
                             self.rank, len(self._shards), self._done_digests.shape[0])
        # Rewritten now: the kept shards only (shards of this rank no manifest names are swept).
        self._write_rank_bundle(complete=False)

    def _write_rank_bundle(self, complete: bool, shard: tuple[dict, dict[str, torch.Tensor]] | None = None) -> None:
        """Rewrite this rank's manifest: the completed shards (plus ``shard``, a new one) and the state."""
        records = self._shards + ([shard[0]] if shard is not None else [])
        fields = {"rank": self.rank, "world_size": self.world_size, "complete": complete, "shards": records,
                  "num_examples": sum(r["rows"] for r in records)}
        if complete:
            fields["data"] = digests_fingerprint(self._done_examples, self._done_digests)
        write_bundle(self.format, self.directory, fields, self.identity,
                     {shard[0]["file"]: shard[1]} if shard is not None else None,
                     keep=[r["file"] for r in self._shards])
        if shard is not None:
            self._shards.append(shard[0])

    @property
    def _done_batches(self) -> int:
        return sum(s["num_batches"] for s in self._shards)

    # ----------------------------------------------------------------- per batch
    def begin_batch(self, batch: Any, examples: torch.Tensor | None = None, batch_size: int | None = None) -> bool:
        """Start a training batch; return whether its vectors are wanted (``False``: a completed shard holds it).

        ``examples`` are the batch's dataset positions (``[B]``); by default the running count of
        examples this writer has seen (right for one process over a non-shuffled loader).
        """
        if self._pending is not None:
            raise GradientIndexError("begin_batch called twice without end_batch")
        n = batch_size if batch_size is not None else (len(examples) if examples is not None else _batch_size(batch))
        if examples is None:
            if self.world_size > 1:
                raise GradientIndexError(
                    "under data parallelism each batch needs its dataset positions: iterate "
                    "loaders.rebuild_loader(loader, indexed=True) and pass examples= (build_index(indexed=True))"
                )
            examples = torch.arange(self._next_example, self._next_example + n)
        examples = torch.as_tensor(examples, dtype=torch.long).reshape(-1).cpu()
        self._next_example += n
        digests = example_digests(batch, n)
        start = self._batch_index
        self._batch_index += 1
        if start < self._done_batches:
            offset = self._examples_before(start)
            if not torch.equal(self._done_digests[offset:offset + n], digests):
                raise GradientIndexError(
                    f"batch {start} holds other data than when the interrupted index build in '{self.directory}' saw "
                    "it; resume with the same data in the same order, or delete the directory to build anew"
                )
            return False
        self._pending = {"examples": examples, "digests": digests}
        self._parts: dict[str, torch.Tensor] = {}
        return True

    def _examples_before(self, batch_index: int) -> int:
        if not hasattr(self, "_batch_offsets"):
            self._batch_offsets = {}
            offset = 0
            for shard in self._shards:
                for b, rows in zip(range(shard["first_batch"], shard["first_batch"] + shard["num_batches"]),
                                   shard["batch_rows"]):
                    self._batch_offsets[b] = offset
                    offset += rows
        return self._batch_offsets[batch_index]

    def add_tokens(self, name: str, a: torch.Tensor, s: torch.Tensor) -> None:
        """A layer's captured tokens ``a`` ``[B, T, d_in]`` and ``s`` ``[B, T, d_out]`` (padding zeroed)."""
        self._check_open(name)
        a, s = a.to(self.device, self.dtype), s.to(self.device, self.dtype)
        self._parts[name] = self.compression.layers[name].from_tokens(a, s, self._eigvecs[name])

    def add_rotated(self, name: str, rotated: torch.Tensor) -> None:
        """A layer's per-example gradients ``[B, d_out, d_in]`` already in its basis (``Q_S^T DW Q_A``)."""
        self._check_open(name)
        self._parts[name] = self.compression.layers[name].from_rotated(rotated.to(self.device, self.dtype))

    def add_rotated_tokens(self, name: str, a_rotated: torch.Tensor, s_rotated: torch.Tensor) -> None:
        """A layer's tokens already rotated into its eigenbasis, ``a Q_A`` ``[B, T, d_in]`` and ``s Q_S``
        ``[B, T, d_out]`` (padding zeroed): what the eigenvalue-correction pass forms before its per-example
        gradients. Cheaper than :meth:`add_rotated` when the index side carries no weight (``query``)."""
        self._check_open(name)
        self._parts[name] = self.compression.layers[name].from_rotated_tokens(a_rotated.to(self.device, self.dtype),
                                                                               s_rotated.to(self.device, self.dtype))

    def _check_open(self, name: str) -> None:
        if self._pending is None:
            raise GradientIndexError("add_tokens/add_rotated outside begin_batch ... end_batch (or for a batch "
                                     "begin_batch said is already indexed)")
        if name not in self.compression.layers:
            raise GradientIndexError(f"layer '{name}' is not in the index's factors")

    def end_batch(self) -> None:
        """Finish the batch started by :meth:`begin_batch` (a no-op for a skipped batch)."""
        if self._pending is None:
            return
        missing = [n for n in self.compression.layers if n not in self._parts]
        if missing:
            raise GradientIndexError(f"the batch gave no tensors for layers {missing[:10]}")
        n = self._pending["examples"].numel()
        vectors = torch.cat([self._parts[name] for name in self.compression.layers], dim=1)
        if vectors.shape[0] != n:
            raise GradientIndexError(f"the batch has {n} examples but its tensors {vectors.shape[0]}")
        if not torch.isfinite(vectors).all():
            raise GradientIndexError(f"batch {self._batch_index - 1} gave non-finite gradients; check the model's "
                                     "outputs and the loss on that batch")
        if not self._buffer:
            self._buffer_first_batch = self._batch_index - 1
        self._buffer.append((vectors.to(self.options.storage_dtype).cpu(), self._pending["examples"],
                             self._pending["digests"]))
        self._buffer_rows += n
        self._pending, self._parts = None, {}
        if self._buffer_rows >= self.options.shard_size:
            self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        tensors = {"vectors": torch.cat([b[0] for b in self._buffer]),
                   "examples": torch.cat([b[1] for b in self._buffer]),
                   "digests": torch.cat([b[2] for b in self._buffer])}
        record = {"file": new_tensor_name(self.format), "rows": int(tensors["examples"].numel()),
                  "first_batch": self._buffer_first_batch, "num_batches": len(self._buffer),
                  "batch_rows": [int(b[1].numel()) for b in self._buffer]}
        self._write_rank_bundle(complete=False, shard=(record, tensors))
        self._done_digests = torch.cat([self._done_digests, tensors["digests"]])
        self._done_examples = torch.cat([self._done_examples, tensors["examples"]])
        self._buffer, self._buffer_rows = [], 0

    def close(self) -> Path:
        """Write the last shard and mark this rank's share complete. Returns the directory."""
        if self._pending is not None:
            raise GradientIndexError("close() inside a batch: call end_batch() first")
        if self._batch_index < self._done_batches:
            raise GradientIndexError(
                f"the data has {self._batch_index} batches but the interrupted build already indexed "
                f"{self._done_batches}; resume with the same data, or delete '{self.directory}'"
            )
        self._flush()
        if not self._shards:
            raise GradientIndexError("the training dataloader is empty: nothing to index")
        self._write_rank_bundle(complete=True)
        self.closed = True
        return self.directory


class PassFeed:
    """An :class:`IndexWriter` as the consumer of a statistics pass (``passes.run_phase(..., consumer=)``).

    Iterate :meth:`batches` as the pass's data: it strips the dataset positions of an indexed loader
    (``loaders.rebuild_loader(loader, indexed=True)``, this rank's shard) and hands them to the writer
    with each batch, so that every rank writes its share numbered by dataset position.
    """

    def __init__(self, writer: IndexWriter, indexed_batches: Iterable[tuple[torch.Tensor, Any]]):
        self.writer = writer
        self._indexed = indexed_batches
        self._examples: torch.Tensor | None = None

    def batches(self) -> Iterable[Any]:
        for examples, batch in self._indexed:
            self._examples = examples
            yield batch

    def begin_batch(self, batch: Any) -> bool:
        return self.writer.begin_batch(batch, self._examples)

    def add_rotated_tokens(self, name: str, a_rotated: torch.Tensor, s_rotated: torch.Tensor) -> None:
        self.writer.add_rotated_tokens(name, a_rotated, s_rotated)

    def add_rotated(self, name: str, rotated: torch.Tensor) -> None:
        self.writer.add_rotated(name, rotated)

    def end_batch(self) -> None:
        self.writer.end_batch()

    def close(self) -> Path:
        return self.writer.close()


def _batch_size(batch: Any) -> int:
    from lightning_influence.tasks import batch_size_of

    return batch_size_of(batch)


def build_index(model: nn.Module, task: Task, factors: InfluenceFactors, train_loader: Iterable[Any],
                directory: str | os.PathLike, options: IndexOptions | None = None, rank: int = 0,
                world_size: int = 1, indexed: bool = False, device: torch.device | str | None = None,
                dtype: torch.dtype = torch.float32, progress: Callable[[int], None] | None = None) -> Path:
    """Stream ``train_loader`` once and write its compressed, preconditioned gradients to ``directory``.

    Each example's per-layer gradient of the training loss (dataset labels, padding excluded, the same
    capture the exact scores use) is rotated into the factors' basis, truncated, weighted and
    projected (see :class:`IndexOptions`) and appended to the current shard. A build that was killed
    resumes after its last completed shard when called again with the same arguments.

    Args:
        model, task, factors: as for :class:`InfluenceScorer` (factors of any strategy, complete).
        train_loader: the training batches, in a fixed order (no shuffling): an example's index
            position is its position in this loader, unless ``indexed``.
        directory: where the index is written.
        options: :class:`IndexOptions` (default: orthogonal projection 48 per side, ``sqrt`` placement).
        rank, world_size: under data parallelism, this rank's share (each rank passes its own batches
            with ``indexed=True``).
        indexed: the loader yields ``(dataset_indices, batch)`` pairs (``loaders.rebuild_loader(...,
            indexed=True)``).
        device, dtype: compute device and dtype (float32 default; float64 for tests).
        progress: called with each batch's number of examples.

    Returns the directory; open it with :meth:`GradientIndex.load`.
    """
    from lightning_influence.scoring.engine import InfluenceScorer

    if isinstance(train_loader, DataLoader) and isinstance(train_loader.sampler, RandomSampler):
        raise GradientIndexError(
            "the training dataloader shuffles: an index numbers examples by their position in it. Pass a loader "
            "with shuffle=False (e.g. loaders.rebuild_loader(loader))"
        )
    scorer = InfluenceScorer(model, task, factors, device=device, score_dtype=dtype)
    writer = IndexWriter(directory, factors, model, options, rank=rank, world_size=world_size,
                         device=scorer.device, dtype=dtype)
    for i, item in enumerate(train_loader):
        examples, batch = item if indexed else (None, item)
        if writer.begin_batch(batch, examples):
            scorer.stream(batch, False, writer.add_tokens, batch_index=i)
        writer.end_batch()
        if progress is not None:
            progress(task.batch_size(batch))
    return writer.close()
