"""immune_trainer: immunize language models against harmful fine-tuning, and measure it honestly.

The public API is imported lazily, so that ``import immune_trainer.conditions`` (pure Python, used by
the evaluate metric modules) does not import torch or transformers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .lazy import lazy_exports

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
    "ImmunizationReport": "conditions",
    "ThreatModel": "conditions",
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
    "SideEffectsConfig": "evaluation",
    "measure_side_effects": "evaluation",
    "compare_side_effects": "conditions",
    "register_jailbreak_template": "evaluation",
    # comparing reports
    "compare_reports": "conditions",
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


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)


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
    from .conditions import (  # noqa: F401
        AttackCurve,
        CurvePoint,
        ImmunizationReport,
        ThreatModel,
        TrainingCurve,
        assess,
        compare_reports,
        compare_side_effects,
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
    from .evaluation import (  # noqa: F401  # noqa: F401
        ConditionDatasets,
        EvaluationConfig,
        SideEffectsConfig,
        evaluate_conditions,
        measure_side_effects,
        register_jailbreak_template,
    )
    from .scoring import get_scorer, list_scorers, register_scorer  # noqa: F401
    from .sweep import DefenseSweep, SweepConfig  # noqa: F401
    from .trainer import ImmunizationConfig, ImmunizationTrainer  # noqa: F401
