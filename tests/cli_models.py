"""Model and data factories the command-line tests name as ``package.module:function``."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from . import models


class WrappedMLP(nn.Module):
    """A wrapper holding the network under ``net`` (what ``--model_attr net`` picks)."""

    def __init__(self):
        super().__init__()
        self.net = models.mlp(seed=3)
        self.unused_head = nn.Linear(3, 3).double()  # not the network: must not be tracked


def train_loader() -> DataLoader:
    x, y = models.mlp_data(14, seed=1)
    return DataLoader(TensorDataset(x, y), batch_size=4)


def query_loader() -> DataLoader:
    x, y = models.mlp_data(3, seed=2)
    return DataLoader(TensorDataset(x, y), batch_size=2)


def save_checkpoint(path) -> WrappedMLP:
    """Trained-looking weights (seeded, not the constructor's) saved as a Lightning-style state dict."""
    torch.manual_seed(11)
    model = WrappedMLP()
    for p in model.parameters():
        p.data.normal_()
    torch.save({"state_dict": model.state_dict()}, path)
    return model
