"""Hugging Face dict batches with no task arguments: every non-label key goes to the model, ``.logits``
are read, and the attention mask excludes padding from every statistic and score.

The reference is the same examples fitted and scored one at a time without padding (batch size 1),
where there is nothing to mask.
"""

import pytest
import torch

from lightning_influence import CausalLMTask, ClassificationTask, InfluenceScorer, fit_factors
from lightning_influence.errors import TaskInputError

from . import models


def tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=13, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=12, max_position_embeddings=16, num_labels=3, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, attn_implementation="eager")
    return BertForSequenceClassification(config).double().eval()


def hf_classification_batch(n: int, pad_to: int, seed: int):
    """Right-padded ``{"input_ids", "attention_mask", "labels"}`` with lengths 2..pad_to-2 (padding in every batch)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(n, pad_to, dtype=torch.long)
    mask = torch.zeros(n, pad_to, dtype=torch.long)
    for i in range(n):
        length = int(torch.randint(2, pad_to - 1, (1,), generator=g))
        ids[i, :length] = torch.randint(1, 13, (length,), generator=g)
        mask[i, :length] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 3, (n,), generator=g)}


def unpadded_singles(batch):
    out = []
    for i in range(batch["input_ids"].shape[0]):
        length = int(batch["attention_mask"][i].sum())
        out.append({"input_ids": batch["input_ids"][i:i + 1, :length],
                    "attention_mask": batch["attention_mask"][i:i + 1, :length], "labels": batch["labels"][i:i + 1]})
    return out


def split(batch, size):
    n = batch["input_ids"].shape[0]
    return [{k: v[i:i + size] for k, v in batch.items()} for i in range(0, n, size)]


def scores(model, task, train, queries, strategy):
    factors = fit_factors(model, task, train, strategy=strategy, fisher="empirical", capture_dtype=torch.float64)
    scorer = InfluenceScorer(model, task, factors, score_dtype=torch.float64)
    return scorer.pairwise_scores(queries, train), scorer.self_scores(train)


@pytest.mark.parametrize("strategy", ["kfac", "ekfac"])
def test_bert_on_padded_dict_batches_equals_unpadded(strategy):
    model = tiny_bert()
    train = hf_classification_batch(6, pad_to=9, seed=1)
    queries = hf_classification_batch(2, pad_to=7, seed=2)
    task = ClassificationTask()
    pair, own = scores(model, task, split(train, 3), [queries], strategy)
    ref_pair, ref_own = scores(model, task, unpadded_singles(train), unpadded_singles(queries), strategy)
    assert ref_pair.abs().max() > 0 and (ref_own > 0).all()
    torch.testing.assert_close(pair, ref_pair, rtol=1e-7, atol=1e-9 * float(ref_pair.abs().max()))
    torch.testing.assert_close(own, ref_own, rtol=1e-7, atol=1e-9 * float(ref_own.abs().max()))


def test_bert_padding_would_change_the_scores_without_the_mask():
    """Guard for the test above: with the mask left out of the statistics, padding changes the scores."""
    model = tiny_bert()
    train = hf_classification_batch(6, pad_to=9, seed=1)
    queries = hf_classification_batch(2, pad_to=7, seed=2)
    unmasked = ClassificationTask(mask_key=None, input_keys=["input_ids", "attention_mask"])
    pair, _ = scores(model, unmasked, split(train, 3), [queries], "kfac")
    ref_pair, _ = scores(model, ClassificationTask(), unpadded_singles(train), unpadded_singles(queries), "kfac")
    assert not torch.allclose(pair, ref_pair, rtol=1e-3)


def test_single_input_key_refuses_to_drop_the_attention_mask():
    model = tiny_bert()
    batch = hf_classification_batch(3, pad_to=6, seed=1)
    with pytest.raises(TaskInputError, match=r"holds 'attention_mask'.*input_keys="):
        ClassificationTask(input_key="input_ids", target_key="labels").train_loss(model, batch)
    with pytest.raises(TaskInputError, match=r"leaves the batch's 'attention_mask' out"):
        ClassificationTask(input_keys=["input_ids"]).train_loss(model, batch)


def test_classification_key_options_read_renamed_batches():
    model = tiny_bert()
    batch = hf_classification_batch(4, pad_to=6, seed=3)
    renamed = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "target": batch["labels"]}
    expected = ClassificationTask().measurement(model, batch)
    got = ClassificationTask(label_key="target").measurement(model, renamed)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
    with pytest.raises(TaskInputError, match="label_key="):
        ClassificationTask().measurement(model, renamed)


class RenamedLM(models.TinySeqLM):
    """The same LM with other argument names, to read batches with other keys."""

    def forward(self, tokens, pad_mask=None):
        return super().forward(tokens)


def test_causal_lm_key_options():
    train = models.lm_batch(6, max_len=8, pad_to=10, seed=1)
    queries = models.lm_batch(2, max_len=7, seed=3, prompt_len=2)
    rename = lambda b: {"tokens": b["input_ids"], "pad_mask": b["attention_mask"], "targets": b["labels"]}  # noqa: E731
    torch.manual_seed(0)
    renamed_model = RenamedLM().double()
    task = CausalLMTask(label_key="targets", mask_key="pad_mask")
    pair, own = scores(renamed_model, task, [rename(b) for b in models.split_batch(train, 3)], [rename(queries)],
                       "ekfac")
    ref_pair, ref_own = scores(models.seq_lm(), CausalLMTask(), models.split_batch(train, 3), [queries], "ekfac")
    torch.testing.assert_close(pair, ref_pair, rtol=1e-10, atol=0)
    torch.testing.assert_close(own, ref_own, rtol=1e-10, atol=0)
    with pytest.raises(TaskInputError, match=r"lacks \['labels'\].*label_key="):
        CausalLMTask().train_loss(renamed_model, rename(train))
