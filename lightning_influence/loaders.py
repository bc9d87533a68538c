"""Dataloaders for influence passes: deterministic order, sharded across ranks, indexed.

Influence passes must not inherit a training loader's shuffling or its
``DistributedSampler`` padding (which repeats examples so that ranks are even): the
statistics would count some examples twice and scores would not come back in
dataset order. These helpers rebuild a ``DataLoader`` over the same dataset, batch
size, collate function and workers, with a sequential sampler sharded by rank.
Nothing here enters a collective: merging the ranks' results is the Lightning glue's
job (``integration/writer.py``), through ``trainer.strategy``.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler
from torch.utils.data.dataloader import default_collate

__all__ = ["ShardSampler", "rebuild_loader", "IndexedDataset", "IndexCollate", "dist_info"]


def dist_info() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class ShardSampler(Sampler[int]):
    """Indices ``start + rank, start + rank + world, ...`` of ``range(n)``: each example once across ranks.

    ``start`` skips examples already processed (a resumed scoring run).
    """

    def __init__(self, n: int, rank: int = 0, world_size: int = 1, start: int = 0):
        self.n, self.rank, self.world_size, self.start = n, rank, world_size, start

    def _range(self) -> range:
        return range(self.start + self.rank, self.n, self.world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self._range())

    def __len__(self) -> int:
        return len(self._range())


class IndexedDataset(Dataset):
    """Wraps a map-style dataset so that each item comes with its index."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int):
        return index, self.dataset[index]


class IndexCollate:
    """Collates ``(index, item)`` pairs into ``(LongTensor[B], collate(items))``; picklable for workers."""

    def __init__(self, collate_fn=None):
        self.collate_fn = collate_fn or default_collate

    def __call__(self, items):
        return torch.tensor([i for i, _ in items], dtype=torch.long), self.collate_fn([x for _, x in items])


def rebuild_loader(loader: Any, indexed: bool = False, shard: bool = True, start: int = 0) -> Iterable:
    """The same data as ``loader`` in dataset order, this rank's shard only, optionally indexed.

    Non-``DataLoader`` iterables (a list of batches) and iterable-style datasets are
    returned as they are: they cannot be re-ordered or sharded, so under data
    parallelism they raise instead.
    """
    rank, world = dist_info() if shard else (0, 1)
    map_style = isinstance(loader, DataLoader) and not isinstance(loader.dataset, IterableDataset)
    if not map_style:
        if world > 1:
            raise ValueError(
                "influence passes under data parallelism need a torch DataLoader over a map-style dataset "
                f"(got {type(loader).__name__}); they shard it by index across ranks"
            )
        if start:
            raise ValueError("resuming from a training index needs a torch DataLoader over a map-style dataset")
        return _enumerated(loader) if indexed else loader
    if loader.batch_size is None:
        raise ValueError(
            "the dataloader uses a custom batch_sampler; influence passes need a plain `batch_size` so that they "
            "can read the dataset in order. Pass a DataLoader(dataset, batch_size=..., collate_fn=...)"
        )
    dataset = loader.dataset
    sampler = ShardSampler(len(dataset), rank, world, start)
    return DataLoader(
        IndexedDataset(dataset) if indexed else dataset,
        batch_size=loader.batch_size,
        sampler=sampler,
        num_workers=loader.num_workers,
        collate_fn=IndexCollate(loader.collate_fn) if indexed else loader.collate_fn,
        pin_memory=loader.pin_memory,
        drop_last=False,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context,
        persistent_workers=False,
    )


def _enumerated(batches: Iterable) -> Iterator:
    """Index the batches of an arbitrary iterable by running count."""
    from lightning_influence.tasks import batch_size_of

    start = 0
    for batch in batches:
        n = batch_size_of(batch)
        yield torch.arange(start, start + n), batch
        start += n
