"""From fitted factors to saved scores and reports: the end of a config-triggered run.

``score_and_report`` is what :class:`InfluenceCallback` runs after fitting when it was
given queries; :func:`run_queries` is the same thing for any model, factors and data
(the demo and the command line use it).
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_influence.factors import InfluenceFactors
from lightning_influence.errors import TopKError
from lightning_influence.store import BundleFormat, new_tensor_name, read_bundle, write_bundle
from lightning_influence.loaders import dist_info
from lightning_influence.integration.module import InfluenceModule
from lightning_influence.tasks import CausalLMTask, Task

log = logging.getLogger(__name__)

__all__ = ["QuerySet", "load_query_set", "run_queries", "score_and_report", "save_scores", "load_scores",
           "SavedScores"]


@dataclass
class QuerySet:
    """Queries ready to score: a loader of batches plus their ids and display texts."""

    loader: Any
    ids: list[str]
    texts: list[str]
    prompt_lengths: list[int | None] | None = None  # characters of each text that are the prompt


def _find_tokenizer(*holders: Any):
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
    from lightning_influence.text import QueryCollator, QueryDataset, read_jsonl_queries

    if ":" in spec and not Path(spec).exists():
        module_name, _, fn_name = spec.partition(":")
        try:
            fn = getattr(importlib.import_module(module_name), fn_name)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"queries={spec!r}: cannot import {fn_name} from {module_name} ({err})") from None
        loader = fn()
        dataset = getattr(loader, "dataset", None)
        ids = list(getattr(dataset, "query_ids", []))
        texts = [f"{q.get('prompt', '')}{q.get('completion', '')}" for q in getattr(dataset, "queries", [])]
        n = len(dataset) if dataset is not None and hasattr(dataset, "__len__") else len(ids)
        ids = ids or [f"q{i}" for i in range(n)]
        return QuerySet(loader, ids, texts or ids)
    if tokenizer is None:
        raise ValueError(
            f"queries={spec!r} is a JSONL file of prompt/completion pairs, which needs a tokenizer: give the "
            "datamodule or LightningModule a `tokenizer` attribute, or pass queries='module:function' returning "
            "a DataLoader of query batches"
        )
    records = read_jsonl_queries(spec)
    dataset = QueryDataset(records, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=QueryCollator(pad))
    texts = [f"{q['prompt']}{'' if q['completion'].startswith(' ') else ' '}{q['completion']}" for q in records]
    return QuerySet(loader, dataset.query_ids, texts)


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
    tokenizer=None,
    top_k: int = 10,
    query_rank: int | None = None,
    wandb_run: Any = None,
    title: str = "Influence report",
    tfidf_candidates: int | None = None,
    layers: Sequence[str] | None = None,
    dtype: torch.dtype = torch.float32,
    show_progress: bool = True,
    query_svd: str = "randomized",
):
    """Score ``queries`` against the training data, save scores, and write the reports.

    Returns ``(scores [Q, N], report)``. Under data parallelism every rank scores its
    shard; rank zero writes the files and logs to W&B. With ``tfidf_candidates=k`` each
    query is scored only against its ``k`` most TF-IDF-similar training texts (the
    other entries of the returned matrix are NaN); ``layers`` keeps only those tracked
    layers; ``dtype`` is the scoring compute dtype (bf16/fp16 for speed); ``show_progress``
    shows progress bars on the scoring passes (rank zero only); ``query_svd`` is the SVD of
    rank-r queries (``"randomized"`` or ``"exact"``).
    """
    from lightning_influence.reporting import build_report, log_report, write_html_report

    module = InfluenceModule(model, task=task, factors=factors, query_rank=query_rank, dtype=dtype, layers=layers,
                             show_progress=show_progress, query_svd=query_svd)
    qg = module.prepare_queries(queries.loader)
    dataset = train_loader.dataset
    if tfidf_candidates is not None:
        text_of = _train_text_fn(dataset, tokenizer)
        if text_of is None:
            raise ValueError("tfidf_candidates needs the training texts: a dataset with a `texts` list, or a tokenizer")
        train_texts = [text_of(i) or "" for i in range(len(dataset))]
        cand_scores, cand_idx = module.candidate_scores(qg, queries.texts, train_texts, train_loader,
                                                        k=tfidf_candidates,
                                                        cache_dir=Path(output_dir) / "tfidf")
        scores = torch.full((qg.num_queries, len(dataset)), float("nan"), dtype=cand_scores.dtype)
        scores.scatter_(1, cand_idx, cand_scores)
        layer_scores = None
    else:
        layer_scores = module.pairwise_scores(qg, train_loader, per_layer=True)
        scores = layer_scores.sum(0)
    rank, _ = dist_info()
    if rank != 0:
        return scores, None
    collate = train_loader.collate_fn
    scorer = module.scorer()

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

    report = build_report(scores, queries.ids, queries.texts, train_texts=_train_text_fn(dataset, tokenizer),
                          k=top_k, layer_scores=layer_scores, layer_names=list(module.scorer().layer_names),
                          token_scores_fn=token_scores, strategy=factors.strategy, prompt_lengths=queries.prompt_lengths,
                          token_alignment="next" if isinstance(task, CausalLMTask) else "input")
    out = Path(output_dir)
    # Prepared once: the stored query gradients can be scored later against any training shard.
    module.save_queries(out / "queries", [{"query_id": i, "text": t} for i, t in zip(queries.ids, queries.texts)])
    save_scores(out, scores, queries.ids, layer_scores, module.scorer().layer_names,
                extra={"strategy": factors.strategy, "query_rank": query_rank, "tfidf_candidates": tfidf_candidates})
    report.save_json(out / "report.json", include_scores=False)
    write_html_report(report, out / "report.html", title=title)
    if wandb_run is not None:
        log_report(report, wandb_run)
    log.info("influence scores and report written to %s", out)
    return scores, report


def score_and_report(callback, trainer, pl_module) -> torch.Tensor:
    """The callback's end-of-run scoring of its configured queries."""
    from lightning.pytorch.loggers import WandbLogger

    tokenizer = _find_tokenizer(trainer.datamodule, pl_module, callback)
    queries = load_query_set(callback.queries, tokenizer)
    loader = callback._training_loader(trainer, pl_module, None)
    wandb = next((lg for lg in trainer.loggers if isinstance(lg, WandbLogger)), None)
    scores, report = run_queries(callback.network(pl_module), callback.task, callback.factors, queries, loader,
                                 callback.output_dir, tokenizer=tokenizer, top_k=callback.top_k,
                                 query_rank=callback.query_rank, query_svd=callback.query_svd, wandb_run=wandb,
                                 tfidf_candidates=callback.tfidf_candidates, layers=callback.score_layers,
                                 dtype=callback.score_dtype,
                                 # Same as the callback's own passes: no bars when the Trainer has none.
                                 show_progress=trainer.progress_bar_callback is not None)
    if report is not None:
        from lightning.pytorch.utilities import rank_zero_info

        rank_zero_info(f"[lightning-influence] scores for {len(queries.ids)} queries saved to "
                       f"{callback.output_dir} (scores.json); report: {callback.output_dir}/report.html")
    return scores
