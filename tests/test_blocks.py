"""Block-diagonal sides against explicit block-diagonal matrices."""

import pytest
import torch

from lightning_influence.curvature.blocks import SideLayout


@pytest.mark.parametrize("dim,block", [(7, None), (7, 7), (7, 3), (12, 4), (10, 16)])
def test_side_layout_matches_explicit_block_diagonal(dim, block):
    torch.manual_seed(0)
    side = SideLayout(dim, block)
    x = torch.randn(50, dim, dtype=torch.float64)
    total = side.outer_sum(x)
    assert tuple(total.shape) == side.matrix_shape
    full = x.T @ x
    mask = torch.zeros(dim, dim, dtype=torch.bool)
    b = side.block
    for i in range(0, dim, b):
        mask[i:i + b, i:i + b] = True
    expected = torch.where(mask, full, torch.zeros_like(full))  # the covariance with off-block entries zeroed
    torch.testing.assert_close(side.dense_matrix(total), expected)

    vals, vecs = side.eigh(total, 50.0)
    q = side.dense_matrix(vecs)
    lam = side.eigenvalues(vals)
    torch.testing.assert_close(q.T @ q, torch.eye(dim, dtype=torch.float64))  # orthogonal
    torch.testing.assert_close(q @ torch.diag(lam) @ q.T, expected / 50.0)  # reconstructs the blocked covariance

    v = torch.randn(3, 5, dim, dtype=torch.float64)
    torch.testing.assert_close(side.rotate(v, vecs), v @ q)
    torch.testing.assert_close(side.unrotate(side.rotate(v, vecs), vecs), v)
    w = torch.randn(4, dim, 6, dtype=torch.float64)  # rotate along a middle axis (the S side of [B, d_out, d_in])
    torch.testing.assert_close(side.rotate(w, vecs, axis=1), torch.einsum("bij,ik->bkj", w, q))


def test_singular_last_block_does_not_mix_padding():
    # A rank-deficient short last block: zero eigenvalues in the real part must not rotate into the padding.
    side = SideLayout(5, 3)
    x = torch.zeros(10, 5, dtype=torch.float64)
    x[:, 0:3] = torch.randn(10, 3, dtype=torch.float64)  # block 2 (coords 3, 4) all zero
    vals, vecs = side.eigh(side.outer_sum(x), 10.0)
    v = torch.randn(2, 5, dtype=torch.float64)
    r = side.rotate(v, vecs)
    torch.testing.assert_close(side.unrotate(r, vecs), v)
    torch.testing.assert_close(r.norm(dim=-1), v.norm(dim=-1))


@pytest.mark.parametrize("dim", [5, 9, 16, 17])
def test_symmetric_gram_equals_the_matrix_product(monkeypatch, dim):
    """The panel-by-panel Gram matrix of a wide side is x^T x, every entry (panels that do not divide the width,
    a last panel of one column), with the threshold and panel lowered so a small side takes that path."""
    from lightning_influence.curvature import blocks

    monkeypatch.setattr(blocks, "SYMMETRIC_GRAM_MIN_DIM", 4)
    monkeypatch.setattr(blocks, "SYMMETRIC_GRAM_PANEL", 4)
    torch.manual_seed(dim)
    x = torch.randn(30, dim, dtype=torch.float64)
    x[:, 0] += 3.0  # not symmetric by accident of the data: a non-zero mean column
    got = SideLayout(dim).outer_sum(x)
    torch.testing.assert_close(got, x.T @ x, rtol=1e-12, atol=1e-12)
