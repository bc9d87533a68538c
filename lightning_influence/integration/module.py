"""``InfluenceModule``: score training data against queries, in-process or through Lightning.

Queries are computed and preconditioned once; then the training data streams past
them in batches. Given ``trainer=``, the training data goes through Lightning's
predict loop (devices, strategies, progress bar); without one it runs in this
process, and shards across ranks by itself when a process group exists.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_influence.errors import FactorsError
from lightning_influence.factors import InfluenceFactors
from lightning_influence.loaders import dist_info, gather_by_index, rebuild_loader
from lightning_influence.progress import length_of, progress_bar
from lightning_influence.scoring.query_store import load_query_gradients, save_query_gradients
from lightning_influence.scoring.engine import InfluenceScorer
from lightning_influence.scoring.queries import QueryGradients
from lightning_influence.tasks import Task
from lightning_influence.scoring.tfidf import TfidfCandidates, filtered_scores
from lightning_influence.scoring.topk import ScoreShardWriter, StreamingTopK, scores_identity

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


def _merge_top_k(values: torch.Tensor, indices: torch.Tensor, k: int, largest: bool):
    """Merge per-rank top-k lists ``[Q, k']`` into the global top-k (ties: lower index first)."""
    import torch.distributed as dist

    world = dist.get_world_size()
    q = values.shape[0]
    pad = k - values.shape[1]
    fill = float("-inf") if largest else float("inf")
    v = torch.nn.functional.pad(values.double(), (0, pad), value=fill)
    i = torch.nn.functional.pad(indices, (0, pad), value=-1)
    all_v, all_i = [torch.empty_like(v) for _ in range(world)], [torch.empty_like(i) for _ in range(world)]
    dist.all_gather(all_v, v)
    dist.all_gather(all_i, i)
    v, i = torch.cat(all_v, 1), torch.cat(all_i, 1)
    order = torch.argsort(i.masked_fill(i < 0, torch.iinfo(torch.long).max), dim=1, stable=True)
    v, i = v.gather(1, order), i.gather(1, order)
    order = torch.argsort(v, dim=1, descending=largest, stable=True)[:, :k]
    v, i = v.gather(1, order), i.gather(1, order)
    keep = (i >= 0).all(0)
    return v[:, keep].to(values.dtype), i[:, keep].reshape(q, -1)


class InfluenceModule(L.LightningModule):
    """Influence scores of training examples on queries.

    Args:
        model: the trained network (or the LightningModule whose ``forward`` the task calls).
        task: the :class:`~lightning_influence.tasks.Task` used when fitting the factors.
        factors: complete :class:`InfluenceFactors` for ``model`` (e.g. ``InfluenceFactors.load(dir)``).
        query_rank: ``None`` keeps preconditioned query gradients at full rank; an int stores
            them at that rank (query batching, the paper uses 32).
        query_svd: ``"randomized"`` (default, ``torch.svd_lowrank``) or ``"exact"`` SVD for ``query_rank``.
        dtype: compute dtype for scoring (float32 default; bfloat16/float16 for speed).
        layers: score with these tracked layers only (e.g. the MLP layers).
        show_progress: progress bars (with time left) on long in-process passes, rank zero only.

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
        show_progress: bool = True,
        query_svd: str = "randomized",
    ):
        super().__init__()
        self.show_progress = show_progress
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
        self.query_svd = query_svd
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
                                                 dtype=self.score_dtype, layers=self.score_layers,
                                                 query_rank=self.query_rank, query_svd=self.query_svd)
        except FactorsError as err:
            raise MisconfigurationException(str(err)) from None
        return self._scorer_cache

    def _device_of_model(self) -> torch.device:
        return next(self.model.parameters()).device

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    # ------------------------------------------------------------------ queries
    def prepare_queries(self, query_loader: Iterable | QueryGradients) -> QueryGradients:
        """Compute (once) the preconditioned gradients of the queries; ``QueryGradients`` pass through.

        With ``query_rank`` the per-layer relative Frobenius error of the low-rank
        approximation is logged (and kept in ``queries.errors``).
        """
        if isinstance(query_loader, QueryGradients):
            self.queries = query_loader
        else:
            loader = rebuild_loader(query_loader, shard=False)
            self.queries = self.scorer().query_gradients(loader)
            if self.queries.low_rank:
                worst = {n: float(e.max()) for n, e in self.queries.errors.items()}
                rank_zero_info("[lightning-influence] rank-%d query gradients, worst relative Frobenius error per "
                               "layer: %s" % (self.queries.rank, ", ".join(f"{n}={e:.3g}" for n, e in worst.items())))
        return self.queries

    def save_queries(self, directory: str | Path, queries_meta: list[dict] | None = None) -> Path:
        """Store the prepared query gradients (safetensors + JSON manifest) to score later."""
        if self.queries is None:
            raise MisconfigurationException("no prepared queries: call prepare_queries(query_loader) first")
        return save_query_gradients(self.queries, directory, self.factors, queries_meta)

    def load_queries(self, directory: str | Path) -> QueryGradients:
        """Load stored query gradients; they must come from these factors and layers."""
        qg, _ = load_query_gradients(directory, factors=self.factors, layers=self.scorer().layer_names)
        self.queries = qg.to(self._device_of_model())
        return self.queries

    def token_scores(self, batch: Any, queries: Iterable | QueryGradients | None = None,
                     per_layer: bool = False) -> torch.Tensor:
        """Token-wise influence ``[Q, B, T]`` (``[L, Q, B, T]``) of one training batch.

        Each training token's contribution; they sum over tokens (and layers) to the
        sequence's score, and padding tokens contribute exactly zero.
        """
        qg = self.prepare_queries(queries) if queries is not None else self.queries
        if qg is None:
            raise MisconfigurationException("no prepared queries: pass queries= or call prepare_queries first")
        tok = self.scorer().score_batch(qg, batch, token_wise=True)
        return tok if per_layer else tok.sum(0)

    def top_k(self, query_loader: Iterable | QueryGradients, train_loader: Iterable, k: int = 10,
              scores_dir: str | Path | None = None, shard_size: int = 4096) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Streaming top-k: the ``k`` most positive and most negative training examples per query.

        Memory stays flat in the number of training examples. With ``scores_dir`` all scores
        are also written in safetensors shards, and an interrupted run resumes from its last
        completed shard; a ``scores_dir`` holding scores of other queries, factors, layers, data,
        ``k`` or ``shard_size`` is started over, with a warning naming what differed.
        Returns ``{"positive": (values, indices), "negative": (values, indices)}``,
        each ``[Q, k]``, indices into the training dataset.
        """
        queries = self.prepare_queries(query_loader)
        scorer = self.scorer()
        _, world = dist_info()
        if scores_dir is not None:
            if world > 1:
                raise MisconfigurationException("top_k(scores_dir=...) writes shards from one process; under data "
                                                "parallelism call it without scores_dir (top-k merges across ranks)")
            # Scores of other queries, factors or data in scores_dir are discarded, never continued.
            writer = ScoreShardWriter(scores_dir, shard_size=shard_size, num_queries=queries.num_queries, topk=k,
                                      identity=scores_identity(queries, self.factors, scorer.layer_names,
                                                               train_loader, scorer.dtype),
                                      on_mismatch="restart")
            if not writer.completed:
                start = writer.resume_from()
                if start:
                    rank_zero_info(f"[lightning-influence] resuming scoring at training index {start}")
                loader = rebuild_loader(train_loader, indexed=True, start=start)
                with progress_bar(length_of(loader), "Influence: top-k scores", self.show_progress) as bar:
                    for i, (idx, batch) in enumerate(loader):
                        writer.write(scorer.score_batch(queries, batch, i).sum(0).detach().cpu(), start=int(idx[0]))
                        bar.update(1)
                writer.finish()
            top = writer.topk
        else:
            top = StreamingTopK(queries.num_queries, k)
            loader = rebuild_loader(train_loader, indexed=True)
            with progress_bar(length_of(loader), "Influence: top-k scores", self.show_progress) as bar:
                for i, (idx, batch) in enumerate(loader):
                    top.update(scorer.score_batch(queries, batch, i).sum(0).detach().cpu(), idx)
                    bar.update(1)
        result = {"positive": top.most_positive(), "negative": top.most_negative()}
        if world > 1:
            result = {side: _merge_top_k(*vi, k, largest=(side == "positive")) for side, vi in result.items()}
        return result

    def candidate_scores(self, query_loader: Iterable | QueryGradients, query_texts: list[str],
                         train_texts: list[str], train_loader: Any, k: int = 10_000,
                         cache_dir: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """TF-IDF filtering: score each query only against its ``k`` most similar training texts.

        The vectorizer is fitted once and cached (``cache_dir``). Returns ``(scores [Q, k],
        indices [Q, k])`` with the original training indices; the scores equal the
        unfiltered ones for the same pairs.
        """
        queries = self.prepare_queries(query_loader)
        if len(query_texts) != queries.num_queries:
            raise MisconfigurationException(f"{len(query_texts)} query texts for {queries.num_queries} queries")
        index = (TfidfCandidates.load_or_fit(cache_dir, train_texts) if cache_dir is not None
                 else TfidfCandidates.fit(train_texts))
        candidates = index.top_k(query_texts, k)
        return filtered_scores(self.scorer(), queries, candidates, train_loader.dataset, train_loader.collate_fn,
                               batch_size=train_loader.batch_size or 8)

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
        loader = rebuild_loader(train_loader, indexed=True)
        title = "Influence: pairwise scores" if self._mode == "pairwise" else "Influence: self-influence"
        with progress_bar(length_of(loader), title, self.show_progress) as bar:
            for i, (idx, batch) in enumerate(loader):
                chunks.append(score_fn(batch, i).detach().cpu())
                indices.append(idx)
                bar.update(1)
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
