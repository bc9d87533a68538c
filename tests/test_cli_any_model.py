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
