"""The configuration every defense extends (:class:`ImmunizationConfig`, a ``TrainingArguments``) and the
validation of a defense config's hyperparameter search space (:func:`check_search_space`) and of its
non-negative weights (:func:`check_non_negative`)."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments

from ..errors import ConfigError

__all__ = ["ImmunizationConfig", "check_non_negative", "check_search_space"]


def check_non_negative(config: Any, *names: str) -> None:
    """Raise ConfigError naming the first of the fields ``names`` of ``config`` that is not a finite
    non-negative real number (a loss weight, a step size; numpy scalars count, booleans do not), with its
    value."""
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ConfigError(f"{name} must be a finite non-negative number, got {value!r}.")
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"{name} must be a finite non-negative number, got {value}.")


@dataclass
class ImmunizationConfig(TrainingArguments):
    r"""Configuration shared by every defense trainer (a ``TrainingArguments`` subclass).

    Parameters:
        > Data

        max_length (`int`, defaults to `512`):
            Longest tokenized example (prompt + response). A prompt that alone reaches it is an error.
        refusal_column (`str` or `None`, defaults to `None`):
            Column of the harmful dataset holding the harmless response paired with each prompt. When
            `None`, refusals are drawn (seeded) from `immune_trainer.data.DEFAULT_REFUSALS`.
        pair_seed (`int`, defaults to `0`):
            Seed used to draw refusals when `refusal_column` is `None`.

        > Loss weights

        harmless_weight (`float`, defaults to `1.0`):
            Weight of the cross-entropy on the harmless side of each pair (the prompt with a refusal).
        retain_weight (`float`, defaults to `1.0`):
            Weight of the cross-entropy on the benign retain set (ignored when no retain set is given).

        > Safety of the run

        check_finite (`bool`, defaults to `True`):
            Stop with an error naming the loss term and step when any term becomes NaN or inf.
        trust_remote_code (`bool`, defaults to `False`):
            Allow model code from the model repository when `model` is given as a string.
    """

    max_length: int = field(
        default=512,
        metadata={
            "help": "Longest tokenized example (prompt + response); a prompt that alone reaches it is an error."
        },
    )
    refusal_column: str | None = field(
        default=None,
        metadata={
            "help": "Column of the harmful dataset with the harmless response for each prompt; None draws "
            "seeded refusals from immune_trainer.data.DEFAULT_REFUSALS."
        },
    )
    pair_seed: int = field(
        default=0, metadata={"help": "Seed for drawing refusals when refusal_column is None."}
    )
    harmless_weight: float = field(
        default=1.0,
        metadata={"help": "Weight of the cross-entropy on the harmless (refusal) side of each pair."},
    )
    retain_weight: float = field(
        default=1.0,
        metadata={"help": "Weight of the cross-entropy on the benign retain set, when one is given."},
    )
    check_finite: bool = field(
        default=True,
        metadata={"help": "Stop with an error naming the term and step when a loss term becomes NaN or inf."},
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Allow model code from the repository when the model is given by id."},
    )

    @classmethod
    def search_space(cls) -> dict[str, dict[str, Any]]:
        """The hyperparameters a defense sweep should search, as plain data: ``name -> spec`` where a spec is
        ``{"type": "float" | "int", "low": ..., "high": ..., "log": bool}`` or
        ``{"type": "categorical", "choices": [...]}`` (the arguments of optuna's ``suggest_*``).

        The base searches the learning rate and the number of steps; each defense's config extends it
        (``{**super().search_space(), ...}``) with its own loss weights, narrowing ranges around its paper's
        values. :func:`check_search_space` validates a space against its config class."""
        return {
            "learning_rate": {"type": "float", "low": 1e-6, "high": 1e-3, "log": True},
            "max_steps": {"type": "int", "low": 50, "high": 1000, "log": True},
        }

    def __post_init__(self):
        if self.max_length <= 0:
            raise ConfigError(f"max_length must be positive, got {self.max_length}.")
        check_non_negative(self, "harmless_weight", "retain_weight")
        # Paired batches carry columns the model's forward does not accept.
        self.remove_unused_columns = False
        super().__post_init__()


_SPEC_KEYS = {"float": {"type", "low", "high", "log"}, "int": {"type", "low", "high", "log"}}


def check_search_space(config_class: type) -> dict[str, dict[str, Any]]:
    """Validate ``config_class.search_space()`` and return it: every name is a field of the config, every
    range is well formed (``low < high``, positive bounds on a log scale, ints for ``"int"``), choices are a
    non-empty list. Raises ConfigError naming the config, the hyperparameter and the problem."""
    import dataclasses

    fields = {f.name for f in dataclasses.fields(config_class)}
    space = config_class.search_space()
    where = config_class.__name__
    if not isinstance(space, dict) or not space:
        raise ConfigError(f"{where}.search_space() must return a non-empty dict, got {space!r}.")
    for name, spec in space.items():
        if name not in fields:
            raise ConfigError(f"{where}.search_space() names {name!r}, which is not a field of {where}.")
        kind = spec.get("type") if isinstance(spec, dict) else None
        if kind == "categorical":
            if (
                set(spec) != {"type", "choices"}
                or not isinstance(spec["choices"], list)
                or not spec["choices"]
            ):
                raise ConfigError(
                    f"{where}.search_space()[{name!r}] needs a non-empty list of choices: {spec}."
                )
            continue
        if kind not in _SPEC_KEYS or not {"type", "low", "high"} <= set(spec) <= _SPEC_KEYS[kind]:
            raise ConfigError(
                f"{where}.search_space()[{name!r}] must be {{'type': 'float'|'int', 'low', 'high'[, 'log']}} "
                f"or {{'type': 'categorical', 'choices'}}, got {spec}."
            )
        low, high = spec["low"], spec["high"]
        number = int if kind == "int" else (int, float)
        if not all(isinstance(v, number) and not isinstance(v, bool) for v in (low, high)):
            raise ConfigError(
                f"{where}.search_space()[{name!r}]: bounds must be {kind}s, got {low!r}, {high!r}."
            )
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ConfigError(f"{where}.search_space()[{name!r}]: need finite low < high, got {low}, {high}.")
        if spec.get("log", False) and low <= 0:
            raise ConfigError(f"{where}.search_space()[{name!r}]: a log scale needs low > 0, got {low}.")
    return space
