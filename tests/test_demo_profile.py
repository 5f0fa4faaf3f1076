"""benchmarks/demo_profile.py splits a demo run into stages by its progress lines: every stage of the
calibrated default (the searches, the winners' seeds, the extensions) gets its own row."""

from __future__ import annotations

import pytest
from conftest import load_script, make_pairs
from test_calibration import TEXT, _attack, _sets

from immune_trainer.evaluation import evaluate_conditions
from immune_trainer.testing import tiny_causal_lm


@pytest.fixture(scope="module")
def profile():
    return load_script("benchmarks/demo_profile.py")


def test_every_calibrated_stage_of_an_evaluation_is_named(profile, tokenizer):
    base, immunized = tiny_causal_lm("llama", seed=0), tiny_causal_lm("llama", seed=1)
    messages: list[str] = []
    evaluate_conditions(
        base,
        immunized,
        tokenizer,
        _sets(
            reference={"ref": TEXT},
            in_domain_train=make_pairs(8, offset=400),
            in_domain_eval=make_pairs(4, offset=500),
        ),
        attack=_attack(calibrate_trials=2, max_steps=2, eval_every=1),
        progress=messages.append,
    )
    stages = [s for s in map(profile.stage_of, messages) if s is not None]
    for who in ("base", "immunized"):
        assert f"attack: search ({who})" in stages
        assert f"attack: winners' seeds ({who})" in stages
        for key in ("in_domain", "cross_domain"):
            assert f"{key}: winners' seeds ({who})" in stages
            assert f"{key}: search ({who})" not in stages  # the resistance set's winners are re-used there
    # the searches come before any winner's seed, and nothing after them falls back into "stability"
    assert stages.index("attack: search (base)") < stages.index("attack: winners' seeds (base)")
    first_stability = stages.index("stability") if "stability" in stages else len(stages)
    assert all(not s.startswith(("attack", "in_domain", "cross_domain")) for s in stages[first_stability:])


def test_the_demos_other_lines_keep_their_stages(profile):
    assert (
        profile.stage_of("[2/5] immunizing a copy with gradient_ascent (16 steps at lr 7e-05)") == "defense"
    )
    assert profile.stage_of("[stability] side effects: base model on 4 jailbreak templates") == (
        "side effects (generation)"
    )
    assert profile.stage_of("[stability] helpfulness: base model answers benign requests") == (
        "helpfulness (generation)"
    )
    assert (
        profile.stage_of(
            "[attack] lora: a lower bound on the immunized model: extending seed(s) 0, 1 to 10 steps"
        )
        == "attack: extensions"
    )
    assert profile.stage_of("[in_domain] attacking the base model") == "attack in_domain (base)"
    assert profile.stage_of("[trainability] benign fine-tuning of the base model") == "trainability (base)"
    assert profile.stage_of("[attack] phi = 2.41") is None
