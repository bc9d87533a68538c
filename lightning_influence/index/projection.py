"""How a gradient index compresses one side of the influence inner product (docs/method.md, section 7).

In a K-FAC/EK-FAC layer's eigenbasis, with ``R = Q_S^T G Q_A`` for a gradient ``G`` and
``w = 1 / (Lambda + lambda)``, the score of query ``q`` against training example ``i`` is
``-<R_q * w, R_i>`` (the minus: docs/method.md, section 1). For the diagonal and identity
strategies the "basis" is the parameter basis (``R = G``; ``w`` the diagonal's inverse, or 1).

Per layer, the compression of a gradient is

1. **truncation** (eigenbasis only): keep the rows and columns of ``R`` where the preconditioned
   gradients carry their energy, ranked by the marginals of ``E[R^2] * w``. EK-FAC's ``Lambda``
   *is* ``E[R^2]`` (K-FAC's ``L_S L_A`` estimates it), so no extra statistic is needed;
2. **preconditioner placement**: the index side is multiplied by ``w^alpha`` and the query side by
   ``w^(1-alpha)``: ``alpha=1`` ("index": the index holds preconditioned training gradients),
   ``alpha=1/2`` ("sqrt": both sides whitened, so their cosine is the normalised score) or
   ``alpha=0`` ("query": the index holds raw rotated gradients; the only placement that does not
   need ``Lambda``, so it can be written inside the EK-FAC pass that fits ``Lambda``);
3. a **Kronecker random projection** ``P_S^T X P_A`` with i.i.d. ``N(0, 1/p_S)`` and ``N(0, 1/p_A)``
   entries, which keeps ``<P_S^T X P_A, P_S^T Y P_A>`` an unbiased estimate of ``<X, Y>`` for any
   ``X, Y`` (a ``1/sqrt(d)`` scale would reweight layers by their shapes). A side whose projection
   would be at least as wide as what is kept is not projected: a projection could only add noise.

Projections are drawn from a ``torch.Generator`` seeded per layer (never the global RNG), so a
build inside the EK-FAC pass, a build afterwards, and every rank draw the same matrices.

A side kept as diagonal blocks (docs/method.md, section 6) has a block-diagonal eigenbasis
``Q = diag(Q_1, ..., Q_k)``: its eigenbasis coordinates are the blocks' coordinates one after the
other (:meth:`SideLayout.eigenvalues` order), so truncation ranks directions over the whole side,
across blocks, and a rotation onto the kept directions multiplies each block's slice of the
coordinates by that block's kept eigenvectors only (:class:`SideBasis`): the dense ``d x d``
eigenbasis is never formed.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass

import torch

from lightning_influence.curvature.base import DEFAULT_DAMPING_FACTOR
from lightning_influence.curvature.blocks import SideLayout
from lightning_influence.curvature.ekfac import EKFACStrategy
from lightning_influence.curvature.identity import IdentityStrategy
from lightning_influence.curvature.kfac import KFACStrategy
from lightning_influence.errors import OptionsError
from lightning_influence.factors import InfluenceFactors
from lightning_influence.capture import TrackedLayer
from lightning_influence.scoring.queries import QueryGradients

__all__ = ["IndexOptions", "LayerCompression", "Compression", "SideBasis", "LayerBasis", "block_layouts", "PLACEMENTS",
           "STORAGE_DTYPES"]

# alpha: the power of w = 1/(Lambda + lambda) that the index side carries.
PLACEMENTS = {"index": 1.0, "sqrt": 0.5, "query": 0.0}
PROJECTIONS = ("gaussian", "orthogonal")
# Where a side carries a weight, the per-example rotated gradients R are formed (tokens cannot be projected first);
# at most this many bytes of them at once (a block of output rows at a time beyond it).
WEIGHTED_CHUNK_BYTES = 64 << 20
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16}


@dataclass(frozen=True)
class IndexOptions:
    """How a gradient index compresses and stores training gradients.

    Args:
        projection_dim: per layer and side, the width of the random projection (``p_S = p_A``);
            ``None`` keeps every (kept) coordinate. A layer stores ``p_S * p_A`` numbers per example.
        keep: per layer and side, how many eigenbasis rows (output side) and columns (input side) to keep
            before projecting, ranked by the preconditioned energy; ``None`` keeps all. K-FAC/EK-FAC only
            (diagonal and identity factors have no eigenbasis).
        preconditioner: ``"sqrt"`` (the square root of ``(Lambda + lambda)^-1`` on both sides, the default:
            whitened vectors, which also allow cosine scores), ``"index"`` (all of it on the index side) or
            ``"query"`` (all on the query side; the placement that can be built inside the EK-FAC pass).
        seed: seeds the projections (one ``torch.Generator`` per layer).
        projection: ``"orthogonal"`` (default: Haar-random orthonormal columns scaled by ``sqrt(d/p)``) or
            ``"gaussian"`` (i.i.d. ``N(0, 1/p)`` entries, as in LoGra); both keep projected inner products
            unbiased; the orthogonal one has the lower variance.

    The defaults were chosen by measurement (``benchmarks/index_bench.py``: on the benchmark Llama, 48 x 48
    per layer, under a tenth of the full gradient, agree best with the exact scores with an orthogonal
    projection and the square root of the preconditioner on both sides).
        dtype: storage dtype, ``"float32"`` (default) or ``"float16"`` (half the bytes).
        shard_size: examples per shard file (a shard is closed at the first batch boundary after it).
    """

    projection_dim: int | None = 48
    keep: int | None = None
    preconditioner: str = "sqrt"
    seed: int = 0
    projection: str = "orthogonal"
    dtype: str = "float32"
    shard_size: int = 4096

    def __post_init__(self):
        for field_name in ("projection_dim", "keep"):
            value = getattr(self, field_name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise OptionsError(f"IndexOptions.{field_name} must be a positive integer or None, got {value!r}")
        if self.preconditioner not in PLACEMENTS:
            raise OptionsError(f"IndexOptions.preconditioner must be one of {sorted(PLACEMENTS)}, "
                               f"got {self.preconditioner!r}")
        if isinstance(self.dtype, torch.dtype):  # accept torch dtypes, keep the JSON-able name
            names = {v: k for k, v in STORAGE_DTYPES.items()}
            if self.dtype not in names:
                raise OptionsError(f"IndexOptions.dtype must be float32 or float16, got {self.dtype!r}")
            object.__setattr__(self, "dtype", names[self.dtype])
        if self.dtype not in STORAGE_DTYPES:
            raise OptionsError(f"IndexOptions.dtype must be one of {sorted(STORAGE_DTYPES)}, got {self.dtype!r}")
        if self.projection not in PROJECTIONS:
            raise OptionsError(f"IndexOptions.projection must be one of {PROJECTIONS}, got {self.projection!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise OptionsError(f"IndexOptions.seed must be an integer, got {self.seed!r}")
        if isinstance(self.shard_size, bool) or not isinstance(self.shard_size, int) or self.shard_size < 1:
            raise OptionsError(f"IndexOptions.shard_size must be a positive integer, got {self.shard_size!r}")

    @property
    def storage_dtype(self) -> torch.dtype:
        return STORAGE_DTYPES[self.dtype]

    def to_json(self) -> dict:
        return asdict(self)

    def compression_json(self) -> dict:
        """The options that change the stored vectors (``shard_size`` only changes the file layout)."""
        out = self.to_json()
        out.pop("shard_size")
        return out


def _layer_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def _projection(kind: str, generator: torch.Generator, rows: int, cols: int) -> torch.Tensor:
    """A ``rows x cols`` projection with ``E[P P^T] = I``, which keeps projected inner products unbiased."""
    g = torch.randn(rows, cols, generator=generator, dtype=torch.float64)
    if kind == "gaussian":
        return g / math.sqrt(cols)  # i.i.d. N(0, 1/cols)
    # Haar-random orthonormal columns scaled by sqrt(rows/cols): E[P P^T] = (rows/cols)(cols/rows) I = I, and
    # no norm fluctuation between columns (lower variance than i.i.d. entries when cols is a fair part of rows).
    q, r = torch.linalg.qr(g)
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)  # makes the QR factor Haar-distributed
    return q * math.sqrt(rows / cols)


def has_eigenbasis(factors: InfluenceFactors) -> bool:
    """Whether the factors precondition in a Kronecker eigenbasis (K-FAC, EK-FAC), where truncation applies."""
    return isinstance(factors.curvature, KFACStrategy)


def _curvature(factors: InfluenceFactors, name: str, placement: str) -> tuple[torch.Tensor, float] | None:
    """``(Lambda, lambda)`` of a layer in float64, or ``None`` for the identity strategy.

    EK-FAC factors whose ``Lambda`` is not fitted yet (phase ``eigen``, inside the eigenvalue-correction
    pass) give K-FAC's ``L_S L_A`` (used for truncation only, which is all the ``query`` placement needs)."""
    if isinstance(factors.curvature, IdentityStrategy):
        return None
    if factors.is_complete:
        return factors.eigenvalues(name).to(torch.float64), float(factors.damping_for(name))
    if isinstance(factors.curvature, EKFACStrategy) and factors.phase_done(factors.curvature.passes[0].phase) \
            and placement == "query":
        return _kfac_estimate(factors, name)
    factors.require_complete()  # raises, naming the fix
    raise AssertionError("unreachable")


def _kfac_estimate(factors: InfluenceFactors, name: str) -> tuple[torch.Tensor, float]:
    """K-FAC's ``L_S L_A`` (an estimate of ``E[R^2]``) and the default damping heuristic on it.

    What the ``query`` placement truncates by: it exists as soon as the eigenbases do, so an index
    written inside the eigenvalue-correction pass and one built after the fit keep the same
    coordinates, whatever damping the factors are later used with."""
    t = factors.tensors[name]
    s_side, a_side = KFACStrategy.stored_layouts(factors.layers[name], t)
    # In eigenbasis-coordinate order: a blocked side's eigenvalues block after block, padding dropped.
    lam = torch.outer(s_side.eigenvalues(t["S_eigvals"]).to(torch.float64).clamp_min(0),
                      a_side.eigenvalues(t["A_eigvals"]).to(torch.float64).clamp_min(0))
    return lam, DEFAULT_DAMPING_FACTOR * float(lam.mean())


def block_layouts(factors: InfluenceFactors) -> dict[str, list[int | None]]:
    """Per layer with an eigenbasis, ``[S block, A block]`` (``None``: a dense side): saved in an index's
    identity, so that one built on blocked factors is refused against dense ones with a message that says so."""
    if not has_eigenbasis(factors):
        return {}
    out = {}
    for name, layer in factors.layers.items():
        t = factors.tensors[name]
        if "A_eigvecs" not in t:
            continue
        sides = KFACStrategy.stored_layouts(layer, t)
        out[name] = [None if side.dense else side.block for side in sides]
    return out


class SideBasis:
    """The rotation of one side onto its kept eigenbasis directions: ``x -> (Q^T x)[kept]`` along an axis.

    ``vecs`` is the side's stored eigenbasis (``[d, d]`` dense, ``[k, b, b]`` blocked) and ``kept`` the
    kept coordinates (ascending; ``None``: all). Dense: one matmul with ``Q[:, kept]``. Blocked: each block
    holding kept coordinates multiplies its slice of ``x`` by its own kept eigenvectors (``b x m_k``), so a
    rotation costs ``b`` multiply-adds per kept direction instead of ``d``, and nothing dense is formed.
    """

    def __init__(self, vecs: torch.Tensor, layout: SideLayout, kept: torch.Tensor | None = None):
        self.layout = layout
        self.kept = kept
        self.vecs: torch.Tensor | None = None  # blocked, all kept: the blocks, rotated through the layout
        self.matrix: torch.Tensor | None = None  # dense: Q[:, kept]
        self.pieces: list[tuple[int, int, torch.Tensor]] | None = None  # blocked, truncated: (lo, hi, Q_k[:hi-lo, l])
        self._folded: tuple[torch.Tensor, torch.Tensor] | None = None  # (P, Q[:, kept] P), see rotate_project
        if layout.dense:
            self.matrix = vecs if kept is None else vecs.index_select(1, kept.to(vecs.device))
        elif kept is None:
            self.vecs = vecs
        else:
            kept = kept.to("cpu")
            b = layout.block
            self.pieces = []
            for block in torch.unique(kept // b).tolist():
                local = kept[kept // b == block] - block * b
                lo, hi = block * b, min((block + 1) * b, layout.dim)
                # Rows past `hi - lo` are the last block's padding: zero in every real eigenvector.
                self.pieces.append((lo, hi, vecs[block, : hi - lo].index_select(1, local.to(vecs.device))))

    @property
    def width(self) -> int:
        return self.layout.dim if self.kept is None else len(self.kept)

    def rotation_cost(self) -> int:
        """Multiply-adds of :meth:`rotate` per vector."""
        if self.matrix is not None:
            return self.matrix.shape[0] * self.matrix.shape[1]
        if self.pieces is None:
            return self.layout.dim * self.layout.block
        return sum(m.shape[0] * m.shape[1] for _, _, m in self.pieces)

    def rotate_project(self, x: torch.Tensor, proj: torch.Tensor | None) -> torch.Tensor:
        """``(Q^T x)[kept] P`` along the last axis of ``x``: with no weight between the rotation and the
        projection (``proj`` ``[kept, p]``), one ``d x p`` matrix ``Q[:, kept] P`` (built once, kept) does both
        where that is cheaper than rotating first (``d p < rotation + kept p`` per vector)."""
        if proj is None:
            return self.rotate(x)
        if self.layout.dim * proj.shape[1] >= self.rotation_cost() + proj.shape[0] * proj.shape[1]:
            return self.rotate(x) @ proj
        if self._folded is None or self._folded[0] is not proj:
            self._folded = (proj, self._fold(proj))
        return x @ self._folded[1]

    def _fold(self, proj: torch.Tensor) -> torch.Tensor:
        """``Q[:, kept] P`` ``[d, p]``, block by block on a blocked side (the dense ``Q`` is never formed)."""
        if self.matrix is not None:
            return self.matrix @ proj
        if self.pieces is None:  # Q P = (P^T Q^T)^T: the rows of P^T taken back from eigenbasis coordinates
            return self.layout.unrotate(proj.transpose(0, 1), self.vecs).transpose(0, 1).contiguous()
        out = proj.new_zeros(self.layout.dim, proj.shape[1])
        start = 0  # kept coordinates ascend, and so do the pieces' blocks: P's rows follow them in order
        for lo, hi, m in self.pieces:
            out[lo:hi] = m @ proj[start:start + m.shape[1]]
            start += m.shape[1]
        return out

    def rotate(self, x: torch.Tensor, axis: int = -1) -> torch.Tensor:
        """``(Q^T x)[kept]`` along ``axis`` of ``x`` (that axis ``dim`` long)."""
        if self.matrix is not None and axis in (-2, x.dim() - 2):
            return self.matrix.transpose(0, 1) @ x  # rows of a matrix: one matmul, no transposed copies
        moved = axis not in (-1, x.dim() - 1)
        if moved:
            x = x.movedim(axis, -1)
        if self.matrix is not None:
            y = x @ self.matrix
        elif self.pieces is None:
            y = self.layout.rotate(x, self.vecs)
        else:
            y = torch.cat([x[..., lo:hi] @ m for lo, hi, m in self.pieces], dim=-1)
        return y.movedim(-1, axis) if moved else y


class LayerBasis:
    """A layer's two :class:`SideBasis`: ``a`` (input side, kept columns) and ``s`` (output side, kept rows)."""

    def __init__(self, a: SideBasis, s: SideBasis):
        self.a, self.s = a, s

    @classmethod
    def of(cls, qa: torch.Tensor, qs: torch.Tensor, d_in: int, d_out: int, cols: torch.Tensor | None,
           rows: torch.Tensor | None) -> "LayerBasis":
        """From a layer's stored eigenbases (dense or blocked, read from their shapes) and kept coordinates."""
        return cls(SideBasis(qa, SideLayout.of(qa, d_in), cols), SideBasis(qs, SideLayout.of(qs, d_out), rows))


class LayerCompression:
    """One layer's compression: basis, kept rows/columns, side weights and projections.

    ``index_weight`` multiplies the rotated, truncated training gradient; ``query_weight`` multiplies the
    rotated, truncated *preconditioned* query gradient (``R_q * w``) and ``raw_query_weight`` the raw one
    (``R_q``, from the query's tokens); each is ``None`` for 1.
    """

    def __init__(self, layer: TrackedLayer, eigen: bool, rows: torch.Tensor | None, cols: torch.Tensor | None,
                 index_weight: torch.Tensor | None, query_weight: torch.Tensor | None,
                 proj_s: torch.Tensor | None, proj_a: torch.Tensor | None,
                 raw_query_weight: torch.Tensor | None = None):
        self.layer = layer
        self.eigen = eigen
        self.rows, self.cols = rows, cols
        self.index_weight, self.query_weight = index_weight, query_weight
        self.raw_query_weight = raw_query_weight
        self.proj_s, self.proj_a = proj_s, proj_a
        self._cache: dict = {}

    @property
    def kept_shape(self) -> tuple[int, int]:
        return (self.layer.d_out if self.rows is None else len(self.rows),
                self.layer.d_in if self.cols is None else len(self.cols))

    @property
    def out_shape(self) -> tuple[int, int]:
        ks, ka = self.kept_shape
        return (ks if self.proj_s is None else self.proj_s.shape[1], ka if self.proj_a is None else self.proj_a.shape[1])

    @property
    def width(self) -> int:
        """Numbers stored per example for this layer."""
        return self.out_shape[0] * self.out_shape[1]

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for key in ("rows", "cols", "index_weight", "query_weight", "raw_query_weight", "proj_s", "proj_a"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out

    def _on(self, key: str, device, dtype) -> torch.Tensor | None:
        value = getattr(self, key)
        if value is None or not value.dtype.is_floating_point:
            return value if value is None else value.to(device)
        cache_key = (key, str(device), dtype)
        if cache_key not in self._cache:
            self._cache[cache_key] = value.to(device=device, dtype=dtype)
        return self._cache[cache_key]

    # ----------------------------------------------------------------- shared steps
    def _truncate(self, r: torch.Tensor) -> torch.Tensor:
        if self.rows is not None:
            r = r.index_select(-2, self.rows.to(r.device))
        if self.cols is not None:
            r = r.index_select(-1, self.cols.to(r.device))
        return r

    def _project(self, r: torch.Tensor) -> torch.Tensor:
        ps = self._on("proj_s", r.device, r.dtype)
        pa = self._on("proj_a", r.device, r.dtype)
        if ps is not None and pa is not None:
            # Both orders cost d_s d_a p on the first side; the second costs p_s p_a times what the first left.
            if pa.shape[0] <= ps.shape[0]:
                return ((ps.transpose(0, 1) @ r) @ pa).flatten(1)
            return (ps.transpose(0, 1) @ (r @ pa)).flatten(1)
        if ps is not None:
            r = ps.transpose(0, 1) @ r
        if pa is not None:
            r = r @ pa
        return r.flatten(1)

    # ----------------------------------------------------------------- training side
    def from_rotated(self, rotated: torch.Tensor) -> torch.Tensor:
        """Index vectors ``[B, width]`` from per-example gradients ``[B, d_out, d_in]`` already in this
        layer's basis (``Q_S^T DW Q_A`` for K-FAC/EK-FAC, as the eigenvalue-correction pass forms them)."""
        r = self._truncate(rotated)
        w = self._on("index_weight", r.device, r.dtype)
        if w is not None:
            r = r * w
        return self._project(r)

    def basis(self, eigvecs: "LayerBasis | tuple[torch.Tensor, torch.Tensor] | None") -> "LayerBasis | None":
        """``eigvecs`` as a :class:`LayerBasis` onto this layer's kept directions: a ``LayerBasis``
        (:meth:`Compression.eigvecs`) as it is, or the stored eigenbases ``(Q_A, Q_S)`` (dense or blocked)."""
        if eigvecs is None or isinstance(eigvecs, LayerBasis):
            return eigvecs
        qa, qs = eigvecs
        return LayerBasis.of(qa, qs, self.layer.d_in, self.layer.d_out, self.cols, self.rows)

    def from_tokens(self, a: torch.Tensor, s: torch.Tensor,
                    eigvecs: "LayerBasis | tuple[torch.Tensor, torch.Tensor] | None") -> torch.Tensor:
        """Index vectors ``[B, width]`` from a layer's captured tokens ``a`` ``[B, T, d_in]``, ``s`` ``[B, T, d_out]``.

        ``eigvecs``: the layer's basis (K-FAC/EK-FAC) in the compute dtype and device, from
        :meth:`Compression.eigvecs` or as the stored ``(Q_A, Q_S)``; ``None`` for the parameter basis."""
        basis = self.basis(eigvecs)
        if basis is None and (self.rows is not None or self.cols is not None):
            raise AssertionError("truncation needs an eigenbasis")
        return self._from_raw_tokens(a, s, basis, "index_weight")

    def from_rotated_tokens(self, a_rotated: torch.Tensor, s_rotated: torch.Tensor) -> torch.Tensor:
        """Index vectors ``[B, width]`` from tokens already rotated into the eigenbasis (``a Q_A``, ``s Q_S``,
        as the eigenvalue-correction pass forms them before ``per_example_gradients``)."""
        if self.cols is not None:
            a_rotated = a_rotated.index_select(-1, self.cols.to(a_rotated.device))
        if self.rows is not None:
            s_rotated = s_rotated.index_select(-1, self.rows.to(s_rotated.device))
        return self._from_kept_tokens(a_rotated, s_rotated, "index_weight")

    def _from_raw_tokens(self, a: torch.Tensor, s: torch.Tensor, basis: "LayerBasis | None",
                         weight: str) -> torch.Tensor:
        """Vectors from tokens in the parameter basis: rotated onto the kept directions (``basis``), then as
        :meth:`_from_kept_tokens`; with no weight on this side, rotation and projection in one matmul per side."""
        if basis is None:
            return self._from_kept_tokens(a, s, weight)
        if getattr(self, weight) is None:
            s = basis.s.rotate_project(s, self._on("proj_s", s.device, s.dtype))
            a = basis.a.rotate_project(a, self._on("proj_a", a.device, a.dtype))
            return (s.transpose(1, 2) @ a).flatten(1)
        return self._from_kept_tokens(basis.a.rotate(a), basis.s.rotate(s), weight)

    def _from_kept_tokens(self, a: torch.Tensor, s: torch.Tensor, weight: str) -> torch.Tensor:
        if getattr(self, weight) is None:
            # No weight on this side: project the tokens, never forming the per-example gradient
            # (T (d_out + d_in) p per token instead of d_out d_in (T + p)).
            ps = self._on("proj_s", a.device, a.dtype)
            pa = self._on("proj_a", a.device, a.dtype)
            if ps is not None:
                s = s @ ps
            if pa is not None:
                a = a @ pa
            return (s.transpose(1, 2) @ a).flatten(1)
        w = self._on(weight, a.device, a.dtype)
        rows = max(1, WEIGHTED_CHUNK_BYTES // (a.shape[0] * a.shape[-1] * a.element_size()))
        if rows >= s.shape[-1]:
            r = s.transpose(1, 2) @ a
            return self._project(r.mul_(w))  # r is this call's own: weighted in place
        # A wide layer (a 50257-wide head: 154 MB per example in float32) forms R = S^T A a block of output rows
        # at a time, weighted and projected before the next, so memory stays flat whatever the layer's width.
        ps = self._on("proj_s", a.device, a.dtype)
        pa = self._on("proj_a", a.device, a.dtype)
        total, parts = None, []
        for lo in range(0, s.shape[-1], rows):
            r = s[..., lo:lo + rows].transpose(1, 2) @ a  # [B, rows, d_in]
            r.mul_(w[lo:lo + rows])
            if ps is None:
                parts.append(r if pa is None else r @ pa)
                continue
            piece = ps[lo:lo + rows].transpose(0, 1) @ r  # [B, p_S, d_in]
            total = piece if total is None else total.add_(piece)
        out = torch.cat(parts, dim=1) if ps is None else (total if pa is None else total @ pa)
        return out.flatten(1)

    # ----------------------------------------------------------------- query side
    def query_from_tokens(self, a: torch.Tensor, s: torch.Tensor,
                          eigvecs: "LayerBasis | tuple[torch.Tensor, torch.Tensor] | None") -> torch.Tensor:
        """Query vectors ``[Q, width]`` straight from the queries' measurement tokens (no preconditioning
        step: the query side's share of the preconditioner is applied in the eigenbasis), negated."""
        return -self._from_raw_tokens(a, s, self.basis(eigvecs), "raw_query_weight")

    def from_preconditioned(self, p: torch.Tensor,
                            eigvecs: "LayerBasis | tuple[torch.Tensor, torch.Tensor] | None") -> torch.Tensor:
        """Query vectors ``[Q, width]`` from preconditioned query gradients ``P_q`` ``[Q, d_out, d_in]``,
        negated so that ``query_vector . index_vector`` is the score (docs/method.md, section 1)."""
        basis = self.basis(eigvecs)
        if basis is not None:  # (Q_S^T P_q Q_A)[rows, cols], rotated onto the kept directions only
            r = basis.a.rotate(basis.s.rotate(p, axis=-2), axis=-1)
        else:
            r = self._truncate(p)
        w = self._on("query_weight", r.device, r.dtype)
        if w is not None:
            r = r * w
        return -self._project(r)


class Compression:
    """The compression of every tracked layer, in layer order (one row of the index is their concatenation)."""

    def __init__(self, layers: dict[str, LayerCompression], options: IndexOptions):
        self.layers = layers
        self.options = options

    @property
    def width(self) -> int:
        return sum(c.width for c in self.layers.values())

    def slices(self) -> dict[str, slice]:
        """Each layer's columns in an index row."""
        out, start = {}, 0
        for name, c in self.layers.items():
            out[name] = slice(start, start + c.width)
            start += c.width
        return out

    @classmethod
    def from_factors(cls, factors: InfluenceFactors, options: IndexOptions) -> "Compression":
        """Choose the truncation, weights and projections of every layer of ``factors``."""
        alpha = PLACEMENTS[options.preconditioner]
        eigen = has_eigenbasis(factors)
        if options.keep is not None and not eigen:
            raise OptionsError(
                f"IndexOptions.keep truncates in the K-FAC/EK-FAC eigenbasis; {factors.strategy} factors have none. "
                "Use keep=None (projection only) or fit kfac/ekfac factors"
            )
        layers = {}
        for name, layer in factors.layers.items():
            curv = _curvature(factors, name, options.preconditioner)
            rows = cols = None
            index_weight = query_weight = raw_query_weight = None
            if curv is not None:
                lam, damping = curv
                inv = 1.0 / (lam + damping)
                if not torch.isfinite(inv).all():
                    raise OptionsError(f"layer '{name}' has zero curvature and zero damping; use damping=None "
                                       "(heuristic) or a positive damping")
                if options.keep is not None:
                    # Energy of the preconditioned gradient per coordinate: E[R^2] * w (Lambda estimates E[R^2]).
                    # The query placement ranks by K-FAC's estimate, so that it depends on the eigenbases only.
                    est, est_damping = _kfac_estimate(factors, name) if alpha == 0.0 else (lam, damping)
                    energy = est.clamp_min(0) / (est + est_damping)
                    rows = _top(energy.sum(1), options.keep)
                    cols = _top(energy.sum(0), options.keep)
                    inv, lam = _kept(inv, rows, cols), _kept(lam, rows, cols)
                if alpha > 0:
                    index_weight = inv if alpha == 1.0 else inv.sqrt()
                    # applied to R_q * w (the preconditioned query): leaves R_q * w^(1 - alpha)
                    query_weight = lam + damping if alpha == 1.0 else (lam + damping).sqrt()
                # For queries compressed from their tokens: w^(1 - alpha). With alpha = 0 it is the factors' own
                # preconditioner, never saved (the index is opened with the complete factors, which give it).
                raw_query_weight = None if alpha == 1.0 else (index_weight.clone() if alpha == 0.5 else
                                                              (inv if factors.is_complete else None))
            ks = layer.d_out if rows is None else len(rows)
            ka = layer.d_in if cols is None else len(cols)
            generator = torch.Generator().manual_seed(_layer_seed(options.seed, name))
            p = options.projection_dim
            proj_s = _projection(options.projection, generator, ks, p) if p is not None and p < ks else None
            proj_a = _projection(options.projection, generator, ka, p) if p is not None and p < ka else None
            layers[name] = LayerCompression(layer, eigen, rows, cols, index_weight, query_weight, proj_s, proj_a,
                                            raw_query_weight)
        return cls(layers, options)

    def eigvecs(self, factors: InfluenceFactors, name: str, device, dtype) -> LayerBasis | None:
        """The rotation of layer ``name`` onto its kept eigenbasis directions, in ``dtype`` on ``device``
        (``None`` for factors without an eigenbasis). Dense or block-diagonal sides alike."""
        comp = self.layers[name]
        if not comp.eigen:
            return None
        t = factors.tensors[name]
        return LayerBasis.of(t["A_eigvecs"].to(device=device, dtype=dtype), t["S_eigvecs"].to(device=device, dtype=dtype),
                             comp.layer.d_in, comp.layer.d_out, comp.cols, comp.rows)

    def query_vectors(self, queries: QueryGradients, factors: InfluenceFactors,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``[Q, width]`` query vectors from :meth:`InfluenceScorer.query_gradients` (full or low rank),
        preconditioned with ``factors`` (the complete factors this index was built for)."""
        missing = [n for n in self.layers if n not in queries.layer_names]
        if missing:
            raise OptionsError(f"the query gradients lack the index's layers {missing[:10]}; compute them with a "
                               "scorer over all the factors' layers (no `layers=` subset)")
        parts = []
        for name, comp in self.layers.items():
            if queries.low_rank:
                u, v = queries.left[name].to(dtype), queries.right[name].to(dtype)
                p = u @ v.transpose(1, 2)
            else:
                p = queries.full[name].to(dtype)
            parts.append(comp.from_preconditioned(p, self.eigvecs(factors, name, p.device, dtype)))
        return torch.cat(parts, dim=1)

    # ---------------------------------------------------------------- persistence
    def tensors(self) -> dict[str, torch.Tensor]:
        """What is saved with an index (and fingerprinted into its identity): with the ``query`` placement
        not the query side's weight, which comes from the factors the index is opened with."""
        skip = ("raw_query_weight",) if self.options.preconditioner == "query" else ()
        return {f"{name}::{key}": value.contiguous() for name, c in self.layers.items()
                for key, value in c.tensors().items() if key not in skip}

    @classmethod
    def from_tensors(cls, flat: dict[str, torch.Tensor], factors: InfluenceFactors,
                     options: IndexOptions) -> "Compression":
        eigen = has_eigenbasis(factors)
        layers = {}
        for name, layer in factors.layers.items():
            get = lambda key: flat.get(f"{name}::{key}")  # noqa: E731
            raw_query_weight = get("raw_query_weight")
            if options.preconditioner == "query" and factors.is_complete:
                # The query side carries all of the preconditioner, and it is the one of the factors the index
                # is opened with: the index itself depends on the eigenbases only (built before Lambda existed,
                # or for another damping), so the weight saved with it may be another one.
                curv = _curvature(factors, name, "query")
                if curv is not None:
                    lam, damping = curv
                    raw_query_weight = _kept(1.0 / (lam + damping), get("rows"), get("cols"))
            layers[name] = LayerCompression(layer, eigen, get("rows"), get("cols"), get("index_weight"),
                                            get("query_weight"), get("proj_s"), get("proj_a"), raw_query_weight)
        return cls(layers, options)


def _kept(x: torch.Tensor, rows: torch.Tensor | None, cols: torch.Tensor | None) -> torch.Tensor:
    if rows is not None:
        x = x.index_select(0, rows)
    if cols is not None:
        x = x.index_select(1, cols)
    return x


def _top(values: torch.Tensor, k: int) -> torch.Tensor | None:
    """Indices (ascending) of the ``k`` largest ``values``; ``None`` when that is all of them."""
    if k >= values.numel():
        return None
    return torch.sort(torch.topk(values, k).indices).values
