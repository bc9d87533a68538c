"""The low-rank query path (query batching) and token-wise scores against the full-rank path."""

import pytest
import torch

from lightning_influence import CausalLMTask, ClassificationTask, InfluenceScorer, fit_factors
from lightning_influence.errors import ScoringError
from lightning_influence.scoring.queries import QueryGradients, low_rank_factorize

from . import models


def gpt2_case(strategy="ekfac"):
    model = models.tiny_gpt2()
    train = models.lm_batch(6, vocab=11, max_len=8, pad_to=9, seed=1)
    queries = models.lm_batch(3, vocab=11, max_len=7, seed=3, prompt_len=3)
    task = CausalLMTask()
    factors = fit_factors(model, task, models.split_batch(train, 3), strategy=strategy, fisher="empirical",
                          capture_dtype=torch.float64)
    return model, task, factors, models.split_batch(train, 3), models.split_batch(queries, 2)


def mlp_case(strategy="ekfac"):
    model = models.mlp()
    train, queries = models.mlp_data(12, seed=1), models.mlp_data(4, seed=2)
    task = ClassificationTask()
    factors = fit_factors(model, task, models.split_batch(train, 4), strategy=strategy, fisher="empirical",
                          capture_dtype=torch.float64)
    return model, task, factors, models.split_batch(train, 4), models.split_batch(queries, 3)


CASES = {"gpt2": gpt2_case, "mlp": mlp_case}


def max_full_rank(factors):
    return max(min(l.shape) for l in factors.layers.values())


@pytest.fixture(scope="module")
def gpt2():
    return gpt2_case()


@pytest.mark.parametrize("case,strategy", [("gpt2", "ekfac"), ("mlp", "ekfac"), ("mlp", "identity")])
def test_full_rank_equals_full_matrix(request, case, strategy):
    if (case, strategy) == ("gpt2", "ekfac"):
        model, task, factors, train, queries = request.getfixturevalue("gpt2")
    else:
        model, task, factors, train, queries = CASES[case](strategy)
    full = InfluenceScorer(model, task, factors, score_dtype=torch.float64).pairwise_scores(queries, train)
    # Every layer at its own full rank (the rank is clipped per layer to min(d_out, d_in)).
    scorer = InfluenceScorer(model, task, factors, score_dtype=torch.float64, query_rank=max_full_rank(factors))
    qg = scorer.query_gradients(queries)
    for name, layer in factors.layers.items():
        assert qg.left[name].shape[-1] == min(layer.shape)
        assert float(qg.errors[name].max()) < 1e-12
    low = scorer.pairwise_scores(queries, train)
    # dtype: see test_float64_stays_float64 (scoring.py computes low-rank scores in float32 for now).
    torch.testing.assert_close(low, full, rtol=1e-6, atol=1e-7 * float(full.abs().max()), check_dtype=False)


@pytest.mark.parametrize("rank", [1, 2, 5])
def test_reported_errors_are_the_relative_frobenius_errors(gpt2, rank):
    model, task, factors, train, queries = gpt2
    full = InfluenceScorer(model, task, factors, score_dtype=torch.float64).query_gradients(queries)
    low = InfluenceScorer(model, task, factors, score_dtype=torch.float64, query_rank=rank,
                          query_svd="exact").query_gradients(queries)
    assert low.rank == rank
    for name in factors.layers:
        p = full.full[name]
        r = min(rank, *p.shape[1:])
        approx = low.left[name] @ low.right[name].transpose(-1, -2)
        direct = (p - approx).flatten(1).norm(dim=1) / p.flatten(1).norm(dim=1)
        torch.testing.assert_close(low.errors[name], direct, rtol=1e-6, atol=1e-12)
        # Eckart-Young: the best rank-r error is the norm of the discarded singular values.
        s = torch.linalg.svdvals(p)
        tail = s[:, r:].norm(dim=1) / s.norm(dim=1)
        torch.testing.assert_close(low.errors[name], tail, rtol=1e-6, atol=1e-12)
        if r < min(p.shape[1:]):
            assert float(low.errors[name].min()) > 0


def test_low_rank_scores_are_scores_of_the_approximation(gpt2):
    """At any rank, the low-rank contraction equals full-matrix scoring of U V^T."""
    model, task, factors, train, queries = gpt2
    scorer = InfluenceScorer(model, task, factors, score_dtype=torch.float64, query_rank=2)
    low = scorer.query_gradients(queries)
    as_full = QueryGradients(low.layer_names, low.num_queries,
                             full={n: low.left[n] @ low.right[n].transpose(-1, -2) for n in low.layer_names})
    for i, batch in enumerate(train):
        expected = scorer.score_batch(as_full, batch, i)
        torch.testing.assert_close(scorer.score_batch(low, batch, i), expected, rtol=1e-6,
                                   atol=1e-7 * float(expected.abs().max()), check_dtype=False)


@pytest.mark.parametrize("method", ["randomized", "exact"])
def test_factorize_methods_report_their_exact_error_and_are_near_optimal(method):
    """Matrices wide enough for the randomized sketch (rank + 8 < min(d_out, d_in)), with the fast
    spectral decay of gradients: the reported error is ||P - U V^T|| / ||P|| exactly, and within
    1% of the Eckart-Young optimum (exactly it for the full SVD)."""
    g = torch.Generator().manual_seed(0)
    s_tok = torch.randn(6, 40, 64, dtype=torch.float64, generator=g) * torch.logspace(0, -2, 40, dtype=torch.float64)[:, None]
    a_tok = torch.randn(6, 40, 48, dtype=torch.float64, generator=g)
    p = s_tok.transpose(1, 2) @ a_tok  # [6, 64, 48], a sum of 40 token outer products like DW
    for rank in (1, 4, 12):
        left, right, err = low_rank_factorize(p, rank, method)
        assert left.shape == (6, 64, rank) and right.shape == (6, 48, rank)
        direct = (p - left @ right.transpose(1, 2)).flatten(1).norm(dim=1) / p.flatten(1).norm(dim=1)
        torch.testing.assert_close(err, direct, rtol=1e-6, atol=1e-12)
        sv = torch.linalg.svdvals(p)
        optimal = sv[:, rank:].norm(dim=1) / sv.norm(dim=1)
        assert bool((direct >= optimal * (1 - 1e-9)).all())
        assert bool((direct <= optimal * (1.01 if method == "randomized" else 1 + 1e-9)).all()), (direct / optimal)


def test_unknown_query_svd_is_rejected(gpt2):
    model, task, factors, train, queries = gpt2
    with pytest.raises(ScoringError, match="query_svd must be one of"):
        InfluenceScorer(model, task, factors, query_rank=2, query_svd="qr")


def test_factorize_rejects_rank_beyond_layer():
    p = torch.randn(2, 4, 3, dtype=torch.float64)
    with pytest.raises(ScoringError, match=r"exceeds.*4x3 layer.*at most 3"):
        low_rank_factorize(p, 4)


def test_scorer_rejects_rank_beyond_every_layer():
    model, task, factors, _, _ = mlp_case()
    with pytest.raises(ScoringError, match="query_rank"):
        InfluenceScorer(model, task, factors, query_rank=max_full_rank(factors) + 1)


@pytest.mark.parametrize("rank", [None, 2, 9])
def test_token_wise_scores_sum_to_sequence_scores(gpt2, rank):
    model, task, factors, train, queries = gpt2
    scorer = InfluenceScorer(model, task, factors, score_dtype=torch.float64, query_rank=rank)
    qg = scorer.query_gradients(queries)
    for i, batch in enumerate(train):
        seq = scorer.score_batch(qg, batch, i)
        tok = scorer.score_batch(qg, batch, i, token_wise=True)
        b, t = batch["input_ids"].shape
        assert tok.shape == (len(factors.layers), qg.num_queries, b, t)
        scale = float(seq.abs().max())
        torch.testing.assert_close(tok.sum(-1), seq, rtol=1e-5, atol=1e-7 * scale, check_dtype=False)
        torch.testing.assert_close(tok.sum((0, -1)), seq.sum(0), rtol=1e-5, atol=1e-7 * scale, check_dtype=False)
        pad = batch["attention_mask"] == 0
        assert pad.any()
        assert (tok[..., pad] == 0).all(), "padded tokens must contribute exactly zero"


@pytest.mark.parametrize("rank", [None, 2])
def test_float64_stays_float64(gpt2, rank):
    model, task, factors, train, queries = gpt2
    scorer = InfluenceScorer(model, task, factors, score_dtype=torch.float64, query_rank=rank)
    qg = scorer.query_gradients(queries)
    assert scorer.score_batch(qg, train[0]).dtype == torch.float64
    assert scorer.score_batch(qg, train[0], token_wise=True).dtype == torch.float64


@pytest.mark.parametrize("dense", [True, False])
@pytest.mark.parametrize("rank", [2, None])
def test_both_low_rank_contractions_give_the_same_scores(gpt2, monkeypatch, dense, rank):
    """The cost model picks DW-then-dot or the token-wise contraction; both must agree with full rank."""
    import lightning_influence.scoring.engine as scoring

    model, task, factors, train, queries = gpt2
    full_rank = max_full_rank(factors)
    expected = InfluenceScorer(model, task, factors, score_dtype=torch.float64,
                               query_rank=full_rank).pairwise_scores(queries, train)
    monkeypatch.setattr(scoring, "_dense_cheaper", lambda *a: dense)
    monkeypatch.setattr(scoring, "_CHUNK_ELEMENTS", 64)  # several query chunks even on tiny layers
    scorer = InfluenceScorer(model, task, factors, score_dtype=torch.float64, query_rank=rank or full_rank)
    got = scorer.pairwise_scores(queries, train)
    if rank is None:
        torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10 * float(expected.abs().max()))
    else:
        monkeypatch.setattr(scoring, "_dense_cheaper", lambda *a: not dense)
        other = InfluenceScorer(model, task, factors, score_dtype=torch.float64, query_rank=rank).pairwise_scores(queries, train)
        torch.testing.assert_close(got, other, rtol=1e-8, atol=1e-10 * float(other.abs().max()))
