"""The callback refuses what would fail (or never fire) before the first training step."""

import json

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_influence import ClassificationTask, InfluenceCallback

from . import lit_models as lm


class CountingClassifier(lm.LitClassifier):
    """Counts its training steps: the checks must raise with zero steps run."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.steps = 0

    def training_step(self, batch, batch_idx):
        self.steps += 1
        return super().training_step(batch, batch_idx)


class NoForward(L.LightningModule):
    """The common wrapper: the network in an attribute, no forward of its own."""

    def __init__(self):
        super().__init__()
        self.model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
        self.steps = 0

    def training_step(self, batch, batch_idx):
        self.steps += 1
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(model, cb, **kwargs):
    lm.trainer(callbacks=[cb], **kwargs).fit(model, datamodule=lm.ClassificationData())


@pytest.mark.parametrize("fit_on", [0, -2])
def test_fit_on_that_never_fires_is_refused(fit_on):
    with pytest.raises(MisconfigurationException, match=f"fit_on={fit_on} never fires: epochs are counted from 1"):
        InfluenceCallback(fit_on=fit_on)


def test_fit_on_beyond_max_epochs_is_refused_at_setup(tmp_path):
    model = CountingClassifier()
    cb = InfluenceCallback(fit_on=3, output_dir=str(tmp_path))
    with pytest.raises(MisconfigurationException, match=r"fit_on=3\) never fires: the trainer stops after max_epochs=2"):
        _fit(model, cb, max_epochs=2)
    assert model.steps == 0


def test_fit_on_with_unbounded_epochs_is_accepted(tmp_path):
    # max_epochs=-1 has no epoch limit (here max_steps stops it): any epoch may be reached; this one is.
    model = CountingClassifier()
    cb = InfluenceCallback(fit_on=1, output_dir=str(tmp_path), fisher="empirical")
    _fit(model, cb, max_epochs=-1, max_steps=12)
    assert cb.factors is not None and cb.factors.is_complete


def test_module_without_forward_names_model_attr(tmp_path):
    model = NoForward()
    with pytest.raises(MisconfigurationException, match=r"NoForward defines no forward\(\).*model_attr='model'"):
        _fit(model, InfluenceCallback(output_dir=str(tmp_path)))
    assert model.steps == 0
    # The named fix works.
    cb = InfluenceCallback(output_dir=str(tmp_path), model_attr="model", fisher="empirical")
    _fit(NoForward(), cb, max_epochs=1)
    assert set(cb.factors.layers) == {"0", "2"}


class DictRows(torch.utils.data.Dataset):
    """Rows as {"features", "label"} dicts: keys ClassificationTask() does not read by default."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        x, y = self.dataset[i]
        return {"features": x, "label": y}


class DictClassifier(CountingClassifier):
    def training_step(self, batch, batch_idx):
        return super().training_step((batch["features"], batch["label"]), batch_idx)


def test_batch_the_task_cannot_read_fails_before_training(tmp_path):
    model = DictClassifier()
    loader = torch.utils.data.DataLoader(DictRows(lm.classification_data(16)), batch_size=4)
    # Every key but the label goes to the model as a keyword: DictClassifier takes no `features=`.
    with pytest.raises(MisconfigurationException, match="cannot run DictClassifier on the first training batch.*"
                                                        "label_key=, input_keys="):
        lm.trainer(callbacks=[InfluenceCallback(output_dir=str(tmp_path))]).fit(model, loader)
    assert model.steps == 0
    # With the keys named, the same batches work.
    cb = InfluenceCallback(task=ClassificationTask(input_key="features", label_key="label"),
                           output_dir=str(tmp_path), fisher="empirical")
    lm.trainer(callbacks=[cb], max_epochs=1).fit(DictClassifier(), loader)
    assert cb.factors.is_complete


def test_non_finite_outputs_fail_before_training(tmp_path):
    model = CountingClassifier()
    with torch.no_grad():
        model.net[2].bias.fill_(float("nan"))
    with pytest.raises(MisconfigurationException, match="first training batch.*influence needs finite losses"):
        _fit(model, InfluenceCallback(output_dir=str(tmp_path)))
    assert model.steps == 0


def test_unreadable_query_file_fails_before_training(tmp_path):
    queries = tmp_path / "queries.jsonl"
    queries.write_text(json.dumps({"prompt": "a"}) + "\n")
    model = CountingClassifier()
    with pytest.raises(MisconfigurationException, match=r"queries=.*line 1: missing required key 'completion'"):
        _fit(model, InfluenceCallback(output_dir=str(tmp_path), queries=str(queries)))
    assert model.steps == 0
    with pytest.raises(MisconfigurationException, match="needs a tokenizer"):
        queries.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
        _fit(CountingClassifier(), InfluenceCallback(output_dir=str(tmp_path), queries=str(queries)))


def test_check_leaves_weights_modes_and_rng_untouched(tmp_path):
    torch.manual_seed(0)
    model = CountingClassifier()
    model.train()
    cb = InfluenceCallback(output_dir=str(tmp_path), fit_on="manual")
    trainer = lm.trainer(callbacks=[cb], max_epochs=0)
    dm = lm.ClassificationData()
    trainer.fit(model, datamodule=dm)
    loader = dm.train_dataloader()
    cb.dataloader = loader
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    rng = torch.get_rng_state()
    cb.check_inputs(trainer, model)
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training and all(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    assert all(p.grad is None for p in model.parameters())


def test_fit_on_cut_short_by_max_steps_warns(tmp_path):
    cb = InfluenceCallback(fit_on=2, output_dir=str(tmp_path))
    with pytest.warns(UserWarning, match="fit_on=2 did not fire"):
        _fit(CountingClassifier(), cb, max_epochs=3, max_steps=3)
    assert cb.factors is None
