"""Batches of any collection type reach the task intact: Lightning's collection utilities move and slice
them (namedtuples, transformers' BatchEncoding, nested dicts), and the results equal those of plain batches."""

from __future__ import annotations

from collections import namedtuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BatchEncoding

from lightning_influence import CausalLMTask, ClassificationTask, InfluenceScorer, fit_factors
from lightning_influence.evaluation import _slice_batch, query_measurements

from . import models

Pair = namedtuple("Pair", "x y")


class AttributeTask(ClassificationTask):
    """Reads ``batch.x`` / ``batch.y``: fails unless the batch arrives as the namedtuple it was."""

    def _split(self, batch):
        assert isinstance(batch, Pair), type(batch)
        return (batch.x,), {}, batch.y  # (positional inputs, keyword inputs, targets)


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 11):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(vocab, 6)
        self.mix = nn.Linear(6, 6)
        self.head = nn.Linear(6, vocab)

    def forward(self, input_ids, attention_mask=None):
        h = torch.tanh(self.mix(self.emb(input_ids)))
        return self.head(torch.cumsum(h, dim=1))  # causal: position t sees tokens <= t


class RecordingLMTask(CausalLMTask):
    def __init__(self):
        super().__init__()
        self.seen: set[type] = set()

    def _read(self, batch):
        self.seen.add(type(batch))
        return super()._read(batch)


def lm_batches(n: int = 12, t: int = 7, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, n, 4):
        ids = torch.randint(0, 11, (4, t), generator=g)
        mask = torch.ones(4, t, dtype=torch.long)
        mask[1, 5:] = 0
        labels = ids.masked_fill(mask == 0, -100)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def test_namedtuple_batches_fit_and_score_like_tuples():
    model = models.mlp()
    x, y = models.mlp_data(16)
    tuples = [(x[i:i + 4], y[i:i + 4]) for i in range(0, 16, 4)]
    pairs = [Pair(*b) for b in tuples]
    ref = fit_factors(model, ClassificationTask(), tuples, strategy="ekfac", fisher="empirical", capture_dtype=torch.float64)
    got = fit_factors(model, AttributeTask(), pairs, strategy="ekfac", fisher="empirical", capture_dtype=torch.float64)
    for name in ref.layers:
        for key, value in ref.tensors[name].items():
            torch.testing.assert_close(got.tensors[name][key], value, rtol=0, atol=0)
    scores_ref = InfluenceScorer(model, ClassificationTask(), ref, score_dtype=torch.float64).pairwise_scores(
        tuples[:1], tuples)
    scores = InfluenceScorer(model, AttributeTask(), got, score_dtype=torch.float64).pairwise_scores(pairs[:1], pairs)
    torch.testing.assert_close(scores, scores_ref, rtol=0, atol=0)
    assert scores.shape == (4, 16) and scores.abs().sum() > 0


def test_batch_encoding_batches_fit_and_score_like_dicts():
    model = TinyLM().double()
    dicts = lm_batches()
    encodings = [BatchEncoding(dict(b)) for b in dicts]
    task = RecordingLMTask()
    ref = fit_factors(model, CausalLMTask(), dicts, strategy="ekfac", fisher="empirical", capture_dtype=torch.float64)
    got = fit_factors(model, task, encodings, strategy="ekfac", fisher="empirical", capture_dtype=torch.float64)
    assert task.seen == {BatchEncoding}
    for name in ref.layers:
        for key, value in ref.tensors[name].items():
            torch.testing.assert_close(got.tensors[name][key], value, rtol=0, atol=0)
    ref_scores = InfluenceScorer(model, CausalLMTask(), ref, score_dtype=torch.float64).pairwise_scores(dicts[:1], dicts)
    scores = InfluenceScorer(model, task, got, score_dtype=torch.float64).pairwise_scores(encodings[:1], encodings)
    torch.testing.assert_close(scores, ref_scores, rtol=0, atol=0)


def test_query_measurements_slice_namedtuples_example_by_example():
    model = models.mlp()
    x, y = models.mlp_data(10)
    loader = [Pair(x[:6], y[:6]), Pair(x[6:], y[6:])]
    got = query_measurements(model, loader, AttributeTask())
    with torch.no_grad():  # independent: each example's log-likelihood on its own
        expected = torch.stack([-F.cross_entropy(model(x[i:i + 1]), y[i:i + 1], reduction="sum") for i in range(10)])
    torch.testing.assert_close(got, expected.to(torch.float64), rtol=1e-12, atol=1e-12)


def test_slice_batch_keeps_the_structure():
    batch = {"pair": Pair(torch.arange(6).reshape(3, 2), torch.arange(3)), "name": "kept",
             "nested": [torch.ones(3, 1) * torch.arange(3).reshape(3, 1)],
             "enc": BatchEncoding({"input_ids": torch.arange(3)[:, None].repeat(1, 4)})}
    one = _slice_batch(batch, 1)
    assert isinstance(one["pair"], Pair) and isinstance(one["enc"], BatchEncoding)
    assert one["pair"].x.tolist() == [[2, 3]] and one["pair"].y.tolist() == [1]
    assert one["nested"][0].tolist() == [[1.0]] and one["name"] == "kept"
    assert one["enc"]["input_ids"].tolist() == [[1, 1, 1, 1]]
