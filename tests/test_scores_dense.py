"""Every strategy's scores against an explicit dense computation, on every layer type."""

import pytest
import torch
import torch.nn.functional as F

from lightning_influence import CausalLMTask, ClassificationTask, InfluenceScorer, fit_factors
from lightning_influence.capture import find_tracked_layers

from . import dense, models

STRATEGIES = ["identity", "diagonal", "kfac", "ekfac"]


def ce_loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="sum")


def ce_measure(model, batch):
    return -ce_loss(model, batch)


def lm_loss(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = getattr(logits, "logits", logits)[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                           ignore_index=-100, reduction="sum")


def lm_measure(model, batch):
    return -lm_loss(model, batch)


def run_case(strategy, model, task, train, queries, loss, measure, mask=None, batch_size=4):
    factors = fit_factors(model, task, models.split_batch(train, batch_size), strategy=strategy,
                          fisher="empirical", capture_dtype=torch.float64)
    scorer = InfluenceScorer(model, task, factors, score_dtype=torch.float64)
    ours = scorer.pairwise_scores(models.split_batch(queries, 2), models.split_batch(train, batch_size))
    modules = {n: model.get_submodule(n) for n in find_tracked_layers(model)}
    expected = dense.dense_scores(strategy, model, modules, loss, measure, train, queries, mask)
    scale = expected.abs().max()
    assert scale > 0
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-7 * scale)
    return ours, factors, scorer


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("bias", [True, False])
def test_mlp(strategy, bias):
    model = models.mlp(bias=bias)
    train, queries = models.mlp_data(16, seed=1), models.mlp_data(3, seed=2)
    run_case(strategy, model, ClassificationTask(), train, queries, ce_loss, ce_measure)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_shared_weights_and_inplace_activation(strategy):
    """A layer called twice per forward (its covariances count both calls' tokens, its per-example
    gradient sums both) and a ReLU(inplace=True) right after a tracked layer."""
    model = models.shared_mlp()
    train, queries = models.mlp_data(16, seed=1), models.mlp_data(3, seed=2)
    run_case(strategy, model, ClassificationTask(), train, queries, ce_loss, ce_measure)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_conv2d(strategy):
    model = models.convnet()
    train, queries = models.conv_data(10, seed=1), models.conv_data(3, seed=2)
    run_case(strategy, model, ClassificationTask(), train, queries, ce_loss, ce_measure)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_padded_sequence_model(strategy):
    model = models.seq_lm()
    train = models.lm_batch(8, max_len=7, pad_to=10, seed=1)
    queries = models.lm_batch(3, max_len=6, seed=2, prompt_len=2)
    run_case(strategy, model, CausalLMTask(), train, queries, lm_loss, lm_measure, mask=train["attention_mask"])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_tiny_gpt2_conv1d(strategy):
    model = models.tiny_gpt2()
    train = models.lm_batch(6, vocab=11, max_len=8, pad_to=9, seed=1)
    queries = models.lm_batch(2, vocab=11, max_len=7, seed=3, prompt_len=3)
    run_case(strategy, model, CausalLMTask(), train, queries, lm_loss, lm_measure, mask=train["attention_mask"],
             batch_size=3)


def test_identity_is_plain_gradient_dot_product_from_torch_func():
    """identity == -<grad f(q), grad L(m)> with gradients from torch.func (vmap over examples)."""
    from torch.func import functional_call, grad, vmap

    model = models.mlp()
    train, queries = models.mlp_data(12, seed=1), models.mlp_data(3, seed=2)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_one(p, x, y):
        return F.cross_entropy(functional_call(model, p, (x.unsqueeze(0),)), y.unsqueeze(0), reduction="sum")

    gt = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, *train)
    gq = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, *queries)
    flat = lambda g: torch.cat([v.flatten(1) for v in g.values()], 1)  # noqa: E731
    expected = -(-flat(gq)) @ flat(gt).T  # grad f = -grad loss_q
    factors = fit_factors(model, ClassificationTask(), [train], strategy="identity")
    ours = InfluenceScorer(model, ClassificationTask(), factors, score_dtype=torch.float64).pairwise_scores([queries], [train])
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-12)


def test_positive_score_means_training_step_raises_query_likelihood():
    """A small SGD step on example m changes f(q) by lr * identity score (first order)."""
    model = models.mlp()
    train, queries = models.mlp_data(8, seed=1), models.mlp_data(2, seed=2)
    task = ClassificationTask()
    factors = fit_factors(model, task, [train], strategy="identity")
    scores = InfluenceScorer(model, task, factors, score_dtype=torch.float64).pairwise_scores([queries], [train])
    lr = 1e-6
    before = torch.stack([task.measurement(model, dense.single(queries, q)) for q in range(2)]).detach()
    for m in range(8):
        step = models.mlp()
        step.load_state_dict(model.state_dict())
        ce_loss(step, dense.single(train, m)).backward()
        with torch.no_grad():
            for p in step.parameters():
                p -= lr * p.grad
        after = torch.stack([task.measurement(step, dense.single(queries, q)) for q in range(2)]).detach()
        torch.testing.assert_close((after - before) / lr, scores[:, m], rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_self_scores_match_dense_diagonal(strategy):
    model = models.mlp()
    train = models.mlp_data(10, seed=1)
    task = ClassificationTask()
    factors = fit_factors(model, task, models.split_batch(train, 4), strategy=strategy, fisher="empirical")
    scorer = InfluenceScorer(model, task, factors, score_dtype=torch.float64)
    self_scores = scorer.self_scores(models.split_batch(train, 4))
    # Self-influence is score(m, m) with the measurement = -loss of m itself.
    pair = scorer.pairwise_scores(models.split_batch(train, 4), models.split_batch(train, 4))
    torch.testing.assert_close(self_scores, pair.diagonal(), rtol=1e-8, atol=1e-10)
    assert (self_scores > 0).all()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_layer_scores_sum_to_total(strategy):
    model = models.tiny_gpt2()
    train = models.lm_batch(4, vocab=11, max_len=8, seed=1)
    queries = models.lm_batch(2, vocab=11, max_len=7, seed=3, prompt_len=2)
    task = CausalLMTask()
    factors = fit_factors(model, task, [train], strategy=strategy, fisher="empirical", capture_dtype=torch.float64)
    scorer = InfluenceScorer(model, task, factors, score_dtype=torch.float64)
    per_layer = scorer.pairwise_scores([queries], [train], per_layer=True)
    assert per_layer.shape == (len(factors.layers), 2, 4)
    torch.testing.assert_close(per_layer.sum(0), scorer.pairwise_scores([queries], [train]))
