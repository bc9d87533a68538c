#!/usr/bin/env bash
# Make Bergson's benchmark environment .bergson-venv: Bergson 2.5.1 with the CPU torch, for
# benchmarks/bergson_side.py (index_bench runs it as a subprocess). Bergson is never a dependency of the
# library, nor of .bench-venv. It does not conflict with Kronfluence's pins (`pip install --dry-run` in
# .bench-venv would only add packages, none changed), but it adds ~20 of its own (peft, bitsandbytes,
# datasets, pyarrow, torchopt, torchvision, torchaudio, ...): apart, .bench-venv stays as it was measured and a
# failed Bergson install cannot break it.
#
# Bergson declares torchvision and torchaudio: torch is pinned on the same command line (so pip takes the CPU
# wheel, not a multi-GB CUDA build), and both are removed afterwards (Bergson never imports them). The worker
# imports only torch, safetensors, datasets and transformers besides Bergson, which brings them all (its
# transformers>=5 resolves to .bench-venv's version). Reruns are no-ops once the stamp file exists and is newer
# than this script.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${BERGSON_VENV:-.bergson-venv}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
BERGSON_SPEC="${BERGSON_SPEC:-bergson==2.5.1}"
STAMP="$VENV/.bergson-installed"

if [ -f "$STAMP" ] && [ "$STAMP" -nt benchmarks/setup_bergson.sh ]; then
    exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "$BERGSON_SPEC" "$TORCH_SPEC"
"$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio 2>/dev/null || true
"$VENV/bin/python" -c "import bergson, torch, transformers, datasets, safetensors; print('bergson env: bergson', bergson.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
touch "$STAMP"
