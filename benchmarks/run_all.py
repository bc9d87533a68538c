"""Run every benchmark and write ``docs/benchmarks.md`` and its plots (``docs/bench-*.png``).

    .bench-venv/bin/python -m benchmarks.run_all [--quick]      # what `make bench` runs
    .bench-venv/bin/python -m benchmarks.run_all --report-only  # rewrite the page from benchmarks/results/*.json

Raw results are kept in ``benchmarks/results/`` (agreement.json, lds.json, speed.json, machine.json).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import time
from pathlib import Path

from .common import ROOT, DOCS, RESULTS, THREADS, library_fingerprint, machine_info, save_json

MiB = 2**20


# ----------------------------------------------------------------------------- helpers
def _fmt_s(x: float) -> str:
    return f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def _find(runs, **kw):
    """The run matching ``kw``; repeated runs are merged: the fastest CPU time (outside load only adds
    time) with that run's other numbers, and ``repeats`` = how many there were."""
    hits = [r for r in runs if all(r.get(k) == v for k, v in kw.items())]
    if not hits:
        return None
    best = dict(min(hits, key=lambda r: r["cpu_seconds"]))
    best["repeats"] = len(hits)
    best["cpu_all"] = [h["cpu_seconds"] for h in hits]
    return best


def _pairs(speed: dict) -> list[tuple[str, dict, dict]]:
    """(label, ours, kron) for the main table."""
    cfg = speed["config"]
    runs = [r for r in speed["runs"] if r.get("batch", 32) == speed["model"]["batch_size"]]
    rows = []
    n = cfg["n_train"]
    rows.append((f"fit EK-FAC factors, {n} sequences", _find(runs, op="fit", side="ours", n=n),
                 _find(runs, op="fit", side="kron", n=n)))
    rows.append((f"fit EK-FAC factors, {n} sequences, ours with float32 statistics",
                 _find(runs, op="fit32", side="ours", n=n), _find(runs, op="fit", side="kron", n=n)))
    for q in (32, max(cfg["queries"])):
        if q in cfg["queries"]:
            rows.append((f"pairwise scores, full rank, {q} queries x {cfg['score_n']} sequences",
                         _find(runs, op="score", side="ours", n=cfg["score_n"], q=q, rank=0),
                         _find(runs, op="score", side="kron", n=cfg["score_n"], q=q, rank=0)))
    for q in cfg["rank_queries"]:
        rows.append((f"pairwise scores, rank 32, {q} queries x {cfg['rank_n']} sequences",
                     _find(runs, op="score", side="ours", n=cfg["rank_n"], q=q, rank=32),
                     _find(runs, op="score", side="kron", n=cfg["rank_n"], q=q, rank=32)))
    return [r for r in rows if r[1] and r[2]]


# ----------------------------------------------------------------------------- plots
def plots(speed: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = speed["config"]
    runs = [r for r in speed["runs"] if r.get("batch", 32) == speed["model"]["batch_size"]]
    made = []

    fig, ax = plt.subplots(figsize=(6, 4))
    ns = list(cfg["fit_ns"])
    for side, label, style in (("ours", "lightning-influence", "o-"), ("kron", "Kronfluence 1.0.1", "s-"),
                               ("plain", "one forward+backward epoch", "^--")):
        op = "epoch" if side == "plain" else "fit"
        pts = [(n, _find(runs, op=op, side=side, n=n)) for n in ns]
        pts = [(n, r["cpu_seconds"]) for n, r in pts if r]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label)
    ax.set_xlabel("training sequences (64 tokens)")
    ax.set_ylabel("CPU seconds")
    ax.set_title("EK-FAC factor fitting (covariance + eigh + Lambda)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(DOCS / "bench-fit-scaling.png", dpi=110)
    plt.close(fig)
    made.append("bench-fit-scaling.png")

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, rank, n, qs in ((axes[0], 0, cfg["score_n"], cfg["queries"]),
                            (axes[1], 32, cfg["rank_n"], cfg["rank_queries"])):
        for side, label, style in (("ours", "lightning-influence", "o-"), ("kron", "Kronfluence 1.0.1", "s-")):
            pts = [(q, _find(runs, op="score", side=side, n=n, q=q, rank=rank)) for q in qs]
            pts = [(q, r["cpu_seconds"]) for q, r in pts if r]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("queries")
        ax.set_ylabel("CPU seconds")
        ax.set_title(f"pairwise scores, {'full rank' if not rank else 'rank 32'}, {n} training sequences")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(DOCS / "bench-score-scaling.png", dpi=110)
    plt.close(fig)
    made.append("bench-score-scaling.png")

    pairs = _pairs(speed)
    fig, ax = plt.subplots(figsize=(8, 4))
    xs = range(len(pairs))
    ax.bar([x - 0.2 for x in xs], [o["increment_rss"] / MiB for _, o, _ in pairs], 0.4, label="lightning-influence")
    ax.bar([x + 0.2 for x in xs], [k["increment_rss"] / MiB for _, _, k in pairs], 0.4, label="Kronfluence 1.0.1")
    ax.set_xticks(list(xs))
    ax.set_xticklabels([_short(lbl) for lbl, _, _ in pairs], fontsize=8)
    ax.set_ylabel("peak RSS above baseline (MiB)")
    ax.set_title("memory of the operation (each in its own process)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(DOCS / "bench-memory.png", dpi=110)
    plt.close(fig)
    made.append("bench-memory.png")
    return made


def _short(label: str) -> str:
    return (label.replace("pairwise scores, ", "").replace("fit EK-FAC factors, ", "fit\n")
            .replace(" queries x ", "q\nx").replace(" sequences", ""))


# ----------------------------------------------------------------------------- the page
def report(agreement: dict | None, speed: dict | None, machine: dict, wall: float | None,
           lds: dict | None = None, real_size: dict | None = None) -> str:
    L: list[str] = []
    w = L.append
    mode = "quick" if (speed or agreement or {}).get("quick") else "full"
    w("# Benchmarks: lightning-influence against Kronfluence")
    w("")
    w(f"Generated by `benchmarks/run_all.py` ({mode} mode) on {machine['date']}; do not edit by hand: "
      "rerun it. Raw numbers: `benchmarks/results/*.json`.")
    w("")
    w("## How to rerun")
    w("")
    w("```bash")
    w("make bench                        # makes .bench-venv (this project + kronfluence==1.0.1 + matplotlib),")
    w("                                  # then runs everything below and rewrites this page and docs/bench-*.png")
    w("make bench BENCH_ARGS=--quick     # smaller sizes (a few minutes)")
    w("# with .bench-venv in place:")
    w(".bench-venv/bin/python -m benchmarks.run_all [--quick]")
    w(".bench-venv/bin/python -m benchmarks.agreement [--quick]   # writes benchmarks/results/agreement.json")
    w(".bench-venv/bin/python -m benchmarks.lds [--quick]         # writes benchmarks/results/lds.json")
    w(".bench-venv/bin/python -m benchmarks.index_lds [--quick]   # the index's LDS: results/index_lds.json")
    w(".bench-venv/bin/python -m benchmarks.speed [--quick]       # writes benchmarks/results/speed.json")
    w(".bench-venv/bin/python -m benchmarks.index_bench [--few]   # the gradient index (section 8): results/index.json")
    w(".bench-venv/bin/python -m benchmarks.index_bench --bergson-only  # Bergson 2.5.1 beside it (needs .bergson-venv)")
    w(".bench-venv/bin/python -m benchmarks.real_size [--ops ...]  # GPT-2 small and the 32k Llama (section 10)")
    w(".bench-venv/bin/python -m benchmarks.eigh_dtype        # float32 against float64 eigh (section 11)")
    w(".bench-venv/bin/python -m benchmarks.run_all --report-only # this page from the saved JSON")
    w("BENCH_THREADS=2 make bench        # torch threads per process (default 1, see 'Machine')")
    w("bash benchmarks/gpu_check.sh      # on a GPU machine: GPU tests + the speed benchmark on CUDA (section 7)")
    w("```")
    w("")
    w("Kronfluence is installed only in `.bench-venv` (never a dependency of the library), with "
      "`pip install torch==2.13.0 kronfluence==1.0.1 ...` on one command line and `pip uninstall -y torchvision` "
      "afterwards (Kronfluence declares torchvision but never imports it; see `benchmarks/setup_env.sh`). "
      "Bergson 2.5.1, for the index comparison, has an environment of its own, `.bergson-venv` "
      "(`benchmarks/setup_bergson.sh`: `pip install bergson==2.5.1 torch==2.13.0`, then "
      "`pip uninstall -y torchvision torchaudio`; it imports neither).")
    w("")
    w("## Machine")
    w("")
    w("| | |")
    w("|---|---|")
    mem = machine.get("memory_bytes")
    for k, v in (("CPU", machine["cpu"]), ("cores", machine["cores"]),
                 ("torch threads per process", machine.get("bench_threads", THREADS)),
                 ("memory", f"{mem / 2**30:.1f} GiB" if mem else "unknown"), ("Python", machine["python"]),
                 ("torch", machine["torch"]), ("kronfluence", machine["kronfluence"]),
                 ("transformers", machine["transformers"]), ("numpy", machine["numpy"]),
                 ("platform", machine["platform"]),
                 ("lightning-influence commit", f"{machine.get('git_commit')}"
                  + (" (+ uncommitted library changes)" if machine.get("library_uncommitted_changes") else "")
                  + f", library source hash {machine.get('library_fingerprint')}"),
                 ("load average (1/5/15 min) at start", " / ".join(map(str, machine.get("loadavg_start", [])))),
                 ("load average at end", " / ".join(map(str, machine.get("loadavg_end", [])))),
                 ("total run time", f"{wall / 60:.1f} min" if wall else "n/a")):
        w(f"| {k} | {v} |")
    w("")
    if machine.get("library_fingerprint_end") and machine["library_fingerprint_end"] != machine.get(
            "library_fingerprint"):
        w("**Warning: the library's source changed during this run** (hash "
          f"{machine['library_fingerprint']} at the start, {machine['library_fingerprint_end']} at the end): "
          "the numbers mix two versions. Rerun.")
        w("")
    w("The machine is a shared 2-core VM: other jobs ran during the measurements (see the load average). "
      "Every process therefore uses **one torch thread** (`BENCH_THREADS`): with 2 OpenMP threads on a loaded "
      "machine, spin-waiting made a forward+backward ~10x slower in CPU time. With one thread the **CPU time** "
      "(user+sys of the process) measures the work done whatever else runs; wall times are given too but "
      "depend on the load. Ratios are computed on CPU time.")
    w("")
    if agreement:
        _agreement_section(w, agreement)
    if lds:
        _lds_section(w, lds)
    if speed:
        _speed_section(w, speed)
    _gpu_section(w, _load("speed-cuda.json"))
    if (RESULTS / "index-section.md").exists():  # written by benchmarks/index_bench.py
        w((RESULTS / "index-section.md").read_text().rstrip())
        w("")
    if (RESULTS / "index-lds-section.md").exists():  # written by benchmarks/index_lds.py
        w((RESULTS / "index-lds-section.md").read_text().rstrip())
        w("")
    blocks = _load("blocks.json")  # written by benchmarks/blocks.py
    if blocks:
        from .blocks import section as blocks_section

        w(blocks_section(blocks).rstrip())
        w("")
    if real_size:
        _real_size_section(w, real_size)
    if (RESULTS / "eigh_dtype.md").exists():  # written by benchmarks/eigh_dtype.py
        w((RESULTS / "eigh_dtype.md").read_text().rstrip())
        w("")
    return "\n".join(L) + "\n"


REAL_SIZE_TARGETS = {"fit_epochs": 2.5, "peak_vs_training": 2.0, "kron_time": 1.0, "kron_memory": 0.8, "plan": 0.25}


def _first_row(rs: dict, key: str, default):
    """A setting every operation of the real-size run shares (sequences, tokens), read from its first row."""
    for rows in rs.get("models", {}).values():
        if key in rows.get("epoch", {}):
            return rows["epoch"][key]
    return default


def _real_size_section(w, rs: dict) -> None:
    """Section 10: GPT-2 small and the 32k Llama with the defaults (``benchmarks/real_size.py``)."""
    t = REAL_SIZE_TARGETS
    w("## 10. Real sizes: GPT-2 small and a 32k-vocabulary Llama with the defaults")
    w("")
    w("`benchmarks/real_size.py`" + (" (quick mode: small models, not the real sizes)" if rs.get("quick") else "")
      + ": models built from transformers configs (random weights: time and memory do not depend on training), "
      f"{_first_row(rs, 'n', 64)} sequences of {_first_row(rs, 'seq_len', 128)} tokens in batches of 8, `fit_factors(model, CausalLMTask(), loader)` with no options "
      "(EK-FAC, sampled Fisher, float64 statistics), then top-k of 16 queries (k=10) at full rank and at rank 32 "
      "and self-influence through `InfluenceModule`; Kronfluence 1.0.1 on the same model (GPT-2's Conv1D "
      "converted to Linear) and the same layers. Each operation in its own process, one torch thread "
      f"(load average {' / '.join(map(str, rs.get('loadavg_start', [])))} at the start, "
      f"{' / '.join(map(str, rs.get('loadavg_end', [])))} at the end: the VM is shared). "
      "'Plain epochs' is CPU time over the CPU time of one forward+backward epoch over the same data; "
      "'+RSS' is the peak resident memory above the process's memory before the operation (model and data loaded; "
      "the scoring rows load the factors inside the measured block, as Kronfluence's scoring loads its own: ours "
      "read again in float32, the scoring dtype, so the float64 file is never held beside them).")
    w("")
    w("The memory plan (`lightning_influence.memory`, logged by `fit_factors` and the callback before the first "
      "pass) counts what the influence passes add: each pass's sums (one copy, in float64), the eigenbases (written "
      "over the covariance sums they replace), the bases read again in the capture dtype, one layer's float64 "
      "eigendecomposition, one batch's captured and rotated tokens and per-example gradients (formed 64 MiB at a "
      "time), and the model's own activations, measured on the first batch as the bytes autograd saves for the "
      "backward. A fit that saves its phases (`output_dir`, the callback) holds the earlier factors on disk, not in "
      "memory, while the Lambda pass runs (the phase `lambda end` reads them back). What it cannot count is the "
      "allocator's: memory freed by one batch's temporaries but kept by the C allocator for the next, and the "
      "temporaries of the model's own backward.")
    w("")
    w("Rows are stamped with when they were measured (`measured_at` in the JSON): a partial rerun "
      "(`real_size --ops ...`) keeps the other rows. 'Fit, 512 sequences' is the same fit on eight times the "
      "data: the eigendecompositions cost the same whatever the data (their CPU seconds are given apart), so "
      "their share shrinks as the data grows, as it does in a real fit over thousands of sequences.")
    w("")
    if rs.get("partial"):
        w("**Partial run**: the operations marked 'failed: not finished' did not end before the session's deadline; "
          "rows read from the run's log (its JSON is written at its end) have their memory rounded to MiB.")
        w("")
    w("Where the fit's time goes. The eigendecompositions are a fixed cost, whatever the data (GPT-2: 24 sides of "
      "3072 and 12 of 2304, in float64; `eigh_dtype=\"float32\"` takes about a third of their time but moves "
      "EK-FAC's scores by several percent, section 11). Each pass costs the model's forward and backward without "
      "weight gradients (about 0.7 epoch) plus its statistics, whose arithmetic is about the model's own for "
      "these layers: in the first pass the covariances (d^2 multiply-adds per token and side, the upper triangle "
      "only for sides of 1536 and more), in the second the rotation of every token into the eigenbasis (the same "
      "count again) and the per-example products. So the passes cost 3 to 4.6 plain epochs at any data size, and "
      "the 2.5-epoch target is out of reach on a CPU for EK-FAC as both libraries compute it (Kronfluence's fit "
      "of the same GPT-2 is the row below).")
    w("")
    w("The Llama runs ours under bf16 autocast (forward; the backward follows its casts), as "
      "`precision='bf16-mixed'` does; Kronfluence's Llama rows are float32 (its own autocast option was not set), "
      "so the Llama's Kronfluence ratios compare bf16-mixed against float32.")
    w("")
    for name, rows in rs.get("models", {}).items():
        fit = rows.get("fit", {})
        label = {"gpt2": "GPT-2 small (124M parameters, 50257-token head tied to the embedding)",
                 "llama32k": "Llama, hidden 512, 4 layers, vocabulary 32000 (untied head), bf16 autocast"}.get(name, name)
        w(f"### {label}")
        w("")
        refused = rows.get("fit_defaults_refused", {}).get("refused")
        if refused:
            w(f"With the defaults the fit is **refused before its first pass** by the memory plan: \"{refused}\" "
              f"The rows below track `modules={fit.get('modules')}` (the named selections, everything but the head).")
            w("")
        plan = fit.get("plan", {})
        first = plan.get("table", "").splitlines()[:1]
        if first:
            w(f"Tracked: {first[0].removeprefix('influence memory plan: ')}.")
            w("")
        w("```")
        w(plan.get("table", "(no plan recorded)"))
        w("```")
        w("")
        epoch = rows.get("epoch", {}).get("cpu_seconds")
        w("| operation | wall s | CPU s | plain epochs | peak RSS MiB | +RSS MiB |")
        w("|---|---|---|---|---|---|")
        names = {"epoch": "plain forward+backward epoch", "train": "training epoch (AdamW): training alone",
                 "fit": "fit EK-FAC factors", "topk_full": "top-k, 16 queries, full rank",
                 "topk_r32": "top-k, 16 queries, rank 32", "self": "self-influence of the 64 sequences",
                 "kron_fit": "Kronfluence: fit EK-FAC factors", "kron_score": "Kronfluence: pairwise, 16 queries",
                 "epoch_large": "plain forward+backward epoch, 512 sequences",
                 "fit_large": "fit EK-FAC factors, 512 sequences"}
        for op, title in names.items():
            r = rows.get(op, {})
            if "error" in r:
                w(f"| {title} | failed: {r['error'].splitlines()[-1][:120] if r['error'] else ''} | | | | |")
                continue
            if "seconds" not in r:
                continue
            yardstick = rows.get("epoch_large", {}).get("cpu_seconds") if op.endswith("_large") else epoch
            ep = f"{r['cpu_seconds'] / yardstick:.2f}" if yardstick else ""
            w(f"| {title} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} | {ep} | {r['peak_rss'] / 2**20:.0f} "
              f"| {r['increment_rss'] / 2**20:.0f} |")
        w("")
        for op, n in (("fit", _first_row(rs, "n", 64)), ("fit_large", 512)):
            r = rows.get(op, {})
            yardstick = rows.get("epoch_large" if op == "fit_large" else "epoch", {}).get("cpu_seconds")
            if r.get("finish_cpu_seconds") and yardstick:
                finish = sum(r["finish_cpu_seconds"])
                w(f"Fit on {n} sequences: {r['cpu_seconds']:.1f} CPU s = {r['cpu_seconds'] / yardstick:.2f} plain "
                  f"epochs, of which the eigendecompositions (the covariance pass's finish, independent of the data) "
                  f"{finish:.1f} s = {finish / yardstick:.2f} epochs and the two passes "
                  f"{(r['cpu_seconds'] - finish) / yardstick:.2f} epochs.")
                w("")
        checks = []
        if epoch and "cpu_seconds" in fit:
            v = fit["cpu_seconds"] / epoch
            checks.append((f"fit at most {t['fit_epochs']} plain epochs", f"{v:.2f}", v <= t["fit_epochs"]))
        large, large_epoch = rows.get("fit_large", {}), rows.get("epoch_large", {}).get("cpu_seconds")
        if large_epoch and "cpu_seconds" in large:
            v = large["cpu_seconds"] / large_epoch
            checks.append((f"fit at most {t['fit_epochs']} plain epochs, 512 sequences", f"{v:.2f}",
                           v <= t["fit_epochs"]))
        train = rows.get("train", {})
        if "peak_rss" in fit and "peak_rss" in train:
            v = fit["peak_rss"] / train["peak_rss"]
            checks.append((f"fit's peak RSS at most {t['peak_vs_training']:.0f}x training alone's", f"{v:.2f}x",
                           v <= t["peak_vs_training"]))
        for ours, theirs, what in (("fit", "kron_fit", "fit"), ("topk_full", "kron_score", "scoring 16 queries")):
            a, b = rows.get(ours, {}), rows.get(theirs, {})
            if "cpu_seconds" in a and "cpu_seconds" in b and b["cpu_seconds"] > 0:
                v = a["cpu_seconds"] / b["cpu_seconds"]
                checks.append((f"{what}: time ours/Kronfluence at most {t['kron_time']}", f"{v:.2f}", v <= t["kron_time"]))
                if b.get("increment_rss", 0) > 0:
                    v = a["increment_rss"] / b["increment_rss"]
                    checks.append((f"{what}: +RSS ours/Kronfluence at most {t['kron_memory']}", f"{v:.2f}",
                                   v <= t["kron_memory"]))
        if plan.get("peak_bytes") and fit.get("increment_rss"):
            v = plan["peak_bytes"] / fit["increment_rss"]
            checks.append((f"the plan's peak within {t['plan']:.0%} of the fit's measured +RSS", f"{v:.2f}x",
                           abs(v - 1) <= t["plan"]))
        w("| target | measured | met |")
        w("|---|---|---|")
        for what, value, ok in checks:
            w(f"| {what} | {value} | {'yes' if ok else '**no**'} |")
        w("")


def _agreement_section(w, ag: dict) -> None:
    w("## 1. Agreement with Kronfluence")
    w("")
    w("The same trained model is handed to both libraries with the same settings, and the Pearson correlation "
      "of the two `[queries x training examples]` score matrices is reported (target: >= 0.99).")
    w("")
    w("* **Fisher**: empirical (the dataset's labels) on both sides: ours `fit_factors(fisher=\"empirical\")`, "
      "Kronfluence `FactorArguments(use_empirical_fisher=True)`.")
    w("* **Damping**: 0.1 x mean eigenvalue, per layer, on both sides: ours `damping=None, damping_factor=0.1`, "
      "Kronfluence `ScoreArguments(damping_factor=None)` (its heuristic is 0.1 x mean of the Lambda matrix; for "
      "K-FAC of `outer(eigvals_S, eigvals_A)`). The column *damping diff* is the largest relative difference of "
      "the per-layer damping actually used.")
    w("* **Tracked modules**: every `nn.Linear` of the model (the same explicit list on both sides: "
      "`modules=` / `Task.get_influence_tracked_modules`), including the LM head; embeddings are not tracked "
      "by either library.")
    w("* **Losses**: written once in `benchmarks/common.py` and given to both libraries, summed over examples "
      "and tokens (`reduction=\"sum\"`); labels are the dataset's on both sides (Kronfluence's "
      "`compute_train_loss(sample=False)` uses them both in the Lambda pass with `use_empirical_fisher=True` "
      "and in scoring). Padding is masked on both sides (`Task.get_attention_mask` / `CausalLMTask.token_mask`).")
    w("* **Measurement**: the log-likelihood of the query's labels on both sides.")
    w("* **Precision**: one dtype throughout per run: float64 (model, covariances, Lambda, scores), and a second "
      "run in float32 (both libraries eigendecompose in float64).")
    w("* **Sign**: Kronfluence's pairwise score is `grad f(query)^T (G + lambda I)^-1 grad L(train)`: the "
      "measurement's gradient against the *training loss's* gradient. Ours is "
      "`grad f^T (G + lambda I)^-1 grad(-L)` (positive = the training example made the measurement larger). "
      "With the same measurement f, **ours = -Kronfluence's**; the statistics below compare ours with "
      "`-kronfluence` (the unflipped Pearson, column *raw*, is about -1). Equivalently, Kronfluence with "
      "`compute_measurement` returning the query *loss* gives exactly our scores.")
    w("")
    for name, s in ag["setup"].items():
        extra = (f"final training token loss {s['final_train_token_loss']:.3f}" if "final_train_token_loss" in s
                 else f"training loss {s['final_train_loss']:.4f}, query accuracy {s['query_accuracy']:.3f}")
        n_tr = s.get("train_examples", s.get("train_sequences"))
        w(f"* **{name}**: {s['architecture']}; {n_tr} training examples, {s['queries']} queries"
          + (f"; {s['sequence_length']}" if "sequence_length" in s else "") + f"; {extra}; "
          f"{len(s['tracked_modules'])} tracked layers.")
    w("")
    w("| model | dtype | strategy | Pearson | Spearman | rel. L2 error | worst layer's Pearson | damping diff | raw |")
    w("|---|---|---|---|---|---|---|---|---|")
    for r in ag["rows"]:
        w(f"| {r['model']} | {r['dtype']} | {r['strategy']} | {r['pearson']:.6f} | {r['spearman']:.6f} | "
          f"{r['rel_error']:.1e} | {r['min_layer_pearson']:.6f} | "
          f"{r.get('damping_max_rel_diff', float('nan')):.0e} | {r['raw_pearson_unflipped']:.4f} |")
    worst = min(ag["rows"], key=lambda r: r["pearson"])
    w("")
    ok = worst["pearson"] >= 0.99
    w(f"Lowest Pearson: {worst['pearson']:.6f} ({worst['model']}, {worst['dtype']}, {worst['strategy']}): "
      f"target >= 0.99 {'**met**' if ok else '**missed**'} for every model, dtype and strategy." if ok else
      f"Lowest Pearson: {worst['pearson']:.6f} ({worst['model']}, {worst['dtype']}, {worst['strategy']}): "
      "target >= 0.99 **missed**.")
    w("In float64 the two libraries agree to rounding (relative error ~1e-15), which also checks the parts "
      "they could differ on: token masking (the LM's sequences are right-padded, queries have an unmeasured "
      "prompt), the bias column (the MLP has biases), the normalisation of Lambda (both divide by the number of "
      "sequences, the covariances by the number of unmasked tokens), and the damping heuristic. In float32 the "
      "remaining differences are summation order.")
    w("")


def _lds_section(w, lds: dict) -> None:
    st, rows = lds["settings"], lds["rows"]
    rc, sc = st["recipe"], st["scoring"]
    seeds = st["init_seeds"]

    def find(library, strategy, fisher="empirical", damping="0.1x"):
        return next((r for r in rows if (r["library"], r["strategy"], r["fisher"], r["damping"])
                     == (library, strategy, fisher, damping)), None)

    w("## 2. Attribution quality (LDS)")
    w("")
    if lds.get("quick"):
        w("*Quick mode: fewer subsets and queries than the full run (50 subsets, 100 queries).*")
        w("")
    w("Do the scores predict what retraining does? The linear datamodeling score (LDS; Park et al., 2023, TRAK), "
      "computed with the library's harness `lightning_influence.evaluation`: "
      f"{st['subsets']} random subsets each holding {st['fraction']:.0%} of the {st['train_examples']} training "
      "digits (`lds_subsets`, seed 0); a fresh model retrained on each subset with Lightning and the same recipe "
      "(`retrain_measurements`); the LDS of a query is the Spearman correlation (torchmetrics), across the "
      "subsets, between the sum of the subset's scores and the measured value (`linear_datamodeling_score`). "
      f"Reported: its mean over {st['queries']} held-out query digits, a normal 95% interval of that mean, "
      "and the standard deviation over queries. 1 = the scores rank the retrained models perfectly, 0 = chance.")
    w("")
    w(f"* **Model and recipe**, the same for the scored full-data model and every retraining: {st['model']}; "
      f"loss = {rc['loss']}, weight_decay = {rc['weight_decay']:g}; {rc['optimizer']}, lr {rc['lr']:g}, "
      f"{rc['epochs']} epochs, {rc['batch']}, initialisation seed fixed. Training is then a deterministic "
      "function of the subset: the recipe run through `retrain_measurements` on an all-True subset reproduces "
      f"the scored model's measurements (max difference {lds['determinism_max_abs_diff']:.0e}). Full-data "
      f"model: objective {lds['full_model']['objective']:.4f} (gradient norm "
      f"{lds['full_model']['objective_grad_norm']:.0e}), training accuracy {lds['full_model']['train_accuracy']:.3f}, "
      f"query accuracy {lds['full_model']['query_accuracy']:.2f}.")
    w(f"* **Measurement**: {st['measurement']}. Each subset is retrained with {len(seeds)} initialisation seeds "
      f"({', '.join(map(str, seeds))}) and the two measurements are averaged; the scores come from one model, "
      f"the full-data one with seed {seeds[0]}.")
    w(f"* **Scores**: that one model handed to both libraries with the settings of section 1: {sc['fisher']} "
      f"Fisher, damping {sc['damping']} (the library's default damping), {sc['modules']}, {sc['dtype']}. "
      "Kronfluence's scores are **negated** before the LDS (with the same measurement, ours = -Kronfluence's, "
      "section 1), so that on both sides a positive score predicts a larger log-likelihood.")
    w("")
    w("| strategy | ours: LDS | 95% CI | std over queries | Kronfluence (negated): LDS | 95% CI | std over queries "
      "| Pearson of the scores, ours vs Kronfluence | largest per-query LDS difference |")
    w("|---|---|---|---|---|---|---|---|---|")

    def cells(v):
        return f"{v['mean']:.3f} | [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}] | {v['std']:.2f}"

    for strategy in ("identity", "kfac", "ekfac"):
        o, k = find("ours", strategy), find("kronfluence", strategy)
        if o and k:
            w(f"| {strategy} | **{o['lds']['mean']:.3f}** | {cells(o['lds']).split(' | ', 1)[1]} | "
              f"**{k['lds']['mean']:.3f}** | {cells(k['lds']).split(' | ', 1)[1]} | "
              f"{o['pearson_vs_kronfluence']:.6f} | {o['lds_diff_vs_kronfluence_max_abs']:.0e} |")
    base = lds["baselines"]
    w(f"| random scores (baseline) | {cells(base['random_scores'])} | | | | | |")
    w("")
    extra = [r for r in rows if r["library"] == "ours" and (r["fisher"], r["damping"]) != ("empirical", "0.1x")]
    if extra:
        w("Ours with other settings, same model and measurements (the library's defaults are the sampled Fisher "
          "and 0.1 x mean eigenvalue):")
        w("")
        w("| strategy | Fisher | damping | LDS | 95% CI | std over queries |")
        w("|---|---|---|---|---|---|")
        for r in extra:
            d = r["damping"]
            damping = (f"{d[:-1]} x mean eigenvalue" if d.endswith("x")
                       else f"{d} absolute (= the weight decay)" if float(d) == rc["weight_decay"] else f"{d} absolute")
            w(f"| {r['strategy']} | {r['fisher']} | {damping} | {cells(r['lds'])} |")
        w("")
    if len(seeds) > 1:
        w("Why average two seeds (ours; the gain is paired over queries, mean and 95% interval):")
        w("")
        w("| strategy | " + " | ".join(f"LDS against seed {s} alone" for s in seeds)
          + " | against the mean of the seeds | gain over seed 0 alone |")
        w("|---|" + "---|" * (len(seeds) + 2))
        for strategy in ("identity", "kfac", "ekfac"):
            r = find("ours", strategy)
            g = r["seed_average_gain"]
            w(f"| {strategy} | " + " | ".join(f"{r['lds_single_seed'][str(s)]:.3f}" for s in seeds)
              + f" | {r['lds']['mean']:.3f} | {g['mean']:+.3f} ({g['ci95'][0]:+.3f} to {g['ci95'][1]:+.3f}) |")
        w("")
    _lds_reading(w, lds, find)
    t = lds["timings"]
    retrain_s = sum(v for k, v in t.items() if k.startswith("retrain_seed"))
    w(f"Time: {lds['seconds']:.0f} s wall for the whole benchmark, {retrain_s:.0f} s of it retraining "
      f"{st['subsets'] * len(seeds)} models ({t['retrain_seconds_per_model']:.2f} s each). Fitting and scoring, "
      "ours / Kronfluence: "
      + ", ".join(f"{s} {t[f'ours_{s}_seconds']:.1f} / {t[f'kron_{s}_seconds']:.1f} s" for s in ("identity", "kfac", "ekfac"))
      + " (wall time on the shared machine; see section 3 for the speed comparison).")
    w("")
    w("Attribution quality on a language model: recall@10 of fact tracing on the demo corpus (identity, K-FAC and "
      "EK-FAC against a TF-IDF baseline) is in [fact-tracing.md](fact-tracing.md).")
    w("")


def _lds_reading(w, lds: dict, find) -> None:
    """One paragraph on what the LDS tables say, with the numbers taken from them."""
    ident, kfac, ekfac = (find("ours", s) for s in ("identity", "kfac", "ekfac"))
    rand = lds["baselines"]["random_scores"]
    diff = max(find("ours", s)["lds_diff_vs_kronfluence_max_abs"] for s in ("identity", "kfac", "ekfac"))
    pear = min(find("ours", s)["pearson_vs_kronfluence"] for s in ("identity", "kfac", "ekfac"))
    d = lds["ekfac_minus_kfac"]
    text = (f"**Reading.** Random scores give {rand['mean']:.3f} and the plain gradient dot product (identity) "
            f"{ident['lds']['mean']:.2f}; preconditioning by the Fisher is what makes the scores predictive: "
            f"K-FAC {kfac['lds']['mean']:.2f}, EK-FAC {ekfac['lds']['mean']:.2f}. EK-FAC - K-FAC, paired over the "
            f"same queries: {d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"
            + (": on this model K-FAC's scores predict retraining slightly better than EK-FAC's (with the sampled "
               "Fisher too, table above). " if d["ci95"][1] < 0
               else ": EK-FAC's eigenvalue correction helps here. " if d["ci95"][0] > 0
               else ": no significant difference. ")
            + "Kronfluence's scores give "
            + ("exactly the same per-query LDS as ours" if diff == 0 else
               f"the same LDS as ours (largest per-query difference {diff:.0e})")
            + f" because the score matrices agree to rounding (lowest Pearson {pear:.6f}; Spearman only sees ranks): "
            "the LDS measures the method and its settings, not the implementation. ")
    if "seed_vs_seed_spearman" in lds["baselines"]:
        r = lds["baselines"]["seed_vs_seed_spearman"]["mean"]
        text += (f"Two initialisation seeds' measurements correlate at {r:.2f} over the subsets (Spearman, mean over "
                 "queries): most of the measured variation is decided by the subset, the rest by the initialisation, "
                 "which no attribution of one model predicts; averaging the seeds removes part of it (table above). ")
    wd = next((r for r in lds["rows"] if r["damping"] == f"{lds['settings']['recipe']['weight_decay']:g}"), None)
    if wd:
        heur = [v for layers in lds.get("heuristic_damping", {}).values() for v in layers.values()]
        text += (f"Damping with exactly the weight decay (the L2 term's own curvature, so that G + lambda I is "
                 f"this objective's Gauss-Newton Hessian) gives {wd['lds']['mean']:.2f}, lower than the heuristic, "
                 + (f"whose per-layer values ({min(heur):.0e} to {max(heur):.0e}) are much smaller on this "
                    "well-fitted model; " if heur else "")
                 + "the LDS scores the response "
                 "to removing half the data, far outside the infinitesimal regime the exact damping is right for, "
                 "which may be why. ")
    w(text.rstrip())
    w("")


def _speed_section(w, sp: dict) -> None:
    cfg, m = sp["config"], sp["model"]
    runs = [r for r in sp["runs"] if r.get("batch", 32) == m["batch_size"]]
    w("## 3. Speed and memory")
    w("")
    w(f"Model: `LlamaForCausalLM`, {m['layers']} layers, hidden {m['hidden']}, MLP {m['intermediate']}, "
      f"{m['heads']} heads, vocabulary {m['vocab']}: {m['parameters']:,} parameters, {m['tracked_parameters']:,} "
      f"of them in the {m['tracked_layers']} tracked `nn.Linear` layers; trained for one epoch (token loss "
      f"{m['train_token_loss']:.2f}). Data: synthetic Markov-chain sequences of {m['seq_len']} tokens (queries: "
      f"a 16-token prompt, the rest measured). Main size: {cfg['n_train']} training sequences"
      + (" (quick mode; the full run uses 2,048)" if sp.get("quick") else
         " (the brief asked for 'a few thousand'; 2,048 keeps `make bench` well under 30 minutes on this "
         "2-core machine)")
      + (f". Rank-32 scoring is measured on {cfg['rank_n']} sequences." if cfg["rank_n"] != cfg["score_n"] else "."))
    w("")
    w("Same settings on both sides: EK-FAC, empirical Fisher, float32 compute (eigendecompositions in float64; "
      "ours keeps the statistics' sums in float64 by default, Kronfluence in float32 here, so the row *ours with "
      "float32 statistics* (`stats_dtype=torch.float32`) is the like-for-like one for fitting), heuristic "
      f"damping, batch size {m['batch_size']} for fitting and for training gradients, every query in one query "
      "batch for Kronfluence (so that both libraries make one pass over the training data; Kronfluence makes one "
      "pass per query batch), and each library's own persistence (factors and scores written to disk) inside "
      "the timing. Rank 32 uses a randomized SVD on both sides: Kronfluence's default `torch.svd_lowrank(q=32)`, "
      "ours `low_rank_factorize`'s default (`torch.svd_lowrank` with 40 directions and one power iteration). Every number "
      "comes from a fresh process running one operation of one library; before measuring, each process runs one "
      "plain forward+backward (one-time allocations, ~100 MiB, belong to neither library) and resets the "
      "kernel's RSS high-water mark. *peak RSS* is the process's peak during the operation, *+RSS* that peak "
      "minus the RSS just before the operation (imports, model and data): the memory the operation itself "
      "needed.")
    w("")
    w("| operation | ours CPU s | Kronfluence CPU s | ours/theirs (CPU) | ours wall s | Kronfluence wall s | "
      "ours peak RSS MiB (+RSS) | Kronfluence peak RSS MiB (+RSS) | ours/theirs (+RSS) |")
    w("|---|---|---|---|---|---|---|---|---|")

    def cpu(r):
        if r.get("repeats", 1) > 1:
            return f"{_fmt_s(r['cpu_seconds'])} (best of {', '.join(_fmt_s(c) for c in r['cpu_all'])})"
        return _fmt_s(r["cpu_seconds"])

    for label, o, k in _pairs(sp):
        w(f"| {label} | {cpu(o)} | {cpu(k)} | "
          f"**{_ratio(o['cpu_seconds'], k['cpu_seconds'])}** | {_fmt_s(o['seconds'])} | {_fmt_s(k['seconds'])} | "
          f"{o['peak_rss'] / MiB:.0f} (+{o['increment_rss'] / MiB:.0f}) | "
          f"{k['peak_rss'] / MiB:.0f} (+{k['increment_rss'] / MiB:.0f}) | "
          f"{_ratio(o['increment_rss'], k['increment_rss'])} |")
    w("")
    if cfg.get("repeats", 1) > 1:
        w("CPU times on this shared VM still move by 10-30% between runs (other tenants compete for caches and "
          "memory bandwidth; e.g. scoring 32 queries came out slower than 64 in some runs). The measurements the "
          "targets are judged on were made twice, interleaved ours/Kronfluence, and the faster of the two is used; "
          "the other rows are single runs, so read ratios within about +-20% as a tie.")
        w("")
    _live_memory(w, sp)
    ep = _find(runs, op="epoch", n=cfg["n_train"])
    fit_o = _find(runs, op="fit", side="ours", n=cfg["n_train"])
    fit_k = _find(runs, op="fit", side="kron", n=cfg["n_train"])
    if ep:
        w(f"Yardstick: one plain forward+backward epoch over the same {cfg['n_train']} sequences (batch "
          f"{m['batch_size']}, no optimizer step) takes {_fmt_s(ep['cpu_seconds'])} CPU s "
          f"({_fmt_s(ep['seconds'])} s wall). Fitting takes **{fit_o['cpu_seconds'] / ep['cpu_seconds']:.1f} "
          f"epochs** with ours and {fit_k['cpu_seconds'] / ep['cpu_seconds']:.1f} with Kronfluence (two passes "
          "over the data, each a forward+backward plus the statistics).")
        sc = _find(runs, op="score", side="ours", n=cfg["score_n"], q=max(cfg["queries"]), rank=0)
        ep_s = _find(runs, op="epoch", n=cfg["score_n"])
        if sc and ep_s:
            w(f"Scoring {max(cfg['queries'])} queries against {cfg['score_n']} sequences takes "
              f"{sc['cpu_seconds'] / ep_s['cpu_seconds']:.1f} epochs with ours.")
        w("")
    for row in sp.get("score_agreement", []):
        w(f"Scores of the two libraries on this model ({row['q']} queries x {row['n']} sequences, "
          f"{'full rank' if not row['rank'] else 'rank 32'}): Pearson {row['pearson']:.6f}.")
    w("")
    w("![factor fitting vs training sequences](bench-fit-scaling.png)")
    w("")
    w("![pairwise scoring vs queries](bench-score-scaling.png)")
    w("")
    w("![memory](bench-memory.png)")
    w("")
    _memory_slope(w, sp)
    w("All runs:")
    w("")
    w("| operation | library | sequences | queries | rank | batch | CPU s | wall s | peak RSS MiB | +RSS MiB |")
    w("|---|---|---|---|---|---|---|---|---|---|")
    for r in sp["runs"]:
        w(f"| {r['op']} | {r['side']} | {r['n']} | {r['q'] or ''} | {r['rank'] or ('full' if r['op'] == 'score' else '')} | "
          f"{r.get('batch', 32)} | {_fmt_s(r['cpu_seconds'])} | {_fmt_s(r['seconds'])} | {r['peak_rss'] / MiB:.0f} | "
          f"{r['increment_rss'] / MiB:.0f} |")
    w("")
    _targets(w, sp)
    if "profile" in sp:
        _profile_section(w, sp["profile"], sp)
    _history(w, sp)


def _live_memory(w, sp: dict) -> None:
    """The memory rows again, measured with glibc's mmap threshold fixed (``benchmarks.speed.FIXED_MALLOC``)."""
    if not sp.get("runs_fixed_malloc"):
        return
    pairs = _pairs({**sp, "runs": sp["runs_fixed_malloc"]})
    w("**Live memory.** RSS also counts memory the C allocator keeps after tensors are freed: glibc raises its "
      "mmap threshold to the largest block freed so far (up to 32 MiB), after which freed tensors stay in the "
      "heap, and how much stays depends on the order of allocations, not on what is live. The same operations "
      "rerun with `MALLOC_MMAP_THRESHOLD_=65536` (freed blocks go back to the system at once; CPU times of these "
      "runs are not comparable, page faults dominate) measure the memory the libraries actually hold:")
    w("")
    w("| operation | ours +RSS MiB | Kronfluence +RSS MiB | ours/theirs |")
    w("|---|---|---|---|")
    for label, o, k in pairs:
        w(f"| {label} | {o['increment_rss'] / MiB:.0f} | {k['increment_rss'] / MiB:.0f} | "
          f"{_ratio(o['increment_rss'], k['increment_rss'])} |")
    w("")


def _memory_slope(w, sp: dict) -> None:
    batches = sp["config"].get("memory_batches")
    if not batches:
        return
    n = min(sp["config"]["fit_ns"])
    bs_all = sorted(set(batches) | {sp["model"]["batch_size"]})
    w(f"Working memory of factor fitting vs batch size ({n} sequences; +RSS MiB):")
    w("")
    w("| library | " + " | ".join(f"batch {b}" for b in bs_all) + " | MiB per extra sequence in a batch |")
    w("|---|" + "---|" * (len(bs_all) + 1))
    for side, name in (("ours", "lightning-influence"), ("kron", "Kronfluence")):
        pts = [(b, _find(sp["runs"], op="fit", side=side, n=n, batch=b)) for b in bs_all]
        pts = [(b, r["increment_rss"] / MiB) for b, r in pts if r]
        if len(pts) < 2:
            continue
        slope = (pts[-1][1] - pts[1][1]) / (pts[-1][0] - pts[1][0]) if len(pts) > 2 else float("nan")
        w(f"| {name} | " + " | ".join(f"{v:.0f}" for _, v in pts) + f" | {slope:.1f} |")
    w("")
    w("(The slope is taken between the two largest batches: at the smallest batch the warm-up pass, made at "
      "batch 32, already covers part of the working set.)")
    w("")


def _targets(w, sp: dict) -> None:
    cfg = sp["config"]
    runs = [r for r in sp["runs"] if r.get("batch", 32) == sp["model"]["batch_size"]]
    n, qmax = cfg["n_train"], max(cfg["queries"])
    fo, fk = _find(runs, op="fit", side="ours", n=n), _find(runs, op="fit", side="kron", n=n)
    so = _find(runs, op="score", side="ours", n=cfg["score_n"], q=qmax, rank=0)
    sk = _find(runs, op="score", side="kron", n=cfg["score_n"], q=qmax, rank=0)
    ro = _find(runs, op="score", side="ours", n=cfg["rank_n"], q=max(cfg["rank_queries"]), rank=32)
    rk = _find(runs, op="score", side="kron", n=cfg["rank_n"], q=max(cfg["rank_queries"]), rank=32)
    w("## 4. Targets")
    w("")
    w("| target | measured (CPU time, +RSS) | met? |")
    w("|---|---|---|")

    def verdict(ok):
        return "yes" if ok else "**no**"

    w(f"| factor fitting no slower than Kronfluence ({n} sequences) | ours/theirs "
      f"{_ratio(fo['cpu_seconds'], fk['cpu_seconds'])} | {verdict(fo['cpu_seconds'] <= fk['cpu_seconds'])} |")
    w(f"| pairwise scoring at {qmax} queries at most half Kronfluence's time (full rank) | ours/theirs "
      f"{_ratio(so['cpu_seconds'], sk['cpu_seconds'])} | {verdict(so['cpu_seconds'] <= 0.5 * sk['cpu_seconds'])} |")
    if ro and rk:
        w(f"| the same at rank 32 | ours/theirs {_ratio(ro['cpu_seconds'], rk['cpu_seconds'])} | "
          f"{verdict(ro['cpu_seconds'] <= 0.5 * rk['cpu_seconds'])} |")
    live = {label: (o, k) for label, o, k in _pairs({**sp, "runs": sp.get("runs_fixed_malloc", [])})}
    for label, o, k in _pairs(sp):
        lo = live.get(label)
        extra = (f"; live memory (fixed mmap threshold) {_ratio(lo[0]['increment_rss'], lo[1]['increment_rss'])}"
                 if lo else "")
        w(f"| peak memory no higher than Kronfluence: {label} | +RSS ours/theirs "
          f"{_ratio(o['increment_rss'], k['increment_rss'])}{extra} | "
          f"{verdict(o['increment_rss'] <= k['increment_rss'])} |")
    w("")


def _profile_section(w, prof: dict, sp: dict) -> None:
    p = prof["profile"]
    w("## 5. Where our time goes")
    w("")
    w(f"Our side profiled (`python -m benchmarks.speed profile`): fitting on {prof.get('n_fit', prof['n'])} "
      f"sequences, full-rank scoring of {prof['q']} queries against {prof['n']} sequences, rank-32 scoring of "
      f"{prof['q_rank']} queries against {prof.get('n_rank', prof['n'])} sequences. Tables: torch.profiler's "
      "operators by self CPU time, with the library frames that called them, and cProfile (CPU clock) by "
      "library function (cumulative).")
    w("")
    for job, title in (("fit", "factor fitting"), ("score_full", "pairwise scoring, full rank"),
                       ("score_rank32", "pairwise scoring, rank 32")):
        if job not in p:
            continue
        d = p[job]
        w(f"### {title} ({_fmt_s(d['cpu_seconds'])} CPU s under cProfile)")
        w("")
        w("| share of operator time | operator | calls | called from |")
        w("|---|---|---|---|")
        for op in d["top_ops"][:6]:
            where = " < ".join(f"`{f}`" for f in op["where"]) or "(model forward/backward)"
            w(f"| {100 * op['self_fraction']:.1f}% | `{op['op']}` | {op['calls']} | {where} |")
        w("")
        w("| library function | cumulative CPU s | share | calls |")
        w("|---|---|---|---|")
        for r in d["top_library_cumulative"][:6]:
            w(f"| `{r['function']}` | {_fmt_s(r['cumulative_seconds'])} | "
              f"{100 * r['cumulative_seconds'] / d['cpu_seconds']:.0f}% | {r['calls']} |")
        w("")
    _reading(w, p, sp)
    wi = p.get("what_if")
    if wi and "ours_randomized" in wi:
        w(f"The rank-32 factorisation of {wi['queries_rank']} preconditioned queries on this model's "
          f"{wi['layers']} layer shapes (CPU s, summed over layers): ours exact (`torch.linalg.svd`) "
          f"{wi['ours_exact']:.2f}, ours randomized (the default) {wi['ours_randomized']:.2f} (including the exact "
          f"residual it reports), Kronfluence's `torch.svd_lowrank(q=32)` {wi['kron_svd_lowrank']:.2f}.")
        w("")


def _gpu_section(w, sp: dict | None) -> None:
    """The speed benchmark run on a GPU (``benchmarks/gpu_check.sh``), if it has been."""
    w("## 7. On a GPU")
    w("")
    if not sp:
        w("Not measured yet: no session so far has had a GPU. `benchmarks/gpu_check.sh` is the prepared run (the "
          "GPU-marked tests, then this benchmark with `BENCH_DEVICE=cuda` on a larger Llama: hidden 512, 4 layers, "
          "vocabulary 2048, 4,096 sequences of 128 tokens); it writes `benchmarks/results/speed-cuda.json`, "
          "which this section then reports.")
        w("")
        return
    m = sp["model"]
    w(f"Device: {m.get('device_name', m.get('device'))}. Model: `LlamaForCausalLM`, {m['layers']} layers, hidden "
      f"{m['hidden']}, MLP {m['intermediate']}, vocabulary {m['vocab']} ({m['parameters']:,} parameters, "
      f"{m['tracked_parameters']:,} tracked); {sp['config']['n_train']} sequences of {m['seq_len']} tokens, batch "
      f"{m['batch_size']}; settings as in section 3. Times are wall-clock (synchronised), memory is the peak GPU "
      "memory allocated during the operation above what was allocated before it.")
    w("")
    w("| operation | ours s | Kronfluence s | ours/theirs (time) | ours GPU MiB | Kronfluence GPU MiB | "
      "ours/theirs (GPU memory) |")
    w("|---|---|---|---|---|---|---|")
    for label, o, k in _pairs(sp):
        w(f"| {label} | {_fmt_s(o['seconds'])} | {_fmt_s(k['seconds'])} | **{_ratio(o['seconds'], k['seconds'])}** | "
          f"{o.get('gpu_increment', 0) / MiB:.0f} | {k.get('gpu_increment', 0) / MiB:.0f} | "
          f"{_ratio(o.get('gpu_increment', 0), k.get('gpu_increment', 0))} |")
    w("")
    for row in sp.get("score_agreement", []):
        w(f"Scores of the two libraries ({row['q']} queries x {row['n']} sequences, "
          f"{'full rank' if not row['rank'] else 'rank 32'}): Pearson {row['pearson']:.6f}.")
    w("")


def _history(w, sp: dict) -> None:
    """The main table's ratios at earlier commits (benchmarks/results/history.json) and in this run."""
    hist = _load("history.json")
    if not hist or sp.get("quick"):
        return
    entries = list(hist["entries"])
    now = {label: {"cpu_ratio": o["cpu_seconds"] / k["cpu_seconds"], "rss_ratio": o["increment_rss"] / k["increment_rss"]}
           for label, o, k in _pairs(sp)}
    last = entries[-1]["rows"] if entries else {}
    if any(abs(last.get(lbl, {}).get("cpu_ratio", -1) - r["cpu_ratio"]) > 1e-9 for lbl, r in now.items()):
        entries.append({"commit": "this run", "what_changed": "", "rows": now})  # not yet in the history
    labels = list(now)
    w("## 6. Before and after")
    w("")
    w("The main table's ours/Kronfluence ratios (CPU time / +RSS) at the commits where the benchmark was rerun, "
      "from each commit's `benchmarks/results/speed.json` (`benchmarks/results/history.json`). Same machine, "
      "same settings; differences within about +-20% are noise of this shared VM (the first two rows' full-rank "
      "scoring ratios moved 0.84x -> 1.08x without a change to that path).")
    w("")
    w("| commit | " + " | ".join(_short(lbl).replace("\n", " ") for lbl in labels) + " |")
    w("|---|" + "---|" * len(labels))
    for e in entries:
        cells = []
        for lbl in labels:
            r = e["rows"].get(lbl)
            cells.append(f"{r['cpu_ratio']:.2f}x / {r['rss_ratio']:.2f}x" if r else "")
        w(f"| {e['commit']} | " + " | ".join(cells) + " |")
    w("")
    for e in entries:
        if e["what_changed"]:
            w(f"* `{e['commit']}`: {e['what_changed']}.")
    w("")


def _share(job: dict, suffix: str) -> float:
    for r in job.get("top_library_cumulative", []):
        if r["function"].endswith(suffix):
            return r["cumulative_seconds"] / job["cpu_seconds"]
    return float("nan")


def _op_share(job: dict, where: str) -> float:
    return sum(o["self_fraction"] for o in job.get("top_ops", []) if any(where in f for f in o["where"]))


def _reading(w, p: dict, sp: dict) -> None:
    """What the profile says about the targets, in numbers taken from it."""
    full, rank, fit = p.get("score_full"), p.get("score_rank32"), p.get("fit")
    cfg, runs = sp["config"], [r for r in sp["runs"] if r.get("batch", 32) == sp["model"]["batch_size"]]
    ep = _find(runs, op="epoch", n=cfg["score_n"])
    so = _find(runs, op="score", side="ours", n=cfg["score_n"], q=max(cfg["queries"]), rank=0)
    sk = _find(runs, op="score", side="kron", n=cfg["score_n"], q=max(cfg["queries"]), rank=0)
    w("### Reading the profile")
    w("")
    if full:
        w(f"* Full-rank scoring: {100 * _share(full, '(stream)'):.0f}% of our time is inside "
          "`InfluenceScorer.stream` (the model's forward and backward for every query and training batch, with "
          "each layer's scoring done inside the backward), of which the query x training-example contraction "
          f"(`_pair_dot`, one matmul per layer and batch: the arithmetic Kronfluence does too) is "
          f"{100 * _share(full, '(_pair_dot)'):.0f}% and preconditioning the queries "
          f"(`InfluenceFactors.precondition`) {100 * _share(full, '(precondition)'):.0f}%."
          + (f" One plain forward+backward epoch over the training data alone takes "
             f"{ep['cpu_seconds'] / sk['cpu_seconds']:.2f} of Kronfluence's scoring time at {max(cfg['queries'])} "
             "queries; scoring needs that pass, the query pass and the contraction "
             f"({max(cfg['queries'])} x {cfg['score_n']} dot products of gradient-sized vectors), so 'at most half of "
             "Kronfluence's time' cannot be reached by trimming overheads: both libraries do the same passes and "
             f"the same matmuls (ours/theirs here: {so['cpu_seconds'] / sk['cpu_seconds']:.2f})."
             if ep and so and sk else ""))
    if rank:
        w(f"* Rank-32 scoring: `low_rank_factorize` is {100 * _share(rank, '(low_rank_factorize)'):.0f}% of our "
          f"time and `score_layer` {100 * _share(rank, '(score_layer)'):.0f}%. With 64-token sequences and layers "
          "of width 128-512, forming each example's gradient and taking the dot product with the queries rebuilt "
          "as `U V^T` costs fewer flops than the token-wise low-rank contraction, so rank 32 saves memory, not "
          "time: rebuilding `U V^T` costs queries x rank x d_out x d_in per batch, as much again as the dot "
          "product itself at batch 32.")
    if fit:
        w(f"* Factor fitting: the statistics (the strategy's `gradient_update`: gradient covariances, eigenbasis "
          f"rotations and Lambda, in the backward; `activation_update`: activation covariances, in the forward) are "
          f"{100 * _statistics_share(fit):.0f}% of our time and "
          f"the task's forward {100 * _share(fit, '(train_loss)'):.0f}%. Each layer's statistics are taken as soon "
          "as its tensors exist and its captured tokens dropped right after (as Kronfluence does in its hooks), "
          "and parameters do not require grad during the passes, so autograd keeps no layer input for a weight "
          "gradient.")
        m = sp["model"]
        if all(k in m for k in ("hidden", "intermediate", "vocab", "layers")):
            h, i, v = m["hidden"], m["intermediate"], m["vocab"]
            per = lambda o, n: o * o + n * n + o * n  # noqa: E731  covariances of both sides + Lambda
            elements = m["layers"] * (4 * per(h, h) + 2 * per(i, h) + per(h, i)) + per(v, h)
            w(f"* Fitting memory: what remains above Kronfluence is a fixed amount, not a per-sequence one (the "
              "batch-size table: MiB per extra sequence), visible once the allocator's retention is taken out (the "
              "live-memory table). Our statistics are summed and kept in float64 (covariance sums, eigenvectors, "
              "Lambda), Kronfluence's in float32 in this configuration: for this model's layers that is "
              f"{elements / 1e6:.2f}M numbers, {elements * 4 / MiB:.0f} MiB more per copy, and the Lambda pass holds "
              "several (the running sums, and the covariance pass's sums, eigenvectors and eigenvalues): float64 "
              "is a deliberate choice (the covariances are ill-conditioned), not an oversight.")
    w("")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes everywhere")
    parser.add_argument("--report-only", action="store_true", help="rewrite the page from benchmarks/results/")
    parser.add_argument("--skip-agreement", action="store_true")
    parser.add_argument("--skip-lds", action="store_true")
    parser.add_argument("--skip-index-lds", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--real-size-only", action="store_true",
                        help="rewrite only section 10 of the page from benchmarks/results/real_size.json")
    parser.add_argument("--skip-index", action="store_true",
                        help="the gradient index beside exact scoring, Kronfluence and Bergson (section 8)")
    parser.add_argument("--skip-real-size", action="store_true",
                        help="GPT-2 small and a 32k Llama with the defaults (30+ minutes on 2 cores)")
    args = parser.parse_args()

    t0 = time.perf_counter()
    if args.real_size_only:
        print(json.dumps({"written": str(write_real_size_section(_load("real_size.json")))}))
        return
    if args.report_only:
        agreement, lds, speed = _load("agreement.json"), _load("lds.json"), _load("speed.json")
        real_size = _load("real_size.json")
        machine = _load("machine.json") or machine_info()
        wall = machine.get("total_seconds")
    else:
        machine = machine_info()
        machine["date"] = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
        machine["bench_threads"] = THREADS
        from .common import loadavg_now

        machine["loadavg_start"] = loadavg_now()
        agreement = _stage("agreement", args.skip_agreement, args.quick)
        lds = _stage("lds", args.skip_lds, args.quick)
        _stage("index_lds", args.skip_index_lds, args.quick)  # writes index-lds-section.md too
        _index_stage(args.skip_index, args.quick)  # writes index.json and index-section.md (Bergson rows included)
        speed = _stage("speed", args.skip_speed, args.quick)
        real_size = _real_size_stage(args.skip_real_size, args.quick)
        machine["loadavg_end"] = loadavg_now()
        machine["library_fingerprint_end"] = library_fingerprint()
        wall = time.perf_counter() - t0
        machine["total_seconds"] = wall
        save_json("machine.json", machine)
    machine.setdefault("date", "unknown")
    DOCS.mkdir(exist_ok=True)
    if speed:
        plots(speed)
    (DOCS / "benchmarks.md").write_text(report(agreement, speed, machine, wall, lds, real_size))
    print(json.dumps({"written": str(DOCS / "benchmarks.md"), "seconds": time.perf_counter() - t0}))


def _index_stage(skip: bool, quick: bool) -> None:
    """``benchmarks.index_bench`` in its own interpreter (its command line decides the sizes and the Bergson worker)."""
    if skip:
        return
    import subprocess

    print("== index_bench", flush=True)
    subprocess.run([sys.executable, "-m", "benchmarks.index_bench"] + (["--quick"] if quick else []), check=True,
                   cwd=str(ROOT))


def _stage(name: str, skip: bool, quick: bool) -> dict | None:
    """Run ``benchmarks.<name>`` and save ``<name>.json``; with ``skip``, the saved results instead."""
    if skip:
        return _load(f"{name}.json")
    import importlib

    print(f"== {name}", flush=True)
    t0 = time.perf_counter()
    result = importlib.import_module(f".{name}", __package__).run(quick, log=lambda s: print(s, flush=True))
    result["seconds"] = time.perf_counter() - t0
    save_json(f"{name}.json", result)
    return result


def write_real_size_section(real_size: dict | None) -> Path:
    """Replace (or add, at the end) section 10 of docs/benchmarks.md, leaving the other sections as they are."""
    if not real_size:
        raise SystemExit("no benchmarks/results/real_size.json: run python -m benchmarks.real_size first")
    page = DOCS / "benchmarks.md"
    text = page.read_text() if page.exists() else ""
    lines: list[str] = []
    _real_size_section(lines.append, real_size)
    section = "\n".join(lines) + "\n"
    head, marker, rest = text.partition("## 10. Real sizes")
    if marker:
        after = rest.find("\n## ")
        text = head + section + (rest[after + 1:] if after >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    page.write_text(text)
    return page


def _real_size_stage(skip: bool, quick: bool) -> dict | None:
    """``benchmarks.real_size`` (its own main: one process per operation); its saved JSON with ``skip``."""
    name = "real_size-quick.json" if quick else "real_size.json"
    if skip:
        return _load(name)
    print("== real_size", flush=True)
    from .real_size import run as run_real_size

    result = run_real_size(["gpt2", "llama32k"], quick, log=lambda s: print(s, flush=True))
    save_json(name, result)
    return result


def _statistics_share(fit) -> float:
    """The statistics' share of a fit profile: the strategy's updates (or, in profiles taken before the
    strategies were objects, the passes' ``_layer_update``/``_activation_update``)."""
    import math

    share = _share(fit, "(gradient_update)") + _share(fit, "(activation_update)")
    if math.isnan(share):
        share = _share(fit, "(_layer_update)") + _share(fit, "(_activation_update)")
    return share


def _load(name: str) -> dict | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


if __name__ == "__main__":
    main()
