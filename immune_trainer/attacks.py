"""The attacker's fine-tuning (equation 1 of the immunization paper), run through a real Trainer.

    min_theta  E_(x,y)~D_harmful  L(M_theta[t](x), y)   for t <= T (the attacker's budget)

:class:`HarmfulFineTuningAttack` runs a grid of attack settings (learning rates x sample counts x seeds)
of one attack *family* (full fine-tuning, LoRA, ...), each on a fresh copy of the model, and evaluates
harmfulness f every ``eval_every`` steps. It returns :class:`~immune_trainer.conditions.AttackCurve` s
(step, tokens seen, FLOPs estimate, f) for :mod:`immune_trainer.conditions`. The model it is given is
never modified.

Attack families are a registry (:func:`register_attack`): a family says how to turn a copy of the model
into the model the attacker trains, and how many FLOPs a token costs.
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
from .conditions import AttackCurve, CurvePoint
from .errors import ConfigError, DataError
from .report import atomic_write

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- attack families


class AttackFamily:
    """How an attacker adapts the model. Subclass and :func:`register_attack` it."""

    name: str = ""
    description: str = ""

    def prepare(self, model, config: AttackConfig):
        """Return the model to train (``model`` is already a private copy)."""
        return model

    def flops_per_token(self, model, config: AttackConfig) -> float:
        """Training FLOPs per token of ``model`` (before :meth:`prepare`), N = non-embedding parameters:
        forward 2N + backward 4N for full fine-tuning."""
        return 6.0 * _num_parameters(model)


def _num_parameters(model) -> int:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(base, "num_parameters"):
        return base.num_parameters(exclude_embeddings=True)
    return sum(p.numel() for p in base.parameters())


class FullFineTuning(AttackFamily):
    name = "full"
    description = "Full-parameter fine-tuning on the harmful data."

    def prepare(self, model, config):
        for p in model.parameters():
            p.requires_grad_(True)
        return model


class LoRAFineTuning(AttackFamily):
    name = "lora"
    description = "LoRA fine-tuning (peft) on the harmful data; the base weights stay frozen."

    def prepare(self, model, config):
        from peft import LoraConfig, get_peft_model

        if config.load_in_4bit:
            model = quantize_4bit(model)
        lora = LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=config.lora_target_modules,
            task_type="CAUSAL_LM",
        )
        return get_peft_model(model, lora)

    def flops_per_token(self, model, config):
        # Forward 2N and the backward pass through activations 2N; no weight gradients for frozen weights.
        return 4.0 * _num_parameters(model)


def check_4bit_available() -> None:
    """Raise :class:`ConfigError` unless 4-bit QLoRA can run here (a CUDA GPU and bitsandbytes)."""
    import importlib.util

    missing = []
    if not torch.cuda.is_available():
        missing.append("no CUDA GPU is available")
    if importlib.util.find_spec("bitsandbytes") is None:
        missing.append("bitsandbytes is not installed")
    if missing:
        raise ConfigError(
            f"4-bit QLoRA needs a CUDA GPU and bitsandbytes (pip install immune-trainer[bnb]), but "
            f"{' and '.join(missing)}; on CPU use family='lora' without load_in_4bit."
        )


def quantize_4bit(model):
    """Return a 4-bit NF4 copy of ``model`` ready for QLoRA (bitsandbytes, bfloat16 compute, CUDA only).

    The attack works on an in-memory copy; bitsandbytes quantizes at load time, so the copy is saved to a
    temporary folder (safetensors) and reloaded with a ``BitsAndBytesConfig``, then prepared with
    ``peft.prepare_model_for_kbit_training``.

    Raises:
        ConfigError: no CUDA GPU or no bitsandbytes (see :func:`check_4bit_available`).
    """
    check_4bit_available()
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
    )
    with tempfile.TemporaryDirectory(prefix="immune_trainer_qlora_") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        quantized = AutoModelForCausalLM.from_pretrained(
            tmp, quantization_config=quantization, use_safetensors=True, device_map={"": 0}
        )
    return prepare_model_for_kbit_training(quantized)


ATTACKS: dict[str, AttackFamily] = {}


def register_attack(family: AttackFamily) -> AttackFamily:
    """Add an attack family to the registry (its ``name`` must be new)."""
    if not family.name:
        raise ConfigError("an attack family needs a name.")
    if family.name in ATTACKS:
        raise ConfigError(f"an attack family named {family.name!r} is already registered.")
    ATTACKS[family.name] = family
    return family


def get_attack(name: str) -> AttackFamily:
    if name not in ATTACKS:
        raise ConfigError(f"unknown attack family {name!r}; known families: {', '.join(sorted(ATTACKS))}.")
    return ATTACKS[name]


register_attack(FullFineTuning())
register_attack(LoRAFineTuning())


# ---------------------------------------------------------------------------- configuration


@dataclass
class AttackConfig:
    r"""The attacker's threat model: a family, a grid of settings and a step budget.

    Parameters:
        family (`str`, defaults to `"full"`): attack family from the registry (`full`, `lora`, ...).
        learning_rates (`list[float]`): learning rates of the grid.
        num_samples (`list[int]`): harmful training examples per run; 0 means all of them.
        seeds (`list[int]`): seeds of the grid (data order, initialisation of adapters).
        max_steps (`int`): the attacker's budget in optimizer steps.
        eval_every (`int`): harmfulness is measured at step 0 and every `eval_every` steps.
    """

    family: str = field(default="full", metadata={"help": "Attack family from the registry: full or lora."})
    learning_rates: list[float] = field(
        default_factory=lambda: [3e-5, 6e-5, 8e-5],
        metadata={"help": "Learning rates of the grid (RepNoise's attacks: 3e-5, 6e-5, 8e-5)."},
    )
    num_samples: list[int] = field(
        default_factory=lambda: [0],
        metadata={"help": "Harmful training examples per run (0 = all); each value is a grid axis."},
    )
    seeds: list[int] = field(default_factory=lambda: [0], metadata={"help": "Seeds of the grid."})
    max_steps: int = field(default=100, metadata={"help": "The attacker's budget in optimizer steps."})
    eval_every: int = field(default=10, metadata={"help": "Measure harmfulness at step 0 and every N steps."})
    batch_size: int = field(default=4, metadata={"help": "Per-device batch size of the attack."})
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "Gradient accumulation of the attack."}
    )
    max_length: int = field(default=512, metadata={"help": "Longest tokenized attack example."})
    lr_scheduler_type: str = field(
        default="constant",
        metadata={
            "help": "Learning-rate schedule; constant keeps the cost-to-harm independent of the budget."
        },
    )
    warmup_steps: int = field(default=0, metadata={"help": "Warm-up steps of the attack's schedule."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay of the attack."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping of the attack."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank (family 'lora')."})
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
        for name in ("max_length", "eval_batch_size", "lora_r", "lora_alpha"):
            if getattr(self, name) < (2 if name == "max_length" else 1):
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}.")
        if not 0.0 <= self.lora_dropout < 1.0 or self.warmup_steps < 0 or self.weight_decay < 0:
            raise ConfigError(
                "lora_dropout must be in [0, 1), warmup_steps and weight_decay >= 0; got "
                f"{self.lora_dropout}, {self.warmup_steps}, {self.weight_decay}."
            )
        get_attack(self.family)
        if self.load_in_4bit and self.family != "lora":
            raise ConfigError(
                f"load_in_4bit (QLoRA) applies to family='lora', not {self.family!r}: 4-bit weights cannot "
                "be fully fine-tuned."
            )

    def grid(self) -> list[dict[str, Any]]:
        """Every run of the grid, as a dict of its settings."""
        return [
            {"family": self.family, "learning_rate": lr, "num_samples": n, "seed": s}
            for lr, n, s in itertools.product(self.learning_rates, self.num_samples, self.seeds)
        ]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------- running


class _AttackTrainer(Trainer):
    """A plain Trainer that counts the tokens it trains on (attention-mask tokens)."""

    tokens_seen = 0

    def training_step(self, model, inputs, num_items_in_batch=None):
        mask = inputs.get("attention_mask")
        if mask is not None:
            self.tokens_seen += int(mask.sum())
        return super().training_step(model, inputs, num_items_in_batch)


class _CurveCallback(TrainerCallback):
    def __init__(self, measure: Callable[[Any], float], eval_every: int, flops_per_token: float):
        self.measure = measure
        self.eval_every = eval_every
        self.flops_per_token = flops_per_token
        self.points: list[CurvePoint] = []
        self.trainer: _AttackTrainer | None = None

    def _record(self, step: int, model) -> None:
        tokens = self.trainer.tokens_seen if self.trainer is not None else 0
        value = self.measure(model)
        self.points.append(
            CurvePoint(step=step, tokens=tokens, flops=tokens * self.flops_per_token, value=value)
        )
        logger.info("attack step %d: f = %.4f", step, value)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if not self.points:
            self._record(0, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        if step % self.eval_every == 0 or step == state.max_steps:
            self._record(step, model)


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
        scorer: a :class:`~immune_trainer.scorers.Scorer` instance; by default ``get_scorer(config.scorer)``.
    """

    def __init__(self, config: AttackConfig | None = None, scorer=None):
        self.config = config or AttackConfig()
        if scorer is None:
            from .scorers import get_scorer

            scorer = get_scorer(self.config.scorer)
        self.scorer = scorer

    def run(
        self,
        model,
        tokenizer,
        harmful_train,
        harmful_eval,
        *,
        prepare_model: Callable[[Any], Any] | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> AttackResult:
        """Attack copies of ``model`` with every setting of the grid; ``model`` itself is never modified.

        Args:
            harmful_train: the attacker's harmful data (any supported format, or tokenized).
            harmful_eval: held-out harmful data on which the scorer measures f.
            prepare_model: an attack-time hook applied to each copy before training (e.g. a defense that
                protects only while something is attached during fine-tuning, such as Security Vectors).
            progress: called with a one-line message as each configuration starts and ends.
        """
        cfg = self.config
        if cfg.load_in_4bit:
            check_4bit_available()  # before any tokenization or training
        data_lib.check_tokenizer(tokenizer)
        if harmful_train is None or len(harmful_train) == 0:
            raise DataError("the attack's harmful training dataset is empty.")
        if harmful_eval is None or len(harmful_eval) == 0:
            raise DataError("the held-out harmful evaluation dataset is empty.")
        train = data_lib.ensure_tokenized(harmful_train, tokenizer, max_length=cfg.max_length)
        for n in cfg.num_samples:
            if n > len(train):
                raise DataError(
                    f"num_samples={n} exceeds the {len(train)} rows of the attack's training data; "
                    "lower it or pass more data."
                )
        eval_data = (
            self.scorer.prepare(tokenizer, harmful_eval) if hasattr(self.scorer, "prepare") else harmful_eval
        )
        family = get_attack(cfg.family)
        fingerprint = {
            "model": model_fingerprint(model),
            "train": _content_hash(train),
            "eval": _content_hash(harmful_eval),
            "attack": {
                k: v
                for k, v in cfg.to_dict().items()
                if k not in ("learning_rates", "num_samples", "seeds", "output_dir")
            },
        }
        curves = []
        for setting in cfg.grid():
            saved = self._load_saved(setting, fingerprint)
            if saved is not None:
                if progress:
                    progress(f"reusing finished attack run {_setting_label(setting)}")
                curves.append(saved)
                continue
            if progress:
                progress(f"attack {_setting_label(setting)}: {cfg.max_steps} steps")
            curve = self._run_one(model, tokenizer, train, eval_data, setting, family, prepare_model)
            self._save(curve, fingerprint)
            curves.append(curve)
        return AttackResult(curves=curves, config=cfg)

    # -------------------------------------------------------------- one configuration

    def _run_one(self, model, tokenizer, train, eval_data, setting, family, prepare_model) -> AttackCurve:
        cfg = self.config
        n = setting["num_samples"]
        subset = train.shuffle(seed=setting["seed"]).select(range(n)) if n else train
        attacked = copy.deepcopy(model)
        attacked.train()
        flops_per_token = family.flops_per_token(attacked, cfg)  # on the model before adapters are added
        attacked = family.prepare(attacked, cfg)
        if prepare_model is not None:
            attacked = prepare_model(attacked)

        measure_context = getattr(prepare_model, "measure", None) or contextlib.nullcontext

        def measure(m) -> float:
            # An attack-time hook may say how the model runs at inference (e.g. without a security vector).
            with measure_context(m):
                return float(self.scorer.score(m, tokenizer, eval_data).value)

        callback = _CurveCallback(measure, cfg.eval_every, flops_per_token)
        with tempfile.TemporaryDirectory(prefix="immune_trainer_attack_") as tmp:
            args = TrainingArguments(
                output_dir=tmp,
                per_device_train_batch_size=cfg.batch_size,
                gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                learning_rate=setting["learning_rate"],
                max_steps=cfg.max_steps,
                lr_scheduler_type=cfg.lr_scheduler_type,
                warmup_steps=cfg.warmup_steps,
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
            callback.trainer = trainer
            trainer.train()
        del trainer, attacked
        return AttackCurve(
            config=dict(setting),
            points=callback.points,
            scorer=self.scorer.name,
            higher_is_better=self.scorer.higher_is_better,
        )

    # -------------------------------------------------------------- resume

    def _path(self, setting, fingerprint) -> Path | None:
        if not self.config.output_dir:
            return None
        label = _setting_label(setting).replace(" ", "_")
        # One file per (model, data, setting): attacks on the base and the immunized model do not collide.
        key = hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()[:10]
        return Path(self.config.output_dir) / "attack_runs" / f"{label}_{key}.json"

    def _load_saved(self, setting, fingerprint) -> AttackCurve | None:
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
        return AttackCurve.from_dict(saved["curve"])

    def _save(self, curve: AttackCurve, fingerprint) -> None:
        path = self._path(curve.config, fingerprint)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"setting": curve.config, "fingerprint": fingerprint, "curve": curve.to_dict()}
        atomic_write(path, json.dumps(payload, indent=2))


def _content_hash(dataset) -> str:
    """A hash of a dataset's content (stable across processes, unlike in-memory fingerprints)."""
    h = hashlib.sha256()
    for row in dataset:
        h.update(json.dumps(row, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def _setting_label(setting: dict[str, Any]) -> str:
    n = setting["num_samples"] or "all"
    return f"{setting['family']} lr={setting['learning_rate']:g} n={n} seed={setting['seed']}"
