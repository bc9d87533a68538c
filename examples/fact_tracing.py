"""Trace a language model's answers back to the training sentences that taught them.

The core of ``lightning-influence demo``, spelled out step by step so you can adapt it:

1. a corpus of invented people with planted facts, and a tokenizer trained on it;
2. a tiny GPT-2 trained with Lightning, with the ``InfluenceCallback`` attached (it fits
   EK-FAC factors when training ends);
3. influence scores of every training sequence on each question (``run_queries``), with
   reports written to ``--output-dir``;
4. for each question: the most influential sequences, and recall@10 of the sequences that
   state the fact, next to a TF-IDF word-matching baseline.

    python examples/fact_tracing.py                 # about a minute on a CPU
    python examples/fact_tracing.py --quick         # 300 sequences, ~20 s
    python examples/fact_tracing.py --wandb         # also log the report to W&B (offline)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning as L
import torch

from lightning_influence import CausalLMTask, InfluenceCallback
from lightning_influence.demo.driver import (DEMO_MODULES, FULL_SEQUENCES, QUICK_SEQUENCES, TABLE_WIDTH,
                                             FactsDataModule, TinyGPT2LM, default_epochs, evaluate_queries,
                                             format_query_table, format_summary, query_log_probs, query_text)
from lightning_influence.integration.pipeline import QuerySet, run_queries


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Trace a tiny GPT-2's answers to the training sentences that taught them.")
    p.add_argument("--output-dir", default="fact_tracing_output", help="factors, scores and reports (default: %(default)s)")
    p.add_argument("--num-sequences", type=int, default=None, help=f"corpus size (default {FULL_SEQUENCES}, "
                                                                      f"{QUICK_SEQUENCES} with --quick)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: tuned to the corpus size)")
    p.add_argument("--strategy", default="ekfac", choices=["ekfac", "kfac", "diagonal", "identity"])
    p.add_argument("--lr", type=float, default=1e-2, help="AdamW learning rate (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--top-k", type=int, default=10, help="sequences listed per question in the reports")
    p.add_argument("--quick", action="store_true", help="small corpus, short training")
    p.add_argument("--wandb", action="store_true", help="log the report to an offline W&B run in --output-dir")
    p.add_argument("--no-progress-bar", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.output_dir)
    n = args.num_sequences or (QUICK_SEQUENCES if args.quick else FULL_SEQUENCES)
    epochs = args.epochs or default_epochs(n, args.batch_size, args.quick)
    torch.set_num_threads(1)  # a tiny model: one thread is the fastest and steadiest on a CPU
    L.seed_everything(args.seed, verbose=False)

    # 1. Data: corpus, tokenizer, queries (each knows the fact it asks about).
    dm = FactsDataModule(num_sequences=n, batch_size=args.batch_size, seed=args.seed)
    dm.setup("fit")
    queries = dm.queries

    # 2. Train with the callback attached; it fits the factors when training ends.
    model = TinyGPT2LM(vocab_size=len(dm.tokenizer), lr=args.lr)
    task = CausalLMTask()
    callback = InfluenceCallback(task=task, strategy=args.strategy, modules=DEMO_MODULES,
                                 output_dir=str(out / "factors"))
    logger = False
    if args.wandb:
        from lightning.pytorch.loggers import WandbLogger

        logger = WandbLogger(offline=True, save_dir=str(out), project="lightning-influence-fact-tracing")
    trainer = L.Trainer(max_epochs=epochs, callbacks=[callback], logger=logger, devices=1, enable_checkpointing=False,
                        enable_model_summary=False, enable_progress_bar=not args.no_progress_bar, log_every_n_steps=10)
    trainer.fit(model, datamodule=dm)

    # 3. Score every training sequence against every query; save scores and reports.
    model.cpu().eval()
    query_set = QuerySet(dm.query_dataloader(queries), [q["query_id"] for q in queries], [query_text(q) for q in queries])
    scores, _ = run_queries(model, task, callback.factors, query_set, dm.train_dataloader(shuffle=False), out,
                            tokenizer=dm.tokenizer, top_k=args.top_k, wandb_run=logger or None,
                            show_progress=not args.no_progress_bar)

    # 4. Did the top of each list find the sequences that state the fact?
    supporting = [dm.supporting(q["fact_id"]) for q in queries]
    outcomes = evaluate_queries(scores, queries, dm.corpus.texts, supporting,
                                query_log_probs(model, dm.query_dataloader(queries)))
    for o in outcomes:
        print(format_query_table(o, dm.corpus.texts))
    print("=" * TABLE_WIDTH)
    print(format_summary(outcomes))
    print(f"\nScores: {out / 'scores.json'}   HTML report: {out / 'report.html'}")
    if logger:
        logger.experiment.finish()
    fwd = [o.recall for o in outcomes if not o.reversed and o.recall is not None]
    return {"outcomes": outcomes, "mean_recall": sum(fwd) / len(fwd) if fwd else None}


if __name__ == "__main__":
    main()
