"""Prediction writers: consume the ``(indices, scores)`` that a scoring predict step yields.

``InfluenceModule``'s predict steps return, per training batch, the batch's dataset indices
and its layer-wise scores (``[L, Q, B]`` against queries, ``[L, B]`` for self-influence). A
writer turns that stream into the answer, on every data-parallel rank:

* :class:`ScoreMatrixWriter`: the whole score matrix in dataset order (``[Q, N]``, or
  ``[L, Q, N]`` with ``per_layer``), gathered across ranks at epoch end;
* :class:`TopKWriter`: a :class:`~lightning_influence.scoring.topk.StreamingTopK` per rank
  (O(Q k) memory), merged across ranks at epoch end;
* :class:`ShardWriter`: every score written to safetensors shards (and the top-k kept with
  them). One process streams straight to disk (and resumes); under data parallelism each rank
  keeps its ``[Q, N / world]`` columns and rank zero writes them in shard-sized windows.

The collectives run at epoch end, where every rank of a predict loop arrives (an empty shard
included), and through ``trainer.strategy``. Called directly (``add`` then ``finish``) with
:data:`SINGLE_PROCESS`, a writer never enters a collective: that is how the in-process API uses
them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from lightning_influence.errors import ScoringError
from lightning_influence.scoring.topk import ScoreShardWriter, StreamingTopK, select_top_k

__all__ = ["Collective", "SINGLE_PROCESS", "ScoreMatrixWriter", "TopKWriter", "ShardWriter",
           "gather_columns", "merge_top_k"]


class Collective(Protocol):
    """The part of a Lightning ``Strategy`` the writers use (``trainer.strategy`` is one)."""

    world_size: int
    is_global_zero: bool
    root_device: torch.device

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor: ...
    def broadcast(self, obj: Any, src: int = 0) -> Any: ...
    def barrier(self, name: str | None = None) -> None: ...


class _SingleProcess:
    """A world of one: no process group is ever touched (the in-process API's collective)."""

    world_size = 1
    is_global_zero = True
    global_rank = 0
    root_device = torch.device("cpu")

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.unsqueeze(0)

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        return obj

    def barrier(self, name: str | None = None) -> None:
        pass


SINGLE_PROCESS: Collective = _SingleProcess()


def _gather_padded(collective: Collective, tensor: torch.Tensor, fill: float = 0.0) -> list[torch.Tensor]:
    """Every rank's ``tensor`` (same shape except the last dimension), as a list on the CPU."""
    if collective.world_size == 1:
        return [tensor]
    device = collective.root_device
    size = torch.tensor([tensor.shape[-1]], device=device)
    sizes = [int(s) for s in collective.all_gather(size).reshape(-1).tolist()]
    pad = max(sizes) - tensor.shape[-1]
    padded = torch.nn.functional.pad(tensor.to(device), (0, pad), value=fill)
    gathered = collective.all_gather(padded).cpu()
    return [gathered[r][..., : sizes[r]] for r in range(collective.world_size)]


def gather_columns(collective: Collective, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``values[..., n_local]`` of every rank, ordered by their global dataset ``indices``."""
    all_idx = _gather_padded(collective, indices.reshape(-1).long(), fill=-1)
    all_val = _gather_padded(collective, values)
    idx, val = torch.cat(all_idx), torch.cat(all_val, dim=-1)
    return val[..., torch.argsort(idx)]


def merge_top_k(collective: Collective, top: StreamingTopK) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The global top-k from every rank's :class:`StreamingTopK` (ties: lower index first)."""
    result = {"positive": top.most_positive(), "negative": top.most_negative()}
    if collective.world_size == 1:
        return result
    merged = {}
    for side, (values, indices) in result.items():
        largest = side == "positive"
        fill = float("-inf") if largest else float("inf")
        v = torch.cat(_gather_padded(collective, values.double(), fill=fill), 1)
        i = torch.cat(_gather_padded(collective, indices, fill=-1), 1)
        # Padding sorts last (worst value); among equal values the padding index -1 would win a tie, so
        # move it to the end of the index order first.
        i = i.masked_fill(i < 0, torch.iinfo(torch.long).max)
        v, i = select_top_k(v, i, top.k, largest=largest)
        keep = (i != torch.iinfo(torch.long).max).all(0)
        merged[side] = (v[:, keep].to(values.dtype), i[:, keep])
    return merged


class _ScoreWriter(BasePredictionWriter):
    """Consumes ``(indices, layer_scores)`` per batch; :attr:`result` holds the answer after ``finish``."""

    def __init__(self) -> None:
        super().__init__(write_interval="batch")
        self.result: Any = None
        self._batches = 0

    # ------------------------------------------------------------ Lightning's side
    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx,
                           dataloader_idx=0) -> None:
        indices, scores = prediction
        self.add(indices, scores)

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        # Every rank arrives here, also one whose shard was empty: the collectives are safe.
        self.result = self.finish(trainer.strategy)

    # ------------------------------------------------------------ the stream
    def add(self, indices: torch.Tensor, layer_scores: torch.Tensor) -> None:
        self._batches += 1
        self._add(indices.detach().reshape(-1).cpu().long(), layer_scores.detach().cpu())

    def _add(self, indices: torch.Tensor, layer_scores: torch.Tensor) -> None:
        raise NotImplementedError

    def finish(self, collective: Collective = SINGLE_PROCESS) -> Any:
        raise NotImplementedError

    def _check_nonempty(self, collective: Collective) -> None:
        batches = self._batches
        if collective.world_size > 1:
            batches = int(collective.all_gather(torch.tensor([batches], device=collective.root_device)).sum())
        if batches == 0:
            raise ScoringError("the training dataloader is empty: there is nothing to score")


class ScoreMatrixWriter(_ScoreWriter):
    """Gathers the scores of every training example in dataset order.

    ``result``: ``[Q, N]`` (``[N]`` for self-influence), or with ``per_layer`` ``[L, Q, N]`` (``[L, N]``).
    Without ``per_layer`` the layers are summed per batch, so only ``[Q, N]`` is ever held.
    """

    def __init__(self, per_layer: bool = False, empty_shape: tuple[int, ...] = (),
                 empty_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.per_layer = per_layer
        # The leading shape ([L, Q] or [L]) and dtype of a rank's columns, for a rank that scored nothing.
        self.empty_shape, self.empty_dtype = empty_shape, empty_dtype
        self._indices: list[torch.Tensor] = []
        self._values: list[torch.Tensor] = []

    def _add(self, indices, layer_scores) -> None:
        self._indices.append(indices)
        self._values.append(layer_scores if self.per_layer else layer_scores.sum(0))

    def finish(self, collective: Collective = SINGLE_PROCESS) -> torch.Tensor:
        self._check_nonempty(collective)
        if self._values:
            indices, values = torch.cat(self._indices), torch.cat(self._values, dim=-1)
        else:
            shape = self.empty_shape if self.per_layer else self.empty_shape[1:]
            indices, values = torch.zeros(0, dtype=torch.long), torch.zeros(*shape, 0, dtype=self.empty_dtype)
        self._indices, self._values = [], []
        self.result = gather_columns(collective, indices, values)
        return self.result


class TopKWriter(_ScoreWriter):
    """The ``k`` most positive and most negative training examples per query, merged across ranks.

    ``result``: ``{"positive": (values, indices), "negative": (values, indices)}``, each ``[Q, k]``.
    """

    def __init__(self, num_queries: int, k: int) -> None:
        super().__init__()
        self.top = StreamingTopK(num_queries, k)

    def _add(self, indices, layer_scores) -> None:
        self.top.update(layer_scores.sum(0), indices)

    def finish(self, collective: Collective = SINGLE_PROCESS) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        self._check_nonempty(collective)
        self.result = merge_top_k(collective, self.top)
        return self.result


class ShardWriter(_ScoreWriter):
    """Writes every score to safetensors shards under ``directory`` and keeps the top-k with them.

    In one process the chunks stream to a :class:`ScoreShardWriter` as they come (an interrupted
    run resumes after its last shard: :meth:`resume_from`). Under data parallelism (``distributed``)
    each rank keeps its columns and, at ``finish``, rank zero writes them window by window.
    ``result`` is the merged top-k, as :class:`TopKWriter`'s; ``layer_abs_sums`` ``[num_layers]`` the
    summed ``|score|`` of each layer over the pairs scored by this writer (all ranks after ``finish``).
    """

    def __init__(self, directory: str | Path, num_queries: int, k: int, shard_size: int = 4096,
                 distributed: bool = False, metadata: dict | None = None, num_layers: int = 1,
                 empty_dtype: torch.dtype = torch.float32, identity: dict | None = None) -> None:
        super().__init__()
        self.directory = Path(directory)
        self.num_queries, self.k, self.shard_size = num_queries, k, shard_size
        self.distributed = distributed
        self.metadata = metadata
        self.identity = identity
        self.empty_dtype = empty_dtype  # the scores' dtype, for a rank whose shard is empty
        self._shards: ScoreShardWriter | None = None
        if not distributed:
            # An unfinished run of the same identity resumes; one of another identity is started over.
            self._shards = ScoreShardWriter(self.directory, shard_size=shard_size, num_queries=num_queries, topk=k,
                                            metadata=metadata, identity=identity, on_mismatch="restart")
        self._indices: list[torch.Tensor] = []
        self._values: list[torch.Tensor] = []
        # Per layer, the summed |score| over every pair this writer saw (the report's layer shares),
        # so that the layer breakdown never needs the [L, Q, N] scores.
        self.layer_abs_sums = torch.zeros(num_layers, dtype=torch.float64)

    @property
    def completed(self) -> bool:
        return self._shards is not None and self._shards.completed

    def on_predict_start(self, trainer, pl_module) -> None:
        if self.distributed:
            self.check_directory_free(trainer.strategy)

    def check_directory_free(self, collective: Collective) -> None:
        """Under data parallelism: refuse, on every rank together, a directory that already holds scores.

        Rank zero looks (the others may not see its filesystem) and broadcasts what it found, so
        that no rank raises while the others wait in a collective.
        """
        occupied = (self.directory / "manifest.json").is_file() if collective.is_global_zero else None
        if collective.broadcast(occupied, 0):
            raise ScoringError(f"'{self.directory}' already holds scores; write a distributed run to a new "
                               "directory (resuming an interrupted run works in one process)")

    def resume_from(self) -> int:
        """The first training index not on disk yet (0 under data parallelism: no resume there)."""
        return self._shards.resume_from() if self._shards is not None else 0

    def _add(self, indices, layer_scores) -> None:
        self.layer_abs_sums += layer_scores.double().abs().reshape(layer_scores.shape[0], -1).sum(1)
        scores = layer_scores.sum(0)
        if self._shards is not None:
            if indices.numel() and not torch.equal(indices, torch.arange(int(indices[0]), int(indices[0]) + len(indices))):
                raise ScoringError("score shards need the training batches in dataset order (a non-shuffled loader)")
            if indices.numel():
                self._shards.write(scores, start=int(indices[0]))
            return
        self._indices.append(indices)
        self._values.append(scores)

    def finish(self, collective: Collective = SINGLE_PROCESS) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        if self._shards is not None:
            if not self._shards.completed:
                if self._shards.resume_from() == 0 and not self._shards.next_index:
                    self._check_nonempty(collective)
                self._shards.finish()
            self.result = {"positive": self._shards.topk.most_positive(),
                           "negative": self._shards.topk.most_negative()}
            return self.result
        self._check_nonempty(collective)
        indices = torch.cat(self._indices) if self._indices else torch.zeros(0, dtype=torch.long)
        values = torch.cat(self._values, 1) if self._values else torch.zeros(self.num_queries, 0,
                                                                             dtype=self.empty_dtype)
        self._indices, self._values = [], []
        total = int(collective.all_gather(torch.tensor([indices.numel()], device=collective.root_device)).sum())
        if collective.world_size > 1:
            self.layer_abs_sums = torch.stack(_gather_padded(collective, self.layer_abs_sums)).sum(0)
        writer = None
        if collective.is_global_zero:
            # A distributed run is written afresh (checked at predict start): its columns were scattered over ranks.
            writer = ScoreShardWriter(self.directory, shard_size=self.shard_size, num_queries=self.num_queries,
                                      topk=self.k, metadata=self.metadata, identity=self.identity)
        # Window by window (shard_size columns each): no rank ever holds more than its own columns
        # plus one window; every rank runs the same number of gathers.
        for start in range(0, total, self.shard_size):
            stop = min(total, start + self.shard_size)
            inside = (indices >= start) & (indices < stop)
            window = gather_columns(collective, indices[inside], values[:, inside])
            if writer is not None:
                writer.write(window, start=start)
        top = None
        if writer is not None:
            writer.finish(num_train=total)
            top = {"positive": writer.topk.most_positive(), "negative": writer.topk.most_negative()}
        self.result = collective.broadcast(top, 0)
        collective.barrier("influence_shards_written")
        return self.result
