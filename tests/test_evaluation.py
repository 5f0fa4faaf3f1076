"""evaluate_conditions: the four conditions measured end to end on tiny models."""

from __future__ import annotations

import copy
import math

import datasets
import pytest
from conftest import make_benign, make_pairs

from immune_trainer import AttackConfig, ConditionDatasets, EvaluationConfig, evaluate_conditions
from immune_trainer.conditions.report import ImmunizationReport
from immune_trainer.defenses import GradientAscentConfig, GradientAscentTrainer
from immune_trainer.errors import ConfigError, DataError
from immune_trainer.testing import tiny_causal_lm


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from immune_trainer.testing import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    base = tiny_causal_lm("llama", seed=0)
    immunized = copy.deepcopy(base)
    args = GradientAscentConfig(
        output_dir=str(tmp_path_factory.mktemp("ga")),
        max_steps=15,
        per_device_train_batch_size=4,
        learning_rate=3e-3,
        alpha=2.0,
        save_strategy="no",
        report_to="none",
        max_length=64,
        disable_tqdm=True,
    )
    GradientAscentTrainer(
        model=immunized,
        args=args,
        harmful_dataset=make_pairs(24),
        retain_dataset=make_benign(24),
        processing_class=tokenizer,
    ).train()
    return base, immunized, tokenizer


def _datasets():
    text = datasets.Dataset.from_dict({"text": ["The quick brown fox jumps over the lazy dog. " * 3] * 4})
    return ConditionDatasets(
        attack_train=make_pairs(16),
        attack_eval=make_pairs(6, offset=100),
        cross_domain_train=make_pairs(8, offset=200),
        cross_domain_eval=make_pairs(4, offset=300),
        reference={"plain_text": text, "chat": make_benign(6)},
        benign_train=make_benign(16),
        benign_eval=make_benign(6),
    )


def test_every_condition_gets_a_number_and_the_report_round_trips(models, tmp_path):
    base, immunized, tokenizer = models
    report = evaluate_conditions(
        base,
        immunized,
        tokenizer,
        _datasets(),
        attack=AttackConfig(learning_rates=[2e-3], max_steps=4, eval_every=2, max_length=64),
        config=EvaluationConfig(
            benign_scorer="benign_loss", benign_max_steps=4, benign_eval_every=2, benign_learning_rate=2e-3
        ),
        defense={"name": "gradient_ascent", "config": {"alpha": 2.0}},
    )
    c = report.conditions
    assert c.resistance is not None and c.stability is not None
    assert c.generalization is not None and c.generalization.cross_domain is not None
    assert c.trainability is not None
    assert set(report.curves["base"]) == {"attack", "cross_domain"}
    # phi was read off the base model at step eval_every (median over the grid: one run here).
    base_at_2 = next(p.value for p in report.curves["base"]["attack"][0].points if p.step == 2)
    assert report.threat_model.threshold == pytest.approx(base_at_2)
    assert "base model" in report.threat_model.threshold_source
    # The cross-domain set gets phi by the same rule on its own data.
    cross_at_2 = next(p.value for p in report.curves["base"]["cross_domain"][0].points if p.step == 2)
    assert report.threat_model.set_thresholds == {"cross_domain": pytest.approx(cross_at_2)}
    assert c.generalization.cross_domain.threshold == pytest.approx(cross_at_2)
    # The defense raised the harmful loss the attack starts from.
    assert (
        report.curves["immunized"]["attack"][0].points[0].value
        > report.curves["base"]["attack"][0].points[0].value
    )
    assert set(report.capability["base"]) == {"plain_text", "chat"}
    assert all(math.isfinite(v) for v in report.capability["immunized"].values())
    # Every harm point keeps its eval rows, which the families' crossing intervals are drawn from; the
    # defaulted speed window of trainability is noted.
    for who in ("base", "immunized"):
        assert all(len(p.row_nll) == len(p.row_tokens) == 6 for cv in report.curves[who]["attack"] for p in cv.points)
    family = c.resistance.families[0]
    assert (family.multiple_interval is not None) == (family.steps_multiple is not None)
    assert any("speed window eps defaulted to 1 steps" in n for n in report.notes)
    path = tmp_path / "immunization_report.json"
    report.save(path)
    loaded = ImmunizationReport.load(path)
    assert loaded.to_dict() == report.to_dict()
    table = report.table()
    for word in ("resistance", "stability", "generalization", "trainability"):
        assert word in table.lower()
    assert report.library["dependencies"]["torch"]


def test_given_threshold_is_validated_against_the_scorer_range(models):
    base, immunized, tokenizer = models
    with pytest.raises(ConfigError, match="outside the range"):
        evaluate_conditions(
            base, immunized, tokenizer, _datasets(), attack=AttackConfig(max_steps=2), threshold=-1.0
        )


def test_missing_halves_are_errors_and_missing_sets_are_unmeasured(models):
    base, immunized, tokenizer = models
    sets = ConditionDatasets(
        attack_train=make_pairs(8), attack_eval=make_pairs(4, offset=50), in_domain_train=make_pairs(4)
    )
    with pytest.raises(DataError, match="in_domain_train and in_domain_eval"):
        evaluate_conditions(base, immunized, tokenizer, sets, attack=AttackConfig(max_steps=2, eval_every=1))
    sets.in_domain_train = None
    report = evaluate_conditions(
        base,
        immunized,
        tokenizer,
        sets,
        attack=AttackConfig(learning_rates=[1e-3], max_steps=2, eval_every=1, max_length=64),
        threshold=5.0,
        config=EvaluationConfig(fixed_grid=True),  # no reference set: the calibrated default has no cap
    )
    c = report.conditions
    assert c.stability is None and c.trainability is None and c.generalization is None
    assert c.immunized is False  # never credited without a stability measurement
    assert any("stability not measured" in n for n in c.notes)


def test_a_lone_reference_run_stops_after_bracketing_phi_with_the_same_verdict(models):
    """With one reference run, phi is its own value at the threshold step: early stopping cuts the base's
    curve after it crosses phi, and every number of the resistance condition stays what the full curve
    gives."""
    base, immunized, tokenizer = models
    sets = ConditionDatasets(attack_train=make_pairs(16), attack_eval=make_pairs(6, offset=100))
    attack = AttackConfig(learning_rates=[3e-3], max_steps=10, eval_every=1, max_length=64)
    reports = {
        stop: evaluate_conditions(
            base, immunized, tokenizer, sets, attack=attack, config=EvaluationConfig(early_stop=stop, fixed_grid=True)
        )
        for stop in (True, False)
    }
    (full,) = reports[False].curves["base"]["attack"]
    (cut,) = reports[True].curves["base"]["attack"]
    assert len(full.points) == 11 and cut.config["stopped_early"] is True
    assert len(cut.points) < len(full.points) and cut.points == full.points[: len(cut.points)]
    assert reports[True].threat_model.threshold == reports[False].threat_model.threshold
    early, whole = reports[True].conditions.resistance, reports[False].conditions.resistance
    assert early.base_crossing == whole.base_crossing and early.base_crossing is not None
    assert early.worst_crossing == whole.worst_crossing and early.steps_multiple == whole.steps_multiple
    assert early.holds == whole.holds


def test_an_attack_time_hook_applies_to_the_immunized_models_fine_tuning_only(models):
    """prepare_immunized (a defense that protects only at attack time, e.g. Security Vectors) goes on every
    fine-tuning of the immunized model: its attacks on each harmful set and its benign fine-tune; never on
    the base model's."""
    from immune_trainer.defenses import get_defense

    base, immunized, tokenizer = models
    base, immunized = copy.deepcopy(base), copy.deepcopy(immunized)
    base.who, immunized.who = "base", "immunized"  # attacked copies keep the mark
    seen = []

    def hook(model):
        seen.append(model.who)
        return model

    hook.cache_key = {"test": "hook"}
    sets = _datasets()
    sets.reference = None
    attack = AttackConfig(learning_rates=[2e-3], max_steps=2, eval_every=1, max_length=64)
    cfg = EvaluationConfig(
        benign_scorer="benign_loss", benign_max_steps=2, benign_eval_every=1, benign_learning_rate=2e-3,
        fixed_grid=True,
    )
    report = evaluate_conditions(
        base, immunized, tokenizer, sets, attack=attack, config=cfg, prepare_immunized=hook
    )
    assert seen == ["immunized"] * 3  # the main set, the cross-domain set, the benign fine-tune
    assert report.extra["prepare_immunized"] == {"test": "hook"}
    # A defense that protects only at attack time is never evaluated without its hook, nor with its factory.
    with pytest.raises(ConfigError, match="attacked unguarded"):
        evaluate_conditions(
            base, immunized, tokenizer, sets, attack=attack, defense={"name": "security_vectors"}
        )
    with pytest.raises(ConfigError, match="factory"):
        evaluate_conditions(
            base,
            immunized,
            tokenizer,
            sets,
            attack=attack,
            prepare_immunized=get_defense("security_vectors").attack_time_hook,
        )
