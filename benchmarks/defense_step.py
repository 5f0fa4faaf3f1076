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
    python benchmarks/defense_step.py --preset smollm2 --batch-size 2 --seq-len 64 \
        --defenses gradient_ascent,repnoise,repnoise:lens_chunk_size=-1,booster,vaccine

A defense may carry config overrides after a colon (``repnoise:lens_chunk_size=-1:layer_stride=2``); the
row keeps that name. Presets are randomly initialised models of a real shape (no download).

Beside each measured time ratio the table prints the method's FLOPs floor (:func:`flops_floor`): the
matrix-multiply work the method cannot avoid, relative to the plain step's, computed from the model's
shapes. ``measured / floor`` is the overhead an implementation could still remove.

TAR is reported per outer step; its floor counts the attacker's and the tamper-resistance passes.
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


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return platform.processor()
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if "model name" in line), "")
    flags = next((line for line in info.splitlines() if line.startswith("flags")), "")
    return f"{model} ({'avx512' if 'avx512f' in flags else 'no avx512'})"


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


PRESETS = {
    # --preset NAME is --model random:<config> (randomly initialised, nothing downloaded).
    "smollm2": "random:smollm2-135m",  # SmolLM2-135M's shape: 30 layers, hidden 576, vocab 49152, tied
    "qwen2-0.5b": "random:qwen2-0.5b",  # 24 layers, hidden 896, vocab 151936, tied
    "tiny": "tiny:llama",
}


def flops_floor(name: str, model, args, batch_size: int, seq_len: int, prompt_len: int) -> float | None:
    """The method's minimal work per step relative to a plain step (forward + backward on the harmful side).

    Counted in matrix-multiply FLOPs from the model's shapes: a forward over ``T`` tokens costs
    ``F(T) = 2 T (P_layers + V d) + 2 T L s d`` (decoder-layer weight matrices ``P_layers``, the
    unembedding ``V x d``, attention scores over ``s`` positions, Kaplan et al. 2020); a backward computing
    weight and input gradients costs ``2 F``, one computing input gradients only (LoRA, hidden-state
    gradients) ``F``. Plain step: ``3 F(b s)``. Per method (its default config, no retain set, the
    benchmark's batch of ``b`` pairs):

    - ``gradient_ascent``: harmful + harmless forward-backward: ``2``.
    - ``repnoise``: ``2`` plus, for each logit-lens term (the selected layers' inputs and, by default, the last
      hidden state), the unembedding of the ``R`` response positions
      forward and backward, ``6 R d V``: ``2 + n_lens 6 R d V / 3 F`` (MMD terms are negligible).
    - ``booster``: three forward-backward passes: ``3``.
    - ``vaccine``: forward + input-gradient backward to the attention outputs, then a forward-backward under
      the perturbation: ``(2 + 3) / 3``.
    - ``tar``: ``K`` attacker passes and ``K / tr_every`` tamper-resistance passes on half the batch each
      (two halves each with the default ``dpo`` tamper loss, plus the starting model's forward of both halves),
      the retain forward-backward, and a forward of the starting model for the representation term:
      ``(K + K/tr_every) / 2 + 1 + 1/3`` for ``max_entropy``, ``(K + 2 K/tr_every) / 2 + 1 + 2/3`` for ``dpo``.
    - ``security_vectors``: a LoRA step, forward + input-gradient backward: ``2 / 3``.
    - ``rerouting``: LoRA; forward + input-gradient backward up to the last target layer on the harmful and
      the harmless side, and a frozen forward of both: ``6 f F_layers / 3 F`` with ``f`` the depth reached.

    Returns ``None`` for an unknown method.
    """
    from immune_trainer.modeling import find_decoder_structure, unwrap_model

    base = unwrap_model(model)
    structure = find_decoder_structure(base)
    n_layers = structure.num_layers
    vocab, d = base.get_output_embeddings().weight.shape
    layer_params = sum(p.numel() for layer in structure.layers for p in layer.parameters() if p.dim() == 2)

    def forward(tokens: int, depth: float = 1.0, head: bool = True) -> float:
        body = 2 * tokens * depth * (layer_params + n_layers * seq_len * d)
        return body + (2 * tokens * vocab * d if head else 0)

    plain = 3 * forward(batch_size * seq_len)
    base_name = name.split(":", 1)[0]
    if base_name == "plain":
        return 1.0
    if base_name == "gradient_ascent":
        return 2.0
    if base_name == "booster":
        return 3.0
    if base_name == "vaccine":
        return 5.0 / 3.0
    if base_name == "security_vectors":
        return 2.0 / 3.0
    if base_name == "repnoise":
        from immune_trainer.defenses.repnoise import selected_layers

        # The selected layers' inputs (h_0 left out by lens_skip_embedding) and, in the reference's average,
        # the last hidden state normed again.
        lens = len(selected_layers(n_layers, args.layer_stride)) - int(args.lens_skip_embedding)
        lens += int(not args.lens_output_once)
        rows = batch_size * (seq_len - prompt_len)
        return 2.0 + lens * 6 * rows * d * vocab / plain
    if base_name == "tar":
        half = forward(batch_size * seq_len) / 2
        dpo = args.tamper_loss == "dpo"  # two sides per tamper-resistance pass, two reference forwards
        inner = args.inner_steps + (2 if dpo else 1) * (args.inner_steps // args.tr_every)
        full = forward(batch_size * seq_len)
        return (3 * half * inner + 3 * full + full + (2 * half if dpo else 0)) / plain
    if base_name == "rerouting":
        from immune_trainer.defenses.rerouting import default_target_layers

        targets = args.target_layers or default_target_layers(n_layers)
        depth = (max(targets) + 1) / n_layers
        return 6 * forward(batch_size * seq_len, depth, head=False) / plain
    return None


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
    name, overrides = ("plain", {}) if opts.worker == "plain:again" else _parse_variant(opts.worker)
    if name == "plain":
        args = TrainingArguments(**common)
        trainer = Trainer(model=model, args=args)
        step_batch = {k.removeprefix("harmful_"): v for k, v in batch.items() if k.startswith("harmful_")}
    else:
        spec = get_defense(name)
        args = spec.config_class(**common, max_length=opts.seq_len + 8, **overrides)
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
        "flops_floor": flops_floor(name, model, args, opts.batch_size, opts.seq_len, opts.seq_len // 2),
        "median_ms": 1000 * statistics.median(times),
        "min_ms": 1000 * min(times),
        "peak_mb": max(peak_abs - start_mem, 0.0),
        "step_growth_mb": max(peak, 0.0),
    }


def _parse_variant(spec: str) -> tuple[str, dict]:
    """``"repnoise:lens_chunk_size=-1:layer_stride=2"`` -> ``("repnoise", {...})`` (values parsed as JSON
    where they parse, e.g. numbers and true/false, else kept as strings)."""
    name, *pairs = spec.split(":")
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"bad override {pair!r} in {spec!r}: write key=value")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return name, overrides


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default="tiny:llama", help="tiny:<arch> (hidden 256, 4 layers) or a path / Hub id"
    )
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), default=None, help="a named model shape (overrides --model)"
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
    parser.add_argument(
        "--stat",
        choices=("median", "min"),
        default="median",
        help="time statistic the ratios use; min resists other processes' load on a shared machine",
    )
    parser.add_argument(
        "--bracket",
        action="store_true",
        help="measure plain again after the defenses and use the faster of the two (shared machines)",
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.preset:
        opts.model = PRESETS[opts.preset]
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
    suffix = f"_{opts.preset}" if opts.preset else ""
    out = Path(opts.output or Path(__file__).parent / "results" / f"defense_step_{opts.device}{suffix}.json")
    out.parent.mkdir(parents=True, exist_ok=True)

    def write(complete: bool) -> None:
        out.write_text(
            json.dumps(
                {
                    "model": opts.model,
                    "device": opts.device,
                    "batch_size": opts.batch_size,
                    "seq_len": opts.seq_len,
                    "steps": opts.steps,
                    "warmup": opts.warmup,
                    "time_statistic": opts.stat,
                    "bracket": opts.bracket,
                    "bf16": opts.bf16,
                    "machine": platform.platform(),
                    "date": time.strftime("%Y-%m-%d"),
                    "plain": "transformers.Trainer.training_step + optimizer.step on the harmful half of the paired batch alone",
                    "memory": "peak_mb: peak memory of the training process over the memory before the model was "
                    "loaded (CPU: ru_maxrss; GPU: max_memory_allocated), i.e. weights + gradients + optimizer "
                    "states + activations; step_growth_mb: peak over the memory just before the first step",
                    "flops_floor": "minimal matrix-multiply FLOPs of the method per step relative to the plain "
                    "step, from the model's shapes (benchmarks/defense_step.py flops_floor)",
                    "torch_threads": _threads(),
                    "cpu": _cpu_model(),
                    "complete": complete,
                    "rows": list(rows.values()),
                },
                indent=2,
            )
        )

    rows = {}
    for name in ["plain", *names, *(["plain:again"] if opts.bracket else [])]:
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
        print(f"[{time.strftime('%H:%M:%S')}] {rows[name]}", file=sys.stderr, flush=True)
        write(complete=False)  # partial results survive an interrupted run
    plain = rows["plain"]
    again = rows.get("plain:again", {})
    if "error" not in plain and "error" not in again and again.get("median_ms") is not None:
        plain = min(plain, again, key=lambda r: r[f"{opts.stat}_ms"])
    if "error" in plain:
        print(f"plain Trainer failed: {plain['error']}", file=sys.stderr)
        return 1
    print(
        f"model {opts.model}, device {opts.device}, batch {opts.batch_size} x {opts.seq_len} tokens, "
        f"{opts.stat} of {opts.steps} steps after {opts.warmup} warm-up"
        + (f"; plain = the faster of {rows['plain']['name']!r} and 'plain:again'" if opts.bracket else "")
    )
    print(
        "plain = transformers.Trainer.training_step + optimizer step on the harmful half of the pairs alone;\n"
        "peak MB = peak process memory of training (weights, gradients, optimizer states, activations);\n"
        "step MB = its growth over the memory before the first step"
    )
    print("floor = minimal FLOPs of the method relative to the plain step (see flops_floor)")
    print(
        f"{'defense':<32}{'ms/step':>10}{'x plain':>9}{'floor':>7}{'target':>8}{'peak MB':>10}{'x plain':>9}"
        f"{'step MB':>10}{'x plain':>9}"
    )
    for name, row in rows.items():
        if "error" in row:
            print(f"{name:<32} ERROR: {row['error']}")
            continue
        row["time_ratio"] = row[f"{opts.stat}_ms"] / plain[f"{opts.stat}_ms"]
        row["memory_ratio"] = row["peak_mb"] / plain["peak_mb"] if plain["peak_mb"] > 0 else None
        row["step_growth_ratio"] = (
            row["step_growth_mb"] / plain["step_growth_mb"] if plain["step_growth_mb"] > 0 else None
        )
        base_name = name.split(":", 1)[0]
        row["time_target"] = TARGETS.get(base_name)
        mem = f"{row['memory_ratio']:.2f}" if row["memory_ratio"] is not None else "n/a"
        target = f"{row['time_target']:.1f}" if row["time_target"] else ("K+1" if base_name == "tar" else "-")
        floor = f"{row['flops_floor']:.2f}" if row.get("flops_floor") is not None else "-"
        print(
            f"{name:<32}{row[f'{opts.stat}_ms']:>10.1f}{row['time_ratio']:>9.2f}{floor:>7}{target:>8}"
            f"{row['peak_mb']:>10.1f}{mem:>9}{row['step_growth_mb']:>10.1f}{row['step_growth_ratio'] or 0:>9.2f}"
        )
    write(complete=True)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
