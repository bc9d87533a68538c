"""InfluenceCallback and InfluenceModule inside real Lightning runs."""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_influence import (ClassificationTask, InfluenceCallback, InfluenceFactors, InfluenceModule,
                                 InfluenceScorer, fit_factors)
from lightning_influence import passes as stats_mod

from . import lit_models as lm
from .dense import covariance_sum


class Snapshot(Callback):
    """Records the weights and modes when training ends, before the callback's on_fit_end pass."""

    def on_train_end(self, trainer, pl_module):
        self.state = {k: v.clone() for k, v in pl_module.state_dict().items()}
        self.modes = {n: m.training for n, m in pl_module.named_modules()}
        self.global_step = trainer.global_step


def fitted(tmp_path, strategy="ekfac", fisher="empirical", **trainer_kwargs):
    torch.manual_seed(0)
    model = lm.LitClassifier()
    cb = InfluenceCallback(task=ClassificationTask(), strategy=strategy, fisher=fisher, output_dir=str(tmp_path / "f"))
    snap = Snapshot()
    trainer = lm.trainer(callbacks=[snap, cb], **trainer_kwargs)
    trainer.fit(model, datamodule=lm.ClassificationData())
    return model, cb, snap, trainer


@pytest.mark.parametrize("strategy", ["diagonal", "kfac", "ekfac"])
def test_callback_fits_same_factors_as_in_process(tmp_path, strategy):
    model, cb, snap, trainer = fitted(tmp_path, strategy)
    # Weights bit-identical, modes restored, no extra optimizer steps.
    for k, v in model.state_dict().items():
        assert torch.equal(v, snap.state[k]), k
    assert {n: m.training for n, m in model.named_modules()} == snap.modes
    assert trainer.global_step == snap.global_step
    # The same statistics computed without Lightning, on the (unshuffled) training data.
    data = lm.classification_data(48)
    ref = fit_factors(model, ClassificationTask(), lm.loader(data), strategy=strategy, fisher="empirical")
    assert set(cb.factors.tensors) == set(ref.tensors)
    for name in ref.tensors:
        for key, value in ref.tensors[name].items():
            torch.testing.assert_close(cb.factors.tensors[name][key], value, rtol=1e-6, atol=1e-9)
    loaded = InfluenceFactors.load(tmp_path / "f")
    assert loaded.is_complete and loaded.strategy == strategy


def test_model_attr_tracks_the_inner_network(tmp_path):
    torch.manual_seed(0)
    model = lm.LitClassifier()
    cb = InfluenceCallback(task="classification", model_attr="net", output_dir=str(tmp_path), fisher="empirical")
    lm.trainer(callbacks=[cb], max_epochs=1).fit(model, datamodule=lm.ClassificationData())
    assert set(cb.factors.layers) == {"0", "2"}


def test_influence_module_in_process_and_through_trainer_agree(tmp_path):
    model, cb, _, _ = fitted(tmp_path, "ekfac")
    data = lm.classification_data(48)
    queries = lm.loader(lm.classification_data(5, seed=7), batch_size=2)
    module = InfluenceModule(model, task=ClassificationTask(), factors=InfluenceFactors.load(tmp_path / "f"))
    in_process = module.pairwise_scores(queries, lm.loader(data, shuffle=True))
    assert in_process.shape == (5, 48)
    direct = InfluenceScorer(model, ClassificationTask(), cb.factors).pairwise_scores(queries, lm.loader(data))
    torch.testing.assert_close(in_process, direct, rtol=1e-5, atol=1e-6)
    predictor = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    through = module.pairwise_scores(queries, lm.loader(data), trainer=predictor)
    torch.testing.assert_close(through, direct, rtol=1e-5, atol=1e-6)
    self_in = module.self_scores(lm.loader(data))
    self_tr = module.self_scores(lm.loader(data), trainer=predictor)
    assert self_in.shape == (48,)
    torch.testing.assert_close(self_in, self_tr, rtol=1e-5, atol=1e-6)
    per_layer = module.pairwise_scores(queries, lm.loader(data), per_layer=True)
    assert per_layer.shape == (2, 5, 48)
    torch.testing.assert_close(per_layer.sum(0), direct, rtol=1e-5, atol=1e-6)


def test_bf16_mixed_run_accumulates_in_float32(tmp_path):
    model, cb, _, _ = fitted(tmp_path, "ekfac", precision="bf16-mixed")
    for t in cb.factors.tensors.values():
        assert t["A_eigvecs"].dtype == torch.float64 and torch.isfinite(t["lambda_sum"]).all()
    ref = fit_factors(model, ClassificationTask(), lm.loader(lm.classification_data(48)), strategy="ekfac",
                      fisher="empirical")
    for name in ref.tensors:  # bf16 autocast forward: close to the float32 statistics, not equal
        a, b = covariance_sum(cb.factors.tensors[name], "A"), covariance_sum(ref.tensors[name], "A")
        assert (a - b).norm() / b.norm() < 0.05


def test_resume_after_kill_in_eigenvalue_correction(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = lm.LitClassifier()
    lm.trainer(max_epochs=1).fit(model, datamodule=lm.ClassificationData())
    calls = []
    real = stats_mod.run_phase

    def dying(phase, *args, **kwargs):
        calls.append(phase)
        if phase == "lambda":
            raise KeyboardInterrupt("killed")
        return real(phase, *args, **kwargs)

    import lightning_influence.integration.callback as cb_mod

    monkeypatch.setattr(cb_mod, "run_phase", dying)
    cb = InfluenceCallback(task="classification", output_dir=str(tmp_path), fit_on="manual")
    trainer = lm.trainer(callbacks=[cb], max_epochs=0)
    trainer.fit(model, datamodule=lm.ClassificationData())
    with pytest.raises(KeyboardInterrupt):
        cb.fit_factors(trainer, model)
    assert InfluenceFactors.load(tmp_path).phase == "eigen"
    calls.clear()
    monkeypatch.setattr(cb_mod, "run_phase", lambda phase, *a, **k: (calls.append(phase), real(phase, *a, **k)))
    resumed = InfluenceCallback(task="classification", output_dir=str(tmp_path), fit_on="manual").fit_factors(trainer, model)
    assert calls == ["lambda"]
    fresh = InfluenceCallback(task="classification", output_dir=str(tmp_path / "fresh"), fit_on="manual")
    full = fresh.fit_factors(trainer, model)
    for name in full.tensors:
        for key in ("A_eigvecs", "lambda_sum"):
            assert torch.equal(resumed.tensors[name][key], full.tensors[name][key])


def test_state_dict_round_trip(tmp_path):
    _, cb, _, _ = fitted(tmp_path)
    state = cb.state_dict()
    assert state["phase"] == "complete" and state["weights_fingerprint"]
    other = InfluenceCallback(output_dir=str(tmp_path))
    other.load_state_dict(state)
    assert other._done_fingerprint == state["weights_fingerprint"]


def test_clear_errors():
    with pytest.raises(MisconfigurationException, match="unknown strategy 'kfc'"):
        InfluenceCallback(strategy="kfc")
    with pytest.raises(MisconfigurationException, match="unknown fisher"):
        InfluenceCallback(fisher="true")
    with pytest.raises(MisconfigurationException, match="damping"):
        InfluenceCallback(damping=-1.0)
    with pytest.raises(MisconfigurationException, match=r"query_svd must be one of \('randomized', 'exact'\)"):
        InfluenceCallback(query_rank=8, query_svd="lanczos")

    class NoLayers(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(3, 2)

        def training_step(self, batch, i):
            return self.emb(batch[0].long()).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.raises(MisconfigurationException, match="no trackable module.*emb"):
        lm.trainer(callbacks=[InfluenceCallback()]).fit(NoLayers(), lm.loader(lm.classification_data(8)))
    with pytest.raises(MisconfigurationException, match="needs fitted factors"):
        InfluenceModule(nn.Linear(2, 2), ClassificationTask(), factors=None)
    unfinished = InfluenceFactors("ekfac", {}, fisher="empirical")
    with pytest.raises(MisconfigurationException, match="unfinished"):
        InfluenceModule(nn.Linear(2, 2), ClassificationTask(), factors=unfinished)


def test_factors_from_another_model_rejected(tmp_path):
    model, cb, _, _ = fitted(tmp_path)
    other = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    with pytest.raises(MisconfigurationException, match="another model"):
        InfluenceModule(other, ClassificationTask(), factors=cb.factors)
