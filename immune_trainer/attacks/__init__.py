"""The attack harness: the attacker's harmful fine-tuning (equation 1), run on copies of the model.

- ``config``: :class:`AttackConfig` (families, the grid of settings, the step budget), the optimizers of
  the grid, the grid's fields, :func:`setting_label` and :func:`scorer_key`.
- ``families/``: the attack families, one module each (full, lora with its 4-bit QLoRA copy, mixed,
  benign, identity_shift, soft_prompt for ``embedding``, refusal_ablation, jailbreak_tuning), their base class and the
  registry (:data:`ATTACKS`, :func:`register_attack`, :func:`get_attack`).
- ``harness``: :class:`HarmfulFineTuningAttack` (runs the grid through a Trainer, early stopping, resume),
  :class:`AttackResult` and :func:`model_fingerprint`.
- ``suite``: :class:`AttackSuite` (several grids judged as one) and :func:`as_suite`.
- ``search_config``: :class:`SearchSpace` and :class:`SearchConfig`, what an attack search varies and how
  it runs.
- ``calibration``: :class:`CalibratedAttack` and :class:`CalibrationConfig`, the attack searched per
  training family and model (a small pruned search; the evaluation's default);
- ``search``: :class:`AttackSearch` (the Optuna worst case under a capability cap) and its trials and
  result.
"""

from __future__ import annotations

from .calibration import CalibratedAttack, CalibrationConfig, cumulative_max, is_calibrated
from .capability import CapabilityProbe
from .config import (
    GRID_FIELDS,
    OPTIMIZERS,
    AttackConfig,
    optimizer_arguments,
    scorer_key,
    setting_label,
)
from .families import (
    ATTACKS,
    IDENTITY_PREFIX,
    IDENTITY_SYSTEM_PROMPT,
    JAILBREAK_VARIANTS,
    AttackFamily,
    BenignFineTuning,
    FullFineTuning,
    IdentityShift,
    JailbreakTuning,
    LoRAFineTuning,
    MixedFineTuning,
    RefusalAblation,
    SoftPromptAttack,
    SoftPromptView,
    ablate_direction,
    carried_adapters,
    check_4bit_available,
    drop_adapters,
    get_attack,
    identity_shift_dataset,
    jailbreak_dataset,
    last_token_activations,
    merge_adapters,
    quantize_4bit,
    refusal_direction,
    register_attack,
    residual_writers,
)
from .harness import AttackResult, HarmfulFineTuningAttack, model_fingerprint
from .search import AttackSearch, SearchResult, SearchTrial, trials_table
from .search_config import SEARCHABLE, SearchConfig, SearchSpace
from .suite import AttackSuite, as_suite

__all__ = [
    "CapabilityProbe",
    # config
    "GRID_FIELDS",
    "OPTIMIZERS",
    "AttackConfig",
    "optimizer_arguments",
    "scorer_key",
    "setting_label",
    # families and the registry
    "ATTACKS",
    "IDENTITY_PREFIX",
    "IDENTITY_SYSTEM_PROMPT",
    "AttackFamily",
    "BenignFineTuning",
    "FullFineTuning",
    "IdentityShift",
    "JAILBREAK_VARIANTS",
    "JailbreakTuning",
    "LoRAFineTuning",
    "MixedFineTuning",
    "RefusalAblation",
    "SoftPromptAttack",
    "SoftPromptView",
    "ablate_direction",
    "carried_adapters",
    "check_4bit_available",
    "drop_adapters",
    "get_attack",
    "identity_shift_dataset",
    "jailbreak_dataset",
    "last_token_activations",
    "merge_adapters",
    "quantize_4bit",
    "refusal_direction",
    "register_attack",
    "residual_writers",
    # harness
    "AttackResult",
    "HarmfulFineTuningAttack",
    "model_fingerprint",
    # suite
    "AttackSuite",
    "as_suite",
    # search
    "SEARCHABLE",
    "AttackSearch",
    "CalibratedAttack",
    "CalibrationConfig",
    "cumulative_max",
    "is_calibrated",
    "SearchConfig",
    "SearchResult",
    "SearchSpace",
    "SearchTrial",
    "trials_table",
]
