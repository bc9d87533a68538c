# Two commands: `make demo` and `make test`. Both create .venv and install everything.
# torch is installed first, pinned, so that pip takes the CPU wheel instead of a multi-GB
# CUDA build; a torch already present in .venv (e.g. a CUDA build you installed) is kept.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: install test demo bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

test: install
	$(BIN)/python -m pytest -q

demo: install
	$(BIN)/python -m lightning_influence.cli demo

# Benchmarks against Kronfluence in their own environment (.bench-venv); writes docs/benchmarks.md.
# Bergson, for the index benchmark, gets its own (.bergson-venv); without it those rows are skipped.
# `make bench BENCH_ARGS=--quick` for smaller sizes.
bench:
	PYTHON="$(PYTHON)" TORCH_SPEC="$(TORCH_SPEC)" bash benchmarks/setup_env.sh
	PYTHON="$(PYTHON)" TORCH_SPEC="$(TORCH_SPEC)" bash benchmarks/setup_bergson.sh || \
		echo "bench: .bergson-venv could not be made (no network?); the index benchmark skips Bergson's rows"
	.bench-venv/bin/python -m benchmarks.run_all $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
