"""Streaming top-k keeps peak memory flat as the training set grows (issue: load).

Scores Q queries against N synthetic training sequences with ``InfluenceModule.top_k``
(no [Q, N] matrix is kept) for growing N, each N in a fresh subprocess so that its peak
RSS is its own, and writes ``docs/streaming-memory.md``.

    .venv/bin/python benchmarks/streaming_memory.py            # N = 5k, 20k, 50k
    .venv/bin/python benchmarks/streaming_memory.py --quick    # N = 1k, 4k
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(n: int, seq_len: int, queries: int, k: int) -> dict:
    import torch
    from torch.utils.data import DataLoader, Dataset
    from transformers import GPT2Config, GPT2LMHeadModel

    from lightning_influence import CausalLMTask, InfluenceModule, fit_factors

    torch.manual_seed(0)
    torch.set_num_threads(2)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_positions=seq_len, n_embd=32, n_layer=1, n_head=2)).eval()

    class Synthetic(Dataset):
        """Deterministic random sequences generated on the fly: the data itself costs no memory."""

        def __init__(self, size: int, seed: int):
            self.size, self.seed = size, seed

        def __len__(self):
            return self.size

        def __getitem__(self, i):
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
            ids = torch.randint(0, 128, (seq_len,), generator=g)
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    collate = lambda rows: {key: torch.stack([r[key] for r in rows]) for key in rows[0]}  # noqa: E731
    train = DataLoader(Synthetic(n, 1), batch_size=64, collate_fn=collate)
    query = DataLoader(Synthetic(queries, 2), batch_size=queries, collate_fn=collate)
    task = CausalLMTask()
    factors = fit_factors(model, task, DataLoader(Synthetic(512, 3), batch_size=64, collate_fn=collate))
    module = InfluenceModule(model, task=task, factors=factors, query_rank=8, show_progress=False)
    start = time.perf_counter()
    top = module.top_k(query, train, k=k)
    seconds = time.perf_counter() - start
    assert top["positive"][1].shape == (queries, k)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"n": n, "seconds": seconds, "peak_rss_mb": peak_mb, "full_matrix_mb": queries * n * 4 / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--queries", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--k", type=int, default=10)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.seq_len, args.queries, args.k)))
        return
    sizes = [1000, 4000] if args.quick else [5000, 20000, 50000]
    rows = []
    for n in sizes:
        out = subprocess.run([sys.executable, __file__, "--child", str(n), "--queries", str(args.queries),
                              "--seq-len", str(args.seq_len), "--k", str(args.k)],
                             capture_output=True, text=True, check=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    lines = [
        "# Streaming top-k: peak memory against training-set size",
        "",
        f"`InfluenceModule.top_k` with {args.queries} queries (rank-8 query gradients), k={args.k}, a 1-layer GPT-2 "
        f"(n_embd=32), sequences of {args.seq_len} tokens generated on the fly, batch 64; each size in a fresh "
        "process. Peak RSS includes Python, torch and the model (~the first row's figure).",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}.",
        f"Rerun: `.venv/bin/python benchmarks/streaming_memory.py{' --quick' if args.quick else ''}`",
        "",
        "| training sequences | wall time (s) | sequences/s | peak RSS (MB) | a full [Q, N] float32 matrix would be (MB) |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(f"| {r['n']:,} | {r['seconds']:.1f} | {r['n'] / r['seconds']:.0f} | {r['peak_rss_mb']:.0f} | "
                     f"{r['full_matrix_mb']:.1f} |")
    growth = rows[-1]["peak_rss_mb"] - rows[0]["peak_rss_mb"]
    lines += ["", f"Peak RSS grows by {growth:.0f} MB from {rows[0]['n']:,} to {rows[-1]['n']:,} sequences "
              f"({rows[-1]['n'] / rows[0]['n']:.0f}x more data)."]
    (ROOT / "docs").mkdir(exist_ok=True)
    (ROOT / "docs" / "streaming-memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
