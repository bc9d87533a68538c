"""Kronfluence's side of the benchmarks: its Task interface around the shared losses, and runners.

Facts about Kronfluence 1.0.1 that these runners rely on (read from its source):

* ``prepare_model`` replaces every tracked ``nn.Linear``/``nn.Conv2d`` by a wrapper in place
  and freezes all parameters, so it gets its own copy of the model.
* ``Task.get_influence_tracked_modules`` restricts tracking to the listed module names.
* ``Task.get_attention_mask`` masks padding out of the activation covariance and of both
  token counts (the gradient of a padded position is zero anyway).
* ``FactorArguments(use_empirical_fisher=True)`` uses the dataset's labels
  (``compute_train_loss(sample=False)``) in the covariance and Lambda passes.
* ``ScoreArguments(damping_factor=None)`` uses ``0.1 * mean(Lambda)`` per module (EK-FAC,
  K-FAC with Lambda = outer(eigvals_S, eigvals_A), unclipped); identity has no damping.
* A pairwise score is ``sum_modules <(G + lambda I)^-1 grad f(query), grad L(train)>``: the
  gradient of the measurement against the gradient of the *training loss*. One pass over
  the training data is made per query batch (``query_gradient_accumulation_steps=1``), so
  the runners give all queries in one batch.
* ``compute_pairwise_scores`` returns nothing when it computes; the scores are read back
  with ``load_pairwise_scores`` (``{"all_modules": [Q, N]}``, or one entry per module).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
from torch import nn

from kronfluence.analyzer import Analyzer, prepare_model
from kronfluence.arguments import FactorArguments, ScoreArguments
from kronfluence.task import Task

from .common import classification_measurement, classification_train_loss, lm_measurement, lm_train_loss


class KronClassificationTask(Task):
    def __init__(self, modules: list[str]):
        self.modules = list(modules)

    def compute_train_loss(self, batch, model, sample=False):
        return classification_train_loss(model, batch, sample=sample)

    def compute_measurement(self, batch, model):
        return classification_measurement(model, batch)

    def get_influence_tracked_modules(self):
        return self.modules


class KronLMTask(Task):
    def __init__(self, modules: list[str]):
        self.modules = list(modules)

    def compute_train_loss(self, batch, model, sample=False):
        return lm_train_loss(model, batch, sample=sample)

    def compute_measurement(self, batch, model):
        return lm_measurement(model, batch)

    def get_influence_tracked_modules(self):
        return self.modules

    def get_attention_mask(self, batch):
        return batch["attention_mask"]


def make_analyzer(model: nn.Module, task: Task, output_dir: str | Path, name: str = "bench",
                  copy_model: bool = True, cpu: bool = True) -> Analyzer:
    logging.getLogger("kronfluence").setLevel(logging.WARNING)
    model = prepare_model(copy.deepcopy(model) if copy_model else model, task)
    return Analyzer(analysis_name=name, model=model, task=task, cpu=cpu, disable_tqdm=True,
                    output_dir=str(output_dir), log_level=logging.WARNING)


def factor_args(strategy: str, dtype: torch.dtype, empirical: bool = True) -> FactorArguments:
    return FactorArguments(
        strategy=strategy,
        use_empirical_fisher=empirical,
        covariance_max_examples=None,
        lambda_max_examples=None,
        activation_covariance_dtype=dtype,
        gradient_covariance_dtype=dtype,
        eigendecomposition_dtype=torch.float64,
        per_sample_gradient_dtype=dtype,
        lambda_dtype=dtype,
    )


def score_args(dtype: torch.dtype, rank: int | None = None, per_module: bool = False,
               full_svd: bool = False) -> ScoreArguments:
    return ScoreArguments(
        damping_factor=None,  # heuristic: 0.1 x mean eigenvalue, per module
        compute_per_module_scores=per_module,
        query_gradient_low_rank=rank,
        use_full_svd=full_svd,
        query_gradient_svd_dtype=torch.float64 if dtype == torch.float64 else torch.float32,
        per_sample_gradient_dtype=dtype,
        precondition_dtype=dtype,
        score_dtype=dtype,
    )


def fit(analyzer: Analyzer, factors_name: str, train_ds, strategy: str, batch_size: int,
        dtype: torch.dtype = torch.float32) -> None:
    analyzer.fit_all_factors(factors_name=factors_name, dataset=train_ds, per_device_batch_size=batch_size,
                             factor_args=factor_args(strategy, dtype), overwrite_output_dir=True)


def pairwise(analyzer: Analyzer, factors_name: str, scores_name: str, query_ds, train_ds, train_batch_size: int,
             dtype: torch.dtype = torch.float32, rank: int | None = None, per_module: bool = False,
             full_svd: bool = False) -> dict[str, torch.Tensor]:
    analyzer.compute_pairwise_scores(
        scores_name=scores_name, factors_name=factors_name, query_dataset=query_ds, train_dataset=train_ds,
        per_device_query_batch_size=len(query_ds), per_device_train_batch_size=train_batch_size,
        score_args=score_args(dtype, rank, per_module, full_svd), overwrite_output_dir=True)
    return analyzer.load_pairwise_scores(scores_name)
