"""Block-diagonal sides for wide layers (docs/method.md, section 6).

A K-FAC side (the activation side A, ``d_in x d_in``, or the output-gradient side S,
``d_out x d_out``) whose dimension ``d`` is too large for a dense ``d x d`` covariance is kept
as ``k`` diagonal blocks of size ``b`` (the last one shorter when ``b`` does not divide ``d``):
``A ~ blockdiag(A_1, ..., A_k)``. Each block is eigendecomposed on its own, so the eigenbasis is
block-diagonal and still orthogonal, and a rotation costs ``d * b`` instead of ``d^2``. With one
block it is the ordinary dense side, stored as ``[d, d]``; with several, as ``[k, b, b]``.

The last block is stored zero-padded to ``b``; its eigenbasis is the eigenbasis of the real
``r x r`` part, embedded with the identity on the padding (and zero eigenvalues there), so
padded coordinates never mix with real ones and rotating a zero-padded vector keeps the
padding at zero: every operation here is exact on the real coordinates.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lightning_influence.errors import OptionsError

__all__ = ["SideLayout", "side_layout", "check_block_options", "check_eigh_dtype", "DEFAULT_BLOCK_SIZE",
           "DEFAULT_BLOCK_THRESHOLD", "EIGH_DTYPES", "DEFAULT_EIGH_DTYPE"]

# Sides wider than 8192 are kept as blocks of 1024: every side of GPT-2 (768, 3072) and Llama-7B's
# attention (4096) stays dense, while a 50257-wide head or a 14336-wide MLP side costs d * 1024
# numbers (419 MB in float64 for 50257) instead of d^2 (20 GB). Measured on an 8192-wide head
# against dense factors (docs/benchmarks.md, section 9): score Pearson 0.9974 with blocks of 2048,
# 0.9960 with 1024, 0.9941 with 512, while the fit took 11.0, 3.8 and 1.9 s: per token, a block
# costs b multiply-adds per output coordinate in each pass, against d_in in the layer's forward.
# The memory plan (memory.py) takes the same two options.
DEFAULT_BLOCK_SIZE = 1024
DEFAULT_BLOCK_THRESHOLD = 8192
# The dtype each side's covariance is eigendecomposed in (``eigh_dtype``): float64 by default, as Kronfluence's
# ``eigendecomposition_dtype``; float32 takes about a third of the CPU time at GPT-2's widths but leaves the small
# eigenvalues' directions unresolved: scores a little off (benchmarks/eigh_dtype.py, docs/method.md, section 2).
EIGH_DTYPES = (torch.float64, torch.float32)
DEFAULT_EIGH_DTYPE = torch.float64


def check_block_options(block_size: int | None, block_threshold: int | None) -> None:
    """Raise :class:`~lightning_influence.errors.OptionsError` unless both are positive integers or ``None``."""
    for name, value in (("block_size", block_size), ("block_threshold", block_threshold)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise OptionsError(f"{name} must be a positive integer or None, got {value!r} (block_size=None keeps "
                               f"every side dense; block_threshold=None blocks every side wider than block_size)")


def check_eigh_dtype(value: torch.dtype | str) -> torch.dtype:
    """``value`` (``torch.float64``/``torch.float32`` or its name) as a ``torch.dtype``; else :class:`OptionsError`."""
    dtype = getattr(torch, value.removeprefix("torch."), None) if isinstance(value, str) else value
    if dtype not in EIGH_DTYPES:
        raise OptionsError(f"eigh_dtype must be float64 (the default) or float32 (a torch.dtype or its name), "
                           f"got {value!r}")
    return dtype


def side_layout(dim: int, block_size: int | None, block_threshold: int | None) -> "SideLayout":
    """The layout of a side of dimension ``dim``: blocks of ``block_size`` when ``dim`` exceeds
    ``block_threshold`` (``None``: any side wider than ``block_size``), dense otherwise or when
    ``block_size`` is ``None``."""
    blocked = block_size is not None and (block_threshold is None or dim > block_threshold)
    return SideLayout(dim, block_size if blocked else None)


# A dense side at least this wide has its Gram matrix formed a panel of rows at a time, upper triangle only.
SYMMETRIC_GRAM_MIN_DIM = 1536
SYMMETRIC_GRAM_PANEL = 768


def symmetric_gram(x: torch.Tensor) -> torch.Tensor:
    """``x^T x`` for ``x`` ``[N, d]``: one matrix product where ``d`` is small; for a wide side, panels of
    rows of the upper triangle (``x_i^T x_{i:}``) mirrored below, which skips about a third of the
    multiply-adds a general matrix product spends on a symmetric result (BLAS's syrk is not exposed)."""
    d = x.shape[-1]
    if d < SYMMETRIC_GRAM_MIN_DIM:
        return x.T @ x
    out = torch.empty(d, d, dtype=x.dtype, device=x.device)
    for start in range(0, d, SYMMETRIC_GRAM_PANEL):
        stop = min(start + SYMMETRIC_GRAM_PANEL, d)
        panel = x[:, start:stop].T @ x[:, start:]  # rows start:stop, columns start:
        out[start:stop, start:] = panel
        out[stop:, start:stop] = panel[:, stop - start:].T
    return out


class SideLayout:
    """How one side of dimension ``dim`` is split: ``num_blocks`` blocks of ``block`` coordinates.

    ``block_size=None`` (or at least ``dim``) is the dense side.
    """

    def __init__(self, dim: int, block_size: int | None = None):
        if block_size is not None and (not isinstance(block_size, int) or block_size < 1):
            raise ValueError(f"block_size must be a positive integer or None, got {block_size!r}")
        self.dim = int(dim)
        self.block = self.dim if block_size is None or block_size >= dim else int(block_size)
        self.num_blocks = math.ceil(self.dim / self.block)
        self.padded = self.num_blocks * self.block

    @classmethod
    def of(cls, matrix: torch.Tensor, dim: int) -> "SideLayout":
        """The layout of a stored covariance or eigenbasis ``matrix`` of a side of dimension ``dim``
        (``[dim, dim]``: dense; ``[k, b, b]``: blocks of ``b``)."""
        if matrix.dim() == 2 and tuple(matrix.shape) == (dim, dim):
            return cls(dim)
        if matrix.dim() == 3 and matrix.shape[1] == matrix.shape[2] and matrix.shape[0] == math.ceil(dim / matrix.shape[1]):
            return cls(dim, int(matrix.shape[1]))
        raise ValueError(f"a side of dimension {dim} cannot be stored as a {tuple(matrix.shape)} matrix")

    @property
    def dense(self) -> bool:
        return self.num_blocks == 1

    def __repr__(self) -> str:
        return f"SideLayout(dim={self.dim}, blocks={self.num_blocks}x{self.block})"

    def __eq__(self, other) -> bool:
        return isinstance(other, SideLayout) and (self.dim, self.block) == (other.dim, other.block)

    # ------------------------------------------------------------ shapes
    @property
    def matrix_shape(self) -> tuple[int, ...]:
        """Shape of a covariance or eigenbasis of this side."""
        return (self.dim, self.dim) if self.dense else (self.num_blocks, self.block, self.block)

    @property
    def vector_shape(self) -> tuple[int, ...]:
        """Shape of the eigenvalues of this side (padding included when blocked)."""
        return (self.dim,) if self.dense else (self.num_blocks, self.block)

    def matrix_elements(self) -> int:
        return self.dim * self.dim if self.dense else self.num_blocks * self.block * self.block

    # ------------------------------------------------------------ blocks of vectors
    def _split(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., dim]`` -> ``[..., k, b]`` (zero-padded)."""
        if self.padded != self.dim:
            x = F.pad(x, (0, self.padded - self.dim))
        return x.reshape(*x.shape[:-1], self.num_blocks, self.block)

    def _join(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., k, b]`` -> ``[..., dim]`` (padding dropped)."""
        return x.reshape(*x.shape[:-2], self.padded)[..., : self.dim]

    # ------------------------------------------------------------ statistics
    def outer_sum(self, x: torch.Tensor) -> torch.Tensor:
        """``sum_n x_n x_n^T`` restricted to the diagonal blocks, for tokens ``x`` ``[N, dim]``."""
        if self.dense:
            return symmetric_gram(x)
        xb = self._split(x).transpose(0, 1)  # [k, N, b]
        return xb.transpose(1, 2) @ xb

    def eigh(self, total: torch.Tensor, count: torch.Tensor | float,
             dtype: torch.dtype = torch.float64, out: torch.Tensor | None = None,
             eigh_dtype: torch.dtype = DEFAULT_EIGH_DTYPE) -> tuple[torch.Tensor, torch.Tensor]:
        """Eigenvalues and eigenvectors of the mean covariance ``total / count``, block by block,
        computed in ``eigh_dtype`` (float64 or float32) and returned in ``dtype``.

        Each block is symmetrised, ``(C + C^T) / 2`` with ``C = total / count``, in one new ``eigh_dtype``
        matrix of its own (a ``total`` already in that dtype is not copied first), so a blocked side never holds
        more than one block's input and workspace beside its results. With ``out`` (``total``
        itself, its sums no longer needed), each block's eigenvectors are written into it as soon
        as that block is decomposed: the side's eigenbasis takes no memory beyond its sums'.
        """
        if self.dense:
            vals, vecs = self._eigh_block(total, count, eigh_dtype)
            if out is not None:
                return vals.to(dtype), out.copy_(vecs)
            return vals.to(dtype), vecs.to(dtype)
        vals = torch.zeros(self.num_blocks, self.block, dtype=dtype, device=total.device)
        vecs = out if out is not None else torch.zeros(self.num_blocks, self.block, self.block, dtype=dtype,
                                                         device=total.device)
        r = self.dim - (self.num_blocks - 1) * self.block  # real coordinates of the last block
        for k in range(self.num_blocks):
            if k < self.num_blocks - 1 or r == self.block:
                vals[k], block = self._eigh_block(total[k], count, eigh_dtype)
                vecs[k] = block
            else:  # the short last block: its real part only, identity on the padding
                vals[k, :r], block = self._eigh_block(total[k, :r, :r], count, eigh_dtype)
                vecs[k].zero_()
                vecs[k, :r, :r] = block
                vecs[k, r:, r:] = torch.eye(self.block - r, dtype=vecs.dtype, device=total.device)
            del block
        return vals, vecs

    @staticmethod
    def _eigh_block(total: torch.Tensor, count: torch.Tensor | float,
                    eigh_dtype: torch.dtype = DEFAULT_EIGH_DTYPE) -> tuple[torch.Tensor, torch.Tensor]:
        if eigh_dtype == torch.float64:
            total = total.to(torch.float64)
            cov = total + total.transpose(-1, -2)
        else:  # symmetrised straight into the lower dtype: no full-size copy of the block in the sums' dtype
            cov = torch.add(total, total.transpose(-1, -2),
                            out=torch.empty(total.shape, dtype=eigh_dtype, device=total.device))
        cov.mul_(0.5 / count)
        vals, vecs = torch.linalg.eigh(cov)
        return vals, vecs.contiguous()  # eigh returns column-major; saved files are row-major

    def eigenvalues(self, vals: torch.Tensor) -> torch.Tensor:
        """The ``[dim]`` eigenvalues in coordinate order (padding dropped)."""
        return vals if self.dense else vals.reshape(-1)[: self.dim]

    # ------------------------------------------------------------ rotations
    def rotate(self, x: torch.Tensor, vecs: torch.Tensor, axis: int = -1) -> torch.Tensor:
        """``Q^T x`` along ``axis`` of ``x`` (the coordinates of ``x`` in the eigenbasis)."""
        return self._apply(x, vecs, axis, transpose=False)

    def unrotate(self, x: torch.Tensor, vecs: torch.Tensor, axis: int = -1) -> torch.Tensor:
        """``Q x`` along ``axis``: back from eigenbasis coordinates."""
        return self._apply(x, vecs, axis, transpose=True)

    def _apply(self, x: torch.Tensor, vecs: torch.Tensor, axis: int, transpose: bool) -> torch.Tensor:
        moved = axis not in (-1, x.dim() - 1)
        if moved:
            x = x.movedim(axis, -1)
        if self.dense:
            y = x @ (vecs.T if transpose else vecs)
        else:
            xb = self._split(x)  # [..., k, b]
            lead = xb.shape[:-2]
            xb = xb.reshape(-1, self.num_blocks, self.block).transpose(0, 1)  # [k, M, b]
            yb = xb @ (vecs.transpose(1, 2) if transpose else vecs)
            y = self._join(yb.transpose(0, 1).reshape(*lead, self.num_blocks, self.block))
        return y.movedim(-1, axis) if moved else y

    def dense_matrix(self, blocks: torch.Tensor) -> torch.Tensor:
        """The explicit ``[dim, dim]`` matrix of a blocked covariance or eigenbasis (tests, small sides)."""
        if self.dense:
            return blocks
        return torch.block_diag(*blocks)[: self.dim, : self.dim]
