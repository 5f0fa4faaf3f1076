"""What a defense sweep searches: its options (:class:`SweepConfig`), the search space of a defense
(:func:`search_space`, :data:`FALLBACK_SPACES`) and each trial's setting (:func:`suggest`).

:class:`ImmunizeArguments` are the data options of ``immune-trainer immunize``: the sweep's best.yaml is
written in the shape that command reads (the command line re-imports them from here).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import ConfigError

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
        confirm_top_k (`int`): before choosing, the best feasible trials of the screening (this many, by its
            worst-case multiple) are measured again with the full evaluation under the calibrated attack, and
            the choice is made on that; 0 chooses on the screening attack (the fixed grid) alone.
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
    confirm_top_k: int = field(
        default=2,
        metadata={
            "help": "Before choosing, retrain this many of the best feasible trials (by the screening's worst-case "
            "multiple) and measure each with the full evaluation under the calibrated attack (each training "
            "family searched per model under the capability cap, winners on --calibrate_seeds >= 2 seeds, claims "
            "decided), as `immune-trainer evaluate` does; the best on that is chosen. 0: choose on the screening "
            "attack (the fixed grid) alone."
        },
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
        if (
            isinstance(self.confirm_top_k, bool)
            or not isinstance(self.confirm_top_k, int)
            or self.confirm_top_k < 0
        ):
            raise ConfigError(f"confirm_top_k must be an integer >= 0, got {self.confirm_top_k!r}.")
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
    from ..defenses import get_defense

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


# ---------------------------------------------------------------------------- arguments of `immunize`


@dataclass
class ImmunizeArguments:
    """The model and data of ``immune-trainer immunize`` (the defense's config gives everything else)."""

    defense: str | None = field(
        default=None,
        metadata={"help": "Registered defense to train (required; may come from the --config YAML)."},
    )
    model: str = field(default="embedded", metadata={"help": "Model path, Hub id, or 'embedded'."})
    tokenizer: str | None = field(
        default=None, metadata={"help": "Tokenizer path or id (default: the model's)."}
    )
    dataset: str = field(
        default="embedded:harmful_qa/defense", metadata={"help": "Harmful data the defense trains against."}
    )
    retain_dataset: str | None = field(
        default="embedded:benign_qa",
        metadata={
            "help": "Ordinary capability data kept by the retain loss (a defense that trains on harmful data "
            "only, security_vectors, takes none and is not given the default)."
        },
    )
