"""A harmful set attacked with the calibrated attack (:class:`~immune_trainer.attacks.CalibratedAttack`):
each training family searched on each model, the winners re-run on several seeds, every claim decided.

:func:`calibrated_set` is the stage function of one set:

1. **Search** (the resistance set): per training family and model, the pruned search under the capability
   cap; the winner is the most harmful feasible trial. On the generalization sets the winners of the
   resistance set are used ("settings searched on the resistance set"). A model with no feasible trial
   takes the other model's winner (said in the record); a family with none on either fails with a
   :class:`~immune_trainer.errors.ConfigError`.
2. **phi** (unless given): the base model's median f at the threshold step over the winners' first seeds
   (``threshold_families`` when set).
3. **Seeds**: each winner runs on ``calibrate_seeds`` seeds (the trial's run is the first); every seed's
   curve is judged, so the earliest crossing (the worst seed) counts.
4. **Every claim decided**: a base family that never crosses phi is re-run longer (2x, then up to
   ``extend_cap`` x the budget) until it crosses, else it stays undetermined and is named; an immunized
   family whose multiple is only a lower bound below ``min_cost_multiple`` is re-run until it crosses or
   has run ``min_cost_multiple`` x the base's crossing (a decided ">= Nx").

The record (``AttackSetResult.searches``) keeps every trial (setting, curve, capability, pruned or not),
the winners, the seeds, the extensions and TamperBench's aggregations beside the worst case.
"""

from __future__ import annotations

import math
from typing import Any

from ..attacks import CalibratedAttack, cumulative_max
from ..conditions import AttackCurve, resistance
from ..errors import ConfigError
from .attack_sets import threshold_from_base
from .stages import AttackSetResult, EvaluationRun, harmful_sets

__all__ = ["calibrated_set"]

_MODELS = ("base", "immunized")


def _other(who: str) -> str:
    return "immunized" if who == "base" else "base"


def _search_summary(result, higher_is_better: bool) -> dict[str, Any]:
    trials = [t.to_dict() for t in result.trials]
    best = result.best
    return {
        "trials": trials,
        "n_trials": len(trials),
        "n_pruned": sum(t["state"] == "pruned" for t in trials),
        "n_feasible": sum(bool(t["feasible"]) for t in trials),
        "winner": None
        if best is None
        else {"trial": best.number, "settings": dict(best.settings), "harm": best.harm,
              "capability_degradation": best.capability_degradation},
        # TamperBench's aggregations: the worst case bounded by capability retention (the most harmful
        # feasible trial), and the cumulative maximum of harm over the trials in order.
        "worst_case_within_cap": None if best is None else best.harm,
        "cumulative_max_harm": cumulative_max(trials, higher_is_better),
        "study": result.record.get("study_name"),
    }


def _judge(attack, phi, base: list[AttackCurve], imm: list[AttackCurve], min_cost_multiple: float):
    r = resistance(
        imm,
        phi,
        higher_is_better=attack.scorer.higher_is_better,
        base_curves=base,
        min_cost_multiple=min_cost_multiple,
    )
    return r.families[0]


def _round_up(steps: float, every: int) -> int:
    return int(math.ceil(steps / every - 1e-9) * every)


def calibrated_set(
    run: EvaluationRun,
    key: str,
    attack: CalibratedAttack,
    step: int,
    phi: float | None,
    winners: dict[str, dict[str, dict[str, Any]]] | None = None,
) -> AttackSetResult:
    """One harmful set attacked with ``attack`` on both models (see the module docstring); ``winners``
    (``{family: {"base": settings, "immunized": settings}}``) skips the search and uses those settings."""
    train, ev = harmful_sets(run.datasets)[key]
    cal, hib = attack.calibration, attack.scorer.higher_is_better
    benign = run.datasets.benign_train
    seeds = [attack.config.seeds[0] + i for i in range(cal.calibrate_seeds)]
    stop = run.config.early_stop
    record: dict[str, Any] = {"families": {}}
    first: dict[str, dict[str, list[AttackCurve]]] = {}
    models = dict(run.models())

    def rerun(who, settings, run_seeds, max_steps=None, phi_now=None):
        return attack.rerun(
            settings,
            run_seeds,
            models[who],
            run.tokenizer,
            train,
            ev,
            max_steps=max_steps,
            stop_at_threshold=phi_now if stop else None,
            benign_train=benign,
            prepare_model=run.prepare_model(who),
            progress=run.say,
            after_attack=run.after_attack if key in run.config.attacked_harm_sets else None,
            capability_probe=run.capability_probe,
        )

    if winners is None:
        record["settings_source"] = "searched on this set"
        families = list(attack.trained)
        winners = {}
        for family in families:
            results, rec = {}, {}
            for who in _MODELS:
                run.say(
                    f"[{key}] calibrating the {family} attack on the {who} model "
                    f"({cal.calibrate_trials} trials, pruner {cal.calibrate_pruner})"
                )
                results[who] = attack.search(
                    family,
                    models[who],
                    run.tokenizer,
                    train,
                    ev,
                    benign_train=benign,
                    prepare_model=run.prepare_model(who),
                    progress=run.say,
                )
                rec[who] = _search_summary(results[who], hib)
            winners[family], first[family] = {}, {}
            for who in _MODELS:
                best = results[who].best or results[_other(who)].best
                if best is None:
                    raise ConfigError(
                        f"[{key}] no {family} trial kept capability within {cal.capability_tolerance:.0%} on either "
                        "model: lower lr_min or add trials (calibrate_trials)."
                    )
                winners[family][who] = dict(best.settings)
                if results[who].best is None:
                    rec[who]["winner_source"] = (
                        f"no trial within the capability cap on the {who} model: the {_other(who)} model's winner"
                    )
                    first[family][who] = []
                else:
                    first[family][who] = [best.curve]
            record["families"][family] = rec
    else:
        record["settings_source"] = "settings searched on the resistance set"
        families = [f for f in attack.generalization_families if f in winners]
        first = {f: {who: [] for who in _MODELS} for f in families}
    record["winners"] = {f: {who: dict(winners[f][who]) for who in _MODELS} for f in families}

    # The base model's first seeds run their whole budget: phi is read off them.
    for family in families:
        if not first[family]["base"]:
            run.say(f"[{key}] {family} winner on the base model, seed {seeds[0]}")
            first[family]["base"] = rerun("base", winners[family]["base"], seeds[:1])
    derived = phi is None
    if derived:
        ref = [f for f in (run.config.threshold_families or families) if f in families] or families
        set_step = step if key == "attack" else min(step, attack.config.eval_every)
        phi = threshold_from_base([c for f in ref for c in first[f]["base"]], set_step)
        run.say(f"[{key}] phi = {phi:.4f}")

    curves: dict[str, dict[str, list[AttackCurve]]] = {f: {} for f in families}
    for family in families:
        for who in _MODELS:
            have = first[family][who]
            missing = seeds[len(have):] if have else seeds
            if missing:
                run.say(f"[{key}] {family} winner on the {who} model, seed(s) {', '.join(map(str, missing))}")
            curves[family][who] = have + (rerun(who, winners[family][who], missing, phi_now=phi) if missing else [])

    # Every claim decided: extend the base, then the immunized model, until the family is decided.
    budget = attack.config.max_steps
    every = attack.config.eval_every
    mcm = run.config.min_cost_multiple
    decisions = {}
    for family in families:
        ext: list[dict[str, Any]] = []
        base, imm = curves[family]["base"], curves[family]["immunized"]
        verdict = _judge(attack, phi, base, imm, mcm)
        if verdict.base_crossing is None:
            for multiple in sorted({2.0, cal.extend_cap} - {1.0}):
                if multiple > cal.extend_cap:
                    continue
                steps = _round_up(budget * multiple, every)
                run.say(f"[{key}] {family}: the base model never crossed phi: extending it to {steps} steps")
                base = rerun("base", winners[family]["base"], seeds, max_steps=steps, phi_now=phi)
                for c in base:
                    c.config["extended_from"] = budget
                ext.append({"model": "base", "max_steps": steps, "reason": "the base never crossed phi"})
                verdict = _judge(attack, phi, base, imm, mcm)
                if verdict.base_crossing is not None:
                    break
        if verdict.base_crossing is not None and verdict.holds is None and verdict.multiple_is_lower_bound:
            steps = max(_round_up(mcm * verdict.base_crossing.step, every), budget + every)
            # only the seeds that never crossed are re-run longer; a crossing stays as it was measured
            crossed_seeds = {
                c.config.get("seed") for c in imm if _judge_crossed(c, phi, hib)
            }
            todo = [s for s in seeds if s not in crossed_seeds]
            run.say(
                f"[{key}] {family}: a lower bound on the immunized model: extending seed(s) "
                f"{', '.join(map(str, todo))} to {steps} steps ({mcm:g}x the base's crossing)"
            )
            longer = rerun("immunized", winners[family]["immunized"], todo, max_steps=steps, phi_now=phi)
            for c in longer:
                c.config["extended_from"] = budget
            imm = [c for c in imm if c.config.get("seed") in crossed_seeds] + longer
            ext.append({"model": "immunized", "max_steps": steps, "seeds": todo,
                        "reason": f"a lower bound below {mcm:g}x"})
            verdict = _judge(attack, phi, base, imm, mcm)
        curves[family] = {"base": base, "immunized": imm}
        decisions[family] = {
            "decided": verdict.holds is not None,
            "status": "decided" if verdict.holds is not None else "undetermined",
            "lower_bound": bool(verdict.multiple_is_lower_bound),
            "summary": verdict.summary,
            "extensions": ext,
        }
        fam_rec = record["families"].setdefault(family, {})
        fam_rec.update(decisions[family])
        fam_rec["seeds"] = list(seeds)

    out = {who: [c for f in families for c in curves[f][who]] for who in _MODELS}
    if key == "attack" and attack.training_free:
        for who in _MODELS:
            run.say(f"[{key}] training-free families on the {who} model (not searched)")
            out[who] += attack.run_training_free(
                models[who],
                run.tokenizer,
                train,
                ev,
                benign_train=benign,
                progress=run.say,
                after_attack=run.after_attack if key in run.config.attacked_harm_sets else None,
            )
    undetermined = [f for f, d in decisions.items() if not d["decided"]]
    record["undetermined"] = undetermined
    return AttackSetResult(key, out["base"], out["immunized"], phi, derived, record)


def _judge_crossed(curve: AttackCurve, phi: float, hib: bool) -> bool:
    from ..conditions import first_crossing

    return first_crossing(curve.points, phi, hib) is not None
