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

The study lives in an Optuna storage (SQLite in the output folder by default; any storage URL, so several
processes or machines can share one study); a killed sweep resumes where it stopped, ``n_trials`` counting
the finished trials of the whole study. Every trial's report is kept under ``trials/<number>/``.

Optuna: Akiba et al. 2019, "Optuna: A Next-generation Hyperparameter Optimization Framework" (KDD);
constrained TPE: Watanabe and Hutter 2023, "c-TPE: Tree-structured Parzen Estimator with Inequality
Constraints for Expensive Hyperparameter Optimization" (IJCAI).
"""

from __future__ import annotations

import copy
import csv
import io
import json
import logging
import math
import os
import tempfile
import warnings
from dataclasses import MISSING, dataclass, field, fields, make_dataclass, replace
from pathlib import Path
from typing import Any

from .attacks import AttackConfig, HarmfulFineTuningAttack
from .errors import ConfigError, DataError, DivergenceError
from .evaluation import ConditionDatasets, EvaluationConfig, evaluate_conditions, threshold_from_base
from .report import ImmunizationReport, atomic_write

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

SPACE_TYPES = ("float", "int", "categorical")

# Used until a defense's config declares ``search_space()``: ranges around each paper's defaults.
_LR = {"type": "float", "low": 1e-5, "high": 1e-3, "log": True}
FALLBACK_SPACES: dict[str, dict[str, Any]] = {
    "gradient_ascent": {
        "alpha": {"type": "float", "low": 0.25, "high": 4.0, "log": True},
        "learning_rate": _LR,
        "retain_weight": {"type": "float", "low": 0.5, "high": 4.0, "log": True},
    },
    "repnoise": {
        "alpha": {"type": "float", "low": 0.25, "high": 4.0, "log": True},
        "beta": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
        "learning_rate": _LR,
    },
    "vaccine": {"rho": {"type": "float", "low": 0.5, "high": 8.0, "log": True}, "learning_rate": _LR},
    "booster": {
        "lamb": {"type": "float", "low": 1.0, "high": 20.0, "log": True},
        "alpha": {"type": "float", "low": 0.01, "high": 0.5, "log": True},
        "learning_rate": _LR,
    },
}

# A NaN capability score cannot be judged: it violates the stability constraint by this much.
_UNJUDGEABLE = 1e6


# ---------------------------------------------------------------------------- configuration


@dataclass
class SweepConfig:
    r"""How a defense's hyperparameters are searched (the ``immune-trainer sweep`` options).

    Parameters:
        defense (`str`): registered defense to tune.
        space (`str` or `None`): YAML file overriding the defense's search space (see :func:`search_space`).
        defense_args (`str` or `None`): YAML file of fixed fields of the defense's config.
        attack_families (`list[str]`): each attack config is run once per family.
        n_trials (`int`): finished trials (complete or pruned) of the whole study to reach.
        storage (`str` or `None`): Optuna storage URL; default `sqlite:///<output_dir>/sweep.db`.
        multi_objective (`bool`): Pareto front of cost multiple vs stability instead of one objective.
        prune_multiple (`float`): prune when the fastest attack's cost multiple is at most this.
    """

    defense: str = field(default="gradient_ascent", metadata={"help": "Registered defense to tune."})
    space: str | None = field(
        default=None,
        metadata={
            "help": "YAML file overriding the defense's search space: NAME: {type: float|int|categorical, low, "
            "high, log, step, choices} replaces or adds a parameter, NAME: VALUE fixes it, NAME: null drops it."
        },
    )
    defense_args: str | None = field(
        default=None,
        metadata={
            "help": "YAML file of fixed fields of the defense's config (max_steps, per_device_train_batch_size, "
            "...); the trial's hyperparameters are set over them."
        },
    )
    attack_families: list[str] = field(
        default_factory=lambda: ["full", "lora"],
        metadata={
            "help": "Attack families; the attack grid runs once per family and the worst case counts "
            "(empty: the attack config's own family)."
        },
    )
    n_trials: int = field(
        default=20,
        metadata={
            "help": "Finished trials (complete or pruned) the whole study should reach; resumes count."
        },
    )
    storage: str | None = field(
        default=None,
        metadata={
            "help": "Optuna storage URL (several processes or machines may share one study); default "
            "sqlite:///OUTPUT_DIR/sweep.db."
        },
    )
    study_name: str | None = field(
        default=None, metadata={"help": "Study name in the storage (default: DEFENSE_sweep)."}
    )
    output_dir: str = field(
        default="sweep_output",
        metadata={
            "help": "Folder of the study: attack runs, trial reports, table, Pareto front, plot, best.yaml."
        },
    )
    multi_objective: bool = field(
        default=False,
        metadata={
            "help": "Maximise the cost multiple and minimise the stability degradation (Pareto front) "
            "instead of maximising the cost multiple under the stability constraint."
        },
    )
    prune: bool = field(
        default=True,
        metadata={"help": "Stop a trial whose fastest attack crosses phi as early as on the base model."},
    )
    prune_multiple: float = field(
        default=1.0,
        metadata={"help": "Prune when the fastest attack's cost multiple (steps) is at most this."},
    )
    heartbeat_interval: int = field(
        default=60,
        metadata={
            "help": "Seconds between a running trial's heartbeats (SQL storages): a trial silent for twice "
            "this long (its process was killed) is marked failed and its parameters are retried once."
        },
    )
    seed: int = field(
        default=0,
        metadata={
            "help": "Seed of the TPE sampler (plus the number of trials already in the study, so a resumed "
            "sweep draws new points); give each process sharing one study its own seed."
        },
    )

    def __post_init__(self):
        if self.n_trials <= 0:
            raise ConfigError(f"n_trials must be positive, got {self.n_trials}.")
        if self.heartbeat_interval <= 0:
            raise ConfigError(f"heartbeat_interval must be positive, got {self.heartbeat_interval}.")
        if not math.isfinite(self.prune_multiple) or self.prune_multiple < 0:
            raise ConfigError(f"prune_multiple must be a finite number >= 0, got {self.prune_multiple}.")
        if isinstance(self.attack_families, str):
            self.attack_families = [self.attack_families]

    @property
    def resolved_storage(self) -> str:
        if self.storage:
            return self.storage
        return f"sqlite:///{Path(self.output_dir).resolve() / 'sweep.db'}"

    @property
    def resolved_study_name(self) -> str:
        return self.study_name or f"{self.defense}_sweep"


# ---------------------------------------------------------------------------- search space


def _load_yaml_mapping(source, what: str) -> dict[str, Any]:
    """A mapping given as a dict or as the path of a YAML file (None -> {})."""
    if source is None:
        return {}
    if isinstance(source, dict):
        return dict(source)
    import yaml

    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"{what} file {str(path)!r} does not exist.")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{what} file {str(path)!r} is not valid YAML: {err}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{what} file {str(path)!r} must hold a YAML mapping, got {type(loaded).__name__}.")
    return loaded


def _check_param(name: str, spec: Any, config_class: type) -> None:
    where = f"search space parameter {name!r}"
    if name not in {f.name for f in fields(config_class)}:
        raise ConfigError(
            f"{where} is not a field of {config_class.__name__}; the space's keys are the defense config's "
            "fields (see `immune-trainer immunize --defense NAME --help`)."
        )
    if not isinstance(spec, dict):
        if not isinstance(spec, (bool, int, float, str)):
            raise ConfigError(f"{where}: a fixed value must be a number, a string or a bool, got {spec!r}.")
        return
    kind = spec.get("type")
    if kind not in SPACE_TYPES:
        raise ConfigError(f"{where}: type must be one of {list(SPACE_TYPES)}, got {kind!r}.")
    unknown = sorted(set(spec) - {"type", "low", "high", "log", "step", "choices"})
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; use type, low, high, log, step or choices.")
    if kind == "categorical":
        choices = spec.get("choices")
        if (
            not isinstance(choices, (list, tuple))
            or not choices
            or not all(c is None or isinstance(c, (bool, int, float, str)) for c in choices)
        ):
            raise ConfigError(f"{where}: choices must be a non-empty list of numbers, strings or bools.")
        return
    low, high = spec.get("low"), spec.get("high")
    number = int if kind == "int" else (int, float)
    for key, value in (("low", low), ("high", high)):
        if isinstance(value, bool) or not isinstance(value, number) or not math.isfinite(value):
            raise ConfigError(f"{where}: {key} must be a finite {kind}, got {value!r}.")
    if low > high:
        raise ConfigError(f"{where}: low ({low}) is above high ({high}).")
    if spec.get("log") and low <= 0:
        raise ConfigError(f"{where}: a log-scaled range needs low > 0, got {low}.")
    if spec.get("log") and spec.get("step") is not None and kind == "float":
        raise ConfigError(f"{where}: a float range takes log or step, not both.")


def search_space(defense: str, space: dict[str, Any] | str | None = None) -> dict[str, Any]:
    """The search space of ``defense``, overridden by ``space`` (a dict or a YAML file).

    The default is the defense config's ``search_space()`` classmethod when it has one, otherwise this
    module's :data:`FALLBACK_SPACES`. Each key is a field of the defense's config; in ``space``,
    ``{"type": "float"|"int", "low", "high", "log", "step"}`` or ``{"type": "categorical", "choices"}``
    replaces or adds a searched parameter, a plain value fixes the field, ``None`` drops it (the config's
    default then applies).

    Raises:
        ConfigError: an unknown defense or field, a malformed range, or no space at all.
    """
    from .defenses import get_defense

    spec = get_defense(defense)
    declared = getattr(spec.config_class, "search_space", None)
    default = dict(declared()) if callable(declared) else dict(FALLBACK_SPACES.get(spec.name, {}))
    overrides = _load_yaml_mapping(space, "space")
    if not default and not overrides:
        raise ConfigError(
            f"defense {spec.name!r} declares no search space; give one (space=dict or --space YAML): "
            "NAME: {type: float, low: ..., high: ..., log: true}."
        )
    merged = dict(default)
    for name, value in overrides.items():
        if value is None:
            if name not in merged:
                raise ConfigError(f"space drops {name!r}, which the default space of {spec.name!r} lacks.")
            del merged[name]
        else:
            merged[name] = value
    for name, value in merged.items():
        _check_param(name, value, spec.config_class)
    return merged


def suggest(trial, space: dict[str, Any]) -> dict[str, Any]:
    """The trial's hyperparameters: Optuna suggestions for searched parameters, fixed values as given."""
    params: dict[str, Any] = {}
    for name, spec in space.items():
        if not isinstance(spec, dict):
            params[name] = spec
        elif spec["type"] == "float":
            params[name] = trial.suggest_float(
                name, spec["low"], spec["high"], log=bool(spec.get("log")), step=spec.get("step")
            )
        elif spec["type"] == "int":
            params[name] = trial.suggest_int(
                name, spec["low"], spec["high"], log=bool(spec.get("log")), step=spec.get("step") or 1
            )
        else:
            params[name] = trial.suggest_categorical(name, list(spec["choices"]))
    return params


# ---------------------------------------------------------------------------- results


@dataclass
class TrialOutcome:
    """What one trial measured (also stored in the trial's Optuna user attributes)."""

    cost_multiple: float | None = field(
        default=None, metadata={"help": "Worst-case attack-cost multiple in steps over the families."}
    )
    family_multiples: dict[str, float | None] = field(
        default_factory=dict, metadata={"help": "Cost multiple of each attack family."}
    )
    stability_degradation: float | None = field(
        default=None, metadata={"help": "Worst relative capability degradation over the reference sets."}
    )
    feasible: bool | None = field(default=None, metadata={"help": "Stability within tolerance."})
    pruned: bool = field(default=False, metadata={"help": "Stopped after the fastest attack."})
    report: str | None = field(default=None, metadata={"help": "Path of the trial's report."})
    notes: list[str] = field(default_factory=list, metadata={"help": "How the numbers were read."})


@dataclass
class SweepResult:
    """The study and the files a sweep wrote."""

    study: Any = field(metadata={"help": "The optuna.Study."})
    best_trial: Any = field(metadata={"help": "Best feasible FrozenTrial (None if no feasible trial)."})
    pareto_front: list = field(metadata={"help": "Feasible non-dominated FrozenTrials."})
    table_path: str = field(metadata={"help": "Markdown table of every trial."})
    csv_path: str = field(metadata={"help": "CSV table of every trial."})
    pareto_path: str = field(metadata={"help": "Pareto front JSON."})
    plot_path: str | None = field(metadata={"help": "Resistance-vs-stability frontier PNG."})
    best_config_path: str | None = field(metadata={"help": "best.yaml for `immune-trainer immunize`."})
    best_report_path: str | None = field(metadata={"help": "Report of the best trial."})
    table: str = field(default="", metadata={"help": "The table as text."})


def _family_multiple(report: ImmunizationReport) -> tuple[float | None, str | None]:
    """The report's cost multiple in steps, and a note when it had to be read another way."""
    r = report.conditions.resistance
    if r is None:
        return None, "resistance not measured"
    if r.steps_multiple is not None:
        return float(r.steps_multiple), None
    if r.strong:
        return None, "neither model crossed phi: no multiple"
    # The immunized model crossed, the base never did within its budget: c / budget bounds the multiple.
    budget = max(s.budget_steps for s in r.base_curves or []) if r.base_curves else 0
    if budget <= 0:
        return 0.0, "no base budget: multiple taken as 0"
    return r.worst_crossing.step / budget, "the base never crossed phi: multiple is crossing / base budget"


def _is_dominated(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """a (cost multiple up, degradation down) is dominated by b."""
    return b[0] >= a[0] and b[1] <= a[1] and b != a


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
        attacks: an :class:`AttackConfig` (run once per ``config.attack_families``) or a list of them (run
            as given); their ``output_dir`` is set to the sweep's folder so the base is attacked once.
        evaluation: an :class:`EvaluationConfig` (phi, stability tolerance, capability scorer, ...).
        config: a :class:`SweepConfig`.
        space: overrides the search space (dict; ``config.space`` names a YAML file otherwise).
        defense_args: fixed fields of the defense's config (dict; ``config.defense_args`` otherwise).
        data_specs: what best.yaml records as the immunize command's data (``model``, ``dataset``,
            ``retain_dataset``, ``tokenizer``); the CLI fills it from its options.
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
        progress: bool = True,
    ):
        from .defenses import get_defense

        self.config = config or SweepConfig()
        self.spec = get_defense(self.config.defense)
        if self.spec.attack_time_hook is not None:
            raise ConfigError(
                f"defense {self.spec.name!r} protects only while its attack-time hook is applied, which "
                "evaluate_conditions does not apply; the sweep cannot measure it."
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
        curves = {}
        for label, attack in zip(self.labels, self.attacks):
            logger.info("attacking the base model (%s), once for the whole sweep", attack.config.family)
            curves[label] = attack.run(self.base, self.tokenizer, self.attack_train, self.attack_eval).curves
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
        from .conditions import first_crossing

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
            config=replace(self.evaluation, threshold=self._phi),
            defense=defense_record,
            progress=lambda m: logger.debug(m),
            immunized_name=name,
        )

    def objective(self, trial):
        """Immunize, attack, measure; the value(s) Optuna optimizes (see the module docstring)."""
        import optuna

        params = suggest(trial, self.space)
        folder = self.out / "trials" / str(trial.number)
        folder.mkdir(parents=True, exist_ok=True)
        # The trial's model is kept in memory only: best.yaml retrains the best setting.
        with tempfile.TemporaryDirectory(prefix="immune_trainer_sweep_") as tmp:
            trainer = self.spec.trainer_class(
                model=copy.deepcopy(self.base),
                args=self._defense_config(params, tmp),
                harmful_dataset=self.harmful,
                retain_dataset=self.retain,
                processing_class=self.tokenizer,
            )
            from transformers import PrinterCallback

            trainer.remove_callback(PrinterCallback)  # the trial bar is the progress; no log dictionaries
            trainer.train()
            immunized = trainer.model
            del trainer
        immunized.eval()
        record = {"name": self.spec.name, "config": {**self.defense_args, **params}}
        name = f"{self.spec.name} trial {trial.number}"
        outcome = TrialOutcome(report=str(folder / "immunization_report.json"))

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
            multiple, _ = _family_multiple(probe)
            if not r.strong and (multiple is None or multiple <= self.config.prune_multiple):
                outcome.pruned = True
                outcome.cost_multiple = multiple
                outcome.family_multiples = {probe_cfg.family: multiple}
                outcome.notes.append(
                    f"pruned: the fastest attack ({probe_cfg.family} lr={probe_cfg.learning_rates[0]:g}) crossed "
                    f"phi at {multiple if multiple is None else round(multiple, 3)}x the base model's steps"
                )
                probe.extra["sweep"] = {"trial": trial.number, "params": params, "pruned": True}
                probe.save(outcome.report)
                self._record(trial, outcome)
                if not self.config.multi_objective and multiple is not None:
                    trial.report(multiple, step=0)
                raise optuna.TrialPruned(outcome.notes[-1])

        reports = []
        for label, attack in zip(self.labels, self.attacks):
            report = self._evaluate(immunized, attack, self.reference, record, name)
            multiple, note = _family_multiple(report)
            outcome.family_multiples[label] = multiple
            if note:
                outcome.notes.append(f"{label}: {note}")
            reports.append((multiple, report, label))
        ranked = [(m, r) for m, r, _ in reports if m is not None]
        if not ranked:
            # No family could rank this model (neither model crossed phi): it resisted every attack.
            ranked = [(math.inf, reports[0][1])]
            outcome.notes.append("no attack family crossed phi on either model: multiple taken as inf")
        multiple, worst = min(ranked, key=lambda x: x[0])
        outcome.cost_multiple = multiple
        stab = worst.conditions.stability
        degradation = stab.worst_degradation
        judgeable = not math.isnan(degradation)
        outcome.stability_degradation = degradation if judgeable else None
        outcome.feasible = bool(stab.holds)
        for _, report, label in reports:
            if report is not worst:
                report.save(folder / f"immunization_report_{label}.json")
        worst.extra["sweep"] = {
            "trial": trial.number,
            "params": params,
            "cost_multiple": multiple,
            "family_multiples": outcome.family_multiples,
        }
        worst.save(outcome.report)
        self._record(trial, outcome)
        violation = degradation - self.evaluation.stability_tolerance if judgeable else _UNJUDGEABLE
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
        return self.summarize(study)

    # -------------------------------------------------------------- outputs

    def summarize(self, study) -> SweepResult:
        """Write the trial table (markdown + CSV), the Pareto front JSON, the plot and best.yaml."""
        from optuna.trial import TrialState

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

        table, rows = self._table(trials, {t.number for t in front}, best)
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
            "best_trial": None if best is None else best.number,
            "front": [self._trial_dict(t) for t in front],
        }
        pareto_path = self.out / "pareto_front.json"
        atomic_write(pareto_path, json.dumps(_json_safe(pareto), indent=2) + "\n")
        plot_path = self._plot(complete, front, best)

        best_config_path = best_report_path = None
        if best is not None:
            best_config_path = self._write_best_yaml(best)
            best_report_path = best.user_attrs.get("report")
            if best_report_path and Path(best_report_path).is_file():
                report = ImmunizationReport.load(best_report_path)
                report.extra["sweep"] = {
                    **report.extra.get("sweep", {}),
                    "study_name": self.config.resolved_study_name,
                    "trials": len(trials),
                    "complete": len(complete),
                    "feasible": len(feasible),
                    "best_trial": best.number,
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
                        f"{_fmt(best.user_attrs.get('cost_multiple'))}x at stability change "
                        f"{_pct(best.user_attrs.get('stability_degradation'))}"
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
        )

    def _trial_dict(self, t) -> dict[str, Any]:
        return {
            "number": t.number,
            "params": dict(t.params),
            "cost_multiple": t.user_attrs.get("cost_multiple"),
            "family_multiples": t.user_attrs.get("family_multiples"),
            "stability_degradation": t.user_attrs.get("stability_degradation"),
            "feasible": t.user_attrs.get("feasible"),
            "report": t.user_attrs.get("report"),
        }

    def _table(self, trials, front: set[int], best) -> tuple[str, list[dict[str, Any]]]:
        names = list(dict.fromkeys(k for t in trials for k in t.params))
        rows = []
        for t in trials:
            attrs = t.user_attrs
            feasible = attrs.get("feasible")
            row = {
                "trial": t.number,
                "state": t.state.name.lower(),
                "cost_multiple": _fmt(attrs.get("cost_multiple")),
                "stability_change": _pct(attrs.get("stability_degradation")),
                "feasible": "" if feasible is None else ("yes" if feasible else "no"),
                "pareto": "yes" if t.number in front else "",
                "best": "*" if best is not None and t.number == best.number else "",
            }
            for fam, m in (attrs.get("family_multiples") or {}).items():
                row[f"x_{fam}"] = _fmt(m)
            row.update({n: _fmt(t.params[n]) if n in t.params else "" for n in names})
            rows.append(row)
        heads = list(dict.fromkeys(k for r in rows for k in r)) or ["trial"]
        rows = [{h: r.get(h, "") for h in heads} for r in rows]
        lines = ["| " + " | ".join(heads) + " |", "|" + "|".join("---" for _ in heads) + "|"]
        lines += ["| " + " | ".join(str(r[h]) for h in heads) + " |" for r in rows]
        return "\n".join(lines), rows

    def _plot(self, complete, front, best) -> str | None:
        """Resistance vs stability: every completed trial, feasible vs infeasible, the Pareto front and the
        tolerance line. ``None`` (nothing written) without matplotlib or without completed trials."""
        pts = [
            (
                t,
                100 * _num(t.user_attrs.get("stability_degradation")),
                _num(t.user_attrs.get("cost_multiple"), -1),
            )
            for t in complete
            if t.user_attrs.get("stability_degradation") is not None
            and t.user_attrs.get("cost_multiple") is not None
        ]
        if not pts:
            return None
        try:
            import matplotlib
        except ImportError:
            logger.warning(
                "matplotlib is not installed: no frontier plot (pip install immune-trainer[demo])."
            )
            return None
        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        finite = [y for _, _, y in pts if math.isfinite(y)]
        cap = (max(finite) * 1.2 if finite else 1.0) or 1.0
        fig, ax = plt.subplots(figsize=(6, 4.2))
        try:
            for ok, marker, color, label in (
                (True, "o", "tab:blue", "feasible"),
                (False, "x", "tab:red", "infeasible"),
            ):
                sel = [(x, min(y, cap)) for t, x, y in pts if bool(t.user_attrs.get("feasible")) == ok]
                if sel:
                    ax.scatter(
                        [x for x, _ in sel], [y for _, y in sel], marker=marker, color=color, label=label
                    )
            if front:
                fx = [100 * _num(t.user_attrs.get("stability_degradation")) for t in front]
                fy = [min(_num(t.user_attrs.get("cost_multiple")), cap) for t in front]
                ax.step(fx, fy, where="post", color="tab:green", linewidth=1.2, label="Pareto front")
            if best is not None:
                ax.scatter(
                    [100 * _num(best.user_attrs.get("stability_degradation"))],
                    [min(_num(best.user_attrs.get("cost_multiple")), cap)],
                    s=160,
                    facecolors="none",
                    edgecolors="black",
                    label=f"best (trial {best.number})",
                )
            tol = 100 * self.evaluation.stability_tolerance
            ax.axvline(tol, color="black", linestyle=":", linewidth=1, label=f"stability tolerance {tol:g}%")
            ax.axhline(
                self.evaluation.min_cost_multiple,
                color="grey",
                linestyle="--",
                linewidth=0.8,
                label=f"weak resistance {self.evaluation.min_cost_multiple:g}x",
            )
            ax.set_xlabel("worst stability change (% capability degradation)")
            ax.set_ylabel("worst-case attack-cost multiple (steps)")
            ax.set_title(f"{self.spec.name} sweep: resistance vs stability ({len(pts)} trials)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            fig.tight_layout()
            path = self.out / "frontier.png"
            tmp = self.out / ".frontier.png.tmp"
            fig.savefig(tmp, dpi=110, format="png")
            os.replace(tmp, path)
        finally:
            plt.close(fig)
        return str(path)

    def _write_best_yaml(self, best) -> str:
        """best.yaml: the defense, the data and every config field the best trial used, in the shape
        ``immune-trainer immunize --config best.yaml`` accepts."""
        import yaml

        params = trial_setting(best, self.space)
        from dataclasses import fields as dataclass_fields

        from .cli import ImmunizeArguments

        # Only what `immunize` takes: its data options (model, dataset, retain_dataset...), never the defense.
        options = {f.name for f in dataclass_fields(ImmunizeArguments)} - {"defense"}
        body: dict[str, Any] = {"defense": self.spec.name}
        body.update({k: v for k, v in self.data_specs.items() if v is not None and k in options})
        body["output_dir"] = str(self.out / "best_model")
        body.update(self.defense_args)
        body.update(params)
        header = (
            f"# immune-trainer sweep: best trial {best.number} of study {self.config.resolved_study_name!r}\n"
            f"# worst-case attack-cost multiple {_fmt(best.user_attrs.get('cost_multiple'))}x, stability change "
            f"{_pct(best.user_attrs.get('stability_degradation'))}\n"
            "# train it: immune-trainer immunize --config best.yaml\n"
        )
        path = self.out / "best.yaml"
        atomic_write(path, header + yaml.safe_dump(_json_safe(body), sort_keys=False))
        return str(path)


def trial_setting(trial, space: dict[str, Any]) -> dict[str, Any]:
    """A finished trial's full setting: its searched parameters and the space's fixed values."""
    return {n: trial.params[n] if isinstance(s, dict) else s for n, s in space.items()}


def _num(x, default: float = math.nan) -> float:
    return default if x is None else float(x)


def _fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def _pct(x) -> str:
    return "-" if x is None else f"{100 * float(x):+.2f}%"


def _json_safe(x):
    if isinstance(x, float) and not math.isfinite(x):
        return "inf" if x > 0 else ("-inf" if x < 0 else "nan")
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


# ---------------------------------------------------------------------------- command line


@dataclass
class SweepData:
    """Model data of ``immune-trainer sweep`` (each a dataset SPEC: file, folder, embedded:NAME or Hub id)."""

    dataset: str = field(
        default="embedded:harmful_qa/defense", metadata={"help": "Harmful data the defense trains against."}
    )
    retain_dataset: str | None = field(
        default="embedded:benign_qa", metadata={"help": "Capability data of the defense's retain loss."}
    )
    attack_dataset: str = field(
        default="embedded:harmful_qa/attack",
        metadata={"help": "Harmful data the attacker trains on (share no prompts with dataset)."},
    )
    eval_dataset: str = field(
        default="embedded:harmful_qa/in_domain",
        metadata={"help": "Held-out harmful data on which harm is measured."},
    )
    reference: list[str] = field(
        default_factory=lambda: [
            "plain_text=embedded:shakespeare/eval",
            "chat_answers=embedded:chat_responses",
        ],
        metadata={
            "help": "Stability reference sets as NAME=SPEC (the sweep's constraint holds on every one)."
        },
    )
    eval_limit: int = field(
        default=0, metadata={"help": "Use at most this many rows of the eval and reference sets (0 = all)."}
    )


def _cli_dataclass(cls: type, drop: set[str]) -> type:
    """``cls`` without the fields in ``drop`` (same help texts), for a parser that already has those names."""
    kept = []
    for f in fields(cls):
        if f.name in drop:
            continue
        kwargs: dict[str, Any] = {"metadata": f.metadata}
        if f.default is not MISSING:
            kwargs["default"] = f.default
        if f.default_factory is not MISSING:
            kwargs["default_factory"] = f.default_factory
        kept.append((f.name, f.type, field(**kwargs)))
    out = make_dataclass(cls.__name__, kept)
    out.__module__ = cls.__module__  # its string annotations resolve in the original module
    out.__doc__ = cls.__doc__
    return out


_BENIGN_FIELDS = {f.name for f in fields(EvaluationConfig) if f.name.startswith(("benign_", "trainability_"))}


def cmd_sweep(argv: list[str]) -> int:
    """``immune-trainer sweep``: load the model and data from SPECs, run the study, print the table."""
    from dataclasses import asdict

    from .data.loading import ModelArguments, load_dataset_spec, load_model_and_tokenizer, parse_cli_args

    # The sweep's output_dir holds the attack runs; --attack_families replaces --family; every trial writes
    # its own report; the sweep measures resistance and stability only (no generalization or benign task).
    attack_cls = _cli_dataclass(AttackConfig, {"output_dir", "family"})
    eval_cls = _cli_dataclass(EvaluationConfig, {"report", "generalization_max_steps"} | _BENIGN_FIELDS)
    model_args, data, cfg, attack_args, eval_args = parse_cli_args(
        [ModelArguments, SweepData, SweepConfig, attack_cls, eval_cls], argv, prog="immune-trainer sweep"
    )
    attack_cfg = AttackConfig(**asdict(attack_args))
    eval_cfg = EvaluationConfig(**asdict(eval_args))
    search_space(cfg.defense, cfg.space)  # a bad defense or space fails before any model is loaded
    references = []
    for item in data.reference:
        name, sep, spec = item.partition("=")
        if not sep or not name:
            raise ConfigError(f"--reference takes NAME=SPEC, got {item!r}.")
        references.append((name, spec))
    model, tokenizer = load_model_and_tokenizer(model_args)

    def limited(ds):
        return ds.select(range(data.eval_limit)) if data.eval_limit and len(ds) > data.eval_limit else ds

    reference = {name: limited(load_dataset_spec(spec)) for name, spec in references}
    specs = {
        "model": model_args.model,
        "tokenizer": model_args.tokenizer,
        "dataset": data.dataset,
        "retain_dataset": data.retain_dataset,
    }
    if model_args.trust_remote_code:
        specs["trust_remote_code"] = True
    sweep = DefenseSweep(
        model,
        tokenizer,
        harmful_dataset=load_dataset_spec(data.dataset),
        retain_dataset=load_dataset_spec(data.retain_dataset) if data.retain_dataset else None,
        attack_train=load_dataset_spec(data.attack_dataset),
        attack_eval=limited(load_dataset_spec(data.eval_dataset)),
        reference=reference,
        attacks=attack_cfg,
        evaluation=eval_cfg,
        config=cfg,
        data_specs=specs,
    )
    result = sweep.run()
    print(result.table)
    print(
        f"\nphi = {result.study.user_attrs.get('phi'):.4g}; wrote {result.table_path}, {result.csv_path}, "
        f"{result.pareto_path}" + (f", {result.plot_path}" if result.plot_path else "")
    )
    if result.best_trial is None:
        print("no trial is stable within tolerance: no best setting (see the table's stability column).")
    else:
        print(
            f"best: trial {result.best_trial.number} -> {result.best_config_path} "
            f"(train it: immune-trainer immunize --config {result.best_config_path})"
        )
    return 0
