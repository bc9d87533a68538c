"""float32 against float64 eigendecompositions (``eigh_dtype``), at GPT-2's real widths.

A GPT-2 with two blocks of GPT-2 small's widths (``GPT2Config(n_layer=2)``: tracked sides of 768, 769,
2304, 3072 and 3073, the tied head left out as by default) with a vocabulary of 8192 instead of 50257
(the head is not tracked; a smaller one only makes the passes cheaper), trained briefly on a Markov chain
so that the covariances are not those of random weights. EK-FAC is fitted with the defaults twice, with
``eigh_dtype="float64"`` and ``"float32"``; K-FAC's factors are the same fits' covariance-phase tensors
(K-FAC's one pass and its eigendecompositions are EK-FAC's first pass, the same matrices). Reported, on
one thread:

* the CPU seconds of the eigendecompositions (the covariance pass's finishing step) and of the whole fit;
* the agreement of pairwise scores (every query against every training sequence, scored in float64 so
  that only the factors differ) float32 against float64: Pearson, Spearman, the largest error relative
  to the largest score, the largest elementwise relative error, top-10 overlap per query;
* the preconditioned gradients of the first 4 queries: relative error overall and in the smallest-eigenvalue region
  (the coordinates, in the float64 eigenbasis, of the 1% smallest curvature eigenvalues of each layer),
  and each side's smallest eigenvalues against the damping;
* for scale, the same agreement for two float32 roundings the library already offers: float32 statistics
  (``stats_dtype="float32"``, the sums rounded to float32, then a float64 eigendecomposition) against the
  defaults, and the default factors scored in float32 (the default score dtype) against float64.

    .bench-venv/bin/python -m benchmarks.eigh_dtype [--quick]   # writes benchmarks/results/eigh_dtype.json
                                                               # and benchmarks/results/eigh_dtype.md
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from lightning_influence.memory import release_freed_memory

from .common import (RESULTS, ListDataset, loader, machine_info, markov_sequences, pearson, save_json, set_threads,
                     spearman, train_lm)

N_TRAIN, N_QUERY, SEQ_LEN, BATCH, VOCAB = 48, 8, 128, 8, 8192
N_COMPARED = 4  # queries whose preconditioned gradients are compared (8 x 14M float64 numbers is 0.9 GB a set)
TRAIN_STEPS_DATA = 128  # sequences of the brief training run (16 Adam steps of 8)
QUICK = dict(n_train=16, n_query=6, seq_len=32, n_embd=128, n_head=4, vocab=512, train_data=32)
SMALLEST = 0.01  # the share of each layer's curvature eigenvalues that is "the smallest-eigenvalue region"


def build_model(quick: bool) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, vocab_size=QUICK["vocab"] if quick else VOCAB)
    if quick:
        cfg.n_embd, cfg.n_head = QUICK["n_embd"], QUICK["n_head"]
    cfg.attn_pdrop = cfg.resid_pdrop = cfg.embd_pdrop = 0.0
    return GPT2LMHeadModel(cfg).eval()


def fit(model, task, train, eigh_dtype: str, stats_dtype: str = "float64") -> tuple[object, dict]:
    """EK-FAC with the defaults but ``eigh_dtype`` (and ``stats_dtype``); CPU seconds of each pass's finishing
    step and of the fit."""
    from lightning_influence import fit_factors

    from .common import timed_finishes

    with timed_finishes() as finish_cpu:
        start = time.process_time()
        factors = fit_factors(model, task, loader(train, BATCH), strategy="ekfac", eigh_dtype=eigh_dtype,
                              stats_dtype=stats_dtype)
        total = time.process_time() - start
    return factors, {"fit_cpu_seconds": total, "eigh_cpu_seconds": finish_cpu[0], "lambda_finish_cpu_seconds":
                     finish_cpu[1]}


def kfac_view(ekfac):
    """K-FAC factors from EK-FAC's covariance phase: its eigenbases and eigenvalues, Lambda left out."""
    from lightning_influence import InfluenceFactors

    keep = ("S_eigvecs", "A_eigvecs", "S_eigvals", "A_eigvals", "S_count", "A_count")
    return InfluenceFactors("kfac", ekfac.layers, fisher=ekfac.fisher,
                            tensors={n: {k: t[k] for k in keep} for n, t in ekfac.tensors.items()}, phase="complete")


def score(model, task, factors, queries, train, score_dtype):
    """Preconditioned query gradients (full rank) and the [Q, N] pairwise scores from them (``train=None``: the
    gradients only)."""
    from lightning_influence import InfluenceScorer

    # a view of the factors: its cache of prepared tensors (inverse eigenvalues, bases in the score dtype) goes
    # with the scorer instead of staying on the fitted factors
    view = factors.with_damping(factors.damping, factors.damping_factor)
    scorer = InfluenceScorer(model, task, view, score_dtype=score_dtype)
    grads = scorer.query_gradients(loader(queries, len(queries)))
    if train is None:
        return grads, None
    scores = torch.cat([scorer.score_batch(grads, b, i).sum(0).double() for i, b in enumerate(loader(train, BATCH))],
                       1)
    return grads, scores


def score_agreement(ours: torch.Tensor, reference: torch.Tensor, k: int = 10) -> dict:
    diff = (ours - reference).abs()
    top = lambda s: [set(row.topk(k).indices.tolist()) for row in s]  # noqa: E731 (most positive, per query)
    overlap = [len(a & b) / k for a, b in zip(top(ours), top(reference))]
    return {"pearson": pearson(ours, reference), "spearman": spearman(ours, reference),
            "max_error_over_max_score": float(diff.max() / reference.abs().max()),
            "max_elementwise_relative_error": float((diff / reference.abs()).max()),
            "top10_overlap_mean": sum(overlap) / len(overlap), "top10_overlap_min": min(overlap)}


def gradient_agreement(factors64, grads, reference) -> dict:
    """Relative error of the preconditioned query gradients, overall and in each layer's smallest-eigenvalue region."""
    overall_num = overall_den = small_num = small_den = 0.0
    per_layer = {}
    for name in factors64.layers:
        p, r = grads.full[name].double(), reference.full[name].double()
        t = factors64.tensors[name]
        qs, qa = t["S_eigvecs"].double(), t["A_eigvecs"].double()
        eig = factors64.eigenvalues(name).double()
        region = eig <= eig.flatten().kthvalue(max(1, int(SMALLEST * eig.numel()))).values
        d_rot, r_rot = qs.T @ (p - r) @ qa, qs.T @ r @ qa  # [Q, d_out, d_in] in the float64 eigenbasis
        num, den = float((p - r).square().sum()), float(r.square().sum())
        s_num, s_den = float(d_rot[:, region].square().sum()), float(r_rot[:, region].square().sum())
        per_layer[name] = {"relative_error": (num / den) ** 0.5,
                           "smallest_region_relative_error": (s_num / s_den) ** 0.5}
        overall_num, overall_den, small_num, small_den = overall_num + num, overall_den + den, small_num + s_num, \
            small_den + s_den
    return {"relative_error": (overall_num / overall_den) ** 0.5,
            "smallest_region_relative_error": (small_num / small_den) ** 0.5, "per_layer": per_layer}


def spectra(f64, f32) -> dict:
    """Per side: the eigenvalue range (float64), and float32's error on the 1% smallest eigenvalues, relative to
    those eigenvalues and to the layer's damping (what the preconditioner adds to every eigenvalue)."""
    out = {}
    for name in f64.layers:
        for side in ("S", "A"):
            v64, v32 = f64.tensors[name][f"{side}_eigvals"].double(), f32.tensors[name][f"{side}_eigvals"].double()
            n_small = max(1, int(SMALLEST * v64.numel()))
            err = (v32[:n_small] - v64[:n_small]).abs()  # eigh sorts ascending: the smallest come first
            # K-FAC's damping, 0.1 x mean(L_S L_A) = 0.1 mean(L_S) mean(L_A), per unit of the other side's mean:
            # the scale below which an eigenvalue of this side no longer changes the preconditioner
            damping = 0.1 * float(v64.clamp_min(0).mean())
            out[f"{name}:{side}"] = {
                "dim": v64.numel(), "largest": float(v64[-1]), "smallest": float(v64[0]),
                "condition": float(v64[-1] / v64.clamp_min(1e-300)[0]),
                "below_damping_share": float((v64 < damping).double().mean()),
                "smallest_max_abs_error_over_damping": float(err.max() / damping),
                "smallest_max_relative_error": float((err / v64[:n_small].abs().clamp_min(1e-300)).max()),
                "negative_float32": int((v32 < 0).sum()), "negative_float64": int((v64 < 0).sum())}
    return out


def run(quick: bool, log=print) -> dict:
    from lightning_influence import CausalLMTask

    set_threads()
    seq_len = QUICK["seq_len"] if quick else SEQ_LEN
    n_train, n_query = (QUICK["n_train"], QUICK["n_query"]) if quick else (N_TRAIN, N_QUERY)
    model = build_model(quick)
    vocab = model.config.vocab_size
    started = time.process_time()
    train_loss = train_lm(model, markov_sequences(QUICK["train_data"] if quick else TRAIN_STEPS_DATA, vocab, seq_len,
                                                  seed=3), epochs=1, batch_size=BATCH, lr=1e-3)
    log(f"brief training: {time.process_time() - started:.1f} CPU s, last mean token loss {train_loss:.3f}")
    train = markov_sequences(n_train, vocab, seq_len, seed=1)
    queries = markov_sequences(n_query, vocab, seq_len, prompt_len=seq_len // 2, seed=2)
    task = CausalLMTask()
    result: dict = {"quick": quick, "n_train": n_train, "n_query": n_query, "seq_len": seq_len, "vocab": vocab,
                    "threads": torch.get_num_threads(), "train_loss": train_loss,
                    "train_sequences": QUICK["train_data"] if quick else TRAIN_STEPS_DATA, "fits": {}, "agreement": {}}
    strategies = ("ekfac", "kfac")
    view = lambda f, strategy: f if strategy == "ekfac" else kfac_view(f)  # noqa: E731
    reference, result["fits"]["float64"] = fit(model, task, train, "float64")
    log(f"ekfac defaults (float64 eigh): fit {result['fits']['float64']['fit_cpu_seconds']:.1f} CPU s, "
        f"eigendecompositions {result['fits']['float64']['eigh_cpu_seconds']:.1f} CPU s")
    result["tracked"] = {n: [l.d_out, l.d_in] for n, l in reference.layers.items()}
    ref_scores = {st: score(model, task, view(reference, st), queries, train, torch.float64)[1] for st in strategies}
    release_freed_memory()
    compared_queries = ListDataset(queries.items[:N_COMPARED])
    # One compared set of factors at a time beside the reference (each holds GPT-2-sized bases), scored in float64
    # but the last: the float32 eigendecompositions, then two float32 roundings the library already offers,
    # float32 statistics (then a float64 eigh) and the default factors scored in float32 (the default score dtype).
    for key, eigh_dtype, stats_dtype, score_dtype in (("float32_eigh", "float32", "float64", torch.float64),
                                                      ("float32_statistics", "float64", "float32", torch.float64),
                                                      ("float32_scoring", None, None, torch.float32)):
        if eigh_dtype is None:
            other = reference
        else:
            other, result["fits"][key] = fit(model, task, train, eigh_dtype, stats_dtype)
            log(f"ekfac eigh_dtype={eigh_dtype} stats_dtype={stats_dtype}: fit "
                f"{result['fits'][key]['fit_cpu_seconds']:.1f} CPU s, eigendecompositions "
                f"{result['fits'][key]['eigh_cpu_seconds']:.1f} CPU s")
        if key == "float32_eigh":
            result["spectra"] = spectra(reference, other)
        for strategy in strategies:
            grads, scores = score(model, task, view(other, strategy), queries, train, score_dtype)
            grads = grads.select(list(range(N_COMPARED)))  # the rest go now
            release_freed_memory()
            ref_grads = score(model, task, view(reference, strategy), compared_queries, None, torch.float64)[0]
            row = {"scores": score_agreement(scores, ref_scores[strategy]),
                   "query_gradients": gradient_agreement(reference, grads, ref_grads)}
            del grads, ref_grads
            release_freed_memory()
            result["agreement"].setdefault(strategy, {})[key] = row
            sc, g = row["scores"], row["query_gradients"]
            log(f"{strategy} {key}: pearson {sc['pearson']:.9f} spearman {sc['spearman']:.9f} max err/max "
                f"{sc['max_error_over_max_score']:.2e} top-10 {sc['top10_overlap_mean']:.3f}; query grads rel err "
                f"{g['relative_error']:.2e}, smallest-eigenvalue region {g['smallest_region_relative_error']:.2e}")
        del other
        release_freed_memory()
    result["machine"] = machine_info()
    return result


def markdown(r: dict) -> str:
    f64, f32 = r["fits"]["float64"], r["fits"]["float32_eigh"]
    sides = sorted({d for dims in r["tracked"].values() for d in dims})
    steps = r["train_sequences"] // BATCH
    lines = [
        "## 11. float32 eigendecompositions (`eigh_dtype`)",
        "",
        f"GPT-2 with two blocks of GPT-2 small's widths (`GPT2Config(n_layer=2)`, vocabulary {r['vocab']}; "
        f"{len(r['tracked'])} tracked layers, sides {', '.join(map(str, sides))}; head left out), trained briefly "
        f"({steps} Adam steps from the initialisation on a Markov chain: the weights moved, the mean token loss "
        f"stayed at {r['train_loss']:.2f}, near uniform's {math.log(r['vocab']):.2f}); EK-FAC fitted with the "
        "defaults "
        f"on {r['n_train']} sequences of {r['seq_len']} tokens, once with `eigh_dtype=\"float64\"` and once with "
        f"`\"float32\"`; K-FAC's factors are the same fits' covariance phase (the same eigendecompositions). "
        f"{r['threads']} thread; `python -m benchmarks.eigh_dtype`.",
        "",
        "| eigh dtype | eigendecompositions (CPU s) | whole EK-FAC fit (CPU s) |",
        "| --- | --- | --- |",
        f"| float64 | {f64['eigh_cpu_seconds']:.1f} | {f64['fit_cpu_seconds']:.1f} |",
        f"| float32 | {f32['eigh_cpu_seconds']:.1f} ({f32['eigh_cpu_seconds'] / f64['eigh_cpu_seconds']:.2f}x) | "
        f"{f32['fit_cpu_seconds']:.1f} ({f32['fit_cpu_seconds'] / f64['fit_cpu_seconds']:.2f}x) |",
        f"| float64, float32 statistics | {r['fits']['float32_statistics']['eigh_cpu_seconds']:.1f} | "
        f"{r['fits']['float32_statistics']['fit_cpu_seconds']:.1f} |",
        "",
        "The two fits with float64 eigendecompositions (first and last rows) differ by "
        f"{abs(r['fits']['float32_statistics']['eigh_cpu_seconds'] / f64['eigh_cpu_seconds'] - 1):.0%} in their "
        "eigendecomposition time: the noise of this shared machine.",
        "",
        f"Agreement, float32 against float64 eigendecompositions, on {r['n_query']} queries x {r['n_train']} "
        "training sequences (both scored in float64, so only the factors differ). For scale, two float32 "
        "roundings the library already offers, against the defaults: float32 statistics (`stats_dtype=\"float32\"`,"
        " float64 eigendecompositions), and the default factors scored in float32 (the default `score_dtype`). "
        f"Query gradients: the first {N_COMPARED} queries' preconditioned gradients over every tracked layer, "
        "relative error overall and in the coordinates (float64 eigenbasis) of each layer's 1% smallest curvature "
        "eigenvalues.",
        "",
        "| strategy | compared | Pearson | Spearman | max error / max score | max elementwise rel. error "
        "| top-10 overlap (mean, min) | query gradients rel. error | in the 1% smallest eigenvalues |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label, key in (("float32 eigh", "float32_eigh"), ("float32 statistics", "float32_statistics"),
                       ("float32 scoring", "float32_scoring")):
        for strategy in ("ekfac", "kfac"):
            row = r["agreement"][strategy][key]
            s, g = row["scores"], row["query_gradients"]
            lines.append(f"| {strategy} | {label} | {s['pearson']:.9f} | {s['spearman']:.9f} | "
                         f"{s['max_error_over_max_score']:.1e} | {s['max_elementwise_relative_error']:.1e} | "
                         f"{s['top10_overlap_mean']:.2f}, {s['top10_overlap_min']:.2f} | {g['relative_error']:.1e} | "
                         f"{g['smallest_region_relative_error']:.1e} |")
    spec = r["spectra"]
    worst = max(spec.values(), key=lambda v: v["smallest_max_abs_error_over_damping"])
    conds = [v["condition"] for v in spec.values() if v["smallest"] > 0]
    lines += [
        "",
        f"Spectra: per side, float64 condition numbers from {min(conds):.1e} to {max(conds):.1e} where the "
        f"smallest eigenvalue is positive ({sum(v['negative_float64'] > 0 for v in spec.values())} sides have "
        f"negative float64 eigenvalues, clamped at zero; {sum(v['negative_float32'] > 0 for v in spec.values())} "
        f"in float32); the share of a side's eigenvalues below 0.1 x its mean eigenvalue (the damping scale) "
        f"ranges from {min(v['below_damping_share'] for v in spec.values()):.2f} to "
        f"{max(v['below_damping_share'] for v in spec.values()):.2f}. On the 1% smallest eigenvalues of each side "
        f"float32's error is at most {worst['smallest_max_abs_error_over_damping']:.1e} of that damping scale, "
        f"and up to {max(v['smallest_max_relative_error'] for v in spec.values()):.1e} relative to those "
        "eigenvalues themselves.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small model (seconds): checks the script runs")
    parser.add_argument("--markdown-only", action="store_true", help="rewrite the .md from the saved .json")
    args = parser.parse_args()
    name = "eigh_dtype-quick" if args.quick else "eigh_dtype"
    if args.markdown_only:
        (RESULTS / f"{name}.md").write_text(markdown(json.loads((RESULTS / f"{name}.json").read_text())))
        return
    result = run(args.quick)
    path = save_json(f"{name}.json", result)
    (RESULTS / f"{name}.md").write_text(markdown(result))
    print(f"wrote {path} and {RESULTS / f'{name}.md'}")


if __name__ == "__main__":
    main()
