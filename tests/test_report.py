"""The versioned JSON report: round trip, strict JSON, atomic save, validation and the text table."""

from __future__ import annotations

import json
import math
import os

import pytest

from immune_trainer.conditions import AttackCurve, CurvePoint, TrainingCurve
from immune_trainer.conditions import report as report_mod
from immune_trainer.conditions.report import SCHEMA_VERSION, ImmunizationReport, ThreatModel, build_report
from immune_trainer.errors import ConfigError, OutputError, ReportError


def curve(values, **config):
    return AttackCurve(
        config={"family": "full", **config},
        points=[CurvePoint(step=5 * i, tokens=500 * i, flops=5e9 * i, value=v) for i, v in enumerate(values)],
    )


def tcurve(values):
    return TrainingCurve(
        points=[CurvePoint(step=10 * i, tokens=0, flops=0.0, value=v) for i, v in enumerate(values)],
        scorer="acc",
    )


def threat(**kw):
    args = dict(
        attack_family="full",
        scorer="harmful_loss",
        higher_is_better=True,
        threshold=2.07,
        scorer_range=(0.0, math.inf),
        threshold_source="base model after 10 steps at lr 3e-5",
        grid={"learning_rates": [3e-5, 8e-5], "num_samples": [200], "seeds": [0]},
        max_steps=20,
        eval_every=5,
        batch_size=4,
        max_length=160,
        trainability_target=0.8,
        trainability_eps_steps=5.0,
    )
    args.update(kw)
    return ThreatModel(**args)


def make_report(immunized_ppl=5.8, **kw):
    return build_report(
        threat_model=threat(),
        base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
        immunized_model="out/immunized",
        base_curves={"attack": [curve([2.174, 2.124, 2.070, 2.034, 1.971], learning_rate=3e-5)]},
        immunized_curves={"attack": [curve([9.4, 5.0, 3.3, 2.8, 2.3], learning_rate=3e-5)]},
        base_capability={"chat_ppl": 5.9},
        immunized_capability={"chat_ppl": immunized_ppl},
        capability_higher_is_better={"chat_ppl": False},
        base_benign=tcurve([0.5, 0.7, 0.9]),
        immunized_benign=tcurve([0.5, 0.6, 0.9]),
        defense={"name": "repnoise", "config": {"alpha": 1.0, "beta": 0.001}},
        weights_sha256={"model.safetensors": "ab" * 32},
        dependencies={"torch": "2.13.0", "transformers": "5.24.0"},
        **kw,
    )


def test_build_fills_everything_and_round_trips(tmp_path):
    r = make_report()
    assert r.schema_version == SCHEMA_VERSION
    assert r.conditions.immunized
    assert r.library["dependencies"]["torch"] == "2.13.0"
    assert r.models["weights_sha256"] == {"model.safetensors": "ab" * 32}
    path = r.save(tmp_path / "report.json")
    loaded = ImmunizationReport.load(path)
    assert loaded == r
    assert loaded.threat_model.scorer_range == (0.0, math.inf)


def test_json_is_strict_and_non_finite_values_come_back(tmp_path):
    r = make_report()
    r.extra = {"nan": math.nan, "inf": [math.inf, -math.inf]}
    text = r.to_json()
    assert "NaN" not in text.replace('"NaN"', "")  # only the quoted string form
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict literal {c}"))
    back = ImmunizationReport.from_json(text)
    assert math.isnan(back.extra["nan"]) and back.extra["inf"] == [math.inf, -math.inf]


def test_atomic_save_keeps_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "report.json"
    good = make_report()
    good.save(path)
    before = path.read_text()

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report_mod.os, "replace", broken_replace)
    with pytest.raises(OutputError, match="report.json"):
        make_report(immunized_ppl=3307.0).save(path)
    assert path.read_text() == before
    assert os.listdir(tmp_path) == ["report.json"]  # no temp file left behind


def test_unwritable_location_is_an_output_error(tmp_path):
    with pytest.raises(OutputError, match="missing_dir"):
        make_report().save(tmp_path / "missing_dir" / "report.json")


def test_corrupt_json_names_path_and_position(tmp_path):
    path = tmp_path / "report.json"
    text = make_report().to_json()
    path.write_text(text[: len(text) // 2])
    with pytest.raises(ReportError, match=r"report\.json.*line \d+, column \d+"):
        ImmunizationReport.load(path)
    with pytest.raises(ReportError, match="no report at"):
        ImmunizationReport.load(tmp_path / "absent.json")


def test_unknown_schema_version_is_refused():
    d = make_report().to_dict()
    d["schema_version"] = "2.0"
    with pytest.raises(ReportError, match="schema_version.*upgrade"):
        ImmunizationReport.from_dict(d)


@pytest.mark.parametrize(
    "mutate, field_name",
    [
        (lambda d: d.pop("conditions"), "conditions"),
        (lambda d: d["models"].pop("immunized"), "immunized"),
        (lambda d: d["threat_model"].pop("threshold"), "threshold"),
        (lambda d: d["conditions"]["resistance"].pop("strong"), "strong"),
        (lambda d: d["curves"]["base"]["attack"][0]["points"][0].update(value="low"), "value"),
        (lambda d: d.update(notes="not a list"), "notes"),
        (lambda d: d["conditions"].update(immunized="yes"), "immunized"),
    ],
)
def test_missing_or_wrong_fields_are_named(mutate, field_name):
    d = make_report().to_dict()
    mutate(d)
    with pytest.raises(ReportError, match=field_name):
        ImmunizationReport.from_dict(d)


def test_threshold_outside_scorer_range_is_a_config_error():
    with pytest.raises(ConfigError, match="outside the range"):
        threat(scorer="judge", higher_is_better=False, threshold=1.5, scorer_range=(0.0, 1.0))
    with pytest.raises(ConfigError, match="outside the range"):
        threat(threshold=-1.0)
    # and a saved report with such a threshold is refused on load
    d = make_report().to_dict()
    d["threat_model"]["threshold"] = -3.0
    with pytest.raises(ReportError, match="threshold"):
        ImmunizationReport.from_dict(d)


def test_table_shows_each_condition_and_the_verdict():
    t = make_report().table()
    lines = t.splitlines()
    for name in ("resistance", "stability", "gen. in-domain", "gen. cross-domain", "trainability"):
        assert any(line.startswith(name) for line in lines), name
    res = next(line for line in lines if line.startswith("resistance"))
    assert "step 10" in res and "never" in res and "PASS strong" in res
    stab = next(line for line in lines if line.startswith("stability"))
    assert "5.9" in stab and "5.8" in stab and "PASS" in stab
    assert "VERDICT: IMMUNIZED" in t

    collapsed = make_report(immunized_ppl=3307.0).table()
    assert "VERDICT: NOT IMMUNIZED (collapsed" in collapsed
    stab = next(line for line in collapsed.splitlines() if line.startswith("stability"))
    assert "3307" in stab and "FAIL" in stab
