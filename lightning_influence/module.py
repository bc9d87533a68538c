"""``InfluenceModule``: score training data against queries, in-process or through Lightning.

Queries are computed and preconditioned once; then the training data streams past
them in batches. Given ``trainer=``, the training data goes through Lightning's
predict loop (devices, strategies, progress bar); without one it runs in this
process, and shards across ranks by itself when a process group exists.
"""

from __future__ import annotations

from typing import Any, Iterable

import lightning as L
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from .factors import FactorsError, InfluenceFactors
from .loaders import gather_by_index, rebuild_loader
from .scoring import InfluenceScorer, QueryGradients
from .tasks import Task

__all__ = ["InfluenceModule"]


def _clone_out_of_inference(batch: Any) -> Any:
    """Lightning's predict loop may create batches under inference mode; autograd needs normal tensors."""
    if isinstance(batch, torch.Tensor):
        return batch.clone() if batch.is_inference() else batch
    if isinstance(batch, dict):
        return type(batch)({k: _clone_out_of_inference(v) for k, v in batch.items()}) if type(batch) is dict else {
            k: _clone_out_of_inference(v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and not hasattr(batch, "_fields"):
        return type(batch)(_clone_out_of_inference(v) for v in batch)
    return batch


class InfluenceModule(L.LightningModule):
    """Influence scores of training examples on queries.

    Args:
        model: the trained network (or the LightningModule whose ``forward`` the task calls).
        task: the :class:`~lightning_influence.tasks.Task` used when fitting the factors.
        factors: complete :class:`InfluenceFactors` for ``model`` (e.g. ``InfluenceFactors.load(dir)``).
        query_rank: ``None`` keeps preconditioned query gradients at full rank; an int stores
            them at that rank (query batching, the paper uses 32).
        dtype: compute dtype for scoring (float32 default; bfloat16/float16 for speed).
        layers: score with these tracked layers only (e.g. the MLP layers).

    Example::

        module = InfluenceModule(model, task=ClassificationTask(), factors=InfluenceFactors.load("influence"))
        scores = module.pairwise_scores(query_loader, train_loader)      # [num_queries, num_train]
        self_scores = module.self_scores(train_loader)                   # [num_train]
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        factors: InfluenceFactors | None,
        query_rank: int | None = None,
        dtype: torch.dtype = torch.float32,
        layers: Iterable[str] | None = None,
    ):
        super().__init__()
        if factors is None:
            raise MisconfigurationException(
                "InfluenceModule needs fitted factors: run the statistics pass first (InfluenceCallback, or "
                "fit_factors()) and pass `factors=InfluenceFactors.load(output_dir)`"
            )
        if not isinstance(factors, InfluenceFactors):
            raise MisconfigurationException(f"factors must be InfluenceFactors, got {type(factors).__name__}")
        try:
            factors.require_complete()
        except FactorsError as err:
            raise MisconfigurationException(str(err)) from None
        self.model = model
        self.task = task
        self.factors = factors
        self.query_rank = query_rank
        self.score_dtype = dtype
        self.score_layers = list(layers) if layers is not None else None
        self.queries: QueryGradients | None = None
        self._mode = "pairwise"
        self._per_layer = False
        self._query_source: Any = None
        self._chunks: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._result: torch.Tensor | None = None
        # Fail now, not after an hour of data loading, if the factors do not fit the model.
        self.scorer()

    def scorer(self) -> InfluenceScorer:
        """The Lightning-free scoring engine on this module's current device."""
        device = self._device_of_model()
        cached = getattr(self, "_scorer_cache", None)
        if cached is not None and cached.device == device:
            return cached
        try:
            self._scorer_cache = InfluenceScorer(self.model, self.task, self.factors, device=device,
                                   dtype=self.score_dtype, layers=self.score_layers, query_rank=self.query_rank)
        except FactorsError as err:
            raise MisconfigurationException(str(err)) from None
        return self._scorer_cache

    def _device_of_model(self) -> torch.device:
        return next(self.model.parameters()).device

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    # ------------------------------------------------------------------ queries
    def prepare_queries(self, query_loader: Iterable | QueryGradients) -> QueryGradients:
        """Compute (once) the preconditioned gradients of the queries; ``QueryGradients`` pass through."""
        if isinstance(query_loader, QueryGradients):
            self.queries = query_loader
        else:
            loader = rebuild_loader(query_loader, shard=False)
            self.queries = self.scorer().query_gradients(loader)
        return self.queries

    # ------------------------------------------------------------------ public scoring
    def pairwise_scores(self, query_loader: Iterable | QueryGradients, train_loader: Iterable,
                        trainer: L.Trainer | None = None, per_layer: bool = False) -> torch.Tensor:
        """Scores ``[num_queries, num_train]`` (``[num_layers, Q, N]`` with ``per_layer``).

        Training examples come back in dataset order (the loader's order when it does not
        shuffle). Under data parallelism every rank gets the full matrix.
        """
        self._mode, self._per_layer = "pairwise", per_layer
        if trainer is None:
            queries = self.prepare_queries(query_loader)
            scorer = self.scorer()
            return self._in_process(train_loader, lambda b, i: scorer.score_batch(queries, b, i), per_layer)
        self._query_source = query_loader
        return self._through_trainer(trainer, train_loader)

    def self_scores(self, train_loader: Iterable, trainer: L.Trainer | None = None,
                    per_layer: bool = False) -> torch.Tensor:
        """Self-influence ``[num_train]`` (``[num_layers, N]`` with ``per_layer``), in dataset order."""
        self._mode, self._per_layer = "self", per_layer
        if trainer is None:
            scorer = self.scorer()
            return self._in_process(train_loader, lambda b, i: scorer.self_score_batch(b, i), per_layer)
        return self._through_trainer(trainer, train_loader)

    # ------------------------------------------------------------------ in-process
    def _in_process(self, train_loader, score_fn, per_layer) -> torch.Tensor:
        indices, chunks = [], []
        for i, (idx, batch) in enumerate(rebuild_loader(train_loader, indexed=True)):
            chunks.append(score_fn(batch, i).detach().cpu())
            indices.append(idx)
        if not chunks:
            raise MisconfigurationException("the training dataloader is empty: there is nothing to score")
        scores = gather_by_index(torch.cat(indices), torch.cat(chunks, dim=-1))
        return scores if per_layer else scores.sum(0)

    # ------------------------------------------------------------------ through Lightning
    def _through_trainer(self, trainer: L.Trainer, train_loader) -> torch.Tensor:
        self._chunks, self._result = [], None
        loader = rebuild_loader(train_loader, indexed=True, shard=False)  # Lightning shards predict data itself
        trainer.predict(self, dataloaders=loader, return_predictions=False)
        if self._result is None:
            raise MisconfigurationException("the predict loop produced no scores (empty training dataloader?)")
        return self._result if self._per_layer else self._result.sum(0)

    def on_predict_start(self) -> None:
        if self._mode == "pairwise":
            if isinstance(self._query_source, QueryGradients):
                self.queries = self._query_source.to(self._device_of_model())
            else:
                with torch.inference_mode(False), torch.enable_grad():
                    loader = rebuild_loader(self._query_source, shard=False)
                    self.queries = self.scorer().query_gradients(
                        _clone_out_of_inference(b) for b in loader)

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0):
        indices, data = batch
        with torch.inference_mode(False), torch.enable_grad():
            data = _clone_out_of_inference(data)
            scorer = self.scorer()
            if self._mode == "pairwise":
                scores = scorer.score_batch(self.queries, data, batch_idx)
            else:
                scores = scorer.self_score_batch(data, batch_idx)
        self._chunks.append((indices.cpu(), scores.detach().cpu()))
        return None

    def on_predict_epoch_end(self) -> None:
        # Every rank joins the gather, even one whose shard was empty.
        if self._chunks:
            indices = torch.cat([i for i, _ in self._chunks])
            values = torch.cat([v for _, v in self._chunks], dim=-1)
        else:
            layers = len(self.score_layers or self.factors.layers)
            shape = (layers, self.queries.num_queries, 0) if self._mode == "pairwise" else (layers, 0)
            indices, values = torch.zeros(0, dtype=torch.long), torch.zeros(shape, dtype=self.score_dtype)
        self._result = gather_by_index(indices, values)
        self._chunks = []
