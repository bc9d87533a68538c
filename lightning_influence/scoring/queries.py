"""Preconditioned query gradients, at full rank or as a rank-r factorisation ``P ~ U V^T``."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lightning_influence.errors import ScoringError

__all__ = ["QueryGradients", "low_rank_factorize", "QUERY_SVD_METHODS"]


@dataclass
class QueryGradients:
    """Preconditioned query gradients per layer.

    Full rank: ``full[name]`` is ``[Q, d_out, d_in]``. Low rank: ``left[name]`` ``[Q, d_out, r]``
    and ``right[name]`` ``[Q, d_in, r]`` with ``P ~ left @ right^T``; ``errors[name]`` ``[Q]`` is the
    relative Frobenius error of that approximation.
    """

    layer_names: list[str]
    num_queries: int
    full: dict[str, torch.Tensor] = field(default_factory=dict)
    left: dict[str, torch.Tensor] = field(default_factory=dict)
    right: dict[str, torch.Tensor] = field(default_factory=dict)
    rank: int | None = None
    errors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def low_rank(self) -> bool:
        return self.rank is not None

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "QueryGradients":
        conv = lambda d: {k: v.to(device=device, dtype=dtype or v.dtype) for k, v in d.items()}  # noqa: E731
        return QueryGradients(self.layer_names, self.num_queries, conv(self.full), conv(self.left),
                              conv(self.right), self.rank, dict(self.errors))

    def select(self, index: torch.Tensor | list[int]) -> "QueryGradients":
        """The subset of queries at ``index`` (e.g. one query for TF-IDF-filtered scoring)."""
        idx = torch.as_tensor(index, dtype=torch.long)
        pick = lambda d: {k: v[idx.to(v.device)] for k, v in d.items()}  # noqa: E731
        return QueryGradients(self.layer_names, len(idx), pick(self.full), pick(self.left), pick(self.right),
                              self.rank, {k: v[idx] for k, v in self.errors.items()})


QUERY_SVD_METHODS = ("randomized", "exact")


_OVERSAMPLE = 8  # extra random directions of the randomized SVD (Halko et al. 2011 suggest 5-10)
_SKETCH_SEED = 0  # the randomized SVD's random directions: fixed, so the same queries always give the same scores


def _seeded_svd_lowrank(x: torch.Tensor, sketch: int):
    """``torch.svd_lowrank`` with a fixed seed, drawn under ``fork_rng``: the caller's RNG streams are untouched."""
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.random.default_generator.manual_seed(_SKETCH_SEED)
        if x.device.type == "cuda":
            with torch.cuda.device(x.device):
                torch.cuda.manual_seed(_SKETCH_SEED)
        return torch.svd_lowrank(x, q=sketch, niter=1)


def low_rank_factorize(p: torch.Tensor, rank: int, method: str = "randomized"
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-r factorisation ``p ~ U V^T`` of each ``[d_out, d_in]`` matrix in ``p`` ``[Q, d_out, d_in]``.

    ``method="exact"`` truncates a full SVD (the best rank-r approximation);
    ``"randomized"`` uses ``torch.svd_lowrank`` with ``rank + 8`` random directions (drawn from a
    fixed seed without touching the global RNG, so repeated calls agree exactly) and one
    power iteration: 2-4x faster on layer-sized matrices and, for gradients (whose spectra
    decay fast), within about 1% of the best error. Returns ``U`` ``[Q, d_out, r]``, ``V``
    ``[Q, d_in, r]`` and the relative Frobenius error ``||P - U V^T|| / ||P||`` ``[Q]`` of the
    factorisation actually returned.
    """
    if method not in QUERY_SVD_METHODS:
        raise ScoringError(f"query_svd must be one of {QUERY_SVD_METHODS}, got {method!r}")
    q, d_out, d_in = p.shape
    if rank > min(d_out, d_in):
        raise ScoringError(
            f"rank {rank} exceeds what a {d_out}x{d_in} layer allows (at most {min(d_out, d_in)}); "
            "lower the rank (InfluenceScorer's query_rank is clipped per layer, so smaller layers stay exact)"
        )
    x = p.to(torch.float64) if p.dtype in (torch.float16, torch.bfloat16) else p
    energy = x.square().sum((-2, -1)).clamp_min(torch.finfo(x.dtype).tiny)
    sketch = rank + _OVERSAMPLE
    if method == "exact" or sketch >= min(d_out, d_in):
        u, sv, vh = torch.linalg.svd(x, full_matrices=False)
        # ||P - P_r||^2 is the energy of the dropped singular values: no reconstruction needed.
        err = (sv[..., rank:].square().sum(-1) / energy).sqrt()
        u, sv, v = u[..., :rank], sv[..., :rank], vh[..., :rank, :].transpose(-1, -2)
        left = u * sv.unsqueeze(-2)
    else:
        u, sv, v = _seeded_svd_lowrank(x, sketch)
        left, v = u[..., :rank] * sv[..., :rank].unsqueeze(-2), v[..., :rank]
        # The residual itself (||P||^2 - sum s^2 would cancel to noise for good approximations).
        err = ((x - left @ v.transpose(-1, -2)).square().sum((-2, -1)) / energy).sqrt()
    return left.to(p.dtype), v.to(p.dtype), err.to(p.dtype)
