"""Run by test_kill_during_save.py: saves factors into DIR over and over until killed.

Each save stamps a counter both into the manifest metadata and into every tensor, so
the test can check that what it loads after a SIGKILL is one consistent save.
"""

import sys

import torch

from lightning_influence import InfluenceFactors
from lightning_influence.capture import TrackedLayer

directory = sys.argv[1]
layers = {f"l{i}": TrackedLayer(f"l{i}", "linear", 256, 257, True) for i in range(3)}
counter = 0
while True:
    tensors = {n: {"diag_sum": torch.full((256, 257), float(counter), dtype=torch.float64),
                   "diag_count": torch.tensor(1.0, dtype=torch.float64)} for n in layers}
    InfluenceFactors("diagonal", layers, tensors=tensors, phase="complete",
                     metadata={"counter": counter}).save(directory)
    print(counter, flush=True)
    counter += 1
