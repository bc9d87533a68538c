"""Two-process DDP (gloo on CPU) gives the single-process factors and scores."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from lightning_influence import ClassificationTask, InfluenceFactors, InfluenceScorer, fit_factors
from lightning_influence.capture import find_tracked_layers
from lightning_influence.passes import fit_identity
from lightning_influence.scoring.topk import read_scores

from . import lit_models as lm
from .dense import covariance_sum

HERE = os.path.dirname(__file__)


def _unfinished_factors(model, data, directory):
    """EK-FAC factors stopped after the covariances (phase "eigen"), as a run killed in the second pass leaves them."""
    factors = fit_factors(model, ClassificationTask(), lm.loader(data, batch_size=8), strategy="ekfac",
                          fisher="empirical")
    for tensors in factors.tensors.values():
        del tensors["lambda_sum"], tensors["lambda_count"]
    factors.set_phase("eigen")
    # What the job's callback will compute for its fit (weights, data, options): the resume must match it.
    factors.metadata["identity"] = fit_identity(model, lm.loader(data, batch_size=8), find_tracked_layers(model, None),
                                                "ekfac", "empirical", None, None, 0, torch.float64, torch.float32)
    factors.save(directory)


@pytest.mark.slow
def test_ddp_matches_single_process(tmp_path):
    torch.manual_seed(0)
    model = lm.LitClassifier()  # the script's model: same seed, no training step (max_epochs=0)
    data = lm.classification_data(45)
    _unfinished_factors(model, data, tmp_path / "factors")
    env = dict(os.environ, PYTHONPATH=os.path.join(HERE, ".."), OMP_NUM_THREADS="1")
    try:
        proc = subprocess.run([sys.executable, os.path.join(HERE, "ddp_script.py"), str(tmp_path)], env=env,
                              capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired as err:  # a rank waiting in a collective the other never joins
        pytest.fail(f"the DDP job hung: {str(err.stdout)[-2000:]} {str(err.stderr)[-2000:]}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # Rank zero found the unfinished factors, rank one (an empty output_dir) followed its decision.
    for rank in (0, 1):
        assert json.loads((tmp_path / f"phases-rank{rank}.json").read_text()) == ["lambda"], rank
    single = fit_factors(model, ClassificationTask(), lm.loader(data, batch_size=8), strategy="ekfac",
                         fisher="empirical")
    ddp = InfluenceFactors.load(tmp_path / "factors")
    for name, tensors in single.tensors.items():
        for key in ("A_count", "lambda_sum", "lambda_count"):
            torch.testing.assert_close(ddp.tensors[name][key], tensors[key], rtol=1e-5, atol=1e-8)
        for side in ("A", "S"):  # the covariances, from the bases each rank received or computed
            torch.testing.assert_close(covariance_sum(ddp.tensors[name], side), covariance_sum(tensors, side),
                                       rtol=1e-5, atol=1e-8)
    queries = lm.loader(lm.classification_data(5, seed=7), batch_size=2)
    scorer = InfluenceScorer(model, ClassificationTask(), single)
    expected_layers = scorer.pairwise_scores(queries, lm.loader(data, batch_size=8), per_layer=True)
    expected = expected_layers.sum(0)
    expected_self = scorer.self_scores(lm.loader(data, batch_size=8))
    # float32 scoring on eigenbases of sums taken in another order: agree to float32 precision.
    tol = dict(rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
    for rank in (0, 1):
        got = load_file(str(tmp_path / f"scores-rank{rank}.safetensors"))
        assert got["through"].shape == (5, 45)
        torch.testing.assert_close(got["through"], expected, **tol)
        torch.testing.assert_close(got["per_layer"], expected_layers, **tol)
        torch.testing.assert_close(got["callback"], expected, **tol)
        assert torch.equal(got["top_pos"], torch.topk(got["through"], 4, dim=1).indices)
        assert torch.equal(got["top_neg"], torch.topk(got["through"], 4, dim=1, largest=False).indices)
        torch.testing.assert_close(got["top_pos_values"], torch.topk(got["through"], 4, dim=1).values)
        assert torch.equal(got["shard_pos"], got["top_pos"]) and torch.equal(got["shard_neg"], got["top_neg"])
        torch.testing.assert_close(got["self"], expected_self, rtol=1e-4, atol=1e-5 * float(expected_self.max()))
    # Shards written by rank zero from both ranks' columns, in dataset order.
    torch.testing.assert_close(read_scores(tmp_path / "shards"), expected, **tol)
    # The callback's end-of-run report, streamed: the full rows read back from its shards.
    report = json.loads((tmp_path / "factors" / "report.json").read_text())
    assert [e["train_index"] for e in report["queries"][0]["top_positive"]] == \
        torch.topk(expected[0], 4).indices.tolist()
    torch.testing.assert_close(read_scores(tmp_path / "factors" / "score_shards"), expected, **tol)
    for rank in (0, 1):  # a second distributed run into the same shards: refused on both ranks
        assert "already holds scores" in (tmp_path / f"refused-rank{rank}.txt").read_text(), rank
    # Rank zero alone, in-process, after the other rank left: the full matrix, no collective.
    alone = load_file(str(tmp_path / "rank0-alone.safetensors"))
    torch.testing.assert_close(alone["in_process"], expected, **tol)
    assert torch.equal(alone["top_pos"], torch.topk(expected, 4, dim=1).indices)
