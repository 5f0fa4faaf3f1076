#!/usr/bin/env bash
# The test command: set up .venv, lint, run the test suite (the few slow end-to-end tests are left to CI:
# pass -m slow, or any pytest arguments, to choose tests yourself).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check .
if [ "$#" -eq 0 ]; then set -- -m "not slow"; fi
python -m pytest -q "$@"
