"""``InfluenceModule``: score training data against queries, in-process or through Lightning.

Queries are computed and preconditioned once; then the training data streams past them in
batches, and a writer (``integration/writer.py``) turns the per-batch ``(indices, scores)`` into
the answer: a score matrix in dataset order, a streaming top-k, or score shards on disk.

* Without ``trainer`` every method scores the whole loader in the calling process and never
  enters a collective, so ``if trainer.is_global_zero: module.pairwise_scores(...)`` after a
  data-parallel fit is safe.
* With ``trainer=`` the training data goes through ``trainer.predict`` (devices, strategies,
  progress bar): :meth:`InfluenceModule.predict_step` yields ``(indices, layer scores)`` per batch,
  Lightning shards the data over data-parallel ranks, and the writer merges the ranks' parts at
  epoch end; every rank gets the full answer.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from lightning_utilities.core.apply_func import apply_to_collection
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from collections.abc import Callable, Sequence  # module.report's annotations

from lightning_influence.errors import InfluenceError, OptionsError
from lightning_influence.factors import InfluenceFactors
from lightning_influence.integration.writer import (SINGLE_PROCESS, ScoreMatrixWriter, ShardWriter, TopKWriter,
                                                    _ScoreWriter)
from lightning_influence.loaders import rebuild_loader
from lightning_influence.options import ScoreOptions
from lightning_influence.progress import length_of, progress_bar
from lightning_influence.scoring.engine import InfluenceScorer
from lightning_influence.scoring.queries import QueryGradients
from lightning_influence.scoring.query_store import load_query_gradients, save_query_gradients
from lightning_influence.scoring.tfidf import TfidfCandidates, filtered_scores
from lightning_influence.scoring.topk import scores_identity
from lightning_influence.tasks import Task

__all__ = ["InfluenceModule"]


def _out_of_inference(batch: Any) -> Any:
    """Lightning's predict loop may create batches under inference mode; autograd needs normal tensors."""
    return apply_to_collection(batch, torch.Tensor, lambda t: t.clone() if t.is_inference() else t)


@contextmanager
def _misconfiguration() -> Iterator[None]:
    """Library errors about options or inputs as Lightning's configuration error."""
    try:
        yield
    except InfluenceError as err:
        raise MisconfigurationException(str(err)) from None


class InfluenceModule(L.LightningModule):
    """Influence scores of training examples on queries.

    Args:
        model: the trained network (or the LightningModule whose ``forward`` the task calls).
        task: the :class:`~lightning_influence.tasks.Task` used when fitting the factors.
        factors: complete :class:`InfluenceFactors` for ``model`` (e.g. ``InfluenceFactors.load(dir)``).
        options: the :class:`~lightning_influence.options.ScoreOptions` (query rank and SVD,
            ``score_dtype``, ``layers``, ``top_k``, ...); single options may also be passed by
            keyword (``InfluenceModule(model, task, factors, query_rank=32)``).
        show_progress: progress bars (with time left) on long in-process passes, rank zero only.

    Example::

        module = InfluenceModule(model, task=ClassificationTask(), factors=InfluenceFactors.load("influence"))
        scores = module.pairwise_scores(query_loader, train_loader)      # [num_queries, num_train]
        self_scores = module.self_scores(train_loader)                   # [num_train]
        scores = module.pairwise_scores(query_loader, train_loader, trainer=L.Trainer(strategy="ddp"))

    Through Lightning directly: ``module.prepare_queries(query_loader)``, then
    ``trainer.predict(module, rebuild_loader(train_loader, indexed=True, shard=False))`` with one
    of the writers of ``lightning_influence.integration.writer`` among the trainer's callbacks;
    each predict step returns ``(indices, scores [L, Q, B])`` for a batch ``(indices, batch)``.
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        factors: InfluenceFactors | None,
        options: ScoreOptions | None = None,
        *,
        show_progress: bool = True,
        **option_values: Any,
    ):
        super().__init__()
        with _misconfiguration():
            self.options = ScoreOptions.merged(options, option_values)
        self.show_progress = show_progress
        if factors is None:
            raise MisconfigurationException(
                "InfluenceModule needs fitted factors: run the statistics pass first (InfluenceCallback, or "
                "fit_factors()) and pass `factors=InfluenceFactors.load(output_dir)`"
            )
        if not isinstance(factors, InfluenceFactors):
            raise MisconfigurationException(f"factors must be InfluenceFactors, got {type(factors).__name__}")
        with _misconfiguration():
            factors.require_complete()
        self.model = model
        self.task = task
        self.factors = factors
        self.queries: QueryGradients | None = None
        # Fail now, not after an hour of data loading, if the factors do not fit the model.
        self.scorer()

    def scorer(self) -> InfluenceScorer:
        """The Lightning-free scoring engine on this module's current device."""
        device = self._device_of_model()
        cached = getattr(self, "_scorer_cache", None)
        if cached is not None and cached.device == device:
            return cached
        o = self.options
        with _misconfiguration():
            self._scorer_cache = InfluenceScorer(self.model, self.task, self.factors, device=device,
                                                 score_dtype=o.score_dtype, layers=o.layers,
                                                 query_rank=o.query_rank, query_svd=o.query_svd)
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

    # ------------------------------------------------------------------ report
    def report(self, queries: Any, train_loader: Any, *, top_k: int | None = None,
               train_texts: Sequence[str] | Callable[[int], str | None] | None = None,
               query_ids: Sequence[str] | None = None, query_texts: Sequence[str] | None = None,
               tokenizer: Any = None, wandb: Any = None, output_dir: str | Path | None = None,
               title: str = "Influence report", strict_sign: bool = True) -> Any:
        """Score, build the :class:`~lightning_influence.reporting.InfluenceReport`, and log it to W&B.

        The callback's end of run and :func:`~lightning_influence.integration.pipeline.run_queries`
        take the same path (``pipeline.report_queries``): scores stream into shards, each query
        lists its ``top_k`` most positive and most negative training examples with their
        per-layer breakdown (and token scores when a ``tokenizer`` is given).

        Args:
            queries: a DataLoader of query batches (ids and texts from ``query_ids`` /
                ``query_texts`` or its dataset), a JSONL file of ``{"prompt", "completion"}``
                (needs ``tokenizer``), a ``"module:function"`` returning such a loader, or a
                ``QuerySet``.
            train_loader: the training data to score (a DataLoader; dataset order is kept).
            top_k: examples listed per query and direction (default: the options' ``top_k``).
            train_texts: the training texts, a sequence or ``index -> text`` (default: the
                dataset's ``texts``, else decoded with ``tokenizer``).
            tokenizer: decodes training texts, gives token heatmaps, reads JSONL queries.
            wandb: a W&B run or a Lightning ``WandbLogger``; ``None`` (default) logs to the
                active ``wandb.init`` run if there is one, else nowhere; ``False``: nowhere.
            output_dir: also write ``scores.json``, ``report.json``, ``report.html`` and the
                query gradients there (default: nothing is written).
            strict_sign: "most negative" lists only negative scores (fewer rows when there
                are fewer than ``top_k``), and likewise for "most positive".

        Returns:
            The report (in this process; no collective is entered).
        """
        from lightning_influence.integration.pipeline import as_query_set, report_queries  # noqa: PLC0415 (above us)

        with _misconfiguration():
            query_set = as_query_set(queries, tokenizer, query_ids, query_texts)
            _, result = report_queries(self, query_set, train_loader, output_dir=output_dir, top_k=top_k,
                                       train_texts=train_texts, tokenizer=tokenizer, wandb=wandb, title=title,
                                       strict_sign=strict_sign, show_progress=self.show_progress)
        return result


    # ------------------------------------------------------------------ Lightning's predict loop
    def on_predict_start(self) -> None:
        if self.queries is not None:
            self.queries = self.queries.to(self._device_of_model())

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``(indices, scores [L, Q, B])`` of one ``(indices, batch)`` against the prepared queries."""
        if self.queries is None:
            raise MisconfigurationException("no prepared queries: call prepare_queries(query_loader) before "
                                            "trainer.predict (or use pairwise_scores(..., trainer=trainer))")
        indices, data = batch
        with torch.inference_mode(False), torch.enable_grad():
            scores = self.scorer().score_batch(self.queries, _out_of_inference(data), batch_idx)
        return indices, scores.detach()

    @property
    def output_dtype(self) -> torch.dtype:
        """The dtype scores come out in (bf16/fp16 scoring accumulates in float32)."""
        low = self.options.score_dtype in (torch.float16, torch.bfloat16)
        return torch.float32 if low else self.options.score_dtype

    def _run(self, writer: _ScoreWriter, train_loader: Iterable, trainer: L.Trainer | None,
             step_module: L.LightningModule, title: str, start: int = 0) -> Any:
        """Stream the training data through ``step_module``'s predict step into ``writer``."""
        if trainer is None:
            # In-process: the whole loader, this process only, no collective.
            loader = rebuild_loader(train_loader, indexed=True, shard=False, start=start)
            with progress_bar(length_of(loader), title, self.show_progress) as bar:
                for i, batch in enumerate(loader):
                    writer.add(*step_module.predict_step(batch, i))
                    bar.update(1)
            with _misconfiguration():
                return writer.finish(SINGLE_PROCESS)
        # Lightning shards predict data itself (one example once per rank, no padding).
        loader = rebuild_loader(train_loader, indexed=True, shard=False, start=start)
        trainer.callbacks.append(writer)
        try:
            trainer.predict(step_module, dataloaders=loader, return_predictions=False)
        finally:
            trainer.callbacks.remove(writer)
        return writer.result

    # ------------------------------------------------------------------ public scoring
    # ------------------------------------------------------------------ the gradient index
    def build_index(self, train_loader: Iterable, directory: str | Path, options: Any = None,
                    **option_values: Any):
        """Write a gradient index of ``train_loader`` to ``directory`` and return it opened (a :class:`GradientIndex`).

        One pass over the training data (in this process, no collective) with these factors, of any
        strategy: each example's compressed, preconditioned gradient (docs/method.md, section 7).
        ``options`` is an :class:`~lightning_influence.index.IndexOptions`; single options may be given
        by keyword instead (``projection_dim=64``). A killed build resumes after its last shard. Pass the
        index where ``pairwise_scores`` and ``top_k`` take the training dataloader.
        """
        from lightning_influence.index import GradientIndex, IndexOptions, build_index  # noqa: PLC0415

        with _misconfiguration():
            if options is not None and not isinstance(options, IndexOptions):
                raise OptionsError(f"options must be an IndexOptions, got {type(options).__name__}")
            if option_values:
                options = dataclasses.replace(options or IndexOptions(), **option_values)
            loader = rebuild_loader(train_loader, shard=False)
            with progress_bar(length_of(loader), "Influence: gradient index", self.show_progress) as bar:
                build_index(self.model, self.task, self.factors, loader, directory, options,
                            device=self._device_of_model(), dtype=self._index_dtype(),
                            progress=lambda n: bar.update(1))
            return GradientIndex.load(directory, self.factors, self.model)

    def _index_dtype(self) -> torch.dtype:
        return torch.float64 if self.options.score_dtype == torch.float64 else torch.float32

    def _index_queries(self, index: Any, query_loader: Iterable | QueryGradients) -> torch.Tensor:
        """The queries compressed for ``index`` (straight from their tokens, or from prepared gradients)."""
        if self.options.layers is not None:
            raise OptionsError("an index scores through every layer of its factors; drop the `layers=` option "
                               "to score with an index")
        if index.factors is not self.factors and index.manifest["identity"]["factors"] != \
                _factors_identity(self.factors, index.options.preconditioner):
            raise OptionsError("the index was opened with other factors than this module's; open it with "
                               "GradientIndex.load(directory, module.factors)")
        if isinstance(query_loader, QueryGradients):
            return index.query_vectors(query_loader, self._index_dtype())
        return index.compress_queries(self.scorer(), rebuild_loader(query_loader, shard=False))

    def pairwise_scores(self, query_loader: Iterable | QueryGradients, train_loader: Any,
                        trainer: L.Trainer | None = None, per_layer: bool = False,
                        normalize: bool = False) -> torch.Tensor:
        """Scores ``[num_queries, num_train]`` (``[num_layers, Q, N]`` with ``per_layer``).

        Training examples come back in dataset order (the loader's order when it does not
        shuffle). With ``trainer`` under data parallelism every rank gets the full matrix.
        ``train_loader`` may be a :class:`~lightning_influence.index.GradientIndex` built with these
        factors: the queries are compressed as it was and scored by one matmul per shard, with no
        forward or backward over the training data (approximate scores unless its projection is as
        wide as each layer; ``normalize=True``: cosine scores, for an index with ``preconditioner="sqrt"``).
        """
        if _is_index(train_loader):
            if trainer is not None or per_layer:
                raise MisconfigurationException("scores from a gradient index are one matmul in this process: "
                                                "drop trainer= and per_layer=")
            with _misconfiguration():
                vectors = self._index_queries(train_loader, query_loader)
                return train_loader.scores(vectors, normalize=normalize, dtype=self._index_dtype())
        if normalize:
            raise MisconfigurationException("normalize=True (cosine scores) needs a GradientIndex in place of the "
                                            "training dataloader")
        queries = self.prepare_queries(query_loader)
        writer = ScoreMatrixWriter(per_layer, empty_shape=(len(self.scorer().layer_names), queries.num_queries),
                                   empty_dtype=self.output_dtype)
        return self._run(writer, train_loader, trainer, self, "Influence: pairwise scores")

    def self_scores(self, train_loader: Iterable, trainer: L.Trainer | None = None,
                    per_layer: bool = False) -> torch.Tensor:
        """Self-influence ``[num_train]`` (``[num_layers, N]`` with ``per_layer``), in dataset order."""
        writer = ScoreMatrixWriter(per_layer, empty_shape=(len(self.scorer().layer_names),),
                                   empty_dtype=self.output_dtype)
        return self._run(writer, train_loader, trainer, _SelfInfluenceStep(self), "Influence: self-influence")

    def top_k(self, query_loader: Iterable | QueryGradients, train_data: Any = None, k: int | None = None,
              scores_dir: str | Path | None = None, shard_size: int | None = None,
              trainer: L.Trainer | None = None, *, rescore: int | None = None, train_loader: Any = None,
              normalize: bool = False, token_scores: bool = False,
              approximate: bool = False) -> dict[str, Any]:
        """Streaming top-k: the ``k`` most positive and most negative training examples per query.

        Memory stays flat in the number of training examples. With ``scores_dir`` all scores
        are also written in safetensors shards, and an interrupted run resumes from its last
        completed shard (in one process); a ``scores_dir`` holding scores of other queries,
        factors, layers, data, ``k`` or ``shard_size`` is started over, with a warning naming
        what differed. Returns ``{"positive": (values, indices), "negative":
        (values, indices)}``, each ``[Q, k]``, indices into the training dataset. ``k`` and
        ``shard_size`` default to the options' ``top_k`` and ``shard_size``. ``train_data`` is the
        training dataloader (also accepted as ``train_loader=``).

        ``train_data`` may be a :class:`~lightning_influence.index.GradientIndex` built with these
        factors: the index ranks the training data by one matmul per shard (``normalize``: by cosine;
        ``approximate``: faiss HNSW, an optional extra). With ``rescore=K`` the index proposes ``K``
        candidates per query and side, and the exact scores with these factors rank them (two stages:
        only the candidates of ``train_loader``, the training ``DataLoader`` over the indexed dataset,
        are run); the values are then exact, and ``token_scores=True`` adds ``"positive_tokens"`` /
        ``"negative_tokens"`` ``[Q, k, T]``, each final candidate's token-wise scores. In-process only.
        """
        k = self.options.top_k if k is None else k
        if _is_index(train_data):
            if scores_dir is not None or trainer is not None:
                raise MisconfigurationException("top-k from a gradient index runs in this process and keeps no score "
                                                "shards: drop scores_dir= and trainer=")
            return self._index_top_k(query_loader, train_data, k, rescore, train_loader, normalize, token_scores,
                                     approximate)
        if rescore is not None or normalize or token_scores or approximate:
            raise MisconfigurationException("rescore=, normalize=, token_scores= and approximate= are for a "
                                            "GradientIndex in place of the training dataloader")
        if train_data is None:
            train_data = train_loader
        elif train_loader is not None:
            raise MisconfigurationException("give the training dataloader once (train_loader= is the rescoring data "
                                            "of a GradientIndex)")
        if train_data is None:
            raise MisconfigurationException("top_k needs the training dataloader or a GradientIndex")
        train_loader = train_data
        shard_size = self.options.shard_size if shard_size is None else shard_size
        with _misconfiguration():
            ScoreOptions.merged(self.options, {"top_k": k, "shard_size": shard_size})
        queries = self.prepare_queries(query_loader)
        title = "Influence: top-k scores"
        if scores_dir is None:
            return self._run(TopKWriter(queries.num_queries, k), train_loader, trainer, self, title)
        distributed = trainer is not None and trainer.world_size > 1
        with _misconfiguration():
            scorer = self.scorer()
            # Scores of other queries, factors or data in scores_dir are discarded, never continued.
            writer = ShardWriter(scores_dir, queries.num_queries, k, shard_size=shard_size, distributed=distributed,
                                 num_layers=len(scorer.layer_names), empty_dtype=self.output_dtype,
                                 identity=scores_identity(queries, self.factors, scorer.layer_names, train_loader,
                                                          scorer.dtype))
        if writer.completed:
            return writer.finish()
        start = writer.resume_from()
        if start:
            rank_zero_info(f"[lightning-influence] resuming scoring at training index {start}")
        return self._run(writer, train_loader, trainer, self, title, start=start)

    def _index_top_k(self, query_loader, index, k: int, rescore: int | None, train_loader: Any, normalize: bool,
                     token_scores: bool, approximate: bool) -> dict[str, Any]:
        with _misconfiguration():
            ScoreOptions.merged(self.options, {"top_k": k})
            if token_scores and rescore is None:
                raise OptionsError("token_scores=True needs two stages (rescore=K): token-wise scores are exact "
                                   "scores of the final candidates")
            vectors = self._index_queries(index, query_loader)
            gradients = None
            if rescore is not None:
                if train_loader is None:
                    raise OptionsError("two-stage top-k (rescore=K) needs train_loader=, the training DataLoader over "
                                       "the dataset the index was built on")
                gradients = self.prepare_queries(query_loader)
            sides = index.top_k_sides(vectors, k, ("positive", "negative"), normalize=normalize, rescore=rescore,
                                      scorer=self.scorer() if rescore is not None else None, train_loader=train_loader,
                                      dtype=self._index_dtype(), approximate=approximate, query_gradients=gradients,
                                      token_wise=token_scores)
        out: dict[str, Any] = {side: (values, indices) for side, (values, indices, _) in sides.items()}
        if token_scores:
            out.update({f"{side}_tokens": tokens for side, (_, _, tokens) in sides.items()})
        return out

    def candidate_scores(self, query_loader: Iterable | QueryGradients, query_texts: list[str],
                         train_texts: list[str], train_loader: Any, k: int | None = None,
                         cache_dir: str | Path | None = None,
                         index: TfidfCandidates | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """TF-IDF filtering: score each query only against its ``k`` most similar training texts.

        ``k`` defaults to the options' ``tfidf_candidates`` (else 10,000, the paper's). The
        vectorizer is fitted once and cached (``cache_dir``), or passed fitted (``index``).
        Returns ``(scores [Q, k], indices [Q, k])`` with the original training indices; the
        scores equal the unfiltered ones for the same pairs. In-process only.
        """
        k = k if k is not None else (self.options.tfidf_candidates or 10_000)
        queries = self.prepare_queries(query_loader)
        if len(query_texts) != queries.num_queries:
            raise MisconfigurationException(f"{len(query_texts)} query texts for {queries.num_queries} queries")
        if index is None:
            index = (TfidfCandidates.load_or_fit(cache_dir, train_texts) if cache_dir is not None
                     else TfidfCandidates.fit(train_texts))
        candidates = index.top_k(query_texts, k)
        return filtered_scores(self.scorer(), queries, candidates, train_loader.dataset, train_loader.collate_fn,
                               batch_size=train_loader.batch_size or 8)


def _is_index(data: Any) -> bool:
    from lightning_influence.index import GradientIndex  # noqa: PLC0415

    return isinstance(data, GradientIndex)


def _factors_identity(factors: InfluenceFactors, placement: str) -> str:
    from lightning_influence.index.store import factors_identity  # noqa: PLC0415

    return factors_identity(factors, placement)


class _SelfInfluenceStep(L.LightningModule):
    """The predict step of self-influence: ``(indices, scores [L, B])`` per ``(indices, batch)``."""

    def __init__(self, influence: InfluenceModule):
        super().__init__()
        self.influence = influence  # a child module: Lightning moves the network with it

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        indices, data = batch
        with torch.inference_mode(False), torch.enable_grad():
            scores = self.influence.scorer().self_score_batch(_out_of_inference(data), batch_idx)
        return indices, scores.detach()
