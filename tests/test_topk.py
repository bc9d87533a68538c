"""Streaming top-k and resumable score shards against the full matrix."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from lightning_influence import store
from lightning_influence.scoring.topk import ScoreShardWriter, StreamingTopK, read_scores
from lightning_influence.errors import TopKError

Q, N = 5, 103


def score_matrix(ties: bool, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if ties:  # few distinct values: many ties, including across chunk boundaries
        return torch.randint(-4, 5, (Q, N), generator=g).to(torch.float32) / 2
    return torch.randn(Q, N, generator=g, dtype=torch.float64)


def chunks(n=N, sizes=(7, 1, 13, 9)):
    start, i = 0, 0
    while start < n:
        b = min(sizes[i % len(sizes)], n - start)
        yield start, b
        start, i = start + b, i + 1


def reference(full: torch.Tensor, k: int, largest: bool):
    """Sort by value (descending if largest), ties by ascending index (numpy lexsort)."""
    vals, idxs = [], []
    for row in full.numpy():
        key = -row if largest else row
        order = np.lexsort((np.arange(len(row)), key))[:k]
        vals.append(row[order])
        idxs.append(order)
    return torch.tensor(np.array(vals)), torch.tensor(np.array(idxs))


def feed(tracker, full, start=0, stop=N):
    for s, b in chunks():
        if s + b <= start or s >= stop:
            continue
        tracker.update(full[:, s:s + b], torch.arange(s, s + b))


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("k", [1, 10, 200])
def test_streaming_topk_equals_topk_of_full_matrix(ties, k):
    full = score_matrix(ties)
    tracker = StreamingTopK(Q, k)
    feed(tracker, full)
    kk = min(k, N)
    for largest, (values, indices) in ((True, tracker.most_positive()), (False, tracker.most_negative())):
        assert values.shape == indices.shape == (Q, kk) and indices.dtype == torch.long
        top = torch.topk(full, kk, dim=1, largest=largest)
        torch.testing.assert_close(values, top.values, rtol=0, atol=0)
        ref_values, ref_indices = reference(full, kk, largest)
        assert torch.equal(indices, ref_indices)
        if not ties:
            assert torch.equal(indices, top.indices)
        assert torch.equal(full.gather(1, indices), values)


def test_streaming_topk_resume_from_state_dict(tmp_path):
    full = score_matrix(ties=True, seed=3)
    whole = StreamingTopK(Q, 8)
    feed(whole, full)
    first = StreamingTopK(Q, 8)
    feed(first, full, stop=50)
    save_file(first.state_dict(), str(tmp_path / "state.safetensors"))  # tensors only
    resumed = StreamingTopK(Q, 8)
    resumed.load_state_dict(load_file(str(tmp_path / "state.safetensors")))
    assert resumed.next_index == first.next_index == 51 and resumed.num_seen == 51  # chunks end at 51
    with pytest.raises(TopKError, match="already consumed"):
        resumed.update(full[:, 45:52], torch.arange(45, 52))
    feed(resumed, full, start=resumed.next_index)
    for a, b in ((resumed.most_positive(), whole.most_positive()), (resumed.most_negative(), whole.most_negative())):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(TopKError, match="k=8, 5 queries"):
        StreamingTopK(Q, 9).load_state_dict(whole.state_dict())
    with pytest.raises(TopKError, match="non-finite"):
        StreamingTopK(Q, 2).update(torch.full((Q, 3), float("nan")), 0)


def run_writer(directory, full, shard_size=16, start_at=0, stop_at=N, finish=True):
    writer = ScoreShardWriter(directory, shard_size=shard_size, topk=6, metadata={"queries": ["a"] * Q})
    for s, b in chunks():
        if s + b <= start_at or s >= stop_at:
            continue
        writer.write(full[:, s:s + b], start=s)
    if finish:
        writer.finish(num_train=N)
    return writer


def test_shards_reassemble_exactly(tmp_path):
    full = score_matrix(ties=False)
    writer = run_writer(tmp_path, full)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["completed"] and manifest["num_train"] == N and manifest["num_queries"] == Q
    assert [(s["file"], s["start"], s["stop"]) for s in manifest["shards"]] == [
        (f"scores-{i:05d}.safetensors", 16 * i, min(16 * (i + 1), N)) for i in range(7)]
    assert torch.equal(writer.read_all(), full) and torch.equal(read_scores(tmp_path), full)
    assert writer.resume_from() == N
    values, indices = writer.topk.most_positive()
    ref = StreamingTopK(Q, 6)
    feed(ref, full)
    assert torch.equal(values, ref.most_positive()[0]) and torch.equal(indices, ref.most_positive()[1])
    with pytest.raises(TopKError, match="complete"):
        writer.write(full[:, :3], start=N)
    reopened = ScoreShardWriter(tmp_path, shard_size=16, topk=6)
    assert reopened.completed and torch.equal(reopened.topk.most_negative()[1], ref.most_negative()[1])


@pytest.mark.parametrize("crash_in_flush", [False, True])
def test_resume_after_interruption_matches_uninterrupted_run(tmp_path, monkeypatch, crash_in_flush):
    full = score_matrix(ties=True, seed=7)
    clean = run_writer(tmp_path / "clean", full)

    if crash_in_flush:  # killed after writing a shard file, before its manifest
        calls = {"n": 0}
        real = store.atomic_write_json

        def flaky(path, payload):
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt
            real(path, payload)

        monkeypatch.setattr(store, "atomic_write_json", flaky)
        with pytest.raises(KeyboardInterrupt):
            run_writer(tmp_path / "run", full, finish=False)
        monkeypatch.undo()
        assert (tmp_path / "run" / "scores-00002.safetensors").exists()  # written but not listed
        expected_resume = 32
    else:  # stopped after index 57 with a partly filled shard in memory
        run_writer(tmp_path / "run", full, stop_at=57, finish=False)
        expected_resume = 48
    with pytest.raises(TopKError, match="unfinished"):
        read_scores(tmp_path / "run")
    assert read_scores(tmp_path / "run", allow_incomplete=True).shape == (Q, expected_resume)

    resumed = ScoreShardWriter(tmp_path / "run", shard_size=16, topk=6)
    assert resumed.resume_from() == expected_resume
    assert resumed.topk.next_index == expected_resume
    with pytest.raises(TopKError, match="starts at training index"):
        resumed.write(full[:, 60:61], start=60)
    # restart from the chunk containing the resume point: overlapping columns are skipped
    restart = max(s for s, _ in chunks() if s <= expected_resume)
    run_writer(tmp_path / "run", full, start_at=restart)
    done = ScoreShardWriter(tmp_path / "run", shard_size=16, topk=6)
    assert torch.equal(done.read_all(), full)
    a, b = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("clean", "run"))
    assert a["shards"] == b["shards"]  # same files, ranges and checksums
    for side in ("most_positive", "most_negative"):
        for x, y in zip(getattr(done.topk, side)(), getattr(clean.topk, side)()):
            assert torch.equal(x, y)
    files = [sorted(p.name for p in (tmp_path / d).iterdir()) for d in ("run", "clean")]
    assert files[0] == files[1]


def test_writer_refusals(tmp_path):
    full = score_matrix(ties=False)
    run_writer(tmp_path, full, stop_at=40, finish=False)
    with pytest.raises(TopKError, match="shard_size=16"):
        ScoreShardWriter(tmp_path, shard_size=8, topk=6)
    with pytest.raises(TopKError, match="topk=6"):
        ScoreShardWriter(tmp_path, shard_size=16)
    with pytest.raises(TopKError, match="5 queries, not 4"):
        ScoreShardWriter(tmp_path, shard_size=16, topk=6, num_queries=4)
    writer = ScoreShardWriter(tmp_path, shard_size=16, topk=6)
    with pytest.raises(TopKError, match="num_train=103"):
        writer.finish(num_train=N)
