"""The persistence layer: atomic bundles, identities, fingerprints, and every reuse comparing them."""

import json
import os
import random
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from lightning_influence import (ClassificationTask, InfluenceCallback, InfluenceFactors,
                                 fit_factors, store)
from lightning_influence.errors import FactorsError, QueryStoreError, StoreError, TfidfError, TopKError
from lightning_influence.integration.pipeline import load_scores, save_scores
from lightning_influence.passes import run_phase
from lightning_influence.scoring.query_store import load_query_gradients, save_query_gradients
from lightning_influence.scoring.tfidf import TfidfCandidates
from lightning_influence.scoring import topk
from lightning_influence.scoring.topk import ScoreShardWriter, read_scores

from . import lit_models as lm
from . import models
from .test_factors_io import Counting, assert_identical, train_batches
from .test_module_tools import setup  # noqa: F401  (fixture)
from .dense import covariance_sum

HERE = os.path.dirname(__file__)
FMT = store.BundleFormat("test-bundle", 3, StoreError, "test bundle", make="Make one.", redo="make it again",
                         prefix="test")


def write(directory, value: float, identity=None):
    name = store.new_tensor_name(FMT)
    return store.write_bundle(FMT, directory, {"tensor_file": name, "value": value}, identity=identity,
                              tensors={name: {"x": torch.full((3, 4), value), "n": torch.arange(5)}})


def read_value(directory) -> float:
    bundle = store.read_bundle(FMT, directory)
    x = bundle.tensors(bundle.manifest["tensor_file"])["x"]
    assert float(x.min()) == float(x.max()) == bundle.manifest["value"]  # tensors and manifest from one save
    return bundle.manifest["value"]


def ours(directory):
    return sorted(p.name for p in directory.iterdir())


# ------------------------------------------------------------------ bundles
def test_bundle_manifest_checksums_and_identity(tmp_path):
    identity = {"weights": "abc", "options": {"max_examples": 8, "seed": 0}, "data": {"length": 40}}
    manifest = write(tmp_path, 1.0, identity)
    assert manifest["format"] == "test-bundle" and manifest["format_version"] == 3 and manifest["library_version"]
    (name,) = manifest["files"]
    assert manifest["files"][name] == store.sha256_file(tmp_path / name)
    bundle = store.read_bundle(FMT, tmp_path)
    assert bundle.identity == identity and not bundle.differences(identity)
    asked = {**identity, "options": {"max_examples": None, "seed": 0}, "data": {"length": 40, "extra": 1}}
    diffs = bundle.differences(asked)
    assert diffs == {"options.max_examples": (8, None), "data.extra": (None, 1)}
    with pytest.raises(StoreError, match=r"options.max_examples: 8 saved, null now.*make it again") as err:
        bundle.check_identity(asked)
    assert err.value.differences == diffs
    # tuples compare equal to the lists JSON gives back
    assert not store.identity_differences({"shape": [1, 2]}, {"shape": (1, 2)})


def test_read_refusals(tmp_path):
    with pytest.raises(StoreError, match="does not exist. Make one."):
        store.read_bundle(FMT, tmp_path)
    manifest = write(tmp_path, 2.0)
    (name,) = manifest["files"]
    for edit, match in ((dict(format_version=2), "format version 2, this library reads version 3"),
                        (dict(format="other"), "not a lightning-influence test bundle"),
                        (dict(files={"../x.safetensors": "0"}), "invalid 'files'"),
                        (dict(identity=[1]), "invalid 'files' or 'identity'")):
        (tmp_path / "manifest.json").write_text(json.dumps({**manifest, **edit}))
        with pytest.raises(StoreError, match=match):
            store.read_bundle(FMT, tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "tensor_file": "test-other.safetensors"}))
    with pytest.raises(StoreError, match="not among its files"):
        read_value(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    data = bytearray((tmp_path / name).read_bytes())
    data[-1] ^= 1
    (tmp_path / name).write_bytes(bytes(data))
    with pytest.raises(StoreError, match="checksum"):
        read_value(tmp_path)
    (tmp_path / name).unlink()
    with pytest.raises(StoreError, match="missing; make it again"):
        store.read_bundle(FMT, tmp_path)


@pytest.mark.parametrize("where", ["write_safetensors", "_fsync", "replace", "sha256_file", "atomic_write_json"])
def test_failure_at_each_step_keeps_the_previous_bundle(tmp_path, monkeypatch, where):
    write(tmp_path, 1.0)
    before = ours(tmp_path)
    real = {"replace": os.replace}.get(where) or getattr(store, where)

    def fail(*args, **kwargs):
        raise OSError(f"{where} failed (simulated)")

    if where == "replace":
        # os.replace is also how the manifest lands: fail only the tensor file's rename.
        monkeypatch.setattr(store.os, "replace", lambda a, b: fail() if str(b).endswith(".safetensors") else real(a, b))
    else:
        monkeypatch.setattr(store, where, fail)
    with pytest.raises(OSError, match="simulated"):
        write(tmp_path, 2.0)
    monkeypatch.undo()
    assert ours(tmp_path) == before  # nothing of the failed save is left
    assert read_value(tmp_path) == 1.0
    write(tmp_path, 3.0)
    assert read_value(tmp_path) == 3.0 and len(ours(tmp_path)) == 2


def test_interrupt_is_left_to_the_next_write_to_sweep(tmp_path, monkeypatch):
    write(tmp_path, 1.0)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(store, "atomic_write_json", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write(tmp_path, 2.0)
    monkeypatch.undo()
    assert len(ours(tmp_path)) == 3  # manifest, the live file, the unlisted new one (as after a kill)
    assert read_value(tmp_path) == 1.0  # never the new tensors with the old manifest
    write(tmp_path, 3.0)
    assert len(ours(tmp_path)) == 2 and read_value(tmp_path) == 3.0


def test_bundles_sharing_a_directory_keep_their_files(tmp_path):
    """The callback's output_dir holds the factors' bundle and the end-of-run scores' bundle."""
    factors = fit_factors(models.mlp(), ClassificationTask(), train_batches(), strategy="kfac")
    factors.save(tmp_path)
    save_scores(tmp_path, torch.randn(2, 12), ["a", "b"])
    factors.save(tmp_path)
    save_scores(tmp_path, torch.ones(2, 12), ["a", "b"])
    assert_identical(factors, InfluenceFactors.load(tmp_path))
    assert torch.equal(load_scores(tmp_path).scores, torch.ones(2, 12))
    names = ours(tmp_path)
    assert len(names) == 4 and {"manifest.json", "scores.json"} <= set(names)  # two manifests, one tensor file each


# --------------------------------------------------------------- end-of-run scores
def test_save_scores_is_one_atomic_bundle(tmp_path, monkeypatch):
    scores, layer_scores = torch.randn(3, 10), torch.randn(2, 3, 10)
    save_scores(tmp_path, scores, ["q0", "q1", "q2"], layer_scores, ["l0", "l1"], extra={"strategy": "ekfac"})
    files = ours(tmp_path)
    assert len(files) == 2 and files[1] == "scores.json" and files[0].endswith(".safetensors")
    saved = load_scores(tmp_path)
    assert torch.equal(saved.scores, scores) and torch.equal(saved.layer_scores, layer_scores)
    assert saved.query_ids == ["q0", "q1", "q2"] and saved.layer_names == ["l0", "l1"]
    manifest = json.loads((tmp_path / "scores.json").read_text())
    assert manifest["format"] == "lightning-influence-run-scores" and manifest["strategy"] == "ekfac"
    assert manifest["format"] != topk.FORMAT_NAME  # the score shards have their own format

    def crash(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(store, "atomic_write_json", crash)
    with pytest.raises(OSError):
        save_scores(tmp_path, torch.zeros(3, 10), ["q0", "q1", "q2"])
    monkeypatch.undo()
    assert ours(tmp_path) == files and torch.equal(load_scores(tmp_path).scores, scores)
    path = tmp_path / files[0]
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(TopKError, match="checksum.*rerun the scoring"):
        load_scores(tmp_path)


@pytest.mark.slow
def test_sigkill_mid_save_scores_leaves_one_consistent_save(tmp_path):
    rng = random.Random(1)
    for attempt in range(3):
        proc = subprocess.Popen([sys.executable, os.path.join(HERE, "save_loop_script.py"), str(tmp_path), "scores"],
                                stdout=subprocess.PIPE, text=True)
        try:
            proc.stdout.readline()
            time.sleep(rng.uniform(0.0, 0.3))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        saved = load_scores(tmp_path)
        counter = saved.manifest["counter"]
        assert float(saved.scores.min()) == float(saved.scores.max()) == counter
        assert float(saved.layer_scores.min()) == float(saved.layer_scores.max()) == counter
        assert len([p for p in os.listdir(tmp_path) if ".safetensors" in p]) <= 2


# ------------------------------------------------------------------ fingerprints
def test_data_fingerprint(tmp_path):
    x, y = torch.randn(40, 3), torch.arange(40)
    base = store.data_fingerprint(DataLoader(TensorDataset(x, y), batch_size=8))
    assert base["length"] == 40 and base["batch_size"] == 8 and base["items_sha256"]
    assert store.data_fingerprint(DataLoader(TensorDataset(x.clone(), y.clone()), batch_size=8)) == base
    first = x.clone()
    first[0, 0] += 1  # the first and the last item are always among the hashed ones
    assert store.data_fingerprint(DataLoader(TensorDataset(first, y), batch_size=8))["items_sha256"] != \
        base["items_sha256"]
    assert store.data_fingerprint(DataLoader(TensorDataset(x[:32], y[:32]), batch_size=8))["length"] == 32
    assert store.data_fingerprint(DataLoader(TensorDataset(x, y), batch_size=4))["batch_size"] == 4
    # A list of batches is sized and indexable: hashed the same way.
    batches = models.split_batch(models.mlp_data(12, seed=1), 4)
    other = models.split_batch(models.mlp_data(12, seed=2), 4)
    assert store.data_fingerprint(batches) != store.data_fingerprint(other)

    class Stream(IterableDataset):
        def __iter__(self):
            yield from range(3)

    stream = store.data_fingerprint(DataLoader(Stream(), batch_size=None))
    assert stream["items_sha256"] is None and stream["dataset"] == "Stream"  # what can be known


def test_weights_fingerprint_covers_untracked_weights():
    model = models.mlp()
    fp = store.weights_fingerprint(model)
    assert store.weights_fingerprint(models.mlp()) == fp
    with torch.no_grad():
        model[2].bias[0] += 1e-6
    assert store.weights_fingerprint(model) != fp
    assert store.weights_fingerprint(model, ["0"]) == store.weights_fingerprint(models.mlp(), ["0"])


# ---------------------------------------------------------------- factor resume
def test_callback_refits_factors_fitted_on_fewer_examples(tmp_path):
    """Issue 13, item 5: factors fitted with max_examples=8 must not be reused for all 48 examples."""
    torch.manual_seed(0)
    model = lm.LitClassifier()
    trainer = lm.trainer(max_epochs=0)
    trainer.fit(model, datamodule=lm.ClassificationData())
    kwargs = dict(task="classification", strategy="kfac", fisher="empirical", output_dir=str(tmp_path),
                  fit_on="manual")
    few = InfluenceCallback(max_examples=8, **kwargs).fit_factors(trainer, model)
    assert float(few.tensors["net.0"]["A_count"]) == 8
    with pytest.warns(UserWarning, match=r"refitting the factors.*options.max_examples: 8 saved, null now"):
        everything = InfluenceCallback(**kwargs).fit_factors(trainer, model)
    # The independent computation: a fresh in-process fit on all the data.
    reference = fit_factors(model, ClassificationTask(), lm.loader(lm.classification_data(48)), strategy="kfac",
                            fisher="empirical")
    for name in reference.tensors:
        for side in ("A", "S"):
            torch.testing.assert_close(covariance_sum(everything.tensors[name], side),
                                       covariance_sum(reference.tensors[name], side), rtol=1e-6, atol=1e-9)
            torch.testing.assert_close(everything.tensors[name][f"{side}_count"],
                                       reference.tensors[name][f"{side}_count"])
    assert float(InfluenceFactors.load(tmp_path).tensors["net.0"]["A_count"]) == 48
    # Same options again: resumed (complete, nothing refitted), no warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = InfluenceCallback(**kwargs).fit_factors(trainer, model)
    assert float(again.tensors["net.0"]["A_count"]) == 48


def test_callback_refits_after_the_weights_change(tmp_path):
    torch.manual_seed(0)
    model = lm.LitClassifier()
    trainer = lm.trainer(max_epochs=0)
    trainer.fit(model, datamodule=lm.ClassificationData())
    kwargs = dict(task="classification", strategy="kfac", fisher="empirical", output_dir=str(tmp_path),
                  fit_on="manual")
    InfluenceCallback(**kwargs).fit_factors(trainer, model)
    with torch.no_grad():
        model.net[2].weight.mul_(2)
    with pytest.warns(UserWarning, match="refitting the factors.*weights"):
        refit = InfluenceCallback(**kwargs).fit_factors(trainer, model)
    reference = fit_factors(model, ClassificationTask(), lm.loader(lm.classification_data(48)), strategy="kfac",
                            fisher="empirical")
    torch.testing.assert_close(covariance_sum(refit.tensors["net.0"], "S"), covariance_sum(reference.tensors["net.0"], "S"),
                               rtol=1e-6, atol=1e-9)


def test_fit_factors_resume_with_other_options_starts_over(tmp_path):
    model, task = models.mlp(), ClassificationTask()
    # Killed in the lambda pass of a fit on the first 4 examples: the covariances of 4 examples are saved.
    with pytest.raises(RuntimeError, match="killed"):
        fit_factors(model, task, Counting(train_batches(), fail_after=1 + 1), strategy="ekfac", fisher="empirical",
                    max_examples=4, output_dir=tmp_path)
    partial = InfluenceFactors.load(tmp_path)
    assert partial.phase == "eigen" and partial.metadata["identity"]["options"]["max_examples"] == 4
    batches = Counting(train_batches())
    with pytest.warns(UserWarning, match=r"fitted from other.*options.max_examples: 4 saved, null now"):
        resumed = fit_factors(model, task, batches, factors=partial, output_dir=tmp_path)
    assert batches.drawn == 2 * 3  # both passes, over all 12 examples
    reference = fit_factors(model, task, Counting(train_batches()), strategy="ekfac", fisher="empirical")
    assert_identical(reference, resumed)
    assert_identical(reference, InfluenceFactors.load(tmp_path))


def test_factors_load_with_identity_checks_before_reading_tensors(tmp_path):
    f = fit_factors(models.mlp(), ClassificationTask(), train_batches(), strategy="diagonal")
    f.save(tmp_path)
    identity = f.metadata["identity"]
    assert InfluenceFactors.load(tmp_path, identity=identity).metadata["identity"] == identity
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    for file in manifest["tensor_files"].values():
        (tmp_path / file).write_bytes(b"garbage")  # never read when the identity differs
    with pytest.raises(FactorsError, match="options.seed: 0 saved, 1 now") as err:
        InfluenceFactors.load(tmp_path, identity={**identity, "options": {**identity["options"], "seed": 1}})
    assert list(err.value.differences) == ["options.seed"]


# ------------------------------------------------------------------ score shards
def test_top_k_with_other_queries_in_the_same_scores_dir(setup, tmp_path):  # noqa: F811
    """Issue 13, item 4: other queries of the same count must not get the earlier queries' top-k."""
    model, task, factors, tl, ql, module, full = setup
    first = module.top_k(ql, tl, k=4, scores_dir=tmp_path, shard_size=7)
    other_rows = lm_queries(seed=11)
    other = DataLoader(other_rows, batch_size=2, collate_fn=collate_rows())
    other_full = module.pairwise_scores(other, tl)
    assert other_full.shape == full.shape and not torch.allclose(other_full, full)
    with pytest.warns(UserWarning, match="starting the scores.*over.*queries"):
        second = module.top_k(other, tl, k=4, scores_dir=tmp_path, shard_size=7)
    values, indices = torch.topk(other_full, 4, dim=1)
    torch.testing.assert_close(second["positive"][0], values)
    assert torch.equal(second["positive"][1], indices)
    torch.testing.assert_close(read_scores(tmp_path), other_full)
    assert not torch.equal(first["positive"][0], second["positive"][0])


def lm_queries(seed):
    from .test_module_tools import DictRows

    return DictRows(models.lm_batch(3, vocab=11, max_len=7, pad_to=7, seed=seed, prompt_len=3))


def collate_rows():
    from .test_module_tools import collate

    return collate


def test_shard_writer_refuses_another_identity_by_default(tmp_path):
    scores = torch.randn(2, 20)
    writer = ScoreShardWriter(tmp_path, shard_size=8, topk=3, identity={"queries": "aaa", "data": {"length": 20}})
    writer.write(scores[:, :12], start=0)
    with pytest.raises(TopKError, match="other queries, factors or data.*queries: \"aaa\" saved") as err:
        ScoreShardWriter(tmp_path, shard_size=8, topk=3, identity={"queries": "bbb", "data": {"length": 20}})
    assert list(err.value.differences) == ["queries"]
    unchecked = ScoreShardWriter(tmp_path, shard_size=8, topk=3)  # identity=None: continue whatever is there
    assert unchecked.resume_from() == 8 and unchecked.identity == {"queries": "aaa", "data": {"length": 20}}
    resumed = ScoreShardWriter(tmp_path, shard_size=8, topk=3, identity={"queries": "aaa", "data": {"length": 20}})
    assert resumed.resume_from() == 8
    resumed.write(scores[:, 8:], start=8)
    resumed.finish(num_train=20)
    assert torch.equal(read_scores(tmp_path), scores)
    with pytest.warns(UserWarning, match="over"):
        restarted = ScoreShardWriter(tmp_path, shard_size=8, topk=3, identity={"queries": "bbb"},
                                     on_mismatch="restart")
    assert restarted.resume_from() == 0 and not restarted.completed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]  # the other run's files are gone
    with pytest.raises(TopKError, match="on_mismatch"):
        ScoreShardWriter(tmp_path, on_mismatch="ignore")


def test_shard_writer_never_restarts_over_another_bundle(tmp_path):
    fit_factors(models.mlp(), ClassificationTask(), train_batches(), strategy="diagonal").save(tmp_path)
    with pytest.raises(TopKError, match="not a lightning-influence score shards manifest"):
        ScoreShardWriter(tmp_path, shard_size=8, on_mismatch="restart")
    InfluenceFactors.load(tmp_path)


# ------------------------------------------------------- stored queries and TF-IDF
def test_query_store_identity_is_the_factors_fingerprint(tmp_path):
    model, task = models.mlp(), ClassificationTask()
    factors = fit_factors(model, task, train_batches(), strategy="kfac", fisher="empirical")
    from lightning_influence import InfluenceScorer

    qg = InfluenceScorer(model, task, factors).query_gradients(models.split_batch(models.mlp_data(4, seed=2), 2))
    save_query_gradients(qg, tmp_path, factors)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["identity"] == {"factors": store.factors_fingerprint(factors)}
    with pytest.raises(QueryStoreError, match="other factors") as err:
        load_query_gradients(tmp_path, factors=factors.with_damping(0.5))
    assert list(err.value.differences) == ["factors"]


def test_tfidf_cache_identity(tmp_path, caplog):
    texts = ["apple river stone", "cloud ember frost", "river apple cloud"]
    first = TfidfCandidates.load_or_fit(tmp_path, texts)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["identity"] == {"texts": store.texts_fingerprint(texts), "params": first.params()}
    with caplog.at_level("INFO", logger="lightning_influence.scoring.tfidf"):
        other = TfidfCandidates.load_or_fit(tmp_path, texts[:2] + ["violin piano drum"])
    assert "texts" in caplog.text  # refitted, naming what differed
    assert other.num_documents == 3 and "violin" in other.vectorizer.vocabulary_
    with pytest.raises(TfidfError, match="other training texts") as err:
        TfidfCandidates.load(tmp_path, texts=texts)
    assert list(err.value.differences) == ["texts"]


def test_unfinished_ekfac_factors_keep_their_identity(tmp_path):
    f = fit_factors(models.mlp(), ClassificationTask(), train_batches(), strategy="kfac")
    g = InfluenceFactors("ekfac", f.layers, metadata={"identity": {"weights": "w"}})
    run_phase("covariance", g, models.mlp(), ClassificationTask(), train_batches())
    g.save(tmp_path)
    assert InfluenceFactors.load(tmp_path).metadata["identity"] == {"weights": "w"}
    assert json.loads((tmp_path / "manifest.json").read_text())["metadata"] == {}  # stored once, as the identity
