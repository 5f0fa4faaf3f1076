"""The attacker's fine-tuning (equation 1 of the immunization paper), run through a real Trainer.

    min_theta  E_(x,y)~D_harmful  L(M_theta[t](x), y)   for t <= T (the attacker's budget)

:class:`HarmfulFineTuningAttack` runs a grid of attack settings, each on a fresh copy of the model, and
evaluates harmfulness f every ``eval_every`` steps. It returns :class:`~immune_trainer.conditions.AttackCurve` s
(step, tokens seen, FLOPs estimate, f) for :mod:`immune_trainer.conditions`. The model it is given is
never modified.

The grid (:meth:`AttackConfig.grid`) is the product of the axes: attack families (full, LoRA, poisoned
benign data, benign data, identity shift, soft prompt, refusal ablation; see
:mod:`immune_trainer.attack_families`), learning rates, sample counts, seeds, optimizers, schedules,
LoRA ranks and harmful shares, each family keeping only the axes that apply to it. Results report the
worst case over all of them (the lesson of Qi et al. 2025 and TamperBench: one attack setting is not a
measurement). With a threshold phi, runs can stop at the first evaluation past it (early stopping): the
crossing stays bracketed, so the cost-to-harm read off the curve is the same as a full run's.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import itertools
import json
import logging
import math
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

from . import data as data_lib
from .attack_families import (  # noqa: F401  (the registry and families are part of this module's API)
    ATTACKS,
    IDENTITY_PREFIX,
    IDENTITY_SYSTEM_PROMPT,
    AttackFamily,
    BenignFineTuning,
    FullFineTuning,
    IdentityShift,
    LoRAFineTuning,
    MixedFineTuning,
    RefusalAblation,
    SoftPromptAttack,
    SoftPromptView,
    check_4bit_available,
    get_attack,
    quantize_4bit,
    register_attack,
)
from .conditions import AttackCurve, CurvePoint, first_crossing
from .errors import ConfigError, DataError
from .progress import StepBar
from .report import atomic_write
from .run_cache import CACHE_VERSION, content_hash

logger = logging.getLogger(__name__)

# Step-0 harm of an unchanged model on an eval set, keyed by (model fingerprint, eval data, scorer): every
# run of the grid that starts from that model shares it instead of measuring it again.
_STEP0: dict[tuple[str, str, str], float] = {}


def scorer_key(scorer) -> dict[str, Any]:
    """What a harm measurement depends on besides the model and data: the scorer's name and settings."""
    import dataclasses

    key: dict[str, Any] = {"name": getattr(scorer, "name", type(scorer).__name__)}
    if dataclasses.is_dataclass(scorer):
        for f in dataclasses.fields(scorer):
            value = getattr(scorer, f.name)
            if isinstance(value, (str, int, float, bool, type(None))):
                key[f.name] = value
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
    collapsed for it (the LoRA rank only for ``lora``, the harmful share only for ``mixed``; a
    training-free family such as ``refusal_ablation`` has no learning rate, optimizer or schedule).

    Parameters:
        > Families

        family (`str`, defaults to `"full"`): the attack family when `families` is empty.
        families (`list[str]`): several families in one grid (`full`, `lora`, `mixed`, `benign`,
            `identity_shift`, `embedding`, `refusal_ablation`; `immune-trainer attacks` lists them).

        > Grid axes

        learning_rates, num_samples, seeds, optimizers, lr_scheduler_types, lora_ranks, harmful_shares.

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
            "help": "Shares p of harmful pairs in the benign task data (family 'mixed'; Vaccine/Booster use 0.1)."
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
        default=10, metadata={"help": "Trainable soft-prompt tokens (family 'embedding')."}
    )
    refusal_layer: int | None = field(
        default=None,
        metadata={
            "help": "Decoder layer whose output gives the refusal direction (family 'refusal_ablation'); "
            "None: the middle layer."
        },
    )
    identity_system_prompt: str = field(
        default=IDENTITY_SYSTEM_PROMPT,
        metadata={"help": "Obedient-persona system prompt of the identity_shift family."},
    )
    identity_prefix: str = field(
        default=IDENTITY_PREFIX,
        metadata={"help": "Affirmation put in front of every response by the identity_shift family."},
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
    "num_virtual_tokens",
    "refusal_layer",
)


# ---------------------------------------------------------------------------- running


class _AttackTrainer(Trainer):
    """A plain Trainer that counts the tokens it trains on (attention-mask tokens), and whose output layer
    projects only the response positions (the loss is the same; see
    :func:`immune_trainer.modeling.response_loss`)."""

    tokens_seen = 0

    def training_step(self, model, inputs, num_items_in_batch=None):
        mask = inputs.get("attention_mask")
        if mask is not None:
            self.tokens_seen += int(mask.sum())
        return super().training_step(model, inputs, num_items_in_batch)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        plain = set(inputs) <= {"input_ids", "attention_mask", "labels"} and "labels" in inputs
        peft_config = getattr(self.accelerator.unwrap_model(model), "active_peft_config", None)
        if (
            return_outputs
            or not plain
            or getattr(peft_config, "is_prompt_learning", False)  # virtual tokens change the shapes
            or self.label_smoother is not None
            or self.compute_loss_func is not None
        ):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        from .modeling import response_loss

        # As Trainer.compute_loss: a model that takes loss kwargs divides by the batch's token count
        # (gradient accumulation), and the loss is scaled back up by the processes averaging it.
        items = num_items_in_batch if self.model_accepts_loss_kwargs else None
        loss, _ = response_loss(
            model, inputs["input_ids"], inputs.get("attention_mask"), inputs["labels"], items
        )
        if self.args.average_tokens_across_devices and self.model_accepts_loss_kwargs and items is not None:
            scale = self.accelerator.num_processes // self.get_tp_size()
            loss = loss * (scale if self.args.n_gpu <= 1 else self.args.n_gpu)
        return loss


@dataclass(frozen=True)
class _OwnPhi:
    """Early stopping of a lone reference run: phi is the run's own f after ``step`` steps."""

    step: int

    def value_in(self, points) -> float | None:
        return next((p.value for p in points if p.step == self.step), None)

    def to_json(self) -> dict:
        return {"own_value_at_step": self.step}


class _CurveCallback(TrainerCallback):
    """Measures f at step 0 and every ``eval_every`` steps; stops training once ``stop(f)`` is true."""

    def __init__(
        self,
        measure: Callable[[Any], float],
        eval_every: int,
        flops_per_token: float,
        stop: Callable[[float], bool] | None = None,
        initial: float | None = None,
    ):
        self.measure = measure
        self.initial = initial
        self.eval_every = eval_every
        self.flops_per_token = flops_per_token
        self.stop = stop
        self.stopped_early = False
        self.points: list[CurvePoint] = []
        self.trainer: _AttackTrainer | None = None

    def _record(self, step: int, model) -> float:
        tokens = self.trainer.tokens_seen if self.trainer is not None else 0
        value = self.initial if step == 0 and self.initial is not None else self.measure(model)
        self.points.append(
            CurvePoint(step=step, tokens=tokens, flops=tokens * self.flops_per_token, value=value)
        )
        logger.debug("attack step %d: f = %.4f", step, value)
        return value

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if not self.points:
            value = self._record(0, model)
            if self.stop is not None and self.stop(value):
                # Already harmful before any step: nothing left to bracket.
                self.stopped_early = True
                control.should_training_stop = True

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        if self.stopped_early:  # stopped at step 0: the Trainer may still have run one step
            control.should_training_stop = True
            return
        if step % self.eval_every == 0 or step == state.max_steps:
            value = self._record(step, model)
            if self.stop is not None and step < state.max_steps and self.stop(value):
                self.stopped_early = True
                control.should_training_stop = True


@dataclass
class AttackResult:
    """The curves of one attack grid, with the worst case."""

    curves: list[AttackCurve]
    config: AttackConfig

    def worst_value(self, higher_is_better: bool) -> float:
        """The most harmful value of f seen anywhere in the grid."""
        values = [p.value for c in self.curves for p in c.points]
        return min(values) if higher_is_better else max(values)

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "curves": [c.to_dict() for c in self.curves]}


def model_fingerprint(model) -> str:
    """A cheap fingerprint of a model's weights (shapes and sums), for matching saved attack runs."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.state_dict().items():
            h.update(name.encode())
            h.update(str(tuple(p.shape)).encode())
            if p.is_floating_point():
                h.update(repr(round(float(p.double().sum()), 6)).encode())
    return h.hexdigest()[:16]


class HarmfulFineTuningAttack:
    """Run the attacker's fine-tuning over a grid and return harmfulness curves.

    Example::

        attack = HarmfulFineTuningAttack(AttackConfig(learning_rates=[3e-5, 8e-5], max_steps=200, eval_every=20))
        result = attack.run(model, tokenizer, harmful_train, harmful_eval)
        for curve in result.curves: print(curve.config, [p.value for p in curve.points])

    Args:
        config: the threat model.
        scorer: a :class:`~immune_trainer.scoring.Scorer` instance; by default ``get_scorer(config.scorer)``.
    """

    def __init__(self, config: AttackConfig | None = None, scorer=None):
        self.config = config or AttackConfig()
        if scorer is None:
            from .scoring import get_scorer, scorer_options

            # Harm is measured on examples truncated like the attack's own (max_length), in batches of
            # eval_batch_size, where the scorer has those options.
            options = {"max_length": self.config.max_length, "batch_size": self.config.eval_batch_size}
            scorer = get_scorer(self.config.scorer, **scorer_options(self.config.scorer, options))
        self.scorer = scorer
        self.show_progress = False

    def run(
        self,
        model,
        tokenizer,
        harmful_train,
        harmful_eval,
        *,
        benign_train=None,
        prepare_model: Callable[[Any], Any] | None = None,
        progress: Callable[[str], None] | None = None,
        stop_at_threshold: float | None = None,
        full_curve: bool | None = None,
        phi_from_step: int | None = None,
    ) -> AttackResult:
        """Attack copies of ``model`` with every setting of the grid; ``model`` itself is never modified.

        Args:
            harmful_train: the attacker's harmful data (any supported format, or tokenized).
            harmful_eval: held-out harmful data on which the scorer measures f.
            benign_train: benign task data (any supported format), needed by the ``mixed``, ``benign`` and
                ``refusal_ablation`` families (the latter uses its prompts as the harmless side).
            prepare_model: an attack-time hook applied to each copy before training (e.g. a defense that
                protects only while something is attached during fine-tuning, such as Security Vectors).
                Training-free families attack the model as deployed, without it.
            progress: called with a one-line message as each configuration starts and ends.
            stop_at_threshold: phi for early stopping (default: ``config.stop_at_threshold``): a run stops
                at the first evaluation strictly on the harmful side of it, so its curve still brackets the
                crossing; the curve's config then says ``stopped_early: True``.
            full_curve: run the whole budget even past phi (default: ``config.full_curve``).
            phi_from_step: for a grid of one training run that is the only reference for phi (phi is then
                its own f after this many steps, as :func:`immune_trainer.evaluation.threshold_from_base`
                reads it): once that value is known, the run stops at the first later evaluation strictly on
                its harmful side, which brackets its crossing of phi; nothing after it can change a verdict.
                Ignored with a ``stop_at_threshold`` or ``full_curve``.
        """
        cfg = self.config
        phi = cfg.stop_at_threshold if stop_at_threshold is None else stop_at_threshold
        if phi is not None and (isinstance(phi, bool) or not math.isfinite(phi)):
            raise ConfigError(f"stop_at_threshold must be a finite number or None, got {phi!r}.")
        if full_curve if full_curve is not None else cfg.full_curve:
            phi = None
            phi_from_step = None
        if phi is not None:
            phi_from_step = None
        if phi_from_step is not None:
            if isinstance(phi_from_step, bool) or not isinstance(phi_from_step, int) or phi_from_step < 0:
                raise ConfigError(f"phi_from_step must be a step number >= 0, got {phi_from_step!r}.")
            if len(cfg.grid()) != 1:
                raise ConfigError(
                    f"phi_from_step needs a grid of exactly one run (phi is that run's own value); this grid has "
                    f"{len(cfg.grid())}."
                )
            phi = _OwnPhi(phi_from_step)
        if cfg.load_in_4bit:
            check_4bit_available()  # before any tokenization or training
        data_lib.check_tokenizer(tokenizer)
        if harmful_train is None or len(harmful_train) == 0:
            raise DataError("the attack's harmful training dataset is empty.")
        if harmful_eval is None or len(harmful_eval) == 0:
            raise DataError("the held-out harmful evaluation dataset is empty.")
        families = {name: get_attack(name) for name in cfg.family_names()}
        needing = [name for name, f in families.items() if f.needs_benign]
        if needing and benign_train is None:
            raise ConfigError(
                f"attack famil{'ies' if len(needing) > 1 else 'y'} {', '.join(needing)} need benign data: "
                "pass benign_train= to run() (ConditionDatasets.benign_train in evaluate_conditions)."
            )
        if needing and len(benign_train) == 0:
            raise DataError("the attack's benign training dataset is empty.")
        train = data_lib.ensure_tokenized(harmful_train, tokenizer, max_length=cfg.max_length)
        tokenized_cache: dict[int, Any] = {id(harmful_train): train}

        def tokenized(raw):
            if id(raw) not in tokenized_cache:
                tokenized_cache[id(raw)] = data_lib.ensure_tokenized(
                    raw, tokenizer, max_length=cfg.max_length
                )
            return tokenized_cache[id(raw)]

        sources = {name: f.sources(harmful_train, benign_train, cfg) for name, f in families.items()}
        grid = cfg.grid()
        data = {}
        for name, family in families.items():
            if family.trains:
                data[name] = {role: tokenized(raw) for role, raw in sources[name].items()}
                for setting in (s for s in grid if s["family"] == name):
                    family.training_set(data[name], setting)  # bad sizes fail before any training
            else:
                data[name] = sources[name]
        eval_data = (
            self.scorer.prepare(tokenizer, harmful_eval) if hasattr(self.scorer, "prepare") else harmful_eval
        )
        fingerprint = {
            "cache_version": CACHE_VERSION,
            "model": model_fingerprint(model),
            "train": _content_hash(train),
            "eval": _content_hash(harmful_eval),
            "scorer": scorer_key(self.scorer),
            "attack": {
                k: v
                for k, v in cfg.to_dict().items()
                if k not in (*GRID_FIELDS, "output_dir", "stop_at_threshold", "full_curve")
            },
        }
        if needing:
            fingerprint["benign"] = _content_hash(tokenized(benign_train))
        curves = []
        for setting in grid:
            family = families[setting["family"]]
            saved = self._load_saved(setting, fingerprint, phi)
            if saved is not None:
                if progress:
                    progress(f"reusing finished attack run {setting_label(setting)}")
                curves.append(saved)
                continue
            if progress:
                budget = f"{cfg.max_steps} steps" if family.trains else "training-free"
                progress(f"attack {setting_label(setting)}: {budget}")
            if family.trains:
                curve = self._run_one(
                    model, tokenizer, data[setting["family"]], eval_data, setting, family, prepare_model, phi,
                    fingerprint,
                )
            else:
                curve = self._run_training_free(
                    model, tokenizer, data[setting["family"]], eval_data, setting, family
                )
            self._save(setting, curve, fingerprint, phi)
            curves.append(curve)
        return AttackResult(curves=curves, config=cfg)

    # -------------------------------------------------------------- one configuration

    def _measure(self, model, tokenizer, eval_data) -> float:
        return float(self.scorer.score(model, tokenizer, eval_data).value)

    def _run_training_free(self, model, tokenizer, sources, eval_data, setting, family) -> AttackCurve:
        """A training-free attack: one point at step 0 (no steps, tokens or FLOPs), after the edit; the
        value before it is kept in the config as ``value_before``."""
        attacked = copy.deepcopy(model)
        before = self._measure(attacked, tokenizer, eval_data)
        attacked = family.apply(attacked, tokenizer, sources, setting, self.config)
        after = self._measure(attacked, tokenizer, eval_data)
        logger.info("%s: f = %.4f before, %.4f after", setting["family"], before, after)
        del attacked
        return AttackCurve(
            config={**setting, "value_before": before},
            points=[CurvePoint(step=0, tokens=0, flops=0.0, value=after)],
            scorer=self.scorer.name,
            higher_is_better=self.scorer.higher_is_better,
        )

    def _run_one(
        self, model, tokenizer, data, eval_data, setting, family, prepare_model, phi, fingerprint
    ) -> AttackCurve:
        cfg = self.config
        subset = family.training_set(data, setting)
        attacked = copy.deepcopy(model)
        attacked.train()
        flops_per_token = family.flops_per_token(attacked, cfg)  # on the model before adapters are added
        attacked = family.prepare(attacked, cfg, setting)
        if prepare_model is not None:
            attacked = prepare_model(attacked)

        measure_context = getattr(prepare_model, "measure", None) or contextlib.nullcontext

        def measure(m) -> float:
            # An attack-time hook may say how the model runs at inference (e.g. without a security vector);
            # the family says what the attacker deploys (e.g. the model with its soft prompt).
            with measure_context(m):
                return self._measure(family.deployed(m, setting), tokenizer, eval_data)

        # Every run of a family that starts from the unchanged model shares one step-0 measurement.
        step0_key = None
        if family.same_at_start and prepare_model is None:
            # run() has fingerprinted the model, the raw eval data and the scorer (its max_length included).
            step0_key = (fingerprint["model"], fingerprint["eval"], json.dumps(fingerprint["scorer"]))
        callback_initial = _STEP0.get(step0_key) if step0_key else None

        stop = None
        hib = self.scorer.higher_is_better
        if isinstance(phi, _OwnPhi):
            own = phi

            def stop(value):
                threshold = own.value_in(callback.points)
                if threshold is None or callback.points[-1].step <= own.step:
                    return False
                return first_crossing([CurvePoint(0, 0, 0.0, value)], threshold, hib) is not None

        elif phi is not None:
            stop = lambda value: first_crossing([CurvePoint(0, 0, 0.0, value)], phi, hib) is not None  # noqa: E731
        callback = _CurveCallback(
            measure, cfg.eval_every, flops_per_token, stop=stop, initial=callback_initial
        )
        optim, optim_args = optimizer_arguments(setting["optimizer"])
        warmup = math.ceil(cfg.warmup_ratio * cfg.max_steps) if cfg.warmup_ratio > 0 else cfg.warmup_steps
        with tempfile.TemporaryDirectory(prefix="immune_trainer_attack_") as tmp:
            args = TrainingArguments(
                output_dir=tmp,
                per_device_train_batch_size=cfg.batch_size,
                gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                learning_rate=setting["learning_rate"],
                max_steps=cfg.max_steps,
                lr_scheduler_type=setting["lr_scheduler_type"],
                warmup_steps=warmup,
                optim=optim,
                optim_args=optim_args,
                weight_decay=cfg.weight_decay,
                max_grad_norm=cfg.max_grad_norm,
                seed=setting["seed"],
                data_seed=setting["seed"],
                bf16=cfg.bf16,
                save_strategy="no",
                logging_strategy="no",
                report_to="none",
                disable_tqdm=True,
                remove_unused_columns=False,
                dataloader_pin_memory=torch.cuda.is_available(),
                log_level="warning",
            )
            trainer = _AttackTrainer(
                model=attacked,
                args=args,
                train_dataset=subset,
                data_collator=data_lib.SupervisedCollator(tokenizer),
                callbacks=[callback],
            )
            trainer.remove_callback(PrinterCallback)  # the nested Trainer prints nothing of its own
            if self.show_progress:
                trainer.add_callback(StepBar(f"attack {setting_label(setting)}"))
            callback.trainer = trainer
            trainer.train()
        if step0_key and callback.points:
            _STEP0[step0_key] = callback.points[0].value
        del trainer, attacked
        config = dict(setting)
        if phi is not None:
            config["stopped_early"] = callback.stopped_early
        return AttackCurve(
            config=config,
            points=callback.points,
            scorer=self.scorer.name,
            higher_is_better=self.scorer.higher_is_better,
        )

    # -------------------------------------------------------------- resume

    def _path(self, setting, fingerprint) -> Path | None:
        if not self.config.output_dir:
            return None
        label = setting_label(setting).replace(" ", "_")
        # One file per (model, data, setting): attacks on the base and the immunized model do not collide.
        key = hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()[:10]
        return Path(self.config.output_dir) / "attack_runs" / f"{label}_{key}.json"

    def _load_saved(self, setting, fingerprint, phi=None) -> AttackCurve | None:
        """A finished run of ``setting`` saved by an earlier call, if one fits.

        A full curve fits every request (cut after its first crossing of ``phi`` when this call stops
        early); an early-stopped curve fits only a call that stops at the same ``phi``.
        """
        path = self._path(setting, fingerprint)
        if path is None or not path.exists():
            return None
        try:
            saved = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            logger.warning("ignoring unreadable saved attack run %s", path)
            return None
        if saved.get("fingerprint") != fingerprint or saved.get("setting") != setting:
            return None
        curve = AttackCurve.from_dict(saved["curve"])
        wanted = phi.to_json() if isinstance(phi, _OwnPhi) else phi
        if curve.config.get("stopped_early"):
            return curve if saved.get("stop_at_threshold") == wanted else None
        if phi is None:
            curve.config.pop("stopped_early", None)
            return curve
        threshold = phi
        if isinstance(phi, _OwnPhi):
            threshold = phi.value_in(curve.points)
            if threshold is None:
                return curve
        stopped = False
        for i, point in enumerate(curve.points):
            if isinstance(phi, _OwnPhi) and point.step <= phi.step:
                continue
            crossed = first_crossing([point], threshold, curve.higher_is_better) is not None
            if crossed and point.step < self.config.max_steps:
                curve.points, stopped = curve.points[: i + 1], True
                break
        curve.config["stopped_early"] = stopped
        return curve

    def _save(self, setting, curve: AttackCurve, fingerprint, phi=None) -> None:
        path = self._path(setting, fingerprint)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "setting": setting,
            "fingerprint": fingerprint,
            "stop_at_threshold": phi.to_json() if isinstance(phi, _OwnPhi) else phi,
            "curve": curve.to_dict(),
        }
        atomic_write(path, json.dumps(payload, indent=2))


_content_hash = content_hash  # the name other modules (attack_search) import


_LABELS = {
    "learning_rate": "lr",
    "num_samples": "n",
    "seed": "seed",
    "optimizer": "opt",
    "lr_scheduler_type": "sched",
    "lora_rank": "r",
    "harmful_share": "p",
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


class AttackSuite:
    """Several attack grids judged as one: the worst case is over every grid of the suite.

    Use it when the settings of one family do not fit another (LoRA needs a higher learning rate than
    full fine-tuning; a mixed-data attack has its own harmful share). Every member measures harm with the
    same scorer, so their curves compare.

    Example::

        suite = AttackSuite([AttackConfig(families=["full"], learning_rates=[8e-5], seeds=[0, 1]),
                             AttackConfig(families=["lora"], learning_rates=[3e-4], lr_scheduler_types=["cosine"])])
        curves = suite.run(model, tokenizer, harmful_train, harmful_eval).curves

    Raises:
        ConfigError: an empty suite, or members whose scorers differ.
    """

    def __init__(self, attacks):
        members = [
            a if isinstance(a, HarmfulFineTuningAttack) else HarmfulFineTuningAttack(a) for a in attacks
        ]
        if not members:
            raise ConfigError("an attack suite needs at least one attack configuration.")
        keys = {json.dumps(scorer_key(m.scorer), sort_keys=True) for m in members}
        if len(keys) > 1:
            raise ConfigError(
                "every attack of a suite must measure harm with the same scorer and settings (same scorer, "
                f"max_length and eval_batch_size); got {sorted(keys)}."
            )
        scorer = members[0].scorer
        for m in members:
            m.scorer = scorer
        self.attacks = members

    @property
    def scorer(self):
        return self.attacks[0].scorer

    @property
    def config(self) -> AttackConfig:
        """The first member's config (the suite's reference for budgets and batch sizes)."""
        return self.attacks[0].config

    @property
    def configs(self) -> list[AttackConfig]:
        return [a.config for a in self.attacks]

    def family_names(self) -> list[str]:
        return list(dict.fromkeys(f for c in self.configs for f in c.family_names()))

    @property
    def show_progress(self) -> bool:
        return self.attacks[0].show_progress

    @show_progress.setter
    def show_progress(self, value: bool) -> None:
        for a in self.attacks:
            a.show_progress = value

    def run(self, model, tokenizer, harmful_train, harmful_eval, **kwargs) -> AttackResult:
        """Run every member (see :meth:`HarmfulFineTuningAttack.run`) and return all their curves."""
        curves = []
        for attack in self.attacks:
            curves += attack.run(model, tokenizer, harmful_train, harmful_eval, **kwargs).curves
        return AttackResult(curves=curves, config=self.config)

    def members(self, families) -> AttackSuite | None:
        """The sub-suite whose grids only hold ``families`` (None when no member qualifies)."""
        chosen = [a for a in self.attacks if set(a.config.family_names()) <= set(families)]
        return AttackSuite(chosen) if chosen else None

    def others(self, families) -> AttackSuite | None:
        """The sub-suite of the members :meth:`members` leaves out."""
        chosen = [a for a in self.attacks if not set(a.config.family_names()) <= set(families)]
        return AttackSuite(chosen) if chosen else None

    def replace(self, **changes) -> AttackSuite:
        """A suite of the same members with ``changes`` applied to each config."""
        from dataclasses import replace

        suite = AttackSuite(
            [HarmfulFineTuningAttack(replace(a.config, **changes), scorer=a.scorer) for a in self.attacks]
        )
        suite.show_progress = self.show_progress
        return suite


def as_suite(attack) -> AttackSuite:
    """An :class:`AttackSuite` from an attack, a config, a list of either, or a suite (None: the default grid)."""
    if isinstance(attack, AttackSuite):
        return attack
    if attack is None or isinstance(attack, (AttackConfig, HarmfulFineTuningAttack)):
        return AttackSuite([attack if attack is not None else AttackConfig()])
    if isinstance(attack, (list, tuple)):
        return AttackSuite(list(attack))
    raise ConfigError(
        f"attack must be an AttackConfig, a HarmfulFineTuningAttack, a list of them or an AttackSuite, got "
        f"{type(attack).__name__}."
    )
