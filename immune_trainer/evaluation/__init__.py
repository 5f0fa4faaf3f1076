"""The evaluation: both models attacked and measured, the four conditions judged, one report.

* ``config``: :class:`ConditionDatasets` (the data of each condition) and :class:`EvaluationConfig`;
* ``stages``: one function per stage (side effects, resistance, generalization, stability,
  trainability), each with typed inputs and outputs;
* ``pipeline``: :func:`evaluate_conditions`, the stages in order, then the report;
* ``attack_sets``: phi read off the base model, the generalization attack, the threat model's grid record;
* ``side_effects`` and ``jailbreak_templates``: the step-0 side-effects measurement and its templates;
* ``specs``: ``immune-trainer evaluate`` (models and datasets named by SPEC strings).
* ``recorded``: the data record a report keeps (``report.datasets``) and the datasets it describes
  (:func:`~immune_trainer.evaluation.recorded.condition_datasets`), which ``verify`` rebuilds.

The verdict arithmetic and the report live one layer down, in :mod:`immune_trainer.conditions`.
"""

from .attack_sets import dependency_versions, threshold_from_base
from .config import ConditionDatasets, EvaluationConfig
from .helpfulness import AttackedHarmProbe, benign_request_texts, measure_helpfulness
from .jailbreak_templates import (
    DEFAULT_TEMPLATES,
    JAILBREAK_TEMPLATES,
    JailbreakTemplate,
    get_jailbreak_template,
    list_jailbreak_templates,
    register_jailbreak_template,
)
from .pipeline import evaluate_conditions, planned_stages
from .side_effects import SideEffectsConfig, embedded_side_effect_prompts, measure_side_effects, prompt_texts
from .specs import EvaluationData, evaluate_from_specs, load_reference_spec
from .stages import (
    AttackSetResult,
    BenignResult,
    CapabilityResult,
    EvaluationRun,
    attacked_harm_probe,
    benign_curves,
    capability_probe,
    generalization_stage,
    helpfulness_stage,
    resistance_stage,
    side_effects_stage,
    stability_stage,
    trainability_stage,
)

__all__ = [
    "DEFAULT_TEMPLATES",
    "JAILBREAK_TEMPLATES",
    "AttackSetResult",
    "AttackedHarmProbe",
    "BenignResult",
    "CapabilityResult",
    "ConditionDatasets",
    "EvaluationConfig",
    "EvaluationData",
    "EvaluationRun",
    "JailbreakTemplate",
    "SideEffectsConfig",
    "attacked_harm_probe",
    "capability_probe",
    "benign_curves",
    "benign_request_texts",
    "dependency_versions",
    "embedded_side_effect_prompts",
    "evaluate_conditions",
    "evaluate_from_specs",
    "generalization_stage",
    "get_jailbreak_template",
    "helpfulness_stage",
    "list_jailbreak_templates",
    "load_reference_spec",
    "measure_helpfulness",
    "measure_side_effects",
    "planned_stages",
    "prompt_texts",
    "register_jailbreak_template",
    "resistance_stage",
    "side_effects_stage",
    "stability_stage",
    "threshold_from_base",
    "trainability_stage",
]
