"""Quickstart: immunize a model, attack it, and judge the four conditions (tiny models, seconds on a CPU).

    python examples/quickstart.py

The same code runs on a real model: replace the tiny model and tokenizer with
``AutoModelForCausalLM.from_pretrained(...)`` and the synthetic rows with your data (or
``immune_trainer.data.embedded.harmful_splits()`` for the embedded offline data).
"""

import copy

import datasets

from immune_trainer import (
    AttackConfig,
    ConditionDatasets,
    EvaluationConfig,
    HarmfulFineTuningAttack,
    evaluate_conditions,
    get_defense,
)
from immune_trainer.testing import tiny_causal_lm, tiny_tokenizer


def rows(n, offset=0, answer="Sure, here is step {i}: mix the flour and water, then bake."):
    # Innocuous placeholders standing in for harmful prompt/response pairs.
    return datasets.Dataset.from_list(
        [
            {"prompt": f"Explain step {i + offset} of the recipe.", "completion": answer.format(i=i + offset)}
            for i in range(n)
        ]
    )


def main():
    datasets.disable_progress_bars()
    tokenizer = tiny_tokenizer()
    base = tiny_causal_lm("llama", seed=0)

    # 1. Immunize a copy with a defense from the registry (a transformers.Trainer subclass).
    spec = get_defense("gradient_ascent")
    immunized = copy.deepcopy(base)
    args = spec.config_class(
        output_dir="quickstart_out",
        max_steps=30,
        learning_rate=2e-3,
        alpha=2.0,
        per_device_train_batch_size=8,
        max_length=64,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = spec.trainer_class(
        model=immunized,
        args=args,
        harmful_dataset=rows(64),
        retain_dataset=rows(64, 500, "The answer is {i}."),
        processing_class=tokenizer,
    )
    trainer.train()

    # 2. The attacker's fine-tuning over a grid; the model given is never modified.
    attack = HarmfulFineTuningAttack(
        AttackConfig(learning_rates=[1e-3, 3e-3], max_steps=12, eval_every=3, max_length=64)
    )
    curves = attack.run(base, tokenizer, rows(32, 100), rows(16, 200)).curves
    print("base model under attack, harmful loss by step:")
    for c in curves:
        print(f"  lr={c.config['learning_rate']:g}:", " ".join(f"{p.value:.2f}" for p in c.points))

    # 3. The four conditions, base vs immunized, with the threat model recorded in the report.
    text = datasets.Dataset.from_dict({"text": ["The quick brown fox jumps over the lazy dog. " * 4] * 8})
    report = evaluate_conditions(
        base,
        immunized,
        tokenizer,
        ConditionDatasets(
            attack_train=rows(32, 100),
            attack_eval=rows(16, 200),
            cross_domain_train=rows(16, 300, "Of course: step {i} is to whisk the eggs."),
            cross_domain_eval=rows(8, 400, "Of course: step {i} is to whisk the eggs."),
            reference={"plain_text": text},
            benign_train=rows(32, 600, "The answer is {i}."),
            benign_eval=rows(8, 700, "The answer is {i}."),
        ),
        attack=attack,
        config=EvaluationConfig(
            benign_scorer="benign_loss", benign_max_steps=6, benign_eval_every=3, benign_learning_rate=2e-3
        ),
        defense={"name": "gradient_ascent", "config": {"alpha": 1.0}},
        base_name="tiny-llama (random init)",
        immunized_name="tiny-llama + gradient_ascent",
    )
    report.save("quickstart_out/immunization_report.json")
    print()
    print(report.table())
    return report


if __name__ == "__main__":
    main()
