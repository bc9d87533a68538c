"""The built-in demo: a tiny GPT-2 learns planted facts, influence traces them back.

Three pieces, usable on their own:

* :class:`TinyGPT2LM` -- a LightningModule around a small ``GPT2LMHeadModel`` built from a
  config (no download). Its ``forward(input_ids, attention_mask)`` returns the Hugging Face
  output, so :class:`~lightning_influence.tasks.CausalLMTask` works on the LightningModule
  itself (no ``model_attr`` needed).
* :class:`FactsDataModule` -- the synthetic corpus of :mod:`lightning_influence.demo.corpus`
  (invented people with planted facts), a byte-level BPE tokenizer trained locally on it,
  and the demo queries about those facts.
* :func:`run_demo` -- trains with :class:`~lightning_influence.InfluenceCallback` attached
  and a W&B logger (offline), scores the queries, prints what influenced each answer and
  how often the sentences that state the fact come out on top, next to a TF-IDF baseline.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader

from lightning_influence.scoring.topk import select_top_k
from lightning_influence.text import LMCollator, LMDataset, QueryCollator, QueryDataset, query_text
from lightning_influence.demo.corpus import generate_corpus, make_queries, supporting_indices
from lightning_influence.demo.tokenizer import train_tokenizer

__all__ = [
    "TinyGPT2LM",
    "FactsDataModule",
    "DemoResult",
    "QueryOutcome",
    "run_demo",
    "DEMO_MODULES",
    "recall_at_k",
    "best_rank",
    "tfidf_scores",
    "evaluate_queries",
    "query_log_probs",
    "fact_accuracy",
    "query_text",
    "format_query_table",
    "format_summary",
]

#: Layers the demo tracks: every attention and MLP projection of the transformer blocks.
#: (The embedding and the output layer are left out, as in Grosse et al.)
DEMO_MODULES = ["model.transformer.h.*.mlp.*", "model.transformer.h.*.attn.*"]
#: Size of the full demo (``make demo``) and of the quick one (tests, ``--quick``).
FULL_SEQUENCES, QUICK_SEQUENCES = 2000, 300
#: Optimizer steps the default epoch count aims at (see :func:`default_epochs`).
FULL_STEPS, QUICK_STEPS = 750, 400
FULL_LR, QUICK_LR = 1e-2, 5e-3
RECALL_K = 10


# ---------------------------------------------------------------------------------- model
class TinyGPT2LM(L.LightningModule):
    """A small GPT-2 language model, built from a config (nothing is downloaded).

    Args:
        vocab_size: embedding rows; must be at least the tokenizer's vocabulary (the demo
            tokenizer has at most 2048 tokens, so the default always fits).
        n_layer, n_embd, n_head, n_positions: GPT-2 shape.
        lr, weight_decay, warmup_steps: AdamW with linear warm-up then linear decay to 10%.
        max_grad_norm: gradient-norm clipping (a Trainer ``gradient_clip_val`` takes precedence);
            ``None`` disables it. Clipping makes this tiny model learn the facts much faster.
        pad_token_id, bos_token_id: special ids of the demo tokenizer.
    """

    def __init__(
        self,
        vocab_size: int = 2048,
        n_layer: int = 2,
        n_embd: int = 64,
        n_head: int = 4,
        n_positions: int = 64,
        lr: float = 1e-2,
        weight_decay: float = 0.0,
        warmup_steps: int = 50,
        max_grad_norm: float | None = 1.0,
        pad_token_id: int = 1,
        bos_token_id: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters()
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(
            vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,  # no dropout: influence needs a deterministic model
            bos_token_id=bos_token_id, eos_token_id=bos_token_id, pad_token_id=pad_token_id,
        )
        self.model = GPT2LMHeadModel(config)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, **kwargs: Any) -> "TinyGPT2LM":
        """Wrap a model saved with ``save_pretrained`` (local files only)."""
        from transformers import GPT2LMHeadModel

        hf = GPT2LMHeadModel.from_pretrained(str(directory), local_files_only=True)
        c = hf.config
        module = cls(vocab_size=c.vocab_size, n_layer=c.n_layer, n_embd=c.n_embd, n_head=c.n_head,
                     n_positions=c.n_positions, pad_token_id=c.pad_token_id if c.pad_token_id is not None else 1,
                     bos_token_id=c.bos_token_id if c.bos_token_id is not None else 0, **kwargs)
        module.model = hf
        return module

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Save the inner Hugging Face model (safetensors + config.json)."""
        self.model.save_pretrained(str(directory))
        return Path(directory)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask)

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        tok = getattr(dm, "tokenizer", None)
        if tok is not None and len(tok) > self.hparams.vocab_size:
            raise ValueError(f"the tokenizer has {len(tok)} tokens but TinyGPT2LM(vocab_size={self.hparams.vocab_size}); "
                             f"set model vocab_size >= {len(tok)}")

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        self.log("train_loss", out.loss, prog_bar=True, on_step=True, on_epoch=True,
                 batch_size=batch["input_ids"].shape[0])
        return out.loss

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        if gradient_clip_val is None and self.hparams.max_grad_norm is not None:
            gradient_clip_val, gradient_clip_algorithm = self.hparams.max_grad_norm, "norm"
        self.clip_gradients(optimizer, gradient_clip_val=gradient_clip_val,
                            gradient_clip_algorithm=gradient_clip_algorithm)

    def configure_optimizers(self):
        decay = [p for n, p in self.named_parameters() if p.ndim >= 2]
        no_decay = [p for n, p in self.named_parameters() if p.ndim < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": self.hparams.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=self.hparams.lr)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warm = min(self.hparams.warmup_steps, max(1, total // 10))

        def schedule(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            return max(0.1, 1.0 - 0.9 * (step - warm) / max(1, total - warm))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


# ----------------------------------------------------------------------------------- data
class FactsDataModule(L.LightningDataModule):
    """The built-in corpus of planted facts, its tokenizer and the demo queries.

    Everything is a deterministic function of ``num_sequences`` and ``seed``: the corpus
    (:func:`~lightning_influence.demo.corpus.generate_corpus`), the tokenizer trained on it
    (locally, no download) and the queries (:func:`~lightning_influence.demo.corpus.make_queries`).
    The corpus, with the same facts, depends on BOTH numbers: queries made for one size do
    not match a corpus of another size.

    Args:
        num_sequences: training sequences in the corpus.
        batch_size: training (and influence pass) batch size.
        seed: corpus seed.
        shuffle: shuffle the training batches (seeded). Influence passes always read the
            data in order, whatever this says.
        num_queries: how many demo queries (one of them asks a fact in reverse order).
        max_length: longest tokenized sequence (longer ones are cut).
    """

    def __init__(self, num_sequences: int = FULL_SEQUENCES, batch_size: int = 16, seed: int = 0,
                 shuffle: bool = True, num_queries: int = 6, max_length: int = 64):
        super().__init__()
        self.num_sequences = num_sequences
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.num_queries = num_queries
        self.max_length = max_length
        self._corpus = None
        self._tokenizer = None
        self._train_dataset = None

    # Built lazily (and once): generating and tokenizing takes well under a second.
    @property
    def corpus(self):
        if self._corpus is None:
            self._corpus = generate_corpus(self.num_sequences, self.seed)
        return self._corpus

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = train_tokenizer(self.corpus.texts, model_max_length=self.max_length)
        return self._tokenizer

    @property
    def train_dataset(self) -> LMDataset:
        if self._train_dataset is None:
            self._train_dataset = LMDataset(self.corpus, self.tokenizer, max_length=self.max_length)
        return self._train_dataset

    @property
    def queries(self) -> list[dict[str, Any]]:
        """``[{"query_id", "prompt", "completion", "fact_id", "reversed"}]`` about this corpus."""
        return make_queries(self.corpus, self.num_queries)

    def supporting(self, fact_id: str) -> list[int]:
        """Indices of the training sequences that state ``fact_id``."""
        return supporting_indices(self.corpus, fact_id)

    def setup(self, stage: str | None = None) -> None:
        self.train_dataset  # noqa: B018 (builds corpus, tokenizer and dataset)

    def train_dataloader(self, shuffle: bool | None = None) -> DataLoader:
        shuffle = self.shuffle if shuffle is None else shuffle
        return DataLoader(self.train_dataset, batch_size=self.batch_size, shuffle=shuffle,
                          generator=torch.Generator().manual_seed(self.seed) if shuffle else None,
                          collate_fn=LMCollator(self.tokenizer.pad_token_id))

    def query_dataset(self, queries: Sequence[dict[str, Any]] | None = None) -> QueryDataset:
        return QueryDataset(self.queries if queries is None else queries, self.tokenizer, max_length=self.max_length)

    def query_dataloader(self, queries: Sequence[dict[str, Any]] | None = None, batch_size: int = 8) -> DataLoader:
        """Batches of the demo queries (``input_ids``, ``attention_mask``, ``labels`` on the completion)."""
        return DataLoader(self.query_dataset(queries), batch_size=batch_size,
                          collate_fn=QueryCollator(self.tokenizer.pad_token_id))


# ------------------------------------------------------------------------------ evaluation
def _ranked(scores: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, indices)`` of the ``k`` highest scores of a row (all with ``None``), by the library's
    selection rule (``scoring.topk``: ties go to the lower index); NaN ranks last."""
    row = torch.nan_to_num(torch.as_tensor(scores, dtype=torch.float64).flatten(), nan=-math.inf)
    n = row.numel() if k is None else min(k, row.numel())
    values, indices = select_top_k(row.unsqueeze(0), torch.arange(row.numel()).unsqueeze(0), n, largest=True)
    return values[0], indices[0]


def recall_at_k(scores: torch.Tensor, supporting: Sequence[int], k: int = RECALL_K) -> float:
    """Share of the ``supporting`` indices among the ``k`` highest ``scores`` (NaN never ranks)."""
    if not supporting:
        return float("nan")
    top = set(_ranked(scores, k)[1].tolist())
    return len(top & set(supporting)) / len(supporting)


def best_rank(scores: torch.Tensor, supporting: Sequence[int]) -> int | None:
    """1-based rank of the highest-scored supporting index (``None`` without any)."""
    if not supporting:
        return None
    order = _ranked(scores)[1]
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(1, order.numel() + 1)
    return int(ranks[list(supporting)].min())


def tfidf_scores(train_texts: Sequence[str], query_texts: Sequence[str]) -> torch.Tensor:
    """Cosine similarity ``[Q, N]`` of each query text to each training text under TF-IDF
    (scikit-learn ``TfidfVectorizer`` fitted on the training texts): the lexical baseline."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    vec = TfidfVectorizer()
    train = vec.fit_transform(list(train_texts))
    sims = vec.transform(list(query_texts)) @ train.T  # rows are L2-normalised: dot = cosine
    return torch.from_numpy(sims.toarray())


@dataclass
class QueryOutcome:
    """What the demo found for one query."""

    query_id: str
    text: str
    fact_id: str | None
    reversed: bool
    supporting: list[int]
    top: list[tuple[int, float]]  # (training index, score), most positive first
    recall: float | None  # recall@10 of the supporting sequences under influence
    best_rank: int | None
    tfidf_recall: float | None
    tfidf_best_rank: int | None
    log_prob: float | None = None  # the model's log p(completion | prompt)


@dataclass
class DemoResult:
    """Where the demo wrote things, and what it measured."""

    output_dir: Path
    factors_dir: Path
    scores_path: Path
    report_html: Path
    report_json: Path
    wandb_run_dir: Path | None
    checkpoint: Path
    model_dir: Path
    tokenizer_dir: Path
    train_texts: Path
    queries_file: Path
    queries: list[QueryOutcome] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    fact_accuracy: float | None = None  # share of (trained-order) fact questions answered right

    def _mean(self, attr: str, reversed_: bool) -> float | None:
        vals = [getattr(q, attr) for q in self.queries
                if q.reversed == reversed_ and getattr(q, attr) is not None and not math.isnan(getattr(q, attr))]
        return sum(vals) / len(vals) if vals else None

    @property
    def mean_recall(self) -> float | None:
        """Mean influence recall@10 over the forward (trained-direction) queries."""
        return self._mean("recall", False)

    @property
    def mean_tfidf_recall(self) -> float | None:
        return self._mean("tfidf_recall", False)

    @property
    def reversed_recall(self) -> float | None:
        return self._mean("recall", True)

    def to_dict(self) -> dict[str, Any]:
        return {
            "output_dir": str(self.output_dir), "scores": str(self.scores_path), "report_html": str(self.report_html),
            "wandb_run_dir": str(self.wandb_run_dir) if self.wandb_run_dir else None,
            "mean_recall_at_10": self.mean_recall, "mean_tfidf_recall_at_10": self.mean_tfidf_recall,
            "reversed_recall_at_10": self.reversed_recall, "fact_accuracy": self.fact_accuracy,
            "timings_s": self.timings,
            "queries": [q.__dict__ for q in self.queries],
        }


def query_log_probs(model: torch.nn.Module, loader: DataLoader) -> list[float]:
    """The model's ``log p(completion | prompt)`` for each query of ``loader`` (in order)."""
    from lightning_influence.tasks import CausalLMTask

    task, out = CausalLMTask(), []
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            out += task._token_logprobs(model, batch, sample=False).sum(1).tolist()
    model.train(was_training)
    return out


def fact_accuracy(model: torch.nn.Module, dm: "FactsDataModule", max_queries: int = 60) -> tuple[int, int, int, int]:
    """How many questions about planted facts the model answers right (greedy, every completion token).

    Asks up to ``max_queries`` questions from :func:`~lightning_influence.demo.corpus.make_queries`
    (one of them in reversed order). Returns ``(forward_right, forward_total, reversed_right,
    reversed_total)``.
    """
    queries = None
    for n in range(min(max_queries, len(dm.corpus.facts)), 0, -1):
        try:
            queries = make_queries(dm.corpus, n)
            break
        except ValueError:
            continue
    if not queries:
        return 0, 0, 0, 0
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    right = []
    with torch.no_grad():
        for batch in dm.query_dataloader(queries, batch_size=64):
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(batch["input_ids"], batch["attention_mask"]).logits[:, :-1]
            targets = batch["labels"][:, 1:]
            ok = (logits.argmax(-1) == targets) | (targets == -100)
            right += ok.all(dim=1).tolist()
    model.train(was_training)
    fwd = [r for r, q in zip(right, queries) if not q["reversed"]]
    rev = [r for r, q in zip(right, queries) if q["reversed"]]
    return sum(fwd), len(fwd), sum(rev), len(rev)


def evaluate_queries(scores: torch.Tensor, queries: Sequence[dict[str, Any]], train_texts: Sequence[str],
                     supporting: Sequence[Sequence[int] | None], log_probs: Sequence[float] | None = None,
                     top: int = 5, k: int = RECALL_K) -> list[QueryOutcome]:
    """Recall@k of the supporting sequences, under influence and under TF-IDF, per query."""
    texts = [query_text(q) for q in queries]
    tfidf = tfidf_scores(train_texts, texts)
    outcomes = []
    for qi, q in enumerate(queries):
        row = scores[qi]
        sup = list(supporting[qi]) if supporting[qi] is not None else []
        vals, idx = _ranked(row, top)
        outcomes.append(QueryOutcome(
            query_id=str(q.get("query_id", f"q{qi}")), text=texts[qi], fact_id=q.get("fact_id"),
            reversed=bool(q.get("reversed", False)), supporting=sup,
            top=[(int(i), float(v)) for v, i in zip(vals.tolist(), idx.tolist())],
            recall=recall_at_k(row, sup, k) if sup else None, best_rank=best_rank(row, sup),
            tfidf_recall=recall_at_k(tfidf[qi], sup, k) if sup else None, tfidf_best_rank=best_rank(tfidf[qi], sup),
            log_prob=float(log_probs[qi]) if log_probs is not None else None,
        ))
    return outcomes


def _fmt(x: float | None, digits: int = 2) -> str:
    return "  -  " if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _clip(text: str, width: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _score(x: float) -> str:
    return f"{x:+.1f}" if abs(x) < 1e6 else f"{x:+.2e}"


TABLE_WIDTH = 119


def format_query_table(outcome: QueryOutcome, train_texts: Sequence[str], num_train: int | None = None,
                       k: int = RECALL_K, width: int = TABLE_WIDTH) -> str:
    """A readable block for one query: its text, the top training sequences, recall."""
    num_train = len(train_texts) if num_train is None else num_train
    sup = set(outcome.supporting)
    lines = ["=" * width,
             f"Query {outcome.query_id}{'  (REVERSED order)' if outcome.reversed else ''}:  \"{outcome.text}\""]
    info = []
    if outcome.fact_id:
        info.append(f"fact {outcome.fact_id}, stated in {len(sup)} training sequences")
    if outcome.log_prob is not None:
        info.append(f"model log p(completion) = {outcome.log_prob:.2f}")
    if info:
        lines.append("  " + "; ".join(info))
    lines.append(f"  {'rank':>4}  {'score':>10}  {'states fact?':<12}  training sequence")
    text_width = width - 2 - 4 - 2 - 10 - 2 - 12 - 2
    for r, (idx, score) in enumerate(outcome.top, start=1):
        mark = ("YES" if idx in sup else "no") if sup else "?"
        ref = f"[{idx}] "
        lines.append(f"  {r:>4}  {_score(score):>10}  {mark:<12}  {ref}{_clip(train_texts[idx], text_width - len(ref))}")
    if sup:
        lines.append(
            f"  best rank of a sequence stating the fact: {outcome.best_rank} of {num_train};  "
            f"recall@{k}: {round(outcome.recall * len(sup))}/{len(sup)} = {_fmt(outcome.recall)}  "
            f"(TF-IDF: {_fmt(outcome.tfidf_recall)}, best rank {outcome.tfidf_best_rank})")
    return "\n".join(lines)


SCORE_LEGEND = ("score: influence of a training sequence on the model's log p(completion | prompt); positive = "
                "training on it\nmade the answer more likely. 'states fact?': the sequence is one of those that state "
                "the asked fact.")


REVERSAL_NOTE = (
    "The reversed query asks 'description -> name' about a fact that training states only as "
    "'name -> description'.\nIts supporting sequences hardly influence it: the model did not learn the fact in "
    "that direction\n(see its low log p(completion)). This is the reversal-curse finding of Grosse et al. (2023): "
    "influence of\ncorrect-order sequences on a reversed-order query is close to zero. TF-IDF still retrieves them, "
    "because it\nonly matches words; influence tells you what the model actually used."
)


def format_summary(outcomes: Sequence[QueryOutcome], k: int = RECALL_K) -> str:
    """Recall table: influence vs TF-IDF per query, mean over the forward queries."""
    lines = [f"Recall@{k} of the training sequences that state each query's fact",
             f"  {'query':<22} {'influence':>9} {'TF-IDF':>8} {'best rank':>10} {'log p':>7}"]
    for o in outcomes:
        if o.recall is None:
            continue
        lines.append(f"  {o.query_id:<22} {_fmt(o.recall):>9} {_fmt(o.tfidf_recall):>8} {o.best_rank!s:>10} "
                     f"{_fmt(o.log_prob):>7}" + ("   <- reversed order" if o.reversed else ""))
    fwd = [o for o in outcomes if not o.reversed and o.recall is not None]
    if fwd:
        mean = sum(o.recall for o in fwd) / len(fwd)
        mean_tf = sum(o.tfidf_recall for o in fwd) / len(fwd)
        lines.append(f"  {'mean (trained order)':<22} {mean:>9.2f} {mean_tf:>8.2f}")
    if any(o.reversed and o.recall is not None for o in outcomes):
        lines += ["", REVERSAL_NOTE]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- the demo
def _wandb_run_dir(logger) -> Path | None:
    try:
        return Path(logger.experiment.dir).parent  # .../wandb/offline-run-<time>-<id>/files -> the run dir
    except Exception:  # wandb disabled or failed to start: the demo still reports locally
        return None


def run_demo(
    output_dir: str | os.PathLike = "demo_output",
    num_sequences: int | None = None,
    epochs: int | None = None,
    strategy: str = "ekfac",
    quick: bool = False,
    seed: int = 0,
    top_k: int = 10,
    batch_size: int = 16,
    lr: float | None = None,
    num_threads: int | None = 1,
    progress_bar: bool = True,
    echo: Callable[[str], None] = print,
) -> DemoResult:
    """Train a tiny GPT-2 on the planted-fact corpus, fit influence factors, trace the queries.

    Args:
        output_dir: where everything goes (factors, scores, reports, W&B offline run, model).
        num_sequences: corpus size (default 2000; 300 with ``quick``).
        epochs: training epochs (default tuned for the corpus size).
        strategy: ``ekfac`` (default), ``kfac``, ``diagonal`` or ``identity``.
        quick: a small, fast run (tests, a first look).
        seed: corpus and training seed.
        top_k: training examples listed per query in the reports.
        batch_size, lr: training batch size and AdamW peak learning rate (default 1e-2, 5e-3
            with ``quick``: on the small corpus a gentler rate traces facts better).
        num_threads: torch CPU threads while the demo runs (1 is fastest for this tiny
            model, and robust on a busy machine); ``None`` leaves torch's setting alone.
        progress_bar: Lightning's progress bars.
        echo: where the tables are printed.

    Returns:
        A :class:`DemoResult` with the paths and the recall numbers.
    """
    t_start = time.perf_counter()
    if num_sequences is None:
        num_sequences = QUICK_SEQUENCES if quick else FULL_SEQUENCES
    if epochs is None:
        epochs = default_epochs(num_sequences, batch_size, quick)
    if lr is None:
        lr = QUICK_LR if quick else FULL_LR
    old_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        return _run_demo(Path(output_dir), num_sequences, epochs, strategy, seed, top_k, batch_size, lr,
                         progress_bar, echo, t_start)
    finally:
        torch.set_num_threads(old_threads)


def default_epochs(num_sequences: int, batch_size: int = 16, quick: bool = False) -> int:
    """Epochs for the demo: about 750 optimizer steps (400 with ``quick``), 3 to 60 epochs.

    Tuned so that the model has learned the facts but is not overtrained: a model trained
    far past that point still answers the queries, but its influence spreads over
    sequences that merely share the answer word or the question's wording (recall@10 of
    the supporting sequences drops from about 0.8 to about 0.4 at twice the steps).
    """
    steps_per_epoch = max(1, math.ceil(num_sequences / batch_size))
    return max(3, min(60, round((QUICK_STEPS if quick else FULL_STEPS) / steps_per_epoch)))


def _run_demo(out: Path, num_sequences: int, epochs: int, strategy: str, seed: int, top_k: int, batch_size: int,
              lr: float, progress_bar: bool, echo: Callable[[str], None], t_start: float) -> DemoResult:
    import warnings

    from lightning.pytorch.loggers import WandbLogger

    from lightning_influence import InfluenceCallback
    from lightning_influence.text import write_jsonl_queries
    from lightning_influence.integration.pipeline import QuerySet, run_queries
    from lightning_influence.tasks import CausalLMTask

    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    L.seed_everything(seed, verbose=False)
    dm = FactsDataModule(num_sequences=num_sequences, batch_size=batch_size, seed=seed)
    dm.setup("fit")
    corpus, tokenizer = dm.corpus, dm.tokenizer
    queries = dm.queries
    for q in queries:
        q["supporting"] = dm.supporting(q["fact_id"])
    echo(f"Corpus: {len(corpus)} training sequences about {len(corpus.characters)} invented people "
         f"({len(corpus.facts)} planted facts); tokenizer: {len(tokenizer)} tokens, trained locally.")
    echo(f"Queries: {len(queries)} (one asks a fact in the reverse of its trained order). "
         f"Training for {epochs} epochs, then fitting {strategy.upper()} factors.")

    model = TinyGPT2LM(vocab_size=len(tokenizer), lr=lr, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id)
    task = CausalLMTask()
    callback = InfluenceCallback(task=task, strategy=strategy, modules=DEMO_MODULES, output_dir=str(out / "factors"),
                                 seed=seed)
    logger = WandbLogger(offline=True, save_dir=str(out), project="lightning-influence-demo",
                         name=f"demo-{strategy}-{num_sequences}", log_model=False)
    trainer = L.Trainer(max_epochs=epochs, logger=logger, callbacks=[callback], devices=1,
                        enable_checkpointing=False, enable_progress_bar=progress_bar,
                        enable_model_summary=False, log_every_n_steps=10, num_sanity_val_steps=0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*isinstance.*LeafSpec.*")
        t = time.perf_counter()
        trainer.fit(model, datamodule=dm)
        timings["train_and_factors"] = time.perf_counter() - t

    # Everything `lightning-influence score` needs to score again later, without pickle.
    ckpt = out / "model.ckpt"
    trainer.save_checkpoint(ckpt, weights_only=True)  # weights + hyperparameters: for scoring, not resuming
    model_dir = model.save_pretrained(out / "model")
    tokenizer_dir = out / "tokenizer"
    tokenizer.save_pretrained(str(tokenizer_dir))
    train_file = out / "train.jsonl"
    with train_file.open("w", encoding="utf-8") as f:
        for r in corpus.records:
            f.write(json.dumps({"text": r["text"], "kind": r["kind"], "fact_ids": r["fact_ids"]}) + "\n")
    queries_file = write_jsonl_queries(queries, out / "queries.jsonl")

    model.cpu().eval()
    t = time.perf_counter()
    query_set = QuerySet(dm.query_dataloader(queries), [q["query_id"] for q in queries],
                         [query_text(q) for q in queries], [len(q["prompt"].rstrip()) for q in queries])
    scores, _report = run_queries(model, task, callback.factors, query_set, dm.train_dataloader(shuffle=False), out,
                                  tokenizer=tokenizer, top_k=top_k, wandb_run=logger,
                                  title=f"Influence report: tiny GPT-2 on planted facts ({strategy})",
                                  show_progress=progress_bar)
    timings["scoring_and_reports"] = time.perf_counter() - t

    log_probs = query_log_probs(model, dm.query_dataloader(queries))
    outcomes = evaluate_queries(scores, queries, corpus.texts, [q["supporting"] for q in queries], log_probs)
    fwd_ok, fwd_n, rev_ok, rev_n = fact_accuracy(model, dm)
    echo("")
    echo(SCORE_LEGEND)
    for o in outcomes:
        echo(format_query_table(o, corpus.texts))
    echo("=" * TABLE_WIDTH)
    echo(f"Did the model learn the facts? It answers {fwd_ok} of {fwd_n} questions about planted facts correctly "
         f"(greedy, asked in a wording trained only for other people)" + (f", and {rev_ok} of {rev_n} asked in "
                                                                           "reversed order." if rev_n else "."))
    echo(format_summary(outcomes))

    run_dir = _wandb_run_dir(logger)
    result = DemoResult(output_dir=out, factors_dir=out / "factors", scores_path=out / "scores.json",
                        report_html=out / "report.html", report_json=out / "report.json", wandb_run_dir=run_dir,
                        checkpoint=ckpt, model_dir=Path(model_dir), tokenizer_dir=tokenizer_dir,
                        train_texts=train_file, queries_file=queries_file, queries=outcomes, timings=timings,
                        fact_accuracy=(fwd_ok / fwd_n if fwd_n else None))
    try:
        exp = logger.experiment
        exp.summary.update({"demo/mean_recall_at_10": result.mean_recall,
                            "demo/mean_tfidf_recall_at_10": result.mean_tfidf_recall,
                            "demo/reversed_recall_at_10": result.reversed_recall,
                            "demo/fact_accuracy": result.fact_accuracy})
        exp.finish()
    except Exception as err:  # the local outputs are complete without W&B
        echo(f"(W&B summary not written: {err})")
    timings["total"] = time.perf_counter() - t_start
    (out / "demo_summary.json").write_text(json.dumps(result.to_dict(), indent=1, default=str))
    echo("")
    echo(f"Influence scores:  {result.scores_path}")
    echo(f"HTML report:       {result.report_html}")
    if run_dir is not None:
        echo(f"W&B offline run:   {run_dir}   (upload with: wandb sync {run_dir})")
    echo(f"Score again later: lightning-influence score --model lightning_influence.demo.driver:TinyGPT2LM "
         f"--checkpoint {ckpt} --factors {result.factors_dir} --tokenizer {tokenizer_dir} --train_data {train_file} "
         f"--queries {queries_file} --output_dir {out / 'rescored'}")
    echo(f"Done in {timings['total']:.0f} s.")
    return result
