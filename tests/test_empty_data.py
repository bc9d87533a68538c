"""No factors from nothing: an empty training loader, an iterator used up by an earlier pass, or caps of
zero raise a clear error before any factors are marked complete, also under data parallelism, where one
rank's empty shard is fine as long as the reduced count is not zero."""

import json
import os
import subprocess
import sys

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence import CausalLMTask, ClassificationTask, InfluenceCallback, InfluenceFactors, fit_factors
from lightning_influence.capture import find_tracked_layers
from lightning_influence.errors import OptionsError, TaskInputError
from lightning_influence.passes import run_phase

from . import lit_models as lm, models
from .test_factors_io import Counting

HERE = os.path.dirname(__file__)
FITTED = ["diagonal", "kfac", "ekfac"]


def train_batches():
    return models.split_batch(models.mlp_data(12, seed=1), 4)


@pytest.mark.parametrize("strategy", FITTED)
def test_empty_loader_raises_and_saves_nothing(tmp_path, strategy):
    with pytest.raises(TaskInputError, match="pass saw no training example: the training dataloader is empty.*"
                                             "no factors were marked complete"):
        fit_factors(models.mlp(), ClassificationTask(), [], strategy=strategy, output_dir=tmp_path)
    assert not (tmp_path / "manifest.json").exists()


def test_iterator_used_up_by_the_covariance_pass(tmp_path):
    """EK-FAC reads the data twice: a one-shot iterator leaves the lambda pass nothing, which must not
    end in 'complete' factors."""
    batches = iter(train_batches())
    with pytest.raises(TaskInputError,
                       match="the lambda pass saw no training example.*re-iterable such as a DataLoader"):
        fit_factors(models.mlp(), ClassificationTask(), batches, strategy="ekfac", output_dir=tmp_path)
    saved = InfluenceFactors.load(tmp_path)
    assert saved.phase == "eigen" and not saved.is_complete  # the covariance pass's work is kept for a resume


@pytest.mark.parametrize("cap", ["max_batches", "max_examples"])
@pytest.mark.parametrize("value", [0, -1, True, 2.0])
def test_zero_caps_are_refused_before_any_batch(tmp_path, cap, value):
    batches = Counting(train_batches())
    with pytest.raises(OptionsError, match=f"{cap} must be a positive integer or None"):
        fit_factors(models.mlp(), ClassificationTask(), batches, strategy="kfac", output_dir=tmp_path, **{cap: value})
    factors = InfluenceFactors("ekfac", find_tracked_layers(models.mlp()))
    with pytest.raises(OptionsError, match=f"{cap} must be a positive integer or None"):
        run_phase("covariance", factors, models.mlp(), ClassificationTask(), batches, **{cap: value})
    assert batches.drawn == 0 and factors.phase == "none"
    assert not (tmp_path / "manifest.json").exists()


def test_callback_with_an_empty_training_loader(tmp_path):
    empty = DataLoader(TensorDataset(torch.zeros(0, 6), torch.zeros(0, dtype=torch.long)), batch_size=4)
    cb = InfluenceCallback(task="classification", output_dir=str(tmp_path))
    with pytest.raises(TaskInputError, match="the covariance pass saw no training example"):
        lm.trainer(callbacks=[cb], max_epochs=1).fit(lm.LitClassifier(), empty)
    assert cb.factors is None and not (tmp_path / "manifest.json").exists()


@pytest.mark.slow
def test_empty_shards_under_data_parallelism(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.path.join(HERE, ".."), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "empty_shard_script.py"), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for rank in (0, 1):
        errors = json.loads((tmp_path / f"errors-rank{rank}.json").read_text())
        for strategy in FITTED:
            # Every rank raises (none is left waiting in a collective), and nothing was saved.
            assert errors[strategy] is not None and "saw no training example on any rank" in errors[strategy]
            assert not (tmp_path / f"{strategy}-all-empty" / "manifest.json").exists()
    for strategy in FITTED:
        single = fit_factors(models.mlp(), ClassificationTask(), train_batches(), strategy=strategy,
                             fisher="empirical", capture_dtype=torch.float64)
        for rank in (0, 1):
            got = InfluenceFactors.load(tmp_path / f"{strategy}-one-empty-rank{rank}")
            assert got.is_complete
            for name, tensors in single.tensors.items():
                assert got.tensors[name].keys() == tensors.keys()
                for key, value in tensors.items():
                    if key.endswith("eigvecs"):  # defined up to signs: compared through the dense matrix
                        continue
                    torch.testing.assert_close(got.tensors[name][key], value, rtol=1e-12, atol=1e-14)
                torch.testing.assert_close(got.dense_matrix(name), single.dense_matrix(name), rtol=1e-10,
                                           atol=1e-12 * float(single.dense_matrix(name).abs().max()))


def test_every_token_masked_is_refused(tmp_path):
    batch = models.lm_batch(4, vocab=9, max_len=6)
    batch["attention_mask"] = torch.zeros_like(batch["attention_mask"])
    batch["labels"] = torch.full_like(batch["labels"], -100)
    with pytest.raises(TaskInputError, match="counted no tokens for layer 'up'.*masked as padding"):
        fit_factors(models.seq_lm(), CausalLMTask(), [batch], strategy="ekfac", output_dir=tmp_path)
    assert not (tmp_path / "manifest.json").exists()
