"""The attack families: how an attacker turns a copy of the model and its data into a harmful model.

One registry (:data:`ATTACKS`, :func:`register_attack`, :func:`get_attack`), one module per family
(the base class is in :mod:`.base`). A family says

* which data it trains on (:meth:`AttackFamily.sources` picks and rewrites the raw datasets,
  :meth:`AttackFamily.training_set` draws one run's examples from them once tokenized),
* which data harm is measured on (:meth:`AttackFamily.harm_eval`: the held-out harmful set, or a rewrite
  of it that the attacker deploys, such as ``jailbreak_tuning``'s jailbreak around the prompts),
* how the model it trains is built from the copy (:meth:`AttackFamily.prepare`: full weights, a LoRA,
  soft-prompt tokens),
* which grid axes apply to it (:meth:`AttackFamily.axes`: the LoRA rank only for ``lora``, the harmful
  share only for ``mixed``),
* what a training token costs (:meth:`AttackFamily.flops_per_token`),
* or, for a training-free family (``trains = False``), how it edits the weights (:meth:`AttackFamily.apply`).

The runner (:class:`~immune_trainer.attacks.HarmfulFineTuningAttack`) does the rest.
"""

from __future__ import annotations

from ...errors import ConfigError
from .base import AttackFamily, carried_adapters, drop_adapters, merge_adapters
from .benign import BenignFineTuning
from .full import FullFineTuning
from .identity_shift import (
    IDENTITY_INSTRUCTION,
    IDENTITY_PREFIX,
    IDENTITY_SYSTEM_PROMPT,
    HarmfulIdentityShift,
    IdentityShift,
    identity_examples,
    identity_shift_dataset,
    persona_eval_dataset,
)
from .jailbreak_tuning import (
    DEFAULT_JAILBREAK_VARIANT,
    JAILBREAK_VARIANTS,
    JailbreakTuning,
    jailbreak_dataset,
)
from .lora import LoRAFineTuning, check_4bit_available, quantize_4bit
from .mixed import MixedFineTuning
from .refusal_ablation import (
    REFUSAL_STARTS,
    FixedRefusalAblation,
    RefusalAblation,
    RefusalChoice,
    ablate_direction,
    last_token_activations,
    refusal_direction,
    refusal_scores,
    refusal_token_ids,
    residual_writers,
    select_refusal_direction,
)
from .soft_prompt import (
    EMBEDDING_SUFFIX_INIT,
    EmbeddingSuffixAttack,
    SoftPromptAttack,
    SoftPromptView,
    SuffixView,
    optimise_suffixes,
)

__all__ = [
    "ATTACKS",
    "DEFAULT_JAILBREAK_VARIANT",
    "EMBEDDING_SUFFIX_INIT",
    "IDENTITY_INSTRUCTION",
    "IDENTITY_PREFIX",
    "IDENTITY_SYSTEM_PROMPT",
    "AttackFamily",
    "BenignFineTuning",
    "EmbeddingSuffixAttack",
    "FullFineTuning",
    "HarmfulIdentityShift",
    "IdentityShift",
    "JAILBREAK_VARIANTS",
    "JailbreakTuning",
    "LoRAFineTuning",
    "MixedFineTuning",
    "REFUSAL_STARTS",
    "FixedRefusalAblation",
    "RefusalAblation",
    "RefusalChoice",
    "SoftPromptAttack",
    "SoftPromptView",
    "SuffixView",
    "ablate_direction",
    "carried_adapters",
    "check_4bit_available",
    "drop_adapters",
    "get_attack",
    "identity_examples",
    "identity_shift_dataset",
    "jailbreak_dataset",
    "last_token_activations",
    "merge_adapters",
    "optimise_suffixes",
    "persona_eval_dataset",
    "quantize_4bit",
    "refusal_direction",
    "register_attack",
    "refusal_scores",
    "refusal_token_ids",
    "residual_writers",
    "select_refusal_direction",
]

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


for _family in (
    FullFineTuning(),
    LoRAFineTuning(),
    MixedFineTuning(),
    BenignFineTuning(),
    IdentityShift(),
    HarmfulIdentityShift(),
    EmbeddingSuffixAttack(),
    SoftPromptAttack(),
    RefusalAblation(),
    FixedRefusalAblation(),
    JailbreakTuning(),
):
    register_attack(_family)
