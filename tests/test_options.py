"""FitOptions / ScoreOptions: validated once, dtypes by name or torch.dtype, one set of names everywhere."""

import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_influence import ClassificationTask, InfluenceCallback, InfluenceModule, fit_factors
from lightning_influence.errors import OptionsError
from lightning_influence.options import DEFAULT_DAMPING_FACTOR, FitOptions, ScoreOptions, as_dtype

from . import models


def test_dtypes_by_name_or_dtype():
    assert FitOptions(capture_dtype="float64", stats_dtype="torch.float32").capture_dtype is torch.float64
    assert FitOptions(stats_dtype="torch.float32").stats_dtype is torch.float32
    assert ScoreOptions(score_dtype=torch.bfloat16).score_dtype is torch.bfloat16
    assert ScoreOptions(score_dtype="float16").score_dtype is torch.float16
    with pytest.raises(OptionsError, match="capture_dtype must be one of float32, float64"):
        FitOptions(capture_dtype="bfloat16")  # statistics never accumulate in less than float32
    with pytest.raises(OptionsError, match="score_dtype must be one of float32, float64, bfloat16, float16"):
        ScoreOptions(score_dtype="int8")
    with pytest.raises(OptionsError, match="stats_dtype"):
        as_dtype("float33", "stats_dtype", (torch.float64,))


@pytest.mark.parametrize("kwargs, message", [
    (dict(strategy="kfc"), "unknown strategy 'kfc'; choose one of identity, diagonal, kfac, ekfac"),
    (dict(fisher="true"), "unknown fisher 'true'; choose 'sampled'"),
    (dict(damping=-1.0), "damping must be a non-negative number or None"),
    (dict(damping=float("nan")), "damping must be"),
    (dict(damping_factor=True), "damping_factor must be a non-negative number"),
    (dict(max_batches=0), "max_batches must be a positive integer or None"),
    (dict(max_examples=2.5), "max_examples must be a positive integer"),
    (dict(seed=-1), "seed must be a non-negative integer"),
    (dict(modules=3), "modules must be a module name pattern"),
    (dict(module_types=["Linear"]), "module_types must be module classes"),
])
def test_fit_options_refused_with_the_valid_values(kwargs, message):
    with pytest.raises(OptionsError, match=message):
        FitOptions(**kwargs)
    # The callback's flat arguments are checked by the same code, as Lightning's configuration error.
    with pytest.raises(MisconfigurationException, match=message):
        InfluenceCallback(**kwargs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(query_rank=0), "query_rank must be a positive integer or None"),
    (dict(query_svd="lanczos"), r"query_svd must be one of \('randomized', 'exact'\)"),
    (dict(top_k=0), "top_k must be a positive integer"),
    (dict(tfidf_candidates=-3), "tfidf_candidates must be a positive integer"),
    (dict(layers=[1]), "layers must be"),
])
def test_score_options_refused_with_the_valid_values(kwargs, message):
    with pytest.raises(OptionsError, match=message):
        ScoreOptions(**kwargs)
    flat = {("score_layers" if k == "layers" else k): v for k, v in kwargs.items()}
    with pytest.raises(MisconfigurationException, match=message):
        InfluenceCallback(**flat)


def test_unknown_and_renamed_options_are_named():
    model, data = models.mlp(), models.mlp_data(8)
    with pytest.raises(OptionsError, match=r"unknown FitOptions option\(s\) \['dtype'\] \(renamed: capture_dtype"):
        fit_factors(model, ClassificationTask(), [data], strategy="kfac", dtype=torch.float64)
    factors = fit_factors(model, ClassificationTask(), [data], strategy="identity")
    with pytest.raises(MisconfigurationException, match="unknown ScoreOptions option.*score_dtype"):
        InfluenceModule(model, ClassificationTask(), factors, dtype=torch.float64)
    with pytest.raises(OptionsError, match="options must be a FitOptions"):
        fit_factors(model, ClassificationTask(), [data], ScoreOptions())


def test_one_object_or_keywords_give_the_same_factors():
    model, data = models.mlp(), models.mlp_data(12)
    batches = [models.split_batch(data, 4)]
    options = FitOptions(strategy="ekfac", fisher="empirical", capture_dtype="float64", max_batches=2)
    by_object = fit_factors(model, ClassificationTask(), batches[0], options)
    by_keywords = fit_factors(model, ClassificationTask(), batches[0], strategy="ekfac", fisher="empirical",
                              capture_dtype=torch.float64, max_batches=2)
    override = fit_factors(model, ClassificationTask(), batches[0], options, max_batches=3)
    for name in by_object.tensors:
        assert torch.equal(by_object.tensors[name]["lambda_sum"], by_keywords.tensors[name]["lambda_sum"])
    # Keywords on top of an object override it: 3 batches of 4 examples, not 2.
    assert float(by_object.tensors["0"]["lambda_count"]) == 8
    assert float(override.tensors["0"]["lambda_count"]) == 12
    assert by_object.tensors["0"]["A_eigvecs"].dtype == torch.float64


def test_damping_factor_default_lives_in_one_place(monkeypatch):
    assert FitOptions().damping_factor == DEFAULT_DAMPING_FACTOR == 0.1
    cb = InfluenceCallback()
    assert cb.fit_options == FitOptions() and cb.score_options == ScoreOptions()
    assert cb.damping_factor == DEFAULT_DAMPING_FACTOR


def test_callback_builds_both_option_objects():
    cb = InfluenceCallback(strategy="kfac", modules="net.*", capture_dtype="float64", score_dtype="bfloat16",
                           score_layers=["net.0"], query_rank=4, top_k=3, stats_dtype="float32")
    assert cb.fit_options == FitOptions(strategy="kfac", modules="net.*", capture_dtype=torch.float64,
                                        stats_dtype=torch.float32)
    assert cb.score_options == ScoreOptions(score_dtype=torch.bfloat16, layers=["net.0"], query_rank=4, top_k=3)
    assert cb.fit_options.to_json()["capture_dtype"] == "float64"
    assert FitOptions(module_types=[nn.Linear]).to_json()["module_types"] == ["torch.nn.modules.linear.Linear"]


def test_exclude_leaves_layers_out_of_fit_factors_and_the_callback(tmp_path):
    """`exclude=` (which the tied-weight warning names) reaches the selection everywhere."""
    model = models.mlp()
    data = models.mlp_data(8)
    kept = fit_factors(model, ClassificationTask(), [data], strategy="kfac", fisher="empirical", exclude=["0"])
    assert list(kept.layers) == ["2"]
    cb = InfluenceCallback(task="classification", exclude="0", output_dir=str(tmp_path))
    assert cb.fit_options.exclude == "0"
    with pytest.raises(OptionsError, match="exclude must be a module name pattern"):
        FitOptions(exclude=[1])
