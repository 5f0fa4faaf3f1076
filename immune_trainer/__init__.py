"""immune_trainer: immunize language models against harmful fine-tuning, and measure it honestly.

The public API is imported lazily, so that ``import immune_trainer.conditions`` (pure Python, used by
the evaluate metric modules) does not import torch or transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    # conditions and report (pure)
    "AttackCurve": "conditions",
    "CurvePoint": "conditions",
    "TrainingCurve": "conditions",
    "assess": "conditions",
    "resistance": "conditions",
    "stability": "conditions",
    "generalization": "conditions",
    "trainability": "conditions",
    "ImmunizationReport": "report",
    "ThreatModel": "report",
    # data
    "build_pairs": "data",
    "tokenize_supervised": "data",
    "load_hub_dataset": "data",
    # scorers
    "get_scorer": "scoring",
    "list_scorers": "scoring",
    "register_scorer": "scoring",
    # attacks
    "AttackConfig": "attacks",
    "AttackResult": "attacks",
    "AttackSuite": "attacks",
    "HarmfulFineTuningAttack": "attacks",
    "register_attack": "attacks",
    "AttackSearch": "attacks",
    "SearchConfig": "attacks",
    "SearchSpace": "attacks",
    # side effects at step 0 (stability's second half)
    "SideEffectsConfig": "side_effects",
    "measure_side_effects": "side_effects",
    "compare_side_effects": "side_effects",
    "register_jailbreak_template": "side_effects",
    # comparing reports
    "compare_reports": "compare",
    # trainers and defenses
    "ImmunizationConfig": "trainer",
    "ImmunizationTrainer": "trainer",
    "get_defense": "defenses",
    "list_defenses": "defenses",
    "register_defense": "defenses",
    "GradientAscentConfig": "defenses",
    "GradientAscentTrainer": "defenses",
    # evaluation
    "EvaluationConfig": "evaluation",
    "ConditionDatasets": "evaluation",
    "evaluate_conditions": "evaluation",
    # hyperparameter sweep of a defense
    "DefenseSweep": "sweep",
    "SweepConfig": "sweep",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'immune_trainer' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__


if TYPE_CHECKING:  # pragma: no cover
    from .attacks import (  # noqa: F401
        AttackConfig,
        AttackResult,
        AttackSearch,
        AttackSuite,
        HarmfulFineTuningAttack,
        SearchConfig,
        SearchSpace,
        register_attack,
    )
    from .compare import compare_reports  # noqa: F401
    from .conditions import (  # noqa: F401
        AttackCurve,
        CurvePoint,
        TrainingCurve,
        assess,
        generalization,
        resistance,
        stability,
        trainability,
    )
    from .data import build_pairs, load_hub_dataset, tokenize_supervised  # noqa: F401
    from .defenses import (  # noqa: F401
        GradientAscentConfig,
        GradientAscentTrainer,
        get_defense,
        list_defenses,
        register_defense,
    )
    from .evaluation import ConditionDatasets, EvaluationConfig, evaluate_conditions  # noqa: F401
    from .report import ImmunizationReport, ThreatModel  # noqa: F401
    from .scoring import get_scorer, list_scorers, register_scorer  # noqa: F401
    from .side_effects import (  # noqa: F401
        SideEffectsConfig,
        compare_side_effects,
        measure_side_effects,
        register_jailbreak_template,
    )
    from .sweep import DefenseSweep, SweepConfig  # noqa: F401
    from .trainer import ImmunizationConfig, ImmunizationTrainer  # noqa: F401
