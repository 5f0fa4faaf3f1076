"""Calibration: seconds per plain full fine-tuning step of the embedded SmolLM2-135M (AdamW, batch 4 x 128
tokens, float32) and the machine's float32 matmul throughput. The issue that set the demo's time goal
measured about 10 s per step (about 41 GFLOP/s) on the slow 2-core AVX2 machine class; compare with
``bash scripts/slow_cpu.sh python benchmarks/plain_step.py`` to check that an emulation matches it.

    python benchmarks/plain_step.py [--steps 4] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from demo_profile import cpu_description, matmul_peak_gflops  # the script's folder is on sys.path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=4, help="Timed steps after one warm-up step.")
    p.add_argument("--json", default=None, help="Also write the result here.")
    args = p.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from immune_trainer.data import assets

    sys_info = cpu_description()
    model = AutoModelForCausalLM.from_pretrained(assets.prepare_model(), dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    x = torch.randint(0, model.config.vocab_size, (4, 128), generator=torch.Generator().manual_seed(0))
    times = []
    for i in range(args.steps + 1):
        t = time.perf_counter()
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
        if i:
            times.append(time.perf_counter() - t)
    matmul = matmul_peak_gflops()
    step = statistics.median(times)
    n_params = sum(p.numel() for p in model.parameters())
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "cpu": sys_info,
        "threads": torch.get_num_threads(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "emulation": {
            k: os.environ[k]
            for k in ("MKL_CBWR", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")
            if k in os.environ
        },
        "step_seconds": round(step, 2),
        "step_gflops_per_s": round(6 * n_params * 4 * 128 / step / 1e9, 1),
        "matmul_gflops_per_s": round(matmul, 1),
    }
    print(
        f"plain step (batch 4 x 128, AdamW): {step:.2f} s ({result['step_gflops_per_s']} GFLOP/s); "
        f"float32 matmul {matmul:.0f} GFLOP/s; torch kernels {result['torch_cpu_capability']}; "
        f"{sys_info['model']} ({'AVX-512' if sys_info['avx512'] else 'AVX2'}), {result['threads']} threads"
        + (f"; emulation {result['emulation']}" if result["emulation"] else "")
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
