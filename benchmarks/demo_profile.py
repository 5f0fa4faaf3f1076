"""Profile ``immune-trainer demo``: seconds per stage and per pass, tokens processed, achieved GFLOP/s.

Runs the demo in this process with a counter on the model's forward pass and splits the run into the
stages the demo announces (its progress lines). For each stage it reports wall time, forward passes of
training (grad enabled, model in train mode) and of evaluation, tokens through each, an estimate of the
FLOPs done (forward 2 P per token plus attention, backward twice the forward), and the achieved GFLOP/s
against the machine's float32 matmul peak measured in the same run (a large ``torch.mm``).

    python benchmarks/demo_profile.py [--json OUT.json] [-- DEMO ARGS...]

Prints a table and writes JSON (default ``benchmarks/results/demo_profile_<cpu>.json``). The demo's own
output goes to ``--output_dir`` as usual (default ``demo_output_profile``).
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path


def cpu_description() -> dict:
    """The CPU model, core count and vector extensions (from lscpu), for stating where a time came from."""
    info = {"machine": platform.machine(), "model": platform.processor() or "unknown", "avx512": False}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return info
    for line in out.splitlines():
        key, _, value = line.partition(":")
        value = value.strip()
        if key.strip() == "Model name":
            info["model"] = value
        elif key.strip() == "CPU(s)":
            info["cpus"] = int(value)
        elif key.strip() == "Flags":
            flags = value.split()
            info["avx512"] = "avx512f" in flags
            info["avx2"] = "avx2" in flags
    return info


def matmul_peak_gflops(seconds: float = 3.0) -> float:
    """Achieved float32 GFLOP/s of a large square matmul on all threads: the practical peak here."""
    import torch

    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        torch.mm(a, b)
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        torch.mm(a, b)
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - t0) / 1e9


class PassCounter:
    """Counts forward passes and tokens of a causal LM class, split by the current stage."""

    def __init__(self):
        self.stage = "setup"
        self.started = time.perf_counter()
        self.stats: dict[str, dict] = defaultdict(
            lambda: {
                "seconds": 0.0,
                "train_passes": 0,
                "eval_passes": 0,
                "train_tokens": 0,
                "eval_tokens": 0,
                "flops": 0.0,
            }
        )
        self.order: list[str] = []

    def enter(self, stage: str) -> None:
        now = time.perf_counter()
        self.stats[self.stage]["seconds"] += now - self.started
        if self.stage not in self.order:
            self.order.append(self.stage)
        self.stage, self.started = stage, now

    def close(self) -> None:
        self.enter("done")

    def record(self, model, input_ids, attention_mask) -> None:
        import torch

        # With a KV cache (generation) the mask covers past tokens too: count only the new ones.
        if attention_mask is not None and attention_mask.shape[-1] == input_ids.shape[-1]:
            tokens = int(attention_mask.sum())
        else:
            tokens = int(input_ids.numel())
        seq = int(input_ids.shape[-1])
        cfg = model.config
        n = getattr(model, "_profile_params", None)
        if n is None:
            n = model.num_parameters(exclude_embeddings=True)
            model._profile_params = n
        d, layers, vocab = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
        forward = tokens * (2 * n + 2 * d * vocab + 4 * layers * seq * d)
        s = self.stats[self.stage]
        if torch.is_grad_enabled() and model.training:
            s["train_passes"] += 1
            s["train_tokens"] += tokens
            s["flops"] += 3 * forward
        else:
            s["eval_passes"] += 1
            s["eval_tokens"] += tokens
            s["flops"] += forward


STAGE_PATTERNS = [
    (r"^\[1/\d\]", "assets + loading"),
    (r"^\[2/\d\]", "defense"),
    # the calibrated attack (the default): the searches, the winners' runs on their seeds, the extensions
    (r"\[(\w[\w-]*)\] calibrating the [\w-]+ attack on the (base|immunized) model", "{0}: search ({1})"),
    (r"\[(\w[\w-]*)\] [\w-]+ winner on the (base|immunized) model", "{0}: winners' seeds ({1})"),
    (r"\[(\w[\w-]*)\] [\w-]+: .*extending", "{0}: extensions"),
    (r"\[(\w[\w-]*)\] training-free families on the (base|immunized) model", "{0}: training-free ({1})"),
    # a fixed grid (--fixed_grid)
    (r"\[(\w[\w-]*)\] attacking the (base|immunized) model", "attack {0} ({1})"),
    (r"side effects:", "side effects (generation)"),
    (r"\[stability\] helpfulness", "helpfulness (generation)"),
    (r"\[stability\]", "stability"),
    (r"\[trainability\] benign fine-tuning of the (base|immunized)", "trainability ({0})"),
    (r"^\[4/\d\]", "report + card"),
    (r"^\[5/\d\]", "report + card"),
]


def stage_of(message: str) -> str | None:
    """The profile stage a progress line of the demo starts (None: the line starts none)."""
    text = message.strip()
    for pattern, name in STAGE_PATTERNS:
        m = re.search(pattern, text)
        if m:
            return name.format(*m.groups())
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--json", default=None, help="Where to write the JSON (default under benchmarks/results/)."
    )
    parser.add_argument("demo_args", nargs="*", help="Arguments for immune-trainer demo (after --).")
    args = parser.parse_args(argv)

    import torch
    from transformers import PreTrainedModel

    from immune_trainer.demo import run as demo  # its _say is wrapped below
    from immune_trainer.runtime import keep_freed_memory

    keep_freed_memory()  # as the immune-trainer command does
    cpu = cpu_description()
    peak = matmul_peak_gflops()
    counter = PassCounter()

    original_call = PreTrainedModel.__call__

    def counted_call(self, *a, **kw):
        input_ids = kw.get("input_ids", a[0] if a else None)
        if (
            isinstance(input_ids, torch.Tensor)
            and hasattr(self.config, "vocab_size")
            and hasattr(self, "lm_head")
        ):
            counter.record(self, input_ids, kw.get("attention_mask"))
        return original_call(self, *a, **kw)

    original_say = demo._say

    def staged_say(message: str) -> None:
        stage = stage_of(message)
        if stage is not None:
            counter.enter(stage)
        original_say(message)

    demo_argv = list(args.demo_args)
    if not any(a.startswith("--output_dir") for a in demo_argv):
        demo_argv += ["--output_dir", "demo_output_profile"]
    PreTrainedModel.__call__ = counted_call
    demo._say = staged_say
    t0 = time.perf_counter()
    try:
        demo.main(demo_argv)
    finally:
        PreTrainedModel.__call__ = original_call
        demo._say = original_say
        counter.close()
    total = time.perf_counter() - t0

    rows = []
    for stage in counter.order:
        s = counter.stats[stage]
        gflops = s["flops"] / s["seconds"] / 1e9 if s["seconds"] > 0 else 0.0
        passes = s["train_passes"] + s["eval_passes"]
        rows.append(
            {
                "stage": stage,
                **{k: round(v, 2) if isinstance(v, float) else v for k, v in s.items()},
                "seconds_per_pass": round(s["seconds"] / passes, 3) if passes else None,
                "gflops_per_s": round(gflops, 1),
                "share_of_peak": round(gflops / peak, 3) if peak else None,
            }
        )
    header = (
        f"{'stage':32} {'s':>7} {'share':>6} {'train fwd':>9} {'eval fwd':>8} {'train tok':>9} "
        f"{'eval tok':>9} {'s/pass':>7} {'GFLOP/s':>8} {'of peak':>7}"
    )
    print(
        f"\nCPU: {cpu.get('model')} ({cpu.get('cpus', '?')} CPUs, AVX-512: {cpu['avx512']}); "
        f"float32 matmul peak measured {peak:.0f} GFLOP/s; total {total:.0f} s\n"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['stage']:32} {r['seconds']:7.1f} {r['seconds'] / total:6.1%} {r['train_passes']:9d} "
            f"{r['eval_passes']:8d} {r['train_tokens']:9d} {r['eval_tokens']:9d} "
            f"{(r['seconds_per_pass'] or 0):7.2f} {r['gflops_per_s']:8.1f} {(r['share_of_peak'] or 0):7.1%}"
        )
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "cpu": cpu,
        "matmul_peak_gflops": round(peak, 1),
        "demo_args": demo_argv,
        "total_seconds": round(total, 1),
        "stages": rows,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    path = (
        Path(args.json)
        if args.json
        else Path(__file__).parent
        / "results"
        / (f"demo_profile_{'avx512' if cpu['avx512'] else 'avx2'}.json")
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
