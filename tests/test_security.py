"""Nothing we load can run code, and no secret reaches our files or logs."""

import re
from pathlib import Path

import wandb

from lightning_influence.integration.pipeline import run_queries

from .test_pipeline import case  # noqa: F401  (fixture)

LIBRARY = Path(__file__).resolve().parents[1] / "lightning_influence"


def test_library_never_unpickles():
    offenders = []
    for path in LIBRARY.rglob("*.py"):
        text = path.read_text()
        if re.search(r"^\s*import pickle|^\s*from pickle|cloudpickle|dill", text, re.M):
            offenders.append(f"{path.name}: pickle import")
        for call in re.finditer(r"torch\.load\(([^)]*)\)", text):
            if "weights_only=True" not in call.group(1):
                offenders.append(f"{path.name}: {call.group(0)}")
    assert not offenders, offenders


def test_outputs_hold_no_secret_and_no_pickle(case, tmp_path, monkeypatch):  # noqa: F811
    secret = "0123456789abcdef0123456789abcdef01234567"
    monkeypatch.setenv("WANDB_API_KEY", secret)
    monkeypatch.setenv("WANDB_MODE", "offline")
    model, task, factors, tl, qs, _ = case
    factors.save(tmp_path / "factors")
    run = wandb.init(mode="offline", dir=str(tmp_path), project="security-test")
    try:
        run_queries(model, task, factors, qs, tl, tmp_path / "scores", top_k=2, wandb_run=run)
    finally:
        run.finish()
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files)
    ours = [p for p in files if "wandb" not in p.parts]
    assert not [p for p in ours if p.suffix in (".pt", ".pth", ".pkl", ".pickle", ".ckpt")]
    leaks = [str(p) for p in files if secret.encode() in p.read_bytes()]
    assert not leaks, f"the API key was written to {leaks}"
