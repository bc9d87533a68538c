"""The gradient index wired in: written inside the EK-FAC pass (run_phase's consumer, the callback's
index=), built by InfluenceModule, and accepted by pairwise_scores / top_k in place of the training data."""

import json

import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence import ClassificationTask, InfluenceCallback, InfluenceFactors, InfluenceModule, \
    InfluenceScorer
from lightning_influence.capture import find_tracked_layers
from lightning_influence.errors import GradientIndexError, OptionsError
from lightning_influence.index import GradientIndex, IndexOptions, IndexWriter, PassFeed
from lightning_influence.loaders import rebuild_loader
from lightning_influence.passes import fit_factors, run_phase

from . import dense, lit_models as lm, models
from .test_index import assert_scores_close
from .test_scores_dense import ce_loss, ce_measure


class CountingTask(ClassificationTask):
    """Counts the training-loss forwards: an index built inside a pass adds none."""

    calls = 0

    def train_loss(self, model, batch, sample=False):
        CountingTask.calls += 1
        return super().train_loss(model, batch, sample=sample)


WIDE = IndexOptions(projection_dim=None, preconditioner="query", shard_size=5)


def _data(n=16):
    return DataLoader(TensorDataset(*models.mlp_data(n, seed=1)), batch_size=4)


def test_run_phase_consumer_writes_the_index_inside_the_lambda_pass(tmp_path):
    """The Lambda pass hands its rotated tokens to the consumer: no extra forward, the same Lambda as a
    pass without it, and an index whose scores are the exact EK-FAC scores (dense reference too)."""
    model, loader = models.mlp(), _data()
    task = CountingTask()
    layers = find_tracked_layers(model, None)
    factors = InfluenceFactors("ekfac", layers, fisher="empirical")
    run_phase("covariance", factors, model, task, loader, dtype=torch.float64)
    feed = PassFeed(IndexWriter(tmp_path, factors, model, WIDE, dtype=torch.float64),
                    rebuild_loader(loader, indexed=True))
    CountingTask.calls = 0
    run_phase("lambda", factors, model, task, feed.batches(), dtype=torch.float64, consumer=feed)
    assert CountingTask.calls == len(loader)  # the pass's own forwards only
    feed.close()
    plain = fit_factors(model, ClassificationTask(), loader, strategy="ekfac", fisher="empirical",
                        capture_dtype=torch.float64)
    for name in layers:
        torch.testing.assert_close(factors.tensors[name]["lambda_sum"], plain.tensors[name]["lambda_sum"])
    queries = models.mlp_data(3, seed=2)
    scorer = InfluenceScorer(model, ClassificationTask(), factors, score_dtype=torch.float64)
    index = GradientIndex.load(tmp_path, factors, model, loader)
    ours = index.scores(scorer.query_gradients([queries]), dtype=torch.float64)
    assert_scores_close(ours, scorer.pairwise_scores([queries], loader))
    modules = {n: model.get_submodule(n) for n in layers}
    assert_scores_close(ours, dense.dense_scores("ekfac", model, modules, ce_loss, ce_measure,
                                                 models.mlp_data(16, seed=1), queries))


def test_index_written_in_a_killed_lambda_pass_resumes(tmp_path):
    """A kill inside the Lambda pass leaves the completed shards; the rerun of the pass (as a resumed fit
    makes it) skips writing them, checks their data, and ends with the index of an uninterrupted pass."""
    model, loader = models.mlp(), _data(24)  # 6 batches of 4, a shard every 2 batches
    task = ClassificationTask()
    layers = find_tracked_layers(model, None)
    options = IndexOptions(projection_dim=3, preconditioner="query", shard_size=8)

    def lambda_pass(directory, stop_after=None):
        factors = InfluenceFactors("ekfac", layers, fisher="empirical")
        run_phase("covariance", factors, model, task, loader)
        writer = IndexWriter(directory, factors, model, options)
        feed = PassFeed(writer, _killed(rebuild_loader(loader, indexed=True), stop_after))
        run_phase("lambda", factors, model, task, feed.batches(), consumer=feed)
        feed.close()
        return factors, writer

    factors, _ = lambda_pass(tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        lambda_pass(tmp_path / "resumed", stop_after=5)
    with pytest.raises(GradientIndexError, match="unfinished"):
        GradientIndex.load(tmp_path / "resumed", factors)
    killed = [s["file"] for s in json.loads((tmp_path / "resumed" / "rank-00000.json").read_text())["shards"]]
    assert len(killed) == 2  # batches 0-3; batch 4 was in the unwritten buffer
    _, writer = lambda_pass(tmp_path / "resumed")
    assert [s["file"] for s in writer._shards][:2] == killed and len(writer._shards) == 3  # kept, not rewritten
    queries = models.mlp_data(3, seed=2)
    qg = InfluenceScorer(model, task, factors).query_gradients([queries])
    whole = GradientIndex.load(tmp_path / "whole", factors, model, loader)
    resumed = GradientIndex.load(tmp_path / "resumed", factors, model, loader)
    assert torch.equal(whole.scores(qg), resumed.scores(qg))


def _killed(batches, stop_after):
    for i, item in enumerate(batches):
        if stop_after is not None and i == stop_after:
            raise KeyboardInterrupt("killed")
        yield item


def test_run_phase_refuses_a_consumer_it_cannot_feed(tmp_path):
    model, loader = models.mlp(), _data()
    layers = find_tracked_layers(model, None)
    sampled = InfluenceFactors("ekfac", layers, fisher="sampled")
    run_phase("covariance", sampled, model, ClassificationTask(), loader)
    writer = IndexWriter(tmp_path, sampled, model, WIDE)
    with pytest.raises(OptionsError, match="fisher='empirical'"):
        run_phase("lambda", sampled, model, ClassificationTask(), loader, consumer=writer)
    kfac = InfluenceFactors("kfac", layers, fisher="empirical")
    with pytest.raises(OptionsError, match="feeds no per-example consumer"):
        run_phase("covariance", kfac, model, ClassificationTask(), loader, consumer=writer)


# --------------------------------------------------------------------------- the callback
def _fit_with_index(tmp_path, fisher, **kw):
    torch.manual_seed(0)
    model = lm.LitClassifier()
    task = CountingTask()
    cb = InfluenceCallback(task=task, fisher=fisher, output_dir=str(tmp_path / "factors"),
                           index=str(tmp_path / "index"), index_projection_dim=None, index_shard_size=16, **kw)
    data = lm.loader(lm.classification_data(48), batch_size=8)
    trainer = lm.trainer(callbacks=[cb], max_epochs=1)
    CountingTask.calls = 0
    trainer.fit(model, train_dataloaders=data)
    return model, cb, data, CountingTask.calls


@pytest.mark.parametrize("fisher", ["empirical", "sampled"])
def test_callback_index_argument(tmp_path, fisher):
    """index= with the empirical Fisher is written in the eigenvalue-correction pass (the run makes one
    check forward plus two passes of 6 batches); with the sampled Fisher in one more pass after the fit.
    Either way the index reproduces the exact scores of the callback's factors."""
    model, cb, data, calls = _fit_with_index(tmp_path, fisher)
    assert cb.builds_index_in_pass() == (fisher == "empirical")
    assert calls == 1 + 2 * 6 + (0 if fisher == "empirical" else 6)
    assert cb.index_path == tmp_path / "index"
    index = GradientIndex.load(cb.index_path, cb.factors, model, data)
    queries = lm.query_loader()
    module = InfluenceModule(model, ClassificationTask(), cb.factors, score_dtype="float64", show_progress=False)
    exact = module.pairwise_scores(queries, data)
    assert_scores_close(module.pairwise_scores(queries, index), exact)
    # A second run over the complete index checks it (no forward of the index) and leaves it as it is.
    files = sorted(p.name for p in cb.index_path.iterdir())
    cb.fit_factors(lm.trainer(callbacks=[cb], max_epochs=1), model, dataloader=data)
    assert sorted(p.name for p in cb.index_path.iterdir()) == files


def test_callback_index_options_are_checked(tmp_path):
    with pytest.raises(MisconfigurationException, match="preconditioner"):
        InfluenceCallback(index=str(tmp_path / "i"), index_preconditioner="both")
    with pytest.raises(MisconfigurationException, match="projection_dim"):
        InfluenceCallback(index=str(tmp_path / "i"), index_projection_dim=0)
    cb = InfluenceCallback(output_dir=str(tmp_path), index=str(tmp_path), fisher="empirical")
    with pytest.raises(MisconfigurationException, match="its own directory"):
        lm.trainer(callbacks=[cb], max_epochs=1).fit(lm.LitClassifier(), datamodule=lm.ClassificationData())


# --------------------------------------------------------------------------- the module
@pytest.fixture(scope="module")
def module_case(tmp_path_factory):
    model = models.mlp()
    train = TensorDataset(*models.mlp_data(40, seed=1))
    loader = DataLoader(train, batch_size=8)
    factors = fit_factors(model, ClassificationTask(), loader, strategy="ekfac", fisher="empirical",
                          capture_dtype=torch.float64)
    module = InfluenceModule(model, ClassificationTask(), factors, score_dtype="float64", show_progress=False)
    queries = DataLoader(TensorDataset(*models.mlp_data(4, seed=2)), batch_size=2)
    return module, loader, queries, tmp_path_factory.mktemp("module-index")


@pytest.mark.parametrize("placement", ["index", "sqrt", "query"])
def test_module_builds_an_index_and_scores_with_it(module_case, placement):
    module, loader, queries, tmp = module_case
    index = module.build_index(loader, tmp / placement, projection_dim=None, preconditioner=placement)
    assert isinstance(index, GradientIndex) and index.num_examples == 40
    exact = module.pairwise_scores(queries, loader)
    assert_scores_close(module.pairwise_scores(queries, index), exact)
    # prepared query gradients are compressed the same way
    assert_scores_close(module.pairwise_scores(module.prepare_queries(queries), index), exact)
    if placement == "sqrt":
        self_train = module.self_scores(loader)
        cosine = module.pairwise_scores(queries, index, normalize=True)
        # cosine x sqrt(self-influence of the training example) is the exact score up to one positive
        # factor per query (the query's norm): float32 storage, so 1e-4 relative.
        rebuilt = cosine * self_train.sqrt()[None, :]
        per_query = (rebuilt * exact).sum(1, keepdim=True) / (rebuilt * rebuilt).sum(1, keepdim=True)
        assert (per_query > 0).all()
        torch.testing.assert_close(rebuilt * per_query, exact, rtol=1e-4, atol=1e-5 * float(exact.abs().max()))
        assert cosine.abs().max() <= 1 + 1e-9
    with pytest.raises(MisconfigurationException, match="per_layer"):
        module.pairwise_scores(queries, index, per_layer=True)
    with pytest.raises(MisconfigurationException, match="GradientIndex"):
        module.pairwise_scores(queries, loader, normalize=True)


def test_module_top_k_by_index_and_two_stages(module_case):
    """By the index alone: its own top-k of both signs. Two stages with a lossy index (2 x 2 per layer):
    the exact top-k of both signs, exact values, and token-wise scores of the final lists that sum to them."""
    module, loader, queries, tmp = module_case
    exact = module.pairwise_scores(queries, loader)
    lossy = module.build_index(loader, tmp / "lossy", IndexOptions(projection_dim=2))
    approx = module.pairwise_scores(queries, lossy)
    alone = module.top_k(queries, lossy, k=3)
    torch.testing.assert_close(alone["positive"][0], torch.topk(approx, 3, dim=1).values)
    assert torch.equal(alone["negative"][1], torch.topk(-approx, 3, dim=1).indices)
    exact_pos, exact_neg = torch.topk(exact, 3, dim=1), torch.topk(-exact, 3, dim=1)
    assert not (torch.equal(alone["positive"][1], exact_pos.indices)
                and torch.equal(alone["negative"][1], exact_neg.indices))  # the lossy index alone errs
    two = module.top_k(queries, lossy, k=3, rescore=40, train_loader=loader, token_scores=True)
    assert torch.equal(two["positive"][1], exact_pos.indices) and torch.equal(two["negative"][1], exact_neg.indices)
    torch.testing.assert_close(two["positive"][0], exact_pos.values)
    torch.testing.assert_close(two["negative"][0], -exact_neg.values)
    for side in ("positive", "negative"):
        tokens = two[f"{side}_tokens"]
        assert tokens.shape[:2] == (4, 3)
        torch.testing.assert_close(tokens.sum(-1), two[side][0])
    # the exact path still takes the loader positionally or as train_loader=
    assert torch.equal(module.top_k(queries, train_loader=loader, k=3)["positive"][1], exact_pos.indices)
    with pytest.raises(MisconfigurationException, match="train_loader="):
        module.top_k(queries, lossy, k=3, rescore=10)
    with pytest.raises(MisconfigurationException, match="rescore=K"):
        module.top_k(queries, lossy, k=3, token_scores=True)


def test_module_refuses_an_index_of_other_factors(module_case):
    module, loader, queries, tmp = module_case
    index = module.build_index(loader, tmp / "for-other", projection_dim=3)
    other = InfluenceModule(module.model, ClassificationTask(), module.factors.with_damping(0.7), show_progress=False)
    with pytest.raises(MisconfigurationException, match="other factors"):
        other.pairwise_scores(queries, index)
    with pytest.raises(MisconfigurationException, match="other factors"):
        other.top_k(queries, index, k=2)


@pytest.mark.slow
def test_callback_index_under_ddp_equals_single_process(tmp_path):
    """Two gloo processes: each rank writes its shard of the index inside the Lambda pass; the index
    (both ranks' shards, in dataset order) equals one built in one process from the same factors."""
    import os
    import subprocess
    import sys

    here = os.path.dirname(__file__)
    env = dict(os.environ, PYTHONPATH=os.path.join(here, ".."), OMP_NUM_THREADS="1")
    try:
        proc = subprocess.run([sys.executable, os.path.join(here, "ddp_index_script.py"), str(tmp_path)], env=env,
                              capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"the DDP job hung: {str(err.stdout)[-2000:]} {str(err.stderr)[-2000:]}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    torch.manual_seed(0)
    model = lm.LitClassifier()  # the script's model: same seed, no training step (max_epochs=0)
    data = lm.loader(lm.classification_data(45), batch_size=8)
    factors = InfluenceFactors.load(tmp_path / "factors")
    assert json.loads((tmp_path / "index" / "manifest.json").read_text())["world_size"] == 2
    for rank in (0, 1):
        state = json.loads((tmp_path / "index" / f"rank-{rank:05d}.json").read_text())
        assert state["complete"] and state["num_examples"] in (22, 23)
    ddp = GradientIndex.load(tmp_path / "index", factors, model, data)
    module = InfluenceModule(model, ClassificationTask(), factors, show_progress=False)
    one = module.build_index(data, tmp_path / "one", projection_dim=3, preconditioner="query")
    queries = lm.query_loader()
    torch.testing.assert_close(module.pairwise_scores(queries, ddp), module.pairwise_scores(queries, one),
                               rtol=1e-5, atol=1e-6)

