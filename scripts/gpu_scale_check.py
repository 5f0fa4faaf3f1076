"""Immunize a ~0.5B-parameter model with RepNoise on a GPU and attack it: wall time, memory, curves.

    python scripts/gpu_scale_check.py --output scale.json [--model random:qwen2-0.5b | PATH]

With no Hub access on the GPU machine, the default model is a randomly initialised Qwen2-0.5B-sized
decoder (hidden 896, 24 layers, vocabulary 151,936) trained on synthetic pairs: the figures measure what
the library costs at this size (time, memory, that every stage runs under bf16 on CUDA), not whether
RepNoise protects a real model. Pass a local model folder to measure a real one.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import datasets
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.defense_step import RANDOM_CONFIGS  # noqa: E402
from immune_trainer.attacks import AttackConfig, HarmfulFineTuningAttack  # noqa: E402
from immune_trainer.defenses import get_defense  # noqa: E402
from immune_trainer.testing import tiny_tokenizer  # noqa: E402


def synthetic_pairs(n: int, offset: int = 0, words: int = 60) -> datasets.Dataset:
    filler = "mix the flour water and salt then knead the dough and let it rise before baking it slowly"
    body = " ".join((filler.split() * 10)[:words])
    return datasets.Dataset.from_list(
        [
            {
                "prompt": f"Explain step {i + offset} of the recipe.",
                "completion": f"Step {i + offset}: {body}.",
            }
            for i in range(n)
        ]
    )


def load(model_name: str):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if model_name.startswith("random:"):
        values = dict(RANDOM_CONFIGS[model_name.split(":", 1)[1]])
        config = AutoConfig.for_model(values.pop("model_type"), **values)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        model.config.use_cache = False
        return model, tiny_tokenizer()
    return AutoModelForCausalLM.from_pretrained(model_name), AutoTokenizer.from_pretrained(model_name)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="random:qwen2-0.5b")
    parser.add_argument("--defense-steps", type=int, default=30)
    parser.add_argument("--attack-steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--output", default="scale.json")
    opts = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    model, tokenizer = load(opts.model)
    n_params = sum(p.numel() for p in model.parameters())
    result = {
        "model": opts.model,
        "parameters": n_params,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    print(f"{opts.model}: {n_params / 1e6:.0f}M parameters on {result['device']}", flush=True)
    defense_data, attack_data, held_out = (
        synthetic_pairs(256),
        synthetic_pairs(128, 1000),
        synthetic_pairs(32, 5000),
    )

    spec = get_defense("repnoise")
    args = spec.config_class(
        output_dir="/tmp/scale_repnoise",
        max_steps=opts.defense_steps,
        per_device_train_batch_size=opts.batch_size,
        learning_rate=2e-5,
        bf16=cuda,
        save_strategy="no",
        report_to="none",
        logging_steps=10,
        max_length=256,
        disable_tqdm=True,
    )
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer = spec.trainer_class(
        model=model,
        args=args,
        harmful_dataset=defense_data,
        retain_dataset=attack_data,
        processing_class=tokenizer,
    )
    t0 = time.perf_counter()
    trainer.train()
    result["defense"] = {
        "name": "repnoise",
        "steps": opts.defense_steps,
        "batch_size": opts.batch_size,
        "seconds": time.perf_counter() - t0,
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "terms": [h for h in trainer.state.log_history if "loss/ascent" in h],
    }
    print(
        f"RepNoise: {result['defense']['seconds']:.1f} s, peak {result['defense']['peak_gpu_gib']} GiB",
        flush=True,
    )
    immunized = trainer.model
    del trainer
    immunized.eval()
    base, _ = load(opts.model)
    if cuda:
        base = base.cuda()
        immunized = immunized.cuda()

    result["attacks"] = {}
    for family, lrs in (("full", [3e-5, 8e-5]), ("lora", [1e-4])):
        cfg = AttackConfig(
            family=family,
            learning_rates=lrs,
            max_steps=opts.attack_steps,
            eval_every=10,
            batch_size=opts.batch_size,
            max_length=256,
            bf16=cuda,
            eval_batch_size=16,
        )
        for who, m in (("base", base), ("immunized", immunized)):
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            curves = HarmfulFineTuningAttack(cfg).run(m, tokenizer, attack_data, held_out).curves
            seconds = time.perf_counter() - t0
            key = f"{family}/{who}"
            result["attacks"][key] = {
                "seconds": seconds,
                "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
                "curves": [c.to_dict() for c in curves],
            }
            values = {c.config["learning_rate"]: [round(p.value, 3) for p in c.points] for c in curves}
            print(f"attack {key}: {seconds:.1f} s, harmful loss by lr: {values}", flush=True)
    Path(opts.output).write_text(json.dumps(result, indent=2))
    print(f"wrote {opts.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
