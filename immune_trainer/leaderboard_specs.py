"""The leaderboard on any model and data named by SPECs: :class:`LeaderboardData` and
:func:`leaderboard_from_specs` (``immune-trainer leaderboard --config FILE``, e.g.
``examples/leaderboard_gpu.yaml``).

What ``immune-trainer evaluate`` takes for one model (a model name or path, the harmful, reference and
benign dataset SPECs, the attack and its calibrated search budget, the judges) is here taken once for every
defense: each is trained on the same model and data with its own budget (``defense_args`` for all,
``per_defense_args`` per defense), measured under the same attack and ranked by
:func:`~immune_trainer.leaderboard.run_leaderboard` (resumable; ``sweep_trials`` tunes each defense first,
its Optuna study at ``sweep_storage``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any

from .errors import ConfigError, DataError
from .evaluation.specs import DatasetSpecs

__all__ = ["LeaderboardData", "leaderboard_from_specs", "leaderboard_record"]


@dataclass
class LeaderboardData(DatasetSpecs):
    """The defenses, their budgets and the data of a leaderboard run from SPECs (the model is ``--model``;
    the attack, its calibration and the measurement are the options of ``immune-trainer evaluate``)."""

    defense: list[str] = field(
        default_factory=list,
        metadata={"help": "Registered defenses to rank (at least two; default: every registered defense)."},
    )
    defense_dataset: str | None = field(
        default=None,
        metadata={
            "help": "Harmful pairs the defenses train on (prompt/completion; a 'refusal' column is used with "
            "defense_args refusal_column: refusal). Default: --dataset, the attacker's data."
        },
    )
    defense_limit: int = field(
        default=0, metadata={"help": "Train the defenses on the first N rows of defense_dataset (0 = all)."}
    )
    retain_dataset: str | None = field(
        default="embedded:benign_qa",
        metadata={"help": "Benign retain data of the defenses (prompt/completion), or none."},
    )
    defense_args: dict | str | None = field(
        default=None,
        metadata={
            "help": "Config fields every defense gets (a YAML mapping in --config, or JSON here): the budget "
            "(max_steps, learning_rate, per_device_train_batch_size, bf16, ...). A field no named defense has "
            "is an error; one only some have is set on those."
        },
    )
    per_defense_args: dict | str | None = field(
        default=None,
        metadata={
            "help": "{defense: {field: value}} on top of defense_args (a YAML mapping in --config, or JSON): "
            "each defense's own budget. A field that defense's config lacks is an error."
        },
    )
    sweep_trials: int = field(
        default=0,
        metadata={
            "help": "Tune each defense with this many DefenseSweep trials first (0: its settings as given)."
        },
    )
    sweep_storage: str | None = field(
        default=None,
        metadata={
            "help": "Optuna storage URL of the sweeps (default: SQLite in each defense's folder); an RDB URL "
            "(postgresql://..., mysql://...) lets several machines share the studies."
        },
    )


def _mapping(value, what: str) -> dict[str, Any]:
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{what} must be a mapping (YAML in --config, or JSON): {e}.") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{what} must be a mapping of field: value, got {type(value).__name__}.")
    return dict(value)


def _check_args(specs, common: dict[str, Any], per: dict[str, dict[str, Any]]) -> None:
    """Every field named exists where it is set, and each defense's config accepts its values."""
    from pathlib import Path
    from tempfile import TemporaryDirectory

    from .leaderboard import _defense_config

    names = {spec.name: {f.name for f in fields(spec.config_class)} for spec in specs}
    unknown = sorted(k for k in common if not any(k in has for has in names.values()))
    if unknown:
        raise ConfigError(
            f"defense_args: no defense of {sorted(names)} has the option(s) {unknown}; see "
            "`immune-trainer immunize --defense NAME --help`."
        )
    stray = sorted(set(per) - set(names))
    if stray:
        raise ConfigError(f"per_defense_args names defenses not in the leaderboard: {', '.join(stray)}.")
    for name, values in per.items():
        if not isinstance(values, dict):
            raise ConfigError(
                f"per_defense_args[{name!r}] must be a mapping of field: value, got {values!r}."
            )
        unknown = sorted(k for k in values if k not in names[name])
        if unknown:
            raise ConfigError(
                f"per_defense_args[{name!r}]: defense {name!r} has no option(s) {unknown}; see "
                f"`immune-trainer immunize --defense {name} --help`."
            )
    with TemporaryDirectory() as tmp:
        for spec in specs:
            try:
                _defense_config(spec, {**common, **per.get(spec.name, {})}, Path(tmp))
            except (ValueError, TypeError) as e:
                raise ConfigError(f"defense {spec.name!r}: its budget is rejected: {e}") from None


def leaderboard_record(data: LeaderboardData) -> dict[str, Any]:
    """The data record every report keeps (:meth:`DatasetSpecs.record`, as ``immune-trainer evaluate``
    writes it), so that ``immune-trainer verify`` rebuilds its rows."""
    return data.record()


def leaderboard_from_specs(
    model_args,
    data: LeaderboardData,
    attack_cfg,
    evaluation,
    calibration=None,
    output_dir: str = "leaderboard",
    progress=None,
):
    """Load the model and data SPECs of ``data`` and rank its defenses with
    :func:`~immune_trainer.leaderboard.run_leaderboard` (one attack for all: ``attack_cfg`` calibrated with
    ``calibration`` unless ``evaluation.fixed_grid``).

    Everything a user wrote is checked before a model is loaded: the defenses, their fields and values,
    the SPECs, and that the calibrated attack has a reference set.

    Raises:
        ConfigError, DataError: the first bad option, named.
    """
    from dataclasses import replace
    from pathlib import Path

    from .data.loading import load_dataset_spec, load_model_and_tokenizer, validate_sources
    from .defenses import get_defense, list_defenses
    from .evaluation.recorded import condition_datasets
    from .leaderboard import run_leaderboard

    names = list(data.defense) or list_defenses()
    specs = [get_defense(n) for n in names]  # an unknown name is a ConfigError naming the known ones
    if len(set(names)) != len(names):
        raise ConfigError(f"a defense is named twice in {names}.")
    if len(names) < 2:
        raise ConfigError("a leaderboard ranks at least two defenses: name them in `defense`.")
    if data.sweep_trials < 0 or data.defense_limit < 0 or data.eval_limit < 0:
        raise ConfigError("sweep_trials, defense_limit and eval_limit must be >= 0.")
    if data.sweep_trials > 0:
        hooked = [s.name for s in specs if s.attack_time_hook is not None]
        if hooked:
            raise ConfigError(
                f"{', '.join(hooked)} protect(s) only with an attack-time hook, which the sweep cannot apply: "
                "leave it out or set sweep_trials: 0."
            )
    common = _mapping(data.defense_args, "defense_args")
    per = _mapping(data.per_defense_args, "per_defense_args")
    _check_args(specs, common, per)
    for item in data.reference:
        if "=" not in item:
            raise ConfigError(f"reference takes NAME=SPEC, got {item!r}.")
    record = leaderboard_record(data)
    if not evaluation.fixed_grid and not data.reference:
        raise ConfigError(
            "the calibrated attack (the default) needs reference NAME=SPEC for its capability cap; or set "
            "fixed_grid: true to run the attack grid as given."
        )
    retain_spec = None if (data.retain_dataset or "none").lower() == "none" else data.retain_dataset
    validate_sources(
        models=[model_args.model, model_args.tokenizer],
        datasets=[
            data.defense_dataset,
            retain_spec,
            data.dataset,
            data.eval_dataset,
            data.cross_domain_dataset,
            data.benign_dataset,
            data.harmful_prompts,
            record["benign_requests"],
            *[r.partition("=")[2] for r in data.reference],
        ],
    )
    harmful = load_dataset_spec(data.defense_dataset or data.dataset)
    if data.defense_limit and len(harmful) > data.defense_limit:
        harmful = harmful.select(range(data.defense_limit))
    if len(harmful) == 0:
        raise DataError(f"the defenses' harmful data {data.defense_dataset or data.dataset!r} has no row.")
    retain = load_dataset_spec(retain_spec) if retain_spec else None
    sets = condition_datasets(record).datasets
    base, tokenizer = load_model_and_tokenizer(model_args)
    base.eval()
    attack = attack_cfg
    if not evaluation.fixed_grid:
        from .attacks import CalibratedAttack

        attack = CalibratedAttack(
            replace(attack_cfg, output_dir=None),
            calibration,
            reference=sets.reference,
            storage_dir=str(Path(evaluation.cache_dir) / "search") if evaluation.cache_dir else None,
        )
    return run_leaderboard(
        base,
        tokenizer,
        harmful_dataset=harmful,
        retain_dataset=retain,
        datasets=sets,
        defenses=names,
        defense_args=common,
        per_defense_args=per,
        attack=attack,
        evaluation=evaluation,
        output_dir=output_dir,
        sweep_trials=data.sweep_trials,
        sweep_storage=data.sweep_storage,
        progress=progress,
        record=record,
        base_name=model_args.model,
    )
