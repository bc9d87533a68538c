"""Factor files: exact round trips, model checks, corruption, atomic replacement, resume."""

import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

import lightning_influence.factors as factors_mod
from lightning_influence import store
from lightning_influence import ClassificationTask, InfluenceFactors, InfluenceScorer, fit_factors
from lightning_influence.errors import FactorsError, OptionsError
from lightning_influence.passes import run_phase
from lightning_influence.capture import find_tracked_layers

from . import models

STRATEGIES = ["identity", "diagonal", "kfac", "ekfac"]



class Counting:
    """A re-iterable over batches that counts how many batches were drawn from it."""

    def __init__(self, batches, fail_after: int | None = None):
        self.batches = list(batches)
        self.drawn = 0
        self.fail_after = fail_after

    def __iter__(self):
        for b in self.batches:
            if self.fail_after is not None and self.drawn >= self.fail_after:
                raise RuntimeError("killed mid-pass")
            self.drawn += 1
            yield b


def train_batches():
    return models.split_batch(models.mlp_data(12, seed=1), 4)


def fitted(strategy, **kw):
    return fit_factors(models.mlp(), ClassificationTask(), train_batches(), strategy=strategy, **kw)


def assert_identical(a: InfluenceFactors, b: InfluenceFactors):
    assert (a.strategy, a.fisher, a.damping, a.damping_factor, a.phase, a.metadata) == (
        b.strategy, b.fisher, b.damping, b.damping_factor, b.phase, b.metadata)
    assert a.layers == b.layers
    assert a.tensors.keys() == b.tensors.keys()
    for name in a.tensors:
        assert a.tensors[name].keys() == b.tensors[name].keys(), name
        for key, value in a.tensors[name].items():
            other = b.tensors[name][key]
            assert value.dtype == other.dtype and value.shape == other.shape, (name, key)
            assert torch.equal(value, other), (name, key)


def tensor_files(directory):
    return sorted(p.name for p in Path(directory).iterdir() if p.name != "manifest.json")


# ----------------------------------------------------------------- round trips
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("fisher, damping", [("sampled", None), ("empirical", 0.25)])
def test_round_trip_is_exact(tmp_path, strategy, fisher, damping):
    f = fitted(strategy, fisher=fisher, damping=damping, damping_factor=0.05)
    f.metadata["note"] = "kept"
    f.save(tmp_path)
    g = InfluenceFactors.load(tmp_path)
    assert_identical(f, g)
    assert g.is_complete
    if strategy != "identity":
        for name in f.layers:
            assert torch.equal(f.eigenvalues(name), g.eigenvalues(name))
            assert f.damping_for(name) == g.damping_for(name)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["strategy"] == strategy and manifest["phase"] == "complete"


def test_round_trip_of_unfinished_ekfac(tmp_path):
    f = InfluenceFactors("ekfac", find_tracked_layers(models.mlp()), fisher="empirical")
    run_phase("covariance", f, models.mlp(), ClassificationTask(), train_batches())
    assert f.phase == "eigen"
    f.save(tmp_path)
    g = InfluenceFactors.load(tmp_path)
    assert_identical(f, g)
    assert not g.is_complete and "lambda_sum" not in g.tensors["0"]
    with pytest.raises(FactorsError, match="unfinished"):
        InfluenceScorer(models.mlp(), ClassificationTask(), g)


# --------------------------------------------------------------- model checks
def test_factors_for_another_model_are_refused():
    f = fitted("kfac")
    wider = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    with pytest.raises(FactorsError, match=r"module '0' is linear \(7, 6\) in the factors|Refit"):
        f.check_model(find_tracked_layers(wider))
    with pytest.raises(FactorsError, match="another model"):
        InfluenceScorer(wider, ClassificationTask(), f)
    no_bias = models.mlp(bias=False)
    with pytest.raises(FactorsError, match=r"\(7, 5\)"):
        InfluenceScorer(no_bias, ClassificationTask(), f)
    # Other module names: check_model names what differs.
    renamed = nn.Sequential()
    renamed.add_module("first", nn.Linear(5, 7))
    renamed.add_module("act", nn.Tanh())
    renamed.add_module("2", nn.Linear(7, 3))
    with pytest.raises(FactorsError, match=r"in the factors only: \['0'\]; tracked now only: \['first'\]"):
        f.check_model(find_tracked_layers(renamed.double()))
    with pytest.raises(FactorsError, match="'0'"):
        InfluenceScorer(renamed.double(), ClassificationTask(), f)
    # A module frozen since fitting is not tracked any more.
    frozen = models.mlp()
    frozen[2].requires_grad_(False)
    with pytest.raises(FactorsError, match=r"in the factors only: \['2'\]"):
        InfluenceScorer(frozen, ClassificationTask(), f)


def test_kind_mismatch_is_refused():
    from transformers.pytorch_utils import Conv1D

    f = fitted("diagonal")
    conv1d = nn.Sequential(Conv1D(7, 5), nn.Tanh(), nn.Linear(7, 3)).double()
    with pytest.raises(FactorsError, match="conv1d"):
        f.check_model(find_tracked_layers(conv1d))


# ----------------------------------------------------------------- corruption
@pytest.fixture
def saved(tmp_path):
    f = fitted("ekfac")
    f.save(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    return tmp_path, tmp_path / manifest["tensor_files"]["lambda"], manifest


def test_truncated_tensor_file(saved):
    directory, tensor_file, _ = saved
    data = tensor_file.read_bytes()
    tensor_file.write_bytes(data[: len(data) // 2])
    with pytest.raises(FactorsError, match="truncated or corrupt.*refit"):
        InfluenceFactors.load(directory)


def test_byte_flipped_tensor_file(saved):
    directory, tensor_file, _ = saved
    data = bytearray(tensor_file.read_bytes())
    data[-3] ^= 0x10  # inside the last tensor's float64 payload: still a valid safetensors file
    tensor_file.write_bytes(bytes(data))
    with pytest.raises(FactorsError, match="checksum.*refit"):
        InfluenceFactors.load(directory)


def test_missing_tensor_file(saved):
    directory, tensor_file, _ = saved
    tensor_file.unlink()
    with pytest.raises(FactorsError, match="missing; refit"):
        InfluenceFactors.load(directory)


@pytest.mark.parametrize("content", [
    '{"format": "lightning-influence-factors", "format_',  # truncated JSON
    "\udcff".encode("utf-8", "surrogateescape").decode("latin-1"),  # not UTF-8 JSON
    "[1, 2, 3]",  # JSON, not an object
    '{"format": "something-else", "format_version": 1}',
    '{"format": "lightning-influence-factors", "format_version": 1}',  # entries missing
], ids=["truncated", "binary", "list", "other-format", "incomplete"])
def test_corrupt_manifest(saved, content):
    directory, _, _ = saved
    (directory / "manifest.json").write_text(content, encoding="latin-1")
    with pytest.raises(FactorsError, match="refit"):
        InfluenceFactors.load(directory)


@pytest.mark.parametrize("edit", [
    {"tensor_files": {"covariance": "../elsewhere.safetensors"}},
    {"tensor_files": ["factors-000000000000-lambda.safetensors"]},
    {"files": {"../elsewhere.safetensors": "0" * 64}},
    {"modules": {"0": {"kind": "linear"}}},
    {"modules": ["0", "2"]},
    {"strategy": "newton"},
    {"damping": -1.0},
    {"phase": "halfway"},
], ids=["escaping-path", "file-list-not-a-dict", "escaping-file-list", "module-entry", "modules-list", "strategy", "damping", "phase"])
def test_manifest_with_bad_entries(saved, edit):
    directory, _, manifest = saved
    (directory / "manifest.json").write_text(json.dumps({**manifest, **edit}))
    with pytest.raises(FactorsError):
        InfluenceFactors.load(directory)


def test_unknown_format_version(saved):
    directory, _, manifest = saved
    (directory / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(FactorsError, match="format version 99.*refit the factors with this version"):
        InfluenceFactors.load(directory)


def test_missing_directory(tmp_path):
    with pytest.raises(FactorsError, match="does not exist. Fit them first"):
        InfluenceFactors.load(tmp_path / "nowhere")


# ------------------------------------------------------------ atomic replace
def test_save_replaces_previous_save(tmp_path):
    first, second = fitted("kfac"), fitted("ekfac")
    first.save(tmp_path)
    (old_file,) = tensor_files(tmp_path)
    second.save(tmp_path)
    new_files = tensor_files(tmp_path)  # the old tensor file is gone, no temporary file left: one file per pass
    assert len(new_files) == 2 and old_file not in new_files and all(f.endswith(".safetensors") for f in new_files)
    assert sorted(json.loads((tmp_path / "manifest.json").read_text())["tensor_files"].values()) == new_files
    assert_identical(second, InfluenceFactors.load(tmp_path))


def test_crash_before_manifest_keeps_previous_factors(tmp_path, monkeypatch):
    first = fitted("kfac")
    first.save(tmp_path)
    before = tensor_files(tmp_path)

    def crash(path, payload):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(store, "atomic_write_json", crash)
    with pytest.raises(OSError, match="simulated"):
        fitted("ekfac").save(tmp_path)
    assert tensor_files(tmp_path) == before  # the half-done save left nothing behind
    assert_identical(first, InfluenceFactors.load(tmp_path))


def test_crash_while_writing_tensor_file_keeps_previous_factors(tmp_path, monkeypatch):
    first = fitted("diagonal")
    first.save(tmp_path)

    def crash(*args, **kwargs):
        raise OSError("killed (simulated)")

    monkeypatch.setattr(store, "write_safetensors", crash)
    with pytest.raises(OSError, match="simulated"):
        fitted("kfac").save(tmp_path)
    assert len(tensor_files(tmp_path)) == 1
    assert_identical(first, InfluenceFactors.load(tmp_path))


# ------------------------------------------------------------ invalid settings
@pytest.mark.parametrize("kwargs, match", [
    (dict(strategy="newton"), "unknown strategy 'newton'; choose one of identity, diagonal, kfac, ekfac"),
    (dict(fisher="true"), "unknown fisher 'true'; choose 'sampled'"),
    (dict(damping=-0.1), "damping must be a non-negative number"),
    (dict(damping=float("nan")), "damping must be a non-negative number"),
    (dict(damping=float("inf")), "damping must be a non-negative number"),
    (dict(damping="0.1"), "damping must be a non-negative number"),
    (dict(damping=True), "damping must be a non-negative number"),
    (dict(damping_factor=-1.0), "damping_factor must be (a )?non-negative"),
])
def test_invalid_settings_raise(kwargs, match):
    layers = find_tracked_layers(models.mlp())
    args = {"strategy": "kfac", **kwargs}
    strategy = args.pop("strategy")
    with pytest.raises(FactorsError, match=match):
        InfluenceFactors(strategy, layers, **args)
    with pytest.raises(OptionsError, match=match):  # fit_factors checks its options once, in FitOptions
        fit_factors(models.mlp(), ClassificationTask(), train_batches(), strategy=strategy, **args)


def test_unwritable_output_dir(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("chmod does not stop this user from writing (root)")
        with pytest.raises(FactorsError, match="not writable; choose another output_dir"):
            fitted("kfac").save(locked)
        with pytest.raises(FactorsError, match="cannot create output directory.*choose another output_dir"):
            fitted("kfac").save(locked / "sub")
    finally:
        locked.chmod(0o700)


def test_output_dir_that_is_a_file(tmp_path):
    """The same error path, reachable as root too."""
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    for target in (blocker, blocker / "sub"):
        with pytest.raises(FactorsError, match="cannot create output directory.*choose another output_dir"):
            fit_factors(models.mlp(), ClassificationTask(), train_batches(), strategy="kfac", output_dir=target)


def test_output_dir_not_writable_by_access_check(tmp_path, monkeypatch):
    monkeypatch.setattr(factors_mod.os, "access", lambda path, mode: False)
    with pytest.raises(FactorsError, match="not writable; choose another output_dir"):
        fitted("diagonal").save(tmp_path)


# --------------------------------------------------------------------- resume
@pytest.mark.parametrize("fisher", ["sampled", "empirical"])
def test_ekfac_resume_runs_only_the_lambda_pass(tmp_path, fisher):
    model, task = models.mlp(), ClassificationTask()
    whole = Counting(train_batches())
    reference = fit_factors(model, task, whole, strategy="ekfac", fisher=fisher)
    assert whole.drawn == 2 * 3

    # A run killed during its lambda pass: the covariance phase was saved.
    dying = Counting(train_batches(), fail_after=3 + 1)
    with pytest.raises(RuntimeError, match="killed"):
        fit_factors(model, task, dying, strategy="ekfac", fisher=fisher, output_dir=tmp_path)
    partial = InfluenceFactors.load(tmp_path)
    assert partial.phase == "eigen"

    resumed_batches = Counting(train_batches())
    resumed = fit_factors(model, task, resumed_batches, factors=partial, output_dir=tmp_path)
    assert resumed_batches.drawn == 3  # the lambda pass only
    assert resumed.phase == "complete"
    assert_identical(reference, resumed)
    assert_identical(reference, InfluenceFactors.load(tmp_path))

    # Complete factors: nothing left to run.
    again = Counting(train_batches())
    fit_factors(model, task, again, factors=resumed)
    assert again.drawn == 0


def test_resume_on_another_model_is_refused():
    partial = InfluenceFactors("ekfac", find_tracked_layers(models.mlp()))
    wider = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    with pytest.raises(FactorsError, match="another model"):
        fit_factors(wider, ClassificationTask(), train_batches(), factors=partial)
    with pytest.raises(FactorsError, match="does not have"):
        fit_factors(models.convnet(), ClassificationTask(), [models.conv_data(4)], factors=partial)


def test_identity_factors_passed_in_are_saved(tmp_path):
    identity = InfluenceFactors("identity", find_tracked_layers(models.mlp()))
    fit_factors(models.mlp(), ClassificationTask(), train_batches(), factors=identity, output_dir=tmp_path)
    assert_identical(identity, InfluenceFactors.load(tmp_path))


def test_max_batches_draws_no_extra_batch():
    batches = Counting(train_batches())
    fit_factors(models.mlp(), ClassificationTask(), batches, strategy="kfac", max_batches=2)
    assert batches.drawn == 2


# ------------------------------------------------- one file per pass, offloading
def test_each_pass_file_is_written_once(tmp_path, monkeypatch):
    """An EK-FAC fit with output_dir writes the covariance file once (after its pass) and only the Lambda file
    after the second pass: two tensor files in all, the first one still the same file at the end."""
    written = []
    real = store.write_safetensors
    monkeypatch.setattr(store, "write_safetensors", lambda path, named, **kw: (written.append(Path(path).name),
                                                                              real(path, named, **kw))[1])
    factors = fitted("ekfac", output_dir=str(tmp_path))
    assert len(written) == 2 and written[0].endswith("-covariance.safetensors.tmp"), written
    assert written[1].endswith("-lambda.safetensors.tmp")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["tensor_files"]["covariance"] == written[0][:-len(".tmp")]
    assert tensor_files(tmp_path) == sorted(f[:-len(".tmp")] for f in written)
    assert_identical(factors, InfluenceFactors.load(tmp_path))
    # Saving again into the same directory writes nothing new; into another directory, every file.
    factors.save(tmp_path)
    assert len(written) == 2
    factors.save(tmp_path / "copy")
    assert len(written) == 4
    assert_identical(factors, InfluenceFactors.load(tmp_path / "copy"))


def test_earlier_pass_leaves_memory_during_the_lambda_pass(tmp_path):
    """While the Lambda pass runs, the covariance pass's sums and float64 bases are not held (they are on disk);
    afterwards they are back, and the factors equal those of a fit without output_dir, tensor for tensor."""
    seen = []
    model, task, batches = models.mlp(), ClassificationTask(), train_batches()
    eigen = fit_factors(model, task, batches, strategy="ekfac", output_dir=str(tmp_path / "e"))
    reference = fit_factors(model, task, batches, strategy="ekfac")
    assert_identical(eigen, reference)
    # Rerun the Lambda pass by hand from the saved eigen phase, looking into memory between batches.
    partial = InfluenceFactors.load(tmp_path / "e")
    partial.tensors = {n: {k: v for k, v in t.items() if not k.startswith("lambda")} for n, t in partial.tensors.items()}
    partial.set_phase("eigen")

    def look(n):
        seen.append({name: sorted(t) for name, t in partial.tensors.items()})

    run_phase("lambda", partial, model, task, batches, progress=look)
    assert seen and all(keys == [] for snapshot in seen for keys in snapshot.values()), seen[0]
    assert_identical(partial, reference)


def test_offloaded_file_corrupted_mid_pass_is_refused(tmp_path):
    """The earlier pass's file is read back with its checksum: a file changed while the pass ran raises."""
    model, task, batches = models.mlp(), ClassificationTask(), train_batches()
    fit_factors(model, task, batches, strategy="ekfac", output_dir=str(tmp_path))
    partial = InfluenceFactors.load(tmp_path)
    partial.tensors = {n: {k: v for k, v in t.items() if not k.startswith("lambda")} for n, t in partial.tensors.items()}
    partial.set_phase("eigen")
    cov = tmp_path / json.loads((tmp_path / "manifest.json").read_text())["tensor_files"]["covariance"]

    def corrupt(n):
        data = bytearray(cov.read_bytes())
        data[-3] ^= 0x10
        cov.write_bytes(bytes(data))

    with pytest.raises(FactorsError, match="checksum"):
        run_phase("lambda", partial, model, task, batches[:1], progress=corrupt)


def test_earlier_bases_are_freed_not_only_unlisted_during_the_lambda_pass(tmp_path, monkeypatch):
    """The covariance pass's bases leave memory during the Lambda pass, not just the factors' dict: nothing
    else holds them (the pass's sums, a cycle through the capture's callbacks) and Python's collector is not
    what frees them."""
    import gc
    import weakref

    monkeypatch.setattr(gc, "collect", lambda *a: 0)  # freed by their last reference, not by a collection
    gc.disable()
    try:
        model, task, batches = models.mlp(), ClassificationTask(), train_batches()
        factors = InfluenceFactors("ekfac", find_tracked_layers(model))
        run_phase("covariance", factors, model, task, batches)
        factors.save(tmp_path)
        bases = [weakref.ref(v) for t in factors.tensors.values() for k, v in t.items() if k.endswith("eigvecs")]
        assert bases
        alive = []
        run_phase("lambda", factors, model, task, batches, progress=lambda n: alive.append(sum(
            r() is not None for r in bases)))
    finally:
        gc.enable()
    assert alive and set(alive) == {0}, alive
    assert all("A_eigvecs" in t for t in factors.tensors.values())  # read back after the pass


# ------------------------------------------------- loading in the scoring dtype
def test_reader_reads_what_the_writer_wrote(tmp_path):
    named = {"f64": torch.randn(3, 4, dtype=torch.float64), "bf16": torch.randn(5).to(torch.bfloat16),
             "count": torch.tensor(7.0, dtype=torch.float64), "empty": torch.zeros(0, 3), "ints": torch.arange(6)}
    store.write_safetensors(tmp_path / "t.safetensors", named, metadata={"a": "b"})
    reader = store.SafetensorsReader(tmp_path / "t.safetensors")
    assert reader.keys() == list(named)
    for key, value in named.items():
        got = reader.read(key)
        assert got.dtype == value.dtype and got.shape == value.shape and torch.equal(got, value), key


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_factors_loaded_in_float32_precondition_like_float64_with_the_same_fingerprint(tmp_path, strategy):
    """Loaded in float32, the statistics are float32 (counts keep their dtype), read without the float64 file
    being loaded; the damping is the float64 one to the bit, the fingerprint the same, and the scores agree
    with the float64 factors' to float32 precision (but not if the damping were another one)."""
    from lightning_influence.store import factors_fingerprint

    model, task = models.mlp(), ClassificationTask()
    fit_factors(model, task, train_batches(), strategy=strategy, output_dir=str(tmp_path))
    full = InfluenceFactors.load(tmp_path)
    real_load_file = store.load_file
    store.load_file = lambda *a, **k: pytest.fail("the float64 file was loaded whole")
    try:
        low = InfluenceFactors.load(tmp_path, dtype=torch.float32)
    finally:
        store.load_file = real_load_file
    for name, tensors in low.tensors.items():
        for key, value in tensors.items():
            original = full.tensors[name][key]
            expected = torch.float32 if original.is_floating_point() and original.dim() else original.dtype
            assert value.dtype == expected and value.shape == original.shape, (name, key)
    assert all(low.damping_for(n) == full.damping_for(n) for n in full.layers)
    assert factors_fingerprint(low) == factors_fingerprint(full)
    if strategy != "identity":  # identity has no damping
        assert factors_fingerprint(low.with_damping(0.5)) != factors_fingerprint(low)
    queries = [models.mlp_data(3, seed=5)]
    exact = InfluenceScorer(model, task, full, score_dtype="float64").pairwise_scores(queries, train_batches())
    scores = InfluenceScorer(model, task, low, score_dtype="float64").pairwise_scores(queries, train_batches())
    scale = exact.abs().max()
    assert scale > 0 and torch.allclose(scores, exact, rtol=0, atol=1e-5 * scale)
    if strategy != "identity":
        other = InfluenceScorer(model, task, full.with_damping(full.damping_for(next(iter(full.layers))) * 3),
                                score_dtype="float64").pairwise_scores(queries, train_batches())
        assert not torch.allclose(other, exact, rtol=0, atol=1e-3 * scale)


def test_scorer_reads_saved_factors_again_in_float32(tmp_path):
    """A float32 scorer given float64 factors that are saved scores with float32 ones read from their files;
    factors held in memory only, a float64 scorer, or a directory that now holds other factors: as given."""
    model, task = models.mlp(), ClassificationTask()
    fit_factors(model, task, train_batches(), strategy="ekfac", output_dir=str(tmp_path / "a"))
    full = InfluenceFactors.load(tmp_path / "a")
    scorer = InfluenceScorer(model, task, full)
    assert scorer.factors is not full
    assert {v.dtype for t in scorer.factors.tensors.values() for k, v in t.items() if v.dim()} == {torch.float32}
    assert InfluenceScorer(model, task, full, score_dtype="float64").factors is full
    in_memory = fit_factors(model, task, train_batches(), strategy="ekfac")
    assert InfluenceScorer(model, task, in_memory).factors is in_memory
    # The directory refitted since (other data): its files are others, so the factors in hand are used.
    fit_factors(model, task, models.split_batch(models.mlp_data(12, seed=9), 4), strategy="ekfac",
                output_dir=str(tmp_path / "a"))
    assert InfluenceScorer(model, task, full).factors is full


def test_factors_loaded_in_float32_refuse_a_corrupt_file(tmp_path):
    fit_factors(models.mlp(), ClassificationTask(), train_batches(), strategy="ekfac", output_dir=str(tmp_path))
    lam = tmp_path / json.loads((tmp_path / "manifest.json").read_text())["tensor_files"]["lambda"]
    data = bytearray(lam.read_bytes())
    data[-5] ^= 0x01
    lam.write_bytes(bytes(data))
    with pytest.raises(FactorsError, match="checksum"):
        InfluenceFactors.load(tmp_path, dtype=torch.float32)


def test_scorer_lets_go_of_the_factors_once_the_queries_are_preconditioned(tmp_path):
    """Scoring training data against preconditioned queries needs no factors: the scorer's float32 copy of saved
    factors (or the prepared tensors of factors in memory) is let go after query_gradients and made again when
    next needed, with the same scores."""
    import gc
    import weakref

    model, task = models.mlp(), ClassificationTask()
    in_memory = fit_factors(model, task, train_batches(), strategy="ekfac", output_dir=str(tmp_path))
    queries = [models.mlp_data(3, seed=5)]
    expected = InfluenceScorer(model, task, in_memory).pairwise_scores(queries, train_batches())
    scorer = InfluenceScorer(model, task, InfluenceFactors.load(tmp_path))
    copy = weakref.ref(scorer.factors)
    q = scorer.query_gradients(queries)
    gc.collect()
    assert copy() is None
    torch.testing.assert_close(torch.cat([scorer.score_batch(q, b).sum(0) for b in train_batches()], dim=-1), expected)
    torch.testing.assert_close(scorer.self_scores(train_batches()),
                               InfluenceScorer(model, task, in_memory).self_scores(train_batches()))
    held = InfluenceScorer(model, task, fit_factors(model, task, train_batches(), strategy="ekfac"))
    held.query_gradients(queries)
    assert held.factors is held.given_factors and not held.factors._cache
