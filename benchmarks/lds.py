"""Attribution quality: the linear datamodeling score (LDS) of both libraries' scores on the digits MLP.

The harness is the library's own (``lightning_influence.evaluation``): random 50% subsets of the
training set (``lds_subsets``), a fresh model retrained on each with Lightning and the same recipe as
the full-data model (``retrain_measurements``), and the Spearman correlation over subsets between the
summed scores of a subset's examples and the measured value, averaged over queries
(``linear_datamodeling_score``, torchmetrics' Spearman).

Scores come from ONE model trained on all the data (seed 0), fitted and scored by both libraries with
the settings of ``benchmarks.agreement`` (empirical Fisher, 0.1 x mean eigenvalue damping per layer,
every ``nn.Linear``, float64). The measurement is the query's log-likelihood of its label on both
sides; Kronfluence's scores are negated (with the same measurement, ours = -Kronfluence's: see
docs/benchmarks.md, "Agreement"), so that a positive score predicts a larger measurement for both.

Recipe (the same for the full-data model and for every retraining): float64, full batch (one
step per epoch, no shuffling), Adam with a cosine schedule, an explicit L2 term in the loss, a
fixed initialisation seed. Training is then a deterministic function of the subset (checked: the
recipe run on an all-True subset through ``retrain_measurements`` gives the full-data model's
measurements). Each subset is retrained with ``len(SEEDS)`` initialisation seeds and the
measurements are averaged (see ``docs/benchmarks.md`` for why).

    .bench-venv/bin/python -m benchmarks.lds [--quick]      # writes benchmarks/results/lds.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from lightning_influence import ClassificationTask, InfluenceScorer, fit_factors
from lightning_influence.evaluation import (lds_subsets, linear_datamodeling_score, query_measurements,
                                            retrain_measurements)

from . import kron_side
from .common import (accuracy, digits_datasets, digits_mlp, linear_module_names, loadavg_now, loader, machine_info,
                     pearson, save_json, set_threads)

RECIPE = {"epochs": 200, "lr": 1e-2, "weight_decay": 1e-3}
SEEDS = (0, 1)  # initialisation seeds per subset; the full-data (scored) model uses SEEDS[0]
FRACTION = 0.5
STRATEGIES = ("identity", "kfac", "ekfac")
BATCH = 64  # batch size of the statistics and scoring passes (not of training)
TRAINER_KWARGS = dict(max_epochs=RECIPE["epochs"], accelerator="cpu", devices=1, enable_model_summary=False,
                      logger=False, enable_checkpointing=False, enable_progress_bar=False)


class DigitsClassifier(L.LightningModule):
    """The benchmarks' digits MLP (64-128-64-10, tanh) in float64, trained full batch.

    Loss: mean cross-entropy + ``weight_decay / 2 * ||theta||^2`` (an explicit L2 term, so the trained
    model sits at a stationary point of a well-defined objective); Adam, cosine schedule to 0.
    """

    def __init__(self, seed: int = 0, epochs: int = RECIPE["epochs"], lr: float = RECIPE["lr"],
                 weight_decay: float = RECIPE["weight_decay"]):
        super().__init__()
        self.net = digits_mlp(seed).double()
        self.epochs, self.lr, self.weight_decay = epochs, lr, weight_decay

    def forward(self, x):
        return self.net(x)

    def objective(self, batch) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y) + 0.5 * self.weight_decay * sum((p ** 2).sum() for p in self.parameters())

    def training_step(self, batch, batch_idx):
        return self.objective(batch)

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=self.lr)
        return [opt], [torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.epochs)]


def train_full(train_ds, seed: int) -> DigitsClassifier:
    """The recipe on all the data: what ``retrain_measurements`` does for one subset, keeping the model."""
    L.seed_everything(seed, verbose=False)
    module = DigitsClassifier(seed)
    L.Trainer(**TRAINER_KWARGS).fit(module, train_dataloaders=DataLoader(train_ds, batch_size=len(train_ds)))
    return module.eval()


def retrain(train_ds, query_ds, subsets: torch.Tensor, seed: int) -> torch.Tensor:
    """``[S, Q]`` query log-likelihoods after retraining on each subset with initialisation ``seed``."""
    return retrain_measurements(lambda: DigitsClassifier(seed), train_ds, loader(query_ds, len(query_ds)),
                                ClassificationTask(), subsets, TRAINER_KWARGS, batch_size=len(train_ds), seed=seed,
                                shuffle=False)


def summary(per_query: torch.Tensor) -> dict:
    """Mean, standard deviation and a normal 95% interval of the mean over queries (NaNs left out)."""
    v = per_query[~per_query.isnan()].double()
    mean, std = float(v.mean()), float(v.std()) if v.numel() > 1 else float("nan")
    half = 1.96 * std / math.sqrt(v.numel())
    return {"mean": mean, "std": std, "ci95": [mean - half, mean + half], "queries": int(v.numel()),
            "per_query": [float(x) for x in per_query]}


def ours_scores(net, train_ds, query_ds, mods, strategy: str, fisher: str = "empirical", damping_factor: float = 0.1,
                damping: float | None = None, damping_used: dict | None = None) -> torch.Tensor:
    """Our pairwise scores ``[Q, N]``; with ``damping_used``, also stores the per-layer damping there."""
    task = ClassificationTask()
    factors = fit_factors(net, task, loader(train_ds, BATCH), strategy=strategy, modules=mods, fisher=fisher,
                          damping=damping, damping_factor=damping_factor, capture_dtype=torch.float64)
    if damping_used is not None and strategy != "identity":
        damping_used.update({name: factors.damping_for(name) for name in mods})
    return InfluenceScorer(net, task, factors, score_dtype=torch.float64).pairwise_scores(
        loader(query_ds, len(query_ds)), loader(train_ds, BATCH)).double()


def run(quick: bool = False, log=print) -> dict:
    set_threads()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # one Trainer per retraining: no banners
    t_start = time.perf_counter()
    num_subsets, num_query = (20, 50) if quick else (50, 100)
    train_ds, query_ds = digits_datasets(num_query=num_query)  # float64 inputs
    n = len(train_ds)
    out = {"quick": quick, "loadavg_start": loadavg_now(), "timings": {}, "rows": [], "heuristic_damping": {},
           "settings": {
               "model": "MLP 64-128-64-10, tanh, biases, float64 (benchmarks.common.digits_mlp)",
               "data": "scikit-learn digits, 8x8, pixels / 16",
               "train_examples": n, "queries": num_query, "subsets": num_subsets, "fraction": FRACTION,
               "subset_seed": 0, "init_seeds": list(SEEDS),
               "recipe": dict(RECIPE, optimizer="Adam, cosine schedule to 0", batch="full batch, no shuffling",
                              loss="mean cross-entropy + weight_decay/2 * ||theta||^2", dtype="float64"),
               "measurement": "log p(label | query image), the same on both sides",
               "scoring": {"fisher": "empirical", "damping": "0.1 x mean eigenvalue per layer",
                           "modules": "every nn.Linear", "dtype": "float64", "batch": BATCH,
                           "kronfluence_sign": "negated (ours = -kronfluence with the same measurement)"},
           }}
    timings = out["timings"]

    # 1. The full-data model (scored by both libraries) and the retrained measurements.
    t0 = time.perf_counter()
    module = train_full(train_ds, SEEDS[0])
    timings["train_full_seconds"] = time.perf_counter() - t0
    x = torch.stack([it[0] for it in train_ds.items])
    y = torch.stack([it[1] for it in train_ds.items])
    grads = torch.autograd.grad(module.objective((x, y)), list(module.parameters()))
    objective = float(module.objective((x, y)).detach())
    grad_norm = float(torch.sqrt(sum((g ** 2).sum() for g in grads)))
    net = module.net
    out["full_model"] = {"objective": objective, "objective_grad_norm": grad_norm,
                         "train_accuracy": accuracy(net, train_ds), "query_accuracy": accuracy(net, query_ds)}
    log(f"full-data model: objective {objective:.4f} (grad norm {grad_norm:.1e}), train accuracy "
        f"{out['full_model']['train_accuracy']:.4f}, query accuracy {out['full_model']['query_accuracy']:.2f}")

    subsets = lds_subsets(n, num_subsets, fraction=FRACTION, seed=0)
    per_seed = []
    for seed in SEEDS:
        t0 = time.perf_counter()
        per_seed.append(retrain(train_ds, query_ds, subsets, seed))
        timings[f"retrain_seed{seed}_seconds"] = time.perf_counter() - t0
        log(f"retrained {num_subsets} subsets with init seed {seed}: {timings[f'retrain_seed{seed}_seconds']:.1f} s")
    measured = torch.stack(per_seed).mean(0)  # [S, Q]
    timings["retrain_seconds_per_model"] = (sum(timings[f"retrain_seed{s}_seconds"] for s in SEEDS)
                                            / (num_subsets * len(SEEDS)))

    # Determinism of the recipe: retraining on every example reproduces the scored model exactly.
    again = retrain(train_ds, query_ds, torch.ones(1, n, dtype=torch.bool), SEEDS[0])[0]
    reference = query_measurements(module, loader(query_ds, num_query), ClassificationTask())
    out["determinism_max_abs_diff"] = float((again - reference).abs().max())
    log(f"recipe on all-True subset vs the scored model: max |diff| of measurements {out['determinism_max_abs_diff']:.1e}")

    # 2. Scores: ours and Kronfluence's, on the same model.
    mods = linear_module_names(net)
    # Keys: (library, strategy, fisher, damping) with damping "0.1x" (factor x mean eigenvalue) or an absolute value.
    scores: dict[tuple[str, str, str, str], torch.Tensor] = {}
    default = "0.1x"
    workdir = Path(tempfile.mkdtemp(prefix="bench-lds-"))
    try:
        analyzer = kron_side.make_analyzer(net, kron_side.KronClassificationTask(mods), workdir / "kron")
        for strategy in STRATEGIES:
            t0 = time.perf_counter()
            scores[("ours", strategy, "empirical", default)] = ours_scores(
                net, train_ds, query_ds, mods, strategy, damping_used=out["heuristic_damping"].setdefault(strategy, {}))
            t1 = time.perf_counter()
            kron_side.fit(analyzer, strategy, train_ds, strategy, BATCH, torch.float64)
            theirs = kron_side.pairwise(analyzer, strategy, f"{strategy}-scores", query_ds, train_ds, BATCH,
                                        torch.float64)["all_modules"]
            scores[("kronfluence", strategy, "empirical", default)] = -theirs.double()  # sign: ours = -kronfluence
            timings[f"ours_{strategy}_seconds"] = t1 - t0
            timings[f"kron_{strategy}_seconds"] = time.perf_counter() - t1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    # Ours only: the library's default Fisher (sampled labels); the damping factor around its default; and an
    # absolute damping equal to the weight decay (the L2 term's own curvature: the objective's Hessian is
    # mean-Fisher + weight_decay * I on the library's per-example scale).
    t0 = time.perf_counter()
    for strategy in ("kfac", "ekfac"):
        scores[("ours", strategy, "sampled", default)] = ours_scores(net, train_ds, query_ds, mods, strategy, "sampled")
    for factor in (0.01, 1.0):
        scores[("ours", "ekfac", "empirical", f"{factor:g}x")] = ours_scores(net, train_ds, query_ds, mods, "ekfac",
                                                                             damping_factor=factor)
    wd = RECIPE["weight_decay"]
    scores[("ours", "ekfac", "empirical", f"{wd:g}")] = ours_scores(net, train_ds, query_ds, mods, "ekfac", damping=wd)
    timings["ours_variants_seconds"] = time.perf_counter() - t0

    # 3. LDS of every score set against the same measurements, and the baselines.
    per_query = {key: linear_datamodeling_score(sc, subsets, measured)[1] for key, sc in scores.items()}
    for (library, strategy, fisher, damping), sc in scores.items():
        row = {"library": library, "strategy": strategy, "fisher": fisher, "damping": damping,
               "lds": summary(per_query[(library, strategy, fisher, damping)]),
               "lds_single_seed": {str(s): linear_datamodeling_score(sc, subsets, m)[0] for s, m in zip(SEEDS, per_seed)}}
        if library == "ours" and (fisher, damping) == ("empirical", default):
            kron = scores[("kronfluence", strategy, fisher, damping)]
            row["pearson_vs_kronfluence"] = pearson(sc, kron)
            row["lds_diff_vs_kronfluence_max_abs"] = float(
                (per_query[("ours", strategy, fisher, damping)] - per_query[("kronfluence", strategy, fisher, damping)])
                .abs().max())
            # Paired over queries: what averaging the seeds' measurements changed against seed 0 alone.
            row["seed_average_gain"] = summary(
                per_query[("ours", strategy, fisher, damping)]
                - linear_datamodeling_score(sc, subsets, per_seed[0])[1])
        out["rows"].append(row)
        log(f"  {library:11s} {strategy:8s} {fisher:9s} damping {damping:5s} LDS {row['lds']['mean']:.4f} "
            f"(std {row['lds']['std']:.3f}, 95% CI {row['lds']['ci95'][0]:.3f}..{row['lds']['ci95'][1]:.3f})"
            + (f" pearson vs kronfluence {row['pearson_vs_kronfluence']:.6f}" if "pearson_vs_kronfluence" in row else ""))
    out["ekfac_minus_kfac"] = summary(per_query[("ours", "ekfac", "empirical", default)]
                                      - per_query[("ours", "kfac", "empirical", default)])
    random_scores = torch.randn(num_query, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out["baselines"] = {"random_scores": summary(linear_datamodeling_score(random_scores, subsets, measured)[1])}
    if len(SEEDS) > 1:
        # How much of the measured variation the subset decides: the Spearman over subsets between two
        # initialisation seeds' measurements, per query (the rest is initialisation noise).
        out["baselines"]["seed_vs_seed_spearman"] = summary(_seed_consistency(per_seed[0], per_seed[1]))
    log(f"  random scores: LDS {out['baselines']['random_scores']['mean']:.4f}")
    out["loadavg_end"] = loadavg_now()
    out["machine"] = machine_info()
    out["seconds"] = time.perf_counter() - t_start
    return out


def _seed_consistency(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    from torchmetrics.functional import spearman_corrcoef

    return torch.tensor([float(spearman_corrcoef(a[:, j], b[:, j])) for j in range(a.shape[1])], dtype=torch.float64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="20 subsets and 50 queries instead of 50 and 100")
    args = parser.parse_args()
    result = run(args.quick)
    path = save_json("lds.json", result)
    print(json.dumps({"saved": str(path), "seconds": result["seconds"]}))


if __name__ == "__main__":
    main()
