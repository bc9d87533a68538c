"""Block-diagonal K-FAC / EK-FAC factors for wide layers (docs/method.md, section 6).

Checked against tests/dense.py: explicit Kronecker curvature matrices built from the token
covariances with their off-block entries zeroed (float64, bias column included), solved with
``linalg.solve``; one block must be the ordinary dense factors bit for bit.
"""

import json

import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_influence import CausalLMTask, ClassificationTask, InfluenceCallback, InfluenceFactors, InfluenceScorer
from lightning_influence import fit_factors
from lightning_influence.capture import find_tracked_layers
from lightning_influence.curvature.blocks import DEFAULT_BLOCK_SIZE, DEFAULT_BLOCK_THRESHOLD, side_layout
from lightning_influence.errors import FactorsError, OptionsError
from lightning_influence.memory import plan_memory
from lightning_influence.store import factors_fingerprint

from . import dense, models
from .test_scores_dense import ce_loss, ce_measure, lm_loss, lm_measure

KRONECKER = ["kfac", "ekfac"]


def blocks_of(block_size, block_threshold):
    """The dense reference's rule: the block size of a side of dimension ``dim`` (None: dense)."""
    def rule(dim):
        blocked = block_size is not None and (block_threshold is None or dim > block_threshold) and block_size < dim
        return block_size if blocked else None
    return rule


def check_against_dense(strategy, model, task, train, queries, loss, measure, block_size, block_threshold,
                        batch_size=4, mask=None):
    factors = fit_factors(model, task, models.split_batch(train, batch_size), strategy=strategy, fisher="empirical",
                          capture_dtype=torch.float64, block_size=block_size, block_threshold=block_threshold)
    scorer = InfluenceScorer(model, task, factors, score_dtype=torch.float64)
    modules = {n: model.get_submodule(n) for n in find_tracked_layers(model)}
    rule = blocks_of(block_size, block_threshold)
    ours = scorer.pairwise_scores(models.split_batch(queries, 2), models.split_batch(train, batch_size))
    expected = dense.dense_scores(strategy, model, modules, loss, measure, train, queries, mask, blocks=rule)
    scale = float(expected.abs().max())
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-7 * scale)
    ours_self = scorer.self_scores(models.split_batch(train, batch_size))
    expected_self = dense.dense_scores(strategy, model, modules, loss, measure, train, queries, mask, blocks=rule,
                                       self_scores=True)
    torch.testing.assert_close(ours_self, expected_self, rtol=1e-6, atol=1e-7 * float(expected_self.abs().max()))
    # The same fit without blocks gives other scores: the test can tell blocked from dense factors.
    unblocked = dense.dense_scores(strategy, model, modules, loss, measure, train, queries, mask)
    assert (unblocked - expected).abs().max() > 1e-4 * scale
    return factors


@pytest.mark.parametrize("strategy", KRONECKER)
@pytest.mark.parametrize("block_size", [2, 3, 4])
def test_mlp_blocked_matches_dense_with_off_blocks_zeroed(strategy, block_size):
    """Every side of Linear(5, 7) + Linear(7, 3) (bias columns: d_in 6 and 8) blocked; 3 and 4 leave a
    short last block (padding)."""
    factors = check_against_dense(strategy, models.mlp(bias=True), ClassificationTask(), models.mlp_data(16, seed=1),
                                  models.mlp_data(3, seed=2), ce_loss, ce_measure, block_size, None)
    s_side = side_layout(7, block_size, None)
    assert tuple(factors.tensors["0"]["S_eigvecs"].shape) == (s_side.num_blocks, block_size, block_size)
    assert tuple(factors.tensors["0"]["S_eigvecs"].shape) == (s_side.num_blocks, block_size, block_size)


@pytest.mark.parametrize("strategy", KRONECKER)
@pytest.mark.parametrize("max_len", [6, 20])
def test_tiny_gpt2_wide_sides_blocked_others_dense(strategy, max_len):
    """A threshold of 10 blocks GPT-2's 24- and 32-wide sides (attention, MLP, bias columns) and keeps the
    9-wide ones dense (mixed layers); sequences shorter and longer than the layers are wide (the Lambda
    pass and self-influence rotate tokens or per-example gradients)."""
    model = models.tiny_gpt2()
    train = models.lm_batch(6, vocab=11, max_len=max_len, seed=1)
    queries = models.lm_batch(2, vocab=11, max_len=max_len, seed=3, prompt_len=2)
    factors = check_against_dense(strategy, model, CausalLMTask(), train, queries, lm_loss, lm_measure, 5, 10,
                                  batch_size=3, mask=train["attention_mask"])
    shapes = {n: (tuple(t["S_eigvecs"].shape), tuple(t["A_eigvecs"].shape)) for n, t in factors.tensors.items()}
    assert shapes["transformer.h.0.attn.c_attn"] == ((5, 5, 5), (9, 9))  # d_out 24 blocked, d_in 8+1 dense
    assert shapes["transformer.h.0.mlp.c_proj"] == ((8, 8), (7, 5, 5))  # d_in 32+1 blocked


@pytest.mark.parametrize("strategy", KRONECKER)
def test_one_block_is_the_ordinary_factors_bit_for_bit(strategy):
    model = models.tiny_gpt2()
    train = models.lm_batch(4, vocab=11, max_len=8, seed=1)
    queries = models.lm_batch(2, vocab=11, max_len=7, seed=3, prompt_len=2)
    task = CausalLMTask()
    plain = fit_factors(model, task, [train], strategy=strategy, block_size=None)
    one_block = fit_factors(model, task, [train], strategy=strategy, block_size=64, block_threshold=None)
    for name, tensors in plain.tensors.items():
        assert set(tensors) == set(one_block.tensors[name])
        for key, value in tensors.items():
            assert torch.equal(value, one_block.tensors[name][key]), (name, key)
    for f in (plain, one_block):
        f.scores = InfluenceScorer(model, task, f).pairwise_scores([queries], [train])
        f.self = InfluenceScorer(model, task, f).self_scores([train])
    assert torch.equal(plain.scores, one_block.scores) and torch.equal(plain.self, one_block.self)


def test_block_layout_is_saved_and_changes_identity_and_fingerprint(tmp_path):
    model = models.mlp()
    task = ClassificationTask()
    batches = models.split_batch(models.mlp_data(12, seed=1), 4)
    blocked = fit_factors(model, task, batches, strategy="ekfac", block_size=3, block_threshold=None,
                          output_dir=tmp_path / "blocked")
    manifest = json.loads((tmp_path / "blocked" / "manifest.json").read_text())
    assert (manifest["block_size"], manifest["block_threshold"], manifest["format_version"]) == (3, None, 4)
    assert manifest["identity"]["options"]["block_size"] == 3
    loaded = InfluenceFactors.load(tmp_path / "blocked")
    assert (loaded.block_size, loaded.block_threshold) == (3, None)
    queries = models.split_batch(models.mlp_data(3, seed=2), 3)
    torch.testing.assert_close(InfluenceScorer(model, task, loaded).pairwise_scores(queries, batches),
                               InfluenceScorer(model, task, blocked).pairwise_scores(queries, batches), rtol=0, atol=0)
    dense_factors = fit_factors(model, task, batches, strategy="ekfac", block_size=None)
    # stored queries preconditioned by blocked factors are not reused with dense ones, and vice versa
    assert factors_fingerprint(blocked) != factors_fingerprint(dense_factors)
    # resuming partial factors with other block options refits, saying why
    partial = InfluenceFactors.load(tmp_path / "blocked")
    partial.set_phase("eigen")
    with pytest.warns(UserWarning, match="block_size"):
        refit = fit_factors(model, task, batches, strategy="ekfac", block_size=None, factors=partial)
    assert refit.tensors["0"]["S_eigvecs"].shape == (7, 7)


def test_callback_passes_block_options_and_refuses_bad_ones(tmp_path):
    cb = InfluenceCallback(task="classification", strategy="kfac", block_size=3, block_threshold=5,
                           output_dir=str(tmp_path))
    assert (cb.block_size, cb.block_threshold) == (3, 5)
    for bad in (dict(block_size=0), dict(block_size=2.5), dict(block_threshold=-1), dict(block_size=True)):
        with pytest.raises(MisconfigurationException, match="must be a positive integer or None"):
            InfluenceCallback(task="classification", **bad)
    with pytest.raises(OptionsError, match="block_size must be a positive integer"):
        fit_factors(models.mlp(), ClassificationTask(), [], block_size=0)


def test_defaults_block_only_very_wide_sides_and_agree_with_the_memory_plan():
    assert (DEFAULT_BLOCK_SIZE, DEFAULT_BLOCK_THRESHOLD) == (1024, 8192)
    assert side_layout(768, DEFAULT_BLOCK_SIZE, DEFAULT_BLOCK_THRESHOLD).dense
    assert side_layout(8192, DEFAULT_BLOCK_SIZE, DEFAULT_BLOCK_THRESHOLD).dense
    head = side_layout(50257, DEFAULT_BLOCK_SIZE, DEFAULT_BLOCK_THRESHOLD)
    assert (head.num_blocks, head.block) == (50, 1024)
    layer = find_tracked_layers(torch.nn.Sequential(torch.nn.Linear(4, 50)))["0"]
    f = InfluenceFactors("kfac", {"0": layer}, block_size=16, block_threshold=20)
    shapes = f.curvature.statistics("covariance", layer)
    assert shapes["S_sum"] == (4, 16, 16) and shapes["A_sum"] == (5, 5)
    plan = plan_memory({"0": layer}, f.curvature, batch_size=1, tokens_per_example=1)  # asks the strategy object
    assert plan.layers[0].sides == "S 4x16"
    expected = (4 * 16 * 16 + 5 * 5) * 8 + 2 * 8  # float64 covariance sums and their two token counts, as planned
    assert plan.phases[0].parts["sums"] == expected


def test_a_manifest_whose_block_options_do_not_match_its_tensors_is_refused(tmp_path):
    fit_factors(models.mlp(), ClassificationTask(), models.split_batch(models.mlp_data(8, seed=1), 4),
                strategy="kfac", block_size=3, block_threshold=None, output_dir=tmp_path)
    path = tmp_path / "manifest.json"
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps({**manifest, "block_size": None}))
    with pytest.raises(FactorsError, match=r"'0::S_eigvecs' is \(3, 3, 3\), the kfac factors with block_size=None.*"
                                           r"need \(7, 7\); the files are corrupt, refit the factors"):
        InfluenceFactors.load(tmp_path)
    path.write_text(json.dumps({**manifest, "block_size": 0}))
    with pytest.raises(FactorsError, match="corrupt.*block_size must be a positive integer"):
        InfluenceFactors.load(tmp_path)


def test_float32_statistics_keep_the_blocked_layout_and_agree_with_float64():
    model, task = models.mlp(), ClassificationTask()
    batches = models.split_batch(models.mlp_data(16, seed=1), 4)
    queries = models.split_batch(models.mlp_data(3, seed=2), 3)
    scores = {}
    for dtype in (torch.float64, torch.float32):
        f = fit_factors(model, task, batches, strategy="ekfac", block_size=3, block_threshold=None, stats_dtype=dtype,
                        capture_dtype=torch.float64)
        assert f.tensors["0"]["S_eigvecs"].dtype == dtype and f.tensors["0"]["S_eigvecs"].shape == (3, 3, 3)
        scores[dtype] = InfluenceScorer(model, task, f, score_dtype=torch.float64).pairwise_scores(queries, batches)
    torch.testing.assert_close(scores[torch.float32], scores[torch.float64], rtol=1e-4,
                               atol=1e-5 * float(scores[torch.float64].abs().max()))


def test_callback_fits_blocked_factors_and_refits_when_the_block_options_change(tmp_path):
    import warnings

    from . import lit_models as lm

    torch.manual_seed(0)
    model = lm.LitClassifier()
    trainer = lm.trainer(max_epochs=0)
    trainer.fit(model, datamodule=lm.ClassificationData())
    kwargs = dict(task="classification", strategy="ekfac", fisher="empirical", output_dir=str(tmp_path),
                  fit_on="manual")
    blocked = InfluenceCallback(block_size=4, block_threshold=None, **kwargs).fit_factors(trainer, model)
    reference = fit_factors(model, ClassificationTask(), lm.loader(lm.classification_data(48)), strategy="ekfac",
                            fisher="empirical", block_size=4, block_threshold=None)
    for name, tensors in reference.tensors.items():
        assert any(t.dim() == 3 for t in tensors.values())  # some side is blocked
        for key, value in tensors.items():
            torch.testing.assert_close(blocked.tensors[name][key], value, rtol=1e-6, atol=1e-9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # same options: resumed, no warning
        again = InfluenceCallback(block_size=4, block_threshold=None, **kwargs).fit_factors(trainer, model)
    assert torch.equal(again.tensors["net.0"]["S_eigvecs"], blocked.tensors["net.0"]["S_eigvecs"])
    with pytest.warns(UserWarning, match=r"refitting the factors.*options.block_size: 4 saved, null now"):
        dense_factors = InfluenceCallback(block_size=None, **kwargs).fit_factors(trainer, model)
    assert all(t.dim() <= 2 for t in dense_factors.tensors["net.0"].values())
