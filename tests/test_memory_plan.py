"""The memory plan: exact byte counts for known shapes, sizes asked from the strategy objects, refusal
naming the layers, the plan's factor bytes equal to a real fit's, the batch shape from one forward."""

import os
import warnings

import pytest
import torch
from torch import nn

from lightning_influence import ClassificationTask, fit_factors
from lightning_influence.capture import TrackedLayer, find_tracked_layers
from lightning_influence.curvature.blocks import SideLayout
from lightning_influence.curvature.kfac import KFACStrategy
from lightning_influence.curvature import get_strategy
from lightning_influence.memory import MemoryBudgetError, format_bytes, measure_batch, parse_bytes, plan_memory
from lightning_influence.options import FitOptions
from lightning_influence.errors import OptionsError

from . import models

F64 = 8


def gpt2_layers():
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.device("meta"):  # shapes only: no 124M-parameter allocation
        model = GPT2LMHeadModel(GPT2Config())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tied head, selected on purpose here
        return model, find_tracked_layers(model, ["lm_head", "transformer.h.*.mlp.*"])


def phase(plan, name):
    return next(p for p in plan.phases if p.phase == name)


def test_head_covariance_bytes_are_what_main_tried_to_allocate():
    model, layers = gpt2_layers()
    # Dense sides (block_size=None): what the code before block-diagonal factors allocated.
    dense = get_strategy("ekfac", block_size=None)
    plan = plan_memory({"lm_head": layers["lm_head"]}, dense, batch_size=8, tokens_per_example=128)
    assert [p.phase for p in plan.phases] == ["covariance pass", "covariance finish", "lambda pass", "scoring"]
    cov = phase(plan, "covariance pass")
    # S side 50257^2 + A side 768^2 float64 (the 20,206,128,392-byte allocation of the issue, plus the A side),
    # and the two float64 token counts.
    assert cov.parts["sums"] == (50257 ** 2 + 768 ** 2) * F64 + 2 * F64
    finish = phase(plan, "covariance finish")
    # the eigenvalues of both sides (the eigenbases are written over the sums), and one float64 eigh of the 50257 side (input, vectors, work)
    assert finish.parts["new factors"] == (50257 + 768) * F64  # eigenvalues; the bases replace the sums
    assert finish.parts["one layer's eigh"] == 3 * 50257 ** 2 * F64
    assert plan.peak.phase == "covariance finish"
    with pytest.raises(MemoryBudgetError, match=r"lm_head.*50257x768") as err:
        plan.check(parse_bytes("16GiB"))
    assert "modules='mlp'" in str(err.value) and "block_size" in str(err.value)


class _BlockedKFAC(KFACStrategy):
    """K-FAC whose sides wider than 8192 are blocks of 2048 (the shapes block-diagonal factors declare)."""

    name = "kfac_blocked_for_the_plan"

    def statistics(self, pass_name, layer):
        s, a = (SideLayout(d, 2048 if d > 8192 else None) for d in (layer.d_out, layer.d_in))
        return {"A_sum": a.matrix_shape, "S_sum": s.matrix_shape, "A_count": (), "S_count": ()}


def test_plan_takes_its_shapes_from_the_strategy_object():
    _, layers = gpt2_layers()
    plan = plan_memory({"lm_head": layers["lm_head"]}, _BlockedKFAC(), batch_size=8, tokens_per_example=128)
    k = -(-50257 // 2048)
    assert phase(plan, "covariance pass").parts["sums"] == (k * 2048 ** 2 + 768 ** 2) * F64 + 2 * F64
    # eigenvalues [k, b] follow the blocked sums (KFACStrategy.factor_shapes); the bases [k, b, b] replace the sums
    assert phase(plan, "covariance finish").parts["new factors"] == (k * 2048 + 768) * F64
    assert plan.layers[0].sides == f"S {k}x2048"
    plan.check(parse_bytes("4GiB"))


def test_plan_sums_over_layers_and_reports_tracked_share():
    layers = {"a": TrackedLayer("a", "linear", 3, 5, True), "b": TrackedLayer("b", "linear", 2, 4, False)}
    plan = plan_memory(layers, "ekfac", batch_size=2, tokens_per_example=7, stats_dtype=torch.float32,
                       model_parameters=100)
    f32, counts = 4, 4 * F64  # A_count and S_count of two layers
    cov = phase(plan, "covariance pass")
    assert cov.parts["sums"] == (25 + 9 + 16 + 4) * f32 + counts
    lam = phase(plan, "lambda pass")
    assert lam.parts["sums"] == (15 + 8) * f32 + 2 * F64
    # the covariance pass's bases (written over its sums), eigenvalues and counts stay; the bases are read again
    assert lam.parts["earlier factors"] == (25 + 9 + 16 + 4) * f32 + (5 + 3 + 4 + 2) * f32 + counts
    assert lam.parts["pass inputs"] == (25 + 9 + 16 + 4) * f32
    # every layer's activations (2 x 7 tokens) wait for the backward; then the largest layer's output
    # gradients, per-example gradients [2, d_out, d_in] and its update
    tokens = 14
    # (formed two examples at a time at most, and the layer's rotated tokens beside them)
    assert lam.parts["batch working set"] == (tokens * (5 + 4) * f32 + tokens * 3 * f32 + 2 * 15 * f32
                                              + tokens * (3 + 5) * f32 + 15 * f32 + F64)
    assert plan.tracked_parameters == 23
    assert plan.factor_file_bytes == lam.parts["earlier factors"] + lam.parts["sums"]
    text = plan.table()
    assert "23.0% of the model's 100 parameters" in text and "lambda pass" in text
    # what scoring adds per query (float32 by default): a [d_out, d_in] gradient per layer at full rank; at rank 32
    # each layer keeps min(32, d_out, d_in) pairs of [d_out] and [d_in] factors
    assert plan.per_query == {"full rank": (15 + 8) * f32, "query_rank=32": (3 * (3 + 5) + 2 * (2 + 4)) * f32}
    assert "scoring adds per query: 92 B at full rank, 144 B at query_rank=32" in text


def test_plan_factor_bytes_equal_a_real_fit(tmp_path):
    model = models.mlp(bias=True)
    data = models.mlp_data(12, seed=1)
    layers = find_tracked_layers(model)
    for strategy in ("ekfac", "kfac", "diagonal"):
        factors = fit_factors(model, ClassificationTask(), models.split_batch(data, 4), strategy=strategy)
        fitted = sum(t.numel() * t.element_size() for tensors in factors.tensors.values() for t in tensors.values())
        plan = plan_memory(layers, strategy, batch_size=4, tokens_per_example=1)
        assert plan.factor_file_bytes == fitted, strategy


def test_identity_plans_nothing_but_scoring():
    layers = {"a": TrackedLayer("a", "linear", 3, 5, True)}
    plan = plan_memory(layers, "identity", batch_size=2, tokens_per_example=7, num_queries=4)
    assert [p.phase for p in plan.phases] == ["scoring"]
    assert plan.phases[0].parts["queries"] == 4 * 15 * 4


def test_measure_batch_counts_each_layers_token_positions():
    model = models.tiny_gpt2()
    batch = models.lm_batch(3, vocab=11, max_len=9, pad_to=9, seed=1)
    from lightning_influence import CausalLMTask

    layers = find_tracked_layers(model)
    size, tokens, loss, activations = measure_batch(model, CausalLMTask(), layers, batch)
    assert size == 3 and set(tokens) == set(layers) and set(tokens.values()) == {9}
    assert torch.isfinite(loss) and not loss.requires_grad
    assert activations > 0
    conv = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    size, tokens, _, _ = measure_batch(conv, ClassificationTask(), find_tracked_layers(conv),
                                    (torch.randn(5, 1, 6, 6), torch.zeros(5, dtype=torch.long)))
    assert size == 5 and tokens == {"0": 16, "2": 1}  # a 4x4 output map: 16 patches per example


def test_parse_and_format_bytes_and_the_option():
    assert parse_bytes("8GiB") == 8 * 1024 ** 3
    assert parse_bytes("1.5 GB") == 1_500_000_000
    assert parse_bytes(1024) == 1024
    for bad in ("lots", -1, 0, True):
        with pytest.raises(ValueError):
            parse_bytes(bad)
    assert format_bytes(20_206_128_392) == "18.82 GiB"
    assert FitOptions(memory_budget="2MiB").memory_budget == 2 * 1024 ** 2
    assert FitOptions().memory_budget is None
    with pytest.raises(OptionsError, match="memory_budget"):
        FitOptions(memory_budget="plenty")


def test_the_plans_batch_is_drawn_without_iterating_the_passes_data():
    from torch.utils.data import DataLoader, Sampler, TensorDataset

    from lightning_influence.memory import first_batch

    class NoIteration(Sampler):
        def __init__(self):
            pass

        def __iter__(self):
            raise AssertionError("the plan iterated the loader")

        def __len__(self):
            return 10

    data = TensorDataset(torch.arange(10.0).reshape(10, 1), torch.zeros(10, dtype=torch.long))
    x, y = first_batch(DataLoader(data, batch_size=4, sampler=NoIteration()))
    assert x.shape == (4, 1) and torch.equal(x[:, 0], torch.arange(4.0))
    assert first_batch([("a",), ("b",)]) == ("a",) and first_batch([]) is None
    assert first_batch(iter([("a",)])) is None  # an iterator is never drawn from


def test_default_blocks_bring_the_gpt2_head_under_budget():
    """With the default block options the 50257-wide side is 50 blocks of 1024 (docs/method.md, section 6)."""
    _, layers = gpt2_layers()
    plan = plan_memory({"lm_head": layers["lm_head"]}, "ekfac", batch_size=8, tokens_per_example=128)
    cov = phase(plan, "covariance pass")
    assert cov.parts["sums"] == (50 * 1024 ** 2 + 768 ** 2) * F64 + 2 * F64
    assert plan.layers[0].sides == "S 50x1024"
    plan.check(parse_bytes("8GiB"))


def test_measure_batch_counts_what_autograd_saves():
    """The activation bytes are the storages the forward saves for its backward, parameters excepted: for
    Linear -> tanh -> Linear on [B, 8] float64 inputs: the input x (first Linear), the tanh output (tanh's
    backward and the second Linear's input), and what cross-entropy keeps (its log-softmax [B, 3])."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    batch = (torch.randn(32, 8, dtype=torch.float64), torch.zeros(32, dtype=torch.long))
    size, _, _, activations = measure_batch(model, ClassificationTask(), find_tracked_layers(model), batch)
    f64 = 8
    expected = 32 * 8 * f64 + 32 * 16 * f64 + 32 * 3 * f64  # x, tanh(h), log-softmax
    assert expected <= activations <= expected + 32 * 16 * f64 + 32 * 3 * f64 + 32 * 8, activations
    # the weights themselves (saved by the Linear layers) are not counted
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert activations < expected + weights
    with torch.inference_mode():
        assert measure_batch(model, ClassificationTask(), find_tracked_layers(model), batch)[3] == 0


def test_measure_batch_frees_its_forward():
    """The measured forward's activations are freed on return: a saved output handed back as it is by the
    counting hook would hold its own graph in a cycle Python's collector cannot see (on GPT-2 small, 1.3 GB
    held through the whole fit). The tanh output is such a saved output."""
    import weakref

    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    kept = []
    model[1].register_forward_hook(lambda m, i, out: kept.append(weakref.ref(out)))
    batch = (torch.randn(32, 8), torch.zeros(32, dtype=torch.long))
    measure_batch(model, ClassificationTask(), find_tracked_layers(model), batch)
    assert kept and kept[0]() is None


def test_offloading_plan_moves_earlier_factors_to_the_end_of_the_pass():
    layers = {"a": TrackedLayer("a", "linear", 30, 50, True)}
    kept = plan_memory(layers, "ekfac", batch_size=2, tokens_per_example=7)
    off = plan_memory(layers, "ekfac", batch_size=2, tokens_per_example=7, offload=True, activations=1000)
    assert phase(off, "lambda pass").parts["earlier factors"] == 0
    assert phase(off, "lambda end").parts["earlier factors"] == phase(kept, "lambda pass").parts["earlier factors"] > 0
    assert phase(off, "lambda pass").parts["model activations"] == 1000
    assert phase(off, "covariance pass").parts["model activations"] == 1000
    assert off.factor_file_bytes == kept.factor_file_bytes


def test_release_freed_memory_returns_heap_memory_on_glibc():
    """On Linux with glibc the freed heap of many mid-sized tensors goes back to the system (RSS drops by most of
    it); elsewhere the call is a no-op returning False."""
    import platform

    from lightning_influence.memory import release_freed_memory

    if platform.system() != "Linux":
        assert release_freed_memory() is False
        return
    rss = lambda: int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")  # noqa: E731
    keep = [torch.ones(1)]
    chunks = [torch.ones(16 * 1024) for _ in range(8000)]  # 64 KiB each, 500 MiB: below glibc's mmap threshold
    keep.append(torch.ones(16))  # allocated above them: the heap cannot shrink from its top alone
    del chunks
    before = rss()
    assert release_freed_memory() is True
    assert before - rss() > 200 * 2 ** 20
