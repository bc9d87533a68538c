"""Find mislabeled training examples with self-influence.

scikit-learn's bundled handwritten digits (8x8 images, 1797 examples, no download) with
about 5% of the training labels flipped on purpose. A small MLP is trained with the
InfluenceCallback attached; the self-influence of every training example,
``grad L^T (G + lambda I)^-1 grad L`` (how much the example's own gradient moves the model
in directions the rest of the data does not support), ranks the flipped ones first.

    python examples/digits_mislabeled.py            # full run, about 20 s on a CPU
    python examples/digits_mislabeled.py --quick    # fewer epochs

Prints the detection AUC (scikit-learn ``roc_auc_score``) and the precision among the
top-ranked examples, next to the same numbers for ranking by training loss.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence import ClassificationTask, InfluenceCallback, InfluenceModule


class DigitsMLP(L.LightningModule):
    """A two-layer MLP classifier for 8x8 digit images (64 inputs, 10 classes)."""

    def __init__(self, hidden: int = 64, lr: float = 3e-3, weight_decay: float = 1e-4):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True, on_epoch=True, on_step=False)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


class DigitsDataModule(L.LightningDataModule):
    """sklearn's digits with ``flip_fraction`` of the labels replaced by a different, random class.

    ``flipped`` (a bool array) says which training examples were corrupted.
    """

    def __init__(self, flip_fraction: float = 0.05, batch_size: int = 64, seed: int = 0):
        super().__init__()
        from sklearn.datasets import load_digits

        self.batch_size, self.seed = batch_size, seed
        x, y = load_digits(return_X_y=True)
        rng = np.random.default_rng(seed)
        n_flip = int(round(flip_fraction * len(y)))
        self.flipped = np.zeros(len(y), dtype=bool)
        self.flipped[rng.choice(len(y), n_flip, replace=False)] = True
        noisy = y.copy()
        # A different class, uniformly among the other nine.
        noisy[self.flipped] = (y[self.flipped] + rng.integers(1, 10, n_flip)) % 10
        self.clean_labels, self.labels = y, noisy
        self.dataset = TensorDataset(torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(noisy, dtype=torch.long))

    def train_dataloader(self, shuffle: bool = True) -> DataLoader:
        return DataLoader(self.dataset, batch_size=self.batch_size, shuffle=shuffle,
                          generator=torch.Generator().manual_seed(self.seed) if shuffle else None)


def precision_at(scores: np.ndarray, positives: np.ndarray, k: int) -> float:
    top = np.argsort(-scores, kind="stable")[:k]
    return float(positives[top].mean())


def run(output_dir: str = "digits_output", epochs: int = 60, strategy: str = "ekfac", flip_fraction: float = 0.05,
        seed: int = 0, progress_bar: bool = True) -> dict:
    from sklearn.metrics import roc_auc_score

    t0 = time.perf_counter()
    L.seed_everything(seed, verbose=False)
    dm = DigitsDataModule(flip_fraction=flip_fraction, seed=seed)
    model = DigitsMLP()
    callback = InfluenceCallback(task="classification", strategy=strategy, output_dir=str(Path(output_dir) / "factors"))
    trainer = L.Trainer(max_epochs=epochs, callbacks=[callback], logger=False, enable_checkpointing=False,
                        enable_model_summary=False, enable_progress_bar=progress_bar, devices=1)
    trainer.fit(model, datamodule=dm)

    loader = dm.train_dataloader(shuffle=False)
    module = InfluenceModule(model, task=ClassificationTask(), factors=callback.factors, show_progress=progress_bar)
    self_influence = module.self_scores(loader).double().numpy()
    with torch.no_grad():
        x, y = dm.dataset.tensors
        losses = F.cross_entropy(model(x), y, reduction="none").numpy()
    flipped = dm.flipped
    n_flip = int(flipped.sum())
    result = {
        "num_train": len(flipped), "num_flipped": n_flip, "strategy": strategy, "epochs": epochs,
        "auc": float(roc_auc_score(flipped, self_influence)),
        "precision_at_flipped": precision_at(self_influence, flipped, n_flip),
        "loss_auc": float(roc_auc_score(flipped, losses)),
        "loss_precision_at_flipped": precision_at(losses, flipped, n_flip),
        "train_accuracy_on_given_labels": float((model(x).argmax(1) == y).float().mean()),
        "seconds": time.perf_counter() - t0,
    }
    order = np.argsort(-self_influence, kind="stable")
    print(f"\n{n_flip} of {len(flipped)} training labels were flipped on purpose ({strategy} factors, {epochs} epochs).")
    print("Training examples with the highest self-influence:")
    print(f"  {'rank':>4}  {'index':>5}  {'self-influence':>14}  {'label':>5}  {'true':>4}  flipped?")
    for r, i in enumerate(order[:10], start=1):
        print(f"  {r:>4}  {i:>5}  {self_influence[i]:>14.4g}  {dm.labels[i]:>5}  {dm.clean_labels[i]:>4}  "
              f"{'YES' if flipped[i] else 'no'}")
    print(f"\nDetection of the flipped labels by self-influence: AUC = {result['auc']:.3f}, "
          f"precision@{n_flip} = {result['precision_at_flipped']:.3f}")
    print(f"(ranking by training loss instead:                 AUC = {result['loss_auc']:.3f}, "
          f"precision@{n_flip} = {result['loss_precision_at_flipped']:.3f})")
    print(f"Done in {result['seconds']:.0f} s.")
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description="Find deliberately mislabeled digits with self-influence.")
    parser.add_argument("--output-dir", default="digits_output", help="where the factors go (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default: 60, or 25 with --quick)")
    parser.add_argument("--strategy", default="ekfac", choices=["ekfac", "kfac", "diagonal", "identity"])
    parser.add_argument("--flip-fraction", type=float, default=0.05, help="share of labels to flip (default: 0.05)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="fewer epochs, for tests")
    parser.add_argument("--no-progress-bar", action="store_true")
    args = parser.parse_args(argv)
    epochs = args.epochs or (25 if args.quick else 60)
    return run(args.output_dir, epochs, args.strategy, args.flip_fraction, args.seed, not args.no_progress_bar)


if __name__ == "__main__":
    main()
    sys.exit(0)
