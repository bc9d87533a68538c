"""Small LightningModules and data for the integration tests."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class LitClassifier(L.LightningModule):
    """Wraps the network in an attribute (``net``), as most LightningModules do."""

    def __init__(self, d_in: int = 6, hidden: int = 8, classes: int = 3, lr: float = 0.05):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, classes))
        self.lr = lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def classification_data(n: int = 48, d_in: int = 6, classes: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g)
    w = torch.randn(d_in, classes, generator=g)
    y = (x @ w + 0.3 * torch.randn(n, classes, generator=g)).argmax(1)
    return TensorDataset(x, y)


def loader(dataset, batch_size: int = 8, shuffle: bool = False):
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle)


class ClassificationData(L.LightningDataModule):
    def __init__(self, n: int = 48, batch_size: int = 8):
        super().__init__()
        self.n, self.batch_size = n, batch_size

    def setup(self, stage=None):
        self.train = classification_data(self.n)

    def train_dataloader(self):
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True)


def trainer(**kwargs) -> L.Trainer:
    defaults = dict(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False)
    defaults.update(kwargs)
    return L.Trainer(**defaults)


def query_loader():
    """Five classification queries, for ``InfluenceCallback(queries="tests.lit_models:query_loader")``."""
    return DataLoader(classification_data(5, seed=7), batch_size=2)
