"""Progress bars for long passes: Lightning's own tqdm bar, on rank zero only, with time left."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator

from lightning_influence.loaders import dist_info

__all__ = ["progress_bar"]


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass


@contextmanager
def progress_bar(total: int | None, desc: str, enabled: bool = True) -> Iterator:
    """A bar counting batches (``bar.update(1)``); a no-op off rank zero or when disabled."""
    if not enabled or dist_info()[0] != 0:
        yield _NoBar()
        return
    from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

    bar = Tqdm(total=total, desc=desc, leave=True, dynamic_ncols=True, file=sys.stdout, smoothing=0, unit="batch")
    try:
        yield bar
    finally:
        bar.close()


def length_of(loader) -> int | None:
    try:
        return len(loader)
    except TypeError:
        return None
