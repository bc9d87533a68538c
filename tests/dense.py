"""Independent dense reference computations for the tests.

Nothing here uses the library's hooks, masks or factor code: per-example gradients come
from autograd on one example at a time, covariances from ``retain_grad`` on layer
outputs, and curvature matrices are built explicitly and solved with ``linalg.solve``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D


def single(batch, i):
    if isinstance(batch, dict):
        return {k: v[i:i + 1] for k, v in batch.items()}
    return tuple(v[i:i + 1] for v in batch)


def n_examples(batch):
    return batch["input_ids"].shape[0] if isinstance(batch, dict) else batch[0].shape[0]


def layer_grad_matrix(module) -> torch.Tensor:
    """Current ``.grad`` of a layer as ``(d_out, d_in)`` with the bias as last column."""
    g = module.weight.grad
    if isinstance(module, Conv1D):
        g = g.t()
    g = g.reshape(g.shape[0], -1)
    if module.bias is not None:
        g = torch.cat([g, module.bias.grad.reshape(-1, 1)], 1)
    return g.clone()


def per_example_grads(model, modules: dict[str, nn.Module], loss_fn, batch) -> dict[str, torch.Tensor]:
    """``{name: [N, d_out*d_in]}`` gradients of ``loss_fn(model, example)`` one example at a time."""
    out = {n: [] for n in modules}
    for i in range(n_examples(batch)):
        model.zero_grad(set_to_none=False)
        for m in modules.values():
            for p in m.parameters():
                p.grad = torch.zeros_like(p)
        loss_fn(model, single(batch, i)).backward()
        for n, m in modules.items():
            out[n].append(layer_grad_matrix(m).flatten())
    model.zero_grad(set_to_none=True)
    return {n: torch.stack(v) for n, v in out.items()}


def tokens_in(module, x):
    if isinstance(module, nn.Conv2d):
        if module.padding == "same":
            x = F.pad(x, module._reversed_padding_repeated_twice)
            pad = 0
        else:
            pad = module.padding
        x = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=pad, stride=module.stride)
        x = x.transpose(1, 2)
    x = x.reshape(x.shape[0], -1, x.shape[-1])
    if module.bias is not None:
        x = torch.cat([x, torch.ones_like(x[..., :1])], -1)
    return x


def tokens_out(module, g):
    if isinstance(module, nn.Conv2d):
        return g.flatten(2).transpose(1, 2)
    return g.reshape(g.shape[0], -1, g.shape[-1])


def covariances(model, modules, loss_fn, batch, mask=None):
    """``{name: (A, S)}``: token means of a a^T and s s^T, padding excluded by ``mask`` [N, T]."""
    ins, outs = {}, {}
    handles = []
    for n, m in modules.items():
        def hook(mod, inp, out, n=n):
            # Every call of a module (weight sharing) adds its tokens. The model continues with a clone, so
            # that an in-place op after the layer (ReLU(inplace=True)) cannot change what the retained
            # gradient is taken of: the layer's own output.
            ins.setdefault(n, []).append(inp[0].detach())
            out.retain_grad()
            outs.setdefault(n, []).append(out)
            return out.clone()
        handles.append(m.register_forward_hook(hook))
    loss_fn(model, batch).backward()
    for h in handles:
        h.remove()
    model.zero_grad(set_to_none=True)
    result = {}
    for n, m in modules.items():
        a = torch.cat([tokens_in(m, x) for x in ins[n]], 1)
        s = torch.cat([tokens_out(m, o.grad) for o in outs[n]], 1)
        if mask is not None and a.shape[1] == mask.shape[1]:
            keep = mask.bool().reshape(-1)
            a = a.reshape(-1, a.shape[-1])[keep]
            s = s.reshape(-1, s.shape[-1])[keep]
        else:
            a, s = a.reshape(-1, a.shape[-1]), s.reshape(-1, s.shape[-1])
        result[n] = (a.T @ a / a.shape[0], s.T @ s / s.shape[0])
    return result


def off_blocks_zeroed(M, block):
    """``M`` with every entry outside the diagonal ``block x block`` blocks set to zero (``None``: ``M``)."""
    if block is None:
        return M
    idx = torch.arange(M.shape[0]) // block
    return torch.where(idx[:, None] == idx[None, :], M, torch.zeros_like(M))


def dense_curvature(strategy, A, S, grads, block_a=None, block_s=None):
    """Explicit ``(d_out*d_in)^2`` curvature of one layer and its heuristic damping (0.1 x mean eigenvalue).

    ``block_a``/``block_s``: K-FAC sides kept as diagonal blocks of that size (their off-block
    covariance entries zeroed before the eigendecomposition)."""
    A, S = (None, None) if A is None else (off_blocks_zeroed(A, block_a), off_blocks_zeroed(S, block_s))
    if strategy == "diagonal":
        lam = (grads ** 2).mean(0)
        return torch.diag(lam), 0.1 * lam.mean()
    la, qa = torch.linalg.eigh(A)
    ls, qs = torch.linalg.eigh(S)
    q = torch.kron(qs, qa)
    if strategy == "kfac":
        lam = torch.outer(ls.clamp_min(0), la.clamp_min(0)).flatten()
    else:  # ekfac: second moment of per-example gradients in the Kronecker eigenbasis
        lam = ((grads @ q) ** 2).mean(0)
    return q @ torch.diag(lam) @ q.T, 0.1 * lam.mean()


def dense_scores(strategy, model, modules, train_loss, measure, train_batch, query_batch, mask=None, blocks=None,
                 self_scores=False):
    """``[Q, N]`` scores ``grad f^T (G + lambda I)^-1 grad(-L)`` with every matrix explicit.

    ``blocks(dim)``: the block size of a side of dimension ``dim`` (``None``: dense). With
    ``self_scores``, the ``[N]`` self-influence ``grad L^T (G + lambda I)^-1 grad L`` instead."""
    blocks = blocks or (lambda dim: None)
    g_train = per_example_grads(model, modules, train_loss, train_batch)
    g_query = per_example_grads(model, modules, measure, query_batch)
    covs = covariances(model, modules, train_loss, train_batch, mask) if strategy in ("kfac", "ekfac") else None
    total = 0
    for n in modules:
        if strategy == "identity":
            total = total + (g_train[n] ** 2).sum(1) if self_scores else total - g_query[n] @ g_train[n].T
            continue
        A, S = covs[n] if covs else (None, None)
        blocks_ad = (blocks(A.shape[0]), blocks(S.shape[0])) if A is not None else (None, None)
        G, damp = dense_curvature(strategy, A, S, g_train[n], *blocks_ad)
        eye = torch.eye(G.shape[0], dtype=G.dtype)
        solved = torch.linalg.solve(G + damp * eye, g_train[n].T)
        if self_scores:
            total = total + (g_train[n].T * solved).sum(0)
        else:
            total = total - g_query[n] @ solved
    return total


def covariance_sum(tensors: dict, side: str) -> torch.Tensor:
    """K-FAC's covariance sum of one side (``S`` or ``A``) of fitted factors, from the eigenbasis and eigenvalues
    that replace it: ``count * Q diag(L) Q^T`` (block by block for a blocked side ``[k, b, b]``), in float64."""
    q, vals = tensors[f"{side}_eigvecs"].double(), tensors[f"{side}_eigvals"].double()
    return (q * vals.unsqueeze(-2)) @ q.transpose(-1, -2) * float(tensors[f"{side}_count"])
