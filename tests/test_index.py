"""The gradient index against exact scores: wide projections, unbiased scaling, resume, identity, cosine, two stages."""

import json

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence import (CausalLMTask, ClassificationTask, InfluenceFactors, InfluenceScorer, LayerCapture,
                                 fit_factors)
from lightning_influence.capture import per_example_gradients
from lightning_influence.errors import OptionsError
from lightning_influence.index import (Compression, GradientIndex, GradientIndexError, IndexOptions, IndexWriter,
                                       build_index)

from . import dense, models
from .test_scores_dense import ce_loss, ce_measure

TASK = ClassificationTask()


def fitted(strategy, model, train, batch_size=4, **kw):
    return fit_factors(model, TASK if not isinstance(train, dict) else CausalLMTask(),
                       models.split_batch(train, batch_size), strategy=strategy, fisher="empirical",
                       capture_dtype=torch.float64, **kw)


def assert_scores_close(ours, exact, rel=1e-5):
    # float32 storage: ~1e-7 relative; a wrong sign, a transposed factor or a dropped token is O(1).
    scale = exact.abs().max()
    assert scale > 0
    torch.testing.assert_close(ours, exact, rtol=rel, atol=rel * scale)


@pytest.fixture(scope="module")
def mlp_case():
    model = models.mlp()
    return model, models.mlp_data(16, seed=1), models.mlp_data(3, seed=2)


# --------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("strategy", ["ekfac", "kfac", "diagonal", "identity"])
@pytest.mark.parametrize("placement", ["index", "sqrt", "query"])
def test_wide_projection_reproduces_exact_scores(tmp_path, mlp_case, strategy, placement):
    """A projection at least as wide as every layer (so none is drawn) and no truncation: the index's
    scores are the exact ones, for every placement of the preconditioner; rows come back in dataset
    order although shards hold 5 examples and batches 4."""
    model, train, queries = mlp_case
    factors = fitted(strategy, model, train)
    scorer = InfluenceScorer(model, TASK, factors, score_dtype=torch.float64)
    exact = scorer.pairwise_scores(models.split_batch(queries, 2), models.split_batch(train, 4))
    options = IndexOptions(projection_dim=8, preconditioner=placement, shard_size=5)
    build_index(model, TASK, factors, models.split_batch(train, 4), tmp_path, options, dtype=torch.float64)
    index = GradientIndex.load(tmp_path, factors, model, models.split_batch(train, 4))
    qg = scorer.query_gradients(models.split_batch(queries, 2))
    assert index.num_examples == 16 and index.width == 7 * 6 + 3 * 8
    assert_scores_close(index.scores(qg, dtype=torch.float64), exact)
    # and the independent dense computation, for the strategies it covers
    modules = {n: model.get_submodule(n) for n in factors.layers}
    assert_scores_close(index.scores(qg, dtype=torch.float64),
                        dense.dense_scores(strategy, model, modules, ce_loss, ce_measure, train, queries))


@pytest.mark.parametrize("strategy", ["ekfac", "kfac"])
def test_wide_index_on_padded_sequences_and_low_rank_queries(tmp_path, strategy):
    """Padding tokens are excluded on the index side as in exact scoring; rank-r query gradients are
    compressed from their factorisation."""
    model = models.seq_lm()
    train = models.lm_batch(8, max_len=7, pad_to=10, seed=1)
    queries = models.lm_batch(3, max_len=6, seed=2, prompt_len=2)
    task = CausalLMTask()
    factors = fitted(strategy, model, train)
    build_index(model, task, factors, models.split_batch(train, 4), tmp_path, IndexOptions(projection_dim=None),
                dtype=torch.float64)
    index = GradientIndex.load(tmp_path, factors, model)
    for rank in (None, 2):
        scorer = InfluenceScorer(model, task, factors, score_dtype=torch.float64, query_rank=rank, query_svd="exact")
        exact = scorer.pairwise_scores(models.split_batch(queries, 3), models.split_batch(train, 4))
        assert_scores_close(index.scores(scorer.query_gradients(models.split_batch(queries, 3)), dtype=torch.float64),
                            exact)


def _tokens(model, batch, layers):
    with LayerCapture(model, layers, dtype=torch.float64) as cap:
        return cap.collect(ce_loss(model, batch))


def test_truncation_keeps_the_highest_energy_coordinates_exactly(mlp_case):
    """keep=k, no projection: the score is exactly the eigenbasis inner product restricted to the kept
    rows and columns, which are the top-k by the marginals of Lambda / (Lambda + lambda)."""
    model, train, queries = mlp_case
    factors = fitted("ekfac", model, train)
    comp = Compression.from_factors(factors, IndexOptions(projection_dim=None, keep=3))
    g_train = dense.per_example_grads(model, {n: model.get_submodule(n) for n in factors.layers}, ce_loss, train)
    g_query = dense.per_example_grads(model, {n: model.get_submodule(n) for n in factors.layers}, ce_measure, queries)
    acts, grads = _tokens(model, train, factors.layers)
    qg = InfluenceScorer(model, TASK, factors, score_dtype=torch.float64).query_gradients([queries])
    qv = comp.query_vectors(qg, factors, torch.float64)
    ours = torch.zeros(3, 16, dtype=torch.float64)
    expected = torch.zeros(3, 16, dtype=torch.float64)
    for name, layer in factors.layers.items():
        t = factors.tensors[name]
        qa, qs = t["A_eigvecs"], t["S_eigvecs"]
        lam, damping = factors.eigenvalues(name), factors.damping_for(name)
        energy = lam / (lam + damping)
        rows = torch.topk(energy.sum(1), min(3, layer.d_out)).indices
        cols = torch.topk(energy.sum(0), min(3, layer.d_in)).indices
        keep = torch.zeros(layer.shape, dtype=torch.bool)
        keep[rows.unsqueeze(1), cols.unsqueeze(0)] = True
        rq = qs.T @ g_query[name].reshape(-1, *layer.shape) @ qa
        ri = qs.T @ g_train[name].reshape(-1, *layer.shape) @ qa
        expected -= ((rq / (lam + damping)) * keep).flatten(1) @ ri.flatten(1).T
        sl = comp.slices()[name]
        ours += qv[:, sl] @ comp.layers[name].from_tokens(acts[name], grads[name], (qa, qs)).T
    assert_scores_close(ours, expected, rel=1e-9)
    assert comp.width == 3 * 3 + 3 * 3


@pytest.mark.parametrize("projection", ["gaussian", "orthogonal"])
@pytest.mark.parametrize("placement", ["index", "sqrt"])
def test_projected_dot_products_are_unbiased(mlp_case, projection, placement):
    """Mean over 600 seeds of the projected score equals the exact score; the N(0, 1/d) scale
    (Bergson before 0.13.1) gives (p/d_S)(p/d_A) of it, which this tolerance rejects."""
    model, train, queries = mlp_case
    factors = fitted("ekfac", model, train)
    acts, grads = _tokens(model, train, factors.layers)
    qg = InfluenceScorer(model, TASK, factors, score_dtype=torch.float64).query_gradients([queries])
    p = 2
    samples = []  # [seeds, L, Q, N]: each layer's projected score
    for seed in range(600):
        comp = Compression.from_factors(factors, IndexOptions(projection_dim=p, seed=seed, projection=projection,
                                                              preconditioner=placement))
        qv = comp.query_vectors(qg, factors, torch.float64)
        per_layer = []
        for n in factors.layers:
            rows = comp.layers[n].from_tokens(acts[n], grads[n], comp.eigvecs(factors, n, "cpu", torch.float64))
            per_layer.append(qv[:, comp.slices()[n]] @ rows.T)
        samples.append(torch.stack(per_layer))
    samples = torch.stack(samples)
    exact = InfluenceScorer(model, TASK, factors, score_dtype=torch.float64).pairwise_scores([queries], [train])
    mean = samples.sum(1).mean(0)
    stderr = samples.sum(1).std(0) / samples.shape[0] ** 0.5
    assert ((mean - exact).abs() <= 4.5 * stderr).all()
    # Pooled over all pairs: the per-seed scale <sample, exact> / <exact, exact> averages to 1. The same
    # Gaussians scaled N(0, 1/d) shrink each layer's estimate by (p / d_S)(p / d_A), far outside the tolerance.
    slopes = (samples.sum(1) * exact).flatten(1).sum(1) / exact.square().sum()
    slope_err = slopes.std() / slopes.numel() ** 0.5
    assert abs(float(slopes.mean()) - 1) < 4 * slope_err
    shrink = torch.tensor([(p / l.d_out) * (p / l.d_in) for l in factors.layers.values()], dtype=torch.float64)
    wrong = (samples * shrink[None, :, None, None]).sum(1)
    wrong_slope = (wrong * exact).flatten(1).sum(1).mean() / exact.square().sum()
    assert abs(float(wrong_slope) - 1) > 10 * slope_err
    # Seeded, never the global RNG: the same seed draws the same projection, the global RNG is untouched.
    state = torch.random.get_rng_state()
    a = Compression.from_factors(factors, IndexOptions(projection_dim=p, seed=3)).tensors()
    b = Compression.from_factors(factors, IndexOptions(projection_dim=p, seed=3)).tensors()
    assert torch.equal(state, torch.random.get_rng_state())
    assert all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- build, resume, identity
class CountingTask(ClassificationTask):
    """Counts the training-loss forwards, to show which batches a resumed build recomputes."""

    calls = 0

    def train_loss(self, model, batch, sample=False):
        CountingTask.calls += 1
        return super().train_loss(model, batch, sample=sample)


def _killed_after(batches, n):
    for i, batch in enumerate(batches):
        if i == n:
            raise KeyboardInterrupt("killed")
        yield batch


def test_interrupted_build_resumes_to_the_same_index(tmp_path, mlp_case):
    model, train, queries = mlp_case
    factors = fitted("ekfac", model, train)
    options = IndexOptions(projection_dim=3, keep=4, shard_size=4, seed=7)
    batches = models.split_batch(train, 2)  # 8 batches, a shard every 2
    build_index(model, TASK, factors, batches, tmp_path / "whole", options)
    task = CountingTask()
    with pytest.raises(KeyboardInterrupt):
        build_index(model, task, factors, _killed_after(batches, 5), tmp_path / "resumed", options)
    with pytest.raises(GradientIndexError, match="unfinished"):
        GradientIndex.load(tmp_path / "resumed", factors)
    state = json.loads((tmp_path / "resumed" / "rank-00000.json").read_text())
    assert [s["rows"] for s in state["shards"]] == [4, 4] and not state["complete"]
    assert sorted(state["files"]) == sorted(s["file"] for s in state["shards"])  # one bundle of the store
    first = tmp_path / "resumed" / state["shards"][0]["file"]
    kept = first.stat().st_mtime_ns
    stray = tmp_path / "resumed" / "shard-r00000-0123456789ab.safetensors"
    stray.write_bytes(b"half a shard")  # killed after writing a shard, before its manifest named it
    CountingTask.calls = 0
    build_index(model, task, factors, batches, tmp_path / "resumed", options)
    assert CountingTask.calls == 4  # batches 4..7 only
    assert first.stat().st_mtime_ns == kept and not stray.exists()
    qg = InfluenceScorer(model, TASK, factors).query_gradients([queries])
    whole, resumed = GradientIndex.load(tmp_path / "whole", factors), GradientIndex.load(tmp_path / "resumed", factors)
    assert torch.equal(whole.scores(qg), resumed.scores(qg))
    # Resuming over other data is refused, not silently mixed.
    (tmp_path / "resumed" / "rank-00000.json").write_text(json.dumps(state))
    other = models.split_batch(models.mlp_data(16, seed=9), 2)
    with pytest.raises(GradientIndexError, match="other data"):
        build_index(model, TASK, factors, other, tmp_path / "resumed", options)


def test_index_from_other_factors_model_or_data_is_refused(tmp_path, mlp_case):
    model, train, queries = mlp_case
    factors = fitted("ekfac", model, train)
    batches = models.split_batch(train, 4)
    build_index(model, TASK, factors, batches, tmp_path, IndexOptions(projection_dim=4))
    GradientIndex.load(tmp_path, factors, model, batches)  # the same: fine
    with pytest.raises(GradientIndexError, match="other factors"):
        GradientIndex.load(tmp_path, factors.with_damping(0.5), model)
    with pytest.raises(GradientIndexError, match="other factors"):
        GradientIndex.load(tmp_path, fitted("ekfac", model, models.mlp_data(16, seed=5)))
    other_model = models.mlp()
    with torch.no_grad():
        other_model[0].weight[0, 0] += 1e-3
    with pytest.raises(GradientIndexError, match="other model"):
        GradientIndex.load(tmp_path, factors, other_model)
    x, y = train
    swapped = (x[[1, 0] + list(range(2, 16))], y[[1, 0] + list(range(2, 16))])
    changed = (x.clone(), y)
    changed[0][5, 2] += 1e-6
    for data in (swapped, changed, (x[:12], y[:12])):
        with pytest.raises(GradientIndexError, match="other training data"):
            GradientIndex.load(tmp_path, factors, model, models.split_batch(data, 4))
    # A directory holding an index of other options is not overwritten or mixed.
    with pytest.raises(GradientIndexError, match="other factors, model or options"):
        build_index(model, TASK, factors, batches, tmp_path, IndexOptions(projection_dim=5))
    # A corrupt shard is found at load.
    shard = tmp_path / json.loads((tmp_path / "rank-00000.json").read_text())["shards"][0]["file"]
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 1
    shard.write_bytes(bytes(raw))
    with pytest.raises(GradientIndexError, match="checksum"):
        GradientIndex.load(tmp_path, factors)


def test_query_placement_depends_on_the_eigenbasis_only(tmp_path, mlp_case):
    """With the preconditioner on the query side, the index holds Q_S^T DW Q_A (compressed): the same
    index serves factors with another damping, and scores exactly with them."""
    model, train, queries = mlp_case
    factors = fitted("ekfac", model, train)
    build_index(model, TASK, factors, models.split_batch(train, 4), tmp_path,
                IndexOptions(projection_dim=None, preconditioner="query"), dtype=torch.float64)
    damped = factors.with_damping(0.5)
    scorer = InfluenceScorer(model, TASK, damped, score_dtype=torch.float64)
    exact = scorer.pairwise_scores([queries], models.split_batch(train, 4))
    index = GradientIndex.load(tmp_path, damped, model)
    assert_scores_close(index.scores(scorer.query_gradients([queries]), dtype=torch.float64), exact)
    # Queries compressed from their tokens carry the damped factors' preconditioner, not the saved one.
    assert_scores_close(index.scores(index.compress_queries(scorer, [queries]), dtype=torch.float64), exact)


@pytest.mark.parametrize("consumer", ["add_rotated", "add_rotated_tokens"])
def test_index_built_inside_the_eigenvalue_correction_pass(tmp_path, mlp_case, consumer):
    """The consumer the EK-FAC pass calls: before Lambda exists (phase 'eigen'), per-example gradients
    rotated as that pass rotates them (Q_S^T DW Q_A, or its rotated tokens a Q_A, s Q_S) go to the
    writer; the index then serves the completed factors exactly."""
    model, train, queries = mlp_case
    factors = fitted("ekfac", model, train)
    eigen = InfluenceFactors("ekfac", factors.layers, "empirical", None, 0.1,
                             {n: {k: v for k, v in t.items() if not k.startswith("lambda")}
                              for n, t in factors.tensors.items()}, phase="eigen")
    with pytest.raises(Exception, match="unfinished"):
        IndexWriter(tmp_path / "no", eigen, model, IndexOptions(preconditioner="index"))
    writer = IndexWriter(tmp_path, eigen, model, IndexOptions(projection_dim=None, preconditioner="query"),
                         dtype=torch.float64)
    qa_qs = {n: (t["A_eigvecs"], t["S_eigvecs"]) for n, t in factors.tensors.items()}
    for batch in models.split_batch(train, 4):
        assert writer.begin_batch(batch)
        with LayerCapture(model, factors.layers, dtype=torch.float64) as cap:
            if consumer == "add_rotated":
                cap.backward(ce_loss(model, batch), lambda n, a, s: writer.add_rotated(
                    n, per_example_gradients(a @ qa_qs[n][0], s @ qa_qs[n][1])))
            else:
                cap.backward(ce_loss(model, batch), lambda n, a, s: writer.add_rotated_tokens(
                    n, a @ qa_qs[n][0], s @ qa_qs[n][1]))
        writer.end_batch()
    writer.close()
    scorer = InfluenceScorer(model, TASK, factors, score_dtype=torch.float64)
    exact = scorer.pairwise_scores([queries], models.split_batch(train, 4))
    index = GradientIndex.load(tmp_path, factors, model)
    assert_scores_close(index.scores(scorer.query_gradients([queries]), dtype=torch.float64), exact)


def test_two_rank_build_equals_one(tmp_path, mlp_case):
    """Each rank writes its shard files for its interleaved share; the loaded index is in dataset order."""
    from lightning_influence.loaders import IndexCollate, IndexedDataset, ShardSampler

    model, train, queries = mlp_case
    factors = fitted("kfac", model, train)
    options = IndexOptions(projection_dim=3, shard_size=3)
    dataset = TensorDataset(*train)
    build_index(model, TASK, factors, DataLoader(dataset, batch_size=3), tmp_path / "one", options)
    for rank in (1, 0):
        shard = DataLoader(IndexedDataset(dataset), batch_size=3, sampler=ShardSampler(16, rank, 2),
                           collate_fn=IndexCollate())
        build_index(model, TASK, factors, shard, tmp_path / "two", options, rank=rank, world_size=2, indexed=True)
    assert sorted(p.name for p in (tmp_path / "two").glob("rank-*.json")) == ["rank-00000.json", "rank-00001.json"]
    with pytest.raises(GradientIndexError, match="dataset positions"):
        build_index(model, TASK, factors, DataLoader(dataset, batch_size=3), tmp_path / "bad", options, rank=1,
                    world_size=2)
    qg = InfluenceScorer(model, TASK, factors).query_gradients([queries])
    one, two = GradientIndex.load(tmp_path / "one", factors), GradientIndex.load(tmp_path / "two", factors)
    torch.testing.assert_close(two.scores(qg), one.scores(qg), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- querying
def test_cosine_scores_are_normalised_whitened_scores(tmp_path, mlp_case):
    model, train, queries = mlp_case
    factors = fitted("ekfac", model, train)
    batches = models.split_batch(train, 4)
    scorer = InfluenceScorer(model, TASK, factors, score_dtype=torch.float64)
    exact = scorer.pairwise_scores([queries], batches)
    self_train = scorer.self_scores(batches)
    qg = scorer.query_gradients([queries])
    g_query = dense.per_example_grads(model, {n: model.get_submodule(n) for n in factors.layers}, ce_measure, queries)
    self_query = sum((qg.full[n].flatten(1) * g_query[n]).sum(1) for n in factors.layers)  # g^T (G+lambda)^-1 g
    build_index(model, TASK, factors, batches, tmp_path / "sqrt", IndexOptions(projection_dim=None,
                                                                                preconditioner="sqrt"))
    cosine = GradientIndex.load(tmp_path / "sqrt", factors).scores(qg, normalize=True, dtype=torch.float64)
    expected = exact / (self_query.sqrt()[:, None] * self_train.sqrt()[None, :])
    assert expected.abs().max() <= 1 + 1e-9
    torch.testing.assert_close(cosine, expected, rtol=1e-5, atol=1e-6)
    build_index(model, TASK, factors, batches, tmp_path / "index",
                IndexOptions(projection_dim=None, preconditioner="index"))
    with pytest.raises(GradientIndexError, match="preconditioner='sqrt'"):
        GradientIndex.load(tmp_path / "index", factors).scores(qg, normalize=True)


def test_two_stage_top_k_equals_exact_top_k(tmp_path):
    """A lossy index (2 x 2 per layer) proposes K candidates per query; when they cover the exact
    top-k, the exactly rescored list is the exact top-k (values and indices)."""
    model = models.mlp()
    train, queries = models.mlp_data(48, seed=1), models.mlp_data(4, seed=2)
    factors = fitted("ekfac", model, train, batch_size=8)
    loader = DataLoader(TensorDataset(*train), batch_size=8)
    build_index(model, TASK, factors, loader, tmp_path, IndexOptions(projection_dim=2))
    index = GradientIndex.load(tmp_path, factors, model, loader)
    scorer = InfluenceScorer(model, TASK, factors, score_dtype=torch.float64)
    qg = scorer.query_gradients([queries])
    exact = scorer.pairwise_scores([queries], loader)
    k = 3
    exact_v, exact_i = torch.topk(exact, k, dim=1)
    approx = index.scores(qg)
    # How many candidates the index needs to propose to cover each query's exact top-k.
    order = torch.argsort(approx, dim=1, descending=True)
    need = max(int((order[q][:, None] == exact_i[q][None, :]).nonzero()[:, 0].max()) + 1 for q in range(4))
    assert k < need < 48  # the index alone gets the top-k wrong, and stage one does filter
    first_v, first_i = index.top_k(qg, k)
    assert not torch.equal(first_i, exact_i)
    values, indices = index.top_k(qg, k, rescore=need, scorer=scorer, train_loader=loader)
    assert torch.equal(indices, exact_i)
    torch.testing.assert_close(values, exact_v, rtol=1e-9, atol=1e-12)
    with pytest.raises(GradientIndexError, match="rescore must be"):
        index.top_k(qg, k, rescore=2, scorer=scorer, train_loader=loader)
    with pytest.raises(GradientIndexError, match="scorer and the training dataloader"):
        index.top_k(qg, k, rescore=10)
    other = InfluenceScorer(model, TASK, factors.with_damping(1.0), score_dtype=torch.float64)
    with pytest.raises(GradientIndexError, match="other factors"):
        index.top_k(qg, k, rescore=10, scorer=other, train_loader=loader)


def test_index_top_k_matches_its_scores_and_float16_storage(tmp_path, mlp_case):
    model, train, queries = mlp_case
    factors = fitted("kfac", model, train)
    batches = models.split_batch(train, 4)
    qg = InfluenceScorer(model, TASK, factors).query_gradients([queries])
    build_index(model, TASK, factors, batches, tmp_path / "32", IndexOptions(projection_dim=None, shard_size=3))
    build_index(model, TASK, factors, batches, tmp_path / "16", IndexOptions(projection_dim=None, dtype="float16"))
    full, half = GradientIndex.load(tmp_path / "32", factors), GradientIndex.load(tmp_path / "16", factors)
    assert half.bytes_per_example * 2 == full.bytes_per_example
    scores = full.scores(qg)
    values, indices = full.top_k(qg, 4)
    ref_v, ref_i = torch.topk(scores, 4, dim=1)
    assert torch.equal(indices, ref_i) and torch.equal(values, ref_v)
    torch.testing.assert_close(half.scores(qg), scores, rtol=1e-2, atol=1e-2 * scores.abs().max())


def test_bad_options_and_loaders_are_refused(tmp_path, mlp_case):
    model, train, _ = mlp_case
    for bad in (dict(projection_dim=0), dict(keep=-1), dict(preconditioner="both"), dict(dtype="int8"),
                dict(shard_size=0), dict(seed=1.5)):
        with pytest.raises(OptionsError):
            IndexOptions(**bad)
    diagonal = fitted("diagonal", model, train)
    with pytest.raises(OptionsError, match="eigenbasis"):
        build_index(model, TASK, diagonal, models.split_batch(train, 4), tmp_path, IndexOptions(keep=2))
    shuffled = DataLoader(TensorDataset(*train), batch_size=4, shuffle=True)
    with pytest.raises(GradientIndexError, match="shuffle"):
        build_index(model, TASK, diagonal, shuffled, tmp_path, IndexOptions())
    with pytest.raises(GradientIndexError, match="empty"):
        build_index(model, TASK, diagonal, [], tmp_path / "empty", IndexOptions())
    with pytest.raises(GradientIndexError, match="no gradient index"):
        GradientIndex.load(tmp_path / "nothing", diagonal)


def test_approximate_search_with_faiss(tmp_path, mlp_case, monkeypatch):
    """faiss is optional: without it a clear error names the extra; with it, HNSW candidates on a small
    index are the exact matmul's top-k, and feed the exact rescoring like the exact ones."""
    import sys

    model, train, queries = mlp_case
    factors = fitted("ekfac", model, train)
    loader = DataLoader(TensorDataset(*train), batch_size=4)
    build_index(model, TASK, factors, loader, tmp_path, IndexOptions(projection_dim=3))
    index = GradientIndex.load(tmp_path, factors)
    scorer = InfluenceScorer(model, TASK, factors, score_dtype=torch.float64)
    qg = scorer.query_gradients([queries])
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "faiss", None)  # import faiss -> ImportError
        with pytest.raises(GradientIndexError, match="pip install faiss-cpu"):
            index.top_k(qg, 3, approximate=True)
    pytest.importorskip("faiss")
    exact_v, exact_i = index.top_k(qg, 5)
    approx_v, approx_i = index.top_k(qg, 5, approximate=True)
    assert torch.equal(approx_i, exact_i)
    torch.testing.assert_close(approx_v, exact_v, rtol=1e-5, atol=1e-6)
    cos_v, cos_i = index.top_k(qg, 5, approximate=True, normalize=True)
    ref_v, ref_i = index.top_k(qg, 5, normalize=True)
    assert torch.equal(cos_i, ref_i)
    two = index.top_k(qg, 2, rescore=6, scorer=scorer, train_loader=loader, approximate=True)
    assert torch.equal(two[1], index.top_k(qg, 2, rescore=6, scorer=scorer, train_loader=loader)[1])


def _ddp_build(rank, directory, init_file):
    """One process of a 2-process gloo group: each rank indexes its shard of the data and writes its files."""
    import torch.distributed as dist

    from lightning_influence.loaders import rebuild_loader

    torch.set_num_threads(1)
    model = models.mlp()
    train = models.mlp_data(16, seed=1)
    factors = fitted("kfac", model, train)  # before the group exists: no all-reduce, the same on both ranks
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        shard = rebuild_loader(DataLoader(TensorDataset(*train), batch_size=3), indexed=True)
        build_index(model, TASK, factors, shard, directory, IndexOptions(projection_dim=3, shard_size=3),
                    rank=dist.get_rank(), world_size=dist.get_world_size(), indexed=True)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_build_equals_single_process(tmp_path, mlp_case):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_build, args=(str(tmp_path / "ddp"), str(tmp_path / "init")), nprocs=2, join=True)
    model, train, queries = mlp_case
    factors = fitted("kfac", model, train)
    build_index(model, TASK, factors, DataLoader(TensorDataset(*train), batch_size=3), tmp_path / "one",
                IndexOptions(projection_dim=3, shard_size=3))
    qg = InfluenceScorer(model, TASK, factors).query_gradients([queries])
    ddp = GradientIndex.load(tmp_path / "ddp", factors, model, DataLoader(TensorDataset(*train), batch_size=5))
    one = GradientIndex.load(tmp_path / "one", factors)
    assert ddp.manifest["world_size"] == 2
    torch.testing.assert_close(ddp.scores(qg), one.scores(qg), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("placement", ["index", "sqrt", "query"])
def test_queries_compressed_from_their_tokens(tmp_path, mlp_case, placement):
    """compress_queries (tokens rotated and projected directly) gives the vectors of query_vectors
    (the preconditioned gradients rotated back), with truncation and projection on."""
    model, train, queries = mlp_case
    factors = fitted("ekfac", model, train)
    build_index(model, TASK, factors, models.split_batch(train, 4), tmp_path,
                IndexOptions(projection_dim=3, keep=4, preconditioner=placement), dtype=torch.float64)
    index = GradientIndex.load(tmp_path, factors)
    scorer = InfluenceScorer(model, TASK, factors, score_dtype=torch.float64)
    direct = index.compress_queries(scorer, models.split_batch(queries, 2))
    via = index.query_vectors(scorer.query_gradients(models.split_batch(queries, 2)), dtype=torch.float64)
    torch.testing.assert_close(direct, via, rtol=1e-9, atol=1e-9 * float(via.abs().max()))
    torch.testing.assert_close(index.scores(direct, dtype=torch.float64), index.scores(via, dtype=torch.float64))
