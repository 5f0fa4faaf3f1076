#!/usr/bin/env bash
# The leaderboard of every defense on a 0.5B-1.5B instruct model from the Hugging Face Hub, on one CUDA GPU,
# with the budgets of examples/leaderboard_gpu.yaml (the papers' where they state one; read its comments).
#
#   pip install -e '.[lm-eval]'    # once, in an environment with a CUDA build of torch (this script installs nothing)
#   bash scripts/leaderboard_gpu.sh [immune-trainer leaderboard options]
#   bash scripts/leaderboard_gpu.sh --model Qwen/Qwen2.5-1.5B-Instruct --sweep_trials 8 --sweep_storage sqlite:///lb.db
#
# The judge (HarmBench's classifier) and the gated sets need `huggingface-cli login` where the Hub asks.
# The defenses' models and reports go to outputs/leaderboard_gpu/<gpu>/ (resumable: run the script again after
# an interruption); the tables (leaderboard.md, .csv, .png), the reports and machine.json are then copied to
# benchmarks/results/leaderboard_gpu/<gpu>/, <gpu> being the GPU's name as nvidia-smi gives it, lower-cased.
#
# Environment: IMMUNE_PYTHON (the Python that has the package; default python3), LEADERBOARD_CONFIG (default
# examples/leaderboard_gpu.yaml), LEADERBOARD_WORK (default outputs/leaderboard_gpu/<gpu>).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${IMMUNE_PYTHON:-python3}"
CONFIG="${LEADERBOARD_CONFIG:-$ROOT/examples/leaderboard_gpu.yaml}"

fail() { echo "leaderboard_gpu.sh: $*" >&2; exit 1; }

command -v nvidia-smi >/dev/null 2>&1 || fail "no CUDA GPU: nvidia-smi is not on PATH (this run needs one NVIDIA GPU and its driver)."
GPU_NAME="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 || true)"
[ -n "$GPU_NAME" ] || fail "no CUDA GPU: nvidia-smi lists none."
"$PY" - <<'EOF' || exit 1
import sys
try:
    import torch
except ImportError:
    sys.exit("leaderboard_gpu.sh: no torch in this Python: pip install -e '.[lm-eval]' with a CUDA build of torch.")
if not torch.cuda.is_available():
    sys.exit(f"leaderboard_gpu.sh: no CUDA GPU visible to torch {torch.__version__} (a CPU build, or "
             "CUDA_VISIBLE_DEVICES hides it): install a CUDA build of torch.")
try:
    import immune_trainer  # noqa: F401
except ImportError:
    sys.exit("leaderboard_gpu.sh: immune_trainer is not installed in this Python: pip install -e '.[lm-eval]'.")
EOF
[ -f "$CONFIG" ] || fail "config file $CONFIG does not exist (LEADERBOARD_CONFIG)."

SLUG="$(printf '%s' "$GPU_NAME" | tr '[:upper:]' '[:lower:]' | sed -e 's/[^a-z0-9]\{1,\}/-/g' -e 's/^-//' -e 's/-$//')"
WORK="${LEADERBOARD_WORK:-$ROOT/outputs/leaderboard_gpu/$SLUG}"
RESULTS="$ROOT/benchmarks/results/leaderboard_gpu/$SLUG"
mkdir -p "$WORK" "$RESULTS"

echo "GPU: $GPU_NAME; config: $CONFIG; work: $WORK; tables: $RESULTS"
START="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
SECONDS=0
"$PY" -m immune_trainer.cli leaderboard --config "$CONFIG" --leaderboard_dir "$WORK" "$@"
WALL="$SECONDS"

for f in leaderboard.md leaderboard.csv leaderboard.png leaderboard.json; do
    [ -f "$WORK/$f" ] && cp "$WORK/$f" "$RESULTS/"
done
for report in "$WORK"/*/immunization_report.json; do
    [ -f "$report" ] || continue
    name="$(basename "$(dirname "$report")")"
    mkdir -p "$RESULTS/$name"
    cp "$report" "$RESULTS/$name/"
done
GPU_NAME="$GPU_NAME" START="$START" WALL="$WALL" CONFIG="$CONFIG" "$PY" - "$RESULTS/machine.json" "$@" <<'EOF'
import json, os, platform, sys

import torch

import immune_trainer

out, args = sys.argv[1], sys.argv[2:]
machine = {
    "gpu": os.environ["GPU_NAME"],
    "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
    "torch": torch.__version__,
    "cuda": torch.version.cuda,
    "immune_trainer": getattr(immune_trainer, "__version__", None),
    "python": platform.python_version(),
    "started_utc": os.environ["START"],
    "wall_s": int(os.environ["WALL"]),
    "config": os.path.relpath(os.environ["CONFIG"]),
    "extra_args": args,
}
with open(out, "w", encoding="utf-8") as f:
    json.dump(machine, f, indent=2)
print(f"wrote {out}")
EOF
echo "tables and reports: $RESULTS"
