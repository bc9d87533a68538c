"""Run by test_kill_during_save.py and test_store.py: saves into DIR over and over until killed.

Each save stamps a counter both into the manifest and into every tensor, so the test can
check that what it loads after a SIGKILL is one consistent save. With a second argument
``scores`` it saves end-of-run scores (``save_scores``) instead of factors.
"""

import sys

import torch

from lightning_influence import InfluenceFactors
from lightning_influence.capture import TrackedLayer
from lightning_influence.integration.pipeline import save_scores

directory = sys.argv[1]
what = sys.argv[2] if len(sys.argv) > 2 else "factors"
layers = {f"l{i}": TrackedLayer(f"l{i}", "linear", 256, 257, True) for i in range(3)}
counter = 0
while True:
    if what == "scores":
        save_scores(directory, torch.full((64, 4096), float(counter)), [f"q{i}" for i in range(64)],
                    layer_scores=torch.full((2, 64, 4096), float(counter)), layer_names=["a", "b"],
                    extra={"counter": counter})
    else:
        tensors = {n: {"diag_sum": torch.full((256, 257), float(counter), dtype=torch.float64),
                       "diag_count": torch.tensor(1.0, dtype=torch.float64)} for n in layers}
        InfluenceFactors("diagonal", layers, tensors=tensors, phase="complete",
                         metadata={"counter": counter}).save(directory)
    print(counter, flush=True)
    counter += 1
