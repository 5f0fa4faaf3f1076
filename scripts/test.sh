#!/usr/bin/env bash
# The test command: set up .venv, lint, run the test suite (the few slow end-to-end tests are left to CI:
# pass -m slow, or any pytest arguments, to choose tests yourself).
# Without arguments the fast tests run in parallel, one pytest-xdist worker per CPU, at most 4 (see
# pytest_xdist_auto_num_workers in tests/conftest.py; PYTEST_XDIST_AUTO_NUM_WORKERS=N chooses N).
# With arguments, add -n auto yourself to run them in parallel.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check .
if [ "$#" -eq 0 ]; then set -- -m "not slow" -n auto; fi
python -m pytest -q "$@"
