"""The command line, the LightningCLI configs and the examples, each run in a reduced size."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning_influence.integration.pipeline import load_scores

from lightning_influence.cli import main, read_train_texts
from lightning_influence.reporting import TABLE_COLUMNS

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    # One torch thread: on a shared 2-core machine, two threads of a tiny model fight for the CPU.
    return {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}


def _load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", REPO / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------ --help
def test_help_texts():
    script = Path(sys.executable).with_name("lightning-influence")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "lightning_influence.cli"]
    out = subprocess.run(cmd + ["--help"], capture_output=True, text=True, env=_env(), timeout=120)
    assert out.returncode == 0, out.stderr
    for command in ("demo", "fit", "score", "lightning-influence demo"):
        assert command in out.stdout
    out = subprocess.run(cmd + ["score", "--help"], capture_output=True, text=True, env=_env(), timeout=120)
    assert out.returncode == 0, out.stderr
    for option in ("--model", "--checkpoint", "--factors", "--queries", "--tokenizer", "--train_data", "--output_dir",
                   "--top_k", "--query_rank", "from_pretrained", "JSONL", "--wandb"):
        assert option in out.stdout
    out = subprocess.run(cmd + ["demo", "--help"], capture_output=True, text=True, env=_env(), timeout=120)
    for option in ("--output-dir", "--num-sequences", "--epochs", "--strategy", "--quick"):
        assert option in out.stdout


def test_bad_arguments_fail_clearly(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        main(["demo", "--epochs", "0"])
    assert err.value.code == 2
    assert "--epochs must be a positive integer" in capsys.readouterr().err
    code = main(["score", "--model", "pkg:Model", "--factors", str(tmp_path / "nope"), "--queries", "q.jsonl",
                 "--tokenizer", str(tmp_path), "--train_data", "t.txt"])
    assert code == 2
    assert "no influence factors" in capsys.readouterr().err


def test_read_train_texts(tmp_path):
    plain = tmp_path / "train.txt"
    plain.write_text("first text\n\nsecond text\n")
    assert read_train_texts(plain) == (["first text", "second text"], None)
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text('{"text": "a", "fact_ids": ["x.pet"]}\n{"text": "b", "fact_ids": []}\n')
    assert read_train_texts(jsonl) == (["a", "b"], [["x.pet"], []])


# ---------------------------------------------------------------------- demo, then score
def test_cli_demo_then_score(tmp_path, capsys):
    demo_dir = tmp_path / "demo"
    run = subprocess.run([sys.executable, "-m", "lightning_influence.cli", "demo", "--quick", "--no-progress-bar",
                          "--output-dir", str(demo_dir)], capture_output=True, text=True, env=_env(), timeout=600,
                         cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "recall@10" in run.stdout and "W&B offline run:" in run.stdout
    assert not (tmp_path / "wandb").exists()  # W&B wrote into --output-dir only
    demo_scores = load_scores(demo_dir).scores

    # The Lightning checkpoint (loaded with weights_only=True) gives the demo's scores back.
    out = tmp_path / "rescored"
    demo_model = ["--model", "lightning_influence.demo.driver:TinyGPT2LM", "--checkpoint", str(demo_dir / "model.ckpt"),
                  "--factors", str(demo_dir / "factors"), "--tokenizer", str(demo_dir / "tokenizer")]
    code = main(["score", *demo_model, "--queries", str(demo_dir / "queries.jsonl"),
                 "--train_data", str(demo_dir / "train.jsonl"), "--output_dir", str(out), "--top_k", "5",
                 "--progress", "false"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "states fact?" in printed and "recall@10" in printed and "TF-IDF" in printed
    scores = load_scores(out).scores
    torch.testing.assert_close(scores, demo_scores, rtol=1e-4, atol=1e-3)
    report = json.loads((out / "report.json").read_text())
    assert [len(q["top_positive"]) for q in report["queries"]] == [5] * 6
    assert (out / "report.html").is_file()

    # Plain-text training data, low-rank queries.
    plain = tmp_path / "train.txt"
    plain.write_text("\n".join(json.loads(line)["text"] for line in (demo_dir / "train.jsonl").read_text().splitlines()))
    out2 = tmp_path / "rescored_lowrank"
    code = main(["score", *demo_model, "--queries", str(REPO / "examples" / "queries.jsonl"),
                 "--train_data", str(plain), "--output_dir", str(out2), "--query_rank", "4"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "Query q0_occupation" in printed
    assert load_scores(out2).scores.shape == (6, 300)
    assert json.loads((out2 / "scores.json").read_text())["query_rank"] == 4


# ------------------------------------------------------------------------- LightningCLI
def test_lightning_cli_with_queries_config(tmp_path):
    (tmp_path / "examples").mkdir()
    shutil.copy(REPO / "examples" / "queries.jsonl", tmp_path / "examples" / "queries.jsonl")
    cmd = [sys.executable, str(REPO / "examples" / "lightning_cli.py"), "fit",
           "--config", str(REPO / "callbacks" / "ekfac-queries.yaml"),
           "--data.num_sequences", "200", "--trainer.max_epochs", "1",
           "--trainer.logger=lightning.pytorch.loggers.WandbLogger",
           "--trainer.logger.init_args.offline=true", f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
           "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    run = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    out = tmp_path / "influence"  # output_dir from the YAML, relative to where it ran
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["strategy"] == "ekfac"
    assert manifest["phase"] == "complete"
    assert all(".transformer.h." in name for name in manifest["modules"])
    assert load_scores(out).scores.shape == (6, 200)
    assert "q5_title_reversed" in (out / "report.html").read_text()
    tables = list((tmp_path / "runs").glob("wandb/offline-run-*/files/media/table/influence/top_influences_*.table.json"))
    assert len(tables) == 1
    assert json.loads(tables[0].read_text())["columns"][:len(TABLE_COLUMNS)] == TABLE_COLUMNS


def test_yaml_configs_parse(tmp_path, monkeypatch):
    """`task` is typed `Task | str`: both a name and a class_path parse from YAML."""
    from lightning.pytorch.cli import LightningCLI

    from lightning_influence import CausalLMTask, ClassificationTask, InfluenceCallback
    from lightning_influence.demo.driver import FactsDataModule, TinyGPT2LM

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning_cli.py"])
    class_path = tmp_path / "class_path.yaml"
    class_path.write_text(
        "trainer:\n  callbacks:\n    - class_path: lightning_influence.InfluenceCallback\n      init_args:\n"
        "        task:\n          class_path: lightning_influence.CausalLMTask\n        strategy: kfac\n")
    expected = {"ekfac.yaml": (CausalLMTask, "ekfac", None), "ekfac-queries.yaml": (CausalLMTask, "ekfac",
                "examples/queries.jsonl"), "kfac-classification.yaml": (ClassificationTask, "kfac", None),
                str(class_path): (CausalLMTask, "kfac", None)}
    for name, (task_type, strategy, queries) in expected.items():
        config = name if os.path.isabs(name) else str(REPO / "callbacks" / name)
        cli = LightningCLI(TinyGPT2LM, FactsDataModule, run=False,
                           args=["--config", config, "--trainer.logger=false", "--trainer.enable_progress_bar=false"])
        (cb,) = [c for c in cli.trainer.callbacks if isinstance(c, InfluenceCallback)]
        assert isinstance(cb.task, task_type) and cb.strategy == strategy and cb.queries == queries, name


def test_kfac_classification_config_fits_factors(tmp_path, monkeypatch):
    from lightning.pytorch.cli import LightningCLI

    digits = _load_example("digits_mislabeled")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning_cli.py"])
    LightningCLI(digits.DigitsMLP, digits.DigitsDataModule,
                 args=["fit", "--config", str(REPO / "callbacks" / "kfac-classification.yaml"),
                       "--trainer.max_epochs=2", "--trainer.logger=false", "--trainer.enable_checkpointing=false",
                       "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"])
    manifest = json.loads((tmp_path / "influence" / "manifest.json").read_text())
    assert manifest["strategy"] == "kfac"
    assert manifest["phase"] == "complete"


# ------------------------------------------------------------------------------ examples
def test_digits_mislabeled_quick(tmp_path, capsys, keep_threads):
    digits = _load_example("digits_mislabeled")
    result = digits.main(["--quick", "--no-progress-bar", "--output-dir", str(tmp_path)])
    assert result["num_flipped"] == 90
    assert result["auc"] > 0.8
    assert result["precision_at_flipped"] > 0.5
    printed = capsys.readouterr().out
    assert "AUC =" in printed and "precision@90" in printed


def test_fact_tracing_quick(tmp_path, capsys, keep_threads):
    tracing = _load_example("fact_tracing")
    result = tracing.main(["--quick", "--no-progress-bar", "--output-dir", str(tmp_path)])
    assert result["mean_recall"] > 0
    assert (tmp_path / "scores.json").is_file() and (tmp_path / "report.html").is_file()
    printed = capsys.readouterr().out
    assert "states fact?" in printed and "mean (trained order)" in printed
