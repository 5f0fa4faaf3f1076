"""AttackSearch: the most harmful attack setting whose capability loss stays within tolerance."""

from __future__ import annotations

import json
import math

import datasets
import optuna
import pytest
from conftest import make_benign, make_pairs

from immune_trainer import attacks as attacks_lib
from immune_trainer.attacks import (
    AttackConfig,
    AttackSearch,
    HarmfulFineTuningAttack,
    SearchConfig,
    SearchSpace,
    trials_table,
)
from immune_trainer.cli import main
from immune_trainer.conditions.report import ImmunizationReport
from immune_trainer.errors import ConfigError
from immune_trainer.evaluation import ConditionDatasets, EvaluationConfig, evaluate_conditions
from immune_trainer.scoring import get_scorer
from immune_trainer.testing import tiny_causal_lm

TRAIN, EVAL = make_pairs(12), make_pairs(4, offset=100)
TEXT = datasets.Dataset.from_dict({"text": ["The quick brown fox jumps over the lazy dog. " * 3] * 4})


def _budget(**overrides):
    values = dict(max_steps=3, eval_every=1, max_length=64, batch_size=4)
    values.update(overrides)
    return AttackConfig(**values)


def _search(tmp_path, n, *, space=("learning_rate",), tolerance=1.0, seed=0, reference=TEXT, **kwargs):
    return AttackSearch(
        _budget(),
        SearchConfig(search=n, search_seed=seed, search_dir=str(tmp_path), capability_tolerance=tolerance),
        SearchSpace(search_space=list(space)),
        reference=reference,
        **kwargs,
    )


@pytest.fixture
def count_runs(monkeypatch):
    """Counts the attack runs (one per trial) that actually train."""
    calls = []
    original = attacks_lib.HarmfulFineTuningAttack._run_one

    def counting(self, *args, **kwargs):
        calls.append(self.config.learning_rates[0])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(attacks_lib.HarmfulFineTuningAttack, "_run_one", counting)
    return calls


def test_search_finds_a_more_harmful_setting_than_a_deliberately_bad_one(tmp_path, tokenizer):
    model = tiny_causal_lm("llama", seed=0)
    weak = HarmfulFineTuningAttack(_budget(learning_rates=[1e-6])).run(model, tokenizer, TRAIN, EVAL)
    weak_harm = weak.curves[0].points[-1].value

    result = _search(tmp_path, 3).run(model, tokenizer, TRAIN, EVAL)
    assert len(result.trials) == 3 and result.new_trials == 3
    assert result.best is not None and result.best.feasible
    # harmful_loss: lower is more harmful; the search beats lr 1e-6 at the same budget.
    assert result.best.harm < weak_harm
    assert result.best.harm == min(t.harm for t in result.trials if t.feasible)
    assert result.worst_value(higher_is_better=True) <= result.best.harm
    # Every trial carries its settings, final f, capability change, feasibility and curve.
    for t in result.trials:
        assert t.harm == t.curve.points[-1].value
        assert t.curve.config["learning_rate"] == t.settings["learning_rate"]
        assert 1e-6 <= t.settings["learning_rate"] <= 1e-3
        assert t.feasible == (t.capability_degradation <= 1.0)
    assert len(result.curves) == sum(t.feasible for t in result.trials)
    record = result.search_record()
    assert record["n_trials"] == 3 and record["sampler_seed"] == 0
    assert record["best"]["settings"] == result.best.settings
    json.dumps(result.to_dict())
    table = trials_table(result).splitlines()
    assert table[1].split()[0] == str(result.best.number)  # best first


def test_capability_constraint_excludes_more_harmful_trials(tmp_path, tokenizer):
    """Capability = the harmful loss itself (higher is better), so every step of harm costs capability: the
    constraint must exclude the most harmful trials instead of trading them off."""
    model = tiny_causal_lm("llama", seed=0)
    tolerance = 0.01
    search = _search(
        tmp_path, 4, tolerance=tolerance, reference=EVAL, capability_scorer=get_scorer("harmful_loss")
    )
    search.space = SearchSpace(search_space=["learning_rate"], lr_min=1e-6, lr_max=1e-2)
    result = search.run(model, tokenizer, TRAIN, EVAL)
    feasible = [t for t in result.trials if t.feasible]
    infeasible = [t for t in result.trials if not t.feasible]
    assert feasible and infeasible, [
        (t.settings["learning_rate"], t.capability_degradation) for t in result.trials
    ]
    for t in result.trials:
        assert t.feasible == (t.capability_degradation <= tolerance)
    assert result.best.harm == min(t.harm for t in feasible)
    # The excluded trials were more harmful than the reported worst case.
    assert min(t.harm for t in infeasible) < result.best.harm
    assert {c.config["trial"] for c in result.curves} == {t.number for t in feasible}


def test_no_feasible_trial_is_a_clear_result_not_a_crash(tmp_path, tokenizer):
    model = tiny_causal_lm("llama", seed=0)
    # A tolerance of -1 demands that perplexity fall by 100%: impossible, so every trial is infeasible.
    result = _search(tmp_path, 2, tolerance=-1.0).run(model, tokenizer, TRAIN, EVAL)
    assert len(result.trials) == 2 and not any(t.feasible for t in result.trials)
    assert result.best is None and result.curves == [] and not result.feasible
    assert "no feasible trial" in result.summary()
    with pytest.raises(ConfigError, match="no feasible trial"):
        result.worst_value(higher_is_better=True)
    assert result.to_dict()["search"]["best"] is None

    # evaluate_conditions says so too, instead of judging an empty set of curves.
    with pytest.raises(ConfigError, match="no feasible trial"):
        evaluate_conditions(
            model,
            tiny_causal_lm("llama", seed=1),
            tokenizer,
            ConditionDatasets(attack_train=TRAIN, attack_eval=EVAL),
            attack=_search(tmp_path, 2, tolerance=-1.0),
        )


def test_a_diverged_trial_is_infeasible(tmp_path, tokenizer):
    search = AttackSearch(
        _budget(max_steps=2, max_grad_norm=0.0),
        SearchConfig(search=1, search_dir=str(tmp_path), capability_tolerance=1.0),
        SearchSpace(search_space=["learning_rate"], lr_min=1e6, lr_max=1e6),  # NaN weights after a step
        reference=TEXT,
    )
    result = search.run(tiny_causal_lm("llama", seed=0), tokenizer, TRAIN, EVAL)
    (trial,) = result.trials
    assert math.isnan(trial.curve.points[-1].value) and trial.harm == math.inf  # the least harmful value
    assert not trial.feasible and result.best is None
    assert "diverged" in trials_table(result)


def test_resume_runs_only_the_missing_trials_with_the_same_settings(tmp_path, tokenizer, count_runs):
    model = tiny_causal_lm("llama", seed=0)
    first = _search(tmp_path / "a", 2).run(model, tokenizer, TRAIN, EVAL)
    assert len(count_runs) == 2

    # A killed search leaves a trial running in the storage: the resumed search marks it failed.
    study = optuna.load_study(study_name=first.record["study_name"], storage=first.record["storage"])
    study.ask()

    resumed = _search(tmp_path / "a", 3).run(model, tokenizer, TRAIN, EVAL)
    assert len(count_runs) == 3 and resumed.new_trials == 1
    assert [t.settings for t in resumed.trials[:2]] == [t.settings for t in first.trials]
    assert [t.harm for t in resumed.trials[:2]] == [t.harm for t in first.trials]
    states = [t.state for t in study.get_trials()]
    assert states.count(optuna.trial.TrialState.FAIL) == 1 and optuna.trial.TrialState.RUNNING not in states

    # Nothing left to do: no trial runs.
    again = _search(tmp_path / "a", 3).run(model, tokenizer, TRAIN, EVAL)
    assert len(count_runs) == 3 and again.new_trials == 0 and len(again.trials) == 3

    # Same seed, fresh storage, uninterrupted: the same settings as the resumed search.
    fresh = _search(tmp_path / "b", 3).run(model, tokenizer, TRAIN, EVAL)
    assert [t.settings for t in fresh.trials] == [t.settings for t in resumed.trials]
    # Another seed draws other settings.
    other = _search(tmp_path / "c", 1, seed=1).run(model, tokenizer, TRAIN, EVAL)
    assert other.trials[0].settings != fresh.trials[0].settings


def test_an_interrupted_trial_is_recorded_as_failed(tmp_path, tokenizer, monkeypatch):
    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(attacks_lib.HarmfulFineTuningAttack, "_run_one", interrupted)
    search = _search(tmp_path, 2)
    with pytest.raises(KeyboardInterrupt):
        search.run(tiny_causal_lm("llama", seed=0), tokenizer, TRAIN, EVAL)
    (study,) = optuna.get_all_study_summaries(search.search.storage_url())
    trials = optuna.load_study(study_name=study.study_name, storage=search.search.storage_url()).get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.FAIL]


def test_evaluate_conditions_takes_the_search_as_its_attack(tmp_path, tokenizer):
    base, immunized = tiny_causal_lm("llama", seed=0), tiny_causal_lm("llama", seed=1)
    search = _search(tmp_path, 2)
    sets = ConditionDatasets(
        attack_train=TRAIN,
        attack_eval=EVAL,
        cross_domain_train=make_pairs(8, offset=200),
        cross_domain_eval=make_pairs(4, offset=300),
    )
    report = evaluate_conditions(
        base, immunized, tokenizer, sets, attack=search, config=EvaluationConfig(generalization_max_steps=2)
    )
    assert report.conditions.resistance is not None
    extra = report.search
    assert extra["n_trials"] == 2 and extra["sampler_seed"] == 0
    assert extra["space"]["search_space"] == ["learning_rate"]
    assert extra["capability_tolerance"] == 1.0 and extra["capability_scorer"] == "perplexity"
    for who in ("base", "immunized"):
        run = extra["runs"][who]["attack"]
        assert run["n_complete"] == 2 and run["best"]["settings"]["family"] == "full"
        assert len(report.curves[who]["attack"]) == run["n_feasible"]
    # The generalization set gets its own search under its own step budget.
    cross = extra["runs"]["immunized"]["cross_domain"]
    assert (
        cross["max_steps"] == 2 and cross["study_name"] != extra["runs"]["immunized"]["attack"]["study_name"]
    )
    assert all(p.step <= 2 for c in report.curves["base"]["cross_domain"] for p in c.points)
    lrs = {c.config["learning_rate"] for who in report.curves.values() for c in who["attack"]}
    assert report.threat_model.grid["learning_rates"] == sorted(lrs)
    assert report.threat_model.grid["families"] == ["full"] and report.threat_model.attack_family == "full"
    path = report.save(tmp_path / "report.json")
    assert (
        ImmunizationReport.load(path).search["runs"]["base"]["attack"]["best"]
        == (extra["runs"]["base"]["attack"]["best"])
    )


def test_every_training_family_is_searchable_and_its_data_needs_are_checked(tmp_path, tokenizer):
    model = tiny_causal_lm("llama", seed=0)

    def search(family, n=1, **budget):
        return AttackSearch(
            _budget(family=family, max_steps=2, num_virtual_tokens=2, **budget),
            SearchConfig(search=n, search_dir=str(tmp_path / family), capability_tolerance=1.0),
            SearchSpace(search_space=["learning_rate", "lora_rank"], lr_min=1e-3, lr_max=1e-2),
            reference=TEXT,
        )

    lora = search("lora").run(model, tokenizer, TRAIN, EVAL)
    assert lora.trials[0].settings["lora_rank"] in (8, 16, 32)
    # A soft-prompt attack is scored as deployed (with its virtual tokens), for harm and capability alike.
    embedding = search("embedding_universal").run(model, tokenizer, TRAIN, EVAL)
    assert embedding.trials[0].settings["num_virtual_tokens"] == 2
    mixed = search("mixed").run(model, tokenizer, TRAIN, EVAL, benign_train=make_benign(24))
    assert mixed.trials[0].settings["harmful_share"] == 0.1
    # Families that rewrite the harmful text get the raw data, not the search's tokenized copy.
    jailbreak = search("jailbreak_tuning", jailbreak_variants=["backdoor"]).run(
        model, tokenizer, TRAIN, EVAL, benign_train=make_benign(24)
    )
    assert jailbreak.trials[0].settings["jailbreak_variant"] == "backdoor"
    identity = search("identity_shift", max_length=256).run(model, tokenizer, TRAIN, EVAL)
    for result in (lora, embedding, mixed, jailbreak, identity):
        (trial,) = result.trials
        assert trial.feasible and all(v > 1 for v in trial.capability_after.values())
    with pytest.raises(ConfigError, match="need benign data"):
        search("benign", n=1).run(model, tokenizer, TRAIN, EVAL)


@pytest.mark.parametrize(
    ("space", "message"),
    [
        (dict(search_space=["momentum"]), "unknown search parameter"),
        (dict(lr_min=1e-3, lr_max=1e-6), "lr_min <= lr_max"),
        (dict(optimizer_choices=["nope"]), "unknown optimizer"),
        (dict(scheduler_choices=["sometimes"]), "unknown learning-rate schedule"),
        (dict(family_choices=["nope"]), "unknown attack family"),
        (dict(warmup_ratio_choices=[1.5]), "warmup_ratio_choices"),
        (dict(family_choices=["full", "refusal_ablation"]), "training-free"),
    ],
)
def test_bad_search_space_is_a_config_error(space, message):
    with pytest.raises(ConfigError, match=message):
        SearchSpace(**space)


def test_bad_search_setup_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="min_steps=5 exceeds"):
        AttackSearch(_budget(), SearchConfig(search=1), SearchSpace(min_steps=5), reference=TEXT)
    with pytest.raises(ConfigError, match="reference set"):
        AttackSearch(_budget(), SearchConfig(search=1))
    with pytest.raises(ConfigError, match="at least one trial"):
        AttackSearch(_budget(), SearchConfig(search=0), reference=TEXT)
    with pytest.raises(ConfigError, match="capability_tolerance"):
        SearchConfig(capability_tolerance=float("nan"))


def test_cli_attack_search_prints_trials_and_writes_json(tmp_path, capsys):
    tiny_causal_lm("llama", seed=0).save_pretrained(tmp_path / "model")
    from immune_trainer.testing import tiny_tokenizer

    tiny_tokenizer().save_pretrained(tmp_path / "model")
    TRAIN.to_json(tmp_path / "train.jsonl")
    EVAL.to_json(tmp_path / "eval.jsonl")
    make_benign(6).to_json(tmp_path / "ref.jsonl")
    args = ["attack", "--model", str(tmp_path / "model"), "--dataset", str(tmp_path / "train.jsonl")]
    args += ["--eval_dataset", str(tmp_path / "eval.jsonl"), "--max_steps", "2", "--eval_every", "1"]
    args += ["--max_length", "64", "--search", "2", "--search_dir", str(tmp_path / "s")]
    args += ["--search_space", "learning_rate", "--output", str(tmp_path / "out.json")]

    assert main(args) == 1
    assert "--search needs --reference" in capsys.readouterr().err

    assert main([*args, "--reference", str(tmp_path / "ref.jsonl"), "--capability_tolerance", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "capability loss" in out and "worst case: trial" in out
    written = json.loads((tmp_path / "out.json").read_text())
    assert len(written["trials"]) == 2 and written["search"]["n_trials"] == 2
    assert written["search"]["capability_tolerance"] == 0.5
    assert written["reference"] == str(tmp_path / "ref.jsonl")


def test_cli_attack_help_lists_the_search_options(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["attack", "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    for option in ("--search ", "--search_storage", "--search_seed", "--reference", "--capability_tolerance"):
        assert option in out
