"""Influence scores from captured activations/gradients and fitted factors.

Sign convention (``docs/method.md``, section 1)::

    score(q, m) = grad f(z_q)^T (G + lambda I)^-1 grad(-L(z_m))

so with ``P_q = (G + lambda I)^-1 grad f(z_q)`` (the preconditioned query gradient)
and ``DW_m = grad L(z_m) = sum_t s_t a_t^T``, ``score_l(q, m) = -<P_q, DW_m>`` per layer,
summed over layers. Self-influence is ``grad L^T (G + lambda I)^-1 grad L`` (>= 0).

Preconditioned query gradients may be kept at full rank or, for query batching, as
a rank-r factorisation ``P ~ U V^T`` (from an SVD); scores then never form the
training gradient: ``score_l = -sum_t (U^T s_t) . (V^T a_t)``, which is also the
token-wise decomposition.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import nn

from lightning_influence.errors import FactorsError, TaskInputError
from lightning_influence.factors import InfluenceFactors
from lightning_influence.tasks import checked_loss, Task
from lightning_influence.capture import (model_mode, per_example_chunk, per_example_gradients, LayerCapture, TrackedLayer,
                                         find_tracked_layers)
from lightning_influence.errors import InfluenceError, ScoringError
from lightning_influence.scoring.queries import QUERY_SVD_METHODS, QueryGradients, low_rank_factorize
from lightning_influence.memory import release_freed_memory, trim_heap

__all__ = ["InfluenceScorer"]

_CHUNK_ELEMENTS = 1 << 26  # reconstructed U V^T per query chunk: at most 64M elements (256 MB in float32)


def _dense_cheaper(b: int, t: int, d_out: int, d_in: int, q: int, r: int) -> bool:
    """Whether DW-then-dot beats the token-wise low-rank contraction, in multiply-adds."""
    tokens = b * t * q * r * (d_out + d_in + 1)
    dense = b * t * d_out * d_in + q * d_out * d_in * r + q * b * d_out * d_in
    return dense < tokens


def _full_rank_tokens_cheaper(b: int, t: int, d_out: int, d_in: int, q: int) -> bool:
    """Whether ``sum_t s_t^T P_q a_t`` beats forming ``DW`` then ``<P_q, DW>``, in multiply-adds:
    ``Q B T d_out (d_in + 1)`` against ``B d_out d_in (T + Q)`` (true for one query, or one token)."""
    return q * t * d_out * (d_in + 1) < d_out * d_in * (t + q)


def _pair_dot(p: torch.Tensor, dw: torch.Tensor) -> torch.Tensor:
    """``<P_q, DW_b>`` for all pairs ``[Q, B]`` as one matmul (einsum takes a ~10x slower path here)."""
    return p.reshape(p.shape[0], -1) @ dw.reshape(dw.shape[0], -1).T


def _query_chunks(u: torch.Tensor, v: torch.Tensor):
    step = max(1, _CHUNK_ELEMENTS // (u.shape[1] * v.shape[1]))
    return u.split(step), v.split(step)


class InfluenceScorer:
    """Computes influence of training examples on queries for one model, task and set of factors.

    Args:
        model: the trained network (its weights are only read).
        task: how batches become losses and measurements.
        factors: complete :class:`InfluenceFactors` for this model.
        device: where to compute (default: the model's device).
        score_dtype: compute dtype for gradients and scores, a ``torch.dtype`` or its name (float32
            default; float64 for tests; bf16/fp16 trade accuracy for speed, accumulation stays float32);
            the same name as ``ScoreOptions.score_dtype``.
        layers: optional subset of the factors' layers to score with (e.g. MLP layers only).
        query_rank: ``None`` for full-rank preconditioned queries, an int for rank-r query batching.
        query_svd: how rank-r queries are factorised: ``"randomized"`` (default, ``torch.svd_lowrank``)
            or ``"exact"`` (truncated full SVD); the approximation error is reported exactly either way.
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        factors: InfluenceFactors,
        device: torch.device | str | None = None,
        score_dtype: torch.dtype | str = torch.float32,
        layers: Iterable[str] | None = None,
        query_rank: int | None = None,
        query_svd: str = "randomized",
    ):
        factors.require_complete()
        if query_svd not in QUERY_SVD_METHODS:
            raise ScoringError(f"query_svd must be one of {QUERY_SVD_METHODS}, got {query_svd!r}")
        names = {n for n, _ in model.named_modules()}
        missing = [n for n in factors.layers if n not in names]
        if missing:
            raise FactorsError(
                f"these factors come from another model: its modules {missing[:10]} are not in "
                f"{type(model).__name__}. Refit the factors for this model (or pass the network the factors "
                "were fitted on, e.g. the LightningModule rather than its inner network)"
            )
        tracked = find_tracked_layers(model, list(factors.layers), None) if factors.layers else {}
        factors.check_model(tracked)
        if layers is not None:
            layers = list(layers)
            unknown = [n for n in layers if n not in factors.layers]
            if unknown:
                raise ScoringError(f"layers {unknown} are not in the factors; they hold {list(factors.layers)}")
            tracked = {n: tracked[n] for n in factors.layers if n in layers}
        if query_rank is not None and (not isinstance(query_rank, int) or query_rank < 1):
            raise ScoringError(f"query_rank must be a positive integer or None, got {query_rank!r}")
        if query_rank is not None and tracked:
            # Each layer keeps min(query_rank, d_out, d_in) (a smaller layer stays exact); a rank
            # beyond every layer buys nothing over full rank and is almost surely a mistake.
            widest = max(tracked.values(), key=lambda l: min(l.shape))
            if query_rank > min(widest.shape):
                raise ScoringError(
                    f"query_rank={query_rank} exceeds the rank of every scored layer (the largest, "
                    f"'{widest.name}' {widest.d_out}x{widest.d_in}, allows at most {min(widest.shape)}); "
                    f"use query_rank<={min(widest.shape)}, or query_rank=None for exact full-rank queries"
                )
        self.model = model
        self.task = task
        self.given_factors = factors  # what the caller passed; identities compare against it
        self._factors: InfluenceFactors | None = None
        self.layers: dict[str, TrackedLayer] = tracked
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        from lightning_influence.options import SCORE_DTYPES, as_dtype  # noqa: PLC0415 (options imports scoring)

        try:
            self.score_dtype = as_dtype(score_dtype, "score_dtype", SCORE_DTYPES)
        except InfluenceError as err:
            raise ScoringError(str(err)) from None
        self.query_rank = query_rank
        self.query_svd = query_svd

    @property
    def factors(self) -> InfluenceFactors:
        """The factors scoring preconditions with: saved float64 factors read again in float32 where scoring
        is in float32 (:meth:`InfluenceFactors.in_dtype`: the float64 statistics never enter memory beside
        their float32 copies; same damping, same fingerprint); otherwise the factors given."""
        if self._factors is None:
            given = self.given_factors
            self._factors = given if self.score_dtype == torch.float64 else given.in_dtype(torch.float32)
        return self._factors

    def release_factors(self) -> None:
        """Let go of what scoring made of the factors (their float32 copy or prepared tensors) until next needed.

        Scoring training examples against queries already preconditioned needs no factors, so after
        :meth:`query_gradients` they need not stay beside the queries (on GPT-2 small, 1.9 GB)."""
        if self._factors is not None and self._factors is not self.given_factors:
            self._factors = None
        else:
            self.given_factors.release_prepared()

    @property
    def dtype(self) -> torch.dtype:
        """The scoring compute dtype (``score_dtype``)."""
        return self.score_dtype

    @property
    def layer_names(self) -> list[str]:
        return list(self.layers)

    # ------------------------------------------------------------- capture
    def _accumulate_dtype(self) -> torch.dtype:
        return torch.float32 if self.dtype in (torch.float16, torch.bfloat16) else self.dtype

    def stream(self, batch: Any, query: bool, consume: Callable[[str, torch.Tensor, torch.Tensor], None],
               batch_index: int = 0) -> None:
        """Run one batch and call ``consume(name, a, s)`` per layer during its backward.

        ``a`` ``[B, T, d_in]`` and ``s`` ``[B, T, d_out]`` are the layer's activations and output
        gradients, batch-first whatever the layer's layout, with padding tokens zeroed (the capture
        maps the task's token mask onto each layer's positions); each layer's tensors are released
        after its call, so a batch never holds every layer's at once. ``query=True`` differentiates the task's
        measurement (query side), otherwise the training loss with the dataset's targets.
        """
        from lightning.fabric.utilities.apply_func import move_data_to_device  # lazy: importing Lightning is slow
        batch = move_data_to_device(batch, self.device)
        if query:
            counts = self.task.query_target_count(batch)
            if counts is not None and (counts == 0).any():
                bad = torch.nonzero(counts == 0).flatten().tolist()
                raise TaskInputError(
                    f"query batch {batch_index}: queries at positions {bad} have no target token (all labels -100); "
                    "each query needs at least one completion token to measure"
                )
        with model_mode(self.model, train=False), torch.enable_grad():
            # The capture checks each layer's batch axis and zeroes padding per layer (its token positions).
            with LayerCapture(self.model, self.layers, dtype=self._accumulate_dtype(),
                              batch_size=self.task.batch_size(batch), token_mask=self.task.token_mask(batch)) as cap:
                if query:
                    value = checked_loss(self.task.measurement(self.model, batch), batch_index, "query measurement")
                else:
                    value = checked_loss(self.task.train_loss(self.model, batch, sample=False), batch_index)
                cap.backward(value, consume)

    # ------------------------------------------------------------- queries
    def query_gradients(self, batches: Iterable[Any]) -> QueryGradients:
        """Compute and precondition the gradients of every query (once), optionally at low rank."""
        full: dict[str, list] = {n: [] for n in self.layers}
        counts: list[int] = []
        # The factors are read and prepared before the first query's forward, so that what reading them
        # frees is handed back before the queries' activations and gradients are allocated around it.
        self.factors.prepare(self.layers, self.device, self.dtype)
        release_freed_memory()

        def consume(name, a, s):
            if self.query_rank is None:
                p = self.factors.precondition_tokens(name, a, s)  # rotates the tokens first where that is cheaper
            else:
                # Factorise per layer and a few queries at a time: the full-rank gradients of a batch of queries
                # never coexist (a 32000 x 512 head's are 65 MB a query).
                step = per_example_chunk(a.shape[0], s.shape[-1], a.shape[-1])
                parts = []
                for i in range(0, a.shape[0], step):
                    p = self.factors.precondition_tokens(name, a[i:i + step], s[i:i + step])
                    parts.append(low_rank_factorize(p, min(self.query_rank, *p.shape[1:]), self.query_svd))
                    del p
                p = tuple(torch.cat([part[k] for part in parts]) for k in range(3)) if len(parts) > 1 else parts[0]
            full[name].append(p)
            if len(counts) < len(full[name]):
                counts.append(a.shape[0])
            # The layer's activations were just freed while its preconditioned gradients (often larger than the
            # allocator's mmap threshold) were made: hand them back now, or a batch of queries' whole forward stays
            # resident beside every query gradient (on GPT-2 small, 2 GB of the scoring peak).
            trim_heap()

        for i, batch in enumerate(batches):
            self.stream(batch, True, consume, batch_index=i)
        num = sum(counts)
        if num == 0:
            raise ScoringError("the query dataloader is empty; give at least one query")
        out = QueryGradients(self.layer_names, num)
        for name in self.layers:
            chunks = full.pop(name)  # free each layer's chunks as soon as it is concatenated
            if self.query_rank is not None:
                out.left[name] = torch.cat([c[0] for c in chunks])
                out.right[name] = torch.cat([c[1] for c in chunks])
                out.errors[name] = torch.cat([c[2] for c in chunks])
                continue
            out.full[name] = torch.cat(chunks) if len(chunks) > 1 else chunks[0]
            del chunks
        if self.query_rank is not None:
            out.rank = self.query_rank
        # The queries are preconditioned: scoring the training data needs the factors no more, and the queries'
        # batches are done: their freed memory goes back to the system rather than stay with the C allocator.
        self.release_factors()
        release_freed_memory()
        return out

    # ------------------------------------------------------------- scoring
    def score_layer(self, queries: QueryGradients, name: str, a: torch.Tensor, s: torch.Tensor,
                    token_wise: bool = False) -> torch.Tensor:
        """One layer's scores ``[Q, B]`` (or token-wise ``[Q, B, T]``) from its training tokens ``a``, ``s``."""
        cd = self.dtype
        acc = self._accumulate_dtype()  # float32 for bf16/fp16 compute; float32/float64 stay as they are
        a, s = a.to(cd), s.to(cd)
        if queries.low_rank:
            u, v = queries.left[name].to(cd), queries.right[name].to(cd)
            if not token_wise and _dense_cheaper(a.shape[0], a.shape[1], u.shape[1], v.shape[1], u.shape[0],
                                                 u.shape[2]):
                # Short sequences: forming DW and U V^T (in query chunks) costs fewer flops.
                dw = per_example_gradients(a, s)
                return torch.cat([-_pair_dot(uc @ vc.transpose(1, 2), dw).to(acc)
                                  for uc, vc in zip(*_query_chunks(u, v))])
            # (U^T s_t) . (V^T a_t): [Q, B, T, r] each; never forms the training gradient.
            su = torch.einsum("bto,qor->qbtr", s, u)
            av = torch.einsum("bti,qir->qbtr", a, v)
            tok = -(su.to(acc) * av.to(acc)).sum(-1)
            return tok if token_wise else tok.sum(-1)
        p = queries.full[name].to(cd)
        if token_wise:
            pa = torch.einsum("qoi,bti->qbto", p, a)
            return -(pa.to(acc) * s.to(acc).unsqueeze(0)).sum(-1)
        if _full_rank_tokens_cheaper(a.shape[0], a.shape[1], p.shape[1], p.shape[2], p.shape[0]):
            # sum_t s_t^T P_q a_t: one query (or one token) needs no DW [B, d_out, d_in] at all.
            pa = (a.reshape(-1, a.shape[-1]) @ p.reshape(-1, p.shape[-1]).T).reshape(*a.shape[:2], p.shape[0], -1)
            return -torch.einsum("btqo,bto->qb", pa.to(acc), s.to(acc))
        return -_pair_dot(p, per_example_gradients(a, s)).to(acc)

    def _stack_layers(self, per_layer: dict[str, torch.Tensor], token_wise: bool) -> torch.Tensor:
        out = [per_layer[n] for n in self.layers]
        if token_wise:
            t_max = max(x.shape[-1] for x in out)
            out = [torch.nn.functional.pad(x, (0, t_max - x.shape[-1])) for x in out]
        return torch.stack(out)

    def score_batch(self, queries: QueryGradients, batch: Any, batch_index: int = 0,
                    token_wise: bool = False) -> torch.Tensor:
        """Layer-wise scores ``[L, Q, B]`` of one training batch against the queries."""
        per_layer: dict[str, torch.Tensor] = {}

        def consume(name, a, s):
            per_layer[name] = self.score_layer(queries, name, a, s, token_wise)

        self.stream(batch, False, consume, batch_index)
        return self._stack_layers(per_layer, token_wise)

    def self_score_batch(self, batch: Any, batch_index: int = 0) -> torch.Tensor:
        """Layer-wise self-influence ``[L, B]`` of one training batch."""
        per_layer: dict[str, torch.Tensor] = {}

        def consume(name, a, s):
            # Short sequences are rotated into the eigenbasis as tokens, before DW is formed (fewer flops).
            per_layer[name] = self.factors.inverse_quadratic_tokens(name, a.to(self.dtype), s.to(self.dtype)
                                                                    ).to(self._accumulate_dtype())

        self.stream(batch, False, consume, batch_index)
        return self._stack_layers(per_layer, False)

    # -------------------------------------------------------- whole loaders
    def pairwise_scores(self, query_batches: Iterable[Any], train_batches: Iterable[Any],
                        per_layer: bool = False, progress: Callable[[int], None] | None = None) -> torch.Tensor:
        """Scores ``[Q, N]`` (or ``[L, Q, N]`` with ``per_layer``), training examples in loader order."""
        queries = self.query_gradients(query_batches)
        chunks = []
        for i, batch in enumerate(train_batches):
            chunks.append(self.score_batch(queries, batch, batch_index=i).cpu())
            if progress is not None:
                progress(chunks[-1].shape[-1])
        if not chunks:
            raise ScoringError("the training dataloader is empty")
        scores = torch.cat(chunks, dim=-1)
        return scores if per_layer else scores.sum(0)

    def self_scores(self, train_batches: Iterable[Any], per_layer: bool = False) -> torch.Tensor:
        """Self-influence ``[N]`` (or ``[L, N]``) of every training example, in loader order."""
        chunks = [self.self_score_batch(b, batch_index=i).cpu() for i, b in enumerate(train_batches)]
        if not chunks:
            raise ScoringError("the training dataloader is empty")
        scores = torch.cat(chunks, dim=-1)
        return scores if per_layer else scores.sum(0)
