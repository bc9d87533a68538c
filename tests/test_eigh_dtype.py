"""``eigh_dtype``: K-FAC / EK-FAC covariance sides eigendecomposed in float32 instead of float64.

Checked against tests/dense.py: the explicit float64 Kronecker curvature of each layer (built from
the token covariances and, for EK-FAC, the per-example gradients from autograd), damped and solved
with ``linalg.solve``. The float32 factors must precondition a gradient to within a tolerance that
the same factors with a transposed eigenbasis (or the opposite sign) miss by orders of magnitude.
"""

import json

import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_influence import ClassificationTask, InfluenceCallback, InfluenceFactors, fit_factors
from lightning_influence.capture import find_tracked_layers
from lightning_influence.curvature import get_strategy
from lightning_influence.curvature.blocks import SideLayout
from lightning_influence.errors import OptionsError
from lightning_influence.memory import plan_memory
from lightning_influence.options import FitOptions

from . import dense, models
from .test_block_factors import blocks_of
from .test_scores_dense import ce_loss

KRONECKER = ["kfac", "ekfac"]
# float32 eigh leaves ~1e-7 relative errors in the bases; damping (0.1 x the mean eigenvalue) keeps the
# small-eigenvalue directions from amplifying them: measured 0.6-5e-6 on the preconditioned gradients here,
# against 0.1 for a transposed basis and 2 for a flipped sign.
TOLERANCE = 5e-5


def ill_conditioned_problem(seed: int = 0):
    """Linear(16, 12) + Tanh + Linear(12, 4) in float64 on inputs whose scales span 1 to 1e-3: the first layer's
    activation covariance has a condition number of about 1e6, where float32 eigenvalues lose digits."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 4)).double()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(64, 16, generator=g, dtype=torch.float64) * torch.logspace(0, -3, 16, dtype=torch.float64)
    y = torch.randint(0, 4, (64,), generator=g)
    return model, (x, y)


def dense_preconditioned(strategy, model, batch, grads_by_layer, blocks=None):
    """``(G + lambda I)^-1 vec(V)`` per layer, every matrix explicit in float64 (``lambda``: 0.1 x mean eigenvalue)."""
    blocks = blocks or (lambda dim: None)
    modules = {n: model.get_submodule(n) for n in find_tracked_layers(model)}
    covs = dense.covariances(model, modules, ce_loss, batch)
    per_example = dense.per_example_grads(model, modules, ce_loss, batch)
    out = {}
    for name, v in grads_by_layer.items():
        A, S = covs[name]
        G, damping = dense.dense_curvature(strategy, A, S, per_example[name], blocks(A.shape[0]), blocks(S.shape[0]))
        solved = torch.linalg.solve(G + damping * torch.eye(G.shape[0], dtype=G.dtype), v.flatten())
        out[name] = solved.reshape(v.shape)
    return out


def relative_error(ours: torch.Tensor, expected: torch.Tensor) -> float:
    return float((ours - expected).norm() / expected.norm())


@pytest.mark.parametrize("strategy", KRONECKER)
@pytest.mark.parametrize("block_size", [None, 5])
def test_float32_eigh_preconditions_like_the_dense_float64_computation(strategy, block_size, monkeypatch):
    """Dense sides, and every side in blocks of 5 (17 = 3 x 5 + 2: a short last block), float64 statistics."""
    model, batch = ill_conditioned_problem()
    layers = find_tracked_layers(model)
    g = torch.Generator().manual_seed(7)
    grads = {n: torch.randn(l.d_out, l.d_in, generator=g, dtype=torch.float64) for n, l in layers.items()}
    expected = dense_preconditioned(strategy, model, batch, grads, blocks_of(block_size, None))

    decomposed = []  # the dtypes torch.linalg.eigh is handed: the option must reach it
    eigh = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda m, *a, **k: decomposed.append(m.dtype) or eigh(m, *a, **k))
    kwargs = dict(strategy=strategy, fisher="empirical", capture_dtype=torch.float64, block_size=block_size,
                  block_threshold=None)
    fitted = {dtype: fit_factors(model, ClassificationTask(), models.split_batch(batch, 16), eigh_dtype=dtype, **kwargs)
              for dtype in ("float64", "float32")}
    monkeypatch.undo()
    sides_per_fit = len(decomposed) // 2
    assert decomposed == [torch.float64] * sides_per_fit + [torch.float32] * sides_per_fit
    for name, v in grads.items():
        for dtype, factors in fitted.items():
            assert factors.tensors[name]["A_eigvecs"].dtype == torch.float64  # the sums' dtype, not the eigh's
            ours = factors.precondition(name, v)
            err = relative_error(ours, expected[name])
            assert err < (1e-9 if dtype == "float64" else TOLERANCE), (name, dtype, err)
        f32 = fitted["float32"]
        # it did run in float32: not the float64 factors bit for bit
        assert relative_error(f32.precondition(name, v), fitted["float64"].precondition(name, v)) > 1e-12
        assert relative_error(-f32.precondition(name, v), expected[name]) > 1.0  # a wrong sign is caught
        # a transposed basis is caught: Q^T instead of Q on the (dense) activation side
        if block_size is None:
            swapped = {**f32.tensors[name], "A_eigvecs": f32.tensors[name]["A_eigvecs"].T.contiguous()}
            wrong = InfluenceFactors(strategy, {name: layers[name]}, damping=f32.damping_for(name),
                                     tensors={name: swapped}, phase="complete")
            assert relative_error(wrong.precondition(name, v), expected[name]) > 100 * TOLERANCE


def test_float32_eigh_from_float32_statistics():
    """float32 sums, decomposed in float32 (no float64 copy at all) and in float64, against the dense reference."""
    model, batch = ill_conditioned_problem(seed=3)
    layers = find_tracked_layers(model)
    v = {n: torch.randn(l.d_out, l.d_in, dtype=torch.float64) for n, l in layers.items()}
    expected = dense_preconditioned("ekfac", model, batch, v)
    for eigh_dtype in (torch.float32, torch.float64):
        factors = fit_factors(model, ClassificationTask(), models.split_batch(batch, 16), strategy="ekfac",
                              fisher="empirical", capture_dtype=torch.float64, stats_dtype=torch.float32,
                              eigh_dtype=eigh_dtype)
        assert factors.tensors["0"]["S_eigvecs"].dtype == torch.float32
        for name in layers:
            assert relative_error(factors.precondition(name, v[name]), expected[name]) < TOLERANCE, (name, eigh_dtype)


def test_the_float64_path_is_the_plain_float64_eigh_bit_for_bit():
    """The default decomposes ``(C + C^T) / 2``, ``C = total / count``, exactly as before the option existed."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 9, generator=g, dtype=torch.float64)
    total, count = x.T @ x, torch.tensor(40.0, dtype=torch.float64)
    vals, vecs = torch.linalg.eigh((total + total.T) * (0.5 / count))
    ours_vals, ours_vecs = SideLayout(9).eigh(total.clone(), count, out=total.clone())
    assert torch.equal(ours_vals, vals) and torch.equal(ours_vecs, vecs)
    f32_vals, f32_vecs = SideLayout(9).eigh(total.clone(), count, eigh_dtype=torch.float32)
    assert f32_vals.dtype == torch.float64 and not torch.equal(f32_vals, vals)  # returned in the asked dtype
    torch.testing.assert_close(f32_vals, vals, rtol=0, atol=1e-5 * float(vals.max()))


def test_bad_eigh_dtype_is_refused_early_naming_the_choices():
    for bad in ("float16", "bfloat16", torch.float16, 64, None, "f32"):
        with pytest.raises(OptionsError, match="eigh_dtype must be one of float64, float32"):
            FitOptions(eigh_dtype=bad)
        with pytest.raises(MisconfigurationException, match="eigh_dtype must be one of float64, float32"):
            InfluenceCallback(task="classification", eigh_dtype=bad)
        with pytest.raises(OptionsError, match="eigh_dtype must be float64.*or float32"):
            get_strategy("kfac", eigh_dtype=bad)
    with pytest.raises(OptionsError, match="eigh_dtype"):
        fit_factors(models.mlp(), ClassificationTask(), [], eigh_dtype="float16")  # before any pass
    assert FitOptions(eigh_dtype="torch.float32").eigh_dtype == torch.float32
    assert FitOptions().eigh_dtype == torch.float64 and get_strategy("ekfac").eigh_dtype == torch.float64


def test_identity_and_manifest_record_the_eigh_dtype_and_a_resume_with_another_refits(tmp_path):
    model, task = models.mlp(), ClassificationTask()
    batches = models.split_batch(models.mlp_data(16, seed=1), 4)
    f32 = fit_factors(model, task, batches, strategy="ekfac", eigh_dtype="float32", output_dir=tmp_path / "f32")
    assert f32.metadata["identity"]["options"]["eigh_dtype"] == "float32"
    manifest = json.loads((tmp_path / "f32" / "manifest.json").read_text())
    assert manifest["eigh_dtype"] == "float32"
    assert InfluenceFactors.load(tmp_path / "f32").eigh_dtype == torch.float32
    # the same options resume silently; another eigh dtype refits, naming it
    partial = InfluenceFactors.load(tmp_path / "f32")
    partial.set_phase("eigen")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit_factors(model, task, batches, strategy="ekfac", eigh_dtype="float32", factors=partial)
    partial = InfluenceFactors.load(tmp_path / "f32")
    partial.set_phase("eigen")
    with pytest.warns(UserWarning, match=r'options.eigh_dtype: "float32" saved, "float64" now'):
        refit = fit_factors(model, task, batches, strategy="ekfac", factors=partial)
    assert refit.metadata["identity"]["options"]["eigh_dtype"] == "float64" and refit.eigh_dtype == torch.float64
    # factors saved before the option existed (no manifest entry) were float64
    del manifest["eigh_dtype"]
    (tmp_path / "f32" / "manifest.json").write_text(json.dumps(manifest))
    assert InfluenceFactors.load(tmp_path / "f32").eigh_dtype == torch.float64


def test_memory_plan_sizes_the_eigh_workspace_by_its_dtype():
    layer = find_tracked_layers(nn.Sequential(nn.Linear(3071, 768)))["0"]  # sides 768 and 3072
    parts = {}
    for dtype in ("float64", "float32"):
        plan = plan_memory({"0": layer}, get_strategy("kfac", eigh_dtype=dtype), batch_size=1, tokens_per_example=1)
        (finish,) = [p for p in plan.phases if p.phase == "covariance finish"]
        parts[dtype] = finish.parts
    assert parts["float64"]["one layer's eigh"] == 3 * 3072 ** 2 * 8
    assert parts["float32"]["one layer's eigh"] == 3 * 3072 ** 2 * 4
    assert parts["float32"]["sums"] == parts["float64"]["sums"]  # the statistics keep their dtype


def test_callback_option_reaches_the_fit_and_a_change_refits(tmp_path, monkeypatch):
    from . import lit_models as lm

    torch.manual_seed(0)
    model = lm.LitClassifier()
    trainer = lm.trainer(max_epochs=0)
    trainer.fit(model, datamodule=lm.ClassificationData())
    kwargs = dict(task="classification", strategy="kfac", fisher="empirical", output_dir=str(tmp_path),
                  fit_on="manual")
    decomposed = []
    eigh = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda m, *a, **k: decomposed.append(m.dtype) or eigh(m, *a, **k))
    cb = InfluenceCallback(eigh_dtype="float32", **kwargs)
    assert cb.eigh_dtype == torch.float32
    assert cb.memory_plan(trainer, model.net, find_tracked_layers(model.net)).phases[1].parts["one layer's eigh"] \
        == 3 * 9 ** 2 * 4  # the widest side: Linear(8, 3)'s activations with the bias column
    factors = cb.fit_factors(trainer, model)
    assert decomposed and set(decomposed) == {torch.float32}
    assert factors.metadata["identity"]["options"]["eigh_dtype"] == "float32"
    with pytest.warns(UserWarning, match=r'refitting the factors.*options.eigh_dtype: "float32" saved, "float64" now'):
        InfluenceCallback(**kwargs).fit_factors(trainer, model)
    assert decomposed[-1] == torch.float64


def test_lightning_cli_yaml_sets_the_eigh_dtype(tmp_path, monkeypatch):
    import sys

    from lightning.pytorch.cli import LightningCLI

    from lightning_influence.demo.driver import FactsDataModule, TinyGPT2LM

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning_cli.py"])
    config = tmp_path / "eigh.yaml"
    config.write_text("trainer:\n  callbacks:\n    - class_path: lightning_influence.InfluenceCallback\n"
                      "      init_args:\n        task: causal_lm\n        strategy: ekfac\n"
                      "        eigh_dtype: float32\n")
    cli = LightningCLI(TinyGPT2LM, FactsDataModule, run=False,
                       args=["--config", str(config), "--trainer.logger=false", "--trainer.enable_progress_bar=false"])
    (cb,) = [c for c in cli.trainer.callbacks if isinstance(c, InfluenceCallback)]
    assert cb.eigh_dtype == torch.float32 and cb.fit_options.eigh_dtype == torch.float32


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", KRONECKER)
def test_float32_eigh_on_cuda_matches_the_dense_float64_computation(strategy, monkeypatch):
    """On CUDA the sums are decomposed where they are, in float32 (no CPU fallback), to the same tolerance."""
    model, batch = ill_conditioned_problem()
    layers = find_tracked_layers(model)
    v = {n: torch.randn(l.d_out, l.d_in, dtype=torch.float64) for n, l in layers.items()}
    expected = dense_preconditioned(strategy, model, batch, v)
    decomposed = []
    eigh = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda m, *a, **k: decomposed.append((m.device.type, m.dtype))
                        or eigh(m, *a, **k))
    factors = fit_factors(model.cuda(), ClassificationTask(), models.split_batch(tuple(t.cuda() for t in batch), 16),
                          strategy=strategy, fisher="empirical", capture_dtype=torch.float64, eigh_dtype="float32")
    monkeypatch.undo()
    assert set(decomposed) == {("cuda", torch.float32)}
    for name in layers:
        ours = factors.precondition(name, v[name]).cpu()
        assert relative_error(ours, expected[name]) < TOLERANCE, name
