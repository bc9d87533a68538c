#!/usr/bin/env bash
# Make the benchmark environment .bench-venv: this project (editable) + Kronfluence, pinned, + matplotlib.
# Kronfluence is never a dependency of the library; it lives only here.
#
# Kronfluence declares torchvision, which pip resolves badly (a multi-GB CUDA torch, or a torchvision
# that cannot load beside the CPU torch): torch is pinned on the same command line, and torchvision is
# removed afterwards (Kronfluence never imports it). Reruns are no-ops once the stamp file exists and is
# newer than pyproject.toml and this script.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${BENCH_VENV:-.bench-venv}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
KRONFLUENCE_SPEC="${KRONFLUENCE_SPEC:-kronfluence==1.0.1}"
STAMP="$VENV/.bench-installed"

if [ -f "$STAMP" ] && [ "$STAMP" -nt pyproject.toml ] && [ "$STAMP" -nt benchmarks/setup_env.sh ]; then
    exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "$TORCH_SPEC" "$KRONFLUENCE_SPEC" matplotlib -e .
"$VENV/bin/python" -m pip uninstall -y -q torchvision 2>/dev/null || true
"$VENV/bin/python" -c "import transformers, kronfluence, matplotlib, lightning_influence; print('bench env: torch', __import__('torch').__version__, '| kronfluence', __import__('importlib.metadata').metadata.version('kronfluence'), '| transformers', transformers.__version__)"
touch "$STAMP"
