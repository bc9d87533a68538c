"""Small models and data for the tests (float64 where exactness is checked)."""

from __future__ import annotations

import torch
from torch import nn


def mlp(bias: bool = True, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7, bias=bias), nn.Tanh(), nn.Linear(7, 3, bias=bias)).double()


def mlp_data(n: int = 16, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y


class SharedMLP(nn.Module):
    """A layer applied twice (weight sharing) and an in-place ReLU right after a tracked layer."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(5, 7)
        self.act = nn.ReLU(inplace=True)
        self.shared = nn.Linear(7, 7)
        self.head = nn.Linear(7, 3)

    def forward(self, x):
        h = self.act(self.inp(x))
        h = torch.tanh(self.shared(h))
        h = torch.tanh(self.shared(h) + h)
        return self.head(h)


def shared_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return SharedMLP().double()


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 3, kernel_size=3, stride=2, padding=1)
        self.c2 = nn.Conv2d(3, 4, kernel_size=2, dilation=2, bias=False)
        self.c3 = nn.Conv2d(4, 2, kernel_size=3, padding="same")
        self.head = nn.Linear(2 * 2 * 2, 3)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = torch.tanh(self.c2(x))
        x = torch.tanh(self.c3(x))
        return self.head(x.flatten(1))


def convnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return ConvNet().double()


def conv_data(n: int = 10, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


class TinySeqLM(nn.Module):
    """Token-wise LM without attention: padding must be excluded by masking alone."""

    def __init__(self, vocab: int = 9, dim: int = 6, hidden: int = 8):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, vocab)

    def forward(self, input_ids, attention_mask=None):
        return self.down(torch.tanh(self.up(self.emb(input_ids))))


def seq_lm(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return TinySeqLM().double()


def tiny_gpt2(seed: int = 0) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=11, n_positions=24, n_embd=8, n_layer=1, n_head=2, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False)
    model = GPT2LMHeadModel(config).double().eval()
    # Random (not zero) biases so that a missing bias column would show.
    with torch.no_grad():
        for m in model.modules():
            if getattr(m, "bias", None) is not None and isinstance(m.bias, torch.nn.Parameter):
                m.bias.normal_(0, 0.1)
    return model


def lm_batch(n: int = 6, vocab: int = 9, max_len: int = 7, pad_to: int | None = None, seed: int = 1,
             prompt_len: int = 0):
    """Right-padded causal-LM batch with random lengths; labels -100 on padding (and prompt)."""
    g = torch.Generator().manual_seed(seed)
    t = pad_to or max_len
    ids = torch.zeros(n, t, dtype=torch.long)
    mask = torch.zeros(n, t, dtype=torch.long)
    for i in range(n):
        length = int(torch.randint(max(3, prompt_len + 2), max_len + 1, (1,), generator=g))
        ids[i, :length] = torch.randint(1, vocab, (length,), generator=g)
        mask[i, :length] = 1
    labels = ids.masked_fill(mask == 0, -100)
    if prompt_len:
        labels[:, :prompt_len] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def split_batch(batch, size: int):
    """Split a tuple/dict batch into a list of batches of ``size`` examples."""
    if isinstance(batch, dict):
        n = batch["input_ids"].shape[0]
        return [{k: v[i:i + size] for k, v in batch.items()} for i in range(0, n, size)]
    n = batch[0].shape[0]
    return [tuple(v[i:i + size] for v in batch) for i in range(0, n, size)]
