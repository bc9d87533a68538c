"""Block-diagonal factors against full factors, where both fit (docs/method.md, section 6).

Two models, each fitted with dense factors and with blocked ones (same data, same options
otherwise), scored on the same queries; reported: the Pearson correlation of the blocked
scores (pairwise and self-influence) with the dense ones, the factors' size and the fit time.

* the digits MLP of ``benchmarks.lds`` (64-128-64-10, tanh, float64, trained with the LDS
  recipe), every side blocked (blocks of 32 and of 16), with the LDS of each score set on the
  LDS harness's retrained subsets (``--lds``; 50 subsets x 2 seeds, about 3 CPU minutes);
* (``--wide-head``) a GPT-2-sized head, 50257 x 768, fitted with the default layout: time and peak memory;
* a tiny GPT-2 (2 layers, width 64) with a 2048-token head trained on a Markov chain, with
  the threshold set so that only the head's 2048-wide output side is blocked (blocks of 256
  and of 128): the shape of GPT-2's 50257-wide head at a size where the dense head still fits.

    python -m benchmarks.blocks [--lds] [--wide-head]   # writes benchmarks/results/blocks.json and the
                                                        # "Block-diagonal factors" section of docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import time

import torch

from lightning_influence import CausalLMTask, ClassificationTask, InfluenceScorer, fit_factors
from lightning_influence.curvature.blocks import DEFAULT_BLOCK_SIZE

from .common import (DOCS, RESULTS, digits_datasets, linear_module_names, loader, machine_info, markov_sequences,
                     pearson, set_threads, train_lm)

SECTION_START, SECTION_END = "<!-- blocks:start -->", "<!-- blocks:end -->"


def factor_bytes(factors) -> int:
    return sum(t.numel() * t.element_size() for layer in factors.tensors.values() for t in layer.values())


def compare(name, model, task, train, queries, strategy, configs, dtype, batch, modules=None, log=print):
    """Rows for each ``(label, block_size, block_threshold)``; the first config is the dense reference."""
    rows, reference = [], None
    for label, block_size, threshold in configs:
        t0 = time.perf_counter()
        factors = fit_factors(model, task, loader(train, batch), strategy=strategy, modules=modules,
                              fisher="empirical", capture_dtype=dtype, block_size=block_size, block_threshold=threshold)
        fit_seconds = time.perf_counter() - t0
        scorer = InfluenceScorer(model, task, factors, score_dtype=dtype)
        scores = scorer.pairwise_scores(loader(queries, len(queries)), loader(train, batch)).double()
        self_scores = scorer.self_scores(loader(train, batch)).double()
        if reference is None:
            reference = scores, self_scores
        blocked = sorted({f"{n} {tuple(t['S_sum'].shape)}x{tuple(t['A_sum'].shape)}"
                          for n, t in factors.tensors.items() if t["S_sum"].dim() == 3 or t["A_sum"].dim() == 3})
        row = {"model": name, "strategy": strategy, "layout": label, "block_size": block_size,
               "block_threshold": threshold, "pearson_scores": pearson(scores, reference[0]),
               "pearson_self": pearson(self_scores, reference[1]), "factor_bytes": factor_bytes(factors),
               "fit_seconds": fit_seconds, "blocked_layers": blocked, "scores": scores}
        rows.append(row)
        log(f"{name:7s} {strategy:5s} {label:22s} pearson {row['pearson_scores']:.4f} self {row['pearson_self']:.4f} "
            f"factors {row['factor_bytes'] / 2**20:7.2f} MiB fit {fit_seconds:5.2f} s")
    return rows


def digits(with_lds: bool, log=print) -> list[dict]:
    from . import lds

    train_ds, query_ds = digits_datasets(num_query=100)
    net = lds.train_full(train_ds, lds.SEEDS[0]).net
    mods = linear_module_names(net)
    configs = [("dense", None, None), ("blocks of 32", 32, None), ("blocks of 16", 16, None)]
    rows = []
    for strategy in ("kfac", "ekfac"):
        rows += compare("digits", net, ClassificationTask(), train_ds, query_ds, strategy, configs, torch.float64,
                        lds.BATCH, mods, log)
    if with_lds:
        from lightning_influence.evaluation import lds_subsets, linear_datamodeling_score

        subsets = lds_subsets(len(train_ds), 50, fraction=lds.FRACTION, seed=0)
        t0 = time.perf_counter()
        measured = torch.stack([lds.retrain(train_ds, query_ds, subsets, seed) for seed in lds.SEEDS]).mean(0)
        log(f"retrained {len(subsets)} subsets x {len(lds.SEEDS)} seeds in {time.perf_counter() - t0:.0f} s")
        for row in rows:
            row["lds"] = lds.summary(linear_datamodeling_score(row["scores"], subsets, measured)[1])
            log(f"digits  {row['strategy']:5s} {row['layout']:22s} LDS {row['lds']['mean']:.4f} "
                f"(95% CI {row['lds']['ci95'][0]:.3f}..{row['lds']['ci95'][1]:.3f})")
    return rows


def gpt2(log=print) -> list[dict]:
    from transformers import GPT2Config, GPT2LMHeadModel

    vocab = 2048
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=vocab, n_positions=32, n_embd=64, n_layer=2, n_head=4, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False)
    model = GPT2LMHeadModel(config)
    train = markov_sequences(96, vocab, 24, min_len=12, seed=0)
    queries = markov_sequences(16, vocab, 24, min_len=12, prompt_len=4, seed=1)
    loss = train_lm(model, train, epochs=3, batch_size=16)
    log(f"gpt2: 2 layers, width 64, head {vocab}; mean token loss after training {loss:.3f}")
    # threshold 1024: only the head's 2048-wide output side is blocked (GPT-2's 256-wide MLP side is not)
    configs = [("dense", None, None), ("head blocks of 256", 256, 1024), ("head blocks of 128", 128, 1024)]
    rows = []
    for strategy in ("kfac", "ekfac"):
        rows += compare("gpt2", model, CausalLMTask(), train, queries, strategy, configs, torch.float32, 16, None, log)
    return rows


def wide_head(log=print) -> dict:
    """A GPT-2-sized head (50257 x 768, the head only) fitted with the default layout, in a fresh process's
    memory: what the dense head (a 50257^2 float64 covariance, 20 GB) could not do on this machine."""
    from torch import nn

    from .common import PeakRSS

    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50257, 768), nn.Linear(768, 50257, bias=False))

    class HeadLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, input_ids, attention_mask=None):
            return self.net(input_ids)

    lm = HeadLM()
    ids = torch.randint(0, 50257, (8, 32))
    batches = [{"input_ids": ids[i:i + 4], "attention_mask": torch.ones(4, 32, dtype=torch.long),
                "labels": ids[i:i + 4]} for i in (0, 4)]
    with PeakRSS() as mem:
        factors = fit_factors(lm, CausalLMTask(), batches, strategy="ekfac", modules=["net.1"], fisher="empirical",
                              stats_dtype=torch.float32)
    t = factors.tensors["net.1"]
    out = {"S_sum": list(t["S_eigvecs"].shape), "A_sum": list(t["A_eigvecs"].shape), "factor_bytes": factor_bytes(factors),
           "fit": mem.as_dict(), "block_size": DEFAULT_BLOCK_SIZE}
    log(f"wide head 50257x768 (ekfac, float32 sums, default blocks): S {out['S_sum']}, A {out['A_sum']}, "
        f"factors {out['factor_bytes'] / 2**20:.0f} MiB, fit {mem.seconds:.0f} s, peak +{mem.increment / 2**20:.0f} MiB")
    return out


def block_sizes(width: int = 8192, sizes=(2048, 1024, 512, 256), log=print) -> dict:
    """The block size's trade-off on one wide head against dense factors: a 2-layer Llama (hidden 256) whose
    ``width``-token head alone is tracked, EK-FAC (sampled Fisher, float64), 32 training sequences and 8 queries
    of 64 tokens; score and self-influence Pearson and top-5 overlap with the dense factors, fit CPU seconds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from .real_size import data

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=width, hidden_size=256, intermediate_size=704, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                      tie_word_embeddings=False, pad_token_id=0)
    cfg._attn_implementation = "eager"
    model = LlamaForCausalLM(cfg).eval()
    train, queries, task = data(width, 32, 64, seed=1), data(width, 8, 64, seed=2, prompt_len=32), CausalLMTask()
    runs = {}
    for size in (None,) + tuple(sizes):
        opts = dict(block_size=None) if size is None else dict(block_size=size, block_threshold=width // 2)
        start = time.process_time()
        factors = fit_factors(model, task, loader(train, 8), modules=["lm_head"], **opts)
        fit = time.process_time() - start
        scorer = InfluenceScorer(model, task, factors)
        runs[size] = (scorer.pairwise_scores(loader(queries, 8), loader(train, 8)),
                      scorer.self_scores(loader(train, 8)), fit, factor_bytes(factors))
        log(f"  block size {size}: fit {fit:.1f} CPU s")
    dense, dense_self = runs[None][0], runs[None][1]
    top = lambda x: torch.topk(x, 5, dim=1).indices  # noqa: E731
    rows = []
    for size, (scores, own, fit, nbytes) in runs.items():
        overlap = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(top(scores), top(dense))) / (5 * dense.shape[0])
        rows.append({"block_size": size, "pearson_scores": pearson(scores, dense), "pearson_self": pearson(own, dense_self),
                     "top5_overlap": overlap, "fit_cpu_s": fit, "factor_bytes": nbytes})
    return {"width": width, "rows": rows}


def section(result: dict) -> str:
    lines = [SECTION_START, "## 9. Block-diagonal factors against full factors", "",
             "Written by `benchmarks/blocks.py` (`python -m benchmarks.blocks --lds`; raw numbers in "
             "`benchmarks/results/blocks.json`). Each model is fitted with dense factors and with blocked ones "
             "(docs/method.md, section 6), everything else equal (empirical Fisher, 0.1 x mean eigenvalue damping); "
             "Pearson is that of the blocked scores with the dense scores of the same strategy, over every "
             "(query, training example) pair and over the self-influence of every training example. Digits MLP: "
             "float64, every `nn.Linear`, every side wider than the block blocked, 100 queries x 1697 training "
             "digits. Tiny GPT-2: float32, every layer tracked, only the 2048-token head's output side blocked "
             "(threshold 1024), 16 queries x 96 sequences of 12-24 tokens.", "",
             "| model | strategy | layout | Pearson (scores) | Pearson (self) | factors | fit | LDS |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lds = f"{r['lds']['mean']:.3f} ({r['lds']['ci95'][0]:.3f}..{r['lds']['ci95'][1]:.3f})" if "lds" in r else ""
        lines.append(f"| {r['model']} | {r['strategy']} | {r['layout']} | {r['pearson_scores']:.4f} | "
                     f"{r['pearson_self']:.4f} | {r['factor_bytes'] / 2**20:.2f} MiB | {r['fit_seconds']:.2f} s | {lds} |")
    sweep = result.get("block_sizes")
    if sweep:
        lines += ["", f"**The block size** (`python -m benchmarks.blocks --block-sizes`): a 2-layer Llama whose "
                  f"{sweep['width']}-token head alone is tracked (EK-FAC, sampled Fisher, float64; 32 training "
                  "sequences and 8 queries of 64 tokens), each blocked layout against the dense factors. Per token, "
                  "a block costs `b` multiply-adds per output coordinate in each pass (the head's forward costs "
                  "`d_in`), and the eigendecompositions `d b^2`: the default, 1024, keeps most of what 2048 does at a "
                  "third of the fit.", "",
                  "| block size | Pearson (scores) | Pearson (self) | top-5 overlap | fit CPU s | factors |",
                  "|---|---|---|---|---|---|"]
        for r in sweep["rows"]:
            label = "dense" if r["block_size"] is None else str(r["block_size"])
            lines.append(f"| {label} | {r['pearson_scores']:.4f} | {r['pearson_self']:.4f} | {r['top5_overlap']:.2f} | "
                         f"{r['fit_cpu_s']:.1f} | {r['factor_bytes'] / 2**20:.0f} MiB |")
    head = result.get("wide_head")
    if head:
        b = head.get("block_size", 2048)
        lines += ["", f"A GPT-2-sized head alone (`Linear(768, 50257)`, EK-FAC, float32 sums, the default layout: "
                  f"the 50257-wide side as blocks of {b}, the 768-wide side dense; 8 sequences of 32 tokens): "
                  f"`S_eigvecs` {tuple(head['S_sum'])}, factors {head['factor_bytes'] / 2**30:.2f} GiB, fit "
                  f"{head['fit']['seconds']:.0f} s on one thread, peak RSS +{head['fit']['increment_rss'] / 2**30:.2f} GiB "
                  f"(dense, its output covariance alone would be 50257^2 x 8 bytes = 18.8 GiB in float64)."]
    before, after = (RESULTS / "pass_memory_before.json"), (RESULTS / "pass_memory_after.json")
    if before.is_file() and after.is_file():
        b, a = json.loads(before.read_text()), json.loads(after.read_text())
        lines += ["", "**One buffer, no copies** (`python benchmarks/pass_memory.py [--library CHECKOUT]`, "
                  "`benchmarks/results/pass_memory_*.json`): K-FAC's covariance pass on `Linear(4095, 4096)` with a "
                  "bias (two 4096 x 4096 float64 sums, 256 MiB; with their eigenbases the factors hold "
                  f"{a['factor_bytes'] / 2**20:.0f} MiB), 4 batches of 32, one thread. Peak RSS above the start of "
                  f"the pass: {b['pass']['increment_rss'] / 2**20:.0f} MiB with the torchmetrics states (before), "
                  f"{a['pass']['increment_rss'] / 2**20:.0f} MiB with one flat buffer (after); writing the "
                  f"{a['file_bytes'] / 2**20:.0f} MiB factor file: +{b['save']['increment_rss'] / 2**20:.0f} MiB "
                  f"before (safetensors 0.8's `save_file` does not copy) and +{a['save']['increment_rss'] / 2**20:.0f}"
                  " MiB after (tensor by tensor, whatever the safetensors version)."]
    lines += ["", result.get("note", ""), SECTION_END]
    return "\n".join(lines)


def write_docs(result: dict) -> None:
    path = DOCS / "benchmarks.md"
    text = path.read_text()
    block = section(result)
    if SECTION_START in text:
        text = re.sub(re.escape(SECTION_START) + ".*?" + re.escape(SECTION_END), lambda m: block, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lds", action="store_true", help="also the LDS of each digits score set (retrains 100 MLPs)")
    parser.add_argument("--wide-head", action="store_true", help="also fit a 50257 x 768 head with the defaults")
    parser.add_argument("--note", default="", help="a line written under the table")
    parser.add_argument("--report-only", action="store_true", help="rewrite the docs section from blocks.json")
    parser.add_argument("--block-sizes", action="store_true", help="also the block-size sweep on an 8192-wide head")
    parser.add_argument("--extras-only", action="store_true",
                        help="only --wide-head / --block-sizes, keeping blocks.json's table rows")
    args = parser.parse_args()
    if args.report_only:
        result = json.loads((RESULTS / "blocks.json").read_text())
        result["note"] = args.note or result.get("note", "")
        write_docs(result)
        return
    set_threads()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    t0 = time.perf_counter()
    if args.extras_only:
        result = json.loads((RESULTS / "blocks.json").read_text())
        rows = []
    else:
        rows = digits(args.lds) + gpt2()
        result = {"rows": rows, "seconds": time.perf_counter() - t0, "machine": machine_info(), "note": args.note}
    if args.wide_head:
        result["wide_head"] = wide_head()
    if args.block_sizes:
        result["block_sizes"] = block_sizes()
    for r in rows:
        r.pop("scores")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "blocks.json").write_text(json.dumps(result, indent=1))
    write_docs(result)
    print(f"done in {result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
