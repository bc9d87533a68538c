"""``lightning-influence fit`` / ``score`` on a model the library has never seen: a tiny Llama.

The Llama is built from a ``LlamaConfig`` and saved with ``save_pretrained`` next to a
tokenizer trained locally; the command line runs in a subprocess, and its scores are checked
against ``fit_factors`` + ``InfluenceModule`` run in this process on the same data.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_influence.cli import build_command_parser, main
from lightning_influence.options import FitOptions, ScoreOptions

REPO = Path(__file__).resolve().parents[1]
NAMES = ["Ada", "Bram", "Cleo", "Dov", "Esme", "Finn"]
JOBS = ["baker", "pilot", "tailor", "miner", "judge", "nurse"]
TRAIN_TEXTS = [f"{NAMES[i % 6]} works as a {JOBS[(i * 5) % 6]} in town {i % 4}." for i in range(20)]
QUERIES = [{"query_id": f"q{i}", "prompt": f"{NAMES[i]} works as a", "completion": f" {JOBS[(i * 5) % 6]}"}
           for i in range(3)]


def _env() -> dict[str, str]:
    return {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    from lightning_influence.demo.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("llama")
    model_dir = root / "model"
    tokenizer = train_tokenizer(TRAIN_TEXTS, vocab_size=300, min_frequency=1, model_max_length=32)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(str(model_dir))  # the CLI finds the tokenizer in the model directory
    train = root / "train.jsonl"
    train.write_text("".join(json.dumps({"text": t}) + "\n" for t in TRAIN_TEXTS))
    queries = root / "queries.jsonl"
    queries.write_text("".join(json.dumps(q) + "\n" for q in QUERIES))
    return root, model_dir, train, queries


def _cli(*args: str) -> subprocess.CompletedProcess:
    run = subprocess.run([sys.executable, "-m", "lightning_influence.cli", *args], capture_output=True, text=True,
                         env=_env(), timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def _in_process_scores(model_dir: Path, train: Path, queries: Path, **fit_options) -> torch.Tensor:
    from torch.utils.data import DataLoader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lightning_influence import CausalLMTask, InfluenceModule, fit_factors
    from lightning_influence.integration.pipeline import load_query_set
    from lightning_influence.text import LMCollator, LMDataset

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    texts = [json.loads(line)["text"] for line in train.read_text().splitlines()]
    loader = DataLoader(LMDataset(texts, tokenizer), batch_size=8, collate_fn=LMCollator(tokenizer.pad_token_id))
    factors = fit_factors(model, CausalLMTask(), loader, **fit_options)
    query_loader = load_query_set(str(queries), tokenizer).loader
    return InfluenceModule(model, task=CausalLMTask(), factors=factors, show_progress=False).pairwise_scores(
        query_loader, loader)


def test_fit_then_score_a_llama_directory(llama):
    from lightning_influence.integration.pipeline import load_scores

    root, model_dir, train, queries = llama
    out = root / "out"
    fit = _cli("fit", "--model", str(model_dir), "--train_data", str(train), "--output_dir", str(out),
               "--strategy", "ekfac", "--fisher", "empirical", "--progress", "false")
    assert "Influence factors" in fit.stdout
    assert (out / "factors" / "manifest.json").is_file()
    score = _cli("score", "--model", str(model_dir), "--train_data", str(train), "--queries", str(queries),
                 "--output_dir", str(out), "--top_k", "3", "--wandb", "offline", "--progress", "false")
    assert "Query q0" in score.stdout and "most negative" in score.stdout

    expected = _in_process_scores(model_dir, train, queries, strategy="ekfac", fisher="empirical")
    saved = load_scores(out)
    assert saved.query_ids == ["q0", "q1", "q2"]
    scale = float(expected.abs().max())
    assert scale > 0
    torch.testing.assert_close(saved.scores, expected, rtol=1e-4, atol=1e-5 * scale)

    report = json.loads((out / "report.json").read_text())
    for qi, q in enumerate(report["queries"]):
        assert q["top_positive"][0]["train_index"] == int(expected[qi].argmax())
        assert q["top_positive"][0]["text"] == TRAIN_TEXTS[int(expected[qi].argmax())]
    assert (out / "report.html").is_file()
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    tables = list((runs[0] / "files" / "media" / "table" / "influence").glob("top_influences_*.table.json"))
    assert len(tables) == 1
    rows = json.loads(tables[0].read_text())["data"]
    assert len(rows) == sum(len(q["top_positive"]) + len(q["top_negative"]) for q in report["queries"])


def test_a_yaml_config_and_an_options_flag_reach_the_fit(llama, tmp_path):
    """--config (LightningCLI-style YAML) and a FitOptions flag (kfac, max_examples) change what is fitted."""
    from lightning_influence.factors import InfluenceFactors

    root, model_dir, train, queries = llama
    config = tmp_path / "fit.yaml"
    config.write_text(f"model: {model_dir}\ntrain_data: {train}\noutput_dir: {tmp_path / 'out'}\n"
                      "strategy: kfac\nmax_examples: 12\nprogress: false\n")
    assert main(["fit", "--config", str(config), "--stats_dtype", "float32"]) == 0
    factors = InfluenceFactors.load(tmp_path / "out" / "factors")
    assert factors.strategy == "kfac"
    assert factors.metadata["identity"]["options"]["max_examples"] == 12
    assert factors.metadata["identity"]["options"]["stats_dtype"] == "float32"


def test_help_lists_every_option_field():
    """The flags are generated from the option dataclasses: a new field is a new flag."""
    for command, cls in (("fit", FitOptions), ("score", ScoreOptions)):
        text = build_command_parser(command).format_help()
        for field in dataclasses.fields(cls):
            assert f"--{field.name}" in text, (command, field.name)
        for flag in ("--model", "--checkpoint", "--model_attr", "--task", "--train_data", "--tokenizer",
                     "--output_dir", "--config"):
            assert flag in text


def test_bad_values_fail_before_loading(tmp_path, capsys):
    assert main(["fit", "--model", str(tmp_path / "missing"), "--train_data", "x.jsonl", "--strategy", "nope"]) == 2
    assert "unknown strategy" in capsys.readouterr().err
    assert main(["fit", "--model", str(tmp_path / "missing"), "--train_data", "x.jsonl"]) == 2
    assert "neither a from_pretrained directory nor package.module:Class" in capsys.readouterr().err
    assert main(["score", "--model", "x:Y", "--train_data", "x.jsonl", "--queries", "q.jsonl",
                 "--output_dir", str(tmp_path)]) == 2
    assert "no influence factors in" in capsys.readouterr().err


def test_a_class_with_a_checkpoint_and_function_data(tmp_path):
    """--model package.module:Class + --checkpoint + --model_attr, data and queries from functions: dense check."""
    from lightning_influence.factors import InfluenceFactors
    from lightning_influence.integration.pipeline import load_scores

    from . import cli_models, dense
    from .test_scores_dense import ce_loss, ce_measure

    model = cli_models.save_checkpoint(tmp_path / "weights.pt")
    common = ["--model", "tests.cli_models:WrappedMLP", "--checkpoint", str(tmp_path / "weights.pt"),
              "--model_attr", "net", "--task", "classification", "--train_data", "tests.cli_models:train_loader",
              "--output_dir", str(tmp_path / "out"), "--progress", "false"]
    assert main(["fit", *common, "--fisher", "empirical", "--capture_dtype", "float64"]) == 0
    assert list(InfluenceFactors.load(tmp_path / "out" / "factors").layers) == ["0", "2"]  # not the unused head
    assert main(["score", *common, "--queries", "tests.cli_models:query_loader", "--score_dtype", "float64",
                 "--top_k", "2"]) == 0
    x, y = cli_models.train_loader().dataset.tensors
    qx, qy = cli_models.query_loader().dataset.tensors
    net = model.net
    expected = dense.dense_scores("ekfac", net, {"0": net[0], "2": net[2]}, ce_loss, ce_measure, (x, y), (qx, qy))
    torch.testing.assert_close(load_scores(tmp_path / "out").scores, expected, rtol=1e-6,
                               atol=1e-9 * float(expected.abs().max()))


def test_classification_from_a_directory_and_labelled_jsonl(llama, tmp_path):
    """--task classification loads AutoModelForSequenceClassification and reads {"text", "label"} lines."""
    from torch.utils.data import DataLoader
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, LlamaForSequenceClassification

    from lightning_influence import ClassificationTask, InfluenceModule, fit_factors
    from lightning_influence.cli import LabelledTexts
    from lightning_influence.integration.pipeline import load_scores

    root, model_dir, _, _ = llama
    cls_dir = tmp_path / "classifier"
    config = LlamaForSequenceClassification.config_class.from_pretrained(str(model_dir))
    config.num_labels = 3
    torch.manual_seed(1)
    LlamaForSequenceClassification(config).save_pretrained(cls_dir)
    AutoTokenizer.from_pretrained(str(model_dir)).save_pretrained(str(cls_dir))
    records = [{"text": t, "label": i % 3} for i, t in enumerate(TRAIN_TEXTS[:12])]
    train = tmp_path / "labelled.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in records))
    queries = tmp_path / "labelled_queries.jsonl"
    queries.write_text("".join(json.dumps({"query_id": f"c{i}", "text": TRAIN_TEXTS[i + 12], "label": i % 3}) + "\n"
                               for i in range(2)))
    common = ["--model", str(cls_dir), "--task", "classification", "--train_data", str(train),
              "--output_dir", str(tmp_path / "out"), "--progress", "false"]
    assert main(["fit", *common, "--fisher", "empirical"]) == 0
    assert main(["score", *common, "--queries", str(queries)]) == 0

    model = AutoModelForSequenceClassification.from_pretrained(str(cls_dir)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(cls_dir))
    train_set = LabelledTexts(records, tokenizer, "classification")
    query_set = LabelledTexts([json.loads(line) for line in queries.read_text().splitlines()], tokenizer,
                              "classification")
    loader = DataLoader(train_set, batch_size=8, collate_fn=train_set.collate)
    factors = fit_factors(model, ClassificationTask(), loader, fisher="empirical")
    expected = InfluenceModule(model, task=ClassificationTask(), factors=factors, show_progress=False).pairwise_scores(
        DataLoader(query_set, batch_size=8, collate_fn=query_set.collate), loader)
    saved = load_scores(tmp_path / "out")
    assert saved.query_ids == ["c0", "c1"]
    torch.testing.assert_close(saved.scores, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
