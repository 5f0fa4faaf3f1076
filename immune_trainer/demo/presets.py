"""The demo's budgets: the three presets (:data:`PRESETS`, :func:`preset_table`), the options of
``immune-trainer demo`` (:class:`DemoConfig`) and the attack grids they give (:func:`attack_suite`,
:func:`generalization_suite`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ConfigError

__all__ = [
    "DEFENSE_RECIPES",
    "PRESETS",
    "DemoConfig",
    "attack_suite",
    "calibration_config",
    "defense_recipe",
    "generalization_suite",
    "preset_table",
]

# Budgets of each preset. Every value can be overridden from the command line. The default is sized for
# a 2-core CPU (see the README's profile): attacks at batch 2 on sequences of at most 96 tokens, harm on 8
# held-out pairs every 2 steps, runs that stop once their crossing of phi is bracketed, and everything that
# depends only on the base model kept in the user cache.
PRESETS: dict[str, dict] = {
    "quick": dict(
        defense_steps=4,
        defense_lr=3e-5,
        attack_families=["full", "mixed"],
        attack_learning_rates=[8e-5],
        lora_learning_rate=1e-3,
        attack_seeds=[0],
        generalization_seeds=[0],
        attack_steps=4,
        eval_every=2,
        eval_pairs=4,
        generalization_steps=2,
        reference_rows=6,
        benign_steps=4,
        benign_eval_every=2,
        side_effect_prompts=4,
        side_effect_templates=["plain", "prefix_injection"],
        helpfulness_requests=6,
        helpfulness_task_rows=4,
        attacked_harm_prompts=4,
        max_length=80,
        batch_size=2,
        attack_batch_size=2,
        calibrate_trials=2,
        calibrate_seeds=2,
    ),
    "default": dict(
        defense_steps=16,
        defense_lr=7.26e-5,
        attack_families=["full", "lora", "mixed"],
        attack_learning_rates=[8e-5],
        lora_learning_rate=1e-3,
        attack_seeds=[0],
        generalization_seeds=[0],
        attack_steps=8,
        eval_every=2,
        eval_pairs=8,
        generalization_steps=8,
        reference_rows=8,
        benign_steps=8,
        benign_eval_every=4,
        side_effect_prompts=12,
        side_effect_templates=["plain", "refusal_suppression", "prefix_injection"],
        helpfulness_requests=10,
        helpfulness_task_rows=6,
        attacked_harm_prompts=8,
        max_length=96,
        batch_size=4,
        attack_batch_size=2,
        calibrate_trials=3,
        calibrate_seeds=2,
    ),
    "full": dict(
        defense_steps=250,
        defense_lr=3e-5,
        attack_families=["full", "lora", "mixed", "benign", "identity_shift"],
        attack_learning_rates=[3e-5, 8e-5],
        lora_learning_rate=1e-3,
        attack_seeds=[0, 1, 2],
        generalization_seeds=[0, 1, 2],
        attack_steps=60,
        eval_every=5,
        eval_pairs=38,
        generalization_steps=60,
        reference_rows=64,
        benign_steps=60,
        benign_eval_every=10,
        side_effect_prompts=50,
        side_effect_templates=[
            "plain",
            "refusal_suppression",
            "prefix_injection",
            "roleplay",
            "hypothetical",
        ],
        helpfulness_requests=36,
        helpfulness_task_rows=32,
        attacked_harm_prompts=32,
        max_length=256,
        batch_size=4,
        attack_batch_size=4,
        calibrate_trials=8,
        calibrate_seeds=3,
    ),
}


#: The demo's recipe per defense: values tuned for the embedded model (gradient_ascent's by
#: scripts/recipe_sweep.py) or chosen for a CPU step (RepNoise's layer stride). They apply only to the defense
#: named, and only where the command line leaves the option unset: every other defense keeps its own
#: defaults (a weight tuned for one defense means something else in another: Booster's alpha is a step size).
DEFENSE_RECIPES: dict[str, dict[str, float]] = {
    "gradient_ascent": {"alpha": 3.55, "retain_weight": 5.89},
    "repnoise": {"layer_stride": 5},
}


def defense_recipe(defense: str, cfg) -> dict:
    """The recipe options of ``defense`` under ``cfg``: the command line's values where set, else the
    defense's entry of :data:`DEFENSE_RECIPES`; options neither sets are left out (the defense's default)."""
    out = dict(DEFENSE_RECIPES.get(defense, {}))
    for key in ("alpha", "beta", "retain_weight", "layer_stride", "harmless_weight"):
        value = getattr(cfg, key)
        if value is not None:
            out[key] = value
    return out


def preset_table() -> str:
    """The budgets of the three presets as a markdown table (the README shows it; a test keeps them equal)."""

    def show(value) -> str:
        if isinstance(value, list):
            return ", ".join(str(v) for v in value)
        return f"{value:g}" if isinstance(value, float) else str(value)

    names = list(PRESETS)
    lines = ["| option | " + " | ".join(f"`--{n}`" if n != "default" else "default" for n in names) + " |"]
    lines.append("|---" * (len(names) + 1) + "|")
    for key in PRESETS["default"]:
        lines.append(f"| `{key}` | " + " | ".join(show(PRESETS[n][key]) for n in names) + " |")
    return "\n".join(lines)


@dataclass
class DemoConfig:
    """Options of ``immune-trainer demo`` (unset budget values come from the preset)."""

    output_dir: str = field(default="demo_output", metadata={"help": "Where the report, plot and card go."})
    quick: bool = field(default=False, metadata={"help": "CI smoke preset: a few minutes, tiny budgets."})
    full: bool = field(default=False, metadata={"help": "A real budget (hours on a CPU)."})
    defense: list[str] = field(
        default_factory=lambda: ["gradient_ascent"],
        metadata={
            "help": "Defense(s) from the registry; several give one report each under output_dir/<name>/ "
            "(compare them with immune-trainer compare)."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of the data splits and the defense."})
    alpha: float | None = field(
        default=None,
        metadata={
            "help": "Weight of the defense's alpha term (its meaning is the defense's: gradient_ascent's and "
            "RepNoise's ascent, Booster's perturbation step, ...); unset: the recipe of DEFENSE_RECIPES, else "
            "the defense's own default."
        },
    )
    beta: float | None = field(
        default=None, metadata={"help": "The defense's beta (RepNoise's noise weight, ...); unset: its default."}
    )
    retain_weight: float | None = field(
        default=None,
        metadata={
            "help": "Weight of the benign retain loss; unset: the recipe of DEFENSE_RECIPES, else the defense's "
            "own default."
        },
    )
    layer_stride: int | None = field(
        default=None,
        metadata={
            "help": "RepNoise: use every N-th layer (and the last) for the noise and ascent terms (unset: 5 in "
            "the demo, as the logit lens over a 49k vocabulary dominates a CPU step)."
        },
    )
    defense_steps: int | None = field(default=None, metadata={"help": "Defense optimizer steps."})
    defense_lr: float | None = field(default=None, metadata={"help": "Defense learning rate."})
    harmless_weight: float | None = field(
        default=None,
        metadata={
            "help": "Weight of the defense's harmless term (CE of a refusal to each harmful prompt); unset, "
            "each defense's own default. 0 saves a pass per step, but the default defense then refuses less "
            "under jailbreak templates (see the README)."
        },
    )
    attack_families: list[str] | None = field(
        default=None,
        metadata={"help": "Attack families of the resistance grid (immune-trainer attacks lists them)."},
    )
    attack_learning_rates: list[float] | None = field(
        default=None, metadata={"help": "Learning rates of every attack family except lora."}
    )
    lora_learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "Learning rate of the LoRA attack (cosine schedule, warm-up over a tenth of the budget)."
        },
    )
    attack_seeds: list[int] | None = field(
        default=None,
        metadata={"help": "Seeds of every attack setting (each crossing is shown with its spread)."},
    )
    generalization_seeds: list[int] | None = field(
        default=None,
        metadata={"help": "Seeds of the in-domain and cross-domain attacks (full fine-tuning)."},
    )
    attack_steps: int | None = field(default=None, metadata={"help": "Attack budget in steps."})
    eval_every: int | None = field(default=None, metadata={"help": "Measure harm every N attack steps."})
    eval_pairs: int | None = field(
        default=None, metadata={"help": "Held-out harmful pairs harm is measured on."}
    )
    generalization_steps: int | None = field(
        default=None, metadata={"help": "Budget of the in-domain and cross-domain attacks."}
    )
    reference_rows: int | None = field(
        default=None, metadata={"help": "Rows of each stability reference set."}
    )
    benign_steps: int | None = field(default=None, metadata={"help": "Steps of the benign fine-tune."})
    benign_eval_every: int | None = field(default=None, metadata={"help": "Benign evaluation interval."})
    side_effect_prompts: int | None = field(
        default=None, metadata={"help": "Held-out harmful prompts of the side-effects check (0: skip it)."}
    )
    side_effect_templates: list[str] | None = field(
        default=None, metadata={"help": "Jailbreak templates of the side-effects check."}
    )
    helpfulness_requests: int | None = field(
        default=None,
        metadata={
            "help": "Benign requests (embedded:benign_requests, XSTest-style) answered for the over-refusal "
            "check of helpfulness (0: skip it)."
        },
    )
    helpfulness_task_rows: int | None = field(
        default=None,
        metadata={"help": "Arithmetic questions answered (generated) for helpfulness's exact match (0: skip)."},
    )
    attacked_harm_prompts: int | None = field(
        default=None,
        metadata={
            "help": "Held-out harmful prompts each attacked model answers (refusal rate, offline judge's harm; "
            "0: skip)."
        },
    )
    max_length: int | None = field(default=None, metadata={"help": "Longest tokenized example."})
    batch_size: int | None = field(default=None, metadata={"help": "Batch size of the defense."})
    attack_batch_size: int | None = field(default=None, metadata={"help": "Batch size of the attacks."})
    threshold: float | None = field(
        default=None,
        metadata={
            "help": "phi for the harmful loss; None: the base model's median after eval_every steps of the "
            "full fine-tuning attacks."
        },
    )
    fixed_grid: bool = field(
        default=False,
        metadata={
            "help": "Attack with the fixed grid (one picked learning rate and batch per family) instead of the "
            "calibrated search; the card then says 'fixed grid, not searched'."
        },
    )
    calibrate_trials: int | None = field(
        default=None, metadata={"help": "Trials of the calibrated search per attack family and model."}
    )
    calibrate_seeds: int | None = field(
        default=None, metadata={"help": "Seeds each winning attack setting runs on (the worst counts)."}
    )
    no_cache: bool = field(
        default=False,
        metadata={"help": "Recompute the base model's measurements instead of reusing the user cache."},
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


def attack_suite(cfg: DemoConfig):
    """The demo's resistance grid: one :class:`AttackConfig` per family (each with its own learning rate
    and schedule where the family needs one), every setting with every seed."""
    from ..attacks import AttackConfig

    common = dict(
        seeds=list(cfg.attack_seeds),
        max_steps=cfg.attack_steps,
        eval_every=cfg.eval_every,
        batch_size=cfg.attack_batch_size,
        max_length=cfg.max_length,
    )  # the runs are kept in the evaluation's cache_dir (the user cache) unless --no_cache
    suite = []
    for family in cfg.attack_families:
        if family == "lora":
            suite.append(
                AttackConfig(
                    families=["lora"],
                    learning_rates=[cfg.lora_learning_rate],
                    lr_scheduler_types=["cosine"],
                    warmup_ratio=0.1,
                    **common,
                )
            )
        elif family == "mixed":
            suite.append(
                AttackConfig(
                    families=["mixed"],
                    learning_rates=list(cfg.attack_learning_rates),
                    harmful_shares=[0.3],
                    **common,
                )
            )
        else:
            suite.append(
                AttackConfig(families=[family], learning_rates=list(cfg.attack_learning_rates), **common)
            )
    return suite


def calibration_config(cfg: DemoConfig):
    """The demo's calibrated search: a few pruned trials per family and model over a small space (learning
    rate 3e-5..1e-3, LoRA's ten times that, whose top breaks the base model's capability; batch 2 or 4; LoRA
    rank; harmful share), adamw at a constant rate; ``--full`` searches every axis."""
    from ..attacks import CalibrationConfig

    if cfg.full:
        return CalibrationConfig(calibrate_trials=cfg.calibrate_trials, calibrate_seeds=cfg.calibrate_seeds)
    return CalibrationConfig(
        calibrate_trials=cfg.calibrate_trials,
        calibrate_seeds=cfg.calibrate_seeds,
        calibrate_space=["learning_rate", "batch_size", "lora_rank", "harmful_share"],
        lr_min=3e-5,
        lr_max=1e-3,
        batch_size_choices=[2, 4],
        lora_rank_choices=[8, 16],
        harmful_share_choices=[0.3, 1.0],
        calibrate_pruner="median",
    )


def generalization_suite(cfg: DemoConfig):
    """The in-domain and cross-domain attack: full fine-tuning at the grid's learning rates, with
    ``generalization_seeds`` (the evaluation sets its budget, ``generalization_steps``)."""
    from ..attacks import AttackConfig, AttackSuite

    return AttackSuite(
        [
            AttackConfig(
                families=["full"],
                learning_rates=list(cfg.attack_learning_rates),
                seeds=list(cfg.generalization_seeds),
                max_steps=cfg.generalization_steps,
                eval_every=cfg.eval_every,
                batch_size=cfg.attack_batch_size,
                max_length=cfg.max_length,
            )
        ]
    )
