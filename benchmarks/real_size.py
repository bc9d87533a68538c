"""Real sizes: GPT-2 small (124M parameters, 50257-token tied head) and a 32k-vocabulary Llama, with defaults.

What a new user gets from ``InfluenceCallback(task="causal_lm")`` / ``fit_factors(model, CausalLMTask(), loader)``
with no options: which layers are tracked (and which are left out, and why), the memory plan against the
measured peak, the fit's time in plain forward+backward epochs, top-k scoring of 16 queries at full rank and
rank 32, self-influence; Kronfluence on the same model and layers, side by side. Models are built from
transformers configs (random weights: speed and memory do not depend on training). Every operation runs in its
own interpreter (``python -m benchmarks.real_size worker ...``) so that peak RSS is that operation's alone.

    .bench-venv/bin/python -m benchmarks.real_size [--quick] [--model gpt2|llama32k|both]

Writes ``benchmarks/results/real_size.json``; ``benchmarks/run_all.py`` turns it into a section of
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from .common import (PeakRSS, ListDataset, loader, loadavg_now, run_worker, save_json, set_threads,
                     timed_finishes)

N_TRAIN, SEQ_LEN, BATCH, N_QUERY = 64, 128, 8, 16
# The fit's eigendecompositions cost the same whatever the data: measured again on 8x the sequences ("_large"
# ops, the Llama only), where they are a smaller share, as in a real fit over thousands of sequences.
N_LARGE = 512
QUICK = dict(n_train=16, seq_len=32)


def build_model(name: str, quick: bool) -> nn.Module:
    torch.manual_seed(0)
    if name == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(n_layer=2, n_embd=128, n_head=4) if quick else GPT2Config()
        cfg.attn_pdrop = cfg.resid_pdrop = cfg.embd_pdrop = 0.0
        return GPT2LMHeadModel(cfg).eval()
    if name == "llama32k":
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(vocab_size=32000, hidden_size=128 if quick else 512, intermediate_size=352 if quick else 1408,
                          num_hidden_layers=2 if quick else 4, num_attention_heads=4 if quick else 8,
                          num_key_value_heads=4 if quick else 8, max_position_embeddings=SEQ_LEN,
                          tie_word_embeddings=False, pad_token_id=0)
        cfg._attn_implementation = "eager"
        return LlamaForCausalLM(cfg).eval()
    raise ValueError(name)


def data(vocab: int, n: int, seq_len: int, seed: int, prompt_len: int = 0) -> ListDataset:
    g = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(n):
        ids = torch.randint(1, vocab, (seq_len,), generator=g)
        labels = ids.clone()
        labels[:prompt_len] = -100
        items.append({"input_ids": ids, "attention_mask": torch.ones(seq_len, dtype=torch.long), "labels": labels})
    return ListDataset(items)


def linear_copy(model: nn.Module) -> nn.Module:
    """The same network with transformers' Conv1D replaced by nn.Linear (Kronfluence tracks only Linear/Conv2d)."""
    import copy

    from transformers.pytorch_utils import Conv1D

    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, Conv1D):
            d_in, d_out = module.weight.shape
            lin = nn.Linear(d_in, d_out)
            with torch.no_grad():
                lin.weight.copy_(module.weight.T)
                lin.bias.copy_(module.bias)
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, lin)
    return model


def worker(args) -> dict:
    set_threads()
    quick = args.quick
    seq_len = QUICK["seq_len"] if quick else SEQ_LEN
    n = QUICK["n_train"] if quick else N_TRAIN
    if args.op.endswith("_large"):
        n, args.op = n * N_LARGE // N_TRAIN, args.op[: -len("_large")]
    model = build_model(args.model, quick)
    vocab = model.config.vocab_size
    train = data(vocab, n, seq_len, seed=1)
    queries = data(vocab, N_QUERY, seq_len, seed=2, prompt_len=seq_len // 2)
    workdir = Path(args.workdir)
    result: dict = {"op": args.op, "model": args.model, "n": n, "seq_len": seq_len, "threads": torch.get_num_threads(),
                    "parameters": sum(p.numel() for p in model.parameters())}
    precision = "bf16-mixed" if args.model == "llama32k" else "32"
    # bf16-mixed as Lightning runs it: the forward under autocast (the backward follows its casts)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16-mixed" else None
    mixed = autocast if autocast else nullcontext
    result["precision"] = precision
    from lightning_influence import CausalLMTask

    task = CausalLMTask()
    modules = json.loads(args.modules) if args.modules else None
    if args.op in ("epoch", "train"):
        # epoch: plain forward+backward (the yardstick); train: a training epoch with AdamW ("training alone")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5) if args.op == "train" else None
        with PeakRSS() as m:
            for batch in loader(train, BATCH):
                model.zero_grad(set_to_none=True)
                ctx = autocast() if autocast else torch.enable_grad()
                with ctx:
                    loss = task.train_loss(model, batch) / BATCH
                loss.backward()
                if opt is not None:
                    opt.step()
    elif args.op == "fit":
        from lightning_influence import fit_factors
        from lightning_influence.capture import find_tracked_layers
        from lightning_influence.memory import MemoryBudgetError, fit_memory_plan

        # The plan fit_factors makes (and checks) before its first pass, recorded beside the measurement.
        layers = find_tracked_layers(model, modules)
        with mixed():  # as fit_factors plans it: under the run's autocast, saving each phase (offload)
            plan = fit_memory_plan(model, task, layers, "ekfac", loader(train, BATCH), stats_dtype=torch.float64,
                                   capture_dtype=torch.float32, device="cpu", offload=True)
        result["plan"] = {"table": plan.table(), "peak_bytes": plan.peak.total, "peak_phase": plan.peak.phase,
                          "phases": {p.phase: p.total for p in plan.phases}}
        result["modules"] = modules
        result["tracked"] = {name: [l.d_out, l.d_in] for name, l in layers.items()}
        try:
            with timed_finishes() as finish_cpu, PeakRSS() as m, mixed():
                fit_factors(model, task, loader(train, BATCH), modules=modules,
                            output_dir=str(workdir / f"factors-{args.model}"))
            result["finish_cpu_seconds"] = finish_cpu
        except MemoryBudgetError as err:  # refused before the first pass: a result too
            result["refused"] = str(err).split(" Plan:")[0]
    elif args.op in ("topk_full", "topk_r32", "self"):
        from lightning_influence import InfluenceFactors, InfluenceModule

        # Loading the factors is part of the measured block, as it is of Kronfluence's scoring.
        with PeakRSS() as m, mixed():
            factors = InfluenceFactors.load(workdir / f"factors-{args.model}")
            module = InfluenceModule(model, task=task, factors=factors, show_progress=False,
                                     query_rank=32 if args.op == "topk_r32" else None)
            if args.op == "self":
                module.self_scores(loader(train, BATCH))
            else:
                module.top_k(loader(queries, N_QUERY), loader(train, BATCH), k=10)
    elif args.op in ("kron_fit", "kron_score"):
        from . import kron_side

        kmodel = linear_copy(model) if args.model == "gpt2" else model
        names = json.loads((workdir / f"tracked-{args.model}.json").read_text())
        ktask = kron_side.KronLMTask(names)
        analyzer = kron_side.make_analyzer(kmodel, ktask, workdir / "kron", name=args.model, copy_model=False)
        with PeakRSS() as m:
            if args.op == "kron_fit":
                kron_side.fit(analyzer, "ekfac", train, "ekfac", BATCH)
            else:
                kron_side.pairwise(analyzer, "ekfac", "scores", queries, train, BATCH)
    result.update(m.as_dict())
    return result


def call(workdir: Path, model: str, op: str, quick: bool, log, modules: list[str] | None = None) -> dict:
    args = ["worker", "--workdir", str(workdir), "--model", model, "--op", op] + (["--quick"] if quick else [])
    if modules is not None:
        args += ["--modules", json.dumps(modules)]
    r = run_worker("benchmarks.real_size", args, timeout=3 * 3600)
    note = f"  REFUSED: {r['refused'][:300]}" if r.get("refused") else ""
    log(f"  {model:9s} {op:10s} wall={r['seconds']:7.1f}s cpu={r['cpu_seconds']:7.1f}s "
        f"peak_rss={r['peak_rss'] / 2**20:7.0f}MiB (+{r['increment_rss'] / 2**20:.0f}MiB){note}")
    return r


# When the defaults' plan is over the budget (a 32000-wide untied head on a branch without block-diagonal
# factors), the benchmark goes on with the named selections that leave the head out.
FALLBACK_MODULES = ["mlp", "attention"]


ALL_OPS = ("epoch", "train", "fit", "topk_full", "topk_r32", "self", "kron_fit", "kron_score", "epoch_large",
           "fit_large")
LARGE_MODELS = ("llama32k",)


def tracked_names(name: str, quick: bool) -> list[str]:
    """The layers the defaults track (what the fit records), for peer rows measured without our fit."""
    from lightning_influence.capture import find_tracked_layers

    return list(find_tracked_layers(build_model(name, quick), None))


def run(models: list[str], quick: bool, log=print, ops: tuple[str, ...] = ALL_OPS, previous: dict | None = None) -> dict:
    """Measure ``ops`` for each model. With ``previous`` (the saved results), rows of other ops are kept from it,
    each row stamped with the time it was measured (``measured_at``), so the page can say which came from when."""
    set_threads()
    # The factors of every model (GPT-2's are 3 GB) go with the run: the directory is removed at its end.
    with tempfile.TemporaryDirectory(prefix="bench-real-") as tmp:
        return _run(models, quick, log, ops, previous, Path(tmp))


def _run(models: list[str], quick: bool, log, ops: tuple[str, ...], previous: dict | None, workdir: Path) -> dict:
    out: dict = {"quick": quick, "models": dict((previous or {}).get("models", {})), "loadavg_start": loadavg_now()}
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    for name in models:
        rows: dict = dict(out["models"].get(name, {})) if previous else {}
        for op in ("epoch", "train", "fit"):
            if op in ops:
                rows[op] = call(workdir, name, op, quick, log)
                rows[op]["measured_at"] = stamp
        if "fit" in ops and rows["fit"].get("refused"):
            rows["fit_defaults_refused"] = rows["fit"]
            rows["fit"] = call(workdir, name, "fit", quick, log, modules=FALLBACK_MODULES)
        tracked = list(rows["fit"]["tracked"]) if "fit" in rows else tracked_names(name, quick)
        (workdir / f"tracked-{name}.json").write_text(json.dumps(tracked))
        for op in ("topk_full", "topk_r32", "self", "kron_fit", "kron_score"):
            if op not in ops:
                continue
            if op in ("topk_full", "topk_r32", "self") and "fit" not in ops:
                raise SystemExit(f"{op} scores the factors this run fits: add 'fit' to --ops")
            try:
                rows[op] = call(workdir, name, op, quick, log)
            except Exception as err:  # a peer that cannot run this model is a result too
                rows[op] = {"error": str(err)[-2000:]}
                log(f"  {name} {op} failed: {str(err)[-300:]}")
            rows[op]["measured_at"] = stamp
        for op in ("epoch_large", "fit_large"):
            if op in ops and name in LARGE_MODELS:
                rows[op] = call(workdir, name, op, quick, log)
                rows[op]["measured_at"] = stamp
        if "fit" in rows:
            rows["plan"] = rows["fit"]["plan"]
        out["models"][name] = rows
    out["loadavg_end"] = loadavg_now()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd")
    w = sub.add_parser("worker")
    w.add_argument("--workdir", required=True)
    w.add_argument("--model", required=True)
    w.add_argument("--op", required=True)
    w.add_argument("--quick", action="store_true")
    w.add_argument("--modules", default=None, help="JSON list of module patterns (default: the defaults)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", default="both", choices=["gpt2", "llama32k", "both"])
    parser.add_argument("--ops", default=",".join(ALL_OPS),
                        help="comma-separated subset of " + ",".join(ALL_OPS) + "; the other rows are kept from the "
                             "saved results (each row says when it was measured)")
    parser.add_argument("--out", default=None, help="results file name under benchmarks/results (default "
                        "real_size.json); a partial run starts from its rows")
    args = parser.parse_args()
    if args.cmd == "worker":
        print(json.dumps(worker(args)))
        return
    t0 = time.perf_counter()
    models = ["gpt2", "llama32k"] if args.model == "both" else [args.model]
    ops = tuple(o for o in args.ops.split(",") if o)
    unknown = [o for o in ops if o not in ALL_OPS]
    if unknown:
        parser.error(f"unknown --ops {unknown}; choose from {ALL_OPS}")
    name = args.out or ("real_size-quick.json" if args.quick else "real_size.json")
    previous = None
    if set(ops) != set(ALL_OPS) or args.model != "both":  # a partial run updates the saved results
        from .common import RESULTS

        path = RESULTS / name
        previous = json.loads(path.read_text()) if path.exists() else None
    result = run(models, args.quick, ops=ops, previous=previous)
    result["seconds"] = time.perf_counter() - t0
    print(json.dumps({"saved": str(save_json(name, result))}))


if __name__ == "__main__":
    main()
