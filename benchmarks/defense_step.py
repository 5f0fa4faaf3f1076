"""Time one training step of every registered defense against a plain ``transformers.Trainer`` step.

"Plain" means: a ``transformers.Trainer`` on the harmful half of the paired batch alone (same model,
same batch size and sequence length), i.e. one forward and one backward of the LM loss. Each defense
(and plain) runs in its own subprocess so that peak memory is measured cleanly: on CPU the growth of
the process's peak RSS over the RSS just before the first step (``resource.ru_maxrss``), on GPU
``torch.cuda.max_memory_allocated`` minus the allocation before the first step. Time is the median
of ``--steps`` calls of ``trainer.training_step`` on one fixed batch after ``--warmup`` calls
(gradients are cleared between calls, outside the timing).

    python benchmarks/defense_step.py                      # tiny llama (hidden 256, 4 layers), CPU
    python benchmarks/defense_step.py --defenses repnoise,booster --steps 20
    python benchmarks/defense_step.py --model path/or/hub-id --device cuda --seq-len 256

TAR is reported per outer step; compare it with (K + 1) plain steps.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

TARGETS = {
    "repnoise": 2.5,
    "vaccine": 2.3,
    "booster": 3.4,
    "gradient_ascent": 2.2,
    "security_vectors": 2.5,
    "rerouting": 2.5,
}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


RANDOM_CONFIGS = {
    # Random-initialised models of a real size, for timing and memory (no weights need to be fetched).
    "qwen2-0.5b": dict(
        model_type="qwen2",
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    ),
    "tiny-test": dict(
        model_type="llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=512,
    ),
    "smollm2-135m": dict(
        model_type="llama",
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    ),
}


def _load(model_name: str):
    from immune_trainer.testing import tiny_causal_lm, tiny_tokenizer

    if model_name.startswith("tiny:"):
        return tiny_causal_lm(
            model_name.split(":", 1)[1], hidden_size=256, num_layers=4, num_heads=4
        ), tiny_tokenizer()
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if model_name.startswith("random:"):
        values = dict(RANDOM_CONFIGS[model_name.split(":", 1)[1]])
        config = AutoConfig.for_model(values.pop("model_type"), **values)
        model = AutoModelForCausalLM.from_config(config)
        model.config.use_cache = False
        return model, tiny_tokenizer()
    return AutoModelForCausalLM.from_pretrained(model_name), AutoTokenizer.from_pretrained(model_name)


def _batch(tokenizer, batch_size: int, seq_len: int, prompt_len: int):
    import torch

    g = torch.Generator().manual_seed(0)
    vocab = len(tokenizer)
    batch = {}
    for side in ("harmful", "harmless"):
        ids = torch.randint(4, vocab, (batch_size, seq_len), generator=g)
        labels = ids.clone()
        labels[:, :prompt_len] = -100
        batch[f"{side}_input_ids"] = ids
        batch[f"{side}_attention_mask"] = torch.ones_like(ids)
        batch[f"{side}_labels"] = labels
    return batch


def worker(opts) -> dict:
    """Measure one defense (or ``plain``) in this process and return the row."""
    import datasets
    import torch
    from transformers import Trainer, TrainingArguments

    from immune_trainer.defenses import get_defense

    torch.manual_seed(0)
    use_cpu = opts.device == "cpu"
    cuda = torch.cuda.is_available() and not use_cpu
    start_mem = 0 if cuda else _rss_mb()  # before the model: the peak counts weights, grads, optimizer
    model, tokenizer = _load(opts.model)
    common = dict(
        output_dir="/tmp/defense_step_bench",
        report_to="none",
        per_device_train_batch_size=opts.batch_size,
        use_cpu=use_cpu,
        save_strategy="no",
        disable_tqdm=True,
        bf16=opts.bf16,
    )
    batch = _batch(tokenizer, opts.batch_size, opts.seq_len, opts.seq_len // 2)
    if opts.worker == "plain":
        trainer = Trainer(model=model, args=TrainingArguments(**common))
        step_batch = {k.removeprefix("harmful_"): v for k, v in batch.items() if k.startswith("harmful_")}
    else:
        spec = get_defense(opts.worker)
        args = spec.config_class(**common, max_length=opts.seq_len + 8)
        rows = [{"prompt": "Explain the step.", "completion": "Mix and bake."}] * 4
        trainer = spec.trainer_class(
            model=model,
            args=args,
            harmful_dataset=datasets.Dataset.from_list(rows),
            processing_class=tokenizer,
        )
        step_batch = batch
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # set by train(); we call training_step directly
    model = trainer.model
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    mem0 = torch.cuda.memory_allocated() if cuda else _rss_mb()
    times = []
    for i in range(opts.warmup + opts.steps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        trainer.training_step(model, dict(step_batch))
        trainer.optimizer.step()  # a whole training step: the optimizer's states count in the peak
        model.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if i >= opts.warmup:
            times.append(time.perf_counter() - t0)
    if cuda:
        peak_abs = torch.cuda.max_memory_allocated() / 2**20
        peak = peak_abs - mem0 / 2**20
    else:
        peak_abs = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        peak = peak_abs - mem0
    return {
        "name": opts.worker,
        "median_ms": 1000 * statistics.median(times),
        "peak_mb": max(peak_abs - start_mem, 0.0),
        "step_growth_mb": max(peak, 0.0),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default="tiny:llama", help="tiny:<arch> (hidden 256, 4 layers) or a path / Hub id"
    )
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--defenses", default=None, help="comma-separated subset (default: every registered one)"
    )
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument(
        "--output", default=None, help="JSON path (default benchmarks/results/defense_step_<device>.json)"
    )
    parser.add_argument("--timeout", type=int, default=300, help="seconds allowed per defense")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 mixed precision (GPU)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.device is None:
        import torch

        opts.device = "cuda" if torch.cuda.is_available() else "cpu"
    if opts.worker:
        print(json.dumps(worker(opts)))
        return 0

    from immune_trainer.defenses import list_defenses

    names = opts.defenses.split(",") if opts.defenses else list_defenses()
    base_cmd = [
        sys.executable,
        __file__,
        "--model",
        opts.model,
        "--batch-size",
        str(opts.batch_size),
        "--seq-len",
        str(opts.seq_len),
        "--steps",
        str(opts.steps),
        "--warmup",
        str(opts.warmup),
        "--device",
        opts.device,
        *(["--bf16"] if opts.bf16 else []),
    ]
    rows = {}
    for name in ["plain", *names]:
        try:
            proc = subprocess.run(
                [*base_cmd, "--worker", name], capture_output=True, text=True, timeout=opts.timeout
            )
        except subprocess.TimeoutExpired:
            rows[name] = {"name": name, "error": f"timed out after {opts.timeout} s"}
            continue
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            rows[name] = {"name": name, "error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
        else:
            rows[name] = json.loads(lines[-1])
    plain = rows["plain"]
    if "error" in plain:
        print(f"plain Trainer failed: {plain['error']}", file=sys.stderr)
        return 1
    print(
        f"model {opts.model}, device {opts.device}, batch {opts.batch_size} x {opts.seq_len} tokens, "
        f"median of {opts.steps} steps after {opts.warmup} warm-up"
    )
    print(
        "plain = transformers.Trainer.training_step + optimizer step on the harmful half of the pairs alone;\n"
        "peak MB = peak process memory of training (weights, gradients, optimizer states, activations);\n"
        "step MB = its growth over the memory before the first step"
    )
    print(
        f"{'defense':<20}{'ms/step':>10}{'x plain':>9}{'target':>8}{'peak MB':>10}{'x plain':>9}"
        f"{'step MB':>10}{'x plain':>9}"
    )
    for name, row in rows.items():
        if "error" in row:
            print(f"{name:<20} ERROR: {row['error']}")
            continue
        row["time_ratio"] = row["median_ms"] / plain["median_ms"]
        row["memory_ratio"] = row["peak_mb"] / plain["peak_mb"] if plain["peak_mb"] > 0 else None
        row["step_growth_ratio"] = (
            row["step_growth_mb"] / plain["step_growth_mb"] if plain["step_growth_mb"] > 0 else None
        )
        row["time_target"] = TARGETS.get(name)
        mem = f"{row['memory_ratio']:.2f}" if row["memory_ratio"] is not None else "n/a"
        target = f"{row['time_target']:.1f}" if row["time_target"] else ("K+1" if name == "tar" else "-")
        print(
            f"{name:<20}{row['median_ms']:>10.1f}{row['time_ratio']:>9.2f}{target:>8}{row['peak_mb']:>10.1f}{mem:>9}"
            f"{row['step_growth_mb']:>10.1f}{row['step_growth_ratio'] or 0:>9.2f}"
        )
    out = Path(opts.output or Path(__file__).parent / "results" / f"defense_step_{opts.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "model": opts.model,
                "device": opts.device,
                "batch_size": opts.batch_size,
                "seq_len": opts.seq_len,
                "steps": opts.steps,
                "warmup": opts.warmup,
                "bf16": opts.bf16,
                "machine": platform.platform(),
                "date": time.strftime("%Y-%m-%d"),
                "plain": "transformers.Trainer.training_step + optimizer.step on the harmful half of the paired batch alone",
                "memory": "peak_mb: peak memory of the training process over the memory before the model was "
                "loaded (CPU: ru_maxrss; GPU: max_memory_allocated), i.e. weights + gradients + optimizer "
                "states + activations; step_growth_mb: peak over the memory just before the first step",
                "rows": list(rows.values()),
            },
            indent=2,
        )
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
