"""The typed report schema: the shipped JSON Schema, version 1.0 reports, path-naming errors, seed spread."""

from __future__ import annotations

import json
import math
from importlib import resources
from pathlib import Path

import pytest

from immune_trainer import conditions as C
from immune_trainer.cli import main as cli_main
from immune_trainer.conditions import AttackCurve, CurvePoint
from immune_trainer.conditions.report import (
    SCHEMA_VERSION,
    ImmunizationReport,
    ThreatModel,
    build_report,
    report_json_schema,
)
from immune_trainer.errors import ReportError

ROOT = Path(__file__).resolve().parent.parent
# The demo's report as committed on 2026-11-26 (schema 1.0), and the current demo's (schema 1.1).
DEMO_REPORT = ROOT / "tests" / "data" / "demo_report_schema_1_0.json"
CURRENT_DEMO_REPORT = ROOT / "model_cards" / "smollm2-135m-demo" / "immunization_report.json"
PHI = 2.0


def curve(values, **config):
    return AttackCurve(
        config={"family": "full", **config},
        points=[CurvePoint(step=5 * i, tokens=100 * i, flops=1e9 * i, value=v) for i, v in enumerate(values)],
    )


def seeded_report(**kw):
    """Two learning rates x two seeds; the immunized model crosses phi at different steps per seed."""
    threat = ThreatModel(
        attack_family="full",
        scorer="harmful_loss",
        higher_is_better=True,
        threshold=PHI,
        scorer_range=(0.0, math.inf),
        grid={"learning_rates": [1e-4, 3e-4], "seeds": [0, 1]},
        max_steps=20,
    )
    imm = [
        curve([3.0, 2.6, 2.2, 1.8, 1.5], learning_rate=1e-4, seed=0),
        curve([3.0, 2.8, 2.4, 2.1, 1.9], learning_rate=1e-4, seed=1),
        curve([3.0, 2.9, 2.7, 2.5, 2.3], learning_rate=3e-4, seed=0),  # never crosses
        curve([3.0, 2.9, 2.7, 2.5, 1.9], learning_rate=3e-4, seed=1),
    ]
    base = [curve([2.3, 1.9, 1.5, 1.2, 1.0], learning_rate=lr, seed=s) for lr in (1e-4, 3e-4) for s in (0, 1)]
    return build_report(
        threat_model=threat,
        base_model="base",
        immunized_model="immunized",
        base_curves={"attack": base},
        immunized_curves={"attack": imm},
        base_capability={"ppl": 10.0},
        immunized_capability={"ppl": 10.5},
        capability_higher_is_better={"ppl": False},
        **kw,
    )


# ---------------------------------------------------------------------------- the JSON Schema


def test_shipped_schema_files_are_the_generated_schema():
    generated = report_json_schema()
    shipped = json.loads(resources.files("immune_trainer").joinpath("data/report_schema.json").read_text())
    docs = json.loads((ROOT / "docs" / "report_schema.json").read_text())
    regenerate = "regenerate with `immune-trainer schema > FILE`"
    assert shipped == generated, f"immune_trainer/data/report_schema.json is stale: {regenerate}"
    assert docs == generated, f"docs/report_schema.json is stale: {regenerate}"
    assert generated["properties"]["schema_version"]["enum"] == ["1.0", "1.1", "1.2", "1.3"]
    assert generated["properties"]["schema_version"]["default"] == SCHEMA_VERSION
    # Non-finite numbers have their documented string form in the schema too.
    value = generated["$defs"]["CurvePoint"]["properties"]["value"]
    assert {"enum": ["NaN", "Infinity", "-Infinity"]}.items() <= value["anyOf"][1].items()


def test_schema_command_prints_the_schema(capsys):
    assert cli_main(["schema"]) == 0
    assert json.loads(capsys.readouterr().out) == report_json_schema()


# No JSON Schema validator is installed, so the test checks instances against the shipped schema with
# the handful of keywords pydantic's generated schema uses (asserted below, so a new keyword fails loudly).
_KEYWORDS = {
    "$defs",
    "$id",
    "$ref",
    "additionalProperties",
    "anyOf",
    "default",
    "description",
    "enum",
    "items",
}
_KEYWORDS |= {
    "maxItems",
    "minItems",
    "prefixItems",
    "properties",
    "propertyNames",
    "required",
    "title",
    "type",
}
_TYPES = {
    "object": dict,
    "array": list,
    "string": str,
    "integer": int,
    "number": (int, float),
    "boolean": bool,
    "null": type(None),
}


def _errors(x, schema, root, path="$"):
    if "$ref" in schema:
        return _errors(x, root["$defs"][schema["$ref"].split("/")[-1]], root, path)
    if "anyOf" in schema:
        options = [_errors(x, s, root, path) for s in schema["anyOf"]]
        return [] if any(not o for o in options) else min(options, key=len)
    out = []
    if "enum" in schema and x not in schema["enum"]:
        out.append(f"{path}: {x!r} not in {schema['enum']}")
    t = schema.get("type")
    if t is not None:
        ok = isinstance(x, _TYPES[t]) and not (t in ("integer", "number") and isinstance(x, bool))
        if not ok:
            return out + [f"{path}: {x!r} is not of type {t}"]
    if isinstance(x, dict):
        props = schema.get("properties", {})
        out += [f"{path}: missing {k}" for k in schema.get("required", []) if k not in x]
        for k, v in x.items():
            if "propertyNames" in schema:
                out += _errors(k, schema["propertyNames"], root, f"{path} key {k}")
            if k in props:
                out += _errors(v, props[k], root, f"{path}.{k}")
            elif schema.get("additionalProperties") is False:
                out.append(f"{path}: unknown field {k}")
            elif isinstance(schema.get("additionalProperties"), dict):
                out += _errors(v, schema["additionalProperties"], root, f"{path}.{k}")
    if isinstance(x, list):
        prefix = schema.get("prefixItems", [])
        if not schema.get("minItems", 0) <= len(x) <= schema.get("maxItems", len(x)):
            out.append(f"{path}: {len(x)} items")
        for i, v in enumerate(x):
            sub = prefix[i] if i < len(prefix) else schema.get("items")
            if sub is not None:
                out += _errors(v, sub, root, f"{path}[{i}]")
    return out


def _keywords(x, acc):
    if isinstance(x, dict):
        for k, v in x.items():
            acc.add(k)
            for sub in v.values() if k in ("properties", "$defs") else [v]:
                _keywords(sub, acc)
    elif isinstance(x, list):
        for v in x:
            _keywords(v, acc)
    return acc


def test_demo_report_of_schema_1_0_loads_and_matches_the_schema(tmp_path):
    raw = json.loads(DEMO_REPORT.read_text())
    assert raw["schema_version"] == "1.0"
    schema = json.loads(resources.files("immune_trainer").joinpath("data/report_schema.json").read_text())
    assert _keywords(schema, set()) <= _KEYWORDS
    assert _errors(raw, schema, schema) == []
    assert _errors(seeded_report(datasets={"attack_train": "x.jsonl"}).to_dict(), schema, schema) == []
    # The checker does catch what the schema forbids.
    bad = json.loads(json.dumps(raw))
    bad["threat_model"]["max_steps"] = "16"
    bad["conditions"]["resistance"]["colour"] = "red"
    bad["curves"]["base"]["attack"][0]["points"][0]["value"] = "inf"
    assert len(_errors(bad, schema, schema)) == 3
    report = ImmunizationReport.load(DEMO_REPORT)
    assert report.schema_version == SCHEMA_VERSION  # read as the current layout
    assert report.threat_model.scorer_range == (0.0, math.inf)
    assert report.datasets is None and report.side_effects is None and report.search is None
    assert report.conditions.resistance.steps_multiple == pytest.approx(
        raw["conditions"]["resistance"]["steps_multiple"]
    )
    again = ImmunizationReport.load(report.save(tmp_path / "r.json"))
    assert again.to_dict() == report.to_dict()


def test_the_current_demo_report_matches_the_shipped_schema():
    raw = json.loads(CURRENT_DEMO_REPORT.read_text())
    assert raw["schema_version"] == SCHEMA_VERSION
    schema = json.loads(resources.files("immune_trainer").joinpath("data/report_schema.json").read_text())
    assert _errors(raw, schema, schema) == []
    report = ImmunizationReport.load(CURRENT_DEMO_REPORT)
    assert report.side_effects is not None and report.datasets["attack_train"] == "embedded:harmful_qa/defense"


def test_1_0_extra_datasets_becomes_the_typed_field():
    d = seeded_report().to_dict()
    d["schema_version"] = "1.0"
    for key in ("datasets", "side_effects", "search"):
        del d[key]
    d["extra"]["datasets"] = {"attack_train": "a.jsonl", "attack_eval": "b.jsonl", "eval_limit": 4}
    report = ImmunizationReport.from_dict(d)
    assert report.datasets == {"attack_train": "a.jsonl", "attack_eval": "b.jsonl", "eval_limit": 4}
    assert "datasets" not in report.extra


def test_new_optional_fields_round_trip(tmp_path):
    datasets = {
        "attack_train": "embedded:harmful_qa/attack",
        "split_seed": 3,
        "eval_limit": 6,
        "reference": [],
    }
    from immune_trainer.conditions import SideEffectsMeasurement, TemplateMeasurement, compare_side_effects

    def measured(refusal, harm):
        return SideEffectsMeasurement({"plain": TemplateMeasurement(n=4, refusal_rate=refusal, harm=harm)})

    side = compare_side_effects(measured(0.5, 0.2), measured(0.5, 0.25), 0.1).to_dict()
    report = seeded_report(datasets=datasets, side_effects=side, search={"trials": 12, "budget_s": 600.0})
    back = ImmunizationReport.load(report.save(tmp_path / "r.json"))
    assert back.datasets == datasets
    assert back.search == {"trials": 12, "budget_s": 600.0}
    assert back.side_effects == side


# ---------------------------------------------------------------------------- strict validation


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d["threat_model"].update(threshold="NaN"), r"report\.threat_model\.threshold: .*finite"),
        (lambda d: d["threat_model"].update(max_steps=20.0), r"report\.threat_model\.max_steps: .*integer"),
        (
            lambda d: d["conditions"]["resistance"]["curves"][0].update(colour="red"),
            r"report\.conditions\.resistance\.curves\[0\]\.colour: unknown field",
        ),
        (lambda d: d.update(surprise=1), r"report\.surprise: unknown field"),
        (lambda d: d["curves"]["immunized"].update(atack=[]), r"report\.curves\.immunized\.atack"),
        (lambda d: d.update(datasets={"attack_train": 3.5}), r"report\.datasets\.attack_train"),
        (lambda d: d["conditions"]["stability"].update(holds=1), r"report\.conditions\.stability\.holds"),
    ],
)
def test_invalid_reports_name_the_field_path(mutate, message):
    d = seeded_report().to_dict()
    mutate(d)
    with pytest.raises(ReportError, match=message):
        ImmunizationReport.from_dict(d)


def test_nan_is_kept_where_a_measurement_may_fail(tmp_path):
    report = seeded_report()
    report.curves["immunized"]["attack"][0].points[1].value = math.nan
    text = report.to_json()
    assert '"NaN"' in text
    back = ImmunizationReport.from_json(text)
    assert math.isnan(back.curves["immunized"]["attack"][0].points[1].value)


# ---------------------------------------------------------------------------- seed spread


def test_seed_spread_per_setting_and_in_the_table():
    report = seeded_report()
    r = report.conditions.resistance
    assert [s.config["learning_rate"] for s in r.seed_spread] == [1e-4, 3e-4]
    low, high = r.seed_spread
    steps = [C.first_crossing(c, PHI, True).step for c in report.curves["immunized"]["attack"][:2]]
    assert low.seeds == [0, 1] and low.crossing_steps == pytest.approx(steps)
    assert (low.min_step, low.max_step) == pytest.approx((min(steps), max(steps)))
    assert low.mean_step == pytest.approx(sum(steps) / 2)
    # At lr 3e-4 only seed 1 crosses: the spread covers the one crossing and says so.
    assert high.crossing_steps[0] is None and high.num_crossed == 1
    assert len(r.base_seed_spread) == 2 and r.base_seed_spread[0].min_step == r.base_seed_spread[0].max_step

    line = next(x for x in report.table().splitlines() if x.startswith("resistance"))
    expected = (
        f"step {C.fmt_number(min(steps))} ({C.fmt_number(min(steps), 3)}-{C.fmt_number(max(steps), 3)}, "
        f"mean {C.fmt_number(sum(steps) / 2, 3)} over 2 seeds)"
    )
    assert expected in line


def test_single_seed_grids_have_no_spread():
    spreads = C.seed_spread(
        C.resistance([curve([3.0, 1.0], learning_rate=1e-4, seed=0)], PHI, higher_is_better=True).curves
    )
    assert spreads == []


def test_numpy_scalars_from_scorers_serialise_as_plain_json_numbers():
    import numpy as np

    report = seeded_report()
    point = report.curves["immunized"]["attack"][0].points[1]
    point.step, point.value = np.int64(point.step), np.float32(2.5)
    report.conditions.stability.sets["ppl"].holds = np.bool_(True)
    back = ImmunizationReport.from_json(report.to_json())
    assert back.curves["immunized"]["attack"][0].points[1].value == 2.5
    assert back.conditions.stability.sets["ppl"].holds is True
