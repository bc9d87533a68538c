"""The linear datamodeling score harness (lightning_influence.evaluation)."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_influence
from lightning_influence import RegressionTask
from lightning_influence.evaluation import (lds_subsets, linear_datamodeling_score, query_measurements,
                                            retrain_measurements)


def test_lds_on_exact_linear_datamodel():
    n, s, q = 30, 40, 4
    subsets = lds_subsets(n, s, seed=3)
    assert subsets.dtype == torch.bool and subsets.shape == (s, n)
    assert torch.equal(subsets, lds_subsets(n, s, seed=3))
    assert not torch.equal(subsets, lds_subsets(n, s, seed=4))
    assert (subsets.sum(1) == 15).all()
    assert len({tuple(r.tolist()) for r in subsets}) == s

    weights = torch.randn(q, n, generator=torch.Generator().manual_seed(0))
    measurements = subsets.float() @ weights.T + 2.0  # exact linear datamodel, [S, Q]
    mean, per_query = linear_datamodeling_score(weights, subsets, measurements)
    assert per_query.shape == (q,)
    assert mean == pytest.approx(1.0, abs=1e-6)
    assert torch.allclose(per_query, torch.ones(q, dtype=per_query.dtype))
    neg_mean, neg_per_query = linear_datamodeling_score(-weights, subsets, measurements)
    assert neg_mean == pytest.approx(-1.0, abs=1e-6)
    assert (neg_per_query < -0.99).all()
    # Unrelated scores are far from perfect.
    noise = torch.randn(q, n, generator=torch.Generator().manual_seed(1))
    assert abs(linear_datamodeling_score(noise, subsets, measurements)[0]) < 0.9


class LinReg(L.LightningModule):
    # Two outputs, not one: fit_factors cannot yet handle a layer with d_out == 1 (torchmetrics'
    # Metric.compute squeezes the 1x1 output covariance to a 0-d tensor and eigh fails).
    def __init__(self, lr: float = 0.1):
        super().__init__()
        self.net = nn.Linear(3, 2)
        self.lr = lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return 0.5 * ((self(x) - y) ** 2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def _regression_data(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    y = x @ torch.tensor([[1.0, 0.2], [-2.0, 0.7], [0.5, -1.0]]) + 0.3 + 0.5 * torch.randn(n, 2, generator=g)
    return TensorDataset(x, y)


def test_lds_end_to_end_linear_regression():
    n = 40
    train = _regression_data(n, seed=0)
    queries = _regression_data(5, seed=1)
    query_loader = DataLoader(queries, batch_size=5)
    task = RegressionTask()
    trainer_kwargs = dict(max_epochs=2, accelerator="cpu", devices=1, enable_model_summary=False)

    subsets = lds_subsets(n, 6, seed=0)
    measured = retrain_measurements(LinReg, train, query_loader, task, subsets, trainer_kwargs,
                                    batch_size=n, seed=0)
    assert measured.shape == (6, 5) and torch.isfinite(measured).all()

    # The same recipe on all the data, then EK-FAC scores in dataset order.
    L.seed_everything(0, verbose=False)
    model = LinReg()
    L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, **trainer_kwargs).fit(
        model, DataLoader(train, batch_size=n, shuffle=True))
    model.eval()
    # Per-query measurements add up to the task's batch measurement.
    per_query_f = query_measurements(model, query_loader, task)
    with torch.no_grad():
        batch_f = task.measurement(model, next(iter(query_loader)))
    assert per_query_f.shape == (5,) and per_query_f.sum().item() == pytest.approx(batch_f.item(), rel=1e-5)
    train_loader = DataLoader(train, batch_size=8)
    factors = lightning_influence.fit_factors(model, task, train_loader, strategy="ekfac", fisher="empirical")
    scores = lightning_influence.InfluenceModule(model, task=task, factors=factors,
                                                 show_progress=False).pairwise_scores(query_loader, train_loader)
    assert scores.shape == (5, n)

    lds, per_query = linear_datamodeling_score(scores, subsets, measured)
    print(f"LDS mean={lds:.4f} per_query={[round(v, 3) for v in per_query.tolist()]}")
    assert math.isfinite(lds)
    assert lds > 0
