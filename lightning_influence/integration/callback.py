"""``InfluenceCallback``: fit influence factors on the training data of a Lightning run.

The statistics passes are the callback's own loops over the training data: no
optimizer step, no Trainer loop, so the user's loggers, checkpoints and other
callbacks see nothing of them. The weights are only read and the model's train/eval
mode is restored after. Factors are saved after each phase; a run that dies in the
eigenvalue-correction pass resumes without recomputing the covariances.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_influence.errors import FactorsError, OptionsError, TrackingError
from lightning_influence.factors import InfluenceFactors, check_damping, check_fisher, check_strategy
from lightning_influence.loaders import rebuild_loader
from lightning_influence.progress import length_of, progress_bar
from lightning_influence.scoring.queries import QUERY_SVD_METHODS
from lightning_influence.curvature import DEFAULT_STRATEGY
from lightning_influence.curvature.base import DEFAULT_DAMPING_FACTOR
from lightning_influence.curvature.blocks import DEFAULT_BLOCK_SIZE, DEFAULT_BLOCK_THRESHOLD, check_block_options
from lightning_influence.passes import fit_identity, pass_title, remaining_phases, run_phase
from lightning_influence.store import describe_differences
from lightning_influence.tasks import CausalLMTask, ClassificationTask, RegressionTask, Task
from lightning_influence.capture import find_tracked_layers

log = logging.getLogger(__name__)

__all__ = ["InfluenceCallback", "resolve_task"]

TASKS_BY_NAME = {"classification": ClassificationTask, "regression": RegressionTask, "causal_lm": CausalLMTask}


def resolve_task(task: Task | str) -> Task:
    """A task instance from an instance or a name (``classification``, ``regression``, ``causal_lm``)."""
    if isinstance(task, Task):
        return task
    if isinstance(task, str) and task in TASKS_BY_NAME:
        return TASKS_BY_NAME[task]()
    raise MisconfigurationException(
        f"unknown task {task!r}: pass a Task instance or one of {', '.join(TASKS_BY_NAME)}"
    )


class InfluenceCallback(Callback):
    """Fit EK-FAC (or K-FAC, diagonal, identity) influence factors on a Lightning training run.

    Args:
        task: a :class:`Task` or its name (``classification``, ``regression``, ``causal_lm``).
        strategy: ``ekfac`` (default), ``kfac``, ``diagonal``, ``identity``, or a name registered with
            ``lightning_influence.curvature.register_strategy``.
        modules: glob patterns of module names to track (``None``: every Linear/Conv1D/Conv2d).
        fisher: ``sampled`` (labels drawn from the model, the paper's default) or ``empirical``.
        damping: absolute damping, or ``None`` for 0.1 x the mean eigenvalue of each layer.
        output_dir: where the factors are saved (safetensors + JSON manifest).
        fit_on: ``"fit_end"`` (default), an epoch number (after that epoch), or ``"manual"``
            (only when you call :meth:`fit_factors`).
        model_attr: the attribute of the LightningModule holding the network, when the task
            must call the network rather than the LightningModule's ``forward``.
        max_batches / max_examples: cap each statistics pass for huge datasets.
        dataloader: the data to fit on (default: the trainer's training dataloader).
        dtype: accumulation dtype of the captured tensors (``float32`` or ``float64``).
        stats_dtype: dtype the statistics are summed and saved in: ``float64`` (default) or
            ``float32`` (half the memory and file size; eigendecompositions stay float64).
        seed: seed of the label sampling (same seed, same factors).
        queries: optional JSONL file of ``{"prompt", "completion"}`` pairs (causal LMs; needs a
            ``tokenizer`` attribute on the datamodule or LightningModule) or ``"module:function"``
            returning a query DataLoader; with queries, the run ends with scores saved under
            ``output_dir`` (and reported to W&B when the trainer has a WandbLogger).
        query_rank: rank of stored query gradients (query batching); ``None`` for full rank.
        query_svd: how rank-r query gradients are factorised: ``"randomized"`` (``torch.svd_lowrank``,
            the default) or ``"exact"`` (full SVD); the approximation error is logged either way.
        top_k: how many most positive/negative training examples to report per query.
        module_types: module classes to track (with or instead of ``modules`` patterns).
        tfidf_candidates: score each query only against its k most TF-IDF-similar training
            texts (the paper keeps 10,000); needs training texts (a dataset ``texts`` list or a tokenizer).
        score_layers: report influence through these tracked layers only (e.g. the MLP layers).
        score_dtype: scoring compute dtype: ``float32``, ``bfloat16`` or ``float16``.
        block_size / block_threshold: K-FAC/EK-FAC sides wider than ``block_threshold`` (default 8192) are
            kept as diagonal blocks of ``block_size`` (default 2048; ``None``: dense), docs/method.md, section 6.
    """

    def __init__(
        self,
        task: Task | str = "classification",
        strategy: str = DEFAULT_STRATEGY,
        modules: str | list[str] | None = None,
        fisher: str = "sampled",
        damping: float | None = None,
        damping_factor: float = DEFAULT_DAMPING_FACTOR,
        output_dir: str = "influence",
        fit_on: str | int = "fit_end",
        model_attr: str | None = None,
        max_batches: int | None = None,
        max_examples: int | None = None,
        dataloader: Any = None,
        dtype: str = "float32",
        seed: int = 0,
        queries: str | None = None,
        query_rank: int | None = None,
        top_k: int = 10,
        module_types: list[type] | None = None,
        tfidf_candidates: int | None = None,
        score_layers: list[str] | None = None,
        score_dtype: str = "float32",
        query_svd: str = "randomized",
        stats_dtype: str = "float64",
        block_size: int | None = DEFAULT_BLOCK_SIZE,
        block_threshold: int | None = DEFAULT_BLOCK_THRESHOLD,
    ):
        super().__init__()
        try:
            check_strategy(strategy)
            check_fisher(fisher)
            check_damping(damping, damping_factor)
            check_block_options(block_size, block_threshold)
        except (FactorsError, OptionsError) as err:
            raise MisconfigurationException(str(err)) from None
        if not (fit_on in ("fit_end", "manual") or (isinstance(fit_on, int) and fit_on >= 0)):
            raise MisconfigurationException(f"fit_on must be 'fit_end', 'manual' or an epoch number, got {fit_on!r}")
        if dtype not in ("float32", "float64"):
            raise MisconfigurationException(f"dtype must be 'float32' or 'float64' (statistics never accumulate in less), got {dtype!r}")
        if stats_dtype not in ("float32", "float64"):
            raise MisconfigurationException(f"stats_dtype must be 'float64' or 'float32', got {stats_dtype!r}")
        if query_svd not in QUERY_SVD_METHODS:
            raise MisconfigurationException(f"query_svd must be one of {QUERY_SVD_METHODS}, got {query_svd!r}")
        if score_dtype not in ("float32", "float64", "bfloat16", "float16"):
            raise MisconfigurationException(f"score_dtype must be float32, float64, bfloat16 or float16, got {score_dtype!r}")
        for name, value in (("max_batches", max_batches), ("max_examples", max_examples), ("query_rank", query_rank),
                            ("tfidf_candidates", tfidf_candidates), ("top_k", top_k)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise MisconfigurationException(f"{name} must be a positive integer or None, got {value!r}")
        self.task = resolve_task(task)
        self.strategy = strategy
        self.modules = modules
        self.module_types = module_types
        self.fisher = fisher
        self.damping = damping
        self.damping_factor = damping_factor
        self.output_dir = Path(output_dir)
        self.fit_on = fit_on
        self.model_attr = model_attr
        self.max_batches = max_batches
        self.max_examples = max_examples
        self.dataloader = dataloader
        self.dtype = getattr(torch, dtype)
        self.stats_dtype = getattr(torch, stats_dtype)
        self.block_size, self.block_threshold = block_size, block_threshold
        self.seed = seed
        self.queries = queries
        self.query_rank = query_rank
        self.query_svd = query_svd
        self.top_k = top_k
        self.tfidf_candidates = tfidf_candidates
        self.score_layers = score_layers
        self.score_dtype = getattr(torch, score_dtype)
        self.factors: InfluenceFactors | None = None
        self.scores: torch.Tensor | None = None
        self._done_fingerprint: str | None = None

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Fail fast: a bad module selection or output dir should not surface after hours of training.
        model = self.network(pl_module)
        try:
            find_tracked_layers(model, self.modules, self.module_types)
        except TrackingError as err:
            raise MisconfigurationException(str(err)) from None
        if trainer.is_global_zero:
            try:
                self.output_dir.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise MisconfigurationException(
                    f"InfluenceCallback cannot create output_dir '{self.output_dir}' ({err.strerror}); set output_dir="
                ) from None
            if not os.access(self.output_dir, os.W_OK):
                raise MisconfigurationException(f"InfluenceCallback output_dir '{self.output_dir}' is not writable; set output_dir=")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if isinstance(self.fit_on, int) and not isinstance(self.fit_on, bool) and trainer.current_epoch + 1 == self.fit_on:
            self.run(trainer, pl_module)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._ran_this_fit = False

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Runs before the strategy's teardown, while the model is still on its device.
        if self.fit_on == "fit_end":
            self.run(trainer, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Training was skipped (max_epochs reached already, e.g. resuming a finished run): run now,
        # on whatever device the strategy's teardown left the model.
        if self.fit_on == "fit_end" and not getattr(self, "_ran_this_fit", False):
            self.run(trainer, pl_module, device=next(self.network(pl_module).parameters()).device)

    def state_dict(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "output_dir": str(self.output_dir),
            "phase": self.factors.phase if self.factors is not None else "none",
            "weights_fingerprint": self._done_fingerprint,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._done_fingerprint = state_dict.get("weights_fingerprint")

    # ------------------------------------------------------------------ public API
    def network(self, pl_module: nn.Module) -> nn.Module:
        """The module the task calls: the LightningModule, or its ``model_attr`` attribute."""
        if self.model_attr is None:
            return pl_module
        model = getattr(pl_module, self.model_attr, None)
        if not isinstance(model, nn.Module):
            raise MisconfigurationException(
                f"model_attr={self.model_attr!r}: {type(pl_module).__name__} has no nn.Module attribute of that name"
            )
        return model

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule,
            device: torch.device | None = None) -> InfluenceFactors:
        """Fit the factors, then (if queries were given) score and report them."""
        self._ran_this_fit = True
        factors = self.fit_factors(trainer, pl_module, device=device)
        if self.queries is not None:
            from lightning_influence.integration.pipeline import score_and_report  # noqa: PLC0415 (reporting is only needed with queries)

            self.scores = score_and_report(self, trainer, pl_module)
        return factors

    def fit_factors(self, trainer: L.Trainer, pl_module: L.LightningModule,
                    dataloader: Any = None, device: torch.device | None = None) -> InfluenceFactors:
        """Run the statistics passes now and return (and save) the factors.

        Resumes from ``output_dir`` when it holds factors fitted from the same weights, data
        and options (see ``passes.fit_identity``); otherwise refits, saying what differed.
        """
        model = self.network(pl_module)
        loader = self._training_loader(trainer, pl_module, dataloader)
        try:
            layers = find_tracked_layers(model, self.modules, self.module_types)
        except TrackingError as err:
            raise MisconfigurationException(str(err)) from None
        identity = fit_identity(model, loader, layers, self.strategy, self.fisher, self.max_batches,
                                self.max_examples, self.seed, self.stats_dtype, self.dtype, self.block_size,
                                self.block_threshold)
        fingerprint = identity["weights"]
        factors = self._resume(layers, identity)
        if factors is None:
            factors = InfluenceFactors(self.strategy, layers, fisher=self.fisher, damping=self.damping,
                                       damping_factor=self.damping_factor, metadata={"identity": identity},
                                       block_size=self.block_size, block_threshold=self.block_threshold)
        pass_loader = rebuild_loader(loader)
        device = device if device is not None else trainer.strategy.root_device
        total = length_of(pass_loader)
        if total is not None and self.max_batches is not None:
            total = min(total, self.max_batches)
        for phase in remaining_phases(factors):
            with progress_bar(total, pass_title(factors, phase), trainer.progress_bar_callback is not None) as bar:
                run_phase(
                    phase, factors, model, self.task, pass_loader, device=device, dtype=self.dtype,
                    stats_dtype=self.stats_dtype,
                    max_batches=self.max_batches, max_examples=self.max_examples, seed=self.seed,
                    transfer=lambda b: trainer.strategy.batch_to_device(b, device),
                    progress=lambda n: bar.update(1),
                    forward_context=trainer.precision_plugin.forward_context,
                )
            if trainer.is_global_zero:
                factors.save(self.output_dir)
            trainer.strategy.barrier("influence_phase_saved")
            rank_zero_info(f"[lightning-influence] {phase} pass done; factors ({factors.phase}) saved to {self.output_dir}")
        if not factors.curvature.passes and trainer.is_global_zero:
            factors.save(self.output_dir)  # complete without a pass (identity): saved once all the same
        self.factors = factors
        self._done_fingerprint = fingerprint
        return factors

    # ------------------------------------------------------------------ helpers
    def _training_loader(self, trainer: L.Trainer, pl_module: L.LightningModule, dataloader: Any) -> Any:
        loader = dataloader if dataloader is not None else self.dataloader
        if loader is None:
            loader = trainer.train_dataloader
        if loader is None and trainer.datamodule is not None:
            loader = trainer.datamodule.train_dataloader()
        if loader is None:
            try:
                loader = pl_module.train_dataloader()
            except Exception:
                loader = None
        if isinstance(loader, (list, tuple)) and len(loader) == 1:
            loader = loader[0]
        if isinstance(loader, dict) and len(loader) == 1:
            loader = next(iter(loader.values()))
        if loader is None:
            raise MisconfigurationException(
                "InfluenceCallback found no training dataloader: give the Trainer one (fit(model, train_dataloaders=...) "
                "or a datamodule) or pass InfluenceCallback(dataloader=...) / fit_factors(..., dataloader=...)"
            )
        if isinstance(loader, (list, tuple, dict)):
            raise MisconfigurationException(
                "InfluenceCallback needs ONE training dataloader; the trainer has several. "
                "Pass the one to fit on with InfluenceCallback(dataloader=...)"
            )
        return loader

    def _resume(self, layers, identity: dict) -> InfluenceFactors | None:
        """The factors saved in ``output_dir`` if they were fitted from ``identity``; else ``None``
        (refit), with a warning naming what differed."""
        if not (self.output_dir / "manifest.json").is_file():
            return None
        try:
            saved = InfluenceFactors.load(self.output_dir, identity=identity)
            saved.check_model(layers)
        except FactorsError as err:
            if err.differences:
                rank_zero_warn(f"[lightning-influence] refitting the factors: the ones in {self.output_dir} were "
                               f"fitted from other weights, data or options ({describe_differences(err.differences)})")
            else:
                rank_zero_warn(f"[lightning-influence] not resuming from {self.output_dir}: {err}")
            return None
        saved = saved.with_damping(self.damping, self.damping_factor)
        if saved.phase != "none":
            rank_zero_info(f"[lightning-influence] resuming {self.strategy} factors from {self.output_dir} "
                           f"(completed phase: {saved.phase})")
        return saved
