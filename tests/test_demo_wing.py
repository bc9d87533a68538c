"""The demo is a wing of its own: the library imports nothing from it, its package imports lazily, and
``python -m lightning_influence.demo`` runs the same command as ``lightning-influence demo``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(code: str | None = None, args: list[str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable] + (["-c", code] if code is not None else args)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=REPO)


def test_library_imports_nothing_from_the_demo():
    # Import every library module (all but the demo and the command line, whose `demo`/`score`
    # commands load it on demand) and check that no demo module came along.
    code = """
import importlib, pkgutil, sys
import lightning_influence as li
names = [m.name for m in pkgutil.walk_packages(li.__path__, "lightning_influence.")
         if not m.name.startswith(("lightning_influence.demo", "lightning_influence.cli"))]
for name in names:
    importlib.import_module(name)
# (walk_packages imports the lazy demo package itself to list it; its modules must stay unloaded)
loaded = sorted(m for m in sys.modules if m.startswith("lightning_influence.demo."))
print(len(names), loaded)
assert not loaded, loaded
"""
    out = _run(code)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.split()[0]) > 20  # the walk really imported the library


def test_demo_package_is_lazy_and_exports_its_names():
    code = """
import sys
import lightning_influence.demo as demo
assert not any(m in sys.modules for m in ("lightning", "transformers", "tokenizers")), "eager import"
assert "run_demo" in dir(demo) and "make_queries" in demo.__all__
from lightning_influence.demo import make_queries, generate_corpus, train_tokenizer
assert make_queries.__module__ == "lightning_influence.demo.corpus"
assert train_tokenizer.__module__ == "lightning_influence.demo.tokenizer"
print(len(make_queries(generate_corpus(200, 0), 3)))
"""
    out = _run(code)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "3"


def test_python_m_demo_is_the_demo_command():
    out = _run(args=["-m", "lightning_influence.demo", "--help"])
    assert out.returncode == 0, out.stderr[-2000:]
    assert "demo" in out.stdout and "--quick" in out.stdout and "--output-dir" in out.stdout
