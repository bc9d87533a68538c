"""Run by test_pass_buffers.py: K-FAC and EK-FAC on 2 gloo processes, blocked sides, each rank with half the
data; records which layers each rank eigendecomposed and saves every rank's factors.

Usage: python tests/dealt_eigh_script.py OUT_DIR
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def run(rank: int, out: str) -> None:
    from lightning_influence import ClassificationTask, InfluenceFactors  # noqa: PLC0415
    from lightning_influence.capture import find_tracked_layers  # noqa: PLC0415
    from lightning_influence.passes import remaining_phases, run_phase  # noqa: PLC0415
    from tests import models  # noqa: PLC0415

    torch.set_num_threads(1)
    out = Path(out)
    dist.init_process_group("gloo", init_method=f"file://{out / 'store'}", rank=rank, world_size=2)
    model, task = models.mlp(), ClassificationTask()
    shard = models.split_batch(models.mlp_data(16, seed=1), 4)[rank::2]
    finished = {}
    for strategy in ("kfac", "ekfac"):
        factors = InfluenceFactors(strategy, find_tracked_layers(model), fisher="empirical", block_size=3,
                                   block_threshold=6)
        finished[strategy] = []
        for phase in remaining_phases(factors):
            run_phase(phase, factors, model, task, shard, dtype=torch.float64,
                      on_layer_finished=lambda name, seconds, s=strategy, p=phase: finished[s].append([p, name]))
        factors.save(out / f"{strategy}-rank{rank}")
    (out / f"finished-rank{rank}.json").write_text(json.dumps(finished))
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(run, args=(sys.argv[1],), nprocs=2)
