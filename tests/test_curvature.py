"""Curvature strategies as objects: the registry, the interface the passes ask, and a new strategy
added from outside the library (one class, one registration) that fits, scores, saves and loads.

The new strategy ("scalar") preconditions every layer by ``1 / (c + lambda)`` with ``c`` the mean of
the diagonal Fisher, ``E_m ||DW_m||_F^2 / (d_out d_in)``; it is checked against an explicit
``(c I + lambda I)^-1`` solve on autograd per-example gradients (tests/dense.py).
"""

import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.exceptions import MisconfigurationException

import lightning_influence
from lightning_influence import ClassificationTask, InfluenceCallback, InfluenceFactors, InfluenceScorer, fit_factors
from lightning_influence.capture import find_tracked_layers, per_example_gradients
from lightning_influence.curvature import (DEFAULT_STRATEGY, UnknownStrategyError, get_strategy, register_strategy,
                                           strategy_class, strategy_names, unregister_strategy)
from lightning_influence.curvature.base import (COMPLETE, DEFAULT_DAMPING_FACTOR, CurvatureStrategy,
                                                StatisticsPass)
from lightning_influence.errors import FactorsError, OptionsError
from lightning_influence.passes import remaining_phases

from . import dense, lit_models as lm, models


class ScalarStrategy(CurvatureStrategy):
    """``G = c I`` per layer, ``c`` the mean squared per-example gradient entry."""

    name = "scalar"
    passes = (StatisticsPass("squares", "Influence: mean squared gradient", COMPLETE),)

    def statistics(self, pass_name, layer):
        return {"square_sum": (), "example_count": ()}

    def gradient_update(self, pass_name, layer, a, s, count, inputs):
        dw = per_example_gradients(a, s)
        return {"square_sum": dw.square().sum(), "example_count": torch.tensor(float(a.shape[0]))}

    def finish_pass(self, pass_name, layer, tensors):
        tensors["scale"] = tensors["square_sum"] / (tensors["example_count"] * layer.d_out * layer.d_in)

    def eigenvalues(self, layer, tensors):
        return tensors["scale"].expand(layer.shape)


@pytest.fixture
def scalar():
    register_strategy(ScalarStrategy)
    yield
    unregister_strategy("scalar")


def ce_loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="sum")


def ce_measure(model, batch):
    return -ce_loss(model, batch)


# ----------------------------------------------------------------- the registry
def test_registry_names_and_lookup():
    assert strategy_names() == ("identity", "diagonal", "kfac", "ekfac")
    assert DEFAULT_STRATEGY in strategy_names()
    for name in strategy_names():
        strategy = get_strategy(name)
        assert isinstance(strategy, CurvatureStrategy) and strategy.name == name
        assert isinstance(strategy, strategy_class(name))
    assert issubclass(strategy_class("ekfac"), strategy_class("kfac"))  # EK-FAC builds on K-FAC
    with pytest.raises(UnknownStrategyError, match="unknown strategy 'newton'; choose one of identity, diagonal, "
                                                   "kfac, ekfac$"):
        get_strategy("newton")
    # an option error where it is passed as an option, a factors error where it comes from a file
    assert issubclass(UnknownStrategyError, OptionsError) and issubclass(UnknownStrategyError, FactorsError)


def test_registration_is_checked(scalar):
    assert strategy_names()[-1] == "scalar"
    with pytest.raises(UnknownStrategyError, match="choose one of identity, diagonal, kfac, ekfac, scalar"):
        get_strategy("newton")
    register_strategy(ScalarStrategy)  # the same class again: a no-op
    with pytest.raises(OptionsError, match="'scalar' is registered already"):
        register_strategy(type("Other", (ScalarStrategy,), {}))
    with pytest.raises(OptionsError, match="CurvatureStrategy subclass"):
        register_strategy(dict)
    with pytest.raises(OptionsError, match="name must be a non-empty name"):
        register_strategy(type("Nameless", (CurvatureStrategy,), {}))
    unfinished = (StatisticsPass("squares", "t", "halfway"),)
    with pytest.raises(OptionsError, match="last pass must end in phase 'complete', not 'halfway'"):
        register_strategy(type("Unfinished", (ScalarStrategy,), {"name": "unfinished", "passes": unfinished}))
    twice = (StatisticsPass("squares", "t", "x"), StatisticsPass("squares", "t", COMPLETE))
    with pytest.raises(OptionsError, match="its own name and phase"):
        register_strategy(type("Twice", (ScalarStrategy,), {"name": "twice", "passes": twice}))
    assert "unfinished" not in strategy_names() and "twice" not in strategy_names()


# ----------------------------------------------------- what the passes ask
def test_builtin_passes_phases_and_statistics():
    layer = find_tracked_layers(models.mlp())["0"]  # Linear(5, 7) with bias: d_out 7, d_in 6
    ekfac, kfac = get_strategy("ekfac"), get_strategy("kfac")
    assert [(p.name, p.phase, p.forward_side) for p in ekfac.passes] == [
        ("covariance", "eigen", True), ("lambda", COMPLETE, False)]
    assert ekfac.phases == ("none", "eigen", COMPLETE)
    assert [p.name for p in ekfac.remaining_passes("none")] == ["covariance", "lambda"]
    assert [p.name for p in ekfac.remaining_passes("eigen")] == ["lambda"]
    assert ekfac.remaining_passes(COMPLETE) == ()
    assert ekfac.statistics("covariance", layer) == {"A_sum": (6, 6), "S_sum": (7, 7), "A_count": (), "S_count": ()}
    assert ekfac.statistics("lambda", layer) == {"lambda_sum": (7, 6), "lambda_count": ()}
    assert [(p.name, p.phase) for p in kfac.passes] == [("covariance", COMPLETE)]
    assert get_strategy("diagonal").statistics("diagonal", layer) == {"diag_sum": (7, 6), "diag_count": ()}
    identity = get_strategy("identity")
    assert identity.passes == () and identity.phases == (COMPLETE,) and identity.initial_phase == COMPLETE
    titles = {p.name: p.title for n in strategy_names() for p in get_strategy(n).passes}
    assert titles == {"covariance": "Influence: covariances", "lambda": "Influence: eigenvalue correction",
                      "diagonal": "Influence: diagonal Fisher"}
    with pytest.raises(FactorsError, match="strategy 'kfac' has no 'lambda' pass"):
        kfac.get_pass("lambda")
    with pytest.raises(FactorsError, match="phase 'halfway' is not a phase of strategy 'ekfac'"):
        ekfac.remaining_passes("halfway")


def test_ekfac_eigenvalues_and_dense_matrix_against_dense_reference():
    """The strategy objects' eigenvalues, damping and explicit matrix, against the dense curvature."""
    model = models.mlp()
    train = models.mlp_data(14, seed=1)
    modules = {n: model.get_submodule(n) for n in find_tracked_layers(model)}
    grads = dense.per_example_grads(model, modules, ce_loss, train)
    covs = dense.covariances(model, modules, ce_loss, train)
    for strategy in ("diagonal", "kfac", "ekfac"):
        factors = fit_factors(model, ClassificationTask(), models.split_batch(train, 5), strategy=strategy,
                              fisher="empirical", capture_dtype=torch.float64)
        assert factors.curvature.name == factors.strategy == strategy
        for name in modules:
            expected, damping = dense.dense_curvature(strategy, *covs[name], grads[name])
            ours = factors.dense_matrix(name)
            assert ours.dtype == torch.float64
            torch.testing.assert_close(ours, expected, rtol=1e-8, atol=1e-10 * float(expected.abs().max()))
            assert factors.damping_for(name) == pytest.approx(float(damping), rel=1e-10)
            # precondition is the explicit solve; inverse_quadratic its quadratic form
            v = grads[name][:3]
            solved = torch.linalg.solve(expected + damping * torch.eye(expected.shape[0], dtype=torch.float64), v.T).T
            pre = factors.precondition(name, v.reshape(3, *factors.layers[name].shape))
            torch.testing.assert_close(pre.flatten(1), solved, rtol=1e-7, atol=1e-9 * float(solved.abs().max()))
            quad = factors.inverse_quadratic(name, v.reshape(3, *factors.layers[name].shape))
            torch.testing.assert_close(quad, (v * solved).sum(1), rtol=1e-7, atol=0)


def test_identity_is_the_plain_dot_product():
    layers = find_tracked_layers(models.mlp())
    factors = InfluenceFactors("identity", layers)
    assert factors.is_complete and remaining_phases(factors) == []
    v = torch.randn(2, 7, 6, dtype=torch.float64)
    assert torch.equal(factors.precondition("0", v), v)
    torch.testing.assert_close(factors.inverse_quadratic("0", v), (v * v).sum((1, 2)))
    assert torch.equal(factors.dense_matrix("0"), torch.eye(42, dtype=torch.float64))
    assert factors.damping_for("0") == 0.0


def test_damping_factor_default_lives_in_one_place():
    factors = InfluenceFactors("kfac", find_tracked_layers(models.mlp()))
    assert factors.damping_factor == DEFAULT_DAMPING_FACTOR == 0.1
    assert InfluenceCallback().damping_factor == DEFAULT_DAMPING_FACTOR


def test_no_strategy_branching_outside_the_registry():
    root = Path(lightning_influence.__file__).parent
    branch = re.compile(r"""(strategy|phase)\s*(==|!=|\bin\b)\s*[(\[{]?\s*["'](identity|diagonal|kfac|ekfac|eigen|"""
                        r"""covariance|lambda|complete)""")
    offenders = [f"{path.relative_to(root)}:{i}" for path in root.rglob("*.py") if "curvature" not in path.parts
                 for i, line in enumerate(path.read_text().splitlines(), 1) if branch.search(line)]
    assert offenders == []
    assert not hasattr(lightning_influence.factors, "PHASES_BY_STRATEGY")


# ------------------------------------------------------------ a new strategy
def test_new_strategy_fits_scores_saves_and_loads(scalar, tmp_path):
    model = models.mlp()
    train, queries = models.mlp_data(14, seed=1), models.mlp_data(3, seed=2)
    task = ClassificationTask()
    factors = fit_factors(model, task, models.split_batch(train, 5), strategy="scalar", fisher="empirical",
                          capture_dtype=torch.float64, output_dir=tmp_path)
    assert isinstance(factors.curvature, ScalarStrategy) and factors.is_complete
    scorer = InfluenceScorer(model, task, factors, score_dtype=torch.float64)
    pairwise = scorer.pairwise_scores(models.split_batch(queries, 2), models.split_batch(train, 5))
    own = scorer.self_scores(models.split_batch(train, 5))

    # Dense: G = c I per layer, c = E_m ||DW_m||^2 / (d_out d_in), lambda = 0.1 c, solved explicitly.
    modules = {n: model.get_submodule(n) for n in find_tracked_layers(model)}
    g_train = dense.per_example_grads(model, modules, ce_loss, train)
    g_query = dense.per_example_grads(model, modules, ce_measure, queries)
    expected, expected_self = 0, 0
    for name in modules:
        c = float((g_train[name] ** 2).mean())
        assert factors.damping_for(name) == pytest.approx(0.1 * c, rel=1e-10)
        eye = torch.eye(g_train[name].shape[1], dtype=torch.float64)
        solved = torch.linalg.solve(c * eye + 0.1 * c * eye, g_train[name].T)
        expected = expected - g_query[name] @ solved
        expected_self = expected_self + (g_train[name] * solved.T).sum(1)
    torch.testing.assert_close(pairwise, expected, rtol=1e-8, atol=1e-10 * float(expected.abs().max()))
    torch.testing.assert_close(own, expected_self, rtol=1e-8, atol=0)

    # Saved after its pass under its own name; loaded back into the same strategy, same scores.
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["strategy"] == "scalar" and manifest["phase"] == COMPLETE
    loaded = InfluenceFactors.load(tmp_path)
    assert isinstance(loaded.curvature, ScalarStrategy) and loaded.tensors["0"].keys() == factors.tensors["0"].keys()
    again = InfluenceScorer(model, task, loaded, score_dtype=torch.float64).pairwise_scores(
        models.split_batch(queries, 2), models.split_batch(train, 5))
    torch.testing.assert_close(again, pairwise, rtol=0, atol=0)


def test_factors_of_an_unregistered_strategy_are_refused(scalar, tmp_path):
    fit_factors(models.mlp(), ClassificationTask(), models.split_batch(models.mlp_data(8), 4), strategy="scalar",
                output_dir=tmp_path)
    unregister_strategy("scalar")
    try:
        with pytest.raises(FactorsError, match="unknown strategy 'scalar'; choose one of identity, diagonal"):
            InfluenceFactors.load(tmp_path)
    finally:
        register_strategy(ScalarStrategy)


def test_new_strategy_through_the_callback(scalar, tmp_path, monkeypatch):
    """The callback runs a registered strategy's passes under its titles, with no change of its own."""
    import lightning_influence.integration.callback as cb_mod

    titles = []
    real_bar = cb_mod.progress_bar
    monkeypatch.setattr(cb_mod, "progress_bar", lambda total, desc, enabled=True: (titles.append(desc),
                                                                                   real_bar(total, desc, enabled))[1])
    torch.manual_seed(0)
    model = lm.LitClassifier()
    cb = InfluenceCallback(task="classification", strategy="scalar", fisher="empirical", fit_on="manual",
                           output_dir=str(tmp_path))
    trainer = lm.trainer(callbacks=[cb], max_epochs=0)
    trainer.fit(model, datamodule=lm.ClassificationData())
    factors = cb.fit_factors(trainer, model)
    assert titles == ["Influence: mean squared gradient"]
    reference = fit_factors(model, ClassificationTask(), lm.loader(lm.classification_data(48)), strategy="scalar",
                            fisher="empirical")
    for name in reference.layers:  # the callback's loader shuffles: the same sums in another order
        torch.testing.assert_close(factors.tensors[name]["scale"], reference.tensors[name]["scale"], rtol=1e-6, atol=0)
    assert InfluenceFactors.load(tmp_path).strategy == "scalar"
    with pytest.raises(MisconfigurationException, match="unknown strategy 'scalr'.*ekfac, scalar"):
        InfluenceCallback(strategy="scalr")


def test_squared_per_example_sum_in_chunks_equals_the_whole_batch(monkeypatch):
    """Forming per-example gradients a few at a time (as EK-FAC's Lambda and the diagonal Fisher do) gives the
    same sums as the whole [B, d_out, d_in] batch, with and without a transform, for chunks of 1, 2 and 3."""
    import lightning_influence.capture as capture

    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 4, 6, generator=g, dtype=torch.float64)
    s = torch.randn(5, 4, 3, generator=g, dtype=torch.float64)
    q = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))[0]
    whole = torch.einsum("bto,bti->boi", s, a)
    for chunk in (1, 2, 3):
        monkeypatch.setattr(capture, "PER_EXAMPLE_CHUNK_ELEMENTS", chunk * 18)
        assert capture.per_example_chunk(5, 3, 6) == chunk
        torch.testing.assert_close(capture.squared_per_example_sum(a, s), whole.square().sum(0), rtol=1e-12, atol=0)
        torch.testing.assert_close(capture.squared_per_example_sum(a, s, lambda dw: q.T @ dw),
                                   (q.T @ whole).square().sum(0), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("strategy", ["kfac", "ekfac", "diagonal"])
def test_fits_and_self_influence_do_not_depend_on_the_per_example_chunk(monkeypatch, strategy):
    """One example at a time (the chunk a wide head gets) gives the factors and self-influence of whole batches."""
    import lightning_influence.capture as capture
    from lightning_influence import ClassificationTask, InfluenceScorer, fit_factors

    model, task = models.mlp(), ClassificationTask()
    batches = models.split_batch(models.mlp_data(12, seed=1), 4)
    whole = fit_factors(model, task, batches, strategy=strategy, fisher="empirical")
    whole_self = InfluenceScorer(model, task, whole).self_scores(batches)
    monkeypatch.setattr(capture, "PER_EXAMPLE_CHUNK_ELEMENTS", 1)
    one = fit_factors(model, task, batches, strategy=strategy, fisher="empirical")
    for name in whole.tensors:
        for key, value in whole.tensors[name].items():
            torch.testing.assert_close(one.tensors[name][key], value, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(InfluenceScorer(model, task, one).self_scores(batches), whole_self, rtol=1e-10,
                               atol=0)


@pytest.mark.parametrize("rank", [None, 2])
def test_query_gradients_do_not_depend_on_the_per_example_chunk(monkeypatch, rank):
    """Preconditioning (and the low-rank factorisation of) the queries one at a time, as a wide head gets them,
    gives the scores of whole query batches, at full rank and at rank 2 (K-FAC's token-space rotation)."""
    import lightning_influence.capture as capture
    from lightning_influence import CausalLMTask, InfluenceScorer, fit_factors

    model, task = models.tiny_gpt2(), CausalLMTask()
    train = models.split_batch(models.lm_batch(6, vocab=11, max_len=5, seed=1), 3)
    queries = [models.lm_batch(3, vocab=11, max_len=5, seed=2, prompt_len=2)]
    factors = fit_factors(model, task, train, strategy="ekfac", fisher="empirical")
    whole = InfluenceScorer(model, task, factors, query_rank=rank, query_svd="exact").pairwise_scores(queries, train)
    monkeypatch.setattr(capture, "PER_EXAMPLE_CHUNK_ELEMENTS", 1)
    one = InfluenceScorer(model, task, factors, query_rank=rank, query_svd="exact").pairwise_scores(queries, train)
    torch.testing.assert_close(one, whole, rtol=1e-6, atol=1e-6 * float(whole.abs().max()))
