"""Every defense on the same model and data, under the same attack: :func:`run_leaderboard`.

For each named defense (every registered one by default) the leaderboard trains it on a copy of the base
model, measures it with :func:`~immune_trainer.evaluation.evaluate_conditions` against the SAME attack
(the evaluation's default attack unless one is given: one attacker for every defense, never a setting
picked per defense), writes its report under ``output_dir/<defense>/`` and ranks the reports with
:func:`~immune_trainer.conditions.leaderboard_from_reports` (markdown, CSV and the heatmap of
``immune-trainer compare``).

It is resumable: a defense whose report is already in ``output_dir`` with the same leaderboard key
(defense, its arguments, the base model's weights and the data) is read back, not trained again, so a
killed run picks up where it stopped. With ``sweep_trials > 0`` each defense is first tuned by
:class:`~immune_trainer.sweep.DefenseSweep` (its Optuna storage: SQLite under the defense's folder, or
any RDB URL shared by many machines, ``sweep_storage``) and the best feasible trial's settings are the
ones evaluated.

``immune-trainer leaderboard`` runs it on the embedded default (SmolLM2-135M-Instruct and its data, the
demo's budgets) or ranks reports that exist already (``--reports``).
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from .conditions import ImmunizationReport
from .conditions.leaderboard import Leaderboard, leaderboard_from_reports
from .errors import ConfigError, DataError
from .files import atomic_write

__all__ = ["run_leaderboard"]

logger = logging.getLogger(__name__)


def _key(spec, args: dict[str, Any], base_fingerprint: str, data_hash: str) -> dict[str, Any]:
    where = ("output_dir", "logging_dir", "run_name", "hub_token")
    return {
        "defense": spec.name,
        "args": {k: v for k, v in sorted(args.items()) if k not in where},
        "base": base_fingerprint,
        "data": data_hash,
    }


def _describe(attack) -> Any:
    """What an attack argument is, for the resume key (a config, a suite, a search or a list of them)."""
    if attack is None:
        return None
    if isinstance(attack, (list, tuple)):
        return [_describe(a) for a in attack]
    if hasattr(attack, "budget"):  # an AttackSearch or a CalibratedAttack: its budget and the attack it tunes
        config = getattr(attack, "config", None)  # (a calibration's budget omits steps, batch, length...)
        return {"budget": attack.budget(), "config": config.to_dict() if hasattr(config, "to_dict") else None}
    if hasattr(attack, "attacks"):  # an AttackSuite
        return [_describe(a) for a in attack.attacks]
    config = getattr(attack, "config", attack)
    return config.to_dict() if hasattr(config, "to_dict") else repr(config)


def _json_key(key: dict[str, Any]) -> str:
    return json.dumps(key, sort_keys=True, default=str)


def run_leaderboard(
    base_model,
    tokenizer,
    *,
    harmful_dataset,
    datasets,
    retain_dataset=None,
    defenses: Sequence[str] | None = None,
    defense_args: dict[str, Any] | None = None,
    per_defense_args: dict[str, dict[str, Any]] | None = None,
    attack=None,
    generalization_attack=None,
    evaluation=None,
    output_dir: str = "leaderboard",
    sweep_trials: int = 0,
    sweep_storage: str | None = None,
    progress: Callable[[str], None] | None = None,
    record: dict[str, Any] | None = None,
    base_name: str | None = None,
) -> Leaderboard:
    """Train, measure and rank every defense of ``defenses`` (see the module docstring).

    Args:
        base_model, tokenizer: the model every defense starts from (never modified).
        harmful_dataset: the defender's harmful pairs; ``retain_dataset`` its benign retain data.
        datasets: a :class:`~immune_trainer.evaluation.ConditionDatasets` (the same for every defense).
        defenses: registered defense names (default: every registered defense).
        defense_args: config fields every defense gets (budget: ``max_steps``, ``learning_rate``,
            ``per_device_train_batch_size``, ...); fields a defense's config lacks are skipped.
        per_defense_args: ``{defense: {field: value}}`` on top of ``defense_args``.
        attack, generalization_attack, evaluation: as for
            :func:`~immune_trainer.evaluation.evaluate_conditions`; one attack for every defense.
        output_dir: one folder per defense (its report and model) and the leaderboard's tables.
        sweep_trials: tune each defense with this many :class:`~immune_trainer.sweep.DefenseSweep` trials
            first (0: the defense's own defaults with ``defense_args``).
        sweep_storage: the sweeps' Optuna storage URL (default: SQLite in each defense's folder).
        progress: called with one-line messages.
        record: the SPECs ``datasets`` was built from (:mod:`immune_trainer.evaluation.recorded`), kept as
            each report's ``datasets`` so that ``immune-trainer verify`` rebuilds the same rows.
        base_name: the base model's name or path, recorded in each report.
    """
    from .attacks import model_fingerprint
    from .defenses import get_defense, list_defenses
    from .evaluation import EvaluationConfig, evaluate_conditions
    from .run_cache import content_hash

    say = progress or (lambda message: logger.info(message))
    names = list(defenses) if defenses else list_defenses()
    if not names:
        raise ConfigError("no defense to rank: name at least one (immune-trainer defenses lists them).")
    specs = [get_defense(n) for n in names]  # unknown names fail before any training
    if len(set(names)) != len(names):
        raise ConfigError(f"a defense is named twice in {names}.")
    if harmful_dataset is None or len(harmful_dataset) == 0:
        raise DataError("the defenses' harmful dataset is empty.")
    per_defense_args = dict(per_defense_args or {})
    unknown = sorted(set(per_defense_args) - set(names))
    if unknown:
        raise ConfigError(f"per_defense_args names defenses not in the leaderboard: {', '.join(unknown)}.")
    evaluation = evaluation or EvaluationConfig()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    base_fp = model_fingerprint(base_model)
    data_hash = content_hash(
        [
            content_hash(harmful_dataset),
            "" if retain_dataset is None else content_hash(retain_dataset),
            content_hash(datasets.attack_train),
            content_hash(datasets.attack_eval),
        ]
    )
    reports = []
    for spec in specs:
        folder = out / spec.name
        args = {**dict(defense_args or {}), **per_defense_args.get(spec.name, {})}
        key = _key(spec, args, base_fp, data_hash) | {
            "sweep_trials": sweep_trials,
            "attack": _describe(attack),
            "generalization_attack": _describe(generalization_attack),
            "evaluation": asdict(evaluation),
        }
        report_path = folder / "immunization_report.json"
        if report_path.exists():
            try:
                old = ImmunizationReport.load(report_path)
            except Exception:  # an unreadable report is measured again, never trusted
                old = None
            if old is not None and _json_key(old.extra.get("leaderboard", {}).get("key", {})) == _json_key(key):
                say(f"[leaderboard] {spec.name}: reusing {report_path}")
                reports.append(report_path)
                continue
        say(f"[leaderboard] {spec.name}: training")
        t0 = time.perf_counter()
        chosen = dict(args)
        if sweep_trials > 0:
            chosen.update(
                _tune(spec, base_model, tokenizer, harmful_dataset, retain_dataset, datasets, attack,
                      evaluation, args, folder, sweep_trials, sweep_storage)
            )
        config = _defense_config(spec, chosen, folder / "model")
        immunized = copy.deepcopy(base_model)
        trainer = spec.trainer_class(
            model=immunized,
            args=config,
            harmful_dataset=harmful_dataset,
            retain_dataset=spec.trainer_class.retain_for(retain_dataset),
            processing_class=tokenizer,
        )
        trainer.train()
        trainer.save_model(str(folder / "model"))
        defense_s = time.perf_counter() - t0
        immunized.eval()
        hook = spec.attack_time_hook(str(folder / "model")) if spec.attack_time_hook is not None else None
        say(f"[leaderboard] {spec.name}: measuring the four conditions")
        t1 = time.perf_counter()
        report = evaluate_conditions(
            base_model,
            base_model if hook is not None else immunized,
            tokenizer,
            datasets,
            attack=attack,
            generalization_attack=generalization_attack,
            config=evaluation,
            defense={"name": spec.name, "config": _jsonable(chosen)},
            progress=say,
            prepare_immunized=hook,
            base_name=base_name,
        )
        if record is not None:
            report.datasets = dict(record)
        report.extra["leaderboard"] = {
            "key": key,
            "defense_s": defense_s,
            "evaluation_s": time.perf_counter() - t1,
            "settings": _jsonable(chosen),
        }
        report.save(report_path)
        reports.append(report_path)
        say(f"[leaderboard] {spec.name}: {report.conditions.summary}")
    board = leaderboard_from_reports(reports)
    board.save(out)
    atomic_write(out / "leaderboard.json", json.dumps({"reports": [str(p) for p in reports]}, indent=2))
    return board


def _jsonable(values: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(values, default=str))


def _defense_config(spec, values: dict[str, Any], output_dir: Path):
    names = {f.name for f in fields(spec.config_class)}
    unknown = sorted(k for k in values if k not in names)
    if unknown:
        logger.info("%s has no option %s: not set", spec.name, ", ".join(unknown))
    base = dict(save_strategy="no", report_to="none", disable_tqdm=True)
    chosen = {k: v for k, v in {**base, **values}.items() if k in names}
    return spec.config_class(output_dir=str(output_dir), **chosen)


def _tune(spec, base, tokenizer, harmful, retain, datasets, attack, evaluation, args, folder, trials, storage):
    """The best feasible setting of a :class:`~immune_trainer.sweep.DefenseSweep` of ``trials`` trials."""
    from .sweep import DefenseSweep, SweepConfig

    if spec.attack_time_hook is not None:
        raise ConfigError(
            f"defense {spec.name!r} protects only with its attack-time hook, which the sweep cannot apply: "
            "rank it untuned (sweep_trials=0) or leave it out."
        )
    if not datasets.reference:
        raise DataError("tuning a defense needs a stability reference set (ConditionDatasets.reference).")
    sweep = DefenseSweep(
        base,
        tokenizer,
        harmful_dataset=harmful,
        retain_dataset=retain,
        attack_train=datasets.attack_train,
        attack_eval=datasets.attack_eval,
        reference=dict(datasets.reference),
        attacks=attack if attack is not None else None,
        evaluation=evaluation,
        config=SweepConfig(
            defense=spec.name, n_trials=trials, output_dir=str(folder / "sweep"), storage=storage
        ),
        defense_args={k: v for k, v in args.items()},
        progress=False,
    )
    result = sweep.run()
    best = result.best_trial
    if best is None:
        raise ConfigError(
            f"the sweep of {spec.name} found no feasible setting in {trials} trials (every trial broke "
            "stability): raise sweep_trials or rank it untuned."
        )
    return dict(best.params)
