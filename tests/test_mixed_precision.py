"""Accuracy of bf16/fp16 compute against float32 on the tiny GPT-2 (run with -s to see the numbers).

``InfluenceScorer(dtype=bf16|fp16)`` captures activations/gradients and preconditions the
queries in float32 (its accumulation dtype) and runs the scoring contractions in the low
precision, accumulating the products in float32.
"""

import pytest
import torch

from lightning_influence import CausalLMTask, InfluenceScorer, fit_factors

from . import models


def show(what: str, rel: float, pearson: float) -> None:
    print(f"\n{what}: relative Frobenius error {rel:.2e}, Pearson {pearson:.8f} (1 - r = {1 - pearson:.1e})")


def errors(scores: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    s, r = scores.double().flatten(), reference.double().flatten()
    rel = float((s - r).norm() / r.norm())
    pearson = float(torch.corrcoef(torch.stack([s, r]))[0, 1])
    return rel, pearson


@pytest.fixture(scope="module")
def setup():
    model = models.tiny_gpt2().float()
    train = [models.lm_batch(16, vocab=11, max_len=8, pad_to=9, seed=1)]
    queries = [models.lm_batch(6, vocab=11, max_len=7, seed=3, prompt_len=3)]
    task = CausalLMTask()
    factors = fit_factors(model, task, train, strategy="ekfac", fisher="empirical")
    reference = {rank: InfluenceScorer(model, task, factors, dtype=torch.float32, query_rank=rank)
                 .pairwise_scores(queries, train) for rank in (None, 4)}
    return model, task, factors, train, queries, reference


@pytest.mark.parametrize("rank", [None, 4])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_compute_tracks_float32(setup, dtype, rank):
    model, task, factors, train, queries, reference = setup
    reference = reference[rank]
    scores = InfluenceScorer(model, task, factors, dtype=dtype, query_rank=rank).pairwise_scores(queries, train)
    assert scores.dtype == torch.float32  # accumulated and returned in float32
    rel, pearson = errors(scores, reference)
    show(f"{dtype} compute, query_rank={rank}", rel, pearson)
    assert pearson > 0.99
    assert rel < (0.05 if dtype == torch.bfloat16 else 0.01)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_model_weights(setup, dtype):
    """The model itself in bf16/fp16 (factors fitted in float32): the activations change too."""
    model, task, factors, train, queries, reference = setup
    reference = reference[None]
    low = models.tiny_gpt2().to(dtype)
    scores = InfluenceScorer(low, task, factors, dtype=dtype).pairwise_scores(queries, train)
    rel, pearson = errors(scores, reference)
    show(f"{dtype} model and compute", rel, pearson)
    assert pearson > 0.99


def test_float32_against_float64(setup):
    """For scale: float32 compute against float64 on the same model (float64 copy of the weights)."""
    model, task, factors, train, queries, reference = setup
    scores32 = reference[None]
    model64 = models.tiny_gpt2()
    factors64 = fit_factors(model64, task, train, strategy="ekfac", fisher="empirical", dtype=torch.float64)
    scores64 = InfluenceScorer(model64, task, factors64, dtype=torch.float64).pairwise_scores(queries, train)
    rel, pearson = errors(scores32, scores64)
    show("float32 against float64", rel, pearson)
    assert rel < 1e-3 and pearson > 0.9999
