"""The gradient index over block-diagonal factors (docs/method.md, sections 6 and 7).

Checked against the exact scores of the same blocked factors, against tests/dense.py (explicit
Kronecker curvature with the off-block covariance entries zeroed, ``linalg.solve``) and against an
eigenbasis-coordinate computation on the explicit block-diagonal eigenbases (``dense_matrix``).
"""

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence import ClassificationTask, InfluenceFactors, InfluenceModule, InfluenceScorer, fit_factors
from lightning_influence.capture import find_tracked_layers
from lightning_influence.curvature.blocks import SideLayout
from lightning_influence.errors import GradientIndexError
from lightning_influence.index import GradientIndex, IndexOptions, IndexWriter, PassFeed, build_index
from lightning_influence.index.projection import Compression
from lightning_influence.loaders import rebuild_loader
from lightning_influence.passes import run_phase

from . import dense, lit_models as lm, models
from .test_index import assert_scores_close
from .test_index_wiring import _fit_with_index
from .test_scores_dense import ce_loss, ce_measure

TASK = ClassificationTask()
# models.mlp(): layer '0' is 7 x 6 (bias column), layer '2' 3 x 8. Sides wider than 6 in blocks of 3: layer '0'
# keeps its output side as blocks 3 + 3 + 1 (a short, padded last block) and its input side dense; layer '2'
# its output side dense and its input side as blocks 3 + 3 + 2. Mixed layers, both sides blocked somewhere.
BLOCKS = dict(block_size=3, block_threshold=6)


def block_rule(dim):
    return 3 if dim > 6 else None


def fitted(strategy, model, train, **blocks):
    return fit_factors(model, TASK, models.split_batch(train, 4), strategy=strategy, fisher="empirical",
                       capture_dtype=torch.float64, **(blocks or BLOCKS))


@pytest.fixture(scope="module")
def case():
    return models.mlp(), models.mlp_data(16, seed=1), models.mlp_data(3, seed=2)


def test_the_case_is_blocked_as_described(case):
    model, train, _ = case
    t = fitted("ekfac", model, train).tensors
    assert tuple(t["0"]["S_eigvecs"].shape) == (3, 3, 3) and tuple(t["0"]["A_eigvecs"].shape) == (6, 6)
    assert tuple(t["2"]["S_eigvecs"].shape) == (3, 3) and tuple(t["2"]["A_eigvecs"].shape) == (3, 3, 3)


@pytest.mark.parametrize("strategy", ["ekfac", "kfac"])
@pytest.mark.parametrize("placement", ["index", "sqrt", "query"])
def test_wide_index_over_blocked_factors_reproduces_exact_scores(tmp_path, case, strategy, placement):
    """No projection drawn (8 >= every side) and no truncation: the index's scores, with queries from their
    preconditioned gradients or compressed from their tokens, are the exact scores of the blocked factors,
    which are the dense reference's with the off-block entries zeroed (and not the unblocked ones)."""
    model, train, queries = case
    factors = fitted(strategy, model, train)
    scorer = InfluenceScorer(model, TASK, factors, score_dtype=torch.float64)
    exact = scorer.pairwise_scores(models.split_batch(queries, 2), models.split_batch(train, 4))
    build_index(model, TASK, factors, models.split_batch(train, 4), tmp_path,
                IndexOptions(projection_dim=8, preconditioner=placement, shard_size=5), dtype=torch.float64)
    index = GradientIndex.load(tmp_path, factors, model, models.split_batch(train, 4))
    assert index.width == 7 * 6 + 3 * 8
    by_gradients = index.scores(scorer.query_gradients(models.split_batch(queries, 2)), dtype=torch.float64)
    by_tokens = index.scores(index.compress_queries(scorer, models.split_batch(queries, 2)), dtype=torch.float64)
    assert_scores_close(by_gradients, exact)
    assert_scores_close(by_tokens, exact)
    modules = {n: model.get_submodule(n) for n in factors.layers}
    reference = dense.dense_scores(strategy, model, modules, ce_loss, ce_measure, train, queries, blocks=block_rule)
    assert_scores_close(by_tokens, reference)
    unblocked = dense.dense_scores(strategy, model, modules, ce_loss, ce_measure, train, queries)
    assert (unblocked - reference).abs().max() > 1e-3 * reference.abs().max()  # the blocks change the scores


@pytest.mark.parametrize("placement", ["index", "sqrt", "query"])
def test_truncation_across_blocks_against_the_explicit_block_diagonal_eigenbasis(tmp_path, case, placement):
    """keep=4, no projection: the index's score is, exactly, the eigenbasis inner product restricted to the
    4 rows and 4 columns of highest preconditioned energy, ranked over the whole side across blocks, computed
    here with the explicit ``[d, d]`` eigenbases (``dense_matrix`` of the blocks), Lambda from autograd
    per-example gradients and the damping heuristic. A block rotated with Q_k instead of Q_k^T, eigenvalues
    taken in another order than the blocks' coordinates, or a ranking within one block would all differ."""
    model, train, queries = case
    factors = fitted("ekfac", model, train)
    modules = {n: model.get_submodule(n) for n in factors.layers}
    g_train = dense.per_example_grads(model, modules, ce_loss, train)
    g_query = dense.per_example_grads(model, modules, ce_measure, queries)
    covs = dense.covariances(model, modules, ce_loss, train)
    build_index(model, TASK, factors, models.split_batch(train, 4), tmp_path,
                IndexOptions(projection_dim=None, keep=4, preconditioner=placement), dtype=torch.float64)
    index = GradientIndex.load(tmp_path, factors, model)
    expected = torch.zeros(3, 16, dtype=torch.float64)
    spans_blocks = False
    for name, layer in factors.layers.items():
        t = factors.tensors[name]
        s_side, a_side = SideLayout.of(t["S_eigvecs"], layer.d_out), SideLayout.of(t["A_eigvecs"], layer.d_in)
        qs, qa = s_side.dense_matrix(t["S_eigvecs"]), a_side.dense_matrix(t["A_eigvecs"])
        # The explicit eigenbases diagonalise the block-diagonal covariances (off-block entries zeroed).
        A, S = covs[name]
        for q, cov, side in ((qa, A, a_side), (qs, S, s_side)):
            rotated = q.T @ dense.off_blocks_zeroed(cov, None if side.dense else side.block) @ q
            torch.testing.assert_close(rotated, torch.diag(torch.diagonal(rotated)), atol=1e-10, rtol=0)
        rq = qs.T @ g_query[name].reshape(-1, *layer.shape) @ qa
        ri = qs.T @ g_train[name].reshape(-1, *layer.shape) @ qa
        lam = ri.square().mean(0)  # EK-FAC's Lambda, from autograd's per-example gradients
        damping = 0.1 * lam.mean()
        if placement == "query":  # ranked by K-FAC's L_S L_A, the estimate that exists inside the Lambda pass
            ls, la = torch.diagonal(qs.T @ dense.off_blocks_zeroed(S, s_side.block if not s_side.dense else None)
                                    @ qs), torch.diagonal(qa.T @ dense.off_blocks_zeroed(A, None if a_side.dense
                                                                                           else a_side.block) @ qa)
            est = torch.outer(ls.clamp_min(0), la.clamp_min(0))
            energy = est / (est + 0.1 * est.mean())
        else:
            energy = lam / (lam + damping)
        rows = torch.topk(energy.sum(1), min(4, layer.d_out)).indices
        cols = torch.topk(energy.sum(0), min(4, layer.d_in)).indices
        for side, kept in ((s_side, rows), (a_side, cols)):
            spans_blocks |= not side.dense and len(set((kept // side.block).tolist())) > 1
        keep = torch.zeros(layer.shape, dtype=torch.bool)
        keep[rows.unsqueeze(1), cols.unsqueeze(0)] = True
        expected -= ((rq / (lam + damping)) * keep).flatten(1) @ ri.flatten(1).T
    assert spans_blocks  # the kept directions come from several blocks of a side
    scorer = InfluenceScorer(model, TASK, factors, score_dtype=torch.float64)
    assert_scores_close(index.scores(scorer.query_gradients([queries]), dtype=torch.float64), expected)
    assert_scores_close(index.scores(index.compress_queries(scorer, [queries]), dtype=torch.float64), expected)
    assert index.width == 4 * 4 + 3 * 4


def test_block_rotation_is_not_transposed_and_never_densifies():
    """The side rotation onto kept directions equals the explicit ``Q^T x`` restricted to them, with blocks of
    non-symmetric eigenbases (a transposed block would differ), and keeps only the kept eigenvectors."""
    from lightning_influence.index.projection import SideBasis

    g = torch.Generator().manual_seed(0)
    layout = SideLayout(8, 3)  # blocks 3 + 3 + 2 (padded)
    vecs = torch.zeros(3, 3, 3, dtype=torch.float64)
    for k, real in enumerate((3, 3, 2)):
        q, _ = torch.linalg.qr(torch.randn(real, real, generator=g, dtype=torch.float64))
        q[:, 0] *= torch.sign(torch.linalg.det(q))  # a rotation: a 2 x 2 reflection would be symmetric
        vecs[k, :real, :real] = q
        vecs[k, real:, real:] = torch.eye(3 - real, dtype=torch.float64)
        assert not torch.allclose(q, q.T)
    x = torch.randn(5, 4, 8, generator=g, dtype=torch.float64)
    explicit = x @ layout.dense_matrix(vecs)  # Q^T x for every row vector x
    for kept in (None, torch.tensor([0, 4, 5, 7]), torch.tensor([6, 7]), torch.tensor([2])):
        basis = SideBasis(vecs, layout, kept)
        want = explicit if kept is None else explicit[..., kept]
        torch.testing.assert_close(basis.rotate(x), want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(basis.rotate(x.transpose(1, 2), axis=-2), want.transpose(1, 2), rtol=1e-12,
                                   atol=1e-12)
        if kept is not None:
            assert sum(m.numel() for _, _, m in basis.pieces) <= 3 * len(kept) and basis.vecs is None
        # Rotation and projection folded into one [8, p] matrix (taken where it is cheaper) or one after the other.
        for p in (1, 2, 5):
            proj = torch.randn(want.shape[-1], p, generator=g, dtype=torch.float64)
            torch.testing.assert_close(basis.rotate_project(x, proj), want @ proj, rtol=1e-12, atol=1e-12)
    dense_basis = SideBasis(layout.dense_matrix(vecs), SideLayout(8), torch.tensor([1, 2, 6]))
    proj = torch.randn(3, 2, generator=g, dtype=torch.float64)
    torch.testing.assert_close(dense_basis.rotate_project(x, proj), explicit[..., [1, 2, 6]] @ proj, rtol=1e-12,
                               atol=1e-12)


@pytest.mark.parametrize("options", [dict(projection_dim=None, keep=None), dict(projection_dim=3, keep=4)],
                         ids=["wide", "truncated-projected"])
def test_index_written_in_the_lambda_pass_equals_build_index(tmp_path, case, options):
    """run_phase's consumer over blocked factors (the rotated tokens the Lambda pass forms through the
    block layout) writes the index build_index writes from the completed factors; wide, it scores exactly."""
    model, train, queries = case
    loader = DataLoader(TensorDataset(*train), batch_size=4)
    opts = IndexOptions(preconditioner="query", shard_size=5, **options)
    factors = InfluenceFactors("ekfac", find_tracked_layers(model, None), fisher="empirical", **BLOCKS)
    run_phase("covariance", factors, model, TASK, loader, dtype=torch.float64)
    assert factors.tensors["0"]["S_eigvecs"].dim() == 3
    feed = PassFeed(IndexWriter(tmp_path / "in-pass", factors, model, opts, dtype=torch.float64),
                    rebuild_loader(loader, indexed=True))
    run_phase("lambda", factors, model, TASK, feed.batches(), dtype=torch.float64, consumer=feed)
    feed.close()
    build_index(model, TASK, factors, loader, tmp_path / "after", opts, dtype=torch.float64)
    in_pass = GradientIndex.load(tmp_path / "in-pass", factors, model, loader)
    after = GradientIndex.load(tmp_path / "after", factors, model, loader)
    assert in_pass.manifest["compression_file"] and in_pass.width == after.width
    eye = torch.eye(in_pass.width, dtype=torch.float64)  # scores of unit queries: the index rows themselves
    rows_in_pass, rows_after = in_pass.scores(eye, dtype=torch.float64), after.scores(eye, dtype=torch.float64)
    torch.testing.assert_close(rows_in_pass, rows_after, rtol=1e-6, atol=1e-6 * float(rows_after.abs().max()))
    if options["keep"] is None:
        scorer = InfluenceScorer(model, TASK, factors, score_dtype=torch.float64)
        assert_scores_close(in_pass.scores(index_queries := in_pass.compress_queries(scorer, [queries]),
                                           dtype=torch.float64), scorer.pairwise_scores([queries], loader))
        assert index_queries.shape == (3, in_pass.width)


@pytest.mark.parametrize("placement", ["sqrt", "query"])
def test_blocked_index_is_refused_with_other_block_layouts(tmp_path, case, placement):
    """An index of blocked factors opened with the dense factors of the same model and data (or other blocks)
    is refused, naming the layer, both layouts and the fix."""
    model, train, _ = case
    factors = fitted("ekfac", model, train)
    build_index(model, TASK, factors, models.split_batch(train, 4), tmp_path,
                IndexOptions(projection_dim=3, preconditioner=placement))
    GradientIndex.load(tmp_path, factors, model)  # its own factors: fine
    dense_factors = fitted("ekfac", model, train, block_size=None)
    with pytest.raises(GradientIndexError, match=r"layer '0' kept output side in blocks of 3 and input side dense, "
                                                 r"but these factors keep it output side dense.*block_size"):
        GradientIndex.load(tmp_path, dense_factors, model)
    with pytest.raises(GradientIndexError, match="in blocks of 2"):
        GradientIndex.load(tmp_path, fitted("ekfac", model, train, block_size=2, block_threshold=6), model)
    # and the other way round: an index of dense factors against blocked ones
    build_index(model, TASK, dense_factors, models.split_batch(train, 4), tmp_path / "dense",
                IndexOptions(projection_dim=3, preconditioner=placement))
    with pytest.raises(GradientIndexError, match="output side dense and input side dense, but these factors"):
        GradientIndex.load(tmp_path / "dense", factors)


def test_module_and_callback_build_indexes_over_blocked_factors(tmp_path):
    """InfluenceModule.build_index and InfluenceCallback(index=...) (written in the Lambda pass) with sides
    kept as blocks: both indexes reproduce the exact scores of the blocked factors."""
    model, cb, data, _ = _fit_with_index(tmp_path, "empirical", **BLOCKS)
    assert cb.builds_index_in_pass()
    assert any(t["A_eigvecs"].dim() == 3 for t in cb.factors.tensors.values())  # really blocked
    module = InfluenceModule(model, ClassificationTask(), cb.factors, score_dtype="float64", show_progress=False)
    queries = lm.query_loader()
    exact = module.pairwise_scores(queries, data)
    assert_scores_close(module.pairwise_scores(queries, GradientIndex.load(cb.index_path, cb.factors, model, data)),
                        exact)
    built = module.build_index(data, tmp_path / "module", projection_dim=None, preconditioner="sqrt")
    assert_scores_close(module.pairwise_scores(queries, built), exact)
    comp = Compression.from_factors(cb.factors, IndexOptions(projection_dim=None))
    assert comp.width == sum(layer.d_out * layer.d_in for layer in cb.factors.layers.values())


@pytest.mark.parametrize("placement", ["index", "sqrt", "query"])
def test_weighted_tokens_in_row_chunks_equal_the_whole(tmp_path, case, monkeypatch, placement):
    """A layer too wide for WEIGHTED_CHUNK_BYTES forms its weighted, projected vectors a block of output rows at a
    time (flat memory on a 50257-wide head): the same index and query vectors as in one piece, exact when wide."""
    import lightning_influence.index.projection as projection

    model, train, queries = case
    factors = fitted("ekfac", model, train)
    scorer = InfluenceScorer(model, TASK, factors, score_dtype=torch.float64)
    exact = scorer.pairwise_scores([queries], models.split_batch(train, 4))
    for name, options in (("wide", IndexOptions(projection_dim=None, preconditioner=placement)),
                          ("projected", IndexOptions(projection_dim=2, keep=5, preconditioner=placement))):
        whole = build_index(model, TASK, factors, models.split_batch(train, 4), tmp_path / f"{name}-whole", options,
                            dtype=torch.float64)
        whole = GradientIndex.load(whole, factors)
        whole_queries = whole.compress_queries(scorer, [queries])
        with monkeypatch.context() as m:
            m.setattr(projection, "WEIGHTED_CHUNK_BYTES", 4 * 8 * 8 * 2)  # 2 rows of a batch of 4 (float64, d_in 8)
            chunked = build_index(model, TASK, factors, models.split_batch(train, 4), tmp_path / f"{name}-chunked",
                                  options, dtype=torch.float64)
            chunked = GradientIndex.load(chunked, factors)
            chunked_queries = chunked.compress_queries(scorer, [queries])
        eye = torch.eye(whole.width, dtype=torch.float64)
        torch.testing.assert_close(chunked.scores(eye, dtype=torch.float64), whole.scores(eye, dtype=torch.float64),
                                   rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(chunked_queries, whole_queries, rtol=1e-10, atol=1e-12)
        if name == "wide":
            assert_scores_close(chunked.scores(chunked_queries, dtype=torch.float64), exact)
