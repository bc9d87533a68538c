"""The statistics of a pass live in one flat buffer under data parallelism (views per sum, no copies) and in a
storage per sum in one process; the finishing step is dealt over ranks by layer and logged when slow, and tensor
files are written tensor by tensor."""

import logging

import pytest
import torch
from safetensors.torch import load_file

from lightning_influence import ClassificationTask, fit_factors
from lightning_influence import passes
from lightning_influence.curvature.blocks import SideLayout
from lightning_influence.curvature.kfac import _eigh
from lightning_influence.passes import SumStatistics
from lightning_influence.store import write_safetensors

from . import models


@pytest.mark.parametrize("dtype,buffers", [(torch.float64, 1), (torch.float32, 2)])
def test_sums_are_views_of_one_buffer_per_dtype(dtype, buffers):
    stats = SumStatistics({"a": (3, 3), "n": (), "b": (2,)}, dtype=dtype)
    assert len(stats.buffers) == buffers  # counts join the float64 buffer, or get a float64 one of their own
    assert stats.views["a"].dtype == dtype and stats.views["n"].dtype == torch.float64
    stats.update({"a": torch.ones(3, 3, dtype=torch.float64), "n": torch.tensor(2.0), "b": torch.arange(2.0)})
    stats.update({"a": torch.ones(3, 3, dtype=torch.float64), "n": torch.tensor(2.0), "b": torch.arange(2.0)})
    sums = stats.compute()
    assert torch.equal(sums["a"], torch.full((3, 3), 2.0, dtype=dtype)) and float(sums["n"]) == 4.0
    assert torch.equal(sums["b"], torch.tensor([0.0, 2.0], dtype=dtype))
    storages = {stats.views[k].untyped_storage().data_ptr() for k in ("a", "b")}
    assert storages == {stats.buffers[0].untyped_storage().data_ptr()}  # views, not copies
    stats.all_reduce()  # no process group: nothing happens
    assert float(stats.compute()["n"]) == 4.0


def test_fitted_sums_are_not_copied_out_of_their_storage(monkeypatch):
    made = []
    real = SumStatistics.__init__

    def recording(self, *args, **kwargs):
        real(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(SumStatistics, "__init__", recording)
    factors = fit_factors(models.mlp(), ClassificationTask(), models.split_batch(models.mlp_data(8), 4),
                          strategy="kfac", fisher="empirical", block_size=None)
    t = factors.tensors
    # One process: a storage per sum, so that each leaves memory on its own (a view would pin a flat buffer).
    assert not made[0].buffers
    sums = {v.untyped_storage().data_ptr() for v in made[0].views.values()}
    assert len(sums) == len(made[0].views)
    # The bases are written over the covariance sums, not copied out of them.
    for n in t:
        for k in ("A_eigvecs", "S_eigvecs", "A_count"):
            assert t[n][k].untyped_storage().data_ptr() in sums
    assert all("A_sum" not in t[n] and "S_sum" not in t[n] for n in t)


def test_sums_of_one_process_have_no_flat_buffer():
    stats = SumStatistics({"a": (3, 3), "n": ()}, flat=False)
    assert not stats.buffers and stats.views["n"].dtype == torch.float64
    stats.all_reduce()  # no process group: nothing to do, even without a buffer


def test_layers_are_dealt_out_by_cost():
    f64 = torch.float64
    outputs = {"small": {"v": ((4, 4), f64)}, "big": {"v": ((3, 64, 64), f64)}, "mid": {"v": ((32, 32), f64)},
               "none": {}}
    owner = passes._deal_layers(outputs, 2)
    assert owner["big"] == 0 and owner["mid"] == 1 and owner["small"] == 1
    assert set(passes._deal_layers(outputs, 4).values()) == {0, 1, 2, 3}


def test_slow_layers_are_logged_with_their_time(monkeypatch, caplog):
    monkeypatch.setattr(passes, "SLOW_FINISH_SECONDS", 0.0)
    with caplog.at_level(logging.INFO, logger="lightning_influence.passes"):
        fit_factors(models.mlp(), ClassificationTask(), models.split_batch(models.mlp_data(8), 4), strategy="ekfac")
    lines = [r.getMessage() for r in caplog.records]
    assert any("covariance pass: layer '0' (7x6) finished in" in line for line in lines)
    assert any("covariance pass: layer '2' (3x8) finished in" in line for line in lines)
    assert any("covariance pass: 2 layers finished in" in line for line in lines)
    assert not any("lambda pass: layer" in line for line in lines)  # nothing to decompose there


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_float64_eigh_on_the_accelerator_matches_the_cpu():
    x = torch.randn(300, 40, dtype=torch.float64)
    side = SideLayout(40, 16)
    total = side.outer_sum(x)
    vals, vecs = _eigh(side, total.cuda(), torch.tensor(300.0, dtype=torch.float64).cuda(), "w")
    assert vals.device.type == "cuda"
    ref_vals, ref_vecs = side.eigh(total, 300.0)
    torch.testing.assert_close(vals.cpu(), ref_vals)
    q, ref = side.dense_matrix(vecs.cpu()), side.dense_matrix(ref_vecs)
    torch.testing.assert_close(q @ torch.diag(side.eigenvalues(vals.cpu())) @ q.T,
                               ref @ torch.diag(side.eigenvalues(ref_vals)) @ ref.T)


def test_safetensors_written_tensor_by_tensor_read_back_by_safetensors(tmp_path):
    buffer = torch.arange(20, dtype=torch.float64)
    named = {"view_a": buffer[:12].view(3, 4), "view_b": buffer[12:], "count": buffer[5],
             "bf16": torch.randn(3, 2).to(torch.bfloat16), "f32": torch.randn(2, 5), "long": torch.arange(7),
             "mask": torch.tensor([True, False, True]), "empty": torch.zeros(0, 3), "strided": torch.randn(4, 6)[:, ::2]}
    write_safetensors(tmp_path / "t.safetensors", named, metadata={"format": "x"})
    back = load_file(str(tmp_path / "t.safetensors"))
    assert set(back) == set(named)
    for key, value in named.items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value), key
    with pytest.raises(ValueError, match="cannot save tensor 'c'"):
        write_safetensors(tmp_path / "u.safetensors", {"c": torch.zeros(2, dtype=torch.complex64)})


def test_run_phase_reports_each_finished_layer():
    from lightning_influence import InfluenceFactors
    from lightning_influence.capture import find_tracked_layers

    model = models.mlp()
    factors = InfluenceFactors("ekfac", find_tracked_layers(model), fisher="empirical")
    finished = []
    batches = models.split_batch(models.mlp_data(8), 4)
    for phase in ("covariance", "lambda"):
        passes.run_phase(phase, factors, model, ClassificationTask(), batches,
                         on_layer_finished=lambda name, seconds: finished.append((phase, name, seconds >= 0)))
    assert finished == [("covariance", "0", True), ("covariance", "2", True), ("lambda", "0", True),
                        ("lambda", "2", True)]


@pytest.mark.slow
def test_eigendecompositions_are_dealt_over_ranks_and_broadcast(tmp_path):
    """2 gloo processes: each rank eigendecomposes one of the two layers (and runs the cheap Lambda
    finish for both); both end with the same factors, equal to a single-process fit on all the data."""
    import json
    import os
    import subprocess
    import sys

    from lightning_influence import InfluenceFactors

    here = os.path.dirname(__file__)
    env = dict(os.environ, PYTHONPATH=os.path.join(here, ".."), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, os.path.join(here, "dealt_eigh_script.py"), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    finished = [json.loads((tmp_path / f"finished-rank{r}.json").read_text()) for r in (0, 1)]
    for strategy in ("kfac", "ekfac"):
        covariance = [sorted(n for p, n in f[strategy] if p == "covariance") for f in finished]
        assert sorted(covariance[0] + covariance[1]) == ["0", "2"] and len(covariance[0]) == 1  # one layer each
        if strategy == "ekfac":
            assert [sorted(n for p, n in f[strategy] if p == "lambda") for f in finished] == [["0", "2"]] * 2
        single = fit_factors(models.mlp(), ClassificationTask(), models.split_batch(models.mlp_data(16, seed=1), 4),
                             strategy=strategy, fisher="empirical", capture_dtype=torch.float64, block_size=3,
                             block_threshold=6)
        ranks = [InfluenceFactors.load(tmp_path / f"{strategy}-rank{r}") for r in (0, 1)]
        assert single.tensors["0"]["S_eigvecs"].shape == (3, 3, 3)  # layer 0's 7-wide S side in blocks of 3
        assert single.tensors["2"]["A_eigvecs"].shape == (3, 3, 3)  # layer 2's 8-wide A side (bias column)
        for name, tensors in single.tensors.items():
            for key, value in tensors.items():
                assert torch.equal(ranks[0].tensors[name][key], ranks[1].tensors[name][key]), (strategy, name, key)
            a = single.dense_matrix(name)
            torch.testing.assert_close(ranks[0].dense_matrix(name), a, rtol=1e-9, atol=1e-12 * float(a.abs().max()))
