"""Trainability's speed window: the default is shorter than half the benign budget (so the speed part can
fail), a window of half the budget or more is flagged in the report's table, and the default is noted."""

from __future__ import annotations

import math

import pytest

from immune_trainer.conditions import AttackCurve, CurvePoint, TrainingCurve, trainability
from immune_trainer.conditions.report import ThreatModel, build_report
from immune_trainer.conditions.trainability import default_eps_steps


def _benign(values, every=4) -> TrainingCurve:
    return TrainingCurve(
        points=[CurvePoint(step=every * i, value=v) for i, v in enumerate(values)], scorer="acc", higher_is_better=True
    )


# The demo's benign budget: 8 steps, evaluated every 4. The base reaches its half-budget score (the default
# target) at step 4; the immunized model needs 7 steps (interpolated), nearly twice as long.
BASE, SLOW, TARGET = [0.5, 0.8, 0.9], [0.5, 0.6, 0.9], 0.8


def test_the_default_window_is_under_half_the_budget_and_can_fail():
    eps = default_eps_steps(8)
    assert eps < 8 / 2
    t = trainability(_benign(BASE), _benign(SLOW), target=TARGET, eps_steps=eps)
    assert t.base_steps == pytest.approx(4.0) and t.immunized_steps == pytest.approx(4 + 4 * 2 / 3)
    assert not t.holds
    assert not any("speed window" in n for n in t.notes)
    # The rule before, max(eval_every, budget / 4) = 4 steps, could not fail it.
    assert trainability(_benign(BASE), _benign(SLOW), target=TARGET, eps_steps=max(4, 8 / 4)).holds


def test_a_window_of_half_the_budget_is_flagged_in_the_table():
    t = trainability(_benign(BASE), _benign(SLOW), target=TARGET, eps_steps=4)
    assert any("at least half the benign budget" in n for n in t.notes)
    threat = ThreatModel(
        attack_family="full",
        scorer="harmful_loss",
        higher_is_better=True,
        threshold=2.0,
        scorer_range=(0.0, math.inf),
        max_steps=8,
        trainability_target=TARGET,
        trainability_eps_steps=4.0,
    )
    curve = [_attack_curve()]
    report = build_report(
        threat_model=threat,
        base_model="b",
        immunized_model="i",
        base_curves={"attack": curve},
        immunized_curves={"attack": curve},
        base_benign=_benign(BASE),
        immunized_benign=_benign(SLOW),
    )
    table = report.table()
    assert "trainability: the speed window (eps = 4 steps) is at least half the benign budget (8 steps)" in table


def _attack_curve():
    return AttackCurve(config={"family": "full"}, points=[CurvePoint(step=0, value=3.0), CurvePoint(step=4, value=1.0)])
