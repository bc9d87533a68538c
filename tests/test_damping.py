"""Damping: the paper's heuristic (0.1 x mean eigenvalue, per layer) and an absolute damping.

The heuristic is checked against closed forms that need no eigendecomposition:

* K-FAC: mean(L_S[i] L_A[j]) = tr(S) tr(A) / (d_out d_in);
* EK-FAC and diagonal: the basis is orthonormal (or the identity), so the mean eigenvalue is
  E_m ||DW_m||_F^2 / (d_out d_in), with DW_m the per-sequence gradient.
"""

import pytest
import torch
import torch.nn.functional as F

from lightning_influence import ClassificationTask, InfluenceScorer, fit_factors
from lightning_influence.errors import FactorsError
from lightning_influence.capture import find_tracked_layers

from . import dense, models

CURVED = ["diagonal", "kfac", "ekfac"]



def ce_loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="sum")


def ce_measure(model, batch):
    return -ce_loss(model, batch)


def setup(seed=0):
    model = models.mlp(seed=seed)
    train, queries = models.mlp_data(14, seed=1), models.mlp_data(3, seed=2)
    modules = {n: model.get_submodule(n) for n in find_tracked_layers(model)}
    return model, train, queries, modules


def fit(model, train, strategy, **kw):
    return fit_factors(model, ClassificationTask(), models.split_batch(train, 5), strategy=strategy,
                       fisher="empirical", capture_dtype=torch.float64, **kw)


@pytest.mark.parametrize("factor", [0.1, 0.3])
@pytest.mark.parametrize("strategy", CURVED)
def test_heuristic_is_factor_times_mean_eigenvalue(strategy, factor):
    model, train, _, modules = setup()
    factors = fit(model, train, strategy, damping_factor=factor)
    grads = dense.per_example_grads(model, modules, ce_loss, train)
    covs = dense.covariances(model, modules, ce_loss, train)
    dampings = []
    for name, layer in factors.layers.items():
        d_out, d_in = layer.shape
        if strategy == "kfac":
            A, S = covs[name]
            mean_eig = float(torch.trace(A) * torch.trace(S)) / (d_out * d_in)
        else:
            mean_eig = float((grads[name] ** 2).sum(1).mean()) / (d_out * d_in)
        assert factors.damping_for(name) == pytest.approx(factor * mean_eig, rel=1e-10)
        # and the same as the dense reference's own heuristic (0.1 x mean of its eigenvalues)
        _, ref = dense.dense_curvature(strategy, *(covs[name] if strategy != "diagonal" else (None, None)),
                                       grads[name])
        assert factors.damping_for(name) == pytest.approx(factor / 0.1 * float(ref), rel=1e-10)
        dampings.append(factors.damping_for(name))
    assert dampings[0] != pytest.approx(dampings[1], rel=1e-3)  # per layer, not one global value


def test_identity_has_no_damping():
    model, train, _, _ = setup()
    factors = fit(model, train, "identity")
    assert all(factors.damping_for(n) == 0.0 for n in factors.layers)


def explicit_scores(strategy, model, modules, train, queries, damping):
    """``[Q, N]`` with every curvature explicit and ``G + damping I`` solved directly."""
    g_train = dense.per_example_grads(model, modules, ce_loss, train)
    g_query = dense.per_example_grads(model, modules, ce_measure, queries)
    covs = dense.covariances(model, modules, ce_loss, train)
    total = 0
    for n in modules:
        A, S = covs[n]
        G, _ = dense.dense_curvature(strategy, A, S, g_train[n])
        eye = torch.eye(G.shape[0], dtype=G.dtype)
        total = total - g_query[n] @ torch.linalg.solve(G + damping * eye, g_train[n].T)
    return total


@pytest.mark.parametrize("strategy", CURVED)
def test_absolute_damping_is_used_as_given(strategy):
    model, train, queries, modules = setup()
    damping = 0.037
    factors = fit(model, train, strategy, damping=damping)
    assert all(factors.damping_for(n) == damping for n in factors.layers)
    scorer = InfluenceScorer(model, ClassificationTask(), factors, score_dtype=torch.float64)
    ours = scorer.pairwise_scores([queries], models.split_batch(train, 5))
    expected = explicit_scores(strategy, model, modules, train, queries, damping)
    torch.testing.assert_close(ours, expected, rtol=1e-7, atol=1e-9 * float(expected.abs().max()))

    # Self-influence with the same damping: grad L^T (G + damping I)^-1 grad L.
    own = scorer.self_scores(models.split_batch(train, 5))
    g = dense.per_example_grads(model, modules, ce_loss, train)
    covs = dense.covariances(model, modules, ce_loss, train)
    ref = 0
    for n in modules:
        G, _ = dense.dense_curvature(strategy, *covs[n], g[n])
        solved = torch.linalg.solve(G + damping * torch.eye(G.shape[0], dtype=G.dtype), g[n].T)
        ref = ref + (g[n] * solved.T).sum(1)
    torch.testing.assert_close(own, ref, rtol=1e-7, atol=0)

    # with_damping gives the same scores as fitting with that damping, and another damping other scores.
    view = fit(model, train, strategy).with_damping(damping)
    again = InfluenceScorer(model, ClassificationTask(), view, score_dtype=torch.float64).pairwise_scores(
        [queries], models.split_batch(train, 5))
    torch.testing.assert_close(again, ours, rtol=1e-10, atol=0)
    heuristic = InfluenceScorer(model, ClassificationTask(), fit(model, train, strategy),
                                score_dtype=torch.float64).pairwise_scores([queries], models.split_batch(train, 5))
    assert not torch.allclose(heuristic, ours, rtol=1e-3)


def test_zero_damping_on_zero_curvature_is_refused():
    model = models.mlp(bias=False)
    x, y = models.mlp_data(6)
    factors = fit_factors(model, ClassificationTask(), [(torch.zeros_like(x), y)], strategy="kfac", damping=0.0)
    scorer = InfluenceScorer(model, ClassificationTask(), factors, score_dtype=torch.float64)
    with pytest.raises(FactorsError, match="zero curvature and zero damping"):
        scorer.pairwise_scores([(x, y)], [(x, y)])
