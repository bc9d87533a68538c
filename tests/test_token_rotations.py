"""Rotations in token space (sequences shorter than the layer) and in gradient space (longer ones):
both paths of self-influence, query preconditioning and full-rank scoring against explicit matrices."""

import pytest
import torch

from lightning_influence import InfluenceFactors
from lightning_influence.capture import TrackedLayer
from lightning_influence.curvature.kfac import rotation_in_token_space
from lightning_influence.scoring import engine
from lightning_influence.scoring.queries import QueryGradients


def random_factors(strategy, d_out, d_in, block_size=None, seed=0):
    """Complete factors from random token covariances (and a random Lambda), any layout."""
    g = torch.Generator().manual_seed(seed)
    layer = TrackedLayer("w", "linear", d_out, d_in, False)
    factors = InfluenceFactors(strategy, {"w": layer}, damping=0.05, block_size=block_size, block_threshold=None)
    a = torch.randn(200, d_in, generator=g, dtype=torch.float64) * torch.linspace(0.2, 2, d_in, dtype=torch.float64)
    s = torch.randn(200, d_out, generator=g, dtype=torch.float64)
    t = factors.tensors["w"]
    t.update(factors.curvature.activation_update("covariance", layer, a[None], 200))
    t.update(factors.curvature.gradient_update("covariance", layer, None, s[None], 200, None))
    factors.curvature.finish_pass("covariance", layer, t)
    if strategy == "ekfac":
        t["lambda_sum"] = torch.rand(d_out, d_in, generator=g, dtype=torch.float64) + 0.1
        t["lambda_count"] = torch.tensor(1.0, dtype=torch.float64)
    factors.set_phase("complete")
    return factors, layer


@pytest.mark.parametrize("strategy", ["kfac", "ekfac"])
@pytest.mark.parametrize("block_size", [None, 4])
@pytest.mark.parametrize("tokens", [3, 40])
def test_token_and_gradient_paths_match_the_explicit_solve(strategy, block_size, tokens):
    d_out, d_in = 9, 7
    factors, layer = random_factors(strategy, d_out, d_in, block_size)
    s_block = d_out if block_size is None else block_size
    a_block = d_in if block_size is None else block_size
    assert rotation_in_token_space(tokens, d_out, d_in, s_block, a_block) == (tokens == 3)  # both paths are run
    g = torch.Generator().manual_seed(1)
    a = torch.randn(5, tokens, d_in, generator=g, dtype=torch.float64)
    s = torch.randn(5, tokens, d_out, generator=g, dtype=torch.float64)
    dw = (s.transpose(1, 2) @ a).reshape(5, -1)
    G = factors.dense_matrix("w")
    solved = torch.linalg.solve(G + 0.05 * torch.eye(d_out * d_in, dtype=torch.float64), dw.T).T
    torch.testing.assert_close(factors.precondition_tokens("w", a, s).reshape(5, -1), solved, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(factors.inverse_quadratic_tokens("w", a, s), (dw * solved).sum(1), rtol=1e-9, atol=0)


@pytest.mark.parametrize("queries,tokens,by_tokens", [(1, 3, True), (3, 1, True), (1, 12, False), (4, 6, False)])
def test_full_rank_scores_by_tokens_or_by_gradient(queries, tokens, by_tokens):
    d_out, d_in = 6, 5
    assert engine._full_rank_tokens_cheaper(2, tokens, d_out, d_in, queries) == by_tokens
    g = torch.Generator().manual_seed(2)
    p = torch.randn(queries, d_out, d_in, generator=g, dtype=torch.float64)
    a = torch.randn(2, tokens, d_in, generator=g, dtype=torch.float64)
    s = torch.randn(2, tokens, d_out, generator=g, dtype=torch.float64)
    qg = QueryGradients(["w"], queries)
    qg.full["w"] = p
    scorer = engine.InfluenceScorer.__new__(engine.InfluenceScorer)
    scorer.score_dtype = torch.float64
    expected = -torch.einsum("qoi,bto,bti->qb", p, s, a)
    torch.testing.assert_close(scorer.score_layer(qg, "w", a, s), expected, rtol=1e-12, atol=1e-12)
