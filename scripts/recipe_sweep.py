"""How the demo's default defense was chosen: a DefenseSweep on the embedded model and data.

Runs an Optuna study (``immune_trainer.sweep.DefenseSweep``) of one defense on SmolLM2-135M-Instruct with
the embedded data, at the demo's measuring budgets: each trial immunizes a copy and attacks it with a
cheap proxy of the demo's grid (full fine-tuning and a LoRA attack with a cosine schedule), stability on
Shakespeare and chat answers as a constraint. The study, its table, Pareto front and frontier plot go to
``--output_dir`` (resumable: rerun with a larger ``--n_trials`` to add trials). The demo's full grid then
confirms the best setting (``immune-trainer demo --alpha ... --retain_weight ...``).

    python scripts/recipe_sweep.py --output_dir benchmarks/results/recipe_sweep --n_trials 8
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default="recipe_sweep")
    p.add_argument("--defense", default="gradient_ascent")
    p.add_argument("--n_trials", type=int, default=8)
    p.add_argument("--defense_steps", type=int, default=24)
    p.add_argument("--space", default=None, help="JSON search space (default: alpha, retain_weight, lr).")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from immune_trainer.attacks import AttackConfig
    from immune_trainer.data import assets, embedded
    from immune_trainer.demo import PRESETS
    from immune_trainer.evaluation import EvaluationConfig
    from immune_trainer.sweep import DefenseSweep, SweepConfig

    datasets.disable_progress_bars()
    budget = PRESETS["default"]
    torch.manual_seed(0)
    model_dir = assets.prepare_model()
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    splits = embedded.harmful_splits(0)
    rows = budget["reference_rows"]
    common = dict(
        seeds=[0], max_steps=budget["attack_steps"], eval_every=budget["eval_every"],
        batch_size=budget["attack_batch_size"], max_length=budget["max_length"],
    )
    attacks = [
        AttackConfig(family="full", learning_rates=list(budget["attack_learning_rates"]), **common),
        AttackConfig(
            family="lora", learning_rates=[budget["lora_learning_rate"]], lr_scheduler_type="cosine",
            warmup_ratio=0.1, **common,
        ),
    ]
    space = json.loads(args.space) if args.space else {
        "alpha": {"type": "float", "low": 1.5, "high": 5.0, "log": True},
        "retain_weight": {"type": "float", "low": 2.0, "high": 12.0, "log": True},
        "learning_rate": {"type": "float", "low": 2e-5, "high": 6e-5, "log": True},
    }
    sweep = DefenseSweep(
        base,
        tok,
        harmful_dataset=splits["defense"],
        retain_dataset=embedded.load_embedded("benign_qa"),
        attack_train=splits["defense"],
        attack_eval=splits["in_domain"].select(range(budget["eval_pairs"])),
        reference={
            "shakespeare": embedded.load_embedded("shakespeare", "eval").select(range(rows)),
            "chat_answers": embedded.load_embedded("chat_responses").select(range(rows)),
        },
        attacks=attacks,
        evaluation=EvaluationConfig(threshold_step=budget["eval_every"], stability_tolerance=0.10),
        config=SweepConfig(
            defense=args.defense, n_trials=args.n_trials, output_dir=args.output_dir, seed=args.seed
        ),
        space=space,
        defense_args={
            "max_steps": args.defense_steps, "per_device_train_batch_size": budget["batch_size"],
            "max_length": budget["max_length"], "lr_scheduler_type": "constant", "seed": 0,
        },
        data_specs={
            "model": "embedded", "dataset": "embedded:harmful_qa/defense", "retain_dataset": "embedded:benign_qa"
        },
    )
    t0 = time.perf_counter()
    sweep.run()
    print(f"sweep time: {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
