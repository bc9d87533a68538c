"""Layers with a single output (1x1 covariances) against the dense reference."""

import pytest
import torch
from torch import nn

from lightning_influence import InfluenceScorer, RegressionTask, fit_factors
from lightning_influence.capture import find_tracked_layers

from . import dense


def loss(model, batch):
    x, y = batch
    return 0.5 * ((model(x) - y) ** 2).sum()


@pytest.mark.parametrize("strategy", ["identity", "diagonal", "kfac", "ekfac"])
def test_one_output_regression(strategy):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    g = torch.Generator().manual_seed(1)
    train = (torch.randn(12, 3, generator=g, dtype=torch.float64), torch.randn(12, 1, generator=g, dtype=torch.float64))
    queries = (torch.randn(3, 3, generator=g, dtype=torch.float64), torch.randn(3, 1, generator=g, dtype=torch.float64))
    task = RegressionTask()
    factors = fit_factors(model, task, [train], strategy=strategy, fisher="empirical", capture_dtype=torch.float64)
    ours = InfluenceScorer(model, task, factors, score_dtype=torch.float64).pairwise_scores([queries], [train])
    modules = {n: model.get_submodule(n) for n in find_tracked_layers(model)}
    expected = dense.dense_scores(strategy, model, modules, loss, lambda m, b: -loss(m, b), train, queries)
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-8 * float(expected.abs().max()))
