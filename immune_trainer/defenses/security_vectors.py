"""Security Vectors (Zhou et al. 2024, "Making Harmful Behaviors Unlearnable for Large Language Models",
arXiv 2311.02105).

A LoRA adapter, the *security vector*, is trained on the HARMFUL data with the plain LM loss while the
base weights stay frozen: the vector "explains" the harmful behaviour. When an attacker later fine-tunes
the model on harmful data WITH the vector applied and frozen, the harmful responses are already likely,
the attacker's loss is small and the base weights learn little of the harmful behaviour. The vector is
dropped at inference.

Protection exists ONLY while the vector is applied during fine-tuning: an attacker who fine-tunes the
released weights without it is not hindered at all. It fits a fine-tuning-as-a-service setting in which
the provider applies :func:`security_vector_hook` to every user's fine-tuning job; it is not a defense
for open-weight release.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from ..trainer import ImmunizationConfig, ImmunizationTrainer

logger = logging.getLogger(__name__)

#: Name of the security vector's adapter when it is applied to an attacked model.
SECURITY_VECTOR_ADAPTER = "security_vector"


@dataclass
class SecurityVectorConfig(ImmunizationConfig):
    r"""Configuration of :class:`SecurityVectorTrainer` (paper defaults: LoRA r=8, alpha=32, lr 1e-3, 1 epoch).

    Parameters:
        lora_r (`int`, defaults to `8`): rank of the security vector's LoRA.
        lora_alpha (`int`, defaults to `32`): LoRA alpha.
        lora_dropout (`float`, defaults to `0.0`): LoRA dropout.
        lora_target_modules (`str` or `None`, defaults to `None`): peft `target_modules`; `None` uses peft's
            default for the architecture (q/v projections for Llama-like models, `c_attn` for GPT-2).
    """

    lora_r: int = field(default=8, metadata={"help": "Rank of the security vector's LoRA (paper: 8)."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha of the security vector (paper: 32)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout of the security vector."})
    lora_target_modules: str | None = field(
        default=None,
        metadata={
            "help": "peft target_modules of the security vector (e.g. 'all-linear'); None uses peft's "
            "per-architecture default."
        },
    )
    learning_rate: float = field(default=1e-3, metadata={"help": "Learning rate (paper: 1e-3)."})
    num_train_epochs: float = field(
        default=1.0, metadata={"help": "Epochs over the harmful data (paper: 1)."}
    )
    harmless_weight: float = field(
        default=0.0,
        metadata={
            "help": "Unused by Security Vectors (the vector is trained on harmful data only); must stay 0."
        },
    )

    @classmethod
    def search_space(cls) -> dict:
        """Around the paper: LoRA r 8, alpha 32, lr 1e-3, one epoch."""
        return {
            **super().search_space(),
            "learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
            "lora_r": {"type": "int", "low": 4, "high": 64, "log": True},
            "lora_alpha": {"type": "int", "low": 8, "high": 64, "log": True},
        }

    def __post_init__(self):
        if self.lora_r <= 0 or self.lora_alpha <= 0:
            raise ConfigError(
                f"lora_r and lora_alpha must be positive, got {self.lora_r}, {self.lora_alpha}."
            )
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}.")
        if self.harmless_weight != 0:
            raise ConfigError(
                "Security Vectors trains the vector on harmful data only: a harmless term would make the "
                "vector explain refusals too. Leave harmless_weight at 0."
            )
        super().__post_init__()


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config") and callable(getattr(model, "disable_adapter", None))


class SecurityVectorTrainer(ImmunizationTrainer):
    """Train a security vector: a LoRA fitted to the harmful responses (plain LM loss), base weights frozen.

    ``trainer.save_model(path)`` writes the vector as a peft adapter. Apply it during any later fine-tuning
    with :func:`security_vector_hook` (``HarmfulFineTuningAttack.run(..., prepare_model=hook)``, or the
    registry's ``get_defense("security_vectors").attack_time_hook``) and remove it afterwards with
    :func:`drop_security_vector`. The protection exists only while the vector is applied during fine-tuning.
    """

    _tag_names = ["immune-trainer", "security-vectors"]
    _name = "Security Vectors"
    _paper = {
        "title": "Making Harmful Behaviors Unlearnable for Large Language Models",
        "id": "2311.02105",
        "citation": (
            "@article{zhou2023making,\n"
            "  title={Making Harmful Behaviors Unlearnable for Large Language Models},\n"
            "  author={Zhou, Xin and Lu, Yi and Ma, Ruotian and Gui, Tao and Zhang, Qi and Huang, Xuanjing},\n"
            "  journal={arXiv preprint arXiv:2311.02105},\n"
            "  year={2023}\n}"
        ),
    }
    config_class = SecurityVectorConfig
    takes_retain_dataset = False

    def __init__(
        self, model=None, args: SecurityVectorConfig | None = None, *pos, peft_config=None, **kwargs
    ):
        if args is not None and not isinstance(args, SecurityVectorConfig):
            raise ConfigError(
                f"SecurityVectorTrainer needs a SecurityVectorConfig, got {type(args).__name__}."
            )
        cfg = args or SecurityVectorConfig(output_dir="security_vector", report_to="none")
        if kwargs.get("retain_dataset") is not None or (len(pos) >= 3 and pos[2] is not None):
            raise ConfigError(
                "Security Vectors trains only on harmful data; do not pass a retain_dataset (capability is "
                "untouched because the base weights are frozen)."
            )
        if model is not None and not isinstance(model, str) and peft_config is None and not _is_peft(model):
            from peft import LoraConfig

            peft_config = LoraConfig(
                r=cfg.lora_r,
                lora_alpha=cfg.lora_alpha,
                lora_dropout=cfg.lora_dropout,
                target_modules=cfg.lora_target_modules,
                task_type="CAUSAL_LM",
            )
        super().__init__(model, cfg, *pos, peft_config=peft_config, **kwargs)
        if not _is_peft(self.model):
            raise ConfigError(
                "SecurityVectorTrainer trains a LoRA adapter: pass peft_config or a peft model."
            )

    def compute_defense_loss(self, model, inputs):
        harmful, _ = self.lm_loss(model, self.side(inputs, "harmful"))
        return {"harmful": harmful, "loss": harmful}


# ---------------------------------------------------------------------------- attack time


def _check_vector_path(vector_path) -> str:
    path = os.fspath(vector_path)
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "adapter_config.json")):
        raise ConfigError(
            f"{path!r} holds no peft adapter (adapter_config.json is missing): pass the directory written by "
            "SecurityVectorTrainer.save_model()."
        )
    return path


def apply_security_vector(model, vector_path):
    """Apply the security vector at ``vector_path`` to ``model``, frozen, and return the model to train.

    - A plain model (full fine-tuning): it is wrapped in a ``PeftModel`` carrying the vector as adapter
      ``"security_vector"`` with ``requires_grad=False``; every base weight stays trainable.
    - A peft model (a LoRA attack): the vector is loaded as a second, frozen adapter and activated together
      with the attacker's adapter(s), which stay trainable.
    """
    from peft import PeftModel

    path = _check_vector_path(vector_path)
    # Trainability is remembered by parameter identity, not by name: peft renames every projection it wraps
    # (``q_proj.weight`` becomes ``q_proj.base_layer.weight``) but keeps the same Parameter object, so a
    # name-based lookup would leave the wrapped projections frozen and weaken a full fine-tuning attacker.
    trainable = _trainable_ids(model)
    if _is_peft(model):
        if SECURITY_VECTOR_ADAPTER in model.peft_config:
            raise ConfigError("the security vector is already applied to this model.")
        attacker = (
            list(model.active_adapters) if hasattr(model, "active_adapters") else [model.active_adapter]
        )
        model.load_adapter(path, adapter_name=SECURITY_VECTOR_ADAPTER, is_trainable=False)
        model.base_model.set_adapter([*attacker, SECURITY_VECTOR_ADAPTER])
        _restore_trainable(model, trainable)
        return model
    wrapped = PeftModel.from_pretrained(model, path, adapter_name=SECURITY_VECTOR_ADAPTER, is_trainable=False)
    _restore_trainable(wrapped, trainable)
    return wrapped


def _trainable_ids(model) -> set[int]:
    return {id(p) for p in model.parameters() if p.requires_grad}


def _restore_trainable(model, trainable: set[int]) -> None:
    """Give every parameter that existed before back its trainability; the security vector's own
    parameters (new objects) stay frozen."""
    marker = f".{SECURITY_VECTOR_ADAPTER}."
    for name, param in model.named_parameters():
        param.requires_grad_(marker not in name and id(param) in trainable)


def security_vector_hook(vector_path) -> Callable[[Any], Any]:
    """The attack-time hook: ``hook(model) -> model`` applies the frozen security vector (see
    :func:`apply_security_vector`). Pass it as ``HarmfulFineTuningAttack.run(..., prepare_model=hook)``.

    ``hook.measure(model)`` is a context manager under which the attacked model runs *without* the vector,
    as it does at inference: the attack harness measures harmfulness inside it, because the protection
    exists only while the vector is applied during fine-tuning and the vector is dropped afterwards.
    It is also the registry's ``attack_time_hook`` factory: ``get_defense("security_vectors")
    .attack_time_hook(path_to_vector)``. ``hook.cache_key`` (a hash of the vector's files) tells the
    harness's saved runs with this vector apart from runs on the same weights without it.

    To evaluate a Security Vectors model, pass the base weights (the model as deployed, without the vector)
    as the immunized model and the hook as ``evaluate_conditions(..., prepare_immunized=hook)``.
    """
    path = _check_vector_path(vector_path)

    def hook(model):
        return apply_security_vector(model, path)

    hook.vector_path = path
    hook.measure = without_security_vector
    # What the attack harness keys saved runs by: the same weights attacked with and without the vector
    # (or with another vector) are different runs.
    hook.cache_key = {"security_vector": _vector_hash(path)}
    return hook


def _vector_hash(path: str) -> str:
    """sha256 over the files of a local adapter folder (its config and weights); a Hub id as it is."""
    import hashlib

    if not os.path.isdir(path):
        return path
    h = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        if name.startswith("adapter_") and os.path.isfile(os.path.join(path, name)):
            h.update(name.encode())
            with open(os.path.join(path, name), "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()[:16]


@contextlib.contextmanager
def without_security_vector(model):
    """Run ``model`` without its security vector inside the block (the inference-time model), then
    re-activate it. A model without the vector is left as it is."""
    if not _is_peft(model) or SECURITY_VECTOR_ADAPTER not in model.peft_config:
        yield model
        return
    others = [name for name in model.peft_config if name != SECURITY_VECTOR_ADAPTER]
    if not others:
        with model.disable_adapter():
            yield model
        return
    active = list(model.active_adapters) if hasattr(model, "active_adapters") else [model.active_adapter]
    trainable = _trainable_ids(model)
    model.base_model.set_adapter(others)
    try:
        yield model
    finally:
        model.base_model.set_adapter(active)
        _restore_trainable(model, trainable)


def drop_security_vector(model):
    """Remove the security vector after fine-tuning and return the model used at inference.

    A model wrapped by :func:`apply_security_vector` for full fine-tuning gets its base model back (the
    fine-tuned weights, no adapter); a LoRA-attacked model keeps the attacker's adapter(s) only. A model
    without the vector raises ConfigError.
    """
    if not _is_peft(model) or SECURITY_VECTOR_ADAPTER not in model.peft_config:
        raise ConfigError("this model carries no security vector (apply it with security_vector_hook first).")
    others = [name for name in model.peft_config if name != SECURITY_VECTOR_ADAPTER]
    if not others:
        return model.unload()
    trainable = _trainable_ids(model)
    model.delete_adapter(SECURITY_VECTOR_ADAPTER)
    model.base_model.set_adapter(others)
    _restore_trainable(model, trainable)
    return model
