#!/usr/bin/env bash
# Create .venv (if needed) and install immune_trainer with everything the demo and the tests need.
# The CPU build of torch is installed first, so that no CUDA build of several GB is pulled in.
# --no-compile: pip would byte-compile every installed module (torch and transformers hold thousands),
# about 45 s on a 2-core machine; Python compiles the few hundred a run imports when it first imports
# them (about 4 s, once).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
if ! python -c "import torch" >/dev/null 2>&1; then
  # On a machine with CUDA, install the torch build you want before running this script.
  python -m pip install --quiet --no-compile "torch==2.13.0"
fi
python -m pip install --quiet --no-compile -e ".[dev,demo]"
