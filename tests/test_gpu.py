"""CUDA runs agree with CPU runs (skipped without a GPU; run these when a GPU is lent)."""

import pytest
import torch

from lightning_influence import CausalLMTask, ClassificationTask, InfluenceScorer, fit_factors

from . import models

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("strategy", ["diagonal", "kfac", "ekfac"])
def test_cuda_factors_and_scores_match_cpu(strategy):
    model = models.tiny_gpt2().float()
    train = models.split_batch(models.lm_batch(12, vocab=11, max_len=9, pad_to=9, seed=1), 4)
    queries = [models.lm_batch(3, vocab=11, max_len=7, seed=3, prompt_len=3)]
    task = CausalLMTask()
    cpu = fit_factors(model, task, train, strategy=strategy, fisher="empirical")
    cpu_scores = InfluenceScorer(model, task, cpu).pairwise_scores(queries, train)
    gpu_model = models.tiny_gpt2().float().cuda()
    gpu = fit_factors(gpu_model, task, train, strategy=strategy, fisher="empirical")
    gpu_scores = InfluenceScorer(gpu_model, task, gpu).pairwise_scores(queries, train)
    for name in cpu.tensors:
        for key, value in cpu.tensors[name].items():
            if "eigvecs" not in key:
                torch.testing.assert_close(gpu.tensors[name][key].cpu(), value, rtol=1e-4, atol=1e-6)
    scale = float(cpu_scores.abs().max())
    torch.testing.assert_close(gpu_scores.cpu(), cpu_scores, rtol=1e-3, atol=1e-4 * scale)


def test_cuda_bf16_scoring_correlates_with_float32():
    model = models.mlp(bias=True).float().cuda()
    data = models.mlp_data(64, seed=1)
    train = [tuple(t.float() if t.is_floating_point() else t for t in b) for b in models.split_batch(data, 16)]
    queries = [tuple(t.float() if t.is_floating_point() else t for t in models.mlp_data(4, seed=2))]
    task = ClassificationTask()
    factors = fit_factors(model, task, train, strategy="ekfac", fisher="empirical")
    ref = InfluenceScorer(model, task, factors).pairwise_scores(queries, train)
    bf16 = InfluenceScorer(model, task, factors, score_dtype=torch.bfloat16).pairwise_scores(queries, train)
    corr = torch.corrcoef(torch.stack([ref.flatten(), bf16.float().flatten()]))[0, 1]
    assert corr > 0.99


@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed"])
def test_sharded_strategies_refused_at_setup_on_cuda(strategy, tmp_path):
    """A real FSDP (or DeepSpeed) trainer on the GPU: the callback refuses at setup, before any training step."""
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    from lightning_influence import InfluenceCallback

    from . import lit_models as lm
    from .test_callback_checks import CountingClassifier

    if strategy == "deepspeed":
        pytest.importorskip("deepspeed")
    model = CountingClassifier()
    cb = InfluenceCallback(task="classification", output_dir=str(tmp_path))
    trainer = lm.trainer(callbacks=[cb], accelerator="cuda", devices=1, strategy=strategy, max_epochs=1)
    with pytest.raises(MisconfigurationException, match=r"shards the parameters.*strategy='ddp'"):
        trainer.fit(model, lm.loader(lm.classification_data(16)))
    assert model.steps == 0
