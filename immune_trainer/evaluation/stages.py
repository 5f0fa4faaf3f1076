"""The stages of an evaluation, each a function with typed inputs and outputs.

Every stage reads an :class:`EvaluationRun` (both models, the tokenizer, the datasets, the config, the
progress callback and the run cache) and returns a record of what it measured:

* :func:`side_effects_stage` -> :class:`~immune_trainer.conditions.SideEffectsResult` (stability's second
  half: refusal and harm at step 0, plainly and under jailbreak templates);
* :func:`resistance_stage` -> :class:`AttackSetResult` (the main harmful set attacked on both models, and
  phi read off the base model when the user gave none);
* :func:`generalization_stage` -> one :class:`AttackSetResult` per held-out set (in-domain, cross-domain);
* :func:`stability_stage` -> :class:`CapabilityResult` (capability g on each reference set);
* :func:`helpfulness_stage` -> :class:`~immune_trainer.conditions.HelpfulnessResult` (stability's third
  part: over-refusal of benign requests and generated exact match at step 0);
* :func:`trainability_stage` -> :class:`BenignResult` (a benign fine-tune of both models).

:func:`~immune_trainer.evaluation.evaluate_conditions` runs them in that order and hands their records to
:func:`~immune_trainer.conditions.build_report`. A new stage is one function here and one line there.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..attacks import (
    ATTACKS,
    AttackConfig,
    AttackSuite,
    HarmfulFineTuningAttack,
    model_fingerprint,
    scorer_key,
)
from ..conditions import (
    AttackCurve,
    HelpfulnessMeasurement,
    HelpfulnessResult,
    SideEffectsMeasurement,
    SideEffectsResult,
    TrainingCurve,
    compare_helpfulness,
    compare_side_effects,
)
from ..conditions.trainability import default_eps_steps, eps_note
from ..errors import ConfigError, DataError
from ..run_cache import RunCache, content_hash
from ..scoring import LMEvalTasks, get_scorer, reference_key, reference_scorer
from .attack_sets import is_search, threshold_from_base
from .config import ConditionDatasets, EvaluationConfig
from .helpfulness import AttackedHarmProbe, measure_helpfulness
from .side_effects import measure_side_effects

__all__ = [
    "AttackSetResult",
    "BenignResult",
    "CapabilityResult",
    "EvaluationRun",
    "benign_curves",
    "generalization_stage",
    "harmful_sets",
    "helpfulness_stage",
    "resistance_stage",
    "side_effects_stage",
    "stability_stage",
    "trainability_stage",
]

logger = logging.getLogger(__name__)


@dataclass
class EvaluationRun:
    """What every stage reads: the two models, the data, the config, progress and the run cache.

    ``prepare_immunized`` is an attack-time hook (``hook(model) -> model``, optionally with ``hook.measure``
    and ``hook.cache_key``; see :meth:`~immune_trainer.attacks.HarmfulFineTuningAttack.run`'s
    ``prepare_model``) that every fine-tuning of the immunized model runs with: the attacks of every
    harmful set and the benign fine-tune of trainability. The base model's runs go without it.
    """

    base_model: Any
    immunized_model: Any
    tokenizer: Any
    datasets: ConditionDatasets
    config: EvaluationConfig
    say: Callable[[str], None] = field(default=lambda message: logger.info(message))
    cache: RunCache = field(default_factory=lambda: RunCache(None))
    prepare_immunized: Callable[[Any], Any] | None = None
    after_attack: Callable[[Any], dict] | None = None
    """The ``after_attack`` hook of the attack runs (:func:`attacked_harm_probe`), on the sets
    ``config.attacked_harm_sets``; None: not measured."""
    capability_probe: Any = None
    """The :class:`~immune_trainer.attacks.CapabilityProbe` every training attack run records the attacked
    copy's capability loss with (:func:`capability_probe`); None: not tracked."""
    _fingerprints: dict[int, str] = field(default_factory=dict, repr=False)

    def models(self) -> tuple[tuple[str, Any], tuple[str, Any]]:
        return (("base", self.base_model), ("immunized", self.immunized_model))

    def prepare_model(self, who: str) -> Callable[[Any], Any] | None:
        """The attack-time hook of ``who``'s fine-tuning runs (``"base"`` or ``"immunized"``)."""
        return self.prepare_immunized if who == "immunized" else None

    def fingerprint(self, model) -> str:
        """The cache key of a model's weights, computed once per evaluation (none without a cache)."""
        if self.cache.root is None:
            return ""
        if id(model) not in self._fingerprints:
            self._fingerprints[id(model)] = model_fingerprint(model)
        return self._fingerprints[id(model)]


@dataclass
class AttackSetResult:
    """One harmful set attacked on both models, and the phi it is judged against."""

    key: str
    base: list[AttackCurve]
    immunized: list[AttackCurve]
    threshold: float
    threshold_from_base: bool
    """True when phi was read off the base model's curves on this set (no user-given threshold)."""
    searches: dict[str, Any] = field(default_factory=dict)
    """With an attack search: ``{"base": record, "immunized": record}`` of every trial."""


@dataclass
class CapabilityResult:
    """Capability g of both models on each reference set."""

    base: dict[str, float]
    immunized: dict[str, float]
    higher_is_better: dict[str, bool]
    scorers: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Each set's scorer and its settings (:func:`~immune_trainer.attacks.scorer_key`; for ``lm_eval``
    the tasks, limit and lm-eval version), recorded in the report's ``extra["capability_scorers"]``."""
    rows: dict[str, dict[str, tuple[list[float], list[int]]]] = field(default_factory=dict)
    """Per perplexity set, each model's per-row ``(row_nll, row_tokens)``, ``{set: {"base": ..., "immunized":
    ...}}``: what :func:`~immune_trainer.conditions.stability` bootstraps its interval from. A set is
    absent when its scorer gives no rows (not perplexity)."""


@dataclass
class BenignResult:
    """Both models fine-tuned on a benign task; the target and the speed window trainability uses."""

    base: TrainingCurve
    immunized: TrainingCurve
    target: float
    eps_steps: float
    notes: list[str] = field(default_factory=list)
    """For the report's notes: how the defaults (the speed window) were chosen."""


def harmful_sets(datasets: ConditionDatasets) -> dict[str, tuple[Any, Any]]:
    """The harmful (train, eval) sets to attack on: ``attack`` and any of ``in_domain``, ``cross_domain``."""
    if datasets.attack_train is None or datasets.attack_eval is None:
        raise DataError(
            "ConditionDatasets needs attack_train and attack_eval (the main resistance measurement)."
        )
    sets = {"attack": (datasets.attack_train, datasets.attack_eval)}
    for key in ("in_domain", "cross_domain"):
        train, ev = getattr(datasets, f"{key}_train"), getattr(datasets, f"{key}_eval")
        if (train is None) != (ev is None):
            raise DataError(f"give both {key}_train and {key}_eval, or neither.")
        if train is not None:
            sets[key] = (train, ev)
    return sets


# ---------------------------------------------------------------------------------------- side effects


def side_effects_stage(run: EvaluationRun, attack_scorer) -> SideEffectsResult | None:
    """Refusal and harm of both models at step 0 on the held-out harmful prompts (None without them)."""
    if run.datasets.harmful_prompts is None or not run.config.side_effects:
        return None
    se_cfg = run.config.side_effects_config()
    # One judge for the whole report: the attack's, when it is a judge and none is named.
    judge = se_cfg.judge or (attack_scorer if hasattr(attack_scorer, "judge_info") else None)
    prompts_hash = content_hash(run.datasets.harmful_prompts)
    measured = {}
    for who, model in run.models():
        run.say(f"[stability] side effects: {who} model on {len(se_cfg.templates)} jailbreak templates")
        key = {
            "model": run.fingerprint(model),
            "prompts": prompts_hash,
            "config": asdict(se_cfg),
            "judge": judge if isinstance(judge, str) or judge is None else scorer_key(judge),
        }
        measured[who] = run.cache.get_or_compute(
            "side_effects",
            key,
            lambda model=model: measure_side_effects(
                model, run.tokenizer, run.datasets.harmful_prompts, se_cfg, judge=judge
            ),
            encode=lambda m: m.to_dict(),
            decode=SideEffectsMeasurement.from_dict,
        )
    result = compare_side_effects(measured["base"], measured["immunized"], se_cfg.tolerance)
    run.say(result.summary)
    return result


# ---------------------------------------------------------------------------------------- helpfulness


def _task_rows(run: EvaluationRun):
    """The benign task's rows for the generated exact match (None: skipped)."""
    task, rows = run.datasets.benign_eval, run.config.helpfulness_task_rows
    if task is None or not rows:
        return None
    columns = getattr(task, "column_names", None) or []
    if "completion" not in columns and "messages" not in columns:
        run.say("[stability] helpfulness: benign_eval has no reference answers; generated exact match skipped")
        return None
    return task.select(range(min(rows, len(task))))


def helpfulness_stage(run: EvaluationRun) -> HelpfulnessResult | None:
    """Over-refusal of ``datasets.benign_requests`` and generated exact match on ``datasets.benign_eval``
    (its first ``helpfulness_task_rows`` rows) of both models at step 0 (None when neither is given)."""
    cfg, requests = run.config, run.datasets.benign_requests
    task = _task_rows(run) if cfg.helpfulness else None
    if not cfg.helpfulness or (requests is None and task is None):
        return None
    settings = {
        "max_new_tokens": cfg.helpfulness_max_new_tokens,
        "normalizer": cfg.helpfulness_normalizer,
    }
    data_key = {
        "requests": None if requests is None else content_hash(requests),
        "task": None if task is None else content_hash(task),
    }
    measured = {}
    for who, model in run.models():
        run.say(f"[stability] helpfulness: {who} model answers benign requests and the benign task")
        measured[who] = run.cache.get_or_compute(
            "helpfulness",
            {"model": run.fingerprint(model), **data_key, **settings},
            lambda model=model: measure_helpfulness(model, run.tokenizer, requests, task, **settings),
            encode=lambda m: m.to_dict(),
            decode=HelpfulnessMeasurement.from_dict,
        )
    result = compare_helpfulness(
        measured["base"],
        measured["immunized"],
        cfg.helpfulness_refusal_tolerance,
        cfg.helpfulness_exact_match_tolerance,
    )
    run.say(result.summary)
    return result


def capability_probe(datasets: ConditionDatasets, cfg: EvaluationConfig):
    """The probe of the attacked copies' capability (TamperBench's collapse rule): ``cfg.capability_probe_rows``
    rows of the first reference dataset (not an lm-eval task set), scored with ``cfg.capability_scorer``;
    None when there is none or the rows are 0."""
    from ..attacks import CapabilityProbe

    if cfg.capability_probe_rows <= 0 or not datasets.reference:
        return None
    ref = next((r for r in datasets.reference.values() if not isinstance(r, LMEvalTasks)), None)
    if ref is None or len(ref) == 0:
        return None
    return CapabilityProbe(ref, reference_scorer(ref, cfg.capability_scorer), rows=cfg.capability_probe_rows)


def attacked_harm_probe(datasets: ConditionDatasets, config: EvaluationConfig, tokenizer) -> AttackedHarmProbe | None:
    """The ``after_attack`` hook ``config.attacked_harm_prompts`` asks for: held-out harmful prompts
    (``datasets.harmful_prompts``, else the main attack's eval set) answered by each attacked model and
    judged by ``config.attacked_harm_judge`` (None when ``attacked_harm_prompts`` is 0)."""
    if not config.attacked_harm_prompts:
        return None
    prompts = datasets.harmful_prompts if datasets.harmful_prompts is not None else datasets.attack_eval
    return AttackedHarmProbe(
        tokenizer, prompts, judge=config.attacked_harm_judge, limit=config.attacked_harm_prompts
    )


# ---------------------------------------------------------------------------------------- resistance


def _attack_grid_set(
    run: EvaluationRun, key: str, suite: AttackSuite, step: int, phi: float | None
) -> AttackSetResult:
    """A fixed grid on one set: the base model's reference runs (phi, unless given), then the rest."""
    cfg = run.config
    train, ev = harmful_sets(run.datasets)[key]

    def attack(members, who, model, phi, phi_from_step=None):
        run.say(f"[{key}] attacking the {who} model")
        return members.run(
            model,
            run.tokenizer,
            train,
            ev,
            benign_train=run.datasets.benign_train,
            prepare_model=run.prepare_model(who),
            progress=run.say,
            stop_at_threshold=phi if cfg.early_stop else None,
            phi_from_step=phi_from_step if cfg.early_stop else None,
            after_attack=run.after_attack if key in cfg.attacked_harm_sets else None,
            capability_probe=run.capability_probe,
        ).curves

    if phi is not None:
        base = attack(suite, "base", run.base_model, phi)
        return AttackSetResult(key, base, attack(suite, "immunized", run.immunized_model, phi), phi, False)
    # phi comes from the base model's reference runs, which run their whole budget (a lone one stops once
    # it has crossed its own value); the other runs can then stop once they cross it.
    ref_families = cfg.threshold_families
    ref = suite.members(ref_families) if ref_families else suite
    if ref is None:
        raise ConfigError(
            f"threshold_families={ref_families} matches no attack of the grid "
            f"({', '.join(suite.family_names())}); name one of them or give threshold."
        )
    rest = suite.others(ref_families) if ref_families else None
    set_step = step if key == "attack" else min(step, ref.config.eval_every)
    # A lone reference run defines phi by itself (its own value at set_step): it can stop as soon as it has
    # crossed that value. Several reference runs must all run on, as phi is their median.
    lone = len(ref.attacks) == 1 and len(ref.config.grid()) == 1
    lone = lone and all(ATTACKS[f].trains for f in ref.config.family_names() if f in ATTACKS)
    base = attack(ref, "base", run.base_model, None, phi_from_step=set_step if lone else None)
    reference = [c for c in base if not ref_families or c.config.get("family") in ref_families]
    phi = threshold_from_base(reference or base, set_step)
    run.say(f"[{key}] phi = {phi:.4f}")
    if rest is not None:
        base = base + attack(rest, "base", run.base_model, phi)
    return AttackSetResult(key, base, attack(suite, "immunized", run.immunized_model, phi), phi, True)


def _searched_set(run: EvaluationRun, key: str, search, step: int, phi: float | None) -> AttackSetResult:
    """An attack search on one set, on each model; phi (unless given) is read off all the base's trials."""
    train, ev = harmful_sets(run.datasets)[key]
    curves, searches = {}, {}
    for who, model in run.models():
        run.say(f"[{key}] attacking the {who} model")
        result = search.run(
            model,
            run.tokenizer,
            train,
            ev,
            benign_train=run.datasets.benign_train,
            prepare_model=run.prepare_model(who),
            progress=run.say,
        )
        searches[who] = result.search_record()
        if not result.curves:
            raise ConfigError(
                f"[{key}] the attack on the {who} model gave no curve to judge: {result.summary()}"
            )
        curves[who] = result.curves
    derived = phi is None
    if derived:
        phi = threshold_from_base(
            curves["base"], step if key == "attack" else min(step, search.config.eval_every)
        )
    return AttackSetResult(key, curves["base"], curves["immunized"], phi, derived, searches)


def _attack_set(run: EvaluationRun, key: str, attack, step: int) -> AttackSetResult:
    # The config's threshold is the user's (None: read phi off the base model on this set).
    if is_search(attack):
        return _searched_set(run, key, attack, step, run.config.threshold)
    return _attack_grid_set(run, key, attack, step, run.config.threshold)


def resistance_stage(run: EvaluationRun, attack, step: int) -> AttackSetResult:
    """The main harmful set attacked on both models (an :class:`~immune_trainer.attacks.AttackSuite` or
    an :class:`~immune_trainer.attacks.AttackSearch`); phi is read off the base model at ``step`` unless
    the config gives it."""
    return _attack_set(run, "attack", attack, step)


def generalization_stage(run: EvaluationRun, attack, step: int) -> dict[str, AttackSetResult]:
    """The held-out in-domain and cross-domain sets attacked on both models; each set's phi is read off
    the base model on that set (a loss-based f sits at another level on other data) unless given."""
    return {key: _attack_set(run, key, attack, step) for key in harmful_sets(run.datasets) if key != "attack"}


def _capability_entry(run: EvaluationRun, key: dict[str, Any], score, wants_rows: bool) -> dict[str, Any]:
    """One model's capability on one set from the run cache, else scored and cached: ``{"value": ...}``,
    with ``row_nll`` and ``row_tokens`` when the scorer gives them (perplexity). An entry of an older
    version (a bare number) is used as is, unless rows are wanted: then the set is scored again."""
    stored = run.cache.get("capability", key)
    if isinstance(stored, dict) and "value" in stored:
        run.cache.hits += 1
        return stored
    if isinstance(stored, (int, float)) and not isinstance(stored, bool) and not wants_rows:
        run.cache.hits += 1
        return {"value": stored}
    run.cache.misses += 1
    result = score()
    entry: dict[str, Any] = {"value": result.value}
    if "row_nll" in result.details and "row_tokens" in result.details:
        entry["row_nll"] = [float(v) for v in result.details["row_nll"]]
        entry["row_tokens"] = [int(v) for v in result.details["row_tokens"]]
    run.cache.put("capability", key, entry)
    return entry


def stability_stage(run: EvaluationRun) -> CapabilityResult | None:
    """Capability g of both models on each reference set: ``config.capability_scorer`` on a dataset, the
    ``lm_eval`` scorer of its tasks on an :class:`~immune_trainer.scoring.LMEvalTasks` set."""
    if not run.datasets.reference:
        return None
    result = CapabilityResult({}, {}, {})
    default = None
    for name, ref in run.datasets.reference.items():
        if isinstance(ref, LMEvalTasks):
            scorer = reference_scorer(ref, run.config.capability_scorer)
        else:
            default = default or reference_scorer(ref, run.config.capability_scorer)
            scorer = default
        run.say(f"[stability] {scorer.name} on {name}")
        data_key = reference_key(ref)
        key = scorer_key(scorer)
        set_rows = {}
        for who, model in run.models():
            entry = _capability_entry(
                run,
                {"model": run.fingerprint(model), "data": data_key, "scorer": key},
                lambda model=model, ref=ref, scorer=scorer: scorer.score(model, run.tokenizer, ref),
                wants_rows=scorer.name == "perplexity",
            )
            getattr(result, who)[name] = entry["value"]
            if "row_nll" in entry:
                set_rows[who] = (entry["row_nll"], entry["row_tokens"])
        if len(set_rows) == 2:
            result.rows[name] = set_rows
        result.higher_is_better[name] = scorer.higher_is_better
        result.scorers[name] = key
    return result


# ---------------------------------------------------------------------------------------- trainability


def benign_curves(
    model,
    tokenizer,
    train,
    eval_data,
    attack_cfg: AttackConfig,
    cfg: EvaluationConfig,
    scorer,
    prepare_model: Callable[[Any], Any] | None = None,
) -> TrainingCurve:
    """Fine-tune a copy of ``model`` on a benign task and return its :class:`TrainingCurve`; ``prepare_model``
    is the attack-time hook the fine-tuning runs with (a security vector applies to every fine-tuning job)."""
    benign_attack = HarmfulFineTuningAttack(
        AttackConfig(
            # Trainability is plain fine-tuning: the grid's first fine-tuning family (full or lora).
            family=next((f for f in attack_cfg.family_names() if f in ("full", "lora")), "full"),
            lora_r=(attack_cfg.lora_ranks or [attack_cfg.lora_r])[0],
            learning_rates=[cfg.benign_learning_rate],
            num_samples=[0],
            seeds=[attack_cfg.seeds[0]],
            max_steps=cfg.benign_max_steps,
            eval_every=cfg.benign_eval_every,
            batch_size=attack_cfg.batch_size,
            max_length=attack_cfg.max_length,
            scorer=cfg.benign_scorer,
            output_dir=cfg.cache_dir and str(Path(cfg.cache_dir) / "benign"),
        ),
        scorer=scorer,
    )
    curve = benign_attack.run(model, tokenizer, train, eval_data, prepare_model=prepare_model).curves[0]
    return TrainingCurve(points=curve.points, scorer=scorer.name, higher_is_better=scorer.higher_is_better)


def trainability_stage(run: EvaluationRun, attack_cfg: AttackConfig) -> BenignResult | None:
    """Both models fine-tuned on the benign task with the attack's first fine-tuning family (the immunized
    model with ``run.prepare_immunized``); the target is the base model's score at half the budget and the
    speed window a quarter of it (:func:`~immune_trainer.conditions.trainability.default_eps_steps`), unless
    given."""
    ds, cfg = run.datasets, run.config
    if ds.benign_train is None or ds.benign_eval is None:
        return None
    scorer = get_scorer(cfg.benign_scorer)
    curves = {}
    for who, model in run.models():
        run.say(f"[trainability] benign fine-tuning of the {who} model")
        hook = run.prepare_model(who)
        curves[who] = benign_curves(
            model, run.tokenizer, ds.benign_train, ds.benign_eval, attack_cfg, cfg, scorer, hook
        )
    target = cfg.trainability_target
    if target is None:
        half = cfg.benign_max_steps / 2
        target = next(p.value for p in curves["base"].points if p.step >= half)
    eps = cfg.trainability_eps_steps
    notes = []
    if eps is None:
        eps = default_eps_steps(cfg.benign_max_steps)
        notes.append(eps_note(eps, cfg.benign_max_steps))
    return BenignResult(curves["base"], curves["immunized"], target, eps, notes)
