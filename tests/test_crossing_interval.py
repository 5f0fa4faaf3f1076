"""The bootstrap interval of each attack family's crossing and multiple: the arithmetic on hand-made curves
(pure), the within-noise rule, older reports without rows, the table, and the per-row harm a real attack
run records."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from immune_trainer.attacks import AttackConfig, HarmfulFineTuningAttack
from immune_trainer.conditions import AttackCurve, CurvePoint, first_crossing, resistance
from immune_trainer.conditions.report import ImmunizationReport, ThreatModel, build_report
from immune_trainer.conditions.resistance import crossing_steps
from immune_trainer.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
# The demo report of schema 1.2 (no per-row harm), as committed before 1.3.
CURRENT_DEMO_REPORT = ROOT / "tests" / "data" / "demo_report_schema_1_2.json"
PHI = 2.5  # harmful_loss: higher is better for the defender, the attacker drives it below phi
TOKENS = 10


def _curve(steps, means, effects, *, rows=True, **config) -> AttackCurve:
    """A curve whose point j has, per eval row i, a mean token NLL ``means[j] + effects[j][i]`` (``TOKENS``
    tokens a row; ``effects`` may be one list for every point); its value is the token-weighted mean of its
    rows, as the loss scorer's."""
    points = []
    for j, (step, mean) in enumerate(zip(steps, means)):
        e = effects[j] if isinstance(effects[0], list) else effects
        row_nll = [TOKENS * (mean + x) for x in e]
        row_tokens = [TOKENS] * len(e)
        value = sum(row_nll) / sum(row_tokens)
        extra = {"row_nll": row_nll, "row_tokens": row_tokens} if rows else {}
        points.append(CurvePoint(step=step, tokens=100 * step, flops=1e9 * step, value=value, **extra))
    return AttackCurve(config={"family": "full", "learning_rate": 1e-4, **config}, points=points)


def _effects(sd: float, n: int = 20, seed: int = 0) -> list[float]:
    e = np.random.default_rng(seed).normal(0.0, sd, size=n)
    return [float(x) for x in e - e.mean()]  # centred: the point estimate does not depend on sd


def _noise(sd: float, points: int, seed: int) -> list[list[float]]:
    """Row effects drawn afresh at every point (how each eval row responds to each step)."""
    return [_effects(sd, seed=seed + j) for j in range(points)]


# The base falls fast (3.0 -> 2.0 in 2 steps: crosses phi at step 1); the immunized model hovers just above
# phi from step 2 to 4 and crosses between steps 4 and 6 (at step 5): a multiple of 5x at the point estimate.
BASE_STEPS, BASE_MEANS = [0, 2, 4], [3.0, 2.0, 1.0]
IMM_STEPS, IMM_MEANS = [0, 2, 4, 6, 8], [3.0, 2.52, 2.51, 2.49, 2.0]


def _judge(sd: float, *, rows: bool = True, min_cost_multiple: float = 2.0):
    imm = [_curve(IMM_STEPS, IMM_MEANS, _noise(sd, 5, 0), rows=rows)]
    base = [_curve(BASE_STEPS, BASE_MEANS, _noise(sd, 3, 10), rows=rows)]
    return resistance(imm, PHI, higher_is_better=True, base_curves=base, min_cost_multiple=min_cost_multiple)


def test_a_clear_crossing_gives_a_narrow_interval_that_passes():
    r = _judge(0.02)
    (f,) = r.families
    assert f.steps_multiple == pytest.approx(5.0, rel=1e-6)
    low, high = f.multiple_interval
    assert 4.0 < low <= f.steps_multiple + 1e-9 <= high + 2e-9 < 6.5  # narrow, around the point estimate
    assert f.crossing_interval[0] <= f.immunized_cost.step <= f.crossing_interval[1]
    assert f.base_crossing_interval[0] <= f.base_crossing.step <= f.base_crossing_interval[1]
    assert f.holds is True and not f.within_noise
    assert r.holds is True
    assert "95% interval" in f.summary


def test_noisy_rows_give_an_interval_across_the_required_multiple_and_no_credit():
    r = _judge(0.3)
    (f,) = r.families
    # Same point estimate as the clear case (the row effects are centred), above the required 2x ...
    assert f.steps_multiple == pytest.approx(5.0, rel=1e-6)
    low, high = f.multiple_interval
    # ... but the interval straddles it: within noise, not credited.
    assert low < 2.0 < high
    assert f.within_noise and f.holds is None and not f.strong
    assert r.holds is None and r.worst_family == "full"
    assert "within noise" in f.summary
    assert any("within noise" in n for n in r.notes)


def test_without_rows_the_point_rule_judges_as_before():
    r = _judge(0.3, rows=False)
    (f,) = r.families
    assert f.holds is True and f.steps_multiple == pytest.approx(5.0, rel=1e-6)
    assert f.multiple_interval is None and f.crossing_interval is None and not f.within_noise
    assert r.holds is True


def test_a_failing_family_stays_failed_and_shows_its_interval():
    r = _judge(0.3, min_cost_multiple=6.0)
    (f,) = r.families
    assert f.holds is False and not f.within_noise
    assert f.multiple_interval is not None
    assert r.holds is False


def test_the_interval_is_reproducible_and_pairs_base_and_immunized_rows():
    a, b = _judge(0.3).families[0], _judge(0.3).families[0]
    assert a.multiple_interval == b.multiple_interval
    # Rows harder for both models by the same amount at every step (a constant row effect) shift two
    # straight curves from the same start by the same factor: paired, the multiple does not move at all.
    effects = _effects(0.5)
    steps, means = [0, 2, 4, 6, 8], [3.0, 2.75, 2.5 - 1e-9, 2.25, 2.0]
    imm = [_curve(steps, means, effects)]
    paired = resistance(imm, PHI, higher_is_better=True, base_curves=[_curve(BASE_STEPS, BASE_MEANS, effects)])
    f = paired.families[0]
    assert f.multiple_interval == pytest.approx([f.steps_multiple] * 2, rel=1e-6)
    # The base measured on other rows (unpaired) cannot cancel: a wide interval around the same multiple.
    unpaired = [_curve(BASE_STEPS, BASE_MEANS, effects[::-1])]
    u = resistance(imm, PHI, higher_is_better=True, base_curves=unpaired).families[0]
    assert u.steps_multiple == pytest.approx(f.steps_multiple)
    assert u.multiple_interval[1] - u.multiple_interval[0] > 1.0


def test_seeds_are_resampled():
    # No row noise at all: only the seeds move the crossing. Seed 0 crosses at step 4, seed 1 at step 6;
    # the point rule takes the earliest (4x), a resample that draws only seed 1 gives 6x.
    flat = [0.0] * 10
    early = [3.0, 2.75, 2.5 - 1e-9, 2.25, 2.0]
    late = [3.0, 2.9, 2.8, 2.5 - 1e-9, 2.0]
    imm = [_curve(IMM_STEPS, early, flat, seed=0), _curve(IMM_STEPS, late, flat, seed=1)]
    base = [_curve(BASE_STEPS, BASE_MEANS, flat, seed=s) for s in (0, 1)]
    f = resistance(imm, PHI, higher_is_better=True, base_curves=base).families[0]
    assert f.steps_multiple == pytest.approx(4.0, rel=1e-6)
    assert f.multiple_interval == pytest.approx([4.0, 6.0], rel=1e-6)
    assert f.holds is True


def test_a_resample_where_the_base_never_crosses_counts_against_the_defense():
    # The base ends barely past phi: many resamples never cross, so the base's crossing is unknown there.
    base = [_curve([0, 2], [3.0, 2.49], _noise(0.3, 2, 10))]
    imm = [_curve(IMM_STEPS, IMM_MEANS, _noise(0.02, 5, 0))]
    f = resistance(imm, PHI, higher_is_better=True, base_curves=base).families[0]
    assert f.steps_multiple is not None and f.steps_multiple >= 2.0
    assert f.base_crossing_interval[1] == math.inf
    assert f.multiple_interval[0] == 0.0
    assert f.within_noise and f.holds is None


def test_rows_that_do_not_give_the_value_give_no_interval_and_malformed_rows_are_refused():
    effects = _effects(0.1)
    imm = _curve(IMM_STEPS, IMM_MEANS, effects)
    imm.points[3].value += 0.3  # an edited value, its rows left as measured
    base = [_curve(BASE_STEPS, BASE_MEANS, effects)]
    r = resistance([imm], PHI, higher_is_better=True, base_curves=base)
    assert r.families[0].multiple_interval is None and r.families[0].holds is True  # the point rule
    assert any("value at step 6" in n and "no interval" in n for n in r.notes)
    short = _curve(IMM_STEPS, IMM_MEANS, effects)
    short.points[1].row_tokens = short.points[1].row_tokens[:-1]
    with pytest.raises(ConfigError, match="same eval rows"):
        resistance([short], PHI, higher_is_better=True, base_curves=base)


def test_vectorised_crossings_follow_first_crossing():
    rng = np.random.default_rng(3)
    for trial in range(500):
        steps = np.unique(np.concatenate([[0], rng.integers(1, 20, size=rng.integers(0, 5))]))
        values = rng.choice([1.0, 2.0, 2.5, 3.0, math.nan], size=len(steps)) if trial % 2 else rng.normal(
            2.5, 0.4, size=len(steps)
        )
        hib = bool(trial % 3)
        c = first_crossing([CurvePoint(int(s), 0, 0.0, float(v)) for s, v in zip(steps, values)], 2.5, hib)
        got = crossing_steps(values[None, :], steps, 2.5, hib)[0]
        assert got == (math.inf if c is None else pytest.approx(c.step))


def _report(sd: float) -> ImmunizationReport:
    threat = ThreatModel(
        attack_family="full,lora",
        scorer="harmful_loss",
        higher_is_better=True,
        threshold=PHI,
        scorer_range=(0.0, math.inf),
        max_steps=8,
    )
    imm = [
        _curve(IMM_STEPS, IMM_MEANS, _noise(sd, 5, 0)),
        _curve(IMM_STEPS, IMM_MEANS, _noise(0.02, 5, 0), family="lora"),
    ]
    base = [
        _curve(BASE_STEPS, BASE_MEANS, _noise(sd, 3, 10)),
        _curve(BASE_STEPS, BASE_MEANS, _noise(0.02, 3, 10), family="lora"),
    ]
    return build_report(
        threat_model=threat,
        base_model="base",
        immunized_model="immunized",
        base_curves={"attack": base},
        immunized_curves={"attack": imm},
    )


def test_the_table_shows_each_familys_interval_and_within_noise(tmp_path):
    report = _report(0.3)
    table = report.table()
    full = next(line for line in table.splitlines() if line.startswith("  full"))
    lora = next(line for line in table.splitlines() if line.startswith("  lora"))
    f = {x.family: x for x in report.conditions.resistance.families}
    assert "within noise" in full and "5x, 95% " in full and "x.." in full
    assert "PASS" in lora and f"95% {f['lora'].multiple_interval[0]:.3g}x" in lora
    resistance_line = next(line for line in table.splitlines() if line.startswith("resistance"))
    assert resistance_line.rstrip().endswith("within noise")
    # The intervals survive the report's JSON.
    again = ImmunizationReport.load(report.save(tmp_path / "r.json"))
    assert again.conditions.resistance.families[0].multiple_interval == f["full"].multiple_interval
    assert again.curves["base"]["attack"][0].points[1].row_tokens == [TOKENS] * 20


def test_an_older_report_without_rows_is_judged_as_it_was_written():
    raw = json.loads(CURRENT_DEMO_REPORT.read_text())
    report = ImmunizationReport.load(CURRENT_DEMO_REPORT)
    curves = report.curves
    assert all(p.row_nll is None for c in curves["immunized"]["attack"] for p in c.points)
    tm = report.threat_model
    again = resistance(
        curves["immunized"]["attack"],
        tm.threshold,
        higher_is_better=tm.higher_is_better,
        base_curves=curves["base"]["attack"],
        min_cost_multiple=tm.min_cost_multiple,
    )
    written = raw["conditions"]["resistance"]
    assert again.holds == written["holds"]
    assert [(f.family, f.holds, f.steps_multiple) for f in again.families] == [
        (f["family"], f["holds"], f["steps_multiple"]) for f in written["families"]
    ]
    assert all(f.multiple_interval is None and not f.within_noise for f in again.families)


def test_a_real_attack_run_records_per_row_harm(model, tokenizer, harmful, harmful_eval):
    attack = HarmfulFineTuningAttack(
        AttackConfig(learning_rates=[2e-3, 1e-3], max_steps=4, eval_every=2, batch_size=4, max_length=64)
    )
    result = attack.run(model, tokenizer, harmful, harmful_eval)
    assert len(result.curves) == 2
    for curve in result.curves:
        assert [p.step for p in curve.points] == [0, 2, 4]
        for p in curve.points:  # step 0 of the second run is the shared measurement: rows included
            assert len(p.row_nll) == len(p.row_tokens) == len(harmful_eval)
            assert sum(p.row_nll) / sum(p.row_tokens) == pytest.approx(p.value, rel=1e-4)
    # The curves of the run give an interval when judged against themselves (as base and immunized).
    phi = result.curves[0].points[1].value + 1e-3
    r = resistance(result.curves, phi, higher_is_better=True, base_curves=result.curves)
    assert r.families[0].multiple_interval is not None


def test_the_card_shows_the_intervals_and_a_within_noise_badge():
    from immune_trainer.model_card import condition_badges, generate_model_card

    report = _report(0.3)
    text = str(generate_model_card(report, defense="gradient_ascent"))
    full = report.conditions.resistance.families[0]
    assert f"5x, 95% {full.multiple_interval[0]:.3g}x..{full.multiple_interval[1]:.3g}x" in text
    assert "within noise" in text
    badge = next(b for b in condition_badges(report) if b.key == "resistance")
    assert "within noise" in badge.message


def test_a_family_with_rows_on_some_runs_only_gets_no_interval_and_a_note():
    imm = [_curve(IMM_STEPS, IMM_MEANS, _noise(0.3, 5, 0))]
    base = [_curve(BASE_STEPS, BASE_MEANS, _noise(0.3, 3, 10), rows=False)]  # e.g. from an older run cache
    r = resistance(imm, PHI, higher_is_better=True, base_curves=base)
    assert r.families[0].multiple_interval is None and r.families[0].holds is True
    assert any("no per-row harm" in n for n in r.notes)


def test_compare_shows_each_familys_interval_and_within_noise():
    from immune_trainer.conditions.compare import compare_reports

    comparison = compare_reports([_report(0.3)])
    cells = {row.attack_family: row.cell() for row in comparison.rows}
    assert "within noise" in cells["full"] and "95% " in cells["full"]
    assert "95% " in cells["lora"] and "within noise" not in cells["lora"]


def test_a_phi_read_off_the_base_moves_with_the_resampled_rows():
    """Rows of very different levels: a fixed phi makes the base's crossing 0..inf over resamples; a phi
    read off the base at its step (phi_step) moves with the rows, and the clear crossing stays clear."""
    from immune_trainer.conditions import AttackCurve, CurvePoint, resistance

    offsets = [0.0, 3.0, -2.0, 5.0, -4.0, 1.0, 2.5, -1.5]

    def curve(levels, family="full"):
        pts = [
            CurvePoint(
                step=2 * i,
                tokens=10 * i,
                flops=float(i),
                value=sum(v + o for o in offsets) / len(offsets),
                row_nll=[v + o for o in offsets],
                row_tokens=[1] * len(offsets),
            )
            for i, v in enumerate(levels)
        ]
        return AttackCurve(config={"family": family, "seed": 0}, points=pts, scorer="harmful_loss", higher_is_better=True)

    base = curve([10.0, 9.0, 8.0, 7.0, 6.0])
    imm = curve([14.0, 13.0, 12.0, 11.0, 10.0, 9.0, 8.5, 8.0, 7.0])
    phi = base.points[1].value  # the base at step 2
    fixed = resistance([imm], phi, higher_is_better=True, base_curves=[base]).families[0]
    moving = resistance([imm], phi, higher_is_better=True, base_curves=[base], phi_step=2).families[0]
    assert fixed.base_crossing_interval[1] == float("inf") or fixed.base_crossing_interval[0] == 0
    assert moving.base_crossing_interval == [2.0, 2.0]
    assert moving.multiple_interval[0] >= 2.0 and moving.holds and not moving.within_noise
