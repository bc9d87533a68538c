"""A process killed in the middle of saving leaves the previous factors loadable."""

import os
import random
import signal
import subprocess
import sys
import time

import pytest

from lightning_influence import InfluenceFactors

HERE = os.path.dirname(__file__)


@pytest.mark.slow
def test_sigkill_mid_save_leaves_loadable_factors(tmp_path):
    rng = random.Random(0)
    for attempt in range(3):
        proc = subprocess.Popen([sys.executable, os.path.join(HERE, "save_loop_script.py"), str(tmp_path)],
                                stdout=subprocess.PIPE, text=True)
        try:
            proc.stdout.readline()  # at least one complete save exists
            time.sleep(rng.uniform(0.0, 0.3))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        factors = InfluenceFactors.load(tmp_path)
        counter = factors.metadata["counter"]
        for tensors in factors.tensors.values():
            assert float(tensors["diag_sum"].min()) == float(tensors["diag_sum"].max()) == counter
        tensor_files = [p for p in os.listdir(tmp_path) if p.endswith(".safetensors")]
        assert len(tensor_files) <= 2, tensor_files  # the live file, at most one orphan from the kill
