"""Scoring through ``trainer.predict`` with the prediction writers, and the in-process API without collectives."""

import lightning as L
import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_influence import ClassificationTask, InfluenceModule, InfluenceScorer, fit_factors
from lightning_influence.integration.writer import ScoreMatrixWriter, TopKWriter
from lightning_influence.scoring.topk import read_scores

from . import lit_models as lm


@pytest.fixture(scope="module")
def case():
    torch.manual_seed(0)
    model = lm.LitClassifier()
    data = lm.classification_data(37)
    factors = fit_factors(model, ClassificationTask(), lm.loader(data, batch_size=8), strategy="ekfac",
                          fisher="empirical")
    queries = lm.loader(lm.classification_data(5, seed=7), batch_size=2)
    # The independent reference: the Lightning-free engine over the loader in order.
    scorer = InfluenceScorer(model, ClassificationTask(), factors)
    full = scorer.pairwise_scores(queries, lm.loader(data, batch_size=8), per_layer=True)
    self_full = scorer.self_scores(lm.loader(data, batch_size=8), per_layer=True)
    return model, factors, data, queries, full, self_full


def _predictor():
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False)


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max()))


def test_every_scoring_method_through_the_trainer(case, tmp_path):
    model, factors, data, queries, full, self_full = case
    module = InfluenceModule(model, task=ClassificationTask(), factors=factors, top_k=4)
    trainer = _predictor()
    train = lm.loader(data, batch_size=8)
    _close(module.pairwise_scores(queries, train, trainer=trainer, per_layer=True), full)
    _close(module.self_scores(train, trainer=trainer), self_full.sum(0))
    total = full.sum(0)
    top = module.top_k(queries, train, trainer=trainer)  # k from the options
    for side, largest in (("positive", True), ("negative", False)):
        expected = torch.topk(total, 4, dim=1, largest=largest)
        assert torch.equal(top[side][1], expected.indices)
        _close(top[side][0], expected.values)
    sharded = module.top_k(queries, train, trainer=trainer, scores_dir=tmp_path / "s", shard_size=10)
    assert torch.equal(sharded["positive"][1], top["positive"][1])
    _close(read_scores(tmp_path / "s"), total)
    # The writer was only attached for the run.
    assert not any(isinstance(c, (ScoreMatrixWriter, TopKWriter)) for c in trainer.callbacks)


def test_predict_step_yields_indices_and_layer_scores(case):
    model, factors, data, queries, full, _ = case
    module = InfluenceModule(model, task=ClassificationTask(), factors=factors)
    with pytest.raises(MisconfigurationException, match="no prepared queries"):
        module.predict_step((torch.arange(2), (data.tensors[0][:2], data.tensors[1][:2])), 0)
    module.prepare_queries(queries)
    idx = torch.tensor([30, 3])
    indices, scores = module.predict_step((idx, (data.tensors[0][idx], data.tensors[1][idx])), 0)
    assert torch.equal(indices, idx) and scores.shape == (2, 5, 2)
    _close(scores, full[:, :, idx])


def test_matrix_writer_orders_by_index(case):
    *_, full, _ = case
    writer = ScoreMatrixWriter(per_layer=True)
    order = torch.randperm(full.shape[-1], generator=torch.Generator().manual_seed(1))
    for chunk in order.split(6):
        writer.add(chunk, full[:, :, chunk])
    assert torch.equal(writer.finish(), full)


def test_in_process_api_never_enters_a_collective(case, monkeypatch, tmp_path):
    """As on rank zero of a data-parallel job whose other ranks are not scoring: a collective would hang."""
    model, factors, data, queries, full, self_full = case
    module = InfluenceModule(model, task=ClassificationTask(), factors=factors, show_progress=False)

    def no_collective(*args, **kwargs):
        raise AssertionError("the in-process API entered a collective")

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *a: 2)
    monkeypatch.setattr(dist, "get_rank", lambda *a: 0)
    for name in ("all_gather", "all_reduce", "broadcast", "barrier", "all_gather_object", "broadcast_object_list"):
        monkeypatch.setattr(dist, name, no_collective)
    train = lm.loader(data, batch_size=8)
    _close(module.pairwise_scores(queries, train), full.sum(0))  # every example, not this "rank's" half
    _close(module.self_scores(train, per_layer=True), self_full)
    top = module.top_k(queries, train, k=3)
    assert torch.equal(top["positive"][1], torch.topk(full.sum(0), 3, dim=1).indices)
    shards = module.top_k(queries, train, k=3, scores_dir=tmp_path / "s")
    assert torch.equal(shards["negative"][1], torch.topk(full.sum(0), 3, dim=1, largest=False).indices)
    _close(read_scores(tmp_path / "s"), full.sum(0))


def test_empty_loader_is_an_error(case):
    model, factors, _, queries, _, _ = case
    module = InfluenceModule(model, task=ClassificationTask(), factors=factors)
    empty = lm.loader(lm.classification_data(0), batch_size=4)
    with pytest.raises(MisconfigurationException, match="the training dataloader is empty"):
        module.pairwise_scores(queries, empty)


def test_trainer_predict_with_a_writer_directly(case):
    """The plain Lightning form: prepared queries, an indexed loader, a writer among the trainer's callbacks."""
    from lightning_influence.loaders import rebuild_loader

    model, factors, data, queries, full, _ = case
    module = InfluenceModule(model, task=ClassificationTask(), factors=factors)
    module.prepare_queries(queries)
    writer = TopKWriter(num_queries=5, k=3)
    matrix = ScoreMatrixWriter()
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[writer, matrix])
    shuffled = lm.loader(data, batch_size=6, shuffle=True)  # rebuilt in dataset order
    trainer.predict(module, rebuild_loader(shuffled, indexed=True, shard=False), return_predictions=False)
    _close(matrix.result, full.sum(0))
    assert torch.equal(writer.result["positive"][1], torch.topk(full.sum(0), 3, dim=1).indices)
