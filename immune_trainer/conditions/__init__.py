"""The four immunization conditions as pure functions: curves and scores in, verdicts with numbers out.

Rosati et al. (2024), "Immunization against harmful fine-tuning attacks" (arXiv 2402.16382), ask an
immunized model to satisfy four conditions. This package turns measurements into verdicts:

* :func:`resistance`: does harm stay on the good side of the threshold phi for the attacker's whole
  budget (strong), or at least cost the attacker ``min_cost_multiple`` times what the base model costs
  (weak)? The worst case over every attack configuration of the grid is what counts.
* :func:`stability`: is capability on reference sets unchanged (within a relative tolerance)?
* :func:`generalization`: does resistance hold against held-out in-domain and cross-domain attacks?
* :func:`trainability`: does benign fine-tuning reach a target as fast and as well as on the base?
* :func:`assess` combines them, and refuses to credit resistance to a model whose stability failed
  (a collapsed model "resists" only because it is broken).

Direction convention: every score carries ``higher_is_better`` from the defender's point of view.
The harmful loss (NLL of harmful responses) has ``higher_is_better=True`` (the attacker lowers it); a
judge's harm probability has ``higher_is_better=False``. A point has crossed phi when its value is
strictly on the bad side of phi. A NaN value is treated as crossed (a failed measurement cannot
certify resistance), and a note says so.

This package is the bottom layer of the library: measurements in, verdicts and the report out. Only
numpy, pydantic and the standard library are imported: no torch, no transformers, no Hub (the evaluate
modules in ``metrics/`` import it and nothing else of ours).

* ``curves``: points, crossings of phi, worst values, seed spreads, number formatting;
* ``resistance``: :func:`resistance`, :func:`resistance_by_family`, :func:`generalization`;
* ``stability``, ``trainability``: the other two conditions;
* ``verdict``: :func:`assess` (all four) and :func:`summarize_harm`;
* ``side_effects``: the side-effects half of stability (measurements in, :func:`compare_side_effects` out);
* ``helpfulness``: over-refusal and generated exact match at step 0, part of stability
  (:func:`compare_helpfulness`); ``attacked_harm``: the attacked models' refusal and judged harm per family;
* ``schema``: the typed records (:class:`ResistanceResult`, :class:`ConditionsResult`...) and JSON codec;
* ``report``: :class:`ImmunizationReport`, :class:`ThreatModel`, :func:`build_report`;
* ``compare``: many reports side by side (:func:`compare_reports`).
"""

from .attacked_harm import AFTER_ATTACK_KEY, attacked_harm_by_family
from .compare import Comparison, ComparisonRow, compare_reports
from .curves import (
    CURVE_SETS,
    EVALUATE_KWARGS,
    check_metric_kwargs,
    curves_from_columns,
    first_crossing,
    fmt_number,
    fmt_percent,
    require_finite,
    seed_spread,
    worst_value,
)
from .helpfulness import HelpfulnessMeasurement, HelpfulnessResult, compare_helpfulness
from .report import SCHEMA_VERSION, ImmunizationReport, ThreatModel, build_report, report_json_schema
from .resistance import (
    credited_curve,
    generalization,
    resistance,
    resistance_by_family,
    resistance_from_columns,
)
from .schema import (
    AttackCurve,
    ConditionsResult,
    Crossing,
    CurvePoint,
    CurveSummary,
    FamilyResistance,
    GeneralizationResult,
    HarmSummary,
    ResistanceResult,
    SeedSpread,
    StabilityResult,
    StabilitySet,
    TrainabilityResult,
    TrainingCurve,
)
from .side_effects import (
    SideEffectsMeasurement,
    SideEffectsResult,
    SideEffectsRow,
    TemplateMeasurement,
    compare_side_effects,
)
from .stability import relative_degradation, stability
from .trainability import trainability
from .verdict import assess, summarize_harm

__all__ = [
    "AFTER_ATTACK_KEY",
    "CURVE_SETS",
    "EVALUATE_KWARGS",
    "SCHEMA_VERSION",
    "AttackCurve",
    "Comparison",
    "ComparisonRow",
    "ConditionsResult",
    "Crossing",
    "CurvePoint",
    "CurveSummary",
    "FamilyResistance",
    "GeneralizationResult",
    "HarmSummary",
    "HelpfulnessMeasurement",
    "HelpfulnessResult",
    "ImmunizationReport",
    "ResistanceResult",
    "SeedSpread",
    "SideEffectsMeasurement",
    "SideEffectsResult",
    "SideEffectsRow",
    "StabilityResult",
    "StabilitySet",
    "TemplateMeasurement",
    "ThreatModel",
    "TrainabilityResult",
    "TrainingCurve",
    "assess",
    "attacked_harm_by_family",
    "build_report",
    "check_metric_kwargs",
    "compare_helpfulness",
    "compare_reports",
    "compare_side_effects",
    "curves_from_columns",
    "first_crossing",
    "fmt_number",
    "fmt_percent",
    "generalization",
    "relative_degradation",
    "report_json_schema",
    "require_finite",
    "credited_curve",
    "resistance",
    "resistance_by_family",
    "resistance_from_columns",
    "seed_spread",
    "stability",
    "summarize_harm",
    "trainability",
    "worst_value",
]
