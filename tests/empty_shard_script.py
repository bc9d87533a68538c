"""Run by test_empty_data.py: ``fit_factors`` on 2 gloo processes with one rank's shard empty, then every shard.

Usage: python tests/empty_shard_script.py OUT_DIR
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

STRATEGIES = ("diagonal", "kfac", "ekfac")


def run(rank: int, out: str) -> None:
    from lightning_influence import ClassificationTask, fit_factors  # noqa: PLC0415
    from lightning_influence.errors import TaskInputError  # noqa: PLC0415
    from tests import models  # noqa: PLC0415

    torch.set_num_threads(1)
    out = Path(out)
    dist.init_process_group("gloo", init_method=f"file://{out / 'store'}", rank=rank, world_size=2)
    model, task = models.mlp(), ClassificationTask()
    data = models.split_batch(models.mlp_data(12, seed=1), 4)
    errors = {}
    for strategy in STRATEGIES:
        # Rank 1's shard is empty: the reduced counts are rank 0's, so both ranks fit rank 0's factors.
        factors = fit_factors(model, task, data if rank == 0 else [], strategy=strategy, fisher="empirical",
                              capture_dtype=torch.float64)
        factors.save(out / f"{strategy}-one-empty-rank{rank}")
        # Every shard empty: every rank raises, and nothing is saved.
        try:
            fit_factors(model, task, [], strategy=strategy, fisher="empirical",
                        output_dir=out / f"{strategy}-all-empty")
            errors[strategy] = None
        except TaskInputError as err:
            errors[strategy] = str(err)
    (out / f"errors-rank{rank}.json").write_text(json.dumps(errors))
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(run, args=(sys.argv[1],), nprocs=2)
