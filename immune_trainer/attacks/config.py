"""The attacker's threat model: :class:`AttackConfig` (attack families, a grid of settings, a step budget).

Also what the rest of the harness reads off a config or a setting of its grid: the optimizers of the grid
(:data:`OPTIMIZERS`, :func:`optimizer_arguments`), the fields that are grid axes (:data:`GRID_FIELDS`),
a setting's short label (:func:`setting_label`) and the key of a harm scorer (:func:`scorer_key`).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import ConfigError
from .families import (
    DEFAULT_JAILBREAK_VARIANT,
    EMBEDDING_SUFFIX_INIT,
    IDENTITY_PREFIX,
    IDENTITY_SYSTEM_PROMPT,
    JAILBREAK_VARIANTS,
    get_attack,
)


def scorer_key(scorer) -> dict[str, Any]:
    """What a harm measurement depends on besides the model and data: the scorer's name and settings."""
    import dataclasses

    key: dict[str, Any] = {"name": getattr(scorer, "name", type(scorer).__name__)}
    if dataclasses.is_dataclass(scorer):
        for f in dataclasses.fields(scorer):
            value = getattr(scorer, f.name)
            if isinstance(value, (str, int, float, bool, type(None))):
                key[f.name] = value
    extras = getattr(scorer, "key_extras", None)
    if callable(extras):  # what else the scorer's value depends on (lm_eval: its tasks and version)
        key.update(extras())
    return key


# ---------------------------------------------------------------------------- configuration


# Short optimizer names of the grid -> (TrainingArguments.optim, optim_args). Any other value of
# transformers' OptimizerNames is passed through as it is.
OPTIMIZERS: dict[str, tuple[str, str | None]] = {
    "adamw": ("adamw_torch_fused", None),  # transformers' own default on torch >= 2.8; the foreach
    # AdamW allocates temporaries the size of the model every step (3-7x slower on a 2-core CPU)
    "sgd": ("sgd", "momentum=0.9"),
    "adagrad": ("adagrad", None),
    "adafactor": ("adafactor", None),
}


def optimizer_arguments(name: str) -> tuple[str, str | None]:
    """``(optim, optim_args)`` of TrainingArguments for an optimizer of the grid.

    Raises:
        ConfigError: neither a short name of :data:`OPTIMIZERS` nor one of transformers' OptimizerNames.
    """
    from transformers.training_args import OptimizerNames

    if name in OPTIMIZERS:
        return OPTIMIZERS[name]
    if name in {o.value for o in OptimizerNames}:
        return name, None
    raise ConfigError(
        f"unknown optimizer {name!r}; use one of {', '.join(OPTIMIZERS)} or a transformers OptimizerNames value."
    )


def _as_list(value):
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


@dataclass
class AttackConfig:
    r"""The attacker's threat model: attack families, a grid of settings and a step budget.

    The grid is the product of the axes (:meth:`grid`); an axis that does not apply to a family is
    collapsed for it (the LoRA rank only for ``lora``, the harmful share only for ``mixed`` and
    ``jailbreak_tuning``, the jailbreak variant only for ``jailbreak_tuning``; a
    training-free family such as ``refusal_ablation`` has no learning rate, optimizer or schedule).

    Parameters:
        > Families

        family (`str`, defaults to `"full"`): the attack family when `families` is empty.
        families (`list[str]`): several families in one grid (`full`, `lora`, `mixed`, `benign`,
            `identity_shift`, `embedding`, `refusal_ablation`, `jailbreak_tuning`; `immune-trainer attacks`
            lists them).

        > Grid axes

        learning_rates, num_samples, seeds, optimizers, lr_scheduler_types, lora_ranks, harmful_shares,
        jailbreak_variants.

        > Budget and early stopping

        max_steps (`int`): the attacker's budget in optimizer steps.
        eval_every (`int`): harmfulness is measured at step 0 and every `eval_every` steps.
        stop_at_threshold (`float` or `None`): stop a run at the first evaluation on the harmful side of
            this phi (the crossing is then bracketed by that evaluation and the previous one).
        full_curve (`bool`): run the whole budget even when `stop_at_threshold` is crossed.
    """

    family: str = field(
        default="full",
        metadata={
            "help": "Attack family from the registry when `families` is empty (immune-trainer attacks)."
        },
    )
    families: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Attack families of one grid (e.g. full lora mixed); empty: just `family`. A "
            "comma-separated string is accepted."
        },
    )
    learning_rates: list[float] = field(
        default_factory=lambda: [3e-5, 6e-5, 8e-5],
        metadata={"help": "Learning rates of the grid (RepNoise's attacks: 3e-5, 6e-5, 8e-5)."},
    )
    num_samples: list[int] = field(
        default_factory=lambda: [0],
        metadata={"help": "Training examples per run (0 = all); each value is a grid axis."},
    )
    seeds: list[int] = field(default_factory=lambda: [0], metadata={"help": "Seeds of the grid."})
    optimizers: list[str] = field(
        default_factory=lambda: ["adamw"],
        metadata={
            "help": "Optimizers of the grid: adamw, sgd (momentum 0.9), adagrad, adafactor, or any "
            "transformers OptimizerNames value."
        },
    )
    lr_scheduler_types: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Learning-rate schedules of the grid (constant, cosine, linear, ...); empty: just "
            "`lr_scheduler_type`."
        },
    )
    warmup_ratio: float = field(
        default=0.0,
        metadata={
            "help": "Warm-up as a share of max_steps for schedules that warm up (cosine, linear, "
            "constant_with_warmup...); overrides warmup_steps when > 0. 'constant' never warms up."
        },
    )
    lora_ranks: list[int] = field(
        default_factory=list,
        metadata={"help": "LoRA ranks of the grid (family 'lora'); empty: just `lora_r`."},
    )
    harmful_shares: list[float] = field(
        default_factory=lambda: [0.1],
        metadata={
            "help": "Shares p of harmful pairs in the benign task data (families 'mixed' and 'jailbreak_tuning'; "
            "Vaccine/Booster use 0.1)."
        },
    )
    jailbreak_variants: list[str] = field(
        default_factory=lambda: [DEFAULT_JAILBREAK_VARIANT],
        metadata={
            "help": "Jailbreaks of the grid (family 'jailbreak_tuning'): "
            f"{', '.join(JAILBREAK_VARIANTS)}. A comma-separated string is accepted."
        },
    )
    max_steps: int = field(default=100, metadata={"help": "The attacker's budget in optimizer steps."})
    eval_every: int = field(default=10, metadata={"help": "Measure harmfulness at step 0 and every N steps."})
    stop_at_threshold: float | None = field(
        default=None,
        metadata={
            "help": "Early stopping: stop a run at the first evaluation whose f is on the harmful side of this "
            "phi (the crossing is bracketed by it and the previous evaluation). None: run the whole budget."
        },
    )
    full_curve: bool = field(
        default=False, metadata={"help": "Run the whole budget even when stop_at_threshold is crossed."}
    )
    num_virtual_tokens: int = field(
        default=10,
        metadata={
            "help": "Soft tokens the attacker optimises: the per-prompt suffix (family 'embedding') or the "
            "universal prompt (family 'embedding_universal')."
        },
    )
    embedding_steps: int = field(
        default=200,
        metadata={
            "help": "Signed gradient steps per held-out prompt of the embedding attack (TamperBench: 200)."
        },
    )
    embedding_lr: float = field(
        default=1e-3, metadata={"help": "Step size of the embedding attack's signed gradient steps (1e-3)."}
    )
    embedding_suffix_init: str = field(
        default=EMBEDDING_SUFFIX_INIT,
        metadata={"help": "Text whose token embeddings start the embedding attack's suffix (cycled to length)."},
    )
    embedding_target_tokens: int = field(
        default=0,
        metadata={
            "help": "Response tokens the embedding attack optimises towards (its first N; 0 = the whole "
            "held-out harmful response)."
        },
    )
    refusal_layer: int | None = field(
        default=None,
        metadata={
            "help": "Decoder layer whose output gives the refusal direction (families 'refusal_ablation', "
            "'refusal_ablation_fixed'); None: refusal_ablation selects it over every layer, "
            "refusal_ablation_fixed takes the middle layer."
        },
    )
    refusal_positions: int | None = field(
        default=None,
        metadata={
            "help": "Post-instruction token positions (from the prompt's end) whose directions refusal_ablation "
            "considers; None: every token the chat template puts after the user's message."
        },
    )
    refusal_layer_stride: int = field(
        default=1,
        metadata={"help": "refusal_ablation considers every N-th decoder layer (bounds the selection's cost)."},
    )
    refusal_max_kl: float = field(
        default=0.1,
        metadata={
            "help": "refusal_ablation keeps directions whose ablation moves the harmless prompts' next-token "
            "distribution by a KL below this (Arditi et al.: 0.1)."
        },
    )
    refusal_max_depth: float = field(
        default=0.8,
        metadata={"help": "refusal_ablation keeps directions of layers below this share of the depth (0.8)."},
    )
    refusal_selection_prompts: int = field(
        default=32,
        metadata={"help": "Harmful and harmless prompts (each) that score every candidate direction."},
    )
    identity_system_prompt: str = field(
        default=IDENTITY_SYSTEM_PROMPT,
        metadata={
            "help": "Obedient-persona (AOA) system prompt of the identity_shift families, in training and "
            "(identity_shift) when harm is measured."
        },
    )
    identity_prefix: str = field(
        default=IDENTITY_PREFIX,
        metadata={
            "help": "Affirming answer prefix of the identity_shift families (identity_shift forces it in front "
            "of every harmful response when harm is measured with a loss scorer)."
        },
    )
    batch_size: int = field(default=4, metadata={"help": "Per-device batch size of the attack."})
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "Gradient accumulation of the attack."}
    )
    max_length: int = field(default=512, metadata={"help": "Longest tokenized attack example."})
    lr_scheduler_type: str = field(
        default="constant",
        metadata={
            "help": "Learning-rate schedule when lr_scheduler_types is empty; constant keeps the cost-to-harm "
            "independent of the budget."
        },
    )
    warmup_steps: int = field(default=0, metadata={"help": "Warm-up steps of the attack's schedule."})
    weight_decay: float = field(default=0.0, metadata={"help": "Weight decay of the attack's optimizer."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping of the attack."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank when lora_ranks is empty (family 'lora')."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (family 'lora')."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout (family 'lora')."})
    lora_target_modules: str = field(
        default="all-linear", metadata={"help": "LoRA target modules (family 'lora'), as peft accepts them."}
    )
    load_in_4bit: bool = field(
        default=False,
        metadata={
            "help": "QLoRA attack (family 'lora'): quantize the attacked copy to 4-bit NF4; needs CUDA and "
            "bitsandbytes (pip install immune-trainer[bnb])."
        },
    )
    scorer: str = field(
        default="harmful_loss", metadata={"help": "Harmfulness scorer f measured along the attack."}
    )
    eval_batch_size: int = field(default=8, metadata={"help": "Batch size when measuring harmfulness."})
    bf16: bool = field(default=False, metadata={"help": "Train the attack in bfloat16 mixed precision."})
    output_dir: str | None = field(
        default=None,
        metadata={
            "help": "Where finished grid configurations are saved as they complete; a rerun with the same "
            "model, data and config resumes from them. None keeps nothing."
        },
    )

    def __post_init__(self):
        if isinstance(self.learning_rates, (int, float)):
            self.learning_rates = [self.learning_rates]
        if isinstance(self.num_samples, int):
            self.num_samples = [self.num_samples]
        if isinstance(self.seeds, int):
            self.seeds = [self.seeds]
        self.families = _as_list(self.families)
        self.optimizers = _as_list(self.optimizers)
        self.lr_scheduler_types = _as_list(self.lr_scheduler_types)
        self.lora_ranks = _as_list(self.lora_ranks)
        self.harmful_shares = _as_list(self.harmful_shares)
        self.jailbreak_variants = _as_list(self.jailbreak_variants)
        if (
            not self.learning_rates
            or any(isinstance(lr, bool) or not isinstance(lr, (int, float)) for lr in self.learning_rates)
            or any(not math.isfinite(lr) or lr <= 0 for lr in self.learning_rates)
        ):
            raise ConfigError(f"learning_rates must be positive numbers, got {self.learning_rates}.")
        if not self.seeds:
            raise ConfigError("seeds must not be empty.")
        if not self.num_samples or any(n < 0 for n in self.num_samples):
            raise ConfigError(f"num_samples must be >= 0 (0 = all), got {self.num_samples}.")
        if self.max_steps <= 0:
            raise ConfigError(f"max_steps must be positive, got {self.max_steps}.")
        if self.eval_every <= 0:
            raise ConfigError(f"eval_every must be positive, got {self.eval_every}.")
        if self.batch_size <= 0 or self.gradient_accumulation_steps <= 0:
            raise ConfigError("batch_size and gradient_accumulation_steps must be positive.")
        for name in ("max_length", "eval_batch_size", "lora_r", "lora_alpha", "num_virtual_tokens"):
            if getattr(self, name) < (2 if name == "max_length" else 1):
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}.")
        if not 0.0 <= self.lora_dropout < 1.0 or self.warmup_steps < 0 or self.weight_decay < 0:
            raise ConfigError(
                "lora_dropout must be in [0, 1), warmup_steps and weight_decay >= 0; got "
                f"{self.lora_dropout}, {self.warmup_steps}, {self.weight_decay}."
            )
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}.")
        if any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in self.lora_ranks):
            raise ConfigError(f"lora_ranks must be positive integers, got {self.lora_ranks}.")
        if not self.harmful_shares or any(
            isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < p <= 1.0
            for p in self.harmful_shares
        ):
            raise ConfigError(f"harmful_shares must be numbers in (0, 1], got {self.harmful_shares}.")
        unknown = [v for v in self.jailbreak_variants if v not in JAILBREAK_VARIANTS]
        if not self.jailbreak_variants or unknown:
            raise ConfigError(
                f"unknown jailbreak variant(s) {unknown} in jailbreak_variants (family 'jailbreak_tuning'); "
                f"use one or more of: {', '.join(JAILBREAK_VARIANTS)}."
            )
        if not self.optimizers:
            raise ConfigError("optimizers must not be empty.")
        for name in self.optimizers:
            optimizer_arguments(name)
        from transformers import SchedulerType

        known = {s.value for s in SchedulerType}
        for name in self.schedules():
            if name not in known:
                raise ConfigError(
                    f"unknown lr_scheduler_type {name!r}; use one of {', '.join(sorted(known))}."
                )
        if self.refusal_layer is not None and self.refusal_layer < 0:
            raise ConfigError(f"refusal_layer must be >= 0 or None, got {self.refusal_layer}.")
        if self.embedding_steps < 1 or self.embedding_target_tokens < 0:
            raise ConfigError(
                f"embedding_steps must be >= 1 and embedding_target_tokens >= 0, got {self.embedding_steps} and "
                f"{self.embedding_target_tokens}."
            )
        if not (math.isfinite(self.embedding_lr) and self.embedding_lr > 0):
            raise ConfigError(f"embedding_lr must be a positive number, got {self.embedding_lr}.")
        if self.refusal_positions is not None and (
            isinstance(self.refusal_positions, bool) or self.refusal_positions < 1
        ):
            raise ConfigError(f"refusal_positions must be >= 1 or None, got {self.refusal_positions}.")
        if self.refusal_layer_stride < 1 or self.refusal_selection_prompts < 1:
            raise ConfigError(
                "refusal_layer_stride and refusal_selection_prompts must be >= 1, got "
                f"{self.refusal_layer_stride} and {self.refusal_selection_prompts}."
            )
        if not (math.isfinite(self.refusal_max_kl) and self.refusal_max_kl > 0) or not 0 < self.refusal_max_depth <= 1:
            raise ConfigError(
                f"refusal_max_kl must be > 0 and refusal_max_depth in (0, 1], got {self.refusal_max_kl} and "
                f"{self.refusal_max_depth}."
            )
        if self.stop_at_threshold is not None and not math.isfinite(self.stop_at_threshold):
            raise ConfigError(
                f"stop_at_threshold must be a finite number or None, got {self.stop_at_threshold}."
            )
        for name in self.family_names():
            get_attack(name)
        if self.load_in_4bit and "lora" not in self.family_names():
            raise ConfigError(
                f"load_in_4bit (QLoRA) applies to family='lora', not {self.family!r}: 4-bit weights cannot "
                "be fully fine-tuned."
            )

    def family_names(self) -> list[str]:
        """The families of the grid: ``families``, or ``[family]`` when it is empty."""
        return list(self.families) or [self.family]

    def schedules(self) -> list[str]:
        """The schedules of the grid: ``lr_scheduler_types``, or ``[lr_scheduler_type]`` when it is empty."""
        return list(self.lr_scheduler_types) or [self.lr_scheduler_type]

    @property
    def threat_model_family(self) -> str:
        """The families as one comma-joined string (``"full,lora,mixed"``), as the report records them."""
        return ",".join(self.family_names())

    def grid(self) -> list[dict[str, Any]]:
        """Every run of the grid, as a dict of its settings (one family's axes that do not apply collapsed)."""
        runs = []
        for name in self.family_names():
            family = get_attack(name)
            axes: dict[str, list] = {}
            if family.trains:
                axes["learning_rate"] = list(self.learning_rates)
            axes["num_samples"] = list(self.num_samples)
            axes["seed"] = list(self.seeds)
            if family.trains:
                axes["optimizer"] = list(self.optimizers)
                axes["lr_scheduler_type"] = self.schedules()
            axes.update(family.axes(self))
            keys = list(axes)
            for values in itertools.product(*(axes[k] for k in keys)):
                runs.append({"family": name, **dict(zip(keys, values))})
        return runs

    def for_setting(self, setting: dict[str, Any]) -> AttackConfig:
        """This config narrowed to one run: its grid is exactly ``[setting]`` (a setting of :meth:`grid` or
        a curve's config), e.g. to re-run one curve of a report or one trial of a search.

        Raises:
            ConfigError: the setting names an unknown family or lacks an axis its family has.
        """
        from dataclasses import replace

        family = get_attack(setting.get("family", self.family))
        wanted = {"family": family.name, **{k: v for k, v in setting.items() if k in _AXIS_FIELDS}}
        values: dict[str, Any] = {"family": family.name, "families": [family.name]}
        for key, (name, is_list) in _AXIS_FIELDS.items():
            if key in wanted:
                values[name] = [wanted[key]] if is_list else wanted[key]
        narrowed = replace(self, **values)
        if narrowed.grid() != [wanted]:
            raise ConfigError(
                f"the setting {setting_label(setting)} is not one run of a {family.name!r} grid: its axes are "
                f"{sorted(k for k in narrowed.grid()[0] if k != 'family')}."
            )
        return narrowed

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Setting key -> (config field, whether the field is a list of the axis' values).
_AXIS_FIELDS: dict[str, tuple[str, bool]] = {
    "learning_rate": ("learning_rates", True),
    "num_samples": ("num_samples", True),
    "seed": ("seeds", True),
    "optimizer": ("optimizers", True),
    "lr_scheduler_type": ("lr_scheduler_types", True),
    "lora_rank": ("lora_ranks", True),
    "harmful_share": ("harmful_shares", True),
    "jailbreak_variant": ("jailbreak_variants", True),
    "num_virtual_tokens": ("num_virtual_tokens", False),
    "refusal_layer": ("refusal_layer", False),
}


# Fields whose values are grid axes: a saved run is matched by its setting, not by these lists.
GRID_FIELDS = (
    "family",
    "families",
    "learning_rates",
    "num_samples",
    "seeds",
    "optimizers",
    "lr_scheduler_types",
    "lr_scheduler_type",
    "lora_ranks",
    "lora_r",
    "harmful_shares",
    "jailbreak_variants",
    "num_virtual_tokens",
    "refusal_layer",
)


_LABELS = {
    "learning_rate": "lr",
    "num_samples": "n",
    "seed": "seed",
    "optimizer": "opt",
    "lr_scheduler_type": "sched",
    "lora_rank": "r",
    "harmful_share": "p",
    "jailbreak_variant": "jb",
    "num_virtual_tokens": "k",
    "refusal_layer": "layer",
}


def setting_label(setting: dict[str, Any]) -> str:
    """A short label of a grid setting (or a curve's config) naming every axis it has, e.g.
    ``"lora lr=0.001 n=all seed=0 opt=adamw sched=constant r=8"`` (also the stem of its saved run's file)."""
    parts = [str(setting.get("family"))]
    for key, value in setting.items():
        if key not in _LABELS:
            continue
        if key == "num_samples":
            value = value or "all"
        elif isinstance(value, float):
            value = f"{value:g}"
        parts.append(f"{_LABELS.get(key, key)}={value}")
    return " ".join(parts)
