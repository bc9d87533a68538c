"""Querying a gradient index: scores by one matmul per shard, top-k, and exact two-stage rescoring.

The queries' preconditioned gradients (:meth:`InfluenceScorer.query_gradients`, full or low rank)
are compressed the way the index was (:meth:`Compression.query_vectors`); a score is then the dot
product of a query vector with an index row: no forward or backward over the training data.
Cosine scores divide by both vectors' norms (meaningful with ``preconditioner="sqrt"``, where both
sides are whitened). Two stages: the index proposes candidates, the exact scores with the same
factors (docs/method.md, section 4) rank them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from lightning_influence.errors import GradientIndexError
from lightning_influence.factors import InfluenceFactors
from lightning_influence.scoring.queries import QueryGradients
from lightning_influence.store import read_bundle, weights_fingerprint
from lightning_influence.tasks import batch_size_of
from lightning_influence.index.projection import Compression, IndexOptions, block_layouts
from lightning_influence.index.store import (INDEX_FORMAT, digests_fingerprint, example_digests, factors_identity,
                                             rank_format)

__all__ = ["GradientIndex"]


class GradientIndex:
    """A built gradient index, opened against the factors (and optionally model and data) it was built for.

    Open with :meth:`load`. Rows are in dataset order (``N`` examples); ``width`` numbers per row.
    """

    def __init__(self, directory: Path, manifest: dict, factors: InfluenceFactors, compression: Compression,
                 shards: list[dict], num_examples: int, in_memory: bool):
        self.directory = directory
        self.manifest = manifest
        self.factors = factors
        self.compression = compression
        self.options = compression.options
        self.num_examples = num_examples
        self._shards = shards  # each: its rank bundle and file, and (in memory) vectors/examples
        self._in_memory = in_memory
        self._norms: torch.Tensor | None = None

    # ------------------------------------------------------------------ opening
    @classmethod
    def load(cls, directory: str | os.PathLike, factors: InfluenceFactors, model: nn.Module | None = None,
             data: Iterable[Any] | None = None, indexed: bool = False, in_memory: bool = True) -> "GradientIndex":
        """Open the index in ``directory``, refusing one built for other factors, model or data.

        Args:
            factors: the complete factors the queries are preconditioned with (required: they must be the
                ones the index was built for).
            model: when given, its weights must be the ones the index was built on.
            data: when given (the training loader), its examples must be the indexed ones, in the same
                order (each batch is hashed; no forward pass).
            indexed: ``data`` yields ``(dataset_indices, batch)`` pairs.
            in_memory: keep the shards in memory (default) or read them again for every query call.
        """
        directory = Path(directory)
        bundle = read_bundle(INDEX_FORMAT, directory)
        manifest, identity = bundle.manifest, bundle.identity
        factors.require_complete()
        _check_block_layouts(directory, identity, factors)
        if factors_identity(factors, identity.get("options", {}).get("preconditioner", "index")) != \
                identity.get("factors"):
            raise GradientIndexError(
                f"the index in '{directory}' was built with other factors (other statistics, damping or strategy); "
                "open it with the factors it was built from, or rebuild it (build_index) with these"
            )
        if model is not None and weights_fingerprint(model) != identity.get("weights"):
            raise GradientIndexError(
                f"the index in '{directory}' was built on other model weights; rebuild it for this model"
            )
        options = IndexOptions(**identity["options"])
        compression = Compression.from_tensors(bundle.tensors(manifest.get("compression_file")), factors, options)
        shards: list[dict] = []
        for rank in range(int(manifest.get("world_size", 1))):
            fmt = rank_format(rank)
            state = read_bundle(fmt, directory) if (directory / fmt.manifest).exists() else None
            if state is None or state.identity != identity or not state.manifest.get("complete"):
                raise GradientIndexError(
                    f"the index in '{directory}' is unfinished (rank {rank} has not completed its share); "
                    "run build_index again with the same arguments to resume it"
                )
            for shard in state.manifest["shards"]:
                shards.append({"bundle": state, "file": shard["file"], "rows": shard["rows"]})
        examples, digests = [], []
        for shard in shards:
            tensors = _read_shard(shard)
            examples.append(tensors["examples"])
            digests.append(tensors["digests"])
            if in_memory:
                shard["vectors"], shard["examples"] = tensors["vectors"], tensors["examples"]
        examples_all = torch.cat(examples)
        n = examples_all.numel()
        if not torch.equal(torch.sort(examples_all).values, torch.arange(n)):
            raise GradientIndexError(f"the index in '{directory}' does not hold examples 0..{n - 1} exactly once; "
                                     "rebuild it")
        if data is not None:
            digests_all = torch.cat(digests)
            theirs_examples, theirs_digests, start = [], [], 0
            for item in data:
                idx, batch = item if indexed else (None, item)
                b = len(idx) if idx is not None else batch_size_of(batch)
                theirs_examples.append(torch.as_tensor(idx).long() if idx is not None else torch.arange(start, start + b))
                theirs_digests.append(example_digests(batch, b))
                start += b
            if not theirs_examples or digests_fingerprint(torch.cat(theirs_examples), torch.cat(theirs_digests)) != \
                    digests_fingerprint(examples_all, digests_all):
                raise GradientIndexError(
                    f"the index in '{directory}' was built on other training data (other examples or another order); "
                    "rebuild it for this data"
                )
        return cls(directory, manifest, factors, compression, shards, n, in_memory)

    @property
    def width(self) -> int:
        """Numbers per example (all layers)."""
        return self.compression.width

    @property
    def bytes_per_example(self) -> int:
        return self.width * self.options.storage_dtype.itemsize

    def _iter_shards(self):
        for shard in self._shards:
            if "vectors" in shard:
                yield shard["vectors"], shard["examples"]
            else:
                tensors = _read_shard(shard)
                yield tensors["vectors"], tensors["examples"]

    def norms(self) -> torch.Tensor:
        """``[N]`` Euclidean norms of the index rows (float32), in dataset order."""
        if self._norms is None:
            out = torch.empty(self.num_examples)
            for vectors, examples in self._iter_shards():
                out[examples] = vectors.float().norm(dim=1)
            self._norms = out
        return self._norms

    # ------------------------------------------------------------------ scores
    def query_vectors(self, queries: QueryGradients, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``[Q, width]`` compressed query vectors (so that ``query_vector . row`` is the score)."""
        return self.compression.query_vectors(queries, self.factors, dtype)

    def compress_queries(self, scorer, query_batches: Iterable[Any]) -> torch.Tensor:
        """``[Q, width]`` query vectors straight from the query batches, with ``scorer``'s capture and task.

        Cheaper than ``query_vectors(scorer.query_gradients(...))``: the queries' gradients are never
        preconditioned in the parameter basis and rotated back; each layer's tokens are rotated and
        projected directly (docs/method.md, section 7). Use the result with :meth:`scores` / :meth:`top_k`.
        """
        parts: dict[str, list[torch.Tensor]] = {n: [] for n in self.compression.layers}
        dtype = scorer._accumulate_dtype()
        eig = {n: self.compression.eigvecs(self.factors, n, scorer.device, dtype) for n in self.compression.layers}

        def consume(name, a, s):
            if name in parts:
                parts[name].append(self.compression.layers[name].query_from_tokens(a.to(dtype), s.to(dtype), eig[name]))

        for i, batch in enumerate(query_batches):
            scorer.stream(batch, True, consume, batch_index=i)
        missing = [n for n, p in parts.items() if not p]
        if missing:
            raise GradientIndexError(f"no query batch reached layers {missing[:10]}; give at least one query, and a "
                                     "scorer over all the index's layers")
        return torch.cat([torch.cat(parts[n]) for n in self.compression.layers], dim=1).cpu()

    def _check_cosine(self, normalize: bool) -> None:
        if normalize and self.options.preconditioner != "sqrt":
            raise GradientIndexError(
                f"cosine scores need both sides whitened: this index was built with preconditioner="
                f"'{self.options.preconditioner}'. Rebuild it with IndexOptions(preconditioner='sqrt')"
            )

    def _chunks(self, queries: QueryGradients | torch.Tensor, normalize: bool, dtype: torch.dtype):
        """Yield ``(scores [Q, n], examples [n])`` per shard."""
        self._check_cosine(normalize)
        q = queries if isinstance(queries, torch.Tensor) else self.query_vectors(queries, dtype)
        q = q.to(dtype)
        if normalize:
            q = q / q.norm(dim=1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)
            norms = self.norms()
        for vectors, examples in self._iter_shards():
            scores = q @ vectors.to(dtype).T
            if normalize:
                scores = scores / norms[examples].to(dtype).clamp_min(torch.finfo(dtype).tiny)
            yield scores, examples

    def scores(self, queries: QueryGradients | torch.Tensor, normalize: bool = False,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Approximate scores ``[Q, N]`` (dataset order): one matmul per shard.

        ``queries``: :meth:`InfluenceScorer.query_gradients` output (preconditioned with this index's
        factors), or vectors from :meth:`query_vectors`. ``normalize``: cosine scores (needs the
        ``sqrt`` placement). ``dtype``: compute dtype (float64 for tests).
        """
        out = None
        for scores, examples in self._chunks(queries, normalize, dtype):
            if out is None:
                out = torch.empty(scores.shape[0], self.num_examples, dtype=dtype)
            out[:, examples] = scores
        return out

    def top_k(self, queries: QueryGradients | torch.Tensor, k: int, normalize: bool = False,
              rescore: int | None = None, scorer=None, train_loader: DataLoader | None = None,
              dtype: torch.dtype = torch.float32, approximate: bool = False, largest: bool = True,
              query_gradients: QueryGradients | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` most positive (``largest=False``: most negative) scores per query:
        ``(values [Q, k], dataset indices [Q, k])``, ranked from the extreme (ties: lower index first).

        ``queries``: query gradients (``scorer.query_gradients``, preconditioned with this index's
        factors) or query vectors (:meth:`compress_queries` / :meth:`query_vectors`).

        Without ``rescore``: by the index alone. With ``rescore=K`` (``K >= k``): the index proposes the
        ``K`` best candidates per query, and the exact scores of ``scorer`` (an :class:`InfluenceScorer`
        with the index's factors) rank them; only those examples of ``train_loader`` (a ``DataLoader``
        over the indexed, map-style dataset) are run, through a ``Subset`` loader. The exact scores need
        the queries' gradients from that ``scorer``: ``queries`` themselves, or ``query_gradients=`` when
        ``queries`` are vectors. The values returned are then the exact scores.

        ``approximate=True`` finds the first stage's candidates with a faiss HNSW graph (inner product; built
        once per index and kept) instead of the exact matmul: for very large indexes. faiss is an optional
        extra (``pip install faiss-cpu``), never required.
        """
        out = self.top_k_sides(queries, k, ("positive",) if largest else ("negative",), normalize, rescore, scorer,
                               train_loader, dtype, approximate, query_gradients)
        values, indices, _ = out["positive" if largest else "negative"]
        return values, indices

    def top_k_sides(self, queries: QueryGradients | torch.Tensor, k: int, sides=("positive", "negative"),
                    normalize: bool = False, rescore: int | None = None, scorer=None,
                    train_loader: DataLoader | None = None, dtype: torch.dtype = torch.float32,
                    approximate: bool = False, query_gradients: QueryGradients | None = None,
                    token_wise: bool = False) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """:meth:`top_k` for several sides at once: ``{side: (values, indices, token_scores)}``.

        Two-stage rescoring runs the union of every side's candidates through the exact scorer once.
        With ``token_wise`` (two stages only), ``token_scores`` ``[Q, k, T]`` are each final candidate's
        exact token-wise scores (they sum over ``T`` to its value; padding tokens are zero), else ``None``.
        """
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise GradientIndexError(f"k must be a positive integer, got {k!r}")
        bad = [s for s in sides if s not in ("positive", "negative")]
        if bad or not sides:
            raise GradientIndexError(f"sides must be 'positive' and/or 'negative', got {sides!r}")
        k = min(k, self.num_examples)
        first = k
        if rescore is not None:
            if not isinstance(rescore, int) or isinstance(rescore, bool) or rescore < k:
                raise GradientIndexError(f"rescore must be an integer >= k={k} (candidates per query), got {rescore!r}")
            if scorer is None or train_loader is None:
                raise GradientIndexError("two-stage top-k needs the exact scorer and the training dataloader: "
                                         "top_k(..., rescore=K, scorer=InfluenceScorer(...), train_loader=...)")
            exact_queries = query_gradients if query_gradients is not None else queries
            if isinstance(exact_queries, torch.Tensor):
                raise GradientIndexError("rescoring needs the queries' gradients (scorer.query_gradients): pass them "
                                         "as queries, or as query_gradients= beside the query vectors")
            first = min(rescore, self.num_examples)
        elif token_wise:
            raise GradientIndexError("token-wise scores are exact scores: ask for them with two stages (rescore=K)")
        vectors = queries if isinstance(queries, torch.Tensor) else self.query_vectors(queries, dtype)
        proposed = {}
        for side in sides:
            q = vectors if side == "positive" else -vectors  # the most negative scores are the top of -q
            if approximate:
                values, indices = self._faiss_search(q, first, normalize)
            else:
                values = indices = None
                for scores, examples in self._chunks(q, normalize, dtype):
                    values, indices = _merge_top(values, indices, scores, examples, first)
            proposed[side] = (values if side == "positive" else -values, indices)
        if rescore is None:
            return {side: (v[:, :k], i[:, :k], None) for side, (v, i) in proposed.items()}
        return self._rescore(exact_queries, proposed, k, scorer, train_loader, token_wise)

    def _faiss_search(self, queries: QueryGradients | torch.Tensor, k: int, normalize: bool):
        try:
            import faiss
        except ImportError:
            raise GradientIndexError(
                "approximate search needs faiss, an optional extra: pip install faiss-cpu (or use the exact matmul, "
                "approximate=False)"
            ) from None
        self._check_cosine(normalize)
        if getattr(self, "_faiss", None) is None or self._faiss[0] != normalize:
            graph = faiss.IndexHNSWFlat(self.width, 32, faiss.METRIC_INNER_PRODUCT)
            graph.hnsw.efSearch = max(128, 2 * k)
            ids = []
            for vectors, examples in self._iter_shards():
                v = vectors.float()
                if normalize:
                    v = v / v.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
                graph.add(v.contiguous().numpy())
                ids.append(examples)
            self._faiss = (normalize, graph, torch.cat(ids))
        _, graph, ids = self._faiss
        q = (queries if isinstance(queries, torch.Tensor) else self.query_vectors(queries)).float()
        if normalize:
            q = q / q.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        graph.hnsw.efSearch = max(graph.hnsw.efSearch, 2 * k)
        values, positions = graph.search(q.contiguous().numpy(), k)
        return torch.from_numpy(values), ids[torch.from_numpy(positions).long()]

    def _rescore(self, queries: QueryGradients, proposed: dict, k: int, scorer, train_loader, token_wise: bool):
        if not isinstance(train_loader, DataLoader) or train_loader.batch_size is None:
            raise GradientIndexError(
                "rescoring needs a torch DataLoader with a batch_size over the indexed map-style dataset, to run "
                "only the candidates through a Subset loader"
            )
        if len(train_loader.dataset) != self.num_examples:  # type: ignore[arg-type]
            raise GradientIndexError(f"the training dataset has {len(train_loader.dataset)} examples but the index "
                                     f"{self.num_examples}; pass the dataset the index was built on")
        given = getattr(scorer, "given_factors", scorer.factors)  # not its float32 copy of saved factors
        if given is not self.factors and factors_identity(given, "index") != factors_identity(self.factors, "index"):
            raise GradientIndexError("the rescoring scorer uses other factors than the index was opened with; "
                                     "rescore with InfluenceScorer(model, task, <the index's factors>)")
        union = torch.unique(torch.cat([i.flatten() for _, i in proposed.values()]))  # sorted
        exact = self._exact_scores(queries, union, scorer, train_loader, token_wise=False)  # [Q, U]
        out = {}
        for side, (_, candidates) in proposed.items():
            sign = 1.0 if side == "positive" else -1.0
            # Each query ranks only its own candidates, from the extreme; ties: the lower training index first.
            position = torch.searchsorted(union, candidates)  # [Q, K] columns of `exact`
            own = exact.gather(1, position) * sign
            order = torch.sort(candidates, dim=1).indices
            own, cand = own.gather(1, order), candidates.gather(1, order)
            best = torch.sort(own, dim=1, descending=True, stable=True).indices[:, :k]
            values, indices = own.gather(1, best) * sign, cand.gather(1, best)
            tokens = self._final_token_scores(queries, indices, scorer, train_loader) if token_wise else None
            out[side] = (values, indices, tokens)
        return out

    def _exact_scores(self, queries: QueryGradients, examples: torch.Tensor, scorer, train_loader,
                      token_wise: bool) -> torch.Tensor:
        """Exact scores ``[Q, U]`` (token-wise ``[Q, U, T]``) of the training ``examples`` (sorted, unique)."""
        subset = DataLoader(Subset(train_loader.dataset, examples.tolist()), batch_size=train_loader.batch_size,
                            shuffle=False, collate_fn=train_loader.collate_fn, num_workers=train_loader.num_workers)
        parts = [scorer.score_batch(queries, batch, batch_index=i, token_wise=token_wise).sum(0).cpu()
                 for i, batch in enumerate(subset)]
        if token_wise:
            t_max = max(p.shape[-1] for p in parts)
            parts = [torch.nn.functional.pad(p, (0, t_max - p.shape[-1])) for p in parts]
        return torch.cat(parts, dim=1)

    def _final_token_scores(self, queries: QueryGradients, indices: torch.Tensor, scorer, train_loader):
        """``[Q, k, T]``: each query's token-wise scores of its own final candidates."""
        union = torch.unique(indices)
        tokens = self._exact_scores(queries, union, scorer, train_loader, token_wise=True)  # [Q, U, T]
        position = torch.searchsorted(union, indices)  # [Q, k]
        return tokens.gather(1, position.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def _merge_top(values, indices, scores: torch.Tensor, examples: torch.Tensor, k: int):
    """Keep the ``k`` largest of the running ``values`` and a new shard's ``scores`` (ties: lower index first).

    Shards of several ranks interleave in example index, so this does not need them in order."""
    rows = examples.unsqueeze(0).expand(scores.shape[0], -1)
    if values is not None:
        scores, rows = torch.cat([values, scores], 1), torch.cat([indices, rows], 1)
    by_index = torch.argsort(rows, dim=1)
    scores, rows = scores.gather(1, by_index), rows.gather(1, by_index)
    best = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    return scores.gather(1, best), rows.gather(1, best)


def _check_block_layouts(directory: Path, identity: dict, factors: InfluenceFactors) -> None:
    """Refuse factors whose sides are split into other blocks than the index's (docs/method.md, section 6),
    naming the layer and both layouts: the eigenbasis coordinates of the index are those of its blocks."""
    built = identity.get("blocks")
    if built is None:  # an index written before layouts were recorded: the factors' identity still decides
        return
    theirs = block_layouts(factors)

    def say(blocks):
        return " and ".join(f"{side} {'dense' if b is None else f'in blocks of {b}'}"
                            for side, b in zip(("output side", "input side"), blocks))

    for name in sorted(set(built) | set(theirs)):
        ours, other = built.get(name), theirs.get(name)
        if ours != other and ours is not None and other is not None:
            raise GradientIndexError(
                f"the index in '{directory}' was built from factors with layer '{name}' kept {say(ours)}, but these "
                f"factors keep it {say(other)}; open it with the factors it was built from (fitted with the same "
                "block_size and block_threshold), or rebuild it (build_index) with these"
            )


def _read_shard(shard: dict) -> dict[str, torch.Tensor]:
    """A shard's tensors, after the store checked its checksum."""
    return shard["bundle"].tensors(shard["file"])
