#!/usr/bin/env bash
# The device checks as one script, for a session lent the GPU machine (its `run` tool, from the repo root):
#   1. the GPU-marked tests (tests/test_gpu.py), 2. the speed benchmark on CUDA (BENCH_DEVICE=cuda, a larger
#   Llama; benchmarks/speed.py), results copied to $OUT. Budget: well under 8 minutes on one H200.
#
# The machine's image has python3 with CUDA torch, lightning, transformers, torchmetrics, safetensors and
# scikit-learn, but not Kronfluence, and nothing can be fetched there. Before the run, here:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl kronfluence==1.0.1
# then run with carry [".whl"]:
#   bash benchmarks/gpu_check.sh
# and copy $OUT/speed-cuda.json to benchmarks/results/ here; `.bench-venv/bin/python -m benchmarks.run_all
# --report-only` then adds section 7 of docs/benchmarks.md.
set -uo pipefail
OUT="${OUT:-/tmp/gpu-check}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 WANDB_MODE=offline
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu.txt"
timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/gpu-tests.log"
tests_rc=${PIPESTATUS[0]}
BENCH_DEVICE=cuda BENCH_THREADS=8 timeout 420 python3 -m benchmarks.speed --no-profile 2>&1 | tee "$OUT/speed-cuda.log"
bench_rc=${PIPESTATUS[0]}
cp benchmarks/results/speed-cuda.json "$OUT/" 2>/dev/null
echo "gpu tests exit $tests_rc, speed benchmark exit $bench_rc"
exit $(( tests_rc != 0 || bench_rc != 0 ))
