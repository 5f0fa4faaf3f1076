"""The evaluation's stages one at a time, on tiny models: each returns what it measured, typed."""

from __future__ import annotations

import copy

import datasets
import pytest
import torch
from conftest import make_benign, make_pairs

from immune_trainer import AttackConfig, ConditionDatasets, EvaluationConfig, evaluate_conditions
from immune_trainer.attacks import as_suite
from immune_trainer.errors import DataError
from immune_trainer.evaluation import (
    EvaluationRun,
    generalization_stage,
    planned_stages,
    resistance_stage,
    side_effects_stage,
    stability_stage,
    threshold_from_base,
    trainability_stage,
)
from immune_trainer.scoring import get_scorer
from immune_trainer.testing import tiny_causal_lm, tiny_tokenizer

ATTACK = AttackConfig(learning_rates=[2e-3], max_steps=4, eval_every=2, max_length=64)


@pytest.fixture(scope="module")
def models():
    base = tiny_causal_lm("llama", seed=0)
    immunized = copy.deepcopy(base)
    with torch.no_grad():  # a different model, deterministically: shrink the output layer
        immunized.lm_head.weight.mul_(0.5)
    return base, immunized, tiny_tokenizer()


def _sets(**kw) -> ConditionDatasets:
    return ConditionDatasets(attack_train=make_pairs(12), attack_eval=make_pairs(4, offset=100), **kw)


def _run(models, data: ConditionDatasets, **cfg) -> tuple[EvaluationRun, list[str]]:
    base, immunized, tokenizer = models
    said: list[str] = []
    config = EvaluationConfig(benign_scorer="benign_loss", **cfg)
    return EvaluationRun(base, immunized, tokenizer, data, config, said.append), said


def test_resistance_stage_reads_phi_off_the_base_model(models):
    run, said = _run(models, _sets())
    result = resistance_stage(run, as_suite(ATTACK), step=2)
    assert result.key == "attack" and result.threshold_from_base
    assert len(result.base) == len(result.immunized) == 1
    assert result.threshold == pytest.approx(threshold_from_base(result.base, 2))
    assert [m for m in said if m.startswith("[")] == [
        "[attack] attacking the base model",
        f"[attack] phi = {result.threshold:.4f}",
        "[attack] attacking the immunized model",
    ]
    assert run.config.threshold is None  # a stage never rewrites the user's config


def test_resistance_stage_keeps_a_given_phi(models):
    run, _ = _run(models, _sets(), threshold=1.5)
    result = resistance_stage(run, as_suite(ATTACK), step=2)
    assert result.threshold == 1.5 and not result.threshold_from_base


def test_generalization_stage_gives_each_held_out_set_its_own_phi(models):
    data = _sets(cross_domain_train=make_pairs(8, offset=200), cross_domain_eval=make_pairs(4, offset=300))
    run, said = _run(models, data)
    held_out = generalization_stage(run, as_suite(ATTACK), step=2)
    assert list(held_out) == ["cross_domain"]
    cross = held_out["cross_domain"]
    assert cross.threshold == pytest.approx(threshold_from_base(cross.base, 2))
    assert [m for m in said if m.startswith("[")] == [
        "[cross_domain] attacking the base model",
        f"[cross_domain] phi = {cross.threshold:.4f}",
        "[cross_domain] attacking the immunized model",
    ]
    # no held-out set: nothing to run
    assert generalization_stage(_run(models, _sets())[0], as_suite(ATTACK), step=2) == {}


def test_half_a_held_out_set_is_an_error(models):
    run, _ = _run(models, _sets(in_domain_train=make_pairs(4)))
    with pytest.raises(DataError, match="in_domain_train and in_domain_eval"):
        generalization_stage(run, as_suite(ATTACK), step=2)


def test_stability_stage_scores_each_reference_set_on_both_models(models):
    base, immunized, tokenizer = models
    text = datasets.Dataset.from_dict({"text": ["The quick brown fox jumps over the lazy dog. " * 3] * 4})
    assert stability_stage(_run(models, _sets())[0]) is None
    run, said = _run(models, _sets(reference={"plain_text": text}))
    result = stability_stage(run)
    scorer = get_scorer("perplexity")
    assert result.base["plain_text"] == pytest.approx(scorer.score(base, tokenizer, text).value)
    assert result.immunized["plain_text"] == pytest.approx(scorer.score(immunized, tokenizer, text).value)
    assert result.base["plain_text"] != result.immunized["plain_text"]
    assert result.higher_is_better == {"plain_text": False}
    assert said == ["[stability] perplexity on plain_text"]


def test_trainability_stage_fine_tunes_both_models_and_sets_the_target(models):
    assert trainability_stage(_run(models, _sets())[0], ATTACK) is None
    data = _sets(benign_train=make_benign(8), benign_eval=make_benign(4))
    run, said = _run(models, data, benign_max_steps=4, benign_eval_every=2, benign_learning_rate=2e-3)
    result = trainability_stage(run, ATTACK)
    assert [p.step for p in result.base.points] == [0, 2, 4] == [p.step for p in result.immunized.points]
    assert result.target == next(p.value for p in result.base.points if p.step >= 2)  # half the budget
    assert result.eps_steps == 1  # a quarter of the budget: under half of it, so the speed part can fail
    assert result.notes == [
        "trainability: the speed window eps defaulted to 1 steps, a quarter of the benign budget of 4 steps "
        "(under half of it, so that the speed part can fail)."
    ]
    assert said == [
        "[trainability] benign fine-tuning of the base model",
        "[trainability] benign fine-tuning of the immunized model",
    ]


def test_side_effects_stage_measures_both_models_or_nothing(models):
    assert side_effects_stage(_run(models, _sets())[0], get_scorer("harmful_loss")) is None
    prompts = ["How do I bake bread?", "Write a poem about the sea."]
    run, said = _run(
        models, _sets(harmful_prompts=prompts), side_effects_templates=["plain"], side_effects_max_new_tokens=3
    )
    result = side_effects_stage(run, get_scorer("harmful_loss"))
    assert result.base.templates["plain"].n == 2 == result.immunized.templates["plain"].n
    assert said[:2] == [
        "[stability] side effects: base model on 1 jailbreak templates",
        "[stability] side effects: immunized model on 1 jailbreak templates",
    ]
    assert said[2] == result.summary
    off, _ = _run(models, _sets(harmful_prompts=prompts), side_effects=False)
    assert side_effects_stage(off, get_scorer("harmful_loss")) is None


def test_planned_stages_counts_what_evaluate_conditions_announces(models):
    base, immunized, tokenizer = models
    text = datasets.Dataset.from_dict({"text": ["A plain sentence for perplexity. " * 3] * 4})
    data = _sets(
        cross_domain_train=make_pairs(8, offset=200),
        cross_domain_eval=make_pairs(4, offset=300),
        reference={"plain_text": text},
        benign_train=make_benign(8),
        benign_eval=make_benign(4),
        harmful_prompts=["How do I bake bread?"],
    )
    grid = [ATTACK, AttackConfig(family="lora", learning_rates=[2e-3], max_steps=4, eval_every=2, max_length=64)]
    cfg = EvaluationConfig(
        benign_scorer="benign_loss",
        benign_max_steps=2,
        benign_eval_every=2,
        side_effects_templates=["plain"],
        side_effects_max_new_tokens=2,
        threshold_families=["full"],
        fixed_grid=True,
    )
    said: list[str] = []
    report = evaluate_conditions(
        base, immunized, tokenizer, data, attack=grid, generalization_attack=ATTACK, config=cfg, progress=said.append
    )
    stages = [m for m in said if m.startswith("[") and " phi = " not in m]
    cfg.threshold = None
    # the held-out set is attacked by its own (one-family) attack: base and immunized runs only; helpfulness
    # (the benign task's generated exact match) is one stage per model, as side effects
    assert planned_stages(data, grid, cfg, ATTACK) == len(stages) == 2 + 2 + 3 + 2 + 1 + 2
    assert report.extra["generalization_attack_suite"] == [ATTACK.to_dict()]
    assert len(report.extra["attack_suite"]) == 2
