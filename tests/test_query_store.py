"""Saved query gradients: round trip, scores equal to the full path, and refusals."""

import json

import pytest
import torch

from lightning_influence import ClassificationTask, InfluenceFactors, InfluenceScorer, TrackedLayer, fit_factors
from lightning_influence import store
from lightning_influence.errors import QueryStoreError
from lightning_influence.scoring.query_store import factors_fingerprint, load_query_gradients, save_query_gradients

from . import models

META = [{"query_id": f"q{i}", "text": f"query number {i}", "prompt": "p", "completion": "c"} for i in range(4)]


@pytest.fixture(scope="module")
def case():
    model = models.mlp()
    train = models.split_batch(models.mlp_data(12, seed=1), 4)
    queries = models.split_batch(models.mlp_data(4, seed=2), 3)
    task = ClassificationTask()
    factors = fit_factors(model, task, train, strategy="ekfac", fisher="empirical", capture_dtype=torch.float64)
    full = InfluenceScorer(model, task, factors, score_dtype=torch.float64).pairwise_scores(queries, train)
    return model, task, factors, train, queries, full


@pytest.mark.parametrize("rank", [None, 2, 6])
def test_round_trip_scores_equal_full_path(case, tmp_path, rank):
    model, task, factors, train, queries, full = case
    scorer = InfluenceScorer(model, task, factors, score_dtype=torch.float64, query_rank=rank)
    qg = scorer.query_gradients(queries)
    save_query_gradients(qg, tmp_path, factors, META)
    loaded, meta = load_query_gradients(tmp_path, factors=factors, layers=scorer.layer_names)
    assert loaded.layer_names == qg.layer_names and loaded.num_queries == 4 and loaded.rank == rank
    for part in ("full", "left", "right", "errors"):
        mine, theirs = getattr(qg, part), getattr(loaded, part)
        assert mine.keys() == theirs.keys()
        for name in mine:
            torch.testing.assert_close(theirs[name], mine[name].to(theirs[name].dtype), rtol=0, atol=0)
    scores = torch.cat([scorer.score_batch(loaded, b, i).sum(0) for i, b in enumerate(train)], 1)
    if rank is None or rank == 6:  # 6 = full rank of both MLP layers (min(7, 6), min(3, 8))
        torch.testing.assert_close(scores, full, rtol=1e-6, atol=1e-7 * float(full.abs().max()), check_dtype=False)
    # manifest contents
    assert meta["query_ids"] == ["q0", "q1", "q2", "q3"]
    assert meta["query_texts"] == [m["text"] for m in META]
    assert meta["queries"] == META
    assert meta["representation"] == ("full" if rank is None else "low_rank") and meta["rank"] == rank
    assert meta["factors"]["strategy"] == "ekfac"
    assert meta["factors"]["fingerprint"] == factors_fingerprint(factors)
    for name, layer in factors.layers.items():
        info = meta["layers"][name]
        assert (info["d_out"], info["d_in"]) == layer.shape
        if rank is not None:
            assert info["rank"] == min(rank, *layer.shape)
            assert info["relative_frobenius_error"] == pytest.approx(qg.errors[name].tolist(), abs=1e-15)
    # nothing but JSON and safetensors on disk
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".json", ".safetensors"]


def test_factors_loaded_from_disk_keep_their_fingerprint(case, tmp_path):
    _, _, factors, _, _, _ = case
    factors.save(tmp_path / "factors")
    again = InfluenceFactors.load(tmp_path / "factors")
    assert factors_fingerprint(again) == factors_fingerprint(factors)


def test_refuses_other_factors(case, tmp_path):
    model, task, factors, train, queries, _ = case
    qg = InfluenceScorer(model, task, factors, score_dtype=torch.float64).query_gradients(queries)
    save_query_gradients(qg, tmp_path, factors, META)
    kfac = fit_factors(model, task, train, strategy="kfac", fisher="empirical", capture_dtype=torch.float64)
    with pytest.raises(QueryStoreError, match="ekfac factors, but kfac factors were given.*recompute"):
        load_query_gradients(tmp_path, factors=kfac)
    with pytest.raises(QueryStoreError, match="other factors.*damping.*recompute the query gradients"):
        load_query_gradients(tmp_path, factors=factors.with_damping(1e-3))
    refit = fit_factors(model, task, train[:2], strategy="ekfac", fisher="empirical", capture_dtype=torch.float64)
    with pytest.raises(QueryStoreError, match="other factors"):
        load_query_gradients(tmp_path, factors=refit)
    load_query_gradients(tmp_path)  # without factors: no check


def test_refuses_other_layers_and_shapes(case, tmp_path):
    model, task, factors, _, queries, _ = case
    qg = InfluenceScorer(model, task, factors, score_dtype=torch.float64).query_gradients(queries)
    save_query_gradients(qg, tmp_path, factors)
    names = list(factors.layers)
    sub, meta = load_query_gradients(tmp_path, factors=factors, layers=names[1:])
    assert sub.layer_names == names[1:] and list(sub.full) == names[1:]
    assert meta["query_ids"] == ["q0", "q1", "q2", "q3"]  # default ids without queries_meta
    with pytest.raises(QueryStoreError, match=r"layers \['nope'\] were not stored.*recompute"):
        load_query_gradients(tmp_path, factors=factors, layers=["nope"])
    other = {n: TrackedLayer(n, l.kind, l.d_out + 1, l.d_in, l.has_bias) for n, l in factors.layers.items()}
    identity = InfluenceFactors("identity", factors.layers)
    save_query_gradients(qg, tmp_path / "identity", identity)
    with pytest.raises(QueryStoreError, match="is 7x6 in the stored query gradients but 8x6 in the factors"):
        load_query_gradients(tmp_path / "identity", factors=InfluenceFactors("identity", other))
    with pytest.raises(QueryStoreError, match="does not fit the factors"):
        save_query_gradients(qg, tmp_path / "bad", InfluenceFactors("identity", other))
    with pytest.raises(QueryStoreError, match="queries_meta has 1 entries"):
        save_query_gradients(qg, tmp_path / "bad", factors, META[:1])


def test_atomic_replacement_and_corruption(case, tmp_path, monkeypatch):
    model, task, factors, _, queries, _ = case
    scorer = InfluenceScorer(model, task, factors, score_dtype=torch.float64)
    qg = scorer.query_gradients(queries)
    save_query_gradients(qg, tmp_path, factors, META)
    first = json.loads((tmp_path / "manifest.json").read_text())["tensor_file"]
    low = InfluenceScorer(model, task, factors, score_dtype=torch.float64, query_rank=1).query_gradients(queries)
    save_query_gradients(low, tmp_path, factors, META)
    second = json.loads((tmp_path / "manifest.json").read_text())["tensor_file"]
    assert first != second and not (tmp_path / first).exists()  # the replaced tensor file is gone

    # A save killed before its manifest lands leaves the previous save loadable.
    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(store, "atomic_write_json", crash)
    with pytest.raises(KeyboardInterrupt):
        save_query_gradients(qg, tmp_path, factors, META)
    monkeypatch.undo()
    loaded, meta = load_query_gradients(tmp_path, factors=factors)
    assert loaded.low_rank and meta["tensor_file"] == second
    assert not list(tmp_path.glob("*.tmp"))

    path = tmp_path / second
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(QueryStoreError, match="checksum"):
        load_query_gradients(tmp_path, factors=factors)
    with pytest.raises(QueryStoreError, match="does not exist"):
        load_query_gradients(tmp_path / "missing")
