"""The ``lightning-influence`` command: run the demo, or score saved models against queries.

``lightning-influence demo`` trains a tiny GPT-2 on a synthetic corpus of invented people
and facts, fits EK-FAC influence factors while training, and shows which training
sentences made the model answer each question. ``lightning-influence score`` does the
scoring step again (or for new questions) from files saved earlier.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

__all__ = ["main", "build_parser", "read_train_texts", "load_model"]

_MAIN_DESCRIPTION = """\
Influence functions for PyTorch Lightning: which training examples made my model do this?

Start with the demo (about a minute on a laptop CPU, no download, no W&B account):

    lightning-influence demo

It trains a tiny GPT-2 on made-up facts ("Oswin Pelleck works as a clockmaker."), asks it
questions about them, and lists for each answer the training sentences with the largest
influence on it. `score` reuses the saved model and factors for new questions.
"""

_DEMO_DESCRIPTION = """\
Train a tiny GPT-2 on a built-in corpus of invented people with planted facts, with the
InfluenceCallback attached (it fits EK-FAC factors at the end of training), then score
the demo questions: for each question it prints the 5 most helpful training sequences,
whether they state the asked fact, and recall@10 next to a TF-IDF word-matching baseline.

Everything is written to --output-dir: factors/, scores.json (+ its tensor file), report.html (open it
in a browser), report.json, a W&B run in offline mode under wandb/ (upload it later with
`wandb sync`), and the model, tokenizer, training texts and queries for `score`.
"""

_SCORE_DESCRIPTION = """\
Score training sequences against questions with a model and influence factors saved
earlier (for example by `lightning-influence demo`). Writes scores.json (+ its tensor file),
report.json and report.html to --output-dir and prints the most influential training
sequences per question.

Example, after `lightning-influence demo --output-dir demo_output`:

    lightning-influence score --checkpoint demo_output/model.ckpt \\
        --factors demo_output/factors --queries demo_output/queries.jsonl \\
        --tokenizer demo_output/tokenizer --train-texts demo_output/train.jsonl \\
        --output-dir rescored
"""

_QUERY_FORMAT = """\
query file format (JSONL, one question per line):
  {"query_id": "q0", "prompt": "Oswin Pelleck has a job as a", "completion": "clockmaker"}
  Influence is measured on log p(completion | prompt). Optional keys: "fact_id" (matched
  against the "fact_ids" of a JSONL training file) or "supporting" (a list of training
  line numbers, 0-based) to print recall@10 of the sequences that state the fact.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-influence", description=_MAIN_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from lightning_influence import __version__
    from lightning_influence.curvature import strategy_names  # lists the names without importing torch

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    demo = sub.add_parser(
        "demo", help="train a tiny GPT-2 on planted facts and trace its answers to training data",
        description=_DEMO_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument("--output-dir", default="demo_output", metavar="DIR",
                      help="where to write everything (default: %(default)s)")
    demo.add_argument("--num-sequences", type=int, default=None, metavar="N",
                      help="training sequences in the generated corpus (default: 2000, or 300 with --quick)")
    demo.add_argument("--epochs", type=int, default=None, metavar="N",
                      help="training epochs (default: about 1000 optimizer steps, tuned for the corpus size)")
    demo.add_argument("--strategy", default="ekfac", choices=strategy_names(),
                      help="Hessian approximation: ekfac (default, the paper's), kfac, diagonal, or identity "
                           "(plain gradient dot products, for comparison)")
    demo.add_argument("--quick", action="store_true",
                      help="a small, fast run (300 sequences) for a first look or for tests")
    demo.add_argument("--seed", type=int, default=0, help="corpus and training seed (default: %(default)s)")
    demo.add_argument("--top-k", type=int, default=10, metavar="K",
                      help="training sequences listed per question in the reports (default: %(default)s)")
    demo.add_argument("--no-progress-bar", action="store_true", help="hide Lightning's progress bars")

    score = sub.add_parser(
        "score", help="score saved model + factors against a file of questions",
        description=_SCORE_DESCRIPTION, epilog=_QUERY_FORMAT, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    score.add_argument("--checkpoint", required=True, metavar="PATH",
                       help="the trained model: a Lightning checkpoint (.ckpt) of TinyGPT2LM, or a directory "
                            "saved with save_pretrained (config.json + model.safetensors)")
    score.add_argument("--factors", required=True, metavar="DIR",
                       help="influence factors fitted for that model (the InfluenceCallback's output_dir, "
                            "e.g. demo_output/factors)")
    score.add_argument("--queries", required=True, metavar="FILE.jsonl",
                       help="questions to explain: JSONL with \"prompt\" and \"completion\" (see below)")
    score.add_argument("--tokenizer", required=True, metavar="DIR",
                       help="tokenizer directory (tokenizer.json), e.g. demo_output/tokenizer")
    score.add_argument("--train-texts", required=True, metavar="FILE",
                       help="the training sequences, in training order: one text per line, or JSONL with a "
                            "\"text\" key (e.g. demo_output/train.jsonl)")
    score.add_argument("--output-dir", default="influence_scores", metavar="DIR",
                       help="where the scores (scores.json) and the reports go (default: %(default)s)")
    score.add_argument("--top-k", type=int, default=10, metavar="K",
                       help="training sequences listed per question in the reports (default: %(default)s)")
    score.add_argument("--query-rank", type=int, default=None, metavar="R",
                       help="keep each question's preconditioned gradient at rank R (faster for many "
                            "questions; the paper uses 32). Default: full rank")
    score.add_argument("--batch-size", type=int, default=16, metavar="B",
                       help="training sequences scored per batch (default: %(default)s)")
    score.add_argument("--max-length", type=int, default=64, metavar="T",
                       help="cut training sequences to T tokens, as in training (default: %(default)s)")
    score.add_argument("--no-progress-bar", action="store_true", help="hide the progress bars")
    return parser


# ------------------------------------------------------------------------------------ score
def read_train_texts(path: str | os.PathLike) -> tuple[list[str], list[list[str]] | None]:
    """Training texts from a text file (one per line) or JSONL (``"text"``; ``"fact_ids"`` kept).

    Returns ``(texts, fact_ids)`` with ``fact_ids`` ``None`` unless every JSONL record has it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training texts file not found: {path}")
    lines = [ln.rstrip("\n") for ln in path.read_text(encoding="utf-8").splitlines()]
    first = next((ln for ln in lines if ln.strip()), "")
    is_jsonl = path.suffix == ".jsonl"
    if not is_jsonl and first.lstrip().startswith("{"):
        try:
            is_jsonl = isinstance(json.loads(first), dict) and "text" in json.loads(first)
        except json.JSONDecodeError:
            is_jsonl = False
    if not is_jsonl:
        texts = [ln for ln in lines if ln.strip()]
        if not texts:
            raise ValueError(f"{path}: no training texts")
        return texts, None
    texts, fact_ids = [], []
    for n, ln in enumerate(lines, start=1):
        if not ln.strip():
            continue
        try:
            obj = json.loads(ln)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:line {n}: not valid JSON ({err.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise ValueError(f"{path}:line {n}: expected an object with a string \"text\"")
        texts.append(obj["text"])
        fact_ids.append(obj.get("fact_ids"))
    if not texts:
        raise ValueError(f"{path}: no training texts")
    return texts, fact_ids if all(isinstance(f, list) for f in fact_ids) else None


def load_model(checkpoint: str | os.PathLike):
    """A :class:`~lightning_influence.demo.TinyGPT2LM` from a ``.ckpt`` or a ``save_pretrained`` directory.

    Lightning checkpoints are loaded with ``weights_only=True``: tensors and plain values only.
    """
    from lightning_influence.demo.driver import TinyGPT2LM

    path = Path(checkpoint)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is a directory without config.json: not a save_pretrained model")
        return TinyGPT2LM.from_pretrained(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return TinyGPT2LM.load_from_checkpoint(str(path), map_location="cpu", weights_only=True)


def _supporting(queries: Sequence[dict[str, Any]], fact_ids: list[list[str]] | None,
                num_train: int) -> list[list[int] | None]:
    out: list[list[int] | None] = []
    for q in queries:
        sup = q.get("supporting")
        if isinstance(sup, list) and all(isinstance(i, int) and 0 <= i < num_train for i in sup):
            out.append(sup)
        elif q.get("fact_id") and fact_ids is not None:
            out.append([i for i, f in enumerate(fact_ids) if q["fact_id"] in f])
        else:
            out.append(None)
    return out


def cmd_score(args: argparse.Namespace) -> int:
    import torch
    from torch.utils.data import DataLoader

    from lightning_influence.text import LMCollator, LMDataset, read_jsonl_queries
    from lightning_influence.demo.tokenizer import load_tokenizer
    from lightning_influence.demo.driver import (SCORE_LEGEND, TABLE_WIDTH, evaluate_queries,
                                                 format_query_table, format_summary, query_log_probs)
    from lightning_influence.factors import InfluenceFactors
    from lightning_influence.integration.pipeline import load_query_set, run_queries
    from lightning_influence.options import ScoreOptions
    from lightning_influence.tasks import CausalLMTask

    factors_dir = Path(args.factors)
    if not (factors_dir / "manifest.json").is_file():
        raise FileNotFoundError(f"no influence factors in {factors_dir} (expected manifest.json); pass the "
                                "InfluenceCallback's output_dir, e.g. demo_output/factors")
    options = ScoreOptions(top_k=args.top_k, query_rank=args.query_rank)  # checked before anything is loaded
    model = load_model(args.checkpoint).eval()
    factors = InfluenceFactors.load(factors_dir)
    tokenizer = load_tokenizer(args.tokenizer)
    records = read_jsonl_queries(args.queries)
    texts, fact_ids = read_train_texts(args.train_texts)
    dataset = LMDataset(texts, tokenizer, max_length=args.max_length)
    loader = DataLoader(dataset, batch_size=args.batch_size, collate_fn=LMCollator(tokenizer.pad_token_id))
    query_set = load_query_set(str(args.queries), tokenizer)
    print(f"Scoring {len(texts)} training sequences against {len(records)} queries "
          f"({factors.strategy} factors from {factors_dir})", flush=True)
    scores, _ = run_queries(model, CausalLMTask(), factors, query_set, loader, args.output_dir, options,
                            tokenizer=tokenizer, title=f"Influence report ({factors.strategy})", show_progress=not args.no_progress_bar)
    log_probs = query_log_probs(model, query_set.loader)
    outcomes = evaluate_queries(scores.to(torch.float64), records, texts, _supporting(records, fact_ids, len(texts)),
                                log_probs)
    print()
    print(SCORE_LEGEND)
    for o in outcomes:
        print(format_query_table(o, texts))
    if any(o.recall is not None for o in outcomes):
        print("=" * TABLE_WIDTH)
        print(format_summary(outcomes))
    out = Path(args.output_dir)
    print(f"\nInfluence scores: {out / 'scores.json'}\nHTML report:      {out / 'report.html'}")
    return 0


# ------------------------------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> int:
    from lightning_influence.demo.driver import run_demo

    run_demo(output_dir=args.output_dir, num_sequences=args.num_sequences, epochs=args.epochs,
             strategy=args.strategy, quick=args.quick, seed=args.seed, top_k=args.top_k,
             progress_bar=not args.no_progress_bar)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lightning-influence`` (and ``python -m lightning_influence.cli``)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("num_sequences", "epochs", "top_k", "query_rank", "batch_size", "max_length"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return {"demo": cmd_demo, "score": cmd_score}[args.command](args)
    except (FileNotFoundError, ValueError) as err:
        print(f"lightning-influence {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
