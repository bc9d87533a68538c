"""Real models with the defaults: the memory plan refuses before training, named layer selections on
transformers layouts, sharded strategies refused at setup, pass bars that reach their end."""

import logging
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_influence import CausalLMTask, ClassificationTask, InfluenceCallback, fit_factors
from lightning_influence.capture import NAMED_SELECTIONS, find_tracked_layers
from lightning_influence.errors import TrackingError
from lightning_influence.memory import MemoryBudgetError

from . import lit_models as lm
from . import models


# ------------------------------------------------------------------ the plan before training
class WideHead(lm.LitClassifier):
    """A small body with a 3000-class head: its output covariance alone is 3000^2 float64 = 72 MB."""

    def __init__(self):
        super().__init__(classes=3000)
        self.steps = 0

    def training_step(self, batch, batch_idx):
        self.steps += 1
        return super().training_step(batch, batch_idx)


def wide_data(n=16):
    g = torch.Generator().manual_seed(0)
    return torch.utils.data.TensorDataset(torch.randn(n, 6, generator=g), torch.randint(0, 3000, (n,), generator=g))


def test_wide_head_over_the_budget_is_refused_with_zero_training_steps(tmp_path):
    model = WideHead()
    cb = InfluenceCallback(task="classification", output_dir=str(tmp_path / "f"), memory_budget="32MiB")
    with pytest.raises(MisconfigurationException) as err:
        lm.trainer(callbacks=[cb], max_epochs=1).fit(model, lm.loader(wide_data()))
    assert model.steps == 0
    text = str(err.value)
    # names the layer that dominates, its shape, the budget and what would fit
    assert "'net.2' (3000x9" in text and "32.00 MiB" in text and "before the first training step" in text
    assert "modules='mlp'" in text and "memory_budget=" in text
    assert not (tmp_path / "f" / "manifest.json").exists()


def test_a_plan_within_the_budget_is_logged_with_the_tracked_share_and_fits(tmp_path, caplog):
    model = WideHead()
    cb = InfluenceCallback(task="classification", output_dir=str(tmp_path / "f"), memory_budget="2GiB",
                           fisher="empirical", max_batches=1)
    with caplog.at_level(logging.INFO):
        lm.trainer(callbacks=[cb], max_epochs=1).fit(model, lm.loader(wide_data()))
    assert model.steps == 2 and cb.factors is not None and cb.factors.is_complete
    plan = next(r.getMessage() for r in caplog.records if "influence memory plan" in r.getMessage())
    params = sum(p.numel() for p in model.parameters())
    assert f"2 layers, {params:,} tracked parameters (100.0% of the model's {params:,} parameters)" in plan
    assert "covariance finish" in plan and "lambda pass" in plan


def test_the_first_batchs_working_set_is_planned_before_training(tmp_path):
    # Statistics of a few KiB, but the batch's per-example gradients [B, d_out, d_in] of the 3000-wide head
    # are 64 x 3000 x 9 x 4 bytes = 6.6 MiB: the setup check passes, the first-batch check refuses.
    model = WideHead()
    cb = InfluenceCallback(task="classification", output_dir=str(tmp_path / "f"), strategy="diagonal",
                           memory_budget="4MiB")
    with pytest.raises(MisconfigurationException, match=r"phase on cpu \(InfluenceCallback, before the first training step\), over the budget of 4.00 MiB"):
        lm.trainer(callbacks=[cb], max_epochs=1).fit(model, lm.loader(wide_data(64), batch_size=64))
    assert model.steps == 0
    # the plan without a batch is under the budget: the refusal came from the first batch's shape
    trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu")))
    assert cb.memory_plan(trainer, model, find_tracked_layers(model)).peak.total < 4 * 2 ** 20
    assert cb.memory_plan(trainer, model, find_tracked_layers(model), 64, {"net.0": 1, "net.2": 1}).peak.total \
        > 4 * 2 ** 20


def test_fit_factors_refuses_over_its_budget_before_any_pass(monkeypatch, tmp_path):
    import lightning_influence.passes as passes

    ran = []
    monkeypatch.setattr(passes, "run_phase", lambda *a, **k: ran.append(a[0]))
    model = WideHead().net
    batches = [(x, y) for x, y in lm.loader(wide_data())]
    with pytest.raises(MemoryBudgetError, match=r"fit_factors\), over the budget of 32.00 MiB.*'2' \(3000x9"):
        fit_factors(model, ClassificationTask(), batches, memory_budget="32MiB", output_dir=str(tmp_path))
    assert ran == [] and not (tmp_path / "manifest.json").exists()
    fit_factors(model, ClassificationTask(), batches, memory_budget=2 ** 31)
    assert ran == ["covariance", "lambda"]


# ------------------------------------------------------------------ named selections
def _meta(cls, config):
    with torch.device("meta"):
        return cls(config)


def transformers_models():
    import transformers as T

    small = dict(num_hidden_layers=2, num_attention_heads=2, vocab_size=64)
    return {
        "gpt2": _meta(T.GPT2LMHeadModel, T.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=64)),
        "llama": _meta(T.LlamaForCausalLM, T.LlamaConfig(hidden_size=16, intermediate_size=32, **small)),
        "mistral": _meta(T.MistralForCausalLM, T.MistralConfig(hidden_size=16, intermediate_size=32,
                                                               num_key_value_heads=1, **small)),
        "bert": _meta(T.BertForSequenceClassification, T.BertConfig(hidden_size=16, intermediate_size=32, **small)),
        "neox": _meta(T.GPTNeoXForCausalLM, T.GPTNeoXConfig(hidden_size=16, intermediate_size=32, **small)),
        "opt": _meta(T.OPTForCausalLM, T.OPTConfig(hidden_size=16, ffn_dim=32, word_embed_proj_dim=16, **small)),
    }


EXPECTED_MLP = {
    "gpt2": ["transformer.h.{i}.mlp.c_fc", "transformer.h.{i}.mlp.c_proj"],
    "llama": ["model.layers.{i}.mlp.gate_proj", "model.layers.{i}.mlp.up_proj", "model.layers.{i}.mlp.down_proj"],
    "mistral": ["model.layers.{i}.mlp.gate_proj", "model.layers.{i}.mlp.up_proj", "model.layers.{i}.mlp.down_proj"],
    "bert": ["bert.encoder.layer.{i}.intermediate.dense", "bert.encoder.layer.{i}.output.dense"],
    "neox": ["gpt_neox.layers.{i}.mlp.dense_h_to_4h", "gpt_neox.layers.{i}.mlp.dense_4h_to_h"],
    "opt": ["model.decoder.layers.{i}.fc1", "model.decoder.layers.{i}.fc2"],
}
EXPECTED_ATTENTION = {
    "gpt2": ["transformer.h.{i}.attn.c_attn", "transformer.h.{i}.attn.c_proj"],
    "llama": [f"model.layers.{{i}}.self_attn.{p}_proj" for p in "qkvo"],
    "mistral": [f"model.layers.{{i}}.self_attn.{p}_proj" for p in "qkvo"],
    "bert": [f"bert.encoder.layer.{{i}}.attention.self.{p}" for p in ("query", "key", "value")]
            + ["bert.encoder.layer.{i}.attention.output.dense"],
    "neox": ["gpt_neox.layers.{i}.attention.query_key_value", "gpt_neox.layers.{i}.attention.dense"],
    "opt": [f"model.decoder.layers.{{i}}.self_attn.{p}_proj" for p in ("k", "v", "q", "out")],
}


@pytest.mark.parametrize("arch", sorted(EXPECTED_MLP))
def test_named_selections_pick_the_mlp_and_attention_layers(arch):
    model = transformers_models()[arch]
    for selection, expected in (("mlp", EXPECTED_MLP), ("attention", EXPECTED_ATTENTION)):
        names = [n.format(i=i) for i in range(2) for n in expected[arch]]
        assert list(find_tracked_layers(model, selection)) == names, (arch, selection)
    # both at once, in the model's module order, nothing else (no head, no embedding projection)
    both = find_tracked_layers(model, ["mlp", "attention"])
    assert set(both) == set(find_tracked_layers(model, "mlp")) | set(find_tracked_layers(model, "attention"))
    assert list(both) == [n for n, _ in model.named_modules() if n in both]


def test_named_selection_of_an_unknown_layout_names_the_patterns_to_use():
    with pytest.raises(TrackingError) as err:
        find_tracked_layers(models.mlp(), "mlp")
    text = str(err.value)
    assert "GPT-2: h.*.mlp.c_fc" in text and "modules=['*.mlp.*']" in text and "Its trackable modules are: 0, 2" in text


def test_a_module_literally_named_like_a_selection_is_taken_literally():
    model = nn.Sequential()
    model.add_module("mlp", nn.Linear(3, 2))
    model.add_module("out", nn.Linear(2, 1))
    assert list(find_tracked_layers(model, "mlp")) == ["mlp"]
    assert set(NAMED_SELECTIONS) == {"mlp", "attention"}


def test_fit_through_the_mlp_selection_tracks_only_the_mlp():
    model = models.tiny_gpt2()
    train = models.split_batch(models.lm_batch(6, vocab=11, max_len=9, pad_to=9, seed=1), 3)
    factors = fit_factors(model, CausalLMTask(), train, modules="mlp", fisher="empirical", capture_dtype=torch.float64)
    assert list(factors.layers) == ["transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"]
    assert factors.is_complete


# ------------------------------------------------------------------ sharded strategies
def _fake_strategy(class_name):
    return type(class_name, (), {"root_device": torch.device("cpu")})()


@pytest.mark.parametrize("strategy", ["fsdp", "FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy"])
def test_sharded_strategies_are_refused_at_setup(strategy):
    if strategy == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy

        obj = FSDPStrategy()  # the real class; constructing it needs no GPU
    else:
        obj = _fake_strategy(strategy)
    cb = InfluenceCallback(task="classification")
    with pytest.raises(MisconfigurationException) as err:
        cb.setup(SimpleNamespace(strategy=obj), lm.LitClassifier(), "fit")
    text = str(err.value)
    assert "shards the parameters" in text and "strategy='ddp'" in text and "fit_factors" in text


def test_ddp_like_strategies_are_not_refused(tmp_path):
    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

    from lightning_influence.integration.callback import _refuse_sharded

    _refuse_sharded(DDPStrategy())
    _refuse_sharded(SingleDeviceStrategy(device="cpu"))


# ------------------------------------------------------------------ progress
class _Bar:
    def __init__(self, total):
        self.total, self.n, self.refreshed = total, 0, False

    def update(self, k=1):
        self.n += k

    def refresh(self):
        self.refreshed = True


@pytest.mark.parametrize("limits,expected", [({"max_examples": 5}, 3), ({"max_batches": 2}, 2), ({}, 8),
                                             ({"max_examples": 5, "max_batches": 2}, 2)])
def test_pass_bars_end_at_their_real_total(monkeypatch, tmp_path, caplog, limits, expected):
    import contextlib

    import lightning_influence.integration.callback as callback

    bars = []

    @contextlib.contextmanager
    def recording_bar(total, desc, enabled=True):
        bars.append(_Bar(total))
        yield bars[-1]

    monkeypatch.setattr(callback, "progress_bar", recording_bar)
    cb = InfluenceCallback(task="classification", output_dir=str(tmp_path), fit_on="manual", fisher="empirical",
                           **limits)
    model = lm.LitClassifier()
    trainer = lm.trainer(callbacks=[cb], max_epochs=1)
    train = lm.loader(lm.classification_data(16), batch_size=2)
    trainer.fit(model, train)
    with caplog.at_level(logging.INFO):
        cb.fit_factors(trainer, model, dataloader=train)
    assert [(b.total, b.n) for b in bars] == [(expected, expected)] * 2  # covariance and lambda passes
    logs = [r.getMessage() for r in caplog.records]
    assert any(f"covariance pass: {expected} batches in" in m and "eigendecompositions" in m for m in logs)
    assert any(f"lambda pass: {expected} batches in" in m for m in logs)


def test_a_bar_whose_total_was_unknown_ends_at_the_batches_run():
    from lightning_influence.integration.callback import finish_bar, pass_batches

    bar = _Bar(None)
    bar.update(4)
    finish_bar(bar)
    assert (bar.total, bar.n, bar.refreshed) == (4, 4, True)
    assert pass_batches(iter([]), None, 5) is None  # no length, no batch size: unknown
    assert pass_batches(lm.loader(lm.classification_data(16), batch_size=4), None, 6) == 2
