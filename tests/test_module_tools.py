"""InfluenceModule's scaling tools against the plain full-matrix path."""

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_influence import CausalLMTask, InfluenceModule, fit_factors
from lightning_influence.scoring.topk import read_scores

from . import models


class DictRows(Dataset):
    def __init__(self, batch):
        self.batch = batch

    def __len__(self):
        return self.batch["input_ids"].shape[0]

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.batch.items()}


def collate(rows):
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


@pytest.fixture(scope="module")
def setup():
    model = models.tiny_gpt2().float()
    train = DictRows(models.lm_batch(22, vocab=11, max_len=9, pad_to=9, seed=1))
    queries = DictRows(models.lm_batch(3, vocab=11, max_len=7, pad_to=7, seed=3, prompt_len=3))
    task = CausalLMTask()
    tl = DataLoader(train, batch_size=5, collate_fn=collate)
    ql = DataLoader(queries, batch_size=2, collate_fn=collate)
    factors = fit_factors(model, task, tl, strategy="ekfac", fisher="empirical")
    module = InfluenceModule(model, task=task, factors=factors)
    full = module.pairwise_scores(ql, tl)
    return model, task, factors, tl, ql, module, full


def check_top_k(result, full, k):
    pv, pi = torch.topk(full, k, dim=1)
    nv, ni = torch.topk(full, k, dim=1, largest=False)
    torch.testing.assert_close(result["positive"][0], pv)
    torch.testing.assert_close(result["negative"][0], nv)
    assert torch.equal(result["positive"][1], pi) and torch.equal(result["negative"][1], ni)


def test_streaming_top_k_equals_full_matrix(setup, tmp_path):
    *_, tl, ql, module, full = setup
    check_top_k(module.top_k(ql, tl, k=4), full, 4)
    check_top_k(module.top_k(ql, tl, k=4, scores_dir=tmp_path, shard_size=7), full, 4)
    torch.testing.assert_close(read_scores(tmp_path), full)


def test_interrupted_scoring_resumes_to_same_result(setup, tmp_path):
    model, task, factors, tl, ql, module, full = setup

    class Dying(DataLoader):
        pass

    calls = {"n": 0}
    real_collate = tl.collate_fn

    def dying_collate(rows):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt("killed mid-run")
        return real_collate(rows)

    dying = DataLoader(tl.dataset, batch_size=5, collate_fn=dying_collate)
    with pytest.raises(KeyboardInterrupt):
        module.top_k(ql, dying, k=3, scores_dir=tmp_path, shard_size=5)
    seen = []

    def counting(rows):
        seen.append(len(rows))
        return real_collate(rows)

    result = module.top_k(ql, DataLoader(tl.dataset, batch_size=5, collate_fn=counting), k=3,
                          scores_dir=tmp_path, shard_size=5)
    assert sum(seen) == 22 - 15  # three shards of 5 were on disk
    check_top_k(result, full, 3)
    torch.testing.assert_close(read_scores(tmp_path), full)


def test_token_scores_sum_to_sequence_scores(setup):
    *_, tl, ql, module, full = setup
    batch = next(iter(tl))
    tok = module.token_scores(batch, ql)
    assert tok.shape == (3, 5, 9)
    torch.testing.assert_close(tok.sum(-1), full[:, :5], rtol=1e-5, atol=1e-5 * float(full.abs().max()))
    assert (tok[:, batch["attention_mask"] == 0] == 0).all()


def test_stored_queries_round_trip(setup, tmp_path):
    model, task, factors, tl, ql, module, full = setup
    module.prepare_queries(ql)
    module.save_queries(tmp_path / "q", [{"query_id": f"q{i}"} for i in range(3)])
    other = InfluenceModule(model, task=task, factors=factors)
    qg = other.load_queries(tmp_path / "q")
    torch.testing.assert_close(other.pairwise_scores(qg, tl), full)


def test_tfidf_candidates_equal_unfiltered_scores(setup, tmp_path):
    *_, tl, ql, module, full = setup
    words = ["apple", "river", "stone", "cloud", "ember", "frost"]
    train_texts = [f"{words[i % 6]} {words[(i * 7) % 6]} item{i}" for i in range(22)]
    query_texts = ["apple river", "stone cloud", "ember frost"]
    scores, indices = module.candidate_scores(ql, query_texts, train_texts, tl, k=6, cache_dir=tmp_path / "tfidf")
    assert indices.shape == (3, 6)
    torch.testing.assert_close(scores, full.gather(1, indices), rtol=1e-5, atol=1e-6 * float(full.abs().max()))
    assert (tmp_path / "tfidf").is_dir()
