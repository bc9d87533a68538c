"""Two-process DDP (gloo on CPU) gives the single-process factors and scores."""

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from lightning_influence import ClassificationTask, InfluenceFactors, InfluenceScorer, fit_factors

from . import lit_models as lm

HERE = os.path.dirname(__file__)


@pytest.mark.slow
def test_ddp_matches_single_process(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.path.join(HERE, ".."), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "ddp_script.py"), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    model = lm.LitClassifier()
    model.load_state_dict(torch.load(tmp_path / "weights.pt", weights_only=True))
    data = lm.classification_data(45)
    single = fit_factors(model, ClassificationTask(), lm.loader(data, batch_size=8), strategy="ekfac",
                         fisher="empirical")
    ddp = InfluenceFactors.load(tmp_path / "factors")
    for name, tensors in single.tensors.items():
        for key in ("A_sum", "S_sum", "A_count", "lambda_sum", "lambda_count"):
            torch.testing.assert_close(ddp.tensors[name][key], tensors[key], rtol=1e-5, atol=1e-8)
    queries = lm.loader(lm.classification_data(5, seed=7), batch_size=2)
    scorer = InfluenceScorer(model, ClassificationTask(), single)
    expected = scorer.pairwise_scores(queries, lm.loader(data, batch_size=8))
    expected_self = scorer.self_scores(lm.loader(data, batch_size=8))
    # float32 scoring on eigenbases of sums taken in another order: agree to float32 precision.
    tol = dict(rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
    for rank in (0, 1):
        got = load_file(str(tmp_path / f"scores-rank{rank}.safetensors"))
        assert got["through"].shape == (5, 45)
        torch.testing.assert_close(got["through"], expected, **tol)
        torch.testing.assert_close(got["in_process"], expected, **tol)
        assert torch.equal(got["top_pos"], torch.topk(got["through"], 4, dim=1).indices)
        assert torch.equal(got["top_neg"], torch.topk(got["through"], 4, dim=1, largest=False).indices)
        torch.testing.assert_close(got["self"], expected_self, rtol=1e-4, atol=1e-5 * float(expected_self.max()))
