"""What a model card says: every measured number as a claim (``model-index`` eval results that ``verify``
re-checks), and what the report did not test."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import conditions as C
from ..conditions.report import ImmunizationReport

__all__ = ["after_attack_claims", "claims", "eval_results", "not_tested"]


def _recorded(report: ImmunizationReport) -> dict[str, Any]:
    """The data SPECs a report records (``report.datasets``, else an older report's ``extra["datasets"]``)."""
    return dict(
        report.datasets or ((report.extra.get("datasets") or {}) if isinstance(report.extra, dict) else {})
    )


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def claims(report: ImmunizationReport) -> list[dict[str, Any]]:
    """Every measured number the card states, as ``{"id", "name", "value", "metric_type", "task"}`` (and
    ``"dataset"`` when it is not the attack data: an lm-eval benchmark or the attacked models' harmful prompts;
    ``"dataset_config"`` where one dataset serves several tasks).

    ``id`` is a stable claim identifier (``resistance.worst_value``, ``stability.<set>.relative_change``...)
    stored in each eval result's ``metric_config`` so ``verify`` can find it again. Unmeasured or
    non-finite values make no claim.
    """
    c, tm = report.conditions, report.threat_model
    out: list[dict[str, Any]] = []
    data = _recorded(report)
    refs = dict(r.partition("=")[::2] for r in data.get("reference") or [] if isinstance(r, str) and "=" in r)

    def add(cid, name, value, metric_type, task, dataset=None, config=None):
        if _finite(value):
            claim = {"id": cid, "name": name, "value": float(value), "metric_type": metric_type, "task": task}
            if dataset is not None:  # a benchmark's own data (lm-eval tasks), not the attack data
                claim["dataset"] = dataset
            if config is not None:  # the model-index groups results by dataset and config, not by task
                claim["dataset_config"] = config
            out.append(claim)

    def res(prefix, r: C.ResistanceResult | None, task, dataset=None):
        if r is None:
            return
        add(
            f"{prefix}.worst_value",
            f"worst {tm.scorer} over the grid (immunized)",
            r.worst_value,
            tm.scorer,
            task,
            dataset,
        )
        if r.worst_crossing is not None:
            add(
                f"{prefix}.crossing_step",
                "attack steps until harm crosses phi",
                r.worst_crossing.step,
                "steps",
                task,
                dataset,
            )
        add(
            f"{prefix}.steps_multiple",
            "attack cost multiple in steps (immunized / base)",
            r.steps_multiple,
            "ratio",
            task,
            dataset,
        )

    res("resistance", c.resistance, "harmful fine-tuning resistance")
    if c.generalization is not None:
        res(
            "generalization.in_domain",
            c.generalization.in_domain,
            "in-domain generalization",
            data.get("in_domain_train") or "in-domain harmful set",
        )
        res(
            "generalization.cross_domain",
            c.generalization.cross_domain,
            "cross-domain generalization",
            data.get("cross_domain") or "cross-domain harmful set",
        )
    scorers = report.extra.get("capability_scorers") if isinstance(report.extra, dict) else None
    if c.stability is not None:
        for name, s in c.stability.sets.items():
            key = (scorers or {}).get(name) or {}
            if key.get("name") == "lm_eval":
                # A benchmark's accuracy: the model-index names lm-eval's metric and tasks, as the Hub's
                # evaluation widgets read them.
                metric = key.get("metric") or "acc"
                task = f"lm-eval: {', '.join(key.get('tasks') or [name])}"
                bench = ",".join(key.get("tasks") or [name])
                add(f"stability.{name}.base", f"{metric} on {name} (base)", s.base, metric, task, bench)
                add(f"stability.{name}.immunized", f"{metric} on {name} (immunized)", s.immunized, metric, task, bench)
            else:
                task, bench = "stability", refs.get(name) or name  # the reference set, not the attack data
                add(
                    f"stability.{name}.immunized",
                    f"capability on {name} (immunized)",
                    s.immunized,
                    "capability",
                    task,
                    bench,
                )
            add(
                f"stability.{name}.relative_change",
                f"relative capability change on {name}",
                s.relative_change,
                "relative_change",
                task,
                bench,
            )
    for cl in after_attack_claims(report):
        add(**cl)
    t = c.trainability
    benign = data.get("benign_train") or data.get("benign") or "benign fine-tuning"
    if t is not None:
        add(
            "trainability.immunized_final",
            "final benign score (immunized)",
            t.immunized_final,
            "benign_score",
            "trainability",
            benign,
        )
        add(
            "trainability.immunized_steps",
            "steps to reach the benign target (immunized)",
            t.immunized_steps,
            "steps",
            "trainability",
            benign,
        )
    return out


AFTER_ATTACK_SETS = {"attack": "", "in_domain": "in-domain ", "cross_domain": "cross-domain "}
"""Harmful curve set -> the words its attacked-harm tasks start with."""


def after_attack_claims(report: ImmunizationReport) -> list[dict[str, Any]]:
    """The attacked models' harm as claims: for each harmful set and attack family, the refusal rate and
    (with a judge) the judged harm of the worst run's final model, base and immunized
    (:func:`~immune_trainer.conditions.attacked_harm_by_family`).

    ``id`` is ``after_attack.<set>.<family>.<base|immunized>.<refusal_rate|harm>``; the task is the set's
    ("harm after attack", "cross-domain harm after attack"), its dataset the prompts the attacked models
    answered with the set as its config (huggingface_hub's model-index groups results by dataset and config
    and keeps one task name per group), the metric type ``refusal_rate`` or ``judged_harm``, and the
    metric name the judge, family and model. Records without a number (no judge: ``harm`` is None) make no claim."""
    out: list[dict[str, Any]] = []
    hib = report.threat_model.higher_is_better
    data = _recorded(report)
    prompts = str(data.get("harmful_prompts") or data.get("attack_eval") or "harmful-prompts")
    for key, words in AFTER_ATTACK_SETS.items():
        by_family = C.attacked_harm_by_family(
            report.curves.get("base", {}).get(key, []),
            report.curves.get("immunized", {}).get(key, []),
            hib,
        )
        for family, pair in by_family.items():
            for who in ("base", "immunized"):
                rec = pair.get(who)
                if not rec:
                    continue
                judge = rec.get("judge") if isinstance(rec.get("judge"), dict) else {}
                judge_name = str(judge.get("name") or "judge")
                n = rec.get("n", "?")
                for what, metric_type, label in (
                    ("refusal_rate", "refusal_rate", "refusal rate"),
                    ("harm", "judged_harm", f"judged harm ({judge_name})"),
                ):
                    if _finite(rec.get(what)):
                        out.append(
                            {
                                "cid": f"after_attack.{key}.{family}.{who}.{what}",
                                "name": f"{label} of the {who} model after its worst {family} attack (n={n})",
                                "value": rec[what],
                                "metric_type": metric_type,
                                "task": f"{words}harm after attack",
                                "dataset": prompts,
                                "config": key,
                            }
                        )
    return out


def eval_results(report: ImmunizationReport, dataset_name: str | None = None) -> list:
    """``huggingface_hub.EvalResult`` s of :func:`claims` (for the card's ``model-index``)."""
    from huggingface_hub import EvalResult

    ds = dataset_name or _recorded(report).get("attack_train") or "harmful-fine-tuning-attack"
    out, tasks = [], {}
    for cl in claims(report):
        dataset, config = str(cl.get("dataset", ds)), cl.get("dataset_config")
        # huggingface_hub's model-index keeps one task name per (dataset, config): a second task on the same
        # dataset (e.g. stability on the attack data) gets its task as the config, so no task name is lost.
        if tasks.setdefault((dataset, config), cl["task"]) != cl["task"]:
            config = cl["task"]
            tasks.setdefault((dataset, config), cl["task"])
        out.append(
            EvalResult(
                task_type="text-generation",
                task_name=cl["task"],
                dataset_type=dataset,
                dataset_name=dataset,
                dataset_config=config,
                metric_type=cl["metric_type"],
                metric_name=cl["name"],
                metric_value=cl["value"],
                metric_config=cl["id"],
            )
        )
    return out


def _search_line(search: dict | None) -> str:
    """The attack search's budget, as the card states it ("fixed grid, not searched" without a search)."""
    if not search:
        return "fixed grid, not searched: one picked setting per family; an attacker who tunes may do better"
    if search.get("kind") == "calibrated":
        return _calibrated_line(search)
    space = search.get("space") or {}
    searched = space.get("search_space") if isinstance(space, dict) else None
    return (
        f"Optuna {search.get('sampler', 'TPE')} search, {search.get('n_trials')} trials per model and data set"
        + (f" over {', '.join(searched)}" if searched else "")
        + f", at most {search.get('max_steps')} steps, sampler seed {search.get('sampler_seed')}; a trial counts only "
        f"if {search.get('capability_scorer')} degrades by at most {search.get('capability_tolerance')}"
    )


def _calibrated_line(search: dict) -> str:
    """The calibrated search's space, trials, budget and cap."""
    space = search.get("space") or {}
    axes = []
    for axis in space.get("search_space") or []:
        if axis == "learning_rate":
            lo, hi = space.get("lr_range") or [None, None]
            text = f"learning rate {lo:g}..{hi:g} (log)"
            if "lora" in (space.get("families") or []) and space.get("lora_lr_range"):
                llo, lhi = space["lora_lr_range"]
                text += f", lora {llo:g}..{lhi:g}"
            axes.append(text)
            continue
        choices = space.get(
            {"lr_scheduler_type": "scheduler_choices", "warmup_ratio": "warmup_ratio_choices"}.get(
                axis, f"{axis}_choices"
            )
        )
        axes.append(f"{axis.replace('_', ' ')} {{{', '.join(str(c) for c in choices or [])}}}")
    free = search.get("training_free") or []
    return (
        f"calibrated per family ({', '.join(space.get('families') or [])}) and per model: Optuna "
        f"{search.get('sampler', 'TPE')}, {search.get('n_trials')} trials per family and model, pruner "
        f"{search.get('pruner')}; space: {'; '.join(axes)}; budget {search.get('max_steps')} steps, runs "
        f"extended until each claim is decided (the base's up to {search.get('extend_cap'):g}x); a trial counts "
        f"only if {search.get('capability_scorer')} degrades by at most {search.get('capability_tolerance'):.0%}; "
        f"each winner re-run on {search.get('seeds')} seeds, the worst seed counts"
        + (f"; training-free, not searched: {', '.join(free)}" if free else "")
    )


def search_rows(search: dict | None) -> list[tuple[str, str]]:
    """The card's rows of a calibrated search: each family's winning settings per model, and TamperBench's
    aggregations (the worst case within the capability cap, the cumulative-max harm over the trials)."""
    if not isinstance(search, dict) or search.get("kind") != "calibrated":
        return []
    main = (search.get("sets") or {}).get("attack") or {}
    rows = []

    def setting(s: dict) -> str:
        shown = ("learning_rate", "batch_size", "optimizer", "lr_scheduler_type", "warmup_ratio", "lora_rank",
                 "harmful_share")
        return ", ".join(
            f"{k.replace('_', ' ')} {v:.3g}" if isinstance(v, float) else f"{k.replace('_', ' ')} {v}"
            for k, v in s.items()
            if k in shown
        )

    for family, rec in (main.get("families") or {}).items():
        parts = []
        for who in ("base", "immunized"):
            r = rec.get(who) or {}
            won = (main.get("winners") or {}).get(family, {}).get(who) or {}
            cum = [v for v in r.get("cumulative_max_harm") or [] if v is not None]
            parts.append(
                f"{who}: {setting(won)} ({r.get('n_trials')} trials, {r.get('n_pruned')} pruned, "
                f"{r.get('n_feasible')} within the cap; worst case within the cap "
                f"{_fmt(r.get('worst_case_within_cap'))}, cumulative-max harm {_fmt(cum[-1] if cum else None)})"
            )
        status = rec.get("status", "")
        ext = rec.get("extensions") or []
        if ext:
            status += "; extended: " + ", ".join(f"{e['model']} to {e['max_steps']} steps" for e in ext)
        rows.append((f"winner {family}", "; ".join(parts) + (f"; claim {status}" if status else "")))
    held = [k for k in (search.get("sets") or {}) if k != "attack"]
    if held:
        rows.append(
            ("generalization attack", f"{', '.join(k.replace('_', '-') for k in held)}: "
             f"{', '.join(search.get('generalization_families') or [])} with the settings searched on the "
             "resistance set, per model")
        )
    return rows


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def _setting_line(setting: dict) -> str:
    """One grid of an attack suite, for the card's threat model."""
    parts = [", ".join(setting.get("families", []))]
    if setting.get("learning_rates"):
        parts.append("lr " + ", ".join(f"{x:g}" for x in setting["learning_rates"]))
    for key, label in (
        ("optimizers", "optimizer"),
        ("lr_scheduler_types", "schedule"),
        ("lora_ranks", "rank"),
        ("harmful_shares", "harmful share"),
    ):
        if setting.get(key):
            parts.append(f"{label} " + ", ".join(str(x) for x in setting[key]))
    if setting.get("seeds"):
        parts.append("seeds " + ", ".join(str(x) for x in setting["seeds"]))
    if setting.get("max_steps"):
        parts.append(f"{setting['max_steps']} steps")
    return "; ".join(parts)


def _sweep_context(report: ImmunizationReport, folder) -> tuple[dict | None, str | None]:
    """How a sweep chose this model's setting, and its frontier plot copied into the folder."""
    sweep = report.extra.get("sweep") if isinstance(report.extra, dict) else None
    if not isinstance(sweep, dict) or "summary" not in sweep:
        return None, None
    plot = None
    source = sweep.get("plot")
    if folder is not None and source and Path(source).is_file():
        import shutil

        target = Path(folder) / "sweep_frontier.png"
        if Path(source).resolve() != target.resolve():
            shutil.copyfile(source, target)
        plot = target.name
    return {
        k: sweep.get(k) for k in ("summary", "trials", "feasible", "objective", "constraint", "params")
    }, plot


def families_run(report: ImmunizationReport) -> set[str]:
    """The attack families the report ran: its threat model's (a comma-joined list), its grid's and its
    search space's."""
    tm = report.threat_model
    ran = {f.strip() for f in (tm.attack_family or "").split(",") if f.strip()}
    ran |= set((tm.grid or {}).get("families") or [])
    space = (report.search or {}).get("space") if isinstance(report.search, dict) else None
    if isinstance(space, dict):
        ran |= set(space.get("family_choices") or [])
        ran |= set(space.get("families") or [])  # a calibrated search
    if isinstance(report.search, dict):
        ran |= set(report.search.get("training_free") or [])
    return ran


def not_tested(report: ImmunizationReport, registered_attacks: Sequence[str] = ()) -> list[str]:
    """What the report lacks, as sentences for the card's "What was NOT tested" section
    (``registered_attacks``: the attack registry's names, for the families that were not run)."""
    c, tm = report.conditions, report.threat_model
    out = []
    if c.resistance is None:
        out.append("Resistance: no attack curves were recorded.")
    if c.generalization is None or c.generalization.in_domain is None:
        out.append("No held-out in-domain attack set (in-domain generalization unmeasured).")
    if c.generalization is None or c.generalization.cross_domain is None:
        out.append("No cross-domain attack set: harm domains other than the attack data were not tested.")
    if c.stability is None:
        out.append("Stability: capability on reference sets was not measured.")
    if c.trainability is None:
        out.append("Trainability: benign fine-tuning was not measured.")
    ran = families_run(report)
    others = [f for f in sorted(registered_attacks) if f not in ran]
    if "lora" in others:
        out.append(f"No LoRA attacks (only {', '.join(sorted(ran))} were run).")
    if others:
        out.append(f"Other registered attack families: {', '.join(others)}.")
    out.append(
        "Attack families outside this library (e.g. jailbreak prompting, representation engineering, "
        "model merging, quantization) were not tested."
    )
    grid = tm.grid or {}
    lrs = grid.get("learning_rates") or []
    out.append(
        f"Attacks beyond the budget: more than {tm.max_steps} steps per run"
        + (f", learning rates above {max(lrs):g}" if lrs else "")
        + (
            f", more than {max(n for n in grid['num_samples'])} samples"
            if grid.get("num_samples") and min(grid["num_samples"]) > 0
            else ""
        )
        + "."
    )
    if len(grid.get("seeds") or []) <= 1:
        out.append("Only one seed per configuration: seed variance of the attack is unknown.")
    if tm.judge is None:
        out.append(f"No judge of generated text: harm was measured with `{tm.scorer}` only.")
    return out
