"""The sampled (true) Fisher converges to the analytic Fisher; sampling is seeded.

Softmax regression ``p = softmax(W [x, 1])`` with labels drawn from ``p`` has output gradient
``s = p - e_y``, so ``E_y[s s^T] = diag(p) - p p^T`` and, per example, ``E_y[DW_oi^2] =
(p_o - p_o^2) x_i^2`` (``x_i = 1`` for the bias column). Gaussian regression with unit variance
has ``s = -eps``, ``eps ~ N(0, I)``, so ``S -> I``.
"""

import pytest
import torch
from torch import nn

from lightning_influence import ClassificationTask, RegressionTask, fit_factors
from .dense import covariance_sum

N_POINTS = 500



def softmax_regression():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3)).double()
    with torch.no_grad():
        model[0].weight.mul_(3.0)  # confident but not saturated predictions: p far from uniform
        model[0].bias.copy_(torch.tensor([0.5, -0.3, 0.1]))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N_POINTS, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (N_POINTS,), generator=g)  # dataset labels: unused by the sampled Fisher
    return model, x, y


def repeated(x, y, repeats, batch_size=250):
    """The same points ``repeats`` times: each pass draws fresh labels for them."""
    return [(x[i:i + batch_size], y[i:i + batch_size]) for _ in range(repeats) for i in range(0, len(x), batch_size)]


def analytic(model, x):
    with torch.no_grad():
        p = torch.softmax(model(x), -1)
    xb = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    S = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]).mean(0)
    diag = ((p - p * p)[:, :, None] * (xb * xb)[:, None, :]).mean(0)
    return S, diag


def rel(a, b):
    return float((a - b).norm() / b.norm())


def sampled_errors(model, x, y, repeats, seed):
    batches = repeated(x, y, repeats, batch_size=5000)
    kfac = fit_factors(model, ClassificationTask(), batches, strategy="kfac", capture_dtype=torch.float64, seed=seed)
    diagonal = fit_factors(model, ClassificationTask(), batches, strategy="diagonal", capture_dtype=torch.float64,
                           seed=seed)
    t, d = kfac.tensors["0"], diagonal.tensors["0"]
    assert float(t["S_count"]) == float(t["A_count"]) == float(d["diag_count"]) == N_POINTS * repeats
    assert t["S_eigvecs"].shape == (3, 3) and d["diag_sum"].shape == (3, 5)  # bias column included
    S_true, diag_true = analytic(model, x)
    return rel(covariance_sum(t, "S") / t["S_count"], S_true), rel(d["diag_sum"] / d["diag_count"], diag_true)


def test_sampled_fisher_converges_to_analytic():
    model, x, y = softmax_regression()
    S_true, _ = analytic(model, x)
    assert float(torch.linalg.eigvalsh(S_true)[1]) > 0.02  # non-trivial Fisher (rank C-1)
    s_big, d_big = sampled_errors(model, x, y, 40, seed=0)  # 20,000 sampled labels
    assert s_big < 0.05 and d_big < 0.05
    # 500 sampled labels (one pass), averaged over seeds: ~sqrt(40) ~ 6 times larger on average.
    small = torch.tensor([sampled_errors(model, x, y, 1, seed=k) for k in range(1, 7)]).mean(0)
    assert small[0] > 2.5 * s_big and small[1] > 2.5 * d_big, (small, s_big, d_big)
    # The empirical Fisher of random labels is another matrix: the comparison can tell them apart.
    emp = fit_factors(model, ClassificationTask(), [(x, y)], strategy="kfac", fisher="empirical",
                      capture_dtype=torch.float64).tensors["0"]
    assert rel(covariance_sum(emp, "S") / emp["S_count"], S_true) > 5 * s_big


def test_sampled_regression_output_covariance_is_identity():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N_POINTS, 3, generator=g, dtype=torch.float64)
    y = 100 + torch.randn(N_POINTS, 4, generator=g, dtype=torch.float64)  # far from the predictions
    errors = {}
    for repeats in (1, 40):
        t = fit_factors(model, RegressionTask(), repeated(x, y, repeats), strategy="kfac",
                        capture_dtype=torch.float64).tensors["0"]
        errors[repeats] = rel(covariance_sum(t, "S") / t["S_count"], torch.eye(4, dtype=torch.float64))
    assert errors[40] < 0.05 and errors[1] > 2 * errors[40], errors


@pytest.mark.parametrize("strategy", ["diagonal", "kfac", "ekfac"])
def test_same_seed_bit_identical_other_seed_differs(strategy):
    model, x, y = softmax_regression()
    batches = repeated(x[:100], y[:100], 1, batch_size=25)
    fit = lambda seed: fit_factors(model, ClassificationTask(), batches, strategy=strategy, seed=seed)  # noqa: E731
    rng_before = torch.get_rng_state()
    a, b, c = fit(0), fit(0), fit(1)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global random stream is left alone
    ta, tb, tc = a.tensors["0"], b.tensors["0"], c.tensors["0"]
    assert ta.keys() == tb.keys() == tc.keys()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key
    sampled = {"diagonal": "diag_sum", "kfac": "S_eigvals", "ekfac": "lambda_sum"}[strategy]
    assert not torch.equal(ta[sampled], tc[sampled])
    if strategy != "diagonal":
        assert torch.equal(ta["A_eigvecs"], tc["A_eigvecs"]) and torch.equal(ta["A_eigvals"], tc["A_eigvals"])  # activations do not depend on the labels


def test_sample_labels_draws_from_the_softmax():
    """The inverse-CDF sampler's frequencies match softmax(logits) within 5 standard errors, per class, for
    several rows at once; a class of zero probability (a -inf logit) is never drawn."""
    from lightning_influence.tasks import sample_labels

    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 0.0, -1.0, float("-inf"), 0.5],
                           [-3.0, -3.0, 4.0, 1.0, float("-inf")]])
    n = 100_000
    draws = sample_labels(logits.repeat(n, 1)).view(n, 2)
    p = torch.softmax(logits, -1)
    for row in range(2):
        freq = torch.bincount(draws[:, row], minlength=5).double() / n
        se = (p[row] * (1 - p[row]) / n).sqrt().double()
        assert torch.all((freq - p[row].double()).abs() <= 5 * se + 1e-12), (row, freq, p[row])
    assert not (draws[:, 0] == 3).any() and not (draws[:, 1] == 4).any()
    # a wide vocabulary: every draw in range, the mean of the label matches E[label]
    wide = torch.randn(4, 32000)
    labels = sample_labels(wide.repeat(2000, 1)).view(2000, 4).double()
    expected = (torch.softmax(wide, -1).double() * torch.arange(32000.0, dtype=torch.float64)).sum(-1)
    assert labels.min() >= 0 and labels.max() < 32000
    assert torch.allclose(labels.mean(0), expected, rtol=0.05)


def test_sample_labels_refuses_non_finite_rows():
    from lightning_influence.errors import TaskInputError
    from lightning_influence.tasks import sample_labels

    bad = torch.zeros(4, 6)
    bad[2, 1] = float("nan")
    with pytest.raises(TaskInputError, match=r"not finite .* positions \[2\]"):
        sample_labels(bad)
    bad = torch.zeros(3, 6)
    bad[1] = float("-inf")  # no label has any probability
    with pytest.raises(TaskInputError, match=r"positions \[1\]"):
        sample_labels(bad)


def test_sampled_labels_do_not_depend_on_the_chunking_nor_on_copying_the_rows_out(monkeypatch):
    """Drawn a few rows at a time, from a mask over [B, T, C] logits, the labels are those of one draw over the
    gathered [N, C] rows with the same seed; a non-finite row is named by its position, not its chunk's."""
    from lightning_influence import tasks
    from lightning_influence.errors import TaskInputError

    logits = torch.randn(3, 7, 11)
    rows = torch.rand(3, 7) > 0.3
    torch.manual_seed(1)
    whole = tasks.sample_labels(logits[rows])
    monkeypatch.setattr(tasks, "SAMPLE_CHUNK_ELEMENTS", 22)  # two rows a chunk
    torch.manual_seed(1)
    assert torch.equal(tasks.sample_labels(logits, rows=rows), whole)
    torch.manual_seed(1)
    assert torch.equal(tasks.sample_labels(logits[rows]), whole)
    bad = torch.zeros(9, 11)
    bad[7, 3] = float("nan")
    with pytest.raises(TaskInputError, match=r"positions \[7\]"):
        tasks.sample_labels(bad)
