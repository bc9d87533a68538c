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
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_influence.capture import find_tracked_layers, model_mode
from lightning_influence.memory import MemoryBudgetError, MemoryPlan, measure_batch, plan_memory, resolve_budget
from lightning_influence.errors import FactorsError, InfluenceError, OptionsError, TrackingError
from lightning_influence.factors import InfluenceFactors
from lightning_influence.loaders import rebuild_loader
from lightning_influence.options import DEFAULT_DAMPING_FACTOR, FitOptions, ScoreOptions
from lightning_influence.curvature import DEFAULT_STRATEGY, get_strategy
from lightning_influence.curvature.blocks import DEFAULT_BLOCK_SIZE, DEFAULT_BLOCK_THRESHOLD
from lightning_influence.passes import fit_identity, pass_title, remaining_phases, run_phase
from lightning_influence.progress import length_of, progress_bar
from lightning_influence.store import describe_differences
from lightning_influence.tasks import CausalLMTask, ClassificationTask, RegressionTask, Task, checked_loss

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


def _fed_pass(strategy: str) -> str | None:
    """The name of the strategy's pass that feeds a per-example consumer (EK-FAC's ``lambda``), if any."""
    curvature = get_strategy(strategy)
    feeds = getattr(curvature, "feeds_consumer", None)
    return next((p.name for p in curvature.passes if feeds is not None and feeds(p.name)), None)


def _has_no_forward(model: nn.Module) -> bool:
    """Whether ``model`` only has ``nn.Module``'s placeholder forward (a LightningModule wrapper without one)."""
    forward = type(model).forward
    return forward is nn.Module.forward or forward is L.LightningModule.forward


# Strategies that shard parameters (and gather them only inside their own forward): the passes' hooks
# would see flattened or partial weights. Matched by class name so that neither needs to be importable.
_SHARDED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy")


def _refuse_sharded(strategy: Any) -> None:
    """Raise ``MisconfigurationException`` for FSDP, DeepSpeed or model-parallel strategies, naming what to do."""
    names = {cls.__name__ for cls in type(strategy).__mro__}
    sharded = next((n for n in _SHARDED_STRATEGIES if n in names), None)
    if sharded is None:
        return
    raise MisconfigurationException(
        f"InfluenceCallback does not support {type(strategy).__name__} ({sharded.removesuffix('Strategy')} shards "
        "the parameters, so the statistics passes would see partial weights and their activations inside the "
        "wrapping). Train with strategy='ddp' (the passes run on every rank and reduce their sums), or train as "
        "you do without the callback and fit afterwards on one device: load the trained weights and call "
        "lightning_influence.fit_factors(model, task, train_loader)")


def pass_batches(loader: Any, max_batches: int | None, max_examples: int | None) -> int | None:
    """How many batches a statistics pass over ``loader`` runs: its length, cut by ``max_batches`` and by
    ``max_examples`` (in whole batches of the loader's ``batch_size``); ``None`` when unknown."""
    total = length_of(loader)
    if max_batches is not None:
        total = max_batches if total is None else min(total, max_batches)
    batch_size = getattr(loader, "batch_size", None)
    if max_examples is not None and isinstance(batch_size, int) and batch_size > 0:
        needed = -(-max_examples // batch_size)
        total = needed if total is None else min(total, needed)
    return total


def finish_bar(bar: Any) -> None:
    """End a pass's bar at the batches it ran (a pass cut short by ``max_examples`` on uneven batches, or
    a loader whose length was unknown, would otherwise stop short of its total)."""
    if hasattr(bar, "n") and hasattr(bar, "total") and bar.total != bar.n:
        bar.total = bar.n
        bar.refresh()


class InfluenceCallback(Callback):
    """Fit EK-FAC (or K-FAC, diagonal, identity) influence factors on a Lightning training run.

    The arguments are flat and typed (LightningCLI YAML stays readable); the callback builds
    from them one :class:`~lightning_influence.options.FitOptions` (:attr:`fit_options`) and one
    :class:`~lightning_influence.options.ScoreOptions` (:attr:`score_options`), which validate
    them. Bad values raise ``MisconfigurationException``.

    Args:
        task: a :class:`Task` or its name (``classification``, ``regression``, ``causal_lm``).
        strategy: ``ekfac`` (default), ``kfac``, ``diagonal``, ``identity``, or a name registered with
            ``lightning_influence.curvature.register_strategy``.
        modules: glob patterns of module names to track (``None``: every Linear/Conv1D/Conv2d).
        exclude: glob patterns of module names to leave out (e.g. a tied head selected by ``modules``).
        fisher: ``sampled`` (labels drawn from the model, the paper's default) or ``empirical``.
        damping: absolute damping, or ``None`` for ``damping_factor`` x the mean eigenvalue of each layer.
        damping_factor: the heuristic's factor (0.1, the paper's).
        output_dir: where the factors are saved (safetensors + JSON manifest).
        fit_on: ``"fit_end"`` (default), an epoch number ``>= 1`` (after that epoch; at most the
            trainer's ``max_epochs``, checked at ``setup``; with ``max_epochs=-1`` any epoch is
            accepted and fires if training reaches it), or ``"manual"`` (only when you call
            :meth:`fit_factors`).
        model_attr: the attribute of the LightningModule holding the network, when the task
            must call the network rather than the LightningModule's ``forward``.
        max_batches / max_examples: cap each statistics pass for huge datasets.
        dataloader: the data to fit on (default: the trainer's training dataloader).
        capture_dtype: dtype activations and output gradients are captured in (``float32`` or ``float64``).
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
        score_dtype: scoring compute dtype: ``float32``, ``float64``, ``bfloat16`` or ``float16``.
        block_size / block_threshold: K-FAC/EK-FAC sides wider than ``block_threshold`` (default 8192) are
            kept as diagonal blocks of ``block_size`` (default 1024; ``None``: dense), docs/method.md, section 6.
        eigh_dtype: ``float64`` (default) or ``float32``: the dtype K-FAC/EK-FAC eigendecompose each covariance
            side in (float32: a third of the CPU time at GPT-2's widths, less accurate; docs/method.md, section 2).
        index: a directory for a gradient index of the training data (``docs/index.md``): each
            example's compressed, preconditioned gradient, to score new queries later without a pass
            over the training data (``GradientIndex.load(index, factors)``). With ``strategy="ekfac"``,
            ``fisher="empirical"``, ``index_preconditioner="query"`` (the default) and no
            ``max_batches``/``max_examples`` cap, it is written inside the eigenvalue-correction pass
            (no extra pass). Otherwise (the sampled Fisher's backward differentiates sampled labels, not
            the training loss; other placements need the fitted eigenvalues) it is built in one more
            pass after the fit, as ``InfluenceModule.build_index`` does; the log says which. Under data
            parallelism each rank writes its shard. A killed build resumes after its last shard.
        index_projection_dim / index_keep / index_preconditioner / index_projection / index_seed /
            index_dtype / index_shard_size: the index's ``IndexOptions`` (``projection_dim``, ``keep``,
            ``preconditioner``, ``projection``, ``seed``, ``dtype``, ``shard_size``).
        memory_budget: the most memory the influence passes may plan to hold on the training device,
            in bytes or as text (``"8GiB"``); ``None``: what the device has free at ``setup``, less 10%.
            The plan (``lightning_influence.memory``) is made at ``setup`` and again with the first
            batch's shape before the first training step; one over the budget raises then, naming
            the layers and the options that would fit.

    Sharded strategies (FSDP, DeepSpeed) are refused at ``setup``: the passes read each tracked
    layer's whole weight and its unsharded activations. Train with DDP, or fit after training on
    one device with :func:`lightning_influence.fit_factors`.

    Before the first training step (``on_train_start``) the task runs once on one training batch
    (forward and loss only, no gradient, weights and RNG untouched) and the query file is read,
    so a model, batch or query file the influence passes cannot use fails then, not after training.
    """

    def __init__(
        self,
        task: Task | str = "classification",
        strategy: str = DEFAULT_STRATEGY,
        modules: str | list[str] | None = None,
        exclude: str | list[str] | None = None,
        fisher: str = "sampled",
        damping: float | None = None,
        damping_factor: float = DEFAULT_DAMPING_FACTOR,
        output_dir: str = "influence",
        fit_on: str | int = "fit_end",
        model_attr: str | None = None,
        max_batches: int | None = None,
        max_examples: int | None = None,
        dataloader: Any = None,
        capture_dtype: str = "float32",
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
        index: str | None = None,
        index_projection_dim: int | None = 48,
        index_keep: int | None = None,
        index_preconditioner: str = "query",
        index_projection: str = "orthogonal",
        index_seed: int = 0,
        index_dtype: str = "float32",
        index_shard_size: int = 4096,
        block_size: int | None = DEFAULT_BLOCK_SIZE,
        block_threshold: int | None = DEFAULT_BLOCK_THRESHOLD,
        memory_budget: int | str | None = None,
        eigh_dtype: str = "float64",
    ):
        super().__init__()
        try:
            self.fit_options = FitOptions(
                strategy=strategy, modules=modules, module_types=module_types, exclude=exclude, fisher=fisher,
                damping=damping, damping_factor=damping_factor, max_batches=max_batches, max_examples=max_examples, seed=seed,
                capture_dtype=capture_dtype, stats_dtype=stats_dtype, block_size=block_size,
                block_threshold=block_threshold, eigh_dtype=eigh_dtype, memory_budget=memory_budget)
            self.score_options = ScoreOptions(query_rank=query_rank, query_svd=query_svd, score_dtype=score_dtype,
                                              layers=score_layers, top_k=top_k, tfidf_candidates=tfidf_candidates)
            self.index_options = None
            if index is not None:
                from lightning_influence.index import IndexOptions  # noqa: PLC0415

                self.index_options = IndexOptions(
                    projection_dim=index_projection_dim, keep=index_keep, preconditioner=index_preconditioner,
                    projection=index_projection, seed=index_seed, dtype=index_dtype, shard_size=index_shard_size)
        except OptionsError as err:
            raise MisconfigurationException(str(err)) from None
        self.index = Path(index) if index is not None else None
        self.index_path: Path | None = None  # set once the index is complete
        if isinstance(fit_on, bool) or not (fit_on in ("fit_end", "manual") or isinstance(fit_on, int)):
            raise MisconfigurationException(f"fit_on must be 'fit_end', 'manual' or an epoch number, got {fit_on!r}")
        if isinstance(fit_on, int) and fit_on < 1:
            raise MisconfigurationException(
                f"fit_on={fit_on} never fires: epochs are counted from 1 (fit_on=1 fits after the first epoch); "
                "use fit_on='fit_end' to fit when training ends")
        self.task = resolve_task(task)
        self.output_dir = Path(output_dir)
        self.fit_on = fit_on
        self.model_attr = model_attr
        self.dataloader = dataloader
        self.queries = queries
        self.factors: InfluenceFactors | None = None
        self.scores: torch.Tensor | None = None
        self._done_fingerprint: str | None = None

    # The fitting options by name (read by the resume check and by LightningCLI users).
    strategy = property(lambda self: self.fit_options.strategy)
    fisher = property(lambda self: self.fit_options.fisher)
    damping = property(lambda self: self.fit_options.damping)
    damping_factor = property(lambda self: self.fit_options.damping_factor)
    block_size = property(lambda self: self.fit_options.block_size)
    block_threshold = property(lambda self: self.fit_options.block_threshold)
    eigh_dtype = property(lambda self: self.fit_options.eigh_dtype)

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Fail fast: a bad module selection, output dir, fit_on or memory plan should not surface after hours
        # of training.
        _refuse_sharded(trainer.strategy)
        model = self.network(pl_module)
        try:
            layers = find_tracked_layers(model, self.fit_options.modules, self.fit_options.module_types,
                                         self.fit_options.exclude)
        except TrackingError as err:
            raise MisconfigurationException(str(err)) from None
        if stage == "fit":
            self._check_fit_on(trainer)
        if self.index is not None and self.index.resolve() == self.output_dir.resolve():
            raise MisconfigurationException(
                f"InfluenceCallback(index='{self.index}') is the factors' output_dir: both write a manifest.json "
                "there. Give the index its own directory (e.g. index='influence/index')")
            if self.fit_on != "manual":
                # The statistics alone (batch shape not known yet); on_train_start adds the first batch's.
                # Every rank raises together (each checks its own device's budget), as in on_train_start.
                error = None
                try:
                    self._check_memory(trainer, model, layers, batch_size=0, tokens={}, log_table=False)
                except MisconfigurationException as err:
                    error = err
                if trainer.strategy.reduce_boolean_decision(error is not None, all=False) and error is None:
                    error = MisconfigurationException("InfluenceCallback's memory plan is over the budget on "
                                                      "another rank (see its error)")
                if error is not None:
                    raise error
        if trainer.is_global_zero:
            try:
                self.output_dir.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise MisconfigurationException(
                    f"InfluenceCallback cannot create output_dir '{self.output_dir}' ({err.strerror}); set output_dir="
                ) from None
            if not os.access(self.output_dir, os.W_OK):
                raise MisconfigurationException(f"InfluenceCallback output_dir '{self.output_dir}' is not writable; set output_dir=")

    def _check_fit_on(self, trainer: L.Trainer) -> None:
        if not isinstance(self.fit_on, int):
            return
        max_epochs = trainer.max_epochs
        # max_epochs=-1 (or None with max_steps set, which Lightning turns into -1) trains without an epoch
        # limit: any epoch can be reached. None otherwise becomes Lightning's default of 1000.
        if max_epochs is not None and max_epochs >= 0 and self.fit_on > max_epochs:
            raise MisconfigurationException(
                f"InfluenceCallback(fit_on={self.fit_on}) never fires: the trainer stops after max_epochs={max_epochs}. "
                f"Use fit_on<={max_epochs}, fit_on='fit_end', or raise max_epochs")

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._ran_this_fit = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The first hook where the trainer's own training dataloader exists, still before any training step.
        if self.fit_on == "manual":
            return
        error = None
        try:
            batch_size, tokens, activations = self.check_inputs(trainer, pl_module)
            model = self.network(pl_module)
            layers = find_tracked_layers(model, self.fit_options.modules, self.fit_options.module_types,
                                         self.fit_options.exclude)
            self._check_memory(trainer, model, layers, batch_size=batch_size, tokens=tokens,
                               activations=activations)
        except MisconfigurationException as err:
            error = err
        # Every rank raises together: a rank that stopped alone would leave the others in a collective.
        failed_somewhere = trainer.strategy.reduce_boolean_decision(error is not None, all=False)
        if error is not None:
            raise error
        if failed_somewhere:
            raise MisconfigurationException("InfluenceCallback's input check failed on another rank (see its error)")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if isinstance(self.fit_on, int) and not isinstance(self.fit_on, bool) and trainer.current_epoch + 1 == self.fit_on:
            self.run(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Runs before the strategy's teardown, while the model is still on its device.
        if self.fit_on == "fit_end":
            self.run(trainer, pl_module)
        elif isinstance(self.fit_on, int) and not getattr(self, "_ran_this_fit", False):
            # Possible only when something else stopped training early (max_steps, max_time, early stopping).
            rank_zero_warn(f"[lightning-influence] fit_on={self.fit_on} did not fire: training stopped after epoch "
                           f"{trainer.current_epoch}; no factors were fitted. Call callback.fit_factors(trainer, "
                           "model), or use fit_on='fit_end'")

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

    def check_inputs(self, trainer: L.Trainer, pl_module: L.LightningModule) -> tuple[int, dict[str, int], int]:
        """Run the task once on one training batch and read the query file, raising what would fail later.

        Forward and loss only (no backward) in eval mode, with the RNG forked: no step, the weights,
        the modes and the random state are as before. Returns the batch's size, each tracked layer's
        token positions per example and the bytes the forward saves for a backward (for the memory plan).
        """
        model = self.network(pl_module)
        if self.model_attr is None and _has_no_forward(model):
            children = [n for n, m in model.named_children() if isinstance(m, nn.Module)]
            hint = f" (e.g. model_attr={children[0]!r})" if children else ""
            raise MisconfigurationException(
                f"{type(model).__name__} defines no forward(), so the task cannot call it with a batch. Pass "
                f"InfluenceCallback(model_attr=...) naming the attribute that holds the network{hint}")
        loader = self._training_loader(trainer, pl_module, None)
        device = trainer.strategy.root_device
        fork_devices = [device] if device.type == "cuda" else []
        # Forked: drawing the batch (a shuffling sampler, workers' seeds) and the forward use the RNG.
        with torch.random.fork_rng(devices=fork_devices):
            batch = next(iter(rebuild_loader(loader)), None)
        if batch is None:
            if trainer.world_size > 1:
                return 0, {}, 0  # this rank's shard is empty (fewer examples than ranks); the others check theirs
            raise MisconfigurationException(
                "InfluenceCallback: the training dataloader is empty; the statistics passes need training data")
        batch = trainer.strategy.batch_to_device(batch, device)
        try:
            layers = find_tracked_layers(model, self.fit_options.modules, self.fit_options.module_types,
                                         self.fit_options.exclude)
            with torch.random.fork_rng(devices=fork_devices), model_mode(model, train=False):
                self.task.token_mask(batch)
                batch_size, tokens, loss, activations = measure_batch(model, self.task, layers, batch,
                                                                      trainer.precision_plugin.forward_context)
                checked_loss(loss, 0)
        except InfluenceError as err:
            raise MisconfigurationException(f"InfluenceCallback's check on the first training batch: {err}") from None
        except Exception as err:  # noqa: BLE001 (any failure of the user's model or batch, reported with the fix)
            fix = ("pass model_attr= naming the attribute holding the network" if self.model_attr is None
                   else "check model_attr=")
            raise MisconfigurationException(
                f"InfluenceCallback's task {type(self.task).__name__} cannot run {type(model).__name__} on the first "
                f"training batch ({type(err).__name__}: {err}). The passes call the network as the task does "
                f"(see the Task's train_loss); give a Task matching your batches (label_key=, input_keys=, or "
                f"input_key= for one positional input), or {fix}") from err
        if self.queries is not None:
            from lightning_influence.integration.pipeline import find_tokenizer, load_query_set  # noqa: PLC0415

            try:
                load_query_set(self.queries, find_tokenizer(trainer.datamodule, pl_module, self))
            except (ValueError, OSError) as err:
                raise MisconfigurationException(f"InfluenceCallback(queries={self.queries!r}): {err}") from None
        return batch_size, tokens, activations

    def memory_plan(self, trainer: L.Trainer, model: nn.Module, layers: dict, batch_size: int = 0,
                    tokens: dict[str, int] | None = None, activations: int = 0) -> MemoryPlan:
        """The memory plan of this callback's passes and scoring on the trainer's device (nothing allocated).

        ``batch_size``/``tokens`` (token positions per example by layer): the batch shape for the
        working set; 0 / ``None`` leaves it out. ``activations``: the bytes the model's forward saves
        for one batch's backward (:func:`~lightning_influence.memory.measure_batch`). The callback
        saves each phase to ``output_dir``, so in one process a later pass runs without the earlier
        factors in memory (``offload``).
        """
        opts = self.fit_options
        strategy = get_strategy(opts.strategy, block_size=opts.block_size, block_threshold=opts.block_threshold,
                                eigh_dtype=opts.eigh_dtype)
        return plan_memory(layers, strategy, batch_size=batch_size,
                           tokens_per_example=tokens or {}, stats_dtype=opts.stats_dtype,
                           capture_dtype=opts.capture_dtype, score_dtype=self.score_options.score_dtype,
                           query_rank=self.score_options.query_rank, device=trainer.strategy.root_device,
                           model_parameters=sum(p.numel() for p in model.parameters()), activations=activations,
                           offload=getattr(trainer, "world_size", 1) == 1)

    def _check_memory(self, trainer: L.Trainer, model: nn.Module, layers: dict, batch_size: int,
                      tokens: dict[str, int], log_table: bool = True, activations: int = 0) -> MemoryPlan:
        plan = self.memory_plan(trainer, model, layers, batch_size, tokens, activations)
        if log_table:
            rank_zero_info(f"[lightning-influence] {plan.table()}")
        try:
            plan.check(resolve_budget(self.fit_options.memory_budget, trainer.strategy.root_device),
                       where=" (InfluenceCallback, before the first training step)")
        except MemoryBudgetError as err:
            raise MisconfigurationException(str(err)) from None
        return plan

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule,
            device: torch.device | None = None) -> InfluenceFactors:
        """Fit the factors, then (if queries were given) score and report them."""
        self._ran_this_fit = True
        factors = self.fit_factors(trainer, pl_module, device=device)
        if self.queries is not None:
            from lightning_influence.integration.pipeline import score_and_report  # noqa: PLC0415 (reporting is only needed with queries)

            self.scores = score_and_report(self, trainer, pl_module, self._training_loader(trainer, pl_module, None))
        return factors

    def fit_factors(self, trainer: L.Trainer, pl_module: L.LightningModule,
                    dataloader: Any = None, device: torch.device | None = None) -> InfluenceFactors:
        """Run the statistics passes now and return (and save) the factors.

        Resumes from ``output_dir`` when it holds factors fitted from the same weights, data
        and options (see ``passes.fit_identity``); otherwise refits, saying what differed.
        Under data parallelism rank zero decides (it reads ``output_dir``) and the other ranks
        receive its decision and the resumed tensors.
        """
        opts = self.fit_options
        model = self.network(pl_module)
        loader = self._training_loader(trainer, pl_module, dataloader)
        self.index_path = None
        try:
            layers = find_tracked_layers(model, opts.modules, opts.module_types, opts.exclude)
        except TrackingError as err:
            raise MisconfigurationException(str(err)) from None
        identity = fit_identity(model, loader, layers, opts.strategy, opts.fisher, opts.max_batches,
                                opts.max_examples, opts.seed, opts.stats_dtype, opts.capture_dtype, opts.block_size,
                                opts.block_threshold, opts.eigh_dtype)
        fingerprint = identity["weights"]
        factors = self._resume(layers, identity) if trainer.is_global_zero else None
        factors = self._share_resumed(trainer, factors, layers)
        if factors is None:
            factors = InfluenceFactors(opts.strategy, layers, fisher=opts.fisher, damping=opts.damping,
                                       damping_factor=opts.damping_factor, metadata={"identity": identity},
                                       block_size=opts.block_size, block_threshold=opts.block_threshold,
                                       eigh_dtype=opts.eigh_dtype)
        pass_loader = rebuild_loader(loader)
        device = device if device is not None else trainer.strategy.root_device
        total = pass_batches(pass_loader, opts.max_batches, opts.max_examples)
        for phase in remaining_phases(factors):
            feed = self._index_feed(trainer, model, factors, phase, loader, device)
            started = time.perf_counter()
            last_batch = [started, 0]  # when the last batch ended, and how many batches ran

            def advance(n, bar=None):
                bar.update(1)
                last_batch[:] = [time.perf_counter(), last_batch[1] + 1]

            with progress_bar(total, pass_title(factors, phase), trainer.progress_bar_callback is not None) as bar:
                run_phase(
                    phase, factors, model, self.task, pass_loader if feed is None else feed.batches(), device=device,
                    dtype=opts.capture_dtype, consumer=feed,
                    stats_dtype=opts.stats_dtype,
                    max_batches=opts.max_batches, max_examples=opts.max_examples, seed=opts.seed,
                    transfer=lambda b: trainer.strategy.batch_to_device(b, device),
                    progress=lambda n, bar=bar: advance(n, bar),
                    forward_context=trainer.precision_plugin.forward_context,
                )
                finish_bar(bar)
            if feed is not None:
                self._finish_index(trainer, feed.close())
            ended = time.perf_counter()
            # The time after the last batch is the pass's reduction and finish (K-FAC's eigendecompositions).
            rank_zero_info(f"[lightning-influence] {phase} pass: {last_batch[1]} batches in "
                           f"{last_batch[0] - started:.1f} s, then {ended - last_batch[0]:.1f} s reducing and "
                           f"finishing (eigendecompositions)")
            if trainer.is_global_zero:
                factors.save(self.output_dir)
            trainer.strategy.barrier("influence_phase_saved")
            rank_zero_info(f"[lightning-influence] {phase} pass done; factors ({factors.phase}) saved to {self.output_dir}")
        if not factors.curvature.passes and trainer.is_global_zero:
            factors.save(self.output_dir)  # complete without a pass (identity): saved once all the same
        if self.index is not None and self.index_path is None:
            self._build_index_after_fit(trainer, model, factors, loader, device)
        self.factors = factors
        self._done_fingerprint = fingerprint
        return factors

    # ------------------------------------------------------------------ the gradient index
    def builds_index_in_pass(self) -> bool:
        """Whether ``index=`` is written inside the eigenvalue-correction pass (else one more pass after the fit)."""
        opts = self.fit_options
        return (self.index is not None and _fed_pass(opts.strategy) is not None and opts.fisher == "empirical"
                and self.index_options.preconditioner == "query" and opts.max_batches is None
                and opts.max_examples is None)

    def _index_feed(self, trainer: L.Trainer, model: nn.Module, factors: InfluenceFactors, phase: str,
                    loader: Any, device: torch.device):
        """The consumer that writes the index in the ``lambda`` pass, or ``None``."""
        if not self.builds_index_in_pass() or phase != _fed_pass(self.fit_options.strategy):
            return None
        from lightning_influence.index import IndexWriter, PassFeed  # noqa: PLC0415

        self.index_path = None
        try:
            writer = IndexWriter(self.index, factors, model, self.index_options, rank=trainer.global_rank,
                                 world_size=trainer.world_size, device=device, dtype=self.fit_options.capture_dtype)
        except InfluenceError as err:
            raise MisconfigurationException(f"InfluenceCallback(index='{self.index}'): {err}") from None
        rank_zero_info(f"[lightning-influence] writing the gradient index to {self.index} inside the "
                       "eigenvalue-correction pass")
        return PassFeed(writer, rebuild_loader(loader, indexed=True))

    def _build_index_after_fit(self, trainer: L.Trainer, model: nn.Module, factors: InfluenceFactors, loader: Any,
                               device: torch.device) -> None:
        from lightning_influence.index import build_index  # noqa: PLC0415

        why = ("the factors were complete already" if self.builds_index_in_pass() else
               "it can be written inside the eigenvalue-correction pass only with strategy='ekfac' (a "
               "strategy whose pass feeds a consumer), fisher='empirical', index_preconditioner='query' and no "
               "max_batches/max_examples")
        rank_zero_info(f"[lightning-influence] building the gradient index in {self.index} in one more pass over the "
                       f"training data ({why})")
        indexed = rebuild_loader(loader, indexed=True)
        with progress_bar(length_of(indexed), "Influence: gradient index",
                          trainer.progress_bar_callback is not None) as bar:
            try:
                path = build_index(model, self.task, factors, indexed, self.index, self.index_options,
                                   rank=trainer.global_rank, world_size=trainer.world_size, indexed=True,
                                   device=device, dtype=self.fit_options.capture_dtype,
                                   progress=lambda n: bar.update(1))
            except InfluenceError as err:
                raise MisconfigurationException(f"InfluenceCallback(index='{self.index}'): {err}") from None
        self._finish_index(trainer, path)

    def _finish_index(self, trainer: L.Trainer, path: Path) -> None:
        trainer.strategy.barrier("influence_index_written")  # every rank's share is complete
        self.index_path = path
        rank_zero_info(f"[lightning-influence] gradient index written to {path}")

    # ------------------------------------------------------------------ helpers
    def _share_resumed(self, trainer: L.Trainer, factors: InfluenceFactors | None,
                       layers) -> InfluenceFactors | None:
        """Rank zero's resume decision (and its factors' tensors) on every rank, as ``ModelCheckpoint`` does.

        Which phases run decides which collectives every rank enters, so no rank may decide from its
        own (possibly unshared) filesystem.
        """
        if trainer.world_size == 1:
            return factors
        state = None
        if factors is not None:
            state = {"strategy": factors.strategy, "fisher": factors.fisher, "damping": factors.damping,
                     "damping_factor": factors.damping_factor, "phase": factors.phase,
                     "metadata": factors.metadata,
                     "tensors": {n: {k: v.cpu() for k, v in t.items()} for n, t in factors.tensors.items()}}
        state = trainer.strategy.broadcast(state, src=0)
        if state is None or trainer.is_global_zero:
            return factors
        return InfluenceFactors(state["strategy"], layers, fisher=state["fisher"], damping=state["damping"],
                                damping_factor=state["damping_factor"], tensors=state["tensors"],
                                phase=state["phase"], metadata=state["metadata"],
                                # resumed only when fitted with these options (the identity matched)
                                block_size=self.fit_options.block_size,
                                block_threshold=self.fit_options.block_threshold,
                                eigh_dtype=self.fit_options.eigh_dtype)

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
