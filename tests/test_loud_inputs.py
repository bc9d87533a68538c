"""Inputs that used to give a silent wrong answer (or a foreign error) now give the right answer or our error:
tied weights, an unseeded randomized SVD, non-finite outputs under the sampled Fisher."""

import logging

import pytest
import torch
from torch import nn

from lightning_influence import CausalLMTask, ClassificationTask, InfluenceScorer, fit_factors
from lightning_influence.capture import find_tracked_layers
from lightning_influence.errors import TaskInputError

from . import models


def tied_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=11, n_positions=24, n_embd=8, n_layer=1, n_head=2, tie_word_embeddings=True)
    model = GPT2LMHeadModel(config).double().eval()
    assert model.lm_head.weight is model.transformer.wte.weight
    return model


def test_tied_head_is_left_out_of_the_default_selection(caplog):
    model = tied_gpt2()
    with caplog.at_level(logging.WARNING, logger="lightning_influence.capture"):
        layers = find_tracked_layers(model)
    assert "lm_head" not in layers and "transformer.h.0.mlp.c_fc" in layers
    assert "'lm_head' shares its weight with untracked module(s) ['transformer.wte']" in caplog.text
    assert "Left out of the default selection" in caplog.text


def test_tied_head_selected_by_a_pattern_warns_and_is_tracked():
    model = tied_gpt2()
    expected = r"'lm_head' shares its weight with untracked module\(s\) \['transformer.wte'\]"
    with pytest.warns(UserWarning, match=expected):
        layers = find_tracked_layers(model, ["lm_head", "transformer.h.0.mlp.*"])
    assert "lm_head" in layers


def test_untied_head_is_tracked_silently(recwarn):
    layers = find_tracked_layers(models.tiny_gpt2())
    assert "lm_head" in layers and not [w for w in recwarn if "shares its weight" in str(w.message)]


def wide_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 3)).double()


def test_randomized_query_svd_is_seeded_and_leaves_the_global_rng_alone():
    model = wide_mlp()
    g = torch.Generator().manual_seed(1)
    train = (torch.randn(8, 12, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g))
    queries = (torch.randn(3, 12, generator=g, dtype=torch.float64), torch.randint(0, 3, (3,), generator=g))
    task = ClassificationTask()
    factors = fit_factors(model, task, [train], strategy="ekfac", capture_dtype=torch.float64)
    # rank 2 + 8 oversampled directions < 13 = min(16, 12 + bias): the randomized path is taken
    scorer = InfluenceScorer(model, task, factors, score_dtype=torch.float64, query_rank=2, query_svd="randomized")
    results = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        before = torch.get_rng_state()
        results.append(scorer.pairwise_scores([queries], [train]))
        assert torch.equal(torch.get_rng_state(), before), "the query SVD drew from the global RNG"
    assert torch.equal(results[0], results[1])


class NaNOnSecondBatch(nn.Module):
    """Returns NaN logits for example 2 of any batch whose first input is marked (x[0, 0] > 50)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 3)

    def forward(self, x):
        out = self.lin(x)
        if x[0, 0] > 50:
            out = out.clone()
            out[2] = float("nan")
        return out


def test_non_finite_logits_under_the_sampled_fisher_name_the_batch():
    torch.manual_seed(0)
    model = NaNOnSecondBatch().double()
    x, y = models.mlp_data(8)
    bad = x[4:].clone()
    bad[0, 0] = 100.0
    batches = [(x[:4], y[:4]), (bad, y[4:])]
    with pytest.raises(TaskInputError, match=r"training batch 1: the model's logits are not finite .* positions \[2\]"):
        fit_factors(model, ClassificationTask(), batches, strategy="kfac", fisher="sampled", capture_dtype=torch.float64)


class NaNLM(models.TinySeqLM):
    def forward(self, input_ids, attention_mask=None):
        out = super().forward(input_ids)
        return torch.where(input_ids.unsqueeze(-1) == 8, torch.full_like(out, float("inf")), out)


def test_non_finite_lm_logits_under_the_sampled_fisher_name_the_batch():
    torch.manual_seed(0)
    model = NaNLM().double()
    batch = models.lm_batch(4, max_len=8, seed=1)
    batch["input_ids"][1, 1] = 8  # a real (counted) position
    with pytest.raises(TaskInputError, match=r"training batch 0: the model's logits .* not finite"):
        fit_factors(model, CausalLMTask(), [batch], strategy="kfac", fisher="sampled", capture_dtype=torch.float64)



@pytest.mark.gpu
def test_randomized_query_svd_on_cuda_is_seeded_and_leaves_the_cuda_rng_alone():
    from lightning_influence.scoring.queries import low_rank_factorize

    p = torch.randn(3, 40, 30, generator=torch.Generator().manual_seed(0)).cuda()
    torch.cuda.manual_seed(1)
    first = low_rank_factorize(p, 4, "randomized")
    after = torch.cuda.get_rng_state()
    torch.cuda.manual_seed(1)
    assert torch.equal(after, torch.cuda.get_rng_state()), "the query SVD drew from the CUDA RNG"
    torch.cuda.manual_seed(2)
    second = low_rank_factorize(p, 4, "randomized")
    assert all(torch.equal(a, b) for a, b in zip(first, second))
