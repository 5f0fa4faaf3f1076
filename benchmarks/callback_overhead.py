"""Measure what ConditionsCallback costs: train a defense with and without it and compare wall time.

    python benchmarks/callback_overhead.py --steps 300 --json overhead.json

Trains the bounded gradient-ascent defense on a tiny randomly initialised Llama (no Hub) twice with the
same seed: once plain, once with :class:`~immune_trainer.callbacks.ConditionsCallback` at its default
configuration (default probe frequency: ten probes over a run that never evaluates, plus the starting
model at train begin; stability on one reference set; no trainability probe unless ``--benign``).
A short warm-up run comes first (the first steps of a fresh process are far slower). Prints and
optionally writes JSON with the overhead ratio (time inside the probes over the training time of the
same run, which load on a shared machine cannot skew; the two runs' wall times are reported beside it),
the number of probes, the mean cost of one probe in defense-step equivalents, and the overhead
predicted for longer runs with the same number of probes (``probes x probe cost / steps``).

The probe cost has a fixed part (building a nested Trainer, deepcopy of the model) that a tiny model
cannot amortise: report the ratio together with the model size and step count it was measured on.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import datasets
import torch


def _rows(n: int, offset: int = 0, benign: bool = False) -> datasets.Dataset:
    if benign:
        rows = [
            {"prompt": f"What is {i} + {i % 5}?", "completion": f"The answer is {i + i % 5}."}
            for i in range(n)
        ]
    else:
        rows = [
            {
                "prompt": f"Explain step {i + offset} of the recipe.",
                "completion": f"Sure, here is step {i + offset}: mix the flour, water and salt, then bake.",
            }
            for i in range(n)
        ]
    return datasets.Dataset.from_list(rows)


def run(
    steps: int = 300,
    hidden_size: int = 128,
    num_layers: int = 4,
    batch_size: int = 8,
    benign: bool = False,
    threads: int | None = None,
    repeats: int = 1,
) -> dict:
    """Train the defense with and without the callback; return the timings as a dict."""
    from immune_trainer.callbacks import ConditionsCallback, ConditionsCallbackConfig
    from immune_trainer.defenses import GradientAscentConfig, GradientAscentTrainer
    from immune_trainer.testing import tiny_causal_lm, tiny_tokenizer

    if threads:
        torch.set_num_threads(threads)
    tok = tiny_tokenizer()
    harmful = _rows(256)
    config = ConditionsCallbackConfig()

    def train(n_steps: int, with_callback: bool):
        model = tiny_causal_lm("llama", hidden_size=hidden_size, num_layers=num_layers, seed=0)
        callbacks = []
        if with_callback:
            cb = ConditionsCallback(
                tok,
                harmful_train=_rows(64, offset=1000),
                harmful_eval=_rows(32, offset=2000),
                reference={"benign": _rows(32, benign=True)},
                benign=(_rows(64, benign=True), _rows(16, benign=True)) if benign else None,
                config=config,
            )
            callbacks.append(cb)
        with tempfile.TemporaryDirectory() as out:
            args = GradientAscentConfig(
                output_dir=out,
                max_steps=n_steps,
                per_device_train_batch_size=batch_size,
                learning_rate=2e-4,
                logging_steps=50,
                save_strategy="no",
                report_to="none",
                max_length=64,
                disable_tqdm=True,
                seed=0,
            )
            trainer = GradientAscentTrainer(
                model=model, args=args, harmful_dataset=harmful, processing_class=tok, callbacks=callbacks
            )
            start = time.perf_counter()
            trainer.train()
            elapsed = time.perf_counter() - start
        probes = callbacks[0].num_probes + 1 if callbacks else 0  # + the starting model
        probe_seconds = callbacks[0].probe_seconds if callbacks else 0.0
        return elapsed, probes, probe_seconds

    train(10, True)  # warm-up: imports, first kernels, first nested Trainer
    plain, with_cb, in_probes, probes = [], [], [], 0
    for _ in range(repeats):
        plain.append(train(steps, False)[0])
        t, probes, p = train(steps, True)
        with_cb.append(t)
        in_probes.append(p)
    t_plain, t_cb = statistics.median(plain), statistics.median(with_cb)
    t_probe = statistics.median(in_probes)
    # Primary measure: time spent inside the probes against the training time of the SAME run (immune to
    # load drift between runs on a shared machine). Secondary: the two runs' wall times.
    t_train = t_cb - t_probe
    step_time = t_train / steps
    probe_cost = t_probe / max(probes, 1)
    probe_steps = probe_cost / step_time
    params = sum(
        p.numel()
        for p in tiny_causal_lm("llama", hidden_size=hidden_size, num_layers=num_layers).parameters()
    )
    return {
        "model": f"tiny llama hidden={hidden_size} layers={num_layers}",
        "parameters": params,
        "steps": steps,
        "batch_size": batch_size,
        "torch_threads": torch.get_num_threads(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "callback_config": {
            "probe_every": config.probe_every,
            "probe_steps": config.probe_steps,
            "learning_rates": config.learning_rates,
            "max_eval_samples": config.max_eval_samples,
            "trainability": benign,
        },
        "probes": probes,
        "seconds_in_probes": t_probe,
        "seconds_training_in_same_run": t_train,
        "overhead_ratio": t_probe / t_train,
        "seconds_per_probe": probe_cost,
        "probe_cost_in_defense_steps": probe_steps,
        "predicted_overhead_ratio": {str(n): probes * probe_steps / n for n in (steps, 1000, 3000, 10000)},
        "wall_seconds_without_callback": t_plain,
        "wall_seconds_with_callback": t_cb,
        "wall_overhead_ratio": (t_cb - t_plain) / t_plain,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="defense training steps")
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--benign", action="store_true", help="also run the trainability probe")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--repeats", type=int, default=1, help="repeat both runs; medians are reported")
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    a = parser.parse_args(argv)
    result = run(a.steps, a.hidden_size, a.num_layers, a.batch_size, a.benign, a.threads, a.repeats)
    text = json.dumps(result, indent=2)
    print(text)
    if a.json:
        a.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
