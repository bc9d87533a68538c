"""Agreement with Kronfluence: the same trained model, the same settings, Pearson of the score matrices.

Settings on both sides: empirical Fisher (the dataset's labels), damping = 0.1 x mean
eigenvalue per layer (ours: ``damping=None, damping_factor=0.1``; Kronfluence:
``damping_factor=None``), the same tracked modules (every ``nn.Linear``), summed losses,
one dtype throughout (float64 by default, float32 as a second run).

Sign: with the same measurement f, Kronfluence's score is ``grad f^T H^-1 grad L`` and ours
is ``grad f^T H^-1 grad(-L)``, so ours = -Kronfluence's; the correlations are reported
against ``-kronfluence`` (the raw, unflipped Pearson is kept too, and is ~ -1).

    .bench-venv/bin/python -m benchmarks.agreement [--quick]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from lightning_influence import CausalLMTask, ClassificationTask, InfluenceScorer, fit_factors

from . import kron_side
from .common import (
    accuracy, cast_dataset, digits_datasets, digits_mlp, linear_module_names, loader, markov_sequences, pearson, rel_error,
    save_json, set_threads, spearman, tiny_llama, train_classifier, train_lm,
)

STRATEGIES = ("identity", "diagonal", "kfac", "ekfac")


def compare(name, model, our_task, kron_task, train_ds, query_ds, modules, dtype, batch_size, workdir, log,
            strategies=STRATEGIES):
    """Score matrices of both libraries for every strategy; returns rows of statistics."""
    model = model.to(dtype)
    train_ds, query_ds = cast_dataset(train_ds, dtype), cast_dataset(query_ds, dtype)
    analyzer = kron_side.make_analyzer(model, kron_task, workdir / f"kron-{name}-{str(dtype)[6:]}")
    rows = []
    for strategy in strategies:
        t0 = time.perf_counter()
        factors = fit_factors(model, our_task, loader(train_ds, batch_size), strategy=strategy, modules=modules,
                              fisher="empirical", damping=None, damping_factor=0.1, capture_dtype=dtype)
        scorer = InfluenceScorer(model, our_task, factors, score_dtype=dtype)
        ours_l = scorer.pairwise_scores(loader(query_ds, len(query_ds)), loader(train_ds, batch_size),
                                        per_layer=True).double()
        ours = ours_l.sum(0)
        t1 = time.perf_counter()
        kron_side.fit(analyzer, strategy, train_ds, strategy, batch_size, dtype)
        theirs_d = kron_side.pairwise(analyzer, strategy, f"{strategy}-scores", query_ds, train_ds, batch_size,
                                      dtype, per_module=True)
        t2 = time.perf_counter()
        theirs_l = torch.stack([theirs_d[m].double() for m in scorer.layer_names])
        theirs = -theirs_l.sum(0)  # sign: ours = -kronfluence
        layer_r = [pearson(ours_l[i], -theirs_l[i]) for i in range(len(scorer.layer_names))]
        worst = min(range(len(layer_r)), key=lambda i: layer_r[i])
        damping = {}
        if strategy != "identity":
            damping = damping_check(factors, analyzer, strategy, scorer.layer_names)
        row = {
            "model": name, "dtype": str(dtype).replace("torch.", ""), "strategy": strategy,
            "pearson": pearson(ours, theirs), "spearman": spearman(ours, theirs),
            "rel_error": rel_error(ours, theirs), "raw_pearson_unflipped": pearson(ours, -theirs),
            "min_layer_pearson": layer_r[worst], "min_layer": scorer.layer_names[worst],
            "num_layers": len(layer_r), "queries": ours.shape[0], "train": ours.shape[1],
            "ours_seconds": t1 - t0, "kron_seconds": t2 - t1, **damping,
        }
        log(f"  {name:8s} {row['dtype']:7s} {strategy:8s} pearson={row['pearson']:.6f} "
            f"spearman={row['spearman']:.6f} rel_err={row['rel_error']:.2e} "
            f"min_layer={row['min_layer_pearson']:.6f} ({row['min_layer']})"
            + (f" damping_rel_diff={row['damping_max_rel_diff']:.1e}" if damping else ""))
        rows.append(row)
    return rows


def damping_check(factors, analyzer, strategy, layer_names) -> dict:
    """Largest relative difference between the two libraries' per-layer heuristic damping."""
    diffs = []
    if strategy in ("ekfac", "diagonal"):
        lam = analyzer.load_lambda_matrices(strategy)
        for n in layer_names:
            theirs = 0.1 * float(lam["lambda_matrix"][n].double().mean() / lam["num_lambda_processed"][n].double())
            diffs.append(abs(factors.damping_for(n) - theirs) / abs(theirs))
    elif strategy == "kfac":
        eig = analyzer.load_eigendecomposition(strategy)
        for n in layer_names:
            a = eig["activation_eigenvalues"][n].double()
            s = eig["gradient_eigenvalues"][n].double()
            theirs = 0.1 * float(torch.outer(s, a).mean())
            diffs.append(abs(factors.damping_for(n) - theirs) / abs(theirs))
    return {"damping_max_rel_diff": max(diffs)}


def run(quick: bool = False, log=print) -> dict:
    set_threads()
    workdir = Path(tempfile.mkdtemp(prefix="bench-agreement-"))
    out = {"quick": quick, "rows": [], "setup": {}}
    # Quick: float64 and the three strategies asked for; full: also diagonal, and everything again in float32.
    dtypes = (torch.float64,) if quick else (torch.float64, torch.float32)
    strategies = ("identity", "kfac", "ekfac") if quick else STRATEGIES
    try:
        # (a) MLP on scikit-learn's digits
        t0 = time.perf_counter()
        train_ds, query_ds = digits_datasets(num_query=100 if not quick else 50)
        mlp = digits_mlp().double()
        loss = train_classifier(mlp, train_ds, epochs=30 if not quick else 10)
        mods = linear_module_names(mlp)
        out["setup"]["digits"] = {
            "architecture": "MLP 64-128-64-10, tanh, biases", "train_examples": len(train_ds),
            "queries": len(query_ds), "final_train_loss": loss, "query_accuracy": accuracy(mlp, query_ds),
            "train_seconds": time.perf_counter() - t0, "tracked_modules": mods,
        }
        log(f"digits MLP: train loss {loss:.4f}, query accuracy {out['setup']['digits']['query_accuracy']:.3f}")
        for dtype in dtypes:
            out["rows"] += compare("digits", mlp, ClassificationTask(), kron_side.KronClassificationTask(mods),
                                   train_ds, query_ds, mods, dtype, 64, workdir, log, strategies)

        # (b) tiny Llama LM on synthetic Markov-chain sequences, right-padded, prompts masked in queries
        t0 = time.perf_counter()
        n_train = 512 if not quick else 192
        train_lm_ds = markov_sequences(n_train, vocab=128, seq_len=64, min_len=24, seed=1)
        query_lm_ds = markov_sequences(32 if not quick else 16, vocab=128, seq_len=64, min_len=24, prompt_len=8,
                                       seed=2)
        lm = tiny_llama(vocab=128, hidden=64, intermediate=128, layers=2, heads=4, max_len=64)
        loss = train_lm(lm, train_lm_ds, epochs=4 if not quick else 2)
        mods = linear_module_names(lm)
        out["setup"]["llama"] = {
            "architecture": "LlamaForCausalLM: 2 layers, hidden 64, 4 heads, MLP 128, vocab 128, untied head",
            "train_sequences": len(train_lm_ds), "queries": len(query_lm_ds),
            "sequence_length": "24-64 tokens, right-padded to 64; queries: first 8 tokens are an unmeasured prompt",
            "final_train_token_loss": loss, "train_seconds": time.perf_counter() - t0, "tracked_modules": mods,
        }
        log(f"tiny Llama: train token loss {loss:.4f} ({len(mods)} tracked linear layers)")
        for dtype in dtypes:
            out["rows"] += compare("llama", lm, CausalLMTask(), kron_side.KronLMTask(mods), train_lm_ds,
                                   query_lm_ds, mods, dtype, 32, workdir, log, strategies)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller data and shorter training")
    args = parser.parse_args()
    t0 = time.perf_counter()
    result = run(args.quick)
    result["seconds"] = time.perf_counter() - t0
    path = save_json("agreement.json", result)
    print(json.dumps({"saved": str(path), "seconds": result["seconds"]}))


if __name__ == "__main__":
    main()
