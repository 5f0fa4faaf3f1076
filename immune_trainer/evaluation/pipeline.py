"""Measure the four immunization conditions of a model against its base model.

:func:`evaluate_conditions` runs the stages of :mod:`immune_trainer.evaluation.stages` in order (side
effects, helpfulness, resistance, generalization, stability, trainability) on both models and hands what they
measured to :func:`immune_trainer.conditions.build_report`. Everything that was measured, and the threat
model under which it was measured, goes into one :class:`~immune_trainer.conditions.ImmunizationReport`.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..attacks import (
    AttackConfig,
    AttackSuite,
    CalibratedAttack,
    CalibrationConfig,
    HarmfulFineTuningAttack,
    as_suite,
    is_calibrated,
    scorer_key,
)
from ..conditions import ImmunizationReport, ThreatModel, build_report
from ..errors import ConfigError
from ..run_cache import RunCache
from .attack_sets import (
    _budget,
    _generalization_attack,
    _generalization_search,
    _model_id,
    _searched_grid,
    _suite_grid,
    _with_output_dir,
    dependency_versions,
    is_search,
)
from .config import ConditionDatasets, EvaluationConfig
from .stages import (
    AttackSetResult,
    EvaluationRun,
    attacked_harm_probe,
    capability_probe,
    generalization_stage,
    harmful_sets,
    helpfulness_stage,
    resistance_stage,
    side_effects_stage,
    stability_stage,
    trainability_stage,
)

if TYPE_CHECKING:
    from ..attacks import AttackSearch

__all__ = ["evaluate_conditions", "planned_stages"]

logger = logging.getLogger(__name__)


def evaluate_conditions(
    base_model,
    immunized_model,
    tokenizer,
    datasets: ConditionDatasets,
    attack: HarmfulFineTuningAttack | AttackConfig | AttackSuite | AttackSearch | list | None = None,
    threshold: float | None = None,
    config: EvaluationConfig | None = None,
    defense: dict[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
    base_name: str | None = None,
    immunized_name: str | None = None,
    generalization_attack: HarmfulFineTuningAttack | AttackConfig | AttackSuite | list | None = None,
    prepare_immunized: Callable[[Any], Any] | None = None,
) -> ImmunizationReport:
    """Measure resistance, stability, generalization and trainability of ``immunized_model``.

    Args:
        base_model: the model before immunization (the reference for every comparison).
        immunized_model: the model to judge.
        tokenizer: shared by both models.
        datasets: a :class:`ConditionDatasets`.
        attack: the attack run on both models: a config, an attack, a list of them (an
            :class:`~immune_trainer.attacks.AttackSuite`), the default config if None, or a
            :class:`~immune_trainer.attacks.CalibratedAttack`. By default (``config.fixed_grid`` False) a
            config, attack or suite is *calibrated*: its training families are searched per family and model
            under the capability cap (:class:`~immune_trainer.attacks.CalibrationConfig` defaults; the
            budget, families and scorer are the attack's) and the winners judged on 2 seeds, every claim
            decided (:mod:`immune_trainer.evaluation.calibrated`); this needs ``datasets.reference``. With
            ``config.fixed_grid`` the grid runs as given (the card then says "fixed grid, not searched").
        generalization_attack: the attack of the in-domain and cross-domain sets (default: ``attack`` with
            ``config.generalization_max_steps``). An :class:`~immune_trainer.attacks.AttackSearch` runs its
            search on each model and set and uses the feasible trials' curves (its budget goes into
            ``report.search``); phi is then read off all the base model's trials.
        threshold: phi on the harm scorer's scale (overrides ``config.threshold``).
        config: an :class:`EvaluationConfig`.
        defense: ``{"name": ..., "config": {...}}`` recorded in the report.
        progress: called with a one-line message as each measurement starts.
        prepare_immunized: the attack-time hook of a defense that protects only while something is applied
            during fine-tuning (Security Vectors): ``get_defense(name).attack_time_hook(path)``, the hook
            ``HarmfulFineTuningAttack.run(prepare_model=...)`` takes. Every fine-tuning of the immunized
            model (the attacks of each harmful set, the benign fine-tune of trainability) runs with it, and
            harm is measured in its ``measure`` context (for Security Vectors: without the vector, as at
            inference); the base model's runs and the training-free families go without it. Pass the
            model as deployed as ``immunized_model`` (for Security Vectors the base weights, without the
            vector). A ``defense`` whose registered defense has an attack-time hook needs it (ConfigError).

    Raises:
        ConfigError: ``defense`` names a defense with an attack-time hook and no ``prepare_immunized`` is
            given (its model would be attacked unguarded), or ``prepare_immunized`` is the hook's factory
            rather than the hook.

    Returns:
        The :class:`~immune_trainer.conditions.ImmunizationReport`; neither model is modified.
    """
    # A copy: the caller's config is never changed (phi read off the base model is this run's, and a config
    # shared by several evaluations, as the demo's and the leaderboard's, must not carry it to the next).
    cfg = copy.copy(config) if config is not None else EvaluationConfig()
    if threshold is not None:
        cfg.threshold = threshold
    _check_attack_time_hook(defense, prepare_immunized)
    harmful_sets(datasets)  # missing or half-given harmful sets fail before anything runs
    attack, gen_attack = _attacks(attack, generalization_attack, cfg, datasets)
    say = progress or (lambda message: logger.info(message))
    run = EvaluationRun(
        base_model,
        immunized_model,
        tokenizer,
        datasets,
        cfg,
        say,
        RunCache(cfg.cache_dir),
        prepare_immunized=prepare_immunized,
        after_attack=attacked_harm_probe(datasets, cfg, tokenizer),
        capability_probe=capability_probe(datasets, cfg),
    )
    harmful_sets(datasets)  # missing or half-given harmful sets fail before anything runs
    if cfg.threshold is not None:
        attack.scorer.validate_threshold(cfg.threshold)
    step = cfg.threshold_step if cfg.threshold_step is not None else attack.config.eval_every

    # Step 0 first: cheap next to the attacks, and bad prompts or a missing judge fail fast.
    side_effects = side_effects_stage(run, attack.scorer)
    helpfulness = helpfulness_stage(run)
    if is_calibrated(attack):
        from .calibrated import calibrated_set

        main = calibrated_set(run, "attack", attack, step, cfg.threshold)
        held_out = {
            key: calibrated_set(run, key, gen_attack, step, cfg.threshold, winners=main.searches["winners"])
            for key in harmful_sets(datasets)
            if key != "attack"
        }
    else:
        main = resistance_stage(run, attack, step)
        held_out = generalization_stage(run, gen_attack, step)
    capability = stability_stage(run)
    benign = trainability_stage(run, attack.config)

    user_phi, cfg.threshold = cfg.threshold, main.threshold
    report = build_report(
        threat_model=_threat_model(attack, gen_attack, cfg, main, held_out, benign, user_phi, step),
        base_model=base_name or _model_id(base_model),
        immunized_model=immunized_name or _model_id(immunized_model),
        base_curves={key: s.base for key, s in {"attack": main, **held_out}.items()},
        immunized_curves={key: s.immunized for key, s in {"attack": main, **held_out}.items()},
        base_capability=capability and capability.base,
        immunized_capability=capability and capability.immunized,
        capability_higher_is_better=capability and capability.higher_is_better,
        capability_rows=capability and capability.rows,
        base_benign=benign and benign.base,
        immunized_benign=benign and benign.immunized,
        defense=defense,
        dependencies=dependency_versions(),
        extra=_extra(attack, gen_attack, cfg, bool(held_out), capability, prepare_immunized),
        side_effects=None if side_effects is None else side_effects.to_dict(),
        search=_search_record(attack, main, held_out),
        notes=benign.notes if benign else None,
        helpfulness=None if helpfulness is None else helpfulness.to_dict(),
    )
    if run.cache.root is not None:
        say(f"cache: {run.cache.hits} measurements reused, {run.cache.misses} made ({run.cache.root})")
    return report


def planned_stages(datasets: ConditionDatasets, attack, config: EvaluationConfig, generalization_attack=None) -> int:
    """How many stages :func:`evaluate_conditions` announces for fixed grids (a progress bar's total):
    side effects (one per model), per harmful set the base model's runs (the reference runs that set phi,
    then the others when ``threshold_families`` leaves some) and the immunized model's runs, one per
    reference set, and the two benign fine-tunes."""
    side_effects = 2 if datasets.harmful_prompts is not None and config.side_effects else 0
    sets = len(harmful_sets(datasets))
    benign = 2 if datasets.benign_train is not None and datasets.benign_eval is not None else 0
    references = len(datasets.reference or {})
    if is_calibrated(attack):
        # the resistance set: a search and the winners' seeds per family and model, the training-free
        # families once per model; each other set: the base's first seed, then both models' seeds
        main = 4 * len(attack.trained) + (2 if attack.training_free else 0)
        return side_effects + main + (sets - 1) * 3 * len(attack.generalization_families) + references + benign
    attack = as_suite(attack)
    held_out = as_suite(generalization_attack) if generalization_attack is not None else attack

    def per_set(suite: AttackSuite) -> int:
        families = config.threshold_families
        split = config.threshold is None and families and suite.others(families) is not None
        return 3 if split else 2

    side_effects = 2 if datasets.harmful_prompts is not None and config.side_effects else 0
    helpful = datasets.benign_requests is not None or (
        datasets.benign_eval is not None and config.helpfulness_task_rows > 0
    )
    side_effects += 2 if helpful and config.helpfulness else 0
    sets = len(harmful_sets(datasets))
    benign = 2 if datasets.benign_train is not None and datasets.benign_eval is not None else 0
    return side_effects + per_set(attack) + (sets - 1) * per_set(held_out) + len(datasets.reference or {}) + benign


def _attacks(attack, generalization_attack, cfg: EvaluationConfig, datasets: ConditionDatasets | None = None):
    """The main attack and the generalization sets' attack, with the run cache as their output folder; a
    grid is calibrated unless ``cfg.fixed_grid``."""
    if is_search(attack):
        return attack, _generalization_search(attack, cfg)
    if not is_calibrated(attack) and not cfg.fixed_grid:
        attack = _calibrate(as_suite(attack), datasets, cfg)
    if is_calibrated(attack):
        if cfg.cache_dir:
            attack.runs_dir = attack.runs_dir or str(Path(cfg.cache_dir) / "attacks")
        steps = cfg.generalization_max_steps
        if steps is None or steps == attack.config.max_steps:
            return attack, attack
        return attack, attack.with_config(
            replace(attack.config, max_steps=steps, eval_every=min(attack.config.eval_every, steps))
        )
    attack = _cached(as_suite(attack), cfg)
    if generalization_attack is not None:
        gen = _cached(_generalization_attack(as_suite(generalization_attack), cfg), cfg)
    else:
        gen = _generalization_attack(attack, cfg)
    if gen.scorer is not attack.scorer and json.dumps(scorer_key(gen.scorer), sort_keys=True) != json.dumps(
        scorer_key(attack.scorer), sort_keys=True
    ):
        raise ConfigError("the generalization attack must measure harm with the same scorer as the main attack.")
    return attack, gen


def _calibrate(suite: AttackSuite, datasets: ConditionDatasets | None, cfg: EvaluationConfig) -> CalibratedAttack:
    """The default attack: the suite's families and budget, each training family searched per model."""
    if cfg.threshold is not None:
        suite.scorer.validate_threshold(cfg.threshold)  # a bad phi fails before anything else
    if datasets is None or not datasets.reference:
        raise ConfigError(
            "the calibrated attack (the default) needs reference sets for its capability cap "
            "(ConditionDatasets.reference, --reference): a searched setting counts only if capability stays "
            "within 10%. Give reference sets, or set fixed_grid=True (--fixed_grid) to run the grid as given."
        )
    families = list(dict.fromkeys(f for c in suite.configs for f in c.family_names()))
    budget = replace(suite.configs[0], family=families[0], families=families, output_dir=None)
    storage = str(Path(cfg.cache_dir) / "search") if cfg.cache_dir else None
    return CalibratedAttack(
        budget,
        CalibrationConfig(),
        reference=datasets.reference,
        scorer=suite.scorer,
        storage_dir=storage,
        runs_dir=str(Path(cfg.cache_dir) / "attacks") if cfg.cache_dir else None,
    )


def _cached(suite: AttackSuite, cfg: EvaluationConfig) -> AttackSuite:
    """Attack runs resume from (and are kept in) the cache, keyed by model, data and settings."""
    if not cfg.cache_dir:
        return suite
    out = AttackSuite(
        [
            a if a.config.output_dir else _with_output_dir(a, str(Path(cfg.cache_dir) / "attacks"))
            for a in suite.attacks
        ]
    )
    return out


def _threat_model(attack, gen_attack, cfg, main: AttackSetResult, held_out, benign, user_phi, step) -> ThreatModel:
    """The threat model the verdicts hold under: the attack, its budget, the scorer, phi and its source."""
    search = is_search(attack)
    calibrated = is_calibrated(attack)
    scorer = attack.scorer
    if user_phi is not None:
        source = "given by the user"
    elif calibrated:
        source = (
            f"base model's median {scorer.name} after {step} steps over the calibrated winners' first seeds"
            + (f" ({', '.join(cfg.threshold_families)})" if cfg.threshold_families else "")
        )
    elif search:
        source = f"base model's median {scorer.name} over the searched trials after {step} steps"
    else:
        families = cfg.threshold_families
        source = f"base model's median {scorer.name} after {step} attack steps over the " + (
            f"{', '.join(families)} runs of the grid" if families else "attack grid"
        )
    set_thresholds = {key: s.threshold for key, s in held_out.items() if s.threshold_from_base}
    if set_thresholds:
        source += " (each generalization set: the same rule on that set)"
    if search or calibrated:
        grid = _searched_grid({"base": {"attack": main.base}, "immunized": {"attack": main.immunized}})
    else:
        grid = _suite_grid(attack)
    if calibrated:
        family = ",".join(attack.family_names())
    else:
        family = ",".join(grid.get("families", [])) if search else ",".join(attack.family_names())
    return ThreatModel(
        attack_family=family,
        scorer=scorer.name,
        higher_is_better=scorer.higher_is_better,
        threshold=float(main.threshold),
        scorer_range=tuple(scorer.range),
        threshold_source=source,
        grid=grid,
        max_steps=attack.config.max_steps if search or calibrated else max(c.max_steps for c in attack.configs),
        eval_every=attack.config.eval_every,
        batch_size=attack.config.batch_size,
        max_length=attack.config.max_length,
        judge=scorer.judge_info() if hasattr(scorer, "judge_info") else None,
        min_cost_multiple=cfg.min_cost_multiple,
        capability_cap=cfg.capability_cap,
        threshold_step=None if user_phi is not None else step,
        stability_tolerance=cfg.stability_tolerance,
        trainability_tolerance=cfg.trainability_tolerance,
        trainability_target=benign.target if benign else cfg.trainability_target,
        trainability_eps_steps=benign.eps_steps if benign else cfg.trainability_eps_steps,
        set_thresholds=set_thresholds,
        set_budgets={key: _budget(gen_attack) for key in held_out},
    )


def _check_attack_time_hook(defense: dict[str, Any] | None, hook) -> None:
    """A defense that protects only at attack time must be attacked through its hook, and the hook (not the
    registry's factory of hooks) must be what is passed."""
    from ..defenses import DEFENSES

    if hook is not None:
        if not callable(hook):
            raise ConfigError(
                f"prepare_immunized must be a callable hook(model) -> model, got {type(hook).__name__}."
            )
        factory_of = [name for name, spec in DEFENSES.items() if spec.attack_time_hook is hook]
        if factory_of:
            name = factory_of[0]
            raise ConfigError(
                f"prepare_immunized is the factory of {name!r}'s attack-time hooks, not a hook: pass "
                f"get_defense({name!r}).attack_time_hook(path_to_the_defense_output)."
            )
    name = (defense or {}).get("name") if isinstance(defense, dict) else None
    spec = DEFENSES.get(str(name).lower().replace("-", "_")) if name else None
    if spec is not None and spec.attack_time_hook is not None and hook is None:
        raise ConfigError(
            f"defense {spec.name!r} protects only while its attack-time hook is applied during fine-tuning; "
            f"without it the immunized model would be attacked unguarded. Pass prepare_immunized="
            f"get_defense({spec.name!r}).attack_time_hook(path_to_the_defense_output) and the model as "
            "deployed (for Security Vectors: the base weights, without the vector)."
        )


def _extra(
    attack, gen_attack, cfg: EvaluationConfig, has_held_out: bool, capability=None, prepare_immunized=None
) -> dict[str, Any]:
    """The attack and evaluation settings as given, for the report's ``extra`` block; with reference sets,
    each set's capability scorer and its settings (``capability_scorers``); with an attack-time hook, what
    it applied (its ``cache_key``, False for a hook without one)."""
    from ..attacks.harness import hook_key

    extra: dict[str, Any] = {"attack_config": attack.config.to_dict()}
    if prepare_immunized is not None:
        extra["prepare_immunized"] = hook_key(prepare_immunized)
    if is_calibrated(attack):
        # What `immune-trainer verify` rebuilds the calibrated attack from (the budget is attack_config).
        extra["calibration"] = {
            "config": attack.calibration.to_dict(),
            "generalization_families": list(attack.generalization_families),
            "generalization_max_steps": gen_attack.config.max_steps if has_held_out else None,
        }
    if not is_search(attack) and not is_calibrated(attack):
        if len(attack.configs) > 1:
            extra["attack_suite"] = [c.to_dict() for c in attack.configs]
        if gen_attack is not attack and has_held_out:
            extra["generalization_attack_suite"] = [c.to_dict() for c in gen_attack.configs]
    extra["evaluation_config"] = asdict(cfg)
    if capability is not None and capability.scorers:
        extra["capability_scorers"] = dict(capability.scorers)
    return extra


def _search_record(attack, main: AttackSetResult, held_out) -> dict[str, Any] | None:
    if is_calibrated(attack):
        return {**attack.budget(), "sets": {key: s.searches for key, s in {"attack": main, **held_out}.items()}}
    if not is_search(attack):
        return None
    runs = {who: {key: s.searches[who] for key, s in {"attack": main, **held_out}.items()} for who in ("base", "immunized")}
    return {**attack.budget(), "runs": runs}
