"""Cheap proxy for the demo's recipe search: one defense setting per line of a JSON-lines file.

For each setting: immunize SmolLM2 (embedded), measure chat-answer and Shakespeare perplexity against the
base model, and attack it with the proxy grid (full fine-tuning at two learning rates, two seeds, and a
LoRA attack), reporting each run's interpolated crossing of phi (the base model's median harm after
``--phi_step`` steps of the full attacks) and the cost multiple against the base. Base curves are
computed once and cached under the output folder. Used to find the region worth a full sweep.

    python scripts/recipe_probe.py --out probe.jsonl --settings '[{"defense": "gradient_ascent", ...}]'
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--settings", required=True, help="JSON list of defense settings")
    p.add_argument("--attack_steps", type=int, default=10)
    p.add_argument("--eval_every", type=int, default=2)
    p.add_argument("--eval_pairs", type=int, default=8)
    p.add_argument("--max_length", type=int, default=96)
    p.add_argument("--attack_batch", type=int, default=2)
    p.add_argument("--phi_step", type=int, default=2)
    args = p.parse_args()

    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from immune_trainer.attacks import AttackConfig, HarmfulFineTuningAttack
    from immune_trainer.conditions import first_crossing
    from immune_trainer.data import assets, embedded
    from immune_trainer.defenses import get_defense
    from immune_trainer.scoring import get_scorer

    datasets.disable_progress_bars()
    torch.manual_seed(0)
    model_dir = assets.prepare_model()
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    splits = embedded.harmful_splits(0)
    retain = embedded.load_embedded("benign_qa")
    chat = embedded.load_embedded("chat_responses").select(range(16))
    shakes = embedded.load_embedded("shakespeare", "eval").select(range(16))
    ev = splits["in_domain"].select(range(args.eval_pairs))
    train = splits["defense"]
    out_dir = Path(args.out).with_suffix("")
    scorer = get_scorer("harmful_loss", max_length=args.max_length, batch_size=8)
    ppl = get_scorer("perplexity", max_length=args.max_length, batch_size=8)

    def grid(model):
        curves = []
        for fam, lrs, extra in (("full", [3e-5, 8e-5], {}), ("lora", [3e-4], {"lr_scheduler_type": "cosine",
                                                                                "warmup_steps": 1})):
            cfg = AttackConfig(family=fam, learning_rates=lrs, seeds=[0, 1] if fam == "full" else [0],
                               max_steps=args.attack_steps, eval_every=args.eval_every,
                               batch_size=args.attack_batch, max_length=args.max_length,
                               output_dir=str(out_dir), **extra)
            curves += HarmfulFineTuningAttack(cfg, scorer=scorer).run(model, tok, train, ev).curves
        return curves

    t = time.perf_counter()
    base_curves = grid(base)
    full = [c for c in base_curves if c.config["family"] == "full"]
    phi = statistics.median(next(pt.value for pt in c.points if pt.step == args.phi_step) for c in full)
    base_cap = {"chat": ppl.score(base, tok, chat).value, "shakespeare": ppl.score(base, tok, shakes).value}
    base_x = [first_crossing(c, phi, True) for c in base_curves]
    print(f"base: phi={phi:.4f} caps={base_cap} crossings={[x and round(x.step, 2) for x in base_x]} "
          f"({time.perf_counter() - t:.0f} s)", flush=True)

    for setting in json.loads(args.settings):
        t = time.perf_counter()
        setting = dict(setting)
        name = setting.pop("defense")
        spec = get_defense(name)
        model = copy.deepcopy(base)
        cfg = spec.config_class(output_dir=str(out_dir / "defense"), save_strategy="no", report_to="none",
                                disable_tqdm=True, use_cpu=True, seed=0, logging_steps=5, **setting)
        spec.trainer_class(model=model, args=cfg, harmful_dataset=train, retain_dataset=retain,
                           processing_class=tok).train()
        model.eval()
        t_def = time.perf_counter() - t
        cap = {"chat": ppl.score(model, tok, chat).value, "shakespeare": ppl.score(model, tok, shakes).value}
        change = {k: cap[k] / base_cap[k] - 1 for k in cap}
        curves = grid(model)
        mult = []
        for bc, c in zip(base_curves, curves):
            bx, x = first_crossing(bc, phi, True), first_crossing(c, phi, True)
            b = bx.step if bx else float("inf")
            i = x.step if x else float("inf")
            mult.append(round(i / b, 3) if b > 0 else None)
        row = {"defense": name, **setting, "defense_s": round(t_def), "total_s": round(time.perf_counter() - t),
               "stability": {k: round(v, 4) for k, v in change.items()}, "phi": phi,
               "f0": curves[0].points[0].value, "multiples": mult,
               "worst": min(m for m in mult if m is not None),
               "runs": [dict(c.config) for c in curves]}
        print(json.dumps(row), flush=True)
        with open(args.out, "a") as fh:
            fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
