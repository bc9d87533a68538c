"""The README's Python examples: the self-contained ones run, and every name any of them imports exists."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
MARK = "# readme-example: runs as is"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_the_readme_has_runnable_examples():
    blocks = _python_blocks()
    assert len(blocks) >= 4
    assert any(b.startswith(MARK) for b in blocks)


@pytest.mark.parametrize("index", range(len(_python_blocks())))
def test_every_imported_name_exists(index):
    block = _python_blocks()[index]
    tree = ast.parse(block)  # every block is valid Python
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"README: {node.module} has no {alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                importlib.import_module(alias.name)


def test_attribute_paths_named_in_the_text_exist():
    """Dotted library paths the prose names (`lightning_influence.x.y`) import."""
    text = README.read_text(encoding="utf-8")
    for path in sorted(set(re.findall(r"`(lightning_influence(?:\.\w+)+)", text))):
        parts = path.split(".")
        for cut in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
            except ImportError:
                continue
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
            break


@pytest.mark.parametrize("index", [i for i, b in enumerate(_python_blocks()) if b.startswith(MARK)])
def test_self_contained_examples_run(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    namespace: dict = {"__name__": "readme_example"}
    exec(compile(_python_blocks()[index], f"README.md python block {index}", "exec"), namespace)  # noqa: S102
    report = namespace.get("report")
    if report is not None:  # the quick start: its report went to the offline run
        assert len(report.queries) == 2 and report.queries[0].top_positive
        run_dir = Path(namespace["run"].dir).parent  # <wandb dir>/offline-run-<time>-<id>
        assert run_dir.name.startswith("offline-run-")
        assert list((run_dir / "files" / "media" / "table" / "influence").glob("top_influences_*.table.json"))
