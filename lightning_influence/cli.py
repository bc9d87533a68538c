"""The ``lightning-influence`` command: the demo, and fitting and scoring any model.

``lightning-influence demo`` trains a tiny GPT-2 on a synthetic corpus of invented people
and facts, fits EK-FAC influence factors while training, and shows which training
sentences made the model answer each question.

``lightning-influence fit`` and ``lightning-influence score`` work on any model, in the
conventions of LightningCLI (jsonargparse: ``--name value`` flags with underscores,
``--config file.yaml``, ``--print_config``): the model is a transformers ``from_pretrained``
directory or ``package.module:Class`` (plus a Lightning checkpoint), the training data a JSONL
file or ``package.module:function`` returning a DataLoader, and every field of
:class:`~lightning_influence.options.FitOptions` / :class:`~lightning_influence.options.ScoreOptions`
is a flag, generated from the dataclasses so that the two never drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import re
import sys
import typing
from pathlib import Path
from typing import Any, List, Literal, Optional, Sequence

__all__ = ["main", "build_parser", "build_command_parser", "read_train_texts", "load_model", "load_tokenizer",
           "train_loader_from", "option_flags"]

_MAIN_DESCRIPTION = """\
Influence functions for PyTorch Lightning: which training examples made my model do this?

Start with the demo (about a minute on a laptop CPU, no download, no W&B account):

    lightning-influence demo

It trains a tiny GPT-2 on made-up facts ("Oswin Pelleck works as a clockmaker."), asks it
questions about them, and lists for each answer the training sentences with the largest
influence on it.

For your own model (a transformers directory or package.module:Class plus a checkpoint):

    lightning-influence fit   --model DIR --train_data train.jsonl --output_dir out
    lightning-influence score --model DIR --train_data train.jsonl --queries queries.jsonl --output_dir out

`lightning-influence fit --help` and `lightning-influence score --help` list every option.
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

    # fit and score have their own (jsonargparse) parsers; main() hands them their arguments.
    sub.add_parser("fit", help="fit influence factors for any model (--help for the options)", add_help=False)
    sub.add_parser("score", help="score training data against queries with fitted factors, write the reports",
                   add_help=False)
    return parser



TASKS = ("causal_lm", "classification", "regression")

_FIT_DESCRIPTION = """\
Fit influence factors (EK-FAC by default) for a trained model on its training data, and save
them to OUTPUT_DIR/factors (safetensors + a JSON manifest) for `lightning-influence score`.

The model: --model DIR (a transformers from_pretrained directory: AutoModelForCausalLM for
--task causal_lm, AutoModelForSequenceClassification otherwise) or --model package.module:Class
with --checkpoint a Lightning checkpoint (Class.load_from_checkpoint, weights only) or a state
dict; --model_attr names the attribute holding the network when Class wraps it.

The data: --train_data FILE.jsonl, one {"text": ...} per line (plus "label" for classification
and regression), tokenised with the model directory's tokenizer or --tokenizer DIR; or
--train_data package.module:function returning a DataLoader (called without arguments).
The examples are read in file order, never shuffled.
"""

_SCORE_DESCRIPTION = """\
Score the training data against queries with factors fitted earlier (by `fit`, the
InfluenceCallback or fit_factors), and write to OUTPUT_DIR: scores.json (+ its tensor file),
report.json, report.html (open it in a browser), the query gradients (queries/) and, with
--wandb offline, a W&B run under OUTPUT_DIR/wandb (upload it later with `wandb sync`).

Model and data flags are those of `fit`; give the same values. Queries: --queries FILE.jsonl
with {"prompt": ..., "completion": ...} per line for causal_lm (influence on
log p(completion | prompt)), {"text": ..., "label": ...} for classification and regression,
or package.module:function returning a DataLoader of query batches.
"""


def _docstring_args(cls: type) -> dict[str, str]:
    """``name: text`` entries of a class docstring's ``Args:`` section (``a / b:`` names both)."""
    doc = (cls.__doc__ or "").split("Args:", 1)
    if len(doc) < 2:
        return {}
    out: dict[str, str] = {}
    names: list[str] = []
    for line in doc[1].splitlines():
        m = re.match(r"\s{4,8}([\w /]+):\s*(.*)", line)
        if m and not line.startswith(" " * 12):
            names = [n.strip() for n in m.group(1).split("/")]
            for n in names:
                out[n] = m.group(2).strip()
        elif line.strip() and names:
            for n in names:
                out[n] += " " + line.strip()
    return {k: v.replace("``", "") for k, v in out.items()}


def _flag_type(hint: Any) -> Any:
    """The command-line type of an option's annotation: dtypes by name, classes by import path."""
    import torch

    if hint is torch.dtype:
        return str
    args = typing.get_args(hint)
    if any(typing.get_origin(a) is tuple and typing.get_args(a)[:1] == (type,) for a in args):
        return Optional[List[str]]  # module_types: "torch.nn.Linear" import paths
    return hint


def option_flags(cls: type) -> list[tuple[str, Any, Any, str]]:
    """``(name, type, default, help)`` of every field of an options dataclass, for the command line."""
    import torch

    hints = typing.get_type_hints(cls)
    docs = _docstring_args(cls)
    flags = []
    for f in dataclasses.fields(cls):
        default = f.default
        if default is dataclasses.MISSING:
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        if isinstance(default, torch.dtype):
            default = str(default).removeprefix("torch.")
        flags.append((f.name, _flag_type(hints[f.name]), default, docs.get(f.name, f"{cls.__name__}.{f.name}")))
    return flags


def _options_from(cls: type, cfg: Any) -> Any:
    """The options dataclass built from the parsed flags (validated by its own ``__post_init__``)."""
    values = {name: cfg[name] for name, *_ in option_flags(cls)}
    if values.get("module_types") is not None:
        values["module_types"] = [_import_object(path, "--module_types") for path in values["module_types"]]
    return cls(**values)


def build_command_parser(command: str):
    """The jsonargparse parser of ``fit`` or ``score`` (model, data, options, output)."""
    from jsonargparse import ActionConfigFile, ArgumentParser, DefaultHelpFormatter

    from lightning_influence.options import FitOptions, ScoreOptions

    class Formatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
        """jsonargparse's help, with the description's line breaks kept."""

    description = _FIT_DESCRIPTION if command == "fit" else _SCORE_DESCRIPTION
    parser = ArgumentParser(prog=f"lightning-influence {command}", description=description,
                            epilog=_QUERY_FORMAT if command == "score" else None, formatter_class=Formatter)
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file of these options (--print_config "
                                                                   "writes one)")
    model = parser.add_argument_group("model")
    model.add_argument("--model", type=str, required=True,
                       help="a transformers from_pretrained directory, or package.module:Class")
    model.add_argument("--checkpoint", type=Optional[str], default=None,
                       help="with --model package.module:Class: a Lightning checkpoint (.ckpt) or a state dict")
    model.add_argument("--model_attr", type=Optional[str], default=None,
                       help="attribute of the loaded model holding the network the task calls")
    model.add_argument("--task", type=Literal[TASKS], default="causal_lm",
                       help="causal_lm (log p(completion | prompt)), classification (log p(label | text)) or "
                            "regression (Gaussian log-likelihood)")
    data = parser.add_argument_group("data")
    data.add_argument("--train_data", type=str, required=True,
                      help='JSONL, one {"text": ...} per line ("label" too for classification/regression), or '
                           "package.module:function returning a DataLoader")
    data.add_argument("--tokenizer", type=Optional[str], default=None,
                      help="tokenizer directory (default: the --model directory)")
    data.add_argument("--max_length", type=Optional[int], default=None,
                      help="cut training texts to this many tokens, as in training (default: the tokenizer's "
                           "model_max_length, else no cut)")
    data.add_argument("--batch_size", type=int, default=8, help="examples per batch")
    if command == "score":
        data.add_argument("--queries", type=str, required=True,
                          help='JSONL of {"prompt", "completion"} (causal_lm) or {"text", "label"}, or '
                               "package.module:function returning a DataLoader of query batches")
        data.add_argument("--factors", type=Optional[str], default=None,
                          help="the fitted factors' directory (default: OUTPUT_DIR/factors, where fit puts them)")
    out = parser.add_argument_group("output")
    out.add_argument("--output_dir", type=str, default="influence_output",
                     help="where factors (fit) or scores and reports (score) are written")
    out.add_argument("--device", type=Optional[str], default=None, help="e.g. cuda:0 (default: cuda when available)")
    out.add_argument("--progress", type=bool, default=True, help="show progress bars")
    if command == "score":
        out.add_argument("--wandb", type=Literal["none", "offline", "online"], default="none",
                         help="also log the report to a W&B run in OUTPUT_DIR/wandb (offline: upload later with "
                              "`wandb sync`)")
        out.add_argument("--wandb_project", type=str, default="lightning-influence", help="the W&B project")
        out.add_argument("--title", type=str, default="Influence report", help="title of report.html")
    cls = FitOptions if command == "fit" else ScoreOptions
    group = parser.add_argument_group(f"{cls.__name__} (lightning_influence.options.{cls.__name__})")
    for name, flag_type, default, help_text in option_flags(cls):
        try:
            group.add_argument(f"--{name}", type=flag_type, default=default, help=help_text)
        except ValueError:  # a type jsonargparse cannot parse: the dataclass validates the value instead
            group.add_argument(f"--{name}", type=Optional[str], default=default, help=help_text)
    return parser


def _import_object(spec: str, flag: str) -> Any:
    module_name, sep, attr = spec.partition(":")
    if not sep:
        module_name, _, attr = spec.rpartition(".")
    try:
        obj = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"{flag} {spec!r}: cannot import {attr!r} from {module_name!r} ({err})") from None
    return obj


def load_model(spec: str, task: str = "causal_lm", checkpoint: str | None = None, model_attr: str | None = None):
    """The model ``spec`` names, in eval mode: a ``from_pretrained`` directory or ``package.module:Class``.

    A directory (with ``config.json``) is loaded with ``AutoModelForCausalLM`` for ``causal_lm``,
    ``AutoModelForSequenceClassification`` otherwise, from local files only. ``Class`` is loaded
    with ``Class.load_from_checkpoint(checkpoint, weights_only=True)`` for a LightningModule, else
    built with ``Class()`` and given the checkpoint's ``state_dict``. ``model_attr`` then picks
    the network the task calls (as the callback's ``model_attr``).
    """
    import torch

    path = Path(spec)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"--model {spec}: a directory without config.json is not a from_pretrained model")
        if checkpoint is not None:
            raise ValueError("--checkpoint goes with --model package.module:Class; a from_pretrained directory "
                             "holds its own weights")
        import transformers

        auto = transformers.AutoModelForCausalLM if task == "causal_lm" else \
            transformers.AutoModelForSequenceClassification
        model = auto.from_pretrained(str(path), local_files_only=True)
    elif ":" in spec:
        cls = _import_object(spec, "--model")
        if checkpoint is not None and not Path(checkpoint).is_file():
            raise FileNotFoundError(f"--checkpoint {checkpoint}: file not found")
        import lightning as L

        if isinstance(cls, type) and issubclass(cls, L.LightningModule) and checkpoint is not None:
            model = cls.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True)
        else:
            model = cls()
            if checkpoint is not None:
                state = torch.load(checkpoint, map_location="cpu", weights_only=True)
                model.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
    else:
        raise FileNotFoundError(f"--model {spec!r} is neither a from_pretrained directory nor package.module:Class")
    if model_attr is not None:
        network = getattr(model, model_attr, None)
        if not isinstance(network, torch.nn.Module):
            raise ValueError(f"--model_attr {model_attr!r}: {type(model).__name__} has no module attribute of that name")
        model = network
    return model.eval()


def load_tokenizer(directory: str | os.PathLike):
    """A tokenizer saved with ``save_pretrained`` (local files only); a missing pad token is the EOS token."""
    from transformers import AutoTokenizer

    if not _has_tokenizer(directory):
        raise FileNotFoundError(f"no tokenizer in {directory} (expected tokenizer.json or tokenizer_config.json); "
                                "pass --tokenizer DIR")
    tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out of every statistic and score
    return tokenizer


class LabelledTexts:
    """``{"text", "label"}`` records tokenised for sequence classification or regression.

    Items are ``{"input_ids", "attention_mask", "labels"}``; batch them with :meth:`collate`.
    """

    def __init__(self, records: Sequence[dict], tokenizer, task: str, max_length: int | None = None,
                 source: str = "data"):
        self.texts, self.labels = [], []
        for n, r in enumerate(records):
            if not isinstance(r.get("text"), str) or "label" not in r:
                raise ValueError(f"{source}: record {n} needs a string \"text\" and a \"label\" for --task {task}")
            self.texts.append(r["text"])
            self.labels.append(int(r["label"]) if task == "classification" else float(r["label"]))
        self.task = task
        self.tokenizer = tokenizer
        self.input_ids = [tokenizer(t, truncation=max_length is not None, max_length=max_length)["input_ids"]
                          for t in self.texts]
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.query_ids = [str(r.get("query_id", f"q{n}")) for n, r in enumerate(records)]

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.input_ids[i], "labels": self.labels[i]}

    def collate(self, items: Sequence[dict]) -> dict:
        import torch

        width = max(len(it["input_ids"]) for it in items)
        ids = torch.full((len(items), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for j, it in enumerate(items):
            ids[j, :len(it["input_ids"])] = torch.tensor(it["input_ids"], dtype=torch.long)
            mask[j, :len(it["input_ids"])] = 1
        dtype = torch.long if self.task == "classification" else torch.float32
        return {"input_ids": ids, "attention_mask": mask,
                "labels": torch.tensor([it["labels"] for it in items], dtype=dtype)}


def _read_jsonl(path: Path) -> list[dict]:
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:line {n}: not valid JSON ({err.msg})") from None
    return records


def train_loader_from(spec: str, task: str, tokenizer, batch_size: int = 8, max_length: int | None = None):
    """The training DataLoader: a JSONL/text file tokenised with ``tokenizer``, or ``package.module:function``."""
    from torch.utils.data import DataLoader

    if ":" in spec and not Path(spec).exists():
        loader = _import_object(spec, "--train_data")()
        if not isinstance(loader, DataLoader):
            raise ValueError(f"--train_data {spec!r} returned {type(loader).__name__}, not a DataLoader")
        return loader
    if tokenizer is None:
        raise ValueError(f"--train_data {spec} is a text file, which needs a tokenizer: pass --tokenizer DIR or a "
                         "--model directory holding one")
    if task == "causal_lm":
        from lightning_influence.text import LMCollator, LMDataset

        texts, _ = read_train_texts(spec)
        return DataLoader(LMDataset(texts, tokenizer, max_length=max_length), batch_size=batch_size,
                          collate_fn=LMCollator(tokenizer.pad_token_id))
    if not Path(spec).is_file():
        raise FileNotFoundError(f"training data file not found: {spec}")
    dataset = LabelledTexts(_read_jsonl(Path(spec)), tokenizer, task, max_length, source=spec)
    return DataLoader(dataset, batch_size=batch_size, collate_fn=dataset.collate)


def _query_set(spec: str, task: str, tokenizer):
    from torch.utils.data import DataLoader

    from lightning_influence.integration.pipeline import QuerySet, load_query_set

    if task == "causal_lm" or (":" in spec and not Path(spec).exists()):
        return load_query_set(spec, tokenizer)
    if tokenizer is None:
        raise ValueError(f"--queries {spec} is a JSONL file, which needs a tokenizer (--tokenizer DIR)")
    if not Path(spec).is_file():
        raise FileNotFoundError(f"query file not found: {spec}")
    dataset = LabelledTexts(_read_jsonl(Path(spec)), tokenizer, task, source=spec)
    loader = DataLoader(dataset, batch_size=8, collate_fn=dataset.collate)
    return QuerySet(loader, dataset.query_ids, list(dataset.texts))


def _task(name: str):
    from lightning_influence.tasks import CausalLMTask, ClassificationTask, RegressionTask

    return {"causal_lm": CausalLMTask, "classification": ClassificationTask, "regression": RegressionTask}[name]()


def _has_tokenizer(directory: str | os.PathLike) -> bool:
    return Path(directory, "tokenizer_config.json").is_file() or Path(directory, "tokenizer.json").is_file()


def _model_and_data(cfg: Any):
    """The model, the tokenizer (``--tokenizer``, else the model directory's, else none) and the training loader."""
    model = load_model(cfg.model, cfg.task, cfg.checkpoint, cfg.model_attr)
    tokenizer = None
    if cfg.tokenizer is not None:
        tokenizer = load_tokenizer(cfg.tokenizer)
    elif Path(cfg.model).is_dir() and _has_tokenizer(cfg.model):
        tokenizer = load_tokenizer(cfg.model)
    return model, tokenizer, train_loader_from(cfg.train_data, cfg.task, tokenizer, cfg.batch_size, cfg.max_length)


def _device(name: str | None):
    import torch

    return torch.device(name) if name else torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cmd_fit(cfg: Any) -> int:
    from lightning_influence.options import FitOptions
    from lightning_influence.passes import fit_factors

    options = _options_from(FitOptions, cfg)  # checked before anything is loaded
    model, _, loader = _model_and_data(cfg)
    device = _device(cfg.device)
    factors_dir = Path(cfg.output_dir) / "factors"
    print(f"Fitting {options.strategy} factors on {len(loader.dataset)} training examples", flush=True)
    factors = fit_factors(model.to(device), _task(cfg.task), loader, options, device=device,
                          output_dir=str(factors_dir))
    print(f"Influence factors ({len(factors.layers)} layers): {factors_dir}")
    return 0


def cmd_score(cfg: Any) -> int:
    import torch

    from lightning_influence.factors import InfluenceFactors
    from lightning_influence.integration.module import InfluenceModule
    from lightning_influence.options import ScoreOptions

    options = _options_from(ScoreOptions, cfg)  # checked before anything is loaded
    out = Path(cfg.output_dir)
    factors_dir = Path(cfg.factors) if cfg.factors else out / "factors"
    if not (factors_dir / "manifest.json").is_file():
        raise FileNotFoundError(f"no influence factors in {factors_dir} (expected manifest.json); run "
                                "`lightning-influence fit` with this --output_dir first, or pass --factors DIR")
    model, tokenizer, loader = _model_and_data(cfg)
    model = model.to(_device(cfg.device))
    factors = InfluenceFactors.load(factors_dir)
    queries = _query_set(cfg.queries, cfg.task, tokenizer)
    module = InfluenceModule(model, task=_task(cfg.task), factors=factors, options=options, show_progress=cfg.progress)
    print(f"Scoring {len(loader.dataset)} training examples against {len(queries.ids)} queries "
          f"({factors.strategy} factors from {factors_dir})", flush=True)
    run = None
    if cfg.wandb != "none":
        import wandb

        out.mkdir(parents=True, exist_ok=True)
        run = wandb.init(mode=cfg.wandb, dir=str(out), project=cfg.wandb_project,
                         config={"command": "score", **options.to_json(), "strategy": factors.strategy})
    try:
        report = module.report(queries, loader, tokenizer=tokenizer, wandb=run if run is not None else False,
                               output_dir=out, title=cfg.title)
    finally:
        if run is not None:
            run.finish()
    _print_report(report, cfg, torch)
    print(f"\nInfluence scores: {out / 'scores.json'}\nHTML report:      {out / 'report.html'}")
    if run is not None:
        print(f"W&B run:          {Path(run.dir).parent}")
    return 0


def _print_report(report: Any, cfg: Any, torch: Any) -> None:
    """The demo's tables when queries name their supporting examples, else each query's top list."""
    records = None
    if cfg.task == "causal_lm" and Path(cfg.queries).is_file() and Path(cfg.train_data).is_file():
        from lightning_influence.text import read_jsonl_queries

        records = read_jsonl_queries(cfg.queries)
        texts, fact_ids = read_train_texts(cfg.train_data)
        supporting = _supporting(records, fact_ids, len(texts))
    if records is not None and any(s is not None for s in supporting):
        from lightning_influence.demo.driver import SCORE_LEGEND, TABLE_WIDTH, evaluate_queries, format_query_table, \
            format_summary

        outcomes = evaluate_queries(torch.as_tensor(report.scores).to(torch.float64), records, texts, supporting,
                                    None)
        print()
        print(SCORE_LEGEND)
        for o in outcomes:
            print(format_query_table(o, texts))
        print("=" * TABLE_WIDTH)
        print(format_summary(outcomes))
        return
    for q in report.queries:
        print(f"\nQuery {q.query_id}: {q.query_text}")
        for direction, entries in (("most positive", q.top_positive), ("most negative", q.top_negative)):
            print(f"  {direction} ({len(entries)} listed):")
            for e in entries:
                print(f"    #{e.rank} train {e.train_index}  score {e.score:+.4g}  {(e.text or '')[:70]!r}")


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


# ------------------------------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> int:
    from lightning_influence.demo.driver import run_demo

    run_demo(output_dir=args.output_dir, num_sequences=args.num_sequences, epochs=args.epochs,
             strategy=args.strategy, quick=args.quick, seed=args.seed, top_k=args.top_k,
             progress_bar=not args.no_progress_bar)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lightning-influence`` (and ``python -m lightning_influence.cli``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if argv and argv[0] in ("fit", "score"):
        command = argv[0]
        parser = build_command_parser(command)
        cfg = parser.parse_args(argv[1:])
        run = cmd_fit if command == "fit" else cmd_score
    else:
        parser = build_parser()
        args = parser.parse_args(argv)
        for name in ("num_sequences", "epochs", "top_k"):
            value = getattr(args, name, None)
            if value is not None and value < 1:
                parser.error(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
        command, cfg, run = args.command, args, cmd_demo
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    from lightning_influence.errors import InfluenceError

    try:
        return run(cfg)
    except (FileNotFoundError, ValueError, InfluenceError, MisconfigurationException) as err:
        print(f"lightning-influence {command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
