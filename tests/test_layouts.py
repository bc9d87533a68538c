"""Token layouts: which axis of a layer's input is the batch, and which positions the padding mask covers.

References are independent of the capture: per-example gradients from autograd one example at a
time (``dense.per_example_grads``), dense scores with explicit matrices (``dense.dense_scores``),
and, for padding, the same examples fitted and scored one at a time without any padding.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_influence import CausalLMTask, ClassificationTask, InfluenceScorer, fit_factors
from lightning_influence.capture import LayerCapture, find_tracked_layers, per_example_gradients, set_token_layout
from lightning_influence.errors import TrackingError

from . import dense, models
from .dense import covariance_sum


class SeqFirstEncoder(nn.Module):
    """Batch-first inputs ``[B, T, d]`` run through a default (sequence-first) ``TransformerEncoderLayer``."""

    def __init__(self, dim: int = 8, classes: int = 3):
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(dim, nhead=2, dim_feedforward=12, dropout=0.0)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        return self.head(self.enc(x.transpose(0, 1)).mean(0))  # the encoder's linears see [T, B, d]


class SeqFirstMLP(nn.Module):
    """A sequence-first layer that nothing in the model declares as such."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.proj(x.transpose(0, 1))).mean(0))


class RoutedLM(nn.Module):
    """Token-wise LM whose layers see the batch flattened ``[B*T, d]`` (``flat``), packed to its real tokens
    (``packed``) and split into heads ``[B, T, H, d/H]`` (``heads``); ``paths`` picks which exist."""

    def __init__(self, paths=("flat", "packed", "heads"), vocab: int = 9, dim: int = 6, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.emb = nn.Embedding(vocab, dim)
        if "flat" in paths:
            self.routed = nn.Linear(dim, dim)
        if "flat_seq_first" in paths:  # rows in [T, B] order: the layer is declared sequence-first
            self.routed_t = set_token_layout(nn.Linear(dim, dim), "seq_first")
        if "packed" in paths:
            self.packed = nn.Linear(dim, dim)
        if "heads" in paths:
            self.per_head = nn.Linear(dim // heads, dim // heads)
        self.down = nn.Linear(dim, vocab)

    def forward(self, input_ids, attention_mask):
        h = self.emb(input_ids)
        b, t, d = h.shape
        if hasattr(self, "routed"):
            h = torch.tanh(self.routed(h.reshape(-1, d))).reshape(b, t, d)
        if hasattr(self, "routed_t"):
            h = torch.tanh(self.routed_t(h.transpose(0, 1).reshape(-1, d))).reshape(t, b, d).transpose(0, 1)
        if hasattr(self, "packed"):
            keep = attention_mask.bool().unsqueeze(-1)
            h = h.masked_scatter(keep, torch.tanh(self.packed(h[keep.squeeze(-1)])))
        if hasattr(self, "per_head"):
            h = h + torch.tanh(self.per_head(h.reshape(b, t, self.heads, d // self.heads))).reshape(b, t, d)
        return self.down(h)


class BosLM(models.TinySeqLM):
    """A layer that sees one more position than the batch has (a learned start token prepended)."""

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids)
        h = torch.cat([h[:, :1] * 0 + 1, h], dim=1)
        return self.down(torch.tanh(self.up(h)))[:, 1:]


def build(cls, seed=0, **kwargs):
    torch.manual_seed(seed)
    return cls(**kwargs).double().eval()


def xy(n, t, d, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, t, d, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def ce_sum(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1], reduction="sum")


def captured_per_example(model, layers, batch):
    with LayerCapture(model, layers, dtype=torch.float64, batch_size=batch[0].shape[0]) as cap:
        acts, grads = cap.collect(ce_sum(model, batch))
    return {n: per_example_gradients(acts[n], grads[n]).flatten(1) for n in layers}


def assert_matches_autograd(model, layers, batch):
    ours = captured_per_example(model, layers, batch)
    ref = dense.per_example_grads(model, {n: model.get_submodule(n) for n in layers}, ce_sum, batch)
    for name in layers:
        assert ours[name].shape == ref[name].shape, name
        torch.testing.assert_close(ours[name], ref[name], rtol=1e-9, atol=1e-11, msg=name)


@pytest.mark.parametrize("t, b", [(5, 3), (4, 4)])
def test_sequence_first_transformer_layers_give_per_example_gradients(t, b):
    """nn.TransformerEncoderLayer (batch_first=False) declares its layout, so T == B is no ambiguity."""
    model = build(SeqFirstEncoder)
    layers = find_tracked_layers(model, ["enc.linear*", "head"])
    assert_matches_autograd(model, layers, xy(b, t, 8))


@pytest.mark.parametrize("strategy", ["kfac", "ekfac"])
def test_sequence_first_scores_match_dense(strategy):
    model = build(SeqFirstEncoder)
    train, queries = xy(6, 5, 8, seed=2), xy(2, 5, 8, seed=3)
    patterns = ["enc.linear*", "head"]
    task = ClassificationTask()
    factors = fit_factors(model, task, models.split_batch(train, 3), strategy=strategy, modules=patterns,
                          fisher="empirical", capture_dtype=torch.float64)
    scores = InfluenceScorer(model, task, factors, score_dtype=torch.float64).pairwise_scores(
        [queries], models.split_batch(train, 3))
    layers = find_tracked_layers(model, patterns)
    ref = dense.dense_scores(strategy, model, {n: model.get_submodule(n) for n in layers}, ce_sum,
                             lambda m, b: -ce_sum(m, b), train, queries)
    assert scores.shape == (2, 6)
    torch.testing.assert_close(scores, ref, rtol=1e-6, atol=1e-9 * float(ref.abs().max()))


def test_undeclared_sequence_first_layer_is_detected_from_the_batch_axis():
    model = build(SeqFirstMLP)
    assert_matches_autograd(model, find_tracked_layers(model), xy(3, 5, 4))


def test_sequence_length_equal_to_batch_size_is_not_guessed():
    model = build(SeqFirstMLP)
    with pytest.raises(TrackingError, match=r"'proj'.*both have the batch size.*set_token_layout"):
        captured_per_example(model, find_tracked_layers(model), xy(3, 3, 4))


def test_declared_layout_resolves_the_ambiguity():
    model = set_token_layout(build(SeqFirstMLP), "seq_first")
    assert_matches_autograd(model, find_tracked_layers(model), xy(3, 3, 4))


def test_declared_layout_that_does_not_fit_raises():
    model = set_token_layout(build(SeqFirstMLP), "batch_first")
    with pytest.raises(TrackingError, match=r"'proj'.*declared batch-first"):
        captured_per_example(model, find_tracked_layers(model), xy(3, 5, 4))
    with pytest.raises(TrackingError, match="token layout must be one of"):
        set_token_layout(model, "time_major")


def unpadded_singles(batch):
    """Each example alone (batch size 1), cut to its real length: nothing to mask."""
    out = []
    for i in range(batch["input_ids"].shape[0]):
        length = int(batch["attention_mask"][i].sum())
        out.append({k: v[i:i + 1, :length] for k, v in batch.items()})
    return out


def fit_and_score(model, task, train_batches, queries, strategy):
    factors = fit_factors(model, task, train_batches, strategy=strategy, fisher="empirical", capture_dtype=torch.float64)
    scorer = InfluenceScorer(model, task, factors, score_dtype=torch.float64)
    return factors, scorer.pairwise_scores(queries, train_batches), scorer.self_scores(train_batches)


@pytest.mark.parametrize("paths", [("flat",), ("flat_seq_first",), ("packed",), ("heads",),
                                   ("flat", "packed", "heads")])
@pytest.mark.parametrize("strategy", ["kfac", "ekfac"])
def test_flattened_packed_and_head_layouts_ignore_padding(strategy, paths):
    """[B*T, d], packed real tokens and [B, T, H, d] layers: padded batches == each example unpadded."""
    model = build(RoutedLM, paths=paths)
    train = models.lm_batch(6, max_len=8, pad_to=10, seed=1)
    assert (train["attention_mask"] == 0).any()
    queries = models.lm_batch(2, max_len=7, seed=3, prompt_len=2)
    ref_factors, ref_pair, ref_self = fit_and_score(model, CausalLMTask(), unpadded_singles(train),
                                                    unpadded_singles(queries), strategy)
    factors, pair, own = fit_and_score(model, CausalLMTask(), models.split_batch(train, 3), [queries], strategy)
    for name in factors.layers:
        for side in ("A", "S"):
            ours, ref = factors.tensors[name], ref_factors.tensors[name]
            torch.testing.assert_close(ours[f"{side}_count"], ref[f"{side}_count"])
            torch.testing.assert_close(covariance_sum(ours, side), covariance_sum(ref, side), rtol=1e-9,
                                       atol=1e-11, msg=f"{name} {side}")
    torch.testing.assert_close(pair, ref_pair, rtol=1e-8, atol=1e-10 * float(ref_pair.abs().max()))
    torch.testing.assert_close(own, ref_self, rtol=1e-8, atol=1e-10 * float(ref_self.abs().max()))


def test_layer_whose_positions_do_not_match_the_mask_raises():
    model = build(BosLM)
    train = models.lm_batch(6, max_len=8, pad_to=10, seed=1)
    with pytest.raises(TrackingError, match=r"'up' has token positions \(11,\).*cannot be matched.*length 10"):
        fit_factors(model, CausalLMTask(), [train], strategy="kfac", fisher="empirical", capture_dtype=torch.float64)


def test_rows_that_map_to_no_example_raise():
    """Without a token mask, [N, d] rows (N != B) cannot be assigned to examples."""
    model = nn.Sequential(nn.Flatten(0, 1), nn.Linear(4, 3)).double()
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    with pytest.raises(TrackingError, match=r"'1' got an input of shape \(10, 4\) for a batch of 2 examples"):
        with LayerCapture(model, find_tracked_layers(model), dtype=torch.float64, batch_size=2) as cap:
            cap.collect(model(x).sum())


def test_without_a_batch_size_axis_zero_is_the_batch_even_when_t_equals_b():
    """LayerCapture used without batch_size (tests, small models) keeps the batch-first reading: no ambiguity."""
    model = nn.Sequential(nn.Linear(4, 3)).double()
    x = torch.randn(3, 3, 4, dtype=torch.float64)
    with LayerCapture(model, find_tracked_layers(model), dtype=torch.float64) as cap:
        acts, grads = cap.collect((model(x) ** 2).sum())
    assert acts["0"].shape == (3, 3, 5) and grads["0"].shape == (3, 3, 3)
    torch.testing.assert_close(acts["0"][..., :4], x)
