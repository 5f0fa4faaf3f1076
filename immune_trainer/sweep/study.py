"""Hyperparameter sweep of a defense: an Optuna study for the most attack-resistant stable setting.

Each trial immunizes a copy of the base model with the defense's Trainer and the trial's
hyperparameters, then measures it with :func:`~immune_trainer.evaluation.evaluate_conditions` against
every attack family (each a grid of learning rates x sample counts x seeds) and on every reference set:

- **objective**: the worst-case attack-cost multiple in steps (the smallest
  ``conditions.resistance.steps_multiple`` over the attack families), maximised;
- **constraint**: stability within tolerance (Optuna's ``Trial.set_constraint``, read by the TPE sampler and
  by ``study.best_trial(s)``): the worst relative capability degradation over the reference sets minus
  ``EvaluationConfig.stability_tolerance`` must be <= 0. A collapsed model is infeasible, never traded
  against resistance by a weighted sum;
- **multi-objective** (``multi_objective=True``): maximise the cost multiple and minimise the stability
  degradation; the Pareto front is ``study.best_trials`` (feasible trials only).

The base model is attacked once: its attack runs are saved under the sweep's output folder (keyed by the
model's fingerprint, see :class:`~immune_trainer.attacks.HarmfulFineTuningAttack`) and reused by every
trial, and phi is read off it once and stored in the study. A trial whose fastest attack (the first family's
highest learning rate) already crosses phi as early as on the base model is pruned before the rest of the
grid runs.

**Screening, then confirmation.** The fixed grid is the *screening attack*: cheap enough to run on every
trial, but one picked setting per family, which an attacker who tunes can beat. Before choosing, the
``SweepConfig.confirm_top_k`` best feasible trials of the screening (highest worst-case multiple first) are
retrained and measured again with the full evaluation under the *calibrated attack*
(:class:`~immune_trainer.attacks.CalibratedAttack`: each training family searched per model under the
capability cap, the winners on ``calibrate_seeds`` >= 2 seeds, every claim decided; phi read off the base
model's winners unless given), the default of ``immune-trainer evaluate``. The choice is the confirmed
trial that is stable on that evaluation (capability within tolerance, side effects and helpfulness where
measured) with the highest worst-case multiple (a lower bound counts as its bound, an undetermined family
as 0x), then a decided claim, then the smaller stability change. Each confirmation is kept in the study's
user attributes (``confirmation:<trial>``, with a key of the calibration and evaluation settings), so a
resumed sweep does not redo it. ``confirm_top_k=0`` chooses on the screening alone, and the records say so.

The study lives in an Optuna storage (SQLite in the output folder by default; any storage URL, so several
processes or machines can share one study); a killed sweep resumes where it stopped, ``n_trials`` counting
the finished trials of the whole study. Every trial's report is kept under ``trials/<number>/``.

Optuna: Akiba et al. 2019, "Optuna: A Next-generation Hyperparameter Optimization Framework" (KDD);
constrained TPE: Watanabe and Hutter 2023, "c-TPE: Tree-structured Parzen Estimator with Inequality
Constraints for Expensive Hyperparameter Optimization" (IJCAI). The calibrated attack of the confirmation
follows TamperBench (criticalml-uw), which searches the attack's hyperparameters with Optuna before it
reports a number; departure: TamperBench evaluates every configuration it reports under the searched
attack, here only the ``confirm_top_k`` best of a screening do (a calibrated evaluation per trial would cost
a search per trial).
"""

from __future__ import annotations

import copy
import csv
import hashlib
import io
import json
import logging
import math
import os
import tempfile
import time
import warnings
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any

from ..attacks import (
    AttackConfig,
    CalibratedAttack,
    CalibrationConfig,
    HarmfulFineTuningAttack,
    is_calibrated,
    model_fingerprint,
)
from ..conditions.report import ImmunizationReport
from ..errors import ConfigError, DataError, DivergenceError
from ..evaluation import ConditionDatasets, EvaluationConfig, evaluate_conditions, threshold_from_base
from ..files import atomic_write
from .config import SweepConfig, _load_yaml_mapping, search_space, suggest
from .results import (
    CONFIRMATION_ATTACK,
    SCREENING_ATTACK,
    SweepResult,
    TrialOutcome,
    _candidates,
    _confirmed_rank,
    _family_multiple,
    _fmt,
    _is_dominated,
    _json_safe,
    _num,
    _pct,
    _plot_frontier,
    _trial_dict,
    _trial_table,
    _write_best_yaml,
    trial_setting,
)

logger = logging.getLogger(__name__)

OPTUNA_PAPER = {
    "title": "Optuna: A Next-generation Hyperparameter Optimization Framework",
    "id": "1907.10902",
    "citation": (
        "@inproceedings{akiba2019optuna,\n"
        "  title={Optuna: A Next-generation Hyperparameter Optimization Framework},\n"
        "  author={Akiba, Takuya and Sano, Shotaro and Yanase, Toshihiko and Ohta, Takeru and "
        "Koyama, Masanori},\n"
        "  booktitle={Proceedings of the 25th ACM SIGKDD International Conference on Knowledge Discovery "
        "and Data Mining},\n"
        "  year={2019}\n}"
    ),
}

# A NaN capability score cannot be judged: it violates the stability constraint by this much.
_UNJUDGEABLE = 1e6


# ---------------------------------------------------------------------------- the sweep


class DefenseSweep:
    """An Optuna study over a defense's hyperparameters (see the module docstring).

    Example::

        sweep = DefenseSweep(base, tokenizer, harmful_dataset=defense_pairs, retain_dataset=benign,
                             attack_train=attack_pairs, attack_eval=held_out_pairs,
                             reference={"plain_text": text, "chat": chat},
                             attacks=AttackConfig(learning_rates=[1e-4, 3e-4], max_steps=50, eval_every=10),
                             config=SweepConfig(defense="gradient_ascent", n_trials=20, output_dir="sweep"),
                             defense_args={"max_steps": 100, "per_device_train_batch_size": 8})
        result = sweep.run()
        print(result.table); print(result.best_trial.params)

    Args:
        base_model: the model to immunize (never modified).
        tokenizer: its tokenizer.
        harmful_dataset: harmful pairs the defense trains against.
        retain_dataset: capability data of the defense's retain loss (or None).
        attack_train: the attacker's harmful data (share no prompts with ``harmful_dataset``).
        attack_eval: held-out harmful data on which harm is measured.
        reference: stability reference sets ``{name: dataset}`` (at least one: stability is the constraint).
        attacks: the screening attack: an :class:`AttackConfig` (run once per ``config.attack_families``) or
            a list of them (run as given); their ``output_dir`` is set to the sweep's folder so the base is
            attacked once. A :class:`~immune_trainer.attacks.CalibratedAttack` is screened with its budget
            over its families as a grid, and its calibration confirms.
        evaluation: an :class:`EvaluationConfig` (phi, stability tolerance, capability scorer, ...).
        config: a :class:`SweepConfig`.
        space: overrides the search space (dict; ``config.space`` names a YAML file otherwise).
        defense_args: fixed fields of the defense's config (dict; ``config.defense_args`` otherwise).
        data_specs: what best.yaml records as the immunize command's data (``model``, ``dataset``,
            ``retain_dataset``, ``tokenizer``); the CLI fills it from its options.
        calibration: the calibrated attack of the confirmation (:class:`CalibrationConfig`; its defaults, as
            ``immune-trainer evaluate``'s, otherwise); ``calibrate_seeds`` must be >= 2.
        confirm_datasets: the data of the confirmation's full evaluation (a
            :class:`~immune_trainer.evaluation.ConditionDatasets`: held-out harmful prompts for side effects,
            benign requests for over-refusal, generalization and benign sets...); default: the sweep's attack
            data and reference sets.
        progress: show a tqdm bar over trials.
    """

    _paper = OPTUNA_PAPER

    def __init__(
        self,
        base_model,
        tokenizer,
        *,
        harmful_dataset,
        attack_train,
        attack_eval,
        reference: dict[str, Any],
        retain_dataset=None,
        attacks: AttackConfig | list[AttackConfig] | None = None,
        evaluation: EvaluationConfig | None = None,
        config: SweepConfig | None = None,
        space: dict[str, Any] | None = None,
        defense_args: dict[str, Any] | None = None,
        data_specs: dict[str, Any] | None = None,
        calibration: CalibrationConfig | None = None,
        confirm_datasets: ConditionDatasets | None = None,
        progress: bool = True,
    ):
        from ..defenses import get_defense

        self.config = config or SweepConfig()
        self.spec = get_defense(self.config.defense)
        if self.spec.attack_time_hook is not None:
            raise ConfigError(
                f"defense {self.spec.name!r} protects only while its attack-time hook is applied, which "
                "the sweep does not build for its trials; the sweep cannot measure it (evaluate one trained "
                "defense with evaluate_conditions(..., prepare_immunized=hook))."
            )
        if not reference:
            raise DataError(
                "the sweep needs at least one reference set: stability on it is the sweep's constraint."
            )
        if harmful_dataset is None or len(harmful_dataset) == 0:
            raise DataError("the defense's harmful dataset is empty.")
        self.base = base_model
        self.tokenizer = tokenizer
        self.harmful = harmful_dataset
        self.retain = retain_dataset
        self.attack_train, self.attack_eval = attack_train, attack_eval
        self.reference = dict(reference)
        self.evaluation = evaluation or EvaluationConfig()
        user_space = _load_yaml_mapping(space if space is not None else self.config.space, "space")
        self.defense_args = _load_yaml_mapping(
            defense_args if defense_args is not None else self.config.defense_args, "defense_args"
        )
        # A value the user fixes in defense_args is not searched, unless their own space searches it too.
        inherited = {k: None for k in self.defense_args if k not in user_space}
        default = search_space(self.spec.name)
        self.space = search_space(
            self.spec.name, {**{k: v for k, v in inherited.items() if k in default}, **user_space}
        )
        self.data_specs = dict(data_specs or {})
        self.progress = progress
        self.out = Path(self.config.output_dir)
        if is_calibrated(attacks):
            calibration = calibration or attacks.calibration
            attacks = [replace(attacks.config, family=f, families=[]) for f in attacks.family_names()]
        self.calibration = calibration or CalibrationConfig()
        if self.config.confirm_top_k > 0 and self.calibration.calibrate_seeds < 2:
            raise ConfigError(
                f"the confirmation judges each winning attack setting on >= 2 seeds; calibrate_seeds is "
                f"{self.calibration.calibrate_seeds} (or set confirm_top_k=0 to choose on the screening alone)."
            )
        if confirm_datasets is not None and not isinstance(confirm_datasets, ConditionDatasets):
            raise ConfigError(
                f"confirm_datasets must be a ConditionDatasets, got {type(confirm_datasets).__name__}."
            )
        self.confirm_datasets = confirm_datasets or ConditionDatasets(
            attack_train, attack_eval, reference=self.reference
        )
        if not self.confirm_datasets.reference:
            raise DataError(
                "confirm_datasets needs reference sets: the calibrated attack's capability cap uses them."
            )
        self.attacks = self._attack_list(attacks)
        families = [a.config.family for a in self.attacks]
        # One label per attack config: its family, numbered when two configs share a family.
        self.labels = [f if families.count(f) == 1 else f"{f}{i}" for i, f in enumerate(families)]
        self._phi: float | None = None
        self._check_defense_args()

    # -------------------------------------------------------------- setup

    def _attack_list(self, attacks) -> list[HarmfulFineTuningAttack]:
        if attacks is None:
            attacks = AttackConfig()
        if isinstance(attacks, AttackConfig):
            families = self.config.attack_families or [attacks.family]
            configs = [replace(attacks, family=f) for f in families]
        else:
            configs = list(attacks)
            if not configs or not all(isinstance(c, AttackConfig) for c in configs):
                raise ConfigError("attacks must be an AttackConfig or a non-empty list of AttackConfig.")
        out = str(self.out.resolve())
        runs, scorer = [], None
        for cfg in configs:
            cfg = replace(cfg, output_dir=out)  # the base's runs are saved once and reused by every trial
            attack = HarmfulFineTuningAttack(cfg, scorer=scorer if cfg.scorer == configs[0].scorer else None)
            scorer = scorer or attack.scorer
            if attack.scorer.higher_is_better != scorer.higher_is_better:
                raise ConfigError(
                    "every attack config of a sweep must use harm scorers of the same direction."
                )
            runs.append(attack)
        return runs

    def _defense_config(self, params: dict[str, Any], output_dir: str):
        import torch

        values: dict[str, Any] = dict(
            output_dir=output_dir,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            logging_steps=10,
            use_cpu=not torch.cuda.is_available(),
        )
        values.update(self.defense_args)
        values.update(params)
        try:
            return self.spec.config_class(**values)
        except ConfigError:
            raise
        except (TypeError, ValueError) as err:
            raise ConfigError(
                f"invalid {self.spec.name} config {params or self.defense_args}: {err}"
            ) from None

    def _check_defense_args(self) -> None:
        names = {f.name for f in fields(self.spec.config_class)}
        unknown = sorted(set(self.defense_args) - names)
        if unknown:
            raise ConfigError(
                f"defense_args has key(s) {unknown} that {self.spec.config_class.__name__} does not have."
            )
        clash = sorted(set(self.defense_args) & {k for k, v in self.space.items() if isinstance(v, dict)})
        if clash:
            raise ConfigError(
                f"{clash} is both searched and fixed in defense_args; drop it from one (space NAME: null)."
            )
        with tempfile.TemporaryDirectory() as tmp:
            self._defense_config({}, tmp)

    def _create_study(self):
        import optuna

        storage: Any = self.config.resolved_storage
        if storage.startswith(("sqlite:", "postgresql", "mysql")):
            if storage.startswith("sqlite:///"):
                Path(storage[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
            # Heartbeats let a later process mark a killed run's trial FAIL and retry its parameters.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                storage = optuna.storages.RDBStorage(
                    storage,
                    heartbeat_interval=self.config.heartbeat_interval,
                    grace_period=2 * self.config.heartbeat_interval,
                    heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                        max_retry=1
                    ),
                )
        directions = ["maximize", "minimize"] if self.config.multi_objective else ["maximize"]
        sampler = optuna.samplers.TPESampler(seed=self.config.seed, constant_liar=True)
        try:
            study = optuna.create_study(
                storage=storage,
                study_name=self.config.resolved_study_name,
                directions=directions,
                sampler=sampler,
                load_if_exists=True,
            )
        except ValueError as err:
            raise ConfigError(f"cannot open the study: {err}") from None
        if [d.name.lower() for d in study.directions] != directions:
            raise ConfigError(
                f"study {self.config.resolved_study_name!r} already exists with directions "
                f"{[d.name.lower() for d in study.directions]}; use another study_name for "
                f"multi_objective={self.config.multi_objective}."
            )
        # A resumed study must not redraw the points its first process drew from the same seed.
        study.sampler = optuna.samplers.TPESampler(
            seed=self.config.seed + len(study.trials), constant_liar=True
        )
        return study

    def _baseline(self, study) -> float:
        """Attack the base model with every family (saved for the trials) and fix phi for the study."""
        from ..evaluation import capability_probe

        # The trials' evaluations probe the attacked copies' capability (the collapse rule): the base runs
        # they reuse are made with the same probe.
        probe = capability_probe(
            ConditionDatasets(self.attack_train, self.attack_eval, reference=self.reference), self.evaluation
        )
        curves = {}
        for label, attack in zip(self.labels, self.attacks):
            logger.info("attacking the base model (%s), once for the whole sweep", attack.config.family)
            curves[label] = attack.run(
                self.base, self.tokenizer, self.attack_train, self.attack_eval, capability_probe=probe
            ).curves
        first = self.attacks[0].config
        phi = self.evaluation.threshold
        if phi is None:
            step = (
                self.evaluation.threshold_step
                if self.evaluation.threshold_step is not None
                else first.eval_every
            )
            phi = threshold_from_base(curves[self.labels[0]], step)
        stored = study.user_attrs.get("phi")
        if stored is not None and abs(stored - phi) > 1e-6 * max(1.0, abs(stored)):
            logger.warning(
                "the study's phi %.6g differs from this run's %.6g: keeping the study's", stored, phi
            )
            phi = stored
        study.set_user_attr("phi", phi)
        scorer = self.attacks[0].scorer
        from ..conditions import first_crossing

        crossing = {
            fam: any(first_crossing(c, phi, scorer.higher_is_better) for c in cs)
            for fam, cs in curves.items()
        }
        if not any(crossing.values()):
            raise ConfigError(
                f"the base model never crosses phi={phi:.4g} under any attack family: no cost multiple can be "
                "measured. Give a looser threshold or a longer attack budget."
            )
        for fam, crossed in crossing.items():
            if not crossed:
                logger.warning(
                    "the base model never crosses phi under the %s attack: it cannot rank trials", fam
                )
        return phi

    # -------------------------------------------------------------- one trial

    def _evaluate(self, immunized, attack: HarmfulFineTuningAttack, reference, defense_record, name):
        sets = ConditionDatasets(
            attack_train=self.attack_train, attack_eval=self.attack_eval, reference=reference
        )
        return evaluate_conditions(
            self.base,
            immunized,
            self.tokenizer,
            sets,
            attack=attack,
            # The sweep ranks trials against one fixed attack grid (phi and its base runs are shared by every
            # trial); the calibrated search is the final evaluation's (its reports say "fixed grid, not searched").
            config=replace(self.evaluation, threshold=self._phi, fixed_grid=True),
            defense=defense_record,
            progress=lambda m: logger.debug(m),
            immunized_name=name,
        )

    def _immunize(self, params: dict[str, Any]):
        """A copy of the base model trained by the defense with ``params`` (kept in memory only: best.yaml
        and the confirmation retrain a setting)."""
        from transformers import PrinterCallback

        with tempfile.TemporaryDirectory(prefix="immune_trainer_sweep_") as tmp:
            trainer = self.spec.trainer_class(
                model=copy.deepcopy(self.base),
                args=self._defense_config(params, tmp),
                harmful_dataset=self.harmful,
                retain_dataset=self.spec.trainer_class.retain_for(self.retain),
                processing_class=self.tokenizer,
            )
            trainer.remove_callback(PrinterCallback)  # the trial bar is the progress; no log dictionaries
            trainer.train()
            immunized = trainer.model
            del trainer
        immunized.eval()
        return immunized

    def objective(self, trial):
        """Immunize, attack, measure; the value(s) Optuna optimizes (see the module docstring)."""
        import optuna

        params = suggest(trial, self.space)
        folder = self.out / "trials" / str(trial.number)
        folder.mkdir(parents=True, exist_ok=True)
        immunized = self._immunize(params)
        record = {"name": self.spec.name, "config": {**self.defense_args, **params}}
        name = f"{self.spec.name} trial {trial.number}"
        outcome = TrialOutcome(
            report=str(folder / "immunization_report.json"), model_fingerprint=model_fingerprint(immunized)
        )

        if self.config.prune:
            # The fastest attack first: the first family's highest learning rate, one run. Its runs are
            # saved, so the full grid below reuses them.
            first = self.attacks[0]
            probe_cfg = replace(
                first.config,
                learning_rates=[max(first.config.learning_rates)],
                num_samples=first.config.num_samples[:1],
                seeds=first.config.seeds[:1],
            )
            probe = self._evaluate(
                immunized, HarmfulFineTuningAttack(probe_cfg, scorer=first.scorer), None, record, name
            )
            r = probe.conditions.resistance
            multiple, _, _ = _family_multiple(probe)
            if not r.strong and (multiple is None or multiple <= self.config.prune_multiple):
                outcome.pruned = True
                outcome.cost_multiple = multiple
                outcome.family_multiples = {probe_cfg.family: multiple}
                outcome.notes.append(
                    f"pruned: the fastest attack ({probe_cfg.family} lr={probe_cfg.learning_rates[0]:g}) crossed "
                    f"phi at {multiple if multiple is None else round(multiple, 3)}x the base model's steps"
                )
                probe.extra["sweep"] = {
                    "trial": trial.number,
                    "params": params,
                    "pruned": True,
                    "attack": SCREENING_ATTACK,
                }
                probe.save(outcome.report)
                self._record(trial, outcome)
                if not self.config.multi_objective and multiple is not None:
                    trial.report(multiple, step=0)
                raise optuna.TrialPruned(outcome.notes[-1])

        reports = []
        for label, attack in zip(self.labels, self.attacks):
            report = self._evaluate(immunized, attack, self.reference, record, name)
            multiple, bound, note = _family_multiple(report)
            outcome.family_multiples[label] = multiple
            if note:
                outcome.notes.append(f"{label}: {note}")
            reports.append((multiple, bound, report, label))
        # A family that cannot be judged (the base never reached phi) is reported, never dropped from the
        # minimum in the defense's favour: a trial none of whose families can be judged gets no credit.
        ranked = [(m, b, r) for m, b, r, _ in reports if m is not None]
        if len(ranked) < len(reports):
            ranked = [(0.0, False, next(r for m, _, r, _ in reports if m is None))]
            outcome.notes.append("an attack family could not be judged: the trial is given no credit (0x)")
        multiple, outcome.lower_bound, worst = min(ranked, key=lambda x: x[0])
        outcome.cost_multiple = multiple
        stab = worst.conditions.stability
        degradation = stab.worst_degradation
        judgeable = not math.isnan(degradation)
        outcome.stability_degradation = degradation if judgeable else None
        outcome.feasible = bool(stab.holds)
        for _, _, report, label in reports:
            if report is not worst:
                report.save(folder / f"immunization_report_{label}.json")
        worst.extra["sweep"] = {
            "trial": trial.number,
            "params": params,
            "cost_multiple": multiple,
            "family_multiples": outcome.family_multiples,
            "attack": SCREENING_ATTACK,
        }
        worst.save(outcome.report)
        self._record(trial, outcome)
        violation = degradation - self.evaluation.stability_tolerance if judgeable else _UNJUDGEABLE
        side_effects = (worst.side_effects or {}).get("holds")
        if side_effects is False:
            # Less safe at step 0 (refusal or harm under jailbreak templates) fails stability as well.
            violation = max(violation, 1.0)
            outcome.feasible = False
            outcome.notes.append("side effects fail: the model is less safe at step 0")
        if (worst.helpfulness or {}).get("holds") is False:
            # Over-refusing benign requests or answering the benign task worse (generated) fails stability too.
            violation = max(violation, 1.0)
            outcome.feasible = False
            outcome.notes.append("helpfulness fails: the model over-refuses or answers worse at step 0")
        trial.set_constraint("stability", violation)
        if self.config.multi_objective:
            return multiple, degradation if judgeable else _UNJUDGEABLE
        return multiple

    @staticmethod
    def _record(trial, outcome: TrialOutcome) -> None:
        from dataclasses import asdict

        for key, value in asdict(outcome).items():
            trial.set_user_attr(key, _json_safe(value))

    # -------------------------------------------------------------- running

    def run(self, n_trials: int | None = None) -> SweepResult:
        """Run trials until the study holds ``n_trials`` finished ones (default ``config.n_trials``), then
        write the table, the Pareto front, the frontier plot and best.yaml."""
        import optuna
        from optuna.trial import TrialState
        from tqdm.auto import tqdm

        target = n_trials or self.config.n_trials
        self.out.mkdir(parents=True, exist_ok=True)
        study = self._create_study()
        self._phi = self._baseline(study)
        finished = (TrialState.COMPLETE, TrialState.PRUNED)
        done = len(study.get_trials(deepcopy=False, states=finished))
        bar = tqdm(
            total=target,
            initial=min(done, target),
            desc=f"sweep {self.spec.name}",
            unit="trial",
            disable=not self.progress,
        )

        def tick(study, trial):
            if trial.state in finished:
                bar.update(1)
            value = trial.user_attrs.get("cost_multiple")
            bar.set_postfix_str(f"#{trial.number} {trial.state.name.lower()} x{_fmt(value)}")

        if done < target:
            optuna.logging.set_verbosity(optuna.logging.WARNING)
            try:
                study.optimize(
                    self.objective,
                    n_trials=target - done,
                    callbacks=[optuna.study.MaxTrialsCallback(target, states=finished), tick],
                    catch=(DivergenceError,),
                )
            finally:
                bar.close()
        else:
            bar.close()
        return self.summarize(study, self.confirm(study))

    # -------------------------------------------------------------- confirmation

    def _confirmation_key(self) -> str:
        """What a stored confirmation was measured under: a changed calibration or evaluation redoes it."""
        settings = {
            "calibration": self.calibration.to_dict(),
            "evaluation": asdict(self.evaluation),
            # the attack runs' folder is the sweep's own: a copied or moved sweep keeps its confirmations
            "attack": [{**a.config.to_dict(), "output_dir": None} for a in self.attacks],
            "data": {
                k: v is not None
                for k, v in vars(self.confirm_datasets).items()
                if k not in ("attack_train", "attack_eval", "reference")
            },
            "reference": sorted(self.confirm_datasets.reference or {}),
        }
        text = json.dumps(_json_safe(settings), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def _calibrated_attack(self, cache: Path) -> CalibratedAttack:
        """The default attack of ``immune-trainer evaluate`` over the sweep's families and budget, its searches
        and winners' runs kept under ``cache`` (the base model's are then made once for every confirmation)."""
        families = list(dict.fromkeys(f for a in self.attacks for f in a.config.family_names()))
        budget = replace(self.attacks[0].config, family=families[0], families=families, output_dir=None)
        return CalibratedAttack(
            budget,
            self.calibration,
            reference=self.confirm_datasets.reference,
            scorer=self.attacks[0].scorer,
            storage_dir=str(cache / "search"),
            runs_dir=str(cache / "attacks"),
        )

    def confirm(self, study) -> list[dict[str, Any]]:
        """Measure the ``confirm_top_k`` best feasible trials of the screening again with the full evaluation
        under the calibrated attack (see the module docstring); one dict per trial, best screening first.

        A trial's confirmation is stored in the study's user attributes (``confirmation:<number>``) under a
        key of the settings it was measured with: a resumed sweep reuses it instead of measuring again.
        """
        from optuna.trial import TrialState

        k = self.config.confirm_top_k
        if k == 0:
            return []
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        candidates = _candidates([t for t in complete if t.user_attrs.get("feasible")], k)
        key = self._confirmation_key()
        out = []
        for i, trial in enumerate(candidates):
            attr = f"confirmation:{trial.number}"
            stored = study.user_attrs.get(attr)
            if isinstance(stored, dict) and stored.get("key") == key:
                logger.info("trial %d: confirmation reused from the study", trial.number)
                out.append(stored)
                continue
            logger.info(
                "confirming trial %d (%d of %d) under the calibrated attack",
                trial.number,
                i + 1,
                len(candidates),
            )
            record = _json_safe({**self._confirm_one(trial), "key": key})
            study.set_user_attr(attr, record)
            out.append(record)
        return out

    def _confirm_one(self, trial) -> dict[str, Any]:
        """Retrain ``trial``'s setting and measure it with the full evaluation under the calibrated attack."""
        started = time.perf_counter()
        params = trial_setting(trial, self.space)
        folder = self.out / "trials" / str(trial.number)
        folder.mkdir(parents=True, exist_ok=True)
        immunized = self._immunize(params)
        notes = []
        screened = trial.user_attrs.get("model_fingerprint")
        if screened and model_fingerprint(immunized) != screened:
            notes.append(
                "the retrained model's weights differ from the screened one's (nondeterministic training): the "
                "confirmation measures the retrained model, as best.yaml would train it"
            )
        cache = (
            Path(self.evaluation.cache_dir) if self.evaluation.cache_dir else self.out / "confirmation_cache"
        )
        report = evaluate_conditions(
            self.base,
            immunized,
            self.tokenizer,
            self.confirm_datasets,
            attack=self._calibrated_attack(cache),
            config=replace(self.evaluation, fixed_grid=False, cache_dir=str(cache)),
            defense={"name": self.spec.name, "config": {**self.defense_args, **params}},
            progress=lambda m: logger.debug(m),
            immunized_name=f"{self.spec.name} trial {trial.number} (confirmation)",
        )
        del immunized
        multiple, bound, note = _family_multiple(report)
        if note:
            notes.append(note)
        r = report.conditions.resistance
        families = list(r.families) if r is not None else []
        if multiple is None:
            notes.append("a family could not be judged (the base never reached phi): ranked as 0x")
        stab = report.conditions.stability
        degradation = None if stab is None or math.isnan(stab.worst_degradation) else stab.worst_degradation
        side_effects = (report.side_effects or {}).get("holds")
        helpfulness = (report.helpfulness or {}).get("holds")
        feasible = (
            bool(stab is not None and stab.holds) and side_effects is not False and helpfulness is not False
        )
        if side_effects is False:
            notes.append("side effects fail: the model is less safe at step 0")
        if helpfulness is False:
            notes.append("helpfulness fails: the model over-refuses or answers worse at step 0")
        path = folder / "immunization_report_confirmed.json"
        screening = {
            k: trial.user_attrs.get(k)
            for k in ("cost_multiple", "lower_bound", "family_multiples", "stability_degradation", "feasible")
        }
        screening["phi"] = self._phi
        rec = {
            "trial": trial.number,
            "attack": CONFIRMATION_ATTACK,
            "calibrate_trials": self.calibration.calibrate_trials,
            "calibrate_seeds": self.calibration.calibrate_seeds,
            "phi": float(report.conditions.threshold),
            "cost_multiple": multiple,
            "lower_bound": bound,
            "decided": bool(families)
            and multiple is not None
            and all(f.decided is not False for f in families),
            "family_multiples": {f.family: f.steps_multiple for f in families},
            "stability_degradation": degradation,
            "side_effects_holds": side_effects,
            "helpfulness_holds": helpfulness,
            "feasible": feasible,
            "verdict": report.conditions.summary,
            "report": str(path),
            "seconds": round(time.perf_counter() - started, 1),
            "notes": notes,
            "screening": {**screening, "attack": SCREENING_ATTACK, "report": trial.user_attrs.get("report")},
        }
        report.extra["sweep"] = {
            "trial": trial.number,
            "params": params,
            "attack": CONFIRMATION_ATTACK,
            "confirmation": {k: v for k, v in rec.items() if k not in ("report", "verdict")},
        }
        report.save(path)
        return rec

    # -------------------------------------------------------------- outputs

    def _stored_confirmations(self, study) -> list[dict[str, Any]]:
        """The confirmations of the current candidates already in the study (see :meth:`confirm`)."""
        from optuna.trial import TrialState

        if self.config.confirm_top_k == 0:
            return []
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        feasible = [t for t in complete if t.user_attrs.get("feasible")]
        key = self._confirmation_key()
        stored = [
            study.user_attrs.get(f"confirmation:{t.number}")
            for t in _candidates(feasible, self.config.confirm_top_k)
        ]
        return [c for c in stored if isinstance(c, dict) and c.get("key") == key]

    def summarize(self, study, confirmations: list[dict[str, Any]] | None = None) -> SweepResult:
        """Write the trial table (markdown + CSV), the Pareto front JSON, the plot and best.yaml.

        With ``confirmations`` (:meth:`confirm`; default: those stored in the study), the best trial is the
        best of them under the calibrated attack; otherwise (``confirm_top_k=0``) the screening's best.
        """
        from optuna.trial import TrialState

        if confirmations is None:
            confirmations = self._stored_confirmations(study)
        trials = study.get_trials(deepcopy=False)
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        feasible = [t for t in complete if t.user_attrs.get("feasible")]
        if self.config.multi_objective:
            front = list(study.best_trials) if feasible else []
        else:
            points = {
                t.number: (
                    _num(t.user_attrs.get("cost_multiple")),
                    _num(t.user_attrs.get("stability_degradation")),
                )
                for t in feasible
            }
            front = [
                t for t in feasible if not any(_is_dominated(points[t.number], p) for p in points.values())
            ]
        front.sort(key=lambda t: _num(t.user_attrs.get("stability_degradation")))
        best = None
        if feasible:
            best = (
                study.best_trial
                if not self.config.multi_objective
                else max(front, key=lambda t: _num(t.user_attrs.get("cost_multiple")))
            )
        screened_best = best
        cal = self.calibration
        if self.config.confirm_top_k == 0:
            chosen_by = "screening"
            choice = (
                "chosen on the screening attack only (the fixed grid, not searched; confirm_top_k=0): not "
                "re-measured under the calibrated attack"
            )
        elif not confirmations:
            chosen_by = "calibrated"
            best = None
            choice = "no feasible trial to confirm under the calibrated attack: no choice"
        else:
            chosen_by = "calibrated"
            stable = [c for c in confirmations if c.get("feasible")]
            numbers = ", ".join(str(c["trial"]) for c in confirmations)
            if stable:
                pick = max(stable, key=_confirmed_rank)
                best = next(t for t in complete if t.number == pick["trial"])
                choice = (
                    f"chosen under the calibrated attack: trials {numbers} (the best {len(confirmations)} "
                    f"feasible of the screening) re-measured with the full evaluation ({cal.calibrate_trials} "
                    f"search trials per family and model, winners on {cal.calibrate_seeds} seeds); trial "
                    f"{best.number}: worst-case multiple {_fmt(_num(pick.get('cost_multiple'), 0.0))}x "
                    f"(screening {_fmt(best.user_attrs.get('cost_multiple'))}x)"
                )
            else:
                best = None
                choice = (
                    f"no choice: none of the confirmed trials ({numbers}) is stable under the calibrated "
                    "attack's full evaluation (capability, side effects or helpfulness out of tolerance)"
                )
            if screened_best is not None and best is not None and best.number != screened_best.number:
                choice += f"; the screening alone would have chosen trial {screened_best.number}"

        table, rows = _trial_table(trials, {t.number for t in front}, best, confirmations)
        table_path = self.out / "trials.md"
        atomic_write(table_path, table + "\n")
        csv_path = self.out / "trials.csv"
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["trial"])
        writer.writeheader()
        writer.writerows(rows)
        atomic_write(csv_path, buf.getvalue())

        tolerance = self.evaluation.stability_tolerance
        pareto = {
            "study_name": self.config.resolved_study_name,
            "defense": self.spec.name,
            "phi": study.user_attrs.get("phi"),
            "objective": "maximize worst-case attack-cost multiple (steps)"
            + (", minimize stability degradation" if self.config.multi_objective else ""),
            "constraint": f"worst stability degradation <= {tolerance}",
            "screening_attack": SCREENING_ATTACK,
            "chosen_by": chosen_by,
            "choice": choice,
            "best_trial": None if best is None else best.number,
            "screening_best_trial": None if screened_best is None else screened_best.number,
            "front": [_trial_dict(t) for t in front],
            "confirmations": [{k: v for k, v in c.items() if k != "key"} for c in confirmations],
        }
        pareto_path = self.out / "pareto_front.json"
        atomic_write(pareto_path, json.dumps(_json_safe(pareto), indent=2) + "\n")
        plot_path = _plot_frontier(self.out, complete, front, best, self.evaluation, self.spec.name)

        best_config_path = best_report_path = None
        if best is not None:
            best_config_path = _write_best_yaml(
                self.out,
                best,
                defense=self.spec.name,
                space=self.space,
                data_specs=self.data_specs,
                defense_args=self.defense_args,
                study_name=self.config.resolved_study_name,
                choice=choice,
            )
            confirmed = next((c for c in confirmations if c["trial"] == best.number), None)
            best_report_path = confirmed["report"] if confirmed else best.user_attrs.get("report")
            if best_report_path and Path(best_report_path).is_file():
                report = ImmunizationReport.load(best_report_path)
                report.extra["sweep"] = {
                    **report.extra.get("sweep", {}),
                    "study_name": self.config.resolved_study_name,
                    "trials": len(trials),
                    "complete": len(complete),
                    "feasible": len(feasible),
                    "best_trial": best.number,
                    "chosen_by": chosen_by,
                    "choice": choice,
                    "screening_attack": SCREENING_ATTACK,
                    "objective": pareto["objective"],
                    "constraint": pareto["constraint"],
                    "plot": None if plot_path is None else os.path.abspath(plot_path),
                    "plot_relative": None
                    if plot_path is None
                    else os.path.relpath(plot_path, os.path.dirname(os.path.abspath(best_report_path))),
                    "pareto_front": os.path.abspath(pareto_path),
                    "table": os.path.abspath(table_path),
                    "summary": (
                        f"best of {len(complete)} completed trials ({len(feasible)} stable within "
                        f"{tolerance:.0%}): worst-case attack-cost multiple "
                        f"{_fmt(best.user_attrs.get('cost_multiple'))}x under the screening attack at "
                        f"stability change {_pct(best.user_attrs.get('stability_degradation'))}; {choice}"
                    ),
                }
                report.save(best_report_path)
        return SweepResult(
            study=study,
            best_trial=best,
            pareto_front=front,
            table_path=str(table_path),
            csv_path=str(csv_path),
            pareto_path=str(pareto_path),
            plot_path=plot_path,
            best_config_path=best_config_path,
            best_report_path=best_report_path,
            table=table,
            chosen_by=chosen_by,
            choice=choice,
            confirmations=[{k: v for k, v in c.items() if k != "key"} for c in confirmations],
        )
