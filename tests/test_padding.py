"""Padding changes nothing: not the padded length, not the token ids placed at padded positions.

Right padding of causal-LM batches: the real tokens never see the padding (causal attention,
or no attention at all for ``seq_lm``), so every factor and score must be the same whether a
batch is padded to 10 or to 16 and whatever ids fill the padding. The sampled Fisher is
included: its labels must be drawn for the real positions only.
"""

import pytest
import torch

from lightning_influence import CausalLMTask, InfluenceScorer, fit_factors

from . import models
from .dense import covariance_sum

STRATEGIES = ["identity", "diagonal", "kfac", "ekfac"]
MODELS = {"seq_lm": (models.seq_lm, 9), "tiny_gpt2": (models.tiny_gpt2, 11)}


def repad(batch, length, fill=0, seed=None):
    """The same sequences right-padded to ``length``; padded ids are ``fill`` or random (``seed``)."""
    n, t = batch["input_ids"].shape
    mask = torch.zeros(n, length, dtype=torch.long)
    mask[:, :t] = batch["attention_mask"]
    ids = torch.full((n, length), fill, dtype=torch.long)
    ids[:, :t] = batch["input_ids"]
    if seed is not None:
        g = torch.Generator().manual_seed(seed)
        ids = torch.where(mask.bool(), ids, torch.randint(0, 9, ids.shape, generator=g))
    labels = torch.full((n, length), -100, dtype=torch.long)
    labels[:, :t] = batch["labels"]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def assert_same_factors(f1, f2):
    assert f1.layers == f2.layers and f1.phase == f2.phase == "complete"
    for name in f1.layers:
        t1, t2 = f1.tensors[name], f2.tensors[name]
        assert t1.keys() == t2.keys()
        for key in t1:
            if key.endswith("eigvecs"):
                continue  # a basis is defined up to signs/rotations; compared through dense_matrix below
            scale = float(t1[key].abs().max())
            torch.testing.assert_close(t1[key], t2[key], rtol=1e-8, atol=1e-12 * max(scale, 1.0),
                                       msg=f"{name}::{key}")
        if f1.strategy != "identity":
            d1, d2 = f1.dense_matrix(name), f2.dense_matrix(name)
            torch.testing.assert_close(d1, d2, rtol=1e-8, atol=1e-10 * float(d1.abs().max()), msg=name)
            assert f1.damping_for(name) == pytest.approx(f2.damping_for(name), rel=1e-10)


def fit_and_score(model, train, queries, strategy, fisher):
    task = CausalLMTask()
    factors = fit_factors(model, task, models.split_batch(train, 3), strategy=strategy, fisher=fisher,
                          capture_dtype=torch.float64)
    scorer = InfluenceScorer(model, task, factors, score_dtype=torch.float64)
    pair = scorer.pairwise_scores([queries], models.split_batch(train, 3))
    own = scorer.self_scores(models.split_batch(train, 3))
    return factors, pair, own



CASES = [(s, "sampled") for s in STRATEGIES] + [("ekfac", "empirical")]


@pytest.mark.parametrize("strategy, fisher", CASES)
@pytest.mark.parametrize("model_name", list(MODELS))
def test_padding_changes_nothing(model_name, strategy, fisher):
    make, vocab = MODELS[model_name]
    model = make()
    base = models.lm_batch(6, vocab=vocab, max_len=8, pad_to=10, seed=1)
    assert (base["attention_mask"] == 0).any()  # there is padding to begin with
    queries = repad(models.lm_batch(2, vocab=vocab, max_len=7, seed=3, prompt_len=2), 12, fill=5, seed=7)
    variants = {"T=16": repad(base, 16), "T=16, other padded ids": repad(base, 16, seed=5)}
    assert (variants["T=16, other padded ids"]["input_ids"] != variants["T=16"]["input_ids"]).any()
    ref_factors, ref_pair, ref_self = fit_and_score(model, base, queries, strategy, fisher)
    assert ref_pair.abs().max() > 0 and (ref_self > 0).all()
    for what, batch in variants.items():
        factors, pair, own = fit_and_score(model, batch, queries, strategy, fisher)
        assert_same_factors(ref_factors, factors)
        torch.testing.assert_close(pair, ref_pair, rtol=1e-8, atol=1e-10 * float(ref_pair.abs().max()), msg=what)
        torch.testing.assert_close(own, ref_self, rtol=1e-8, atol=1e-10 * float(ref_self.abs().max()), msg=what)


def test_padding_does_reach_the_layers():
    """Guard: without the mask the padded positions WOULD change the covariances (so the test above bites)."""
    model = models.seq_lm()
    base = models.lm_batch(6, max_len=8, pad_to=10, seed=1)
    other = repad(base, 16, seed=4)
    no_mask = lambda b: {**b, "attention_mask": torch.ones_like(b["attention_mask"])}  # noqa: E731
    f1 = fit_factors(model, CausalLMTask(), [no_mask(base)], strategy="kfac", fisher="empirical", capture_dtype=torch.float64)
    f2 = fit_factors(model, CausalLMTask(), [no_mask(other)], strategy="kfac", fisher="empirical", capture_dtype=torch.float64)
    assert not torch.allclose(covariance_sum(f1.tensors["up"], "A") / f1.tensors["up"]["A_count"],
                              covariance_sum(f2.tensors["up"], "A") / f2.tensors["up"]["A_count"])
