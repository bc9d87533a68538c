"""The memory plan: exact byte counts for known shapes, refusal naming the layers, blocks that fit."""

import pytest
import torch

from lightning_influence.capture import TrackedLayer, find_tracked_layers
from lightning_influence.memory import MemoryBudgetError, format_bytes, parse_bytes, plan_memory


def gpt2_layers():
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.device("meta"):  # shapes only: no 124M-parameter allocation
        model = GPT2LMHeadModel(GPT2Config())
    return model, find_tracked_layers(model, ["lm_head", "transformer.h.*.mlp.*"])


def test_head_covariance_bytes_are_what_main_tried_to_allocate():
    model, layers = gpt2_layers()
    plan = plan_memory({"lm_head": layers["lm_head"]}, "ekfac", batch_size=8, tokens_per_example=128)
    cov = plan.phases[0]
    # S side 50257^2 + A side 768^2 float64: the 20,206,128,392-byte allocation of the issue, plus the A side.
    assert cov.parts["covariance sums"] == (50257 ** 2 + 768 ** 2) * 8
    with pytest.raises(MemoryBudgetError, match=r"lm_head.*50257x768") as err:
        plan.check(parse_bytes("16GiB"))
    assert "modules='mlp'" in str(err.value) and "block_size" in str(err.value)


def test_blocks_bring_the_head_under_budget_and_count_exactly():
    _, layers = gpt2_layers()
    plan = plan_memory({"lm_head": layers["lm_head"]}, "kfac", batch_size=8, tokens_per_example=128,
                       block_size=2048, block_threshold=8192)
    k = -(-50257 // 2048)
    assert plan.phases[0].parts["covariance sums"] == (k * 2048 ** 2 + 768 ** 2) * 8
    assert plan.layers[0].sides == f"S {k}x2048"
    plan.check(parse_bytes("4GiB"))


def test_plan_sums_over_layers_and_reports_tracked_share():
    layers = {"a": TrackedLayer("a", "linear", 3, 5, True), "b": TrackedLayer("b", "linear", 2, 4, False)}
    plan = plan_memory(layers, "ekfac", batch_size=2, tokens_per_example=7, stats_dtype=torch.float32,
                       model_parameters=100)
    cov = next(p for p in plan.phases if p.phase == "covariance pass")
    assert cov.parts["covariance sums"] == (9 + 25 + 4 + 16) * 4
    lam = next(p for p in plan.phases if p.phase == "eigenvalue correction")
    assert lam.parts["Lambda sums"] == (15 + 8) * 4
    assert plan.tracked_parameters == 23
    text = plan.table()
    assert "23.0% of the model's 100 parameters" in text and "eigenvalue correction" in text


def test_identity_plans_nothing_but_scoring():
    layers = {"a": TrackedLayer("a", "linear", 3, 5, True)}
    plan = plan_memory(layers, "identity", batch_size=2, tokens_per_example=7, num_queries=4)
    assert [p.phase for p in plan.phases] == ["scoring"]
    assert plan.phases[0].parts["queries"] == 4 * 15 * 4


def test_parse_and_format_bytes():
    assert parse_bytes("8GiB") == 8 * 1024 ** 3
    assert parse_bytes("1.5 GB") == 1_500_000_000
    assert parse_bytes(1024) == 1024
    for bad in ("lots", -1, 0, True):
        with pytest.raises(ValueError):
            parse_bytes(bad)
    assert format_bytes(20_206_128_392) == "18.82 GiB"
