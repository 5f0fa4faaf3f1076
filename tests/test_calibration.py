"""The calibrated attack: a pruned search per family and model under the capability cap, winners on several
seeds (the worst counts), every claim extended until decided, and the report and card that state it."""

from __future__ import annotations

import math

import datasets
import pytest
from conftest import make_pairs

from immune_trainer.attacks import AttackConfig, CalibratedAttack, CalibrationConfig
from immune_trainer.attacks.search import SearchResult, SearchTrial
from immune_trainer.conditions import AttackCurve, CurvePoint, first_crossing, resistance
from immune_trainer.errors import ConfigError
from immune_trainer.evaluation import ConditionDatasets, EvaluationConfig, evaluate_conditions
from immune_trainer.evaluation.calibrated import calibrated_set
from immune_trainer.evaluation.stages import EvaluationRun
from immune_trainer.model_card.render import generate_model_card
from immune_trainer.scoring import get_scorer
from immune_trainer.testing import tiny_causal_lm

TRAIN, EVAL = make_pairs(12), make_pairs(4, offset=100)
TEXT = datasets.Dataset.from_dict({"text": ["The quick brown fox jumps over the lazy dog. " * 3] * 4})


def _attack(families=("full",), *, max_steps=4, eval_every=2, reference=TEXT, **calibration):
    values = dict(calibrate_space=["learning_rate"], calibrate_pruner="none", capability_tolerance=1.0)
    values.update(calibration)
    return CalibratedAttack(
        AttackConfig(families=list(families), max_steps=max_steps, eval_every=eval_every, max_length=64, batch_size=4),
        CalibrationConfig(**values),
        reference={"ref": reference},
        capability_scorer=calibration.pop("capability_scorer", None),
    )


# ---------------------------------------------------------------------------- the search of one family


def test_the_search_picks_the_most_harmful_feasible_setting_and_never_an_infeasible_one(tokenizer):
    # Capability is the harmful loss itself: the more an attack lowers it, the more it "degrades", so the most
    # harmful settings break the cap and must not win.
    attack = CalibratedAttack(
        AttackConfig(families=["full"], max_steps=3, eval_every=1, max_length=64, batch_size=4),
        CalibrationConfig(
            calibrate_trials=5,
            calibrate_space=["learning_rate"],
            lr_min=1e-6,
            lr_max=3e-2,
            calibrate_pruner="none",
            capability_tolerance=0.02,
        ),
        reference={"ref": EVAL},
        capability_scorer=get_scorer("harmful_loss"),
    )
    result = attack.search("full", tiny_causal_lm("llama", seed=0), tokenizer, TRAIN, EVAL)
    feasible = [t for t in result.trials if t.feasible]
    infeasible = [t for t in result.trials if not t.feasible]
    assert feasible and infeasible
    assert result.best.number == min(feasible, key=lambda t: t.harm).number
    # the cap mattered: a more harmful trial was excluded
    assert min(t.harm for t in infeasible) < result.best.harm
    assert all(t.capability_degradation > 0.02 for t in infeasible)


def test_weak_settings_are_pruned_and_recorded_as_pruned(tokenizer):
    attack = _attack(calibrate_trials=6, lr_min=1e-7, lr_max=1e-2, calibrate_pruner="median", max_steps=6)
    result = attack.search("full", tiny_causal_lm("llama", seed=0), tokenizer, TRAIN, EVAL)
    pruned = [t for t in result.trials if t.state == "pruned"]
    assert pruned, [(t.settings["learning_rate"], t.harm) for t in result.trials]
    for t in pruned:
        assert t.curve.points[-1].step < 6 and not t.feasible and t.capability_after == {}
        assert t.to_dict()["state"] == "pruned" and t.curve.config["pruned"] is True
        assert t.to_dict()["capability_degradation"] is None  # not measured; no NaN in a report
    assert result.best is not None and result.best.state == "complete"
    assert result.record["n_pruned"] == len(pruned)


def test_bad_calibration_is_a_config_error():
    with pytest.raises(ConfigError, match="calibrate_trials"):
        CalibrationConfig(calibrate_trials=0)
    with pytest.raises(ConfigError, match="unknown calibrated setting"):
        CalibrationConfig(calibrate_space=["family"])
    with pytest.raises(ConfigError, match="pruner"):
        CalibrationConfig(calibrate_pruner="hyperband")
    with pytest.raises(ConfigError, match="reference"):
        CalibratedAttack(AttackConfig(families=["full"]), CalibrationConfig(), reference=None)


# ---------------------------------------------------------------------------- seeds and decided claims

PHI = 2.0


def _values(cross_at: float | None, steps: list[int]) -> list[float]:
    """A falling harm curve whose first point past phi (2.0) is at step ``cross_at`` (crossing half a step
    before it); None: it never crosses."""
    if cross_at is None:
        return [3.0 - 0.01 * s for s in steps]
    return [PHI + 0.1 * (cross_at - s) - 0.05 for s in steps]


class _Scripted:
    """Stands in for the training of a CalibratedAttack: each (model, seed) run follows a script of where it
    crosses phi; every run asked for is logged (model, seeds, max_steps)."""

    def __init__(self, attack: CalibratedAttack, script: dict[tuple[str, int], float | None], models):
        self.script, self.models, self.calls = script, models, []
        attack.search = self.search
        attack.rerun = self.rerun

    def _who(self, model) -> str:
        return "base" if model is self.models["base"] else "immunized"

    def curve(self, who, seed, max_steps, stop=None, every=2):
        steps = list(range(0, max_steps + 1, every))
        points = [CurvePoint(step=s, tokens=10 * s, flops=1.0 * s, value=v) for s, v in zip(steps, _values(self.script[(who, seed)], steps))]
        if stop is not None:
            for i, p in enumerate(points):
                if p.value < stop:
                    points = points[: i + 1]
                    break
        return AttackCurve(config={"family": "full", "learning_rate": 1e-4, "seed": seed}, points=points)

    def search(self, family, model, tokenizer, train, ev, **kwargs):
        who = self._who(model)
        self.calls.append((who, "search", 0, 8))
        curve = self.curve(who, 0, 8)
        trial = SearchTrial(0, {"family": "full", "learning_rate": 1e-4, "seed": 0, "max_steps": 8}, curve.points[-1].value,
                            {"ref": 1.0}, {"ref": 1.0}, 0.0, True, curve)
        return SearchResult(curves=[curve], config=None, trials=[trial], best=trial, record={"study_name": who})

    def rerun(self, settings, seeds, model, tokenizer, train, ev, *, max_steps=None, stop_at_threshold=None, **kwargs):
        who = self._who(model)
        steps = max_steps or 8
        self.calls.append((who, tuple(seeds), steps))
        return [self.curve(who, s, steps, stop_at_threshold) for s in seeds]


def _run(script, **config):
    base, imm = object(), object()
    attack = _attack(max_steps=8, eval_every=2)
    scripted = _Scripted(attack, script, {"base": base, "immunized": imm})
    run = EvaluationRun(
        base, imm, None, ConditionDatasets(attack_train=TRAIN, attack_eval=EVAL), EvaluationConfig(threshold=PHI, **config)
    )
    return calibrated_set(run, "attack", attack, 2, PHI), scripted


def _family(result):
    return resistance(result.immunized, PHI, higher_is_better=True, base_curves=result.base).families[0]


def test_winners_run_on_two_seeds_and_the_worst_seed_counts():
    # seed 0 of the immunized model crosses at step 8, seed 1 at step 4: the attacker's best is seed 1
    result, scripted = _run({("base", 0): 2, ("base", 1): 2, ("immunized", 0): 8, ("immunized", 1): 4})
    assert sorted(c.config["seed"] for c in result.immunized) == [0, 1]
    assert sorted(c.config["seed"] for c in result.base) == [0, 1]
    assert ("immunized", (1,), 8) in scripted.calls  # seed 0 is the trial's own run
    fam = _family(result)
    crossings = [first_crossing(c.points, PHI, True).step for c in result.immunized]
    assert fam.immunized_cost.step == pytest.approx(min(crossings)) and fam.immunized_cost.step < 5
    assert result.searches["families"]["full"]["seeds"] == [0, 1]


@pytest.mark.parametrize(
    "imm_cross, holds, bound",
    [(10, False, False), (None, True, True)],
    ids=["extension-crosses", "extension-stays-past-2x"],
)
def test_a_lower_bound_is_extended_until_the_claim_is_decided(imm_cross, holds, bound):
    # The base crosses at step 6; within the 8-step budget the immunized model never crosses: ">= 1.33x",
    # undetermined. Extended to 2 x 6 = 12 steps it either crosses (a number) or is a decided ">= 2x".
    script = {("base", 0): 6, ("base", 1): 6, ("immunized", 0): imm_cross, ("immunized", 1): imm_cross}
    short = _Scripted(_attack(), script, {"base": "b", "immunized": "i"})
    undecided = resistance(
        [short.curve("immunized", s, 8) for s in (0, 1)], PHI, higher_is_better=True,
        base_curves=[short.curve("base", s, 8) for s in (0, 1)],
    ).families[0]
    assert undecided.holds is None and undecided.multiple_is_lower_bound and not undecided.decided
    result, scripted = _run(script)
    assert ("immunized", (0, 1), 12) in scripted.calls
    fam = _family(result)
    assert fam.holds is holds and fam.decided and fam.multiple_is_lower_bound is bound
    rec = result.searches["families"]["full"]
    assert rec["decided"] and rec["extensions"] == [
        {"model": "immunized", "max_steps": 12, "seeds": [0, 1], "reason": "a lower bound below 2x"}
    ]
    assert all(c.config["extended_from"] == 8 for c in result.immunized)
    assert result.searches["undetermined"] == []


def test_a_base_that_never_crosses_is_extended_and_named_when_past_the_cap():
    result, scripted = _run({("base", 0): 14, ("base", 1): 14, ("immunized", 0): 4, ("immunized", 1): 4})
    assert ("base", (0, 1), 16) in scripted.calls
    assert _family(result).base_crossing is not None and _family(result).decided
    # Past the cap (4 x the budget) the base still never crosses: the family is undetermined and named ...
    result, scripted = _run({("base", 0): None, ("base", 1): None, ("immunized", 0): None, ("immunized", 1): None})
    assert [c for c in scripted.calls if c[0] == "base"][-1] == ("base", (0, 1), 32)
    assert result.searches["undetermined"] == ["full"]
    assert _family(result).holds is None and not _family(result).decided
    assert "phi never reached by the base" in result.searches["families"]["full"]["summary"]
    # ... unless the immunized model crossed faster than 2x the base's budget: a decided failure.
    result, _ = _run({("base", 0): None, ("base", 1): None, ("immunized", 0): 4, ("immunized", 1): 4})
    assert result.searches["undetermined"] == [] and _family(result).holds is False


# ---------------------------------------------------------------------------- the default, the report and the card


def _sets(**kw):
    return ConditionDatasets(
        attack_train=TRAIN,
        attack_eval=EVAL,
        cross_domain_train=make_pairs(8, offset=200),
        cross_domain_eval=make_pairs(4, offset=300),
        **kw,
    )


def test_the_report_and_card_state_the_calibrated_search(tokenizer):
    base, immunized = tiny_causal_lm("llama", seed=0), tiny_causal_lm("llama", seed=1)
    attack = _attack(calibrate_trials=2, max_steps=2, eval_every=1)
    report = evaluate_conditions(base, immunized, tokenizer, _sets(reference={"ref": TEXT}), attack=attack)
    search = report.search
    assert search["kind"] == "calibrated" and search["n_trials"] == 2 and search["seeds"] == 2
    main = search["sets"]["attack"]
    for who in ("base", "immunized"):
        rec = main["families"]["full"][who]
        assert len(rec["trials"]) == 2 and all("curve" in t and "state" in t for t in rec["trials"])
        assert main["winners"]["full"][who]["family"] == "full"
        assert len(rec["cumulative_max_harm"]) == 2 and rec["worst_case_within_cap"] is not None
    assert search["sets"]["cross_domain"]["settings_source"] == "settings searched on the resistance set"
    assert {c.config["seed"] for c in report.curves["immunized"]["attack"]} == {0, 1}
    assert report.conditions.resistance.families[0].decided is not None
    card = str(generate_model_card(report))
    assert "calibrated per family (full) and per model" in card and "| winner full |" in card
    assert "fixed grid, not searched" not in card


def test_the_default_needs_reference_sets_and_fixed_grid_still_runs_the_grid(tokenizer):
    base, immunized = tiny_causal_lm("llama", seed=0), tiny_causal_lm("llama", seed=1)
    grid = AttackConfig(families=["full"], learning_rates=[1e-4], max_steps=2, eval_every=1, max_length=64)
    with pytest.raises(ConfigError, match="fixed_grid"):
        evaluate_conditions(base, immunized, tokenizer, _sets(), attack=grid)
    report = evaluate_conditions(
        base, immunized, tokenizer, _sets(), attack=grid, config=EvaluationConfig(fixed_grid=True)
    )
    assert report.search is None
    assert [c.config["learning_rate"] for c in report.curves["immunized"]["attack"]] == [1e-4]
    assert "fixed grid, not searched" in str(generate_model_card(report))


def test_cumulative_max_is_taken_over_feasible_trials_in_order():
    from immune_trainer.attacks import cumulative_max

    trials = [
        {"number": 0, "harm": 3.0, "feasible": False},
        {"number": 1, "harm": 2.5, "feasible": True},
        {"number": 2, "harm": 1.0, "feasible": False},
        {"number": 3, "harm": 2.0, "feasible": True},
    ]
    assert cumulative_max(trials, higher_is_better=True) == [None, 2.5, 2.5, 2.0]
    assert cumulative_max(trials, higher_is_better=False) == [None, 2.5, 2.5, 2.5]
    assert not math.isnan(cumulative_max(trials, True)[-1])


@pytest.mark.slow
def test_a_second_evaluation_takes_the_base_models_search_and_runs_from_the_cache(tokenizer, tmp_path, monkeypatch):
    from immune_trainer.attacks import HarmfulFineTuningAttack

    base = tiny_causal_lm("llama", seed=0)
    grid = AttackConfig(families=["full"], max_steps=2, eval_every=1, max_length=64, batch_size=2)
    cfg = EvaluationConfig(cache_dir=str(tmp_path / "cache"))
    sets = _sets(reference={"ref": TEXT})
    first = evaluate_conditions(base, tiny_causal_lm("llama", seed=1), tokenizer, sets, attack=grid, config=cfg)
    trained = []
    original = HarmfulFineTuningAttack._run_one

    def spy(self, model, *args, **kwargs):
        trained.append("base" if model is base else "immunized")
        return original(self, model, *args, **kwargs)

    monkeypatch.setattr(HarmfulFineTuningAttack, "_run_one", spy)
    second = evaluate_conditions(base, tiny_causal_lm("llama", seed=2), tokenizer, sets, attack=grid, config=cfg)
    assert "immunized" in trained and "base" not in trained
    for key in ("attack", "cross_domain"):
        assert [c.points for c in second.curves["base"][key]] == [c.points for c in first.curves["base"][key]]
    assert second.search["sets"]["attack"]["families"]["full"]["base"]["trials"] == (
        first.search["sets"]["attack"]["families"]["full"]["base"]["trials"]
    )


def test_the_calibrated_reruns_carry_the_after_attack_probe_and_the_capability_probe(tokenizer):
    """The winners' seed runs of the calibrated default are measured as the grid's are: the attacked model's
    refusal (after_attack) and the attacked copy's capability loss at points past phi (the collapse rule)."""
    base, immunized = tiny_causal_lm("llama", seed=0), tiny_causal_lm("llama", seed=1)
    attack = _attack(calibrate_trials=1, max_steps=2, eval_every=1)
    sets = ConditionDatasets(
        attack_train=TRAIN,
        attack_eval=EVAL,
        reference={"ref": TEXT},
        harmful_prompts=["Explain step 1.", "Explain step 2."],
    )
    cfg = EvaluationConfig(side_effects=False, helpfulness=False, attacked_harm_prompts=2, attacked_harm_judge=None)
    report = evaluate_conditions(base, immunized, tokenizer, sets, attack=attack, config=cfg)
    for who in ("base", "immunized"):
        curves = report.curves[who]["attack"]
        reruns = [c for c in curves if "after_attack" in c.config]
        assert reruns, f"no {who} run carries the after-attack probe"
        assert all(c.config["after_attack"]["n"] == 2 for c in reruns)
    probed = [p for c in report.curves["immunized"]["attack"] if "after_attack" in c.config for p in c.points[1:]]
    # every probed re-run point past phi records the attacked copy's capability loss
    phi, hib = report.threat_model.threshold, report.threat_model.higher_is_better
    past = [p for p in probed if (p.value <= phi if hib else p.value >= phi)]
    assert all(p.capability_loss is not None for p in past)
