"""Accuracy of bf16/fp16 compute against float32 on the tiny GPT-2 (run with -s to see the numbers).

``InfluenceScorer(score_dtype=bf16|fp16)`` captures activations/gradients and preconditions the
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
    reference = {rank: InfluenceScorer(model, task, factors, score_dtype=torch.float32, query_rank=rank)
                 .pairwise_scores(queries, train) for rank in (None, 4)}
    return model, task, factors, train, queries, reference


@pytest.mark.parametrize("rank", [None, 4])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_compute_tracks_float32(setup, dtype, rank):
    model, task, factors, train, queries, reference = setup
    reference = reference[rank]
    scores = InfluenceScorer(model, task, factors, score_dtype=dtype, query_rank=rank).pairwise_scores(queries, train)
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
    scores = InfluenceScorer(low, task, factors, score_dtype=dtype).pairwise_scores(queries, train)
    rel, pearson = errors(scores, reference)
    show(f"{dtype} model and compute", rel, pearson)
    assert pearson > 0.99


def test_float32_against_float64(setup):
    """For scale: float32 compute against float64 on the same model (float64 copy of the weights)."""
    model, task, factors, train, queries, reference = setup
    scores32 = reference[None]
    model64 = models.tiny_gpt2()
    factors64 = fit_factors(model64, task, train, strategy="ekfac", fisher="empirical", capture_dtype=torch.float64)
    scores64 = InfluenceScorer(model64, task, factors64, score_dtype=torch.float64).pairwise_scores(queries, train)
    rel, pearson = errors(scores32, scores64)
    show("float32 against float64", rel, pearson)
    assert rel < 1e-3 and pearson > 0.9999


@pytest.mark.parametrize("strategy", ["diagonal", "kfac", "ekfac"])
def test_float32_statistics_match_float64(tmp_path, strategy):
    """stats_dtype=float32 keeps the sums, eigenbases and Lambda in float32 (counts stay float64),
    survives a save/load round trip in float32, and scores like float64 statistics."""
    from lightning_influence import InfluenceFactors

    model = models.tiny_gpt2()  # float64 model: only the statistics' dtype differs
    train = models.split_batch(models.lm_batch(16, vocab=11, max_len=8, pad_to=9, seed=1), 4)
    queries = [models.lm_batch(6, vocab=11, max_len=7, seed=3, prompt_len=3)]
    task = CausalLMTask()
    ref = fit_factors(model, task, train, strategy=strategy, fisher="empirical", capture_dtype=torch.float64)
    low = fit_factors(model, task, train, strategy=strategy, fisher="empirical", capture_dtype=torch.float64,
                      stats_dtype=torch.float32, output_dir=str(tmp_path))
    for name, tensors in low.tensors.items():
        for key, value in tensors.items():
            assert value.dtype == (torch.float64 if key.endswith("_count") else torch.float32), (name, key)
            if "eigvecs" not in key:  # eigenvectors are defined up to sign (and order within ties)
                torch.testing.assert_close(value.double(), ref.tensors[name][key], rtol=1e-4,
                                           atol=1e-6 * float(ref.tensors[name][key].abs().max()))
    loaded = InfluenceFactors.load(tmp_path)
    assert all(loaded.tensors[n][k].dtype == v.dtype for n, t in low.tensors.items() for k, v in t.items())
    expected = InfluenceScorer(model, task, ref, score_dtype=torch.float64).pairwise_scores(queries, train)
    got = InfluenceScorer(model, task, loaded, score_dtype=torch.float64).pairwise_scores(queries, train)
    rel, pearson = errors(got, expected)
    show(f"float32 statistics ({strategy})", rel, pearson)
    assert rel < 1e-5 and pearson > 1 - 1e-10


def test_stats_dtype_must_be_float32_or_float64():
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    from lightning_influence import InfluenceCallback
    from lightning_influence.errors import OptionsError

    model = models.tiny_gpt2()
    batch = [models.lm_batch(2, vocab=11, max_len=5, seed=1)]
    with pytest.raises(OptionsError, match="stats_dtype must be one of float64, float32"):
        fit_factors(model, CausalLMTask(), batch, strategy="kfac", stats_dtype=torch.bfloat16)
    with pytest.raises(MisconfigurationException, match="stats_dtype must be one of float64, float32"):
        InfluenceCallback(stats_dtype="float16")
