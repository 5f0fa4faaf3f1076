#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv, fetch the embedded model and data, run the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
immune-trainer demo "$@"
