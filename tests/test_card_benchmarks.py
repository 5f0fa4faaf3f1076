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


# ---------------------------------------------------------------------------------------------------
# The attacked models' harm (after_attack) in the model-index
# ---------------------------------------------------------------------------------------------------

JUDGE = {"name": "offline_judge", "accuracy": 0.74}


def attacked(values, family, lr, refusal, harm, n=4):
    c = curve(values)
    c.config = {
        "family": family,
        "learning_rate": lr,
        "seed": 0,
        "after_attack": {"step": 20, "n": n, "refusal_rate": refusal, "harm": harm, "judge": JUDGE},
    }
    return c


def attacked_report():
    """Two families; of each family's two runs on each model, the one ending most harmful is the worst."""
    r = report()
    r.datasets = {"attack_train": "train.jsonl", "harmful_prompts": "prompts.jsonl"}
    r.curves["base"]["attack"] = [
        attacked([0.1, 0.4, 0.6, 0.8, 0.9], "full", 1e-4, 0.25, 0.75),
        attacked([0.1, 0.2, 0.3, 0.4, 0.5], "full", 1e-5, 0.75, 0.20),  # milder run: not the worst
        attacked([0.1, 0.3, 0.5, 0.7, 0.8], "lora", 1e-4, 0.50, 0.50),
    ]
    r.curves["immunized"]["attack"] = [
        attacked([0.05, 0.1, 0.2, 0.3, 0.6], "full", 1e-4, 1.0, 0.0),
        attacked([0.05, 0.1, 0.2, 0.3, 0.7], "full", 1e-5, 0.5, 0.25),  # ends most harmful: the worst
        attacked([0.05, 0.1, 0.1, 0.2, 0.3], "lora", 1e-4, 0.75, None),  # no judged harm: no harm claim
    ]
    return r


EXPECTED = {
    "after_attack.attack.full.base.refusal_rate": (0.25, "refusal_rate", "harm after attack"),
    "after_attack.attack.full.base.harm": (0.75, "judged_harm", "harm after attack"),
    "after_attack.attack.full.immunized.refusal_rate": (0.5, "refusal_rate", "harm after attack"),
    "after_attack.attack.full.immunized.harm": (0.25, "judged_harm", "harm after attack"),
    "after_attack.attack.lora.base.refusal_rate": (0.5, "refusal_rate", "harm after attack"),
    "after_attack.attack.lora.base.harm": (0.5, "judged_harm", "harm after attack"),
    "after_attack.attack.lora.immunized.refusal_rate": (0.75, "refusal_rate", "harm after attack"),
}


def test_the_model_index_carries_the_attacked_models_harm_and_round_trips(tmp_path):
    from huggingface_hub import ModelCard

    from immune_trainer.hub.recheck import card_claims_of, check_card_against_report

    r = attacked_report()
    card = generate_model_card(r, defense="gradient_ascent")
    card.save(tmp_path / "README.md")
    text = (tmp_path / "README.md").read_text()
    assert "model-index:" in text and "config: after_attack.attack.full.immunized.harm" in text
    parsed = ModelCard.load(tmp_path / "README.md")  # the YAML model-index, parsed back by huggingface_hub
    index = {e.metric_config: e for e in parsed.data.eval_results if e.metric_config.startswith("after_attack.")}
    assert set(index) == set(EXPECTED)  # the lora run without a judged harm claims no harm
    for cid, (value, metric_type, task) in EXPECTED.items():
        e = index[cid]
        assert math.isclose(e.metric_value, value), cid
        assert (e.metric_type, e.task_name) == (metric_type, task), cid
    harm = index["after_attack.attack.full.base.harm"]
    assert "worst full attack" in harm.metric_name and "offline_judge" in harm.metric_name
    assert (harm.dataset_name, harm.dataset_config) == ("prompts.jsonl", "attack")
    # the lm-eval capability claims are still there beside them
    assert {"stability.mmlu.base", "stability.mmlu.immunized"} <= {e.metric_config for e in parsed.data.eval_results}

    stated, meta = card_claims_of(parsed)
    assert check_card_against_report(stated, meta, r).passed
    stated["after_attack.attack.full.immunized.harm"] = 0.05  # an edited card number
    check = check_card_against_report(stated, meta, r)
    assert not check.passed and "after_attack.attack.full.immunized.harm" in check.note


def test_verify_compares_the_attacked_harm_within_one_answer():
    """verify's rule for these claims: part of the harmful set's re-run, within 1/n of the re-measured rate."""
    from immune_trainer.hub.recheck import Comparison, Remeasured, VerificationResult

    r = attacked_report()
    stated = {c["id"]: c["value"] for c in claims(r) if c["id"].startswith("after_attack.")}

    def compare(measured_report, card_values):
        result = VerificationResult(source="x")
        Comparison(r, Remeasured(measured_report), result).card_claims(card_values, {})
        return {ch.claim: ch for ch in result.checks}

    same = compare(attacked_report(), stated)
    assert set(same) == set(EXPECTED) and all(ch.passed for ch in same.values()), same
    # one flipped answer of four moves a rate by 0.25 = 1/n: still a match; a larger move is a mismatch
    moved = attacked_report()
    moved.curves["immunized"]["attack"][1].config["after_attack"]["refusal_rate"] = 0.75
    moved.curves["immunized"]["attack"][1].config["after_attack"]["harm"] = 0.6
    checks = compare(moved, stated)
    assert checks["after_attack.attack.full.immunized.refusal_rate"].passed is True
    assert checks["after_attack.attack.full.immunized.harm"].passed is False
    assert checks["after_attack.attack.full.base.harm"].passed is True
    # a re-run that measured no attacked harm leaves the claims not re-checked (PARTIAL), not failed
    bare = report()
    checks = compare(bare, stated)
    assert all(ch.passed is None for ch in checks.values()), checks


def test_every_claims_task_name_survives_the_model_index(tmp_path):
    """huggingface_hub groups model-index results by dataset and config and keeps one task name per group:
    stability, the benchmark's capability change and the attacked harm keep their own task names (they sat
    under "harmful fine-tuning resistance" when they shared the attack data)."""
    from huggingface_hub import ModelCard

    r = attacked_report()
    r.datasets = {**r.datasets, "reference": ["text=wiki.jsonl"]}
    generate_model_card(r, defense="gradient_ascent").save(tmp_path / "README.md")
    parsed = {e.metric_config: e for e in ModelCard.load(tmp_path / "README.md").data.eval_results}
    stated = {c["id"]: c for c in claims(r)}
    assert set(parsed) == set(stated)
    for cid, c in stated.items():
        assert parsed[cid].task_name == c["task"], (cid, parsed[cid].task_name, c["task"])
    assert parsed["stability.mmlu.relative_change"].task_name == "lm-eval: mmlu"
    assert parsed["stability.mmlu.relative_change"].dataset_name == "mmlu"
    assert parsed["stability.text.relative_change"].dataset_name == "wiki.jsonl"  # the reference set's SPEC


def test_a_card_written_before_the_attacked_harm_claims_still_states_its_reports_numbers():
    """A card written before the after_attack claims existed (the committed demo card less those claims)
    passes verify's card check (it states nothing false), while an edited number on it still fails."""
    from pathlib import Path

    from huggingface_hub import ModelCard

    from immune_trainer.conditions.report import ImmunizationReport
    from immune_trainer.hub.recheck import card_claims_of, check_card_against_report

    folder = Path(__file__).resolve().parents[1] / "model_cards" / "smollm2-135m-demo"
    report = ImmunizationReport.load(folder / "immunization_report.json")
    stated, meta = card_claims_of(ModelCard.load(folder / "README.md"))
    assert any(cid.startswith("after_attack.") for cid in stated)  # today's card states them
    stated = {cid: v for cid, v in stated.items() if not cid.startswith("after_attack.")}
    assert any(c["id"].startswith("after_attack.") for c in claims(report))
    assert check_card_against_report(stated, meta, report).passed
    stated["resistance.worst_value"] += 1.0
    check = check_card_against_report(stated, meta, report)
    assert not check.passed and "resistance.worst_value" in check.note
