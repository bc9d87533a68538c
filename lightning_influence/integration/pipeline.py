"""From fitted factors to saved scores and reports: the end of a config-triggered run.

:func:`report_queries` is the one report path: :meth:`InfluenceModule.report`, :func:`run_queries`
(the demo's, for any model, factors and data) and ``score_and_report`` (what
:class:`InfluenceCallback` runs after fitting when it was given queries) all end in it, so the
report is assembled, saved and logged to W&B in one place.

The scores stream: each training batch's scores go to score shards under
``output_dir/score_shards`` (and a streaming top-k), never as ``[L, Q, N]`` layer scores. The
report reads the ``[Q, N]`` rows back from the shards (for its magnitude plots), takes the
layer breakdown of the few listed examples by scoring them again per layer, and the layers'
shares of ``|score|`` from sums kept while streaming.
"""

from __future__ import annotations

import importlib
import logging
import shutil
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_influence.factors import InfluenceFactors
from lightning_influence.errors import TopKError
from lightning_influence.store import BundleFormat, new_tensor_name, read_bundle, write_bundle
from lightning_influence.integration.module import InfluenceModule
from lightning_influence.integration.writer import SINGLE_PROCESS, Collective, ShardWriter
from lightning_influence.loaders import rebuild_loader
from lightning_influence.options import ScoreOptions
from lightning_influence.progress import length_of, progress_bar
from lightning_influence.scoring.tfidf import TfidfCandidates
from lightning_influence.scoring.topk import read_scores
from lightning_influence.tasks import CausalLMTask, Task

log = logging.getLogger(__name__)

__all__ = ["QuerySet", "load_query_set", "query_set_from_loader", "as_query_set", "find_tokenizer", "run_queries", "report_queries", "score_and_report", "save_scores",
           "load_scores", "SavedScores"]


@dataclass
class QuerySet:
    """Queries ready to score: a loader of batches plus their ids and display texts."""

    loader: Any
    ids: list[str]
    texts: list[str]
    prompt_lengths: list[int | None] | None = None  # characters of each text that are the prompt


def find_tokenizer(*holders: Any):
    """The first ``tokenizer`` attribute of ``holders`` (datamodule, LightningModule, ...), else ``None``."""
    for holder in holders:
        tok = getattr(holder, "tokenizer", None)
        if tok is not None:
            return tok
    return None


def load_query_set(spec: str, tokenizer=None, batch_size: int = 8) -> QuerySet:
    """Queries from a JSONL file of ``{"prompt", "completion"[, "query_id"]}`` or a ``module:function``.

    The function is imported and called without arguments; it returns a DataLoader of
    query batches (its dataset may carry ``query_ids`` and ``queries`` for display).
    """
    from lightning_influence.text import QueryCollator, QueryDataset, join_query, read_jsonl_queries

    if ":" in spec and not Path(spec).exists():
        module_name, _, fn_name = spec.partition(":")
        try:
            fn = getattr(importlib.import_module(module_name), fn_name)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"queries={spec!r}: cannot import {fn_name} from {module_name} ({err})") from None
        return query_set_from_loader(fn())
    records = read_jsonl_queries(spec)  # a broken file is reported before a missing tokenizer
    if tokenizer is None:
        raise ValueError(
            f"queries={spec!r} is a JSONL file of prompt/completion pairs, which needs a tokenizer: give the "
            "datamodule or LightningModule a `tokenizer` attribute, or pass queries='module:function' returning "
            "a DataLoader of query batches"
        )
    dataset = QueryDataset(records, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=QueryCollator(pad))
    joined = [join_query(q["prompt"], q["completion"]) for q in records]  # the one query-text rule
    return QuerySet(loader, dataset.query_ids, [t for t, _ in joined], [p for _, p in joined])


def query_set_from_loader(loader: Any, query_ids: Sequence[str] | None = None,
                          query_texts: Sequence[str] | None = None) -> QuerySet:
    """A :class:`QuerySet` around a DataLoader of query batches.

    Ids and display texts are ``query_ids`` / ``query_texts`` when given, else read from the
    loader's dataset (``query_ids`` and ``queries`` of prompt/completion records, as
    :class:`~lightning_influence.text.QueryDataset` has), else ``q0``, ``q1``, ... for both.
    """
    from lightning_influence.text import join_query

    dataset = getattr(loader, "dataset", None)
    ids = [str(i) for i in (query_ids if query_ids is not None else getattr(dataset, "query_ids", []))]
    records = getattr(dataset, "queries", None) or []
    joined = [join_query(str(q.get("prompt", "")), str(q.get("completion", ""))) for q in records
              if isinstance(q, dict)]
    n = len(dataset) if dataset is not None and hasattr(dataset, "__len__") else len(ids)
    ids = ids or [f"q{i}" for i in range(n)]
    if query_texts is not None:
        return QuerySet(loader, ids, [str(t) for t in query_texts])
    if len(joined) != len(ids):
        return QuerySet(loader, ids, list(ids))
    return QuerySet(loader, ids, [t for t, _ in joined], [p for _, p in joined])


def as_query_set(queries: Any, tokenizer=None, query_ids: Sequence[str] | None = None,
                 query_texts: Sequence[str] | None = None) -> QuerySet:
    """``queries`` as a :class:`QuerySet`: a QuerySet, a JSONL path or ``module:function`` spec, or a loader."""
    if isinstance(queries, QuerySet):
        return queries
    if isinstance(queries, (str, Path)):
        return load_query_set(str(queries), tokenizer)
    return query_set_from_loader(queries, query_ids, query_texts)


RUN_SCORES_FORMAT = BundleFormat(
    "lightning-influence-run-scores", 1, TopKError, "saved scores", prefix="scores", manifest="scores.json",
    make="Write them with run_queries (or InfluenceCallback(queries=...)), or save_scores.",
    redo="rerun the scoring",
)


@dataclass
class SavedScores:
    """Scores read back by :func:`load_scores`."""

    scores: torch.Tensor  # [Q, N]
    layer_scores: torch.Tensor | None  # [L, Q, N]
    query_ids: list[str]
    layer_names: list[str]
    manifest: dict


def save_scores(directory: str | Path, scores: torch.Tensor, query_ids: Sequence[str],
                layer_scores: torch.Tensor | None = None, layer_names: Sequence[str] | None = None,
                extra: dict | None = None, identity: dict | None = None) -> Path:
    """Write the scores ``[Q, N]`` (and ``layer_scores`` ``[L, Q, N]``) as one bundle in ``directory``.

    The manifest is ``scores.json`` (query ids, layer names, ``extra``); it names the tensor file
    ``scores-<id>.safetensors`` and its checksum; both land atomically as a whole (read them
    back with :func:`load_scores`). ``identity`` records what the scores were computed from.
    """
    tensors = {"scores": scores}
    if layer_scores is not None:
        tensors["layer_scores"] = layer_scores
    tensor_file = new_tensor_name(RUN_SCORES_FORMAT)
    write_bundle(RUN_SCORES_FORMAT, directory, {
        **(extra or {}), "tensor_file": tensor_file, "query_ids": list(query_ids),
        "num_train": int(scores.shape[-1]), "layer_names": list(layer_names or []),
    }, identity=identity, tensors={tensor_file: tensors})
    return Path(directory)


def load_scores(directory: str | Path) -> SavedScores:
    """The scores written by :func:`save_scores` (format, version and checksum checked)."""
    bundle = read_bundle(RUN_SCORES_FORMAT, directory)
    t = bundle.tensors(bundle.manifest.get("tensor_file"))
    if "scores" not in t:
        raise TopKError(f"{bundle.directory} holds no 'scores' tensor; rerun the scoring")
    m = bundle.manifest
    return SavedScores(t["scores"], t.get("layer_scores"), list(m["query_ids"]), list(m["layer_names"]), m)


def _train_text_fn(dataset: Any, tokenizer) -> Callable[[int], str | None] | None:
    texts = getattr(dataset, "texts", None)
    if isinstance(texts, (list, tuple)):
        return lambda i: texts[i]
    if tokenizer is not None:
        def decode(i: int) -> str | None:
            item = dataset[i]
            ids = item.get("input_ids") if isinstance(item, dict) else None
            return tokenizer.decode(ids, skip_special_tokens=True) if ids is not None else None
        return decode
    return None


def run_queries(
    model: nn.Module,
    task: Task,
    factors: InfluenceFactors,
    queries: QuerySet,
    train_loader: DataLoader,
    output_dir: str | Path,
    options: ScoreOptions | None = None,
    *,
    tokenizer=None,
    wandb_run: Any = None,
    title: str = "Influence report",
    show_progress: bool = True,
    collective: Collective = SINGLE_PROCESS,
    **option_values: Any,
):
    """Score ``queries`` against the training data, save scores, and write the reports.

    ``options`` (:class:`~lightning_influence.options.ScoreOptions`, or single options by
    keyword: ``top_k=``, ``query_rank=``, ``query_svd=``, ``layers=``, ``score_dtype=``,
    ``tfidf_candidates=``) say how. Returns ``(scores [Q, N], report)``. With
    ``tfidf_candidates=k`` each query is scored only against its ``k`` most TF-IDF-similar
    training texts (the other entries of the returned matrix are NaN). ``show_progress`` shows
    progress bars on the scoring passes (rank zero only). ``wandb_run``: a W&B run or a
    Lightning ``WandbLogger`` to log the report to; ``None`` logs to the active ``wandb.init``
    run if there is one; ``False`` logs nowhere. This is :meth:`InfluenceModule.report` with
    an output directory (both run :func:`report_queries`).

    In one process (the default) nothing enters a collective. ``collective=trainer.strategy``,
    called on every rank together (as the callback does), scores each rank's shard and merges:
    rank zero writes the files (and the TF-IDF cache, which the other ranks then read) and logs
    to W&B; every rank gets the scores, only rank zero the report.
    """
    opts = ScoreOptions.merged(options, option_values)
    module = InfluenceModule(model, task=task, factors=factors, options=opts, show_progress=show_progress)
    return report_queries(module, queries, train_loader, output_dir=output_dir, tokenizer=tokenizer,
                          wandb=wandb_run, title=title, show_progress=show_progress, collective=collective)


def report_queries(
    module: InfluenceModule,
    queries: QuerySet,
    train_loader: DataLoader,
    *,
    output_dir: str | Path | None = None,
    top_k: int | None = None,
    train_texts: Sequence[str] | Callable[[int], str | None] | None = None,
    tokenizer=None,
    wandb: Any = None,
    title: str = "Influence report",
    strict_sign: bool = True,
    show_progress: bool = True,
    collective: Collective = SINGLE_PROCESS,
):
    """The one report path: score ``queries`` against ``train_loader``, build the report, log it.

    Behind :meth:`InfluenceModule.report`, :func:`run_queries` and the callback's end of run.
    Returns ``(scores [Q, N], report)`` (``report`` is ``None`` on ranks other than zero).
    ``wandb``: a run or ``WandbLogger``; ``None``: the active ``wandb.init`` run, if any;
    ``False``: none. With ``output_dir`` the score shards, ``scores.json``, the stored query
    gradients (``queries/``), ``report.json`` and ``report.html`` are written there; without,
    the shards go to a temporary directory and nothing stays on disk.
    """
    from lightning_influence.reporting import active_run, build_report, layer_shares, log_report, write_html_report

    opts = module.options if top_k is None else ScoreOptions.merged(module.options, {"top_k": top_k})
    qg = module.prepare_queries(queries.loader)
    if len(queries.ids) != qg.num_queries or len(queries.texts) != qg.num_queries:
        raise MisconfigurationException(
            f"{qg.num_queries} queries in the loader but {len(queries.ids)} query ids and {len(queries.texts)} "
            "query texts: give one id and one text per query")
    dataset = train_loader.dataset
    text_of = _train_text_fn(dataset, tokenizer) if train_texts is None else train_texts
    out = Path(output_dir) if output_dir is not None else None
    if out is None and collective.world_size > 1:
        raise MisconfigurationException("scoring on several ranks needs an output_dir the ranks share")
    scorer = module.scorer()
    factors = module.factors
    layer_names = list(scorer.layer_names)
    layer_totals = None
    with ExitStack() as stack:
        work = out if out is not None else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="influence-")))
        if opts.tfidf_candidates is not None:
            if text_of is None:
                raise MisconfigurationException(
                    "tfidf_candidates needs the training texts: pass train_texts=, a dataset with a `texts` list, "
                    "or a tokenizer")
            all_texts = ([text_of(i) or "" for i in range(len(dataset))] if callable(text_of)
                         else [str(t) for t in text_of])
            index = _tfidf_index(work / "tfidf", all_texts, collective)
            cand_scores, cand_idx = module.candidate_scores(qg, queries.texts, all_texts, train_loader,
                                                            k=opts.tfidf_candidates, index=index)
            scores = torch.full((qg.num_queries, len(dataset)), float("nan"), dtype=cand_scores.dtype)
            scores.scatter_(1, cand_idx, cand_scores)
        else:
            scores, layer_abs_sums = _stream_scores(module, qg, train_loader, work / "score_shards", opts, collective,
                                                    show_progress)
            layer_totals = layer_shares(layer_abs_sums.unsqueeze(1), layer_names)
    if not collective.is_global_zero:
        return scores, None
    collate = train_loader.collate_fn

    def token_scores(q: int, m: int):
        if tokenizer is None:
            return None
        from lightning_influence.text import token_strings

        batch = collate([dataset[m]])
        if not isinstance(batch, dict) or "input_ids" not in batch:
            return None
        tok = scorer.score_batch(qg.select([q]), batch, token_wise=True).sum(0)[0, 0]
        ids = batch["input_ids"][0]
        mask = batch.get("attention_mask")
        n = int(mask[0].sum()) if mask is not None else ids.numel()
        return token_strings(tokenizer, ids[:n]), tok[:n].tolist()

    report = build_report(scores, queries.ids, queries.texts, train_texts=text_of,
                          k=opts.top_k, layer_names=layer_names, token_scores_fn=token_scores,
                          strategy=factors.strategy, prompt_lengths=queries.prompt_lengths, strict_sign=strict_sign,
                          token_alignment="next" if isinstance(module.task, CausalLMTask) else "input")
    _add_layer_breakdown(report, scorer, qg, dataset, collate, batch_size=train_loader.batch_size or 8)
    if layer_totals is not None:
        report.layer_totals = layer_totals
    if out is not None:
        # Prepared once: the stored query gradients can be scored later against any training shard.
        module.save_queries(out / "queries", [{"query_id": i, "text": t} for i, t in zip(queries.ids, queries.texts)])
        save_scores(out, scores, queries.ids, None, layer_names,
                    extra={"strategy": factors.strategy, "query_rank": opts.query_rank,
                           "tfidf_candidates": opts.tfidf_candidates})
        report.save_json(out / "report.json", include_scores=False)
        write_html_report(report, out / "report.html", title=title)
        log.info("influence scores and report written to %s", out)
    run = active_run(wandb)
    if run is not None:
        log_report(report, run)
    return scores, report


def _stream_scores(module: InfluenceModule, queries, train_loader, directory: Path, opts: ScoreOptions,
                   collective: Collective, show_progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Score every training example into shards under ``directory``; the ``[Q, N]`` rows read back
    from them (on every rank) and each layer's summed ``|score|``."""
    distributed = collective.world_size > 1
    if collective.is_global_zero and directory.exists():
        shutil.rmtree(directory)  # this run's scores only: never resume another query set's shards
    collective.barrier("influence_shards_cleared")
    writer = ShardWriter(directory, queries.num_queries, opts.top_k, shard_size=opts.shard_size,
                         distributed=distributed, num_layers=len(module.scorer().layer_names),
                         empty_dtype=module.output_dtype)
    loader = rebuild_loader(train_loader, indexed=True, shard=distributed)
    with progress_bar(length_of(loader), "Influence: scores", show_progress) as bar:
        for i, batch in enumerate(loader):
            writer.add(*module.predict_step(batch, i))
            bar.update(1)
    writer.finish(collective)
    scores = read_scores(directory) if collective.is_global_zero else None
    if distributed:
        scores = collective.broadcast(scores, 0)
    return scores, writer.layer_abs_sums


def _tfidf_index(cache_dir: Path, train_texts: list[str], collective: Collective) -> TfidfCandidates:
    """The TF-IDF index, fitted (or loaded) and written by rank zero; the other ranks wait and read it."""
    index = TfidfCandidates.load_or_fit(cache_dir, train_texts) if collective.is_global_zero else None
    collective.barrier("influence_tfidf_written")
    return index if index is not None else TfidfCandidates.load(cache_dir, texts=train_texts)


def _add_layer_breakdown(report, scorer, queries, dataset, collate, batch_size: int) -> None:
    """Each listed entry's score per layer, from scoring only the listed training examples again."""
    listed = sorted({entry.train_index for _, _, _, entry in report.iter_entries()})
    names = list(scorer.layer_names)
    per_example: dict[int, torch.Tensor] = {}
    for start in range(0, len(listed), batch_size):
        chunk = listed[start:start + batch_size]
        layer_scores = scorer.score_batch(queries, collate([dataset[m] for m in chunk])).detach().cpu()  # [L, Q, B]
        for j, m in enumerate(chunk):
            per_example[m] = layer_scores[:, :, j]
    for qi, _, _, entry in report.iter_entries():
        values = per_example[entry.train_index][:, qi]
        entry.layer_scores = {n: float(v) for n, v in zip(names, values.tolist())}


def score_and_report(callback, trainer, pl_module, train_loader) -> torch.Tensor:
    """The callback's end-of-run scoring of its configured queries, on every rank together."""
    from lightning.pytorch.loggers import WandbLogger

    tokenizer = find_tokenizer(trainer.datamodule, pl_module, callback)
    queries = load_query_set(callback.queries, tokenizer)
    wandb = next((lg for lg in trainer.loggers if isinstance(lg, WandbLogger)), None)
    scores, report = run_queries(callback.network(pl_module), callback.task, callback.factors, queries, train_loader,
                                 callback.output_dir, callback.score_options, tokenizer=tokenizer, wandb_run=wandb,
                                 # Same as the callback's own passes: no bars when the Trainer has none.
                                 show_progress=trainer.progress_bar_callback is not None,
                                 collective=trainer.strategy)
    if report is not None:
        from lightning.pytorch.utilities import rank_zero_info

        rank_zero_info(f"[lightning-influence] scores for {len(queries.ids)} queries saved to "
                       f"{callback.output_dir} (scores.json); report: {callback.output_dir}/report.html")
    return scores
