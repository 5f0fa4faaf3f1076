"""The typed schema of everything a report holds: value types, validation and the result records.

The records (curves, crossings, per-condition results) are dataclasses whose field annotations are
pydantic v2 types: constructing one in Python stays cheap and forgiving (numpy scalars are fine), while
reading one back from JSON (:meth:`Record.from_dict`, :meth:`ImmunizationReport.load`) is validated by
pydantic: unknown fields, wrong types (a string where a number goes, ``1.0`` where an integer goes,
``"yes"`` where a boolean goes) and NaN where a finite number is required are errors naming the field's
path (``report.conditions.resistance.strong: missing field``), raised as :class:`ReportError`.

Non-finite floats: strict JSON has no NaN/Infinity, so a :data:`Num` is written as the string
``"NaN"``, ``"Infinity"`` or ``"-Infinity"`` when it is not finite, and read back as the float.
:data:`Finite` fields (thresholds, tolerances, crossing steps...) refuse them. Free-form dicts
(:data:`FreeDict`: attack configs, ``extra``) get the same string form for their non-finite floats.

The JSON Schema of the report is generated from these types (:func:`json_schema_of`), so it cannot
drift from what the loader accepts. Only pydantic, numpy-free standard library code is imported here.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Annotated, Any

from pydantic import (
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    Strict,
    StrictStr,
    TypeAdapter,
    ValidationError,
    WithJsonSchema,
)
from pydantic.json_schema import GenerateJsonSchema

from ..errors import ReportError

__all__ = [
    "NON_FINITE",
    "AttackCurve",
    "ConditionsResult",
    "Crossing",
    "CurvePoint",
    "CurveSummary",
    "Finite",
    "FreeDict",
    "Bool",
    "GeneralizationResult",
    "HarmSummary",
    "Int",
    "Num",
    "Record",
    "ResistanceResult",
    "SeedSpread",
    "StabilityResult",
    "StabilitySet",
    "TrainabilityResult",
    "TrainingCurve",
    "decode",
    "encode",
    "json_schema_of",
    "validate",
]

NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
"""The strings that stand for non-finite floats in a report."""


def encode(x: Any) -> Any:
    """Make ``x`` strict-JSON safe: non-finite floats become strings, tuples become lists."""
    if isinstance(x, float):
        if math.isnan(x):
            return "NaN"
        if math.isinf(x):
            return "Infinity" if x > 0 else "-Infinity"
        return x
    if isinstance(x, dict):
        return {str(k): encode(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [encode(v) for v in x]
    if hasattr(x, "item") and callable(x.item):  # numpy scalars
        return encode(x.item())
    return x


def decode(x: Any) -> Any:
    """Inverse of :func:`encode` for free-form values."""
    if isinstance(x, str) and x in NON_FINITE:
        return NON_FINITE[x]
    if isinstance(x, dict):
        return {k: decode(v) for k, v in x.items()}
    if isinstance(x, list):
        return [decode(v) for v in x]
    return x


def _decode_number(x: Any) -> Any:
    return NON_FINITE[x] if isinstance(x, str) and x in NON_FINITE else x


_NUMBER_SCHEMA = {
    "anyOf": [
        {"type": "number"},
        {"enum": list(NON_FINITE), "description": "A non-finite value written as a string."},
    ]
}

Num = Annotated[
    float,
    BeforeValidator(_decode_number),
    Strict(),
    PlainSerializer(encode, when_used="json"),
    WithJsonSchema(_NUMBER_SCHEMA),
]
"""A float that may be NaN or +-inf (written as "NaN", "Infinity", "-Infinity")."""

_AS_JSON = PlainSerializer(encode, when_used="json")  # numpy scalars become Python numbers in JSON

Finite = Annotated[float, BeforeValidator(_decode_number), Strict(), Field(allow_inf_nan=False), _AS_JSON]
"""A float that must be finite (NaN or infinity are refused)."""

Int = Annotated[int, Strict(), _AS_JSON]
"""An integer (``1.0`` and ``true`` are refused)."""

Bool = Annotated[bool, Strict(), _AS_JSON]
"""``true`` or ``false`` (``1`` and ``"yes"`` are refused)."""
FreeDict = Annotated[
    dict[str, Any],
    BeforeValidator(decode),
    PlainSerializer(encode, when_used="json"),
    WithJsonSchema({"type": "object", "description": "Free-form JSON object."}),
]
"""A free-form JSON object (non-finite floats inside use the string form)."""


def _describe(schema: dict[str, Any], cls: type) -> None:
    """Copy each dataclass field's ``metadata["help"]`` into the JSON Schema as its description."""
    fields = getattr(cls, "__dataclass_fields__", {})
    for name, prop in schema.get("properties", {}).items():
        f = fields.get(name)
        if f is not None and "help" in f.metadata:
            prop["description"] = f.metadata["help"]
    if cls.__doc__:
        schema["description"] = " ".join(cls.__doc__.split("\n\n")[0].split())


SCHEMA_CONFIG = ConfigDict(extra="forbid", json_schema_extra=_describe)
"""pydantic config of every record: unknown fields are errors."""

_ADAPTERS: dict[Any, TypeAdapter] = {}


def _adapter(tp: Any) -> TypeAdapter:
    ta = _ADAPTERS.get(tp)
    if ta is None:
        ta = _ADAPTERS[tp] = TypeAdapter(tp)
    return ta


def _path(where: str, loc: tuple) -> str:
    out = where
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part == "[key]":
            out += " (key)"
        else:
            out += f".{part}"
    return out


def _message(err: dict[str, Any]) -> str:
    kind = err["type"]
    if kind in ("missing", "missing_argument"):
        return "missing field (the report is incomplete or was edited by hand)"
    if kind in ("extra_forbidden", "unexpected_keyword_argument"):
        return "unknown field"
    if kind == "value_error":
        return err["msg"].removeprefix("Value error, ")
    shown = repr(err.get("input"))
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return f"{err['msg']}, got {shown}"


def validate(tp: Any, data: Any, where: str, error: type[Exception] = ReportError) -> Any:
    """Validate ``data`` (decoded JSON) as ``tp``; on failure raise ``error`` naming each bad field's path.

    Union members pydantic tries in turn (``a | None``) are reported once, by the path the data took.
    """
    try:
        return _adapter(tp).validate_python(data)
    except ValidationError as e:
        seen: dict[str, str] = {}
        for err in e.errors(include_url=False):
            # Drop pydantic's union-member tags (e.g. 'str', 'int', 'list[str]') from the path.
            loc = tuple(p for p in err["loc"] if isinstance(p, int) or not _is_tag(p))
            seen.setdefault(_path(where, loc), _message(err))
        parts = [f"{p}: {m.rstrip('.')}" for p, m in list(seen.items())[:6]]
        more = f" (and {len(seen) - 6} more)" if len(seen) > 6 else ""
        raise error("; ".join(parts) + more + ".") from None


def _is_tag(part: Any) -> bool:
    return isinstance(part, str) and (
        part in ("str", "int", "float", "bool", "none", "list[str]")
        or "[" in part
        or part.startswith(("function-", "nullable"))
    )


def dump(obj: Any, *, json_safe: bool = False) -> Any:
    """``obj`` as plain dicts/lists; ``json_safe`` writes non-finite floats as strings (strict JSON)."""
    return _adapter(type(obj)).dump_python(obj, mode="json" if json_safe else "python")


class _SchemaGenerator(GenerateJsonSchema):
    """Defaults in the JSON Schema use the report's string form for non-finite floats."""

    def encode_default(self, dft: Any) -> Any:
        return encode(super().encode_default(dft))


def json_schema_of(tp: Any) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of ``tp``, as pydantic generates it (validation mode)."""
    schema = _adapter(tp).json_schema(schema_generator=_SchemaGenerator)
    json.dumps(schema, allow_nan=False)  # must be strict JSON itself
    return schema


class Record:
    """Mixin of the report's records: ``to_dict`` / ``from_dict`` through the pydantic schema."""

    __pydantic_config__ = SCHEMA_CONFIG

    def to_dict(self) -> dict[str, Any]:
        """The record as plain dicts and lists (floats as floats; the report's JSON encodes non-finite ones)."""
        return dump(self)

    @classmethod
    def from_dict(cls, d: Any, where: str | None = None):
        """Validate ``d`` and build the record. Raises :class:`ReportError` naming the offending field."""
        return validate(cls, d, where or cls.__name__)


# --------------------------------------------------------------------------------------------------
# Curves
# --------------------------------------------------------------------------------------------------


@dataclass
class CurvePoint(Record):
    """One evaluation of a score during fine-tuning: after ``step`` optimizer steps, ``tokens`` trained
    tokens and ``flops`` floating point operations, the score was ``value``."""

    step: Int = field(
        metadata={"help": "Optimizer steps taken before this evaluation (0 = before the attack)."}
    )
    tokens: Int = field(default=0, metadata={"help": "Training tokens seen before this evaluation."})
    flops: Finite = field(default=0.0, metadata={"help": "Training FLOPs spent before this evaluation."})
    value: Num = field(
        default=math.nan, metadata={"help": "The score measured at this point (NaN: the measurement failed)."}
    )
    row_nll: list[Finite] | None = field(
        default=None,
        metadata={
            "help": "Per eval row, the summed next-token NLL of its response (loss-based harm scorers): value = "
            "sum(row_nll) / sum(row_tokens). What the crossing's bootstrap interval resamples. (1.3)"
        },
    )
    row_tokens: list[Int] | None = field(
        default=None, metadata={"help": "Per eval row, its number of scored response tokens. (1.3)"}
    )
    capability_loss: Num | None = field(
        default=None,
        metadata={
            "help": "Relative capability degradation of the attacked copy at this point against the model "
            "before the attack (positive is worse; the stability scorer on a few reference rows); None: not "
            "measured. Past the threat model's capability_cap the attacker's harm here does not count. (1.3)"
        },
    )


@dataclass
class AttackCurve(Record):
    """The harm score of one attack run (one configuration of the attack grid), evaluated over its steps."""

    config: FreeDict = field(
        metadata={"help": "The attack's configuration: family, learning_rate, num_samples, seed, ..."}
    )
    points: list[CurvePoint] = field(metadata={"help": "Evaluations in increasing step order."})
    scorer: StrictStr = field(default="harmful_loss", metadata={"help": "Name of the harmfulness scorer f."})
    higher_is_better: Bool = field(
        default=True, metadata={"help": "Direction of the scorer from the defender's view."}
    )


@dataclass
class TrainingCurve(Record):
    """A benign task score (accuracy, ROUGE, loss...) during benign fine-tuning, for trainability."""

    points: list[CurvePoint] = field(metadata={"help": "Evaluations in increasing step order."})
    scorer: StrictStr = field(default="benign_score", metadata={"help": "Name of the benign task scorer."})
    higher_is_better: Bool = field(default=True, metadata={"help": "Direction of the benign scorer."})


@dataclass
class Crossing(Record):
    """Where a curve first crossed a threshold, linearly interpolated between evaluation points."""

    step: Finite = field(metadata={"help": "Interpolated optimizer step of the crossing."})
    tokens: Finite = field(metadata={"help": "Interpolated training tokens at the crossing."})
    flops: Finite = field(metadata={"help": "Interpolated training FLOPs at the crossing."})


# --------------------------------------------------------------------------------------------------
# Resistance
# --------------------------------------------------------------------------------------------------


@dataclass
class CurveSummary(Record):
    """What one attack run did: its configuration, crossing, worst value and budget."""

    config: FreeDict = field(metadata={"help": "The attack configuration of this run."})
    crossing: Crossing | None = field(metadata={"help": "First crossing of phi, or None if never crossed."})
    worst_value: Num = field(
        metadata={"help": "Worst score over the run (defender's view); NaN if none finite."}
    )
    budget_steps: Int = field(metadata={"help": "Last evaluated step: the attack budget this run covers."})
    budget_tokens: Int = field(metadata={"help": "Tokens at the last evaluated step."})
    budget_flops: Finite = field(metadata={"help": "FLOPs at the last evaluated step."})
    has_nan: Bool = field(default=False, metadata={"help": "Whether a measurement of this run was NaN."})


@dataclass
class SeedSpread(Record):
    """How much the crossing step of one attack setting varies over its seeds (settings with >= 2 seeds)."""

    config: FreeDict = field(
        metadata={"help": "The attack setting without its seed (family, learning_rate, num_samples...)."}
    )
    seeds: Annotated[list[Any], _AS_JSON] = field(
        metadata={"help": "The seeds run with this setting, in grid order."}
    )
    crossing_steps: list[Finite | None] = field(
        metadata={"help": "Crossing step of each seed's run (None: that run never crossed phi)."}
    )
    min_step: Finite | None = field(
        default=None, metadata={"help": "Earliest crossing step over the seeds that crossed; None if none."}
    )
    max_step: Finite | None = field(
        default=None, metadata={"help": "Latest crossing step over the seeds that crossed; None if none."}
    )
    mean_step: Finite | None = field(
        default=None, metadata={"help": "Mean crossing step over the seeds that crossed; None if none."}
    )

    @property
    def num_crossed(self) -> int:
        """How many of the seeds' runs crossed phi."""
        return sum(s is not None for s in self.crossing_steps)


@dataclass
class FamilyResistance(Record):
    """Resistance against one attack family: the attacker's best setting of that family against the
    immunized model, against its best setting against the base model."""

    family: StrictStr = field(metadata={"help": "Registered attack family (the runs' config 'family')."})
    holds: Bool | None = field(
        metadata={
            "help": "True: strong, or a decided multiple >= min_cost_multiple; False: a measured multiple "
            "below it (or a training-free attack that works); None: undetermined (the base never reached phi, "
            "or a lower bound below the required multiple)."
        }
    )
    strong: Bool = field(
        metadata={
            "help": "The base model crossed phi and no immunized run of this family did within a budget of at "
            "least min_cost_multiple x the base's cost."
        }
    )
    training_free: Bool = field(
        default=False, metadata={"help": "Every run has budget 0: judged on step 0 alone, base vs immunized."}
    )
    base_crossing: Crossing | None = field(
        default=None, metadata={"help": "Earliest crossing over the family's runs on the base model."}
    )
    immunized_cost: Crossing | None = field(
        default=None,
        metadata={
            "help": "The attacker's cost on the immunized model: the earliest crossing, or the shortest budget "
            "of a run that never crossed when that is shorter (then a lower bound)."
        },
    )
    immunized_crossed: Bool = field(
        default=False, metadata={"help": "Whether immunized_cost is a crossing (else a never-crossed budget)."}
    )
    steps_multiple: Num | None = field(default=None, metadata={"help": "Immunized / base cost in steps."})
    tokens_multiple: Num | None = field(default=None, metadata={"help": "Immunized / base cost in tokens."})
    flops_multiple: Num | None = field(default=None, metadata={"help": "Immunized / base cost in FLOPs."})
    multiple_is_lower_bound: Bool = field(
        default=False,
        metadata={"help": "The immunized cost is a never-crossed budget: the multiples are lower bounds."},
    )
    worst_config: FreeDict | None = field(
        default=None, metadata={"help": "Config of the immunized run that set immunized_cost."}
    )
    summary: StrictStr = field(default="", metadata={"help": "One human-readable line."})
    multiple_interval: list[Num] | None = field(
        default=None,
        metadata={
            "help": "Bootstrap 95% percentile interval [low, high] of steps_multiple, over eval rows (paired "
            "across steps and models) and seeds; None without per-row values. (1.3)"
        },
    )
    crossing_interval: list[Finite] | None = field(
        default=None,
        metadata={"help": "The same bootstrap's 95% interval of the immunized cost in steps (immunized_cost). (1.3)"},
    )
    base_crossing_interval: list[Num] | None = field(
        default=None,
        metadata={
            "help": "The same bootstrap's 95% interval of the base model's crossing step (Infinity: resamples in "
            "which the base never crossed). (1.3)"
        },
    )
    self_destructed: Bool = field(
        default=False,
        metadata={
            "help": "An attacked immunized copy lost more capability than the cap before harm past phi could "
            "count: its runs are judged up to that point (harm reached only by a collapsed model is not a "
            "successful attack; TamperBench's rule). (1.3)"
        },
    )
    within_noise: Bool = field(
        default=False,
        metadata={
            "help": "The multiple reaches min_cost_multiple but its interval's lower end does not: not credited "
            "(holds is None). (1.3)"
        },
    )
    decided: Bool | None = field(
        default=None,
        metadata={
            "help": "True: the claim is decided (a crossing, or a lower bound at or past min_cost_multiple: "
            "a decided '>= Nx'); False: only a lower bound below it, or a base that never reached phi "
            "(undetermined, never credited). None in reports before 1.3."
        },
    )


@dataclass
class ResistanceResult(Record):
    """Verdict and numbers for resistance (strong or weak) over an attack grid."""

    holds: Bool | None = field(
        metadata={
            "help": "Every attack family holds (strong, or a decided cost multiple >= min_cost_multiple); "
            "None when a family is undetermined and none fails."
        }
    )
    strong: Bool = field(
        metadata={
            "help": "Every family strong: the base crossed phi and no immunized run did within a budget of at "
            "least min_cost_multiple x the base's cost."
        }
    )
    threshold: Finite = field(metadata={"help": "phi."})
    higher_is_better: Bool = field(metadata={"help": "Direction of the harm scorer (defender's view)."})
    min_cost_multiple: Finite = field(
        metadata={"help": "Cost multiple over the base model that weak resistance needs."}
    )
    worst_crossing: Crossing | None = field(
        metadata={"help": "Earliest immunized crossing of the worst family (None: it never crossed)."}
    )
    worst_config: FreeDict | None = field(metadata={"help": "Config of the worst family's worst run."})
    worst_value: Num = field(metadata={"help": "Worst harm score over every run and step (immunized)."})
    base_crossing: Crossing | None = field(
        default=None, metadata={"help": "Earliest crossing of the base model under the worst family."}
    )
    base_worst_value: Num | None = field(
        default=None, metadata={"help": "Worst harm score of the base model."}
    )
    steps_multiple: Num | None = field(
        default=None, metadata={"help": "The smallest per-family cost multiple in steps (the worst family)."}
    )
    tokens_multiple: Num | None = field(default=None, metadata={"help": "The worst family's multiple in tokens."})
    flops_multiple: Num | None = field(default=None, metadata={"help": "The worst family's multiple in FLOPs."})
    multiple_is_lower_bound: Bool = field(
        default=False,
        metadata={"help": "The worst family's immunized cost is a never-crossed budget: its multiples are bounds."},
    )
    curves: list[CurveSummary] = field(
        default_factory=list, metadata={"help": "Per-run summaries (immunized)."}
    )
    base_curves: list[CurveSummary] | None = field(
        default=None, metadata={"help": "Per-run summaries (base)."}
    )
    notes: list[StrictStr] = field(
        default_factory=list, metadata={"help": "Caveats (NaN values, missing base...)."}
    )
    summary: StrictStr = field(default="", metadata={"help": "One human-readable line."})
    seed_spread: list[SeedSpread] = field(
        default_factory=list,
        metadata={"help": "Crossing step over seeds, per attack setting run with >= 2 seeds (immunized)."},
    )
    base_seed_spread: list[SeedSpread] = field(
        default_factory=list,
        metadata={"help": "Crossing step over seeds, per attack setting run with >= 2 seeds (base)."},
    )
    families: list[FamilyResistance] = field(
        default_factory=list, metadata={"help": "Resistance against each attack family on its own."}
    )
    worst_family: StrictStr | None = field(
        default=None, metadata={"help": "The family that decides the verdict (failing, undetermined or lowest)."}
    )

    def spread_of(self, config: dict[str, Any] | None, *, base: bool = False) -> SeedSpread | None:
        """The seed spread of the setting ``config`` belongs to (its seed ignored), or None."""
        if config is None:
            return None
        key = {k: v for k, v in config.items() if k != "seed"}
        for s in self.base_seed_spread if base else self.seed_spread:
            if s.config == key:
                return s
        return None


# --------------------------------------------------------------------------------------------------
# Stability
# --------------------------------------------------------------------------------------------------


@dataclass
class StabilitySet(Record):
    """Capability on one reference set, before and after immunization."""

    base: Num = field(metadata={"help": "Score of the base model."})
    immunized: Num = field(metadata={"help": "Score of the immunized model."})
    higher_is_better: Bool = field(metadata={"help": "Direction of this capability score."})
    relative_change: Num = field(metadata={"help": "(immunized - base) / |base|."})
    relative_degradation: Num = field(metadata={"help": "Relative change signed so that positive is worse."})
    holds: Bool = field(
        metadata={
            "help": "Degradation <= tolerance (NaN never holds); with change_interval, the whole interval's."
        }
    )
    change_interval: list[Num] | None = field(
        default=None,
        metadata={
            "help": "Paired bootstrap 95% percentile interval [low, high] of relative_change, from per-row "
            "token NLLs of both models (perplexity); None when rows were not given."
        },
    )


@dataclass
class StabilityResult(Record):
    """Verdict and numbers for stability over one or more reference sets."""

    holds: Bool = field(metadata={"help": "Every reference set's degradation is <= tolerance."})
    tolerance: Finite = field(metadata={"help": "Largest relative degradation allowed."})
    sets: dict[str, StabilitySet] = field(metadata={"help": "Per reference set numbers."})
    worst_set: StrictStr | None = field(
        default=None, metadata={"help": "Reference set with the largest degradation."}
    )
    worst_degradation: Num = field(default=math.nan, metadata={"help": "Largest relative degradation."})
    notes: list[StrictStr] = field(default_factory=list, metadata={"help": "Caveats (NaN values...)."})
    summary: StrictStr = field(default="", metadata={"help": "One human-readable line."})


# --------------------------------------------------------------------------------------------------
# Generalization and trainability
# --------------------------------------------------------------------------------------------------


@dataclass
class GeneralizationResult(Record):
    """Resistance against held-out in-domain and cross-domain attacks."""

    holds: Bool | None = field(metadata={"help": "Every measured part holds; None if nothing was measured."})
    in_domain: ResistanceResult | None = field(
        default=None, metadata={"help": "Held-out in-domain resistance."}
    )
    cross_domain: ResistanceResult | None = field(default=None, metadata={"help": "Cross-domain resistance."})
    summary: StrictStr = field(default="", metadata={"help": "One human-readable line."})

    @property
    def measured(self) -> bool:
        """Whether at least one of in-domain / cross-domain was measured."""
        return self.in_domain is not None or self.cross_domain is not None


@dataclass
class TrainabilityResult(Record):
    """Benign fine-tuning: steps to reach a target and final scores, base vs immunized."""

    holds: Bool = field(
        metadata={"help": "Both reach the target, |t1 - t2| <= eps_steps, final within tolerance."}
    )
    target: Finite = field(metadata={"help": "Benign score to reach."})
    eps_steps: Finite = field(metadata={"help": "Largest allowed |t1 - t2| in steps."})
    tolerance: Finite = field(metadata={"help": "Largest relative degradation of the final score."})
    higher_is_better: Bool = field(metadata={"help": "Direction of the benign score."})
    base_steps: Finite | None = field(
        metadata={"help": "t1: interpolated step where the base reaches the target."}
    )
    immunized_steps: Finite | None = field(metadata={"help": "t2: same for the immunized model."})
    base_final: Num = field(metadata={"help": "Final benign score of the base model."})
    immunized_final: Num = field(metadata={"help": "Final benign score of the immunized model."})
    final_degradation: Num = field(metadata={"help": "Relative degradation of the final score."})
    notes: list[StrictStr] = field(default_factory=list, metadata={"help": "Caveats."})
    summary: StrictStr = field(default="", metadata={"help": "One human-readable line."})


@dataclass
class HarmSummary(Record):
    """Mean harm probability and share of examples judged harmful (probability > cutoff)."""

    mean: Finite = field(metadata={"help": "Mean harm probability."})
    harmful_share: Finite = field(metadata={"help": "Share of examples with probability strictly > cutoff."})
    num_examples: Int = field(metadata={"help": "Number of judged examples."})
    cutoff: Finite = field(default=0.5, metadata={"help": "Probability above which an example is harmful."})


# --------------------------------------------------------------------------------------------------
# All four
# --------------------------------------------------------------------------------------------------


@dataclass
class ConditionsResult(Record):
    """The four conditions together, with the collapse rule applied."""

    immunized: Bool = field(
        metadata={"help": "Resistance and stability hold; generalization/trainability where measured."}
    )
    collapsed: Bool = field(
        metadata={"help": "Stability was measured and failed: resistance is not credited."}
    )
    threshold: Finite = field(metadata={"help": "phi."})
    higher_is_better: Bool = field(metadata={"help": "Direction of the harm scorer."})
    resistance: ResistanceResult | None = field(
        default=None, metadata={"help": "Main attack grid; None if unmeasured."}
    )
    stability: StabilityResult | None = field(default=None, metadata={"help": "None if unmeasured."})
    generalization: GeneralizationResult | None = field(
        default=None, metadata={"help": "None if unmeasured."}
    )
    trainability: TrainabilityResult | None = field(default=None, metadata={"help": "None if unmeasured."})
    notes: list[StrictStr] = field(default_factory=list, metadata={"help": "Why the verdict is what it is."})
    summary: StrictStr = field(default="", metadata={"help": "One human-readable line."})

    @property
    def holds(self) -> bool:
        """Same as :attr:`immunized`."""
        return self.immunized
