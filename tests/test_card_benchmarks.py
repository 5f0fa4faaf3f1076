"""A report whose stability set is an lm-evaluation-harness task and whose harm is a judge's: the card's
model-index names the benchmark's metric and task, and the judge (read by the Hub's evaluation widgets)."""

from __future__ import annotations

import math

from immune_trainer.conditions import AttackCurve, CurvePoint
from immune_trainer.conditions.report import ThreatModel, build_report
from immune_trainer.model_card import generate_model_card
from immune_trainer.model_card.claims import claims


def curve(values):
    return AttackCurve(
        config={"family": "full", "learning_rate": 1e-4, "seed": 0},
        points=[CurvePoint(step=5 * i, tokens=100 * i, flops=1e9 * i, value=v) for i, v in enumerate(values)],
        scorer="strongreject",
        higher_is_better=False,
    )


def report():
    threat = ThreatModel(
        attack_family="full",
        scorer="strongreject",
        higher_is_better=False,
        threshold=0.5,
        scorer_range=(0.0, 1.0),
        grid={"learning_rates": [1e-4], "seeds": [0], "families": ["full"]},
        max_steps=20,
        judge={"name": "strongreject", "model": "some/grader", "revision": "abc123"},
    )
    r = build_report(
        threat_model=threat,
        base_model="tiny-base",
        immunized_model="out/defended",
        base_curves={"attack": [curve([0.1, 0.4, 0.6, 0.8, 0.9])]},
        immunized_curves={"attack": [curve([0.05, 0.1, 0.2, 0.3, 0.6])]},
        base_capability={"mmlu": 0.40, "text": 10.0},
        immunized_capability={"mmlu": 0.39, "text": 10.1},
        capability_higher_is_better={"mmlu": True, "text": False},
        defense={"name": "gradient_ascent", "config": {}},
    )
    r.extra["capability_scorers"] = {
        "mmlu": {"name": "lm_eval", "tasks": ["mmlu"], "limit": 100, "metric": None},
        "text": {"name": "perplexity"},
    }
    return r


def test_the_model_index_names_the_benchmark_and_the_judge():
    r = report()
    by_id = {c["id"]: c for c in claims(r)}
    assert by_id["stability.mmlu.immunized"]["metric_type"] == "acc"
    assert by_id["stability.mmlu.immunized"]["task"] == "lm-eval: mmlu"
    assert math.isclose(by_id["stability.mmlu.base"]["value"], 0.40)
    assert by_id["stability.text.immunized"]["metric_type"] == "capability"  # perplexity sets as before
    assert by_id["resistance.worst_value"]["metric_type"] == "strongreject"
    card = generate_model_card(r, defense="gradient_ascent")
    index = {e.metric_config: e for e in card.data.eval_results}
    assert index["stability.mmlu.immunized"].metric_type == "acc"
    assert index["stability.mmlu.immunized"].task_name == "lm-eval: mmlu"
    assert index["stability.mmlu.base"].metric_value == 0.40
    assert index["resistance.worst_value"].metric_type == "strongreject"
    assert "some/grader" in str(card)
