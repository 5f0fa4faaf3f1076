"""Search spaces: every registered defense declares one that names only its config's fields, with valid
ranges that hold its paper's default and that its config accepts at both ends."""

from __future__ import annotations

import dataclasses

import optuna
import pytest
from transformers import TrainingArguments

from immune_trainer.defenses import DEFENSES, check_search_space, register_defense
from immune_trainer.errors import ConfigError
from immune_trainer.trainer import ImmunizationConfig


def _config(cls, tmp_path, **kw):
    return cls(output_dir=str(tmp_path), report_to="none", use_cpu=True, save_strategy="no", **kw)


def _distribution(spec):
    if spec["type"] == "categorical":
        return optuna.distributions.CategoricalDistribution(spec["choices"])
    kind = (
        optuna.distributions.FloatDistribution
        if spec["type"] == "float"
        else optuna.distributions.IntDistribution
    )
    return kind(spec["low"], spec["high"], log=spec.get("log", False))


@pytest.mark.parametrize("name", sorted(DEFENSES))
def test_search_space_is_valid_for_every_defense(name, tmp_path):
    cls = DEFENSES[name].config_class
    space = DEFENSES[name].search_space
    fields = {f.name for f in dataclasses.fields(cls)}
    assert {"learning_rate", "max_steps"} <= set(space) <= fields
    assert len(space) > 2  # each defense adds its own hyperparameters to the base's
    assert check_search_space(cls) == space
    own = fields - {f.name for f in dataclasses.fields(TrainingArguments)}
    default = _config(cls, tmp_path)
    for param, spec in space.items():
        _distribution(spec)  # optuna accepts the spec as it is
        if spec["type"] == "categorical":
            values = spec["choices"]
        else:
            assert spec["low"] < spec["high"]
            values = [spec["low"], spec["high"]]
            if param in own:  # the defense's own hyperparameters: the paper's default lies in the range
                assert spec["low"] <= getattr(default, param) <= spec["high"], (
                    param,
                    getattr(default, param),
                )
        for value in values:  # the config accepts every value the sweep can propose
            assert getattr(_config(cls, tmp_path, **{param: value}), param) == value


def test_base_space_is_extended_not_replaced():
    base = ImmunizationConfig.search_space()
    assert set(base) == {"learning_rate", "max_steps"}
    for spec in DEFENSES.values():
        assert set(base) <= set(spec.search_space)


@pytest.mark.parametrize(
    "space, problem",
    [
        ({"no_such_field": {"type": "float", "low": 0.1, "high": 1.0}}, "not a field"),
        ({"alpha": {"type": "float", "low": 1.0, "high": 1.0}}, "low < high"),
        ({"alpha": {"type": "float", "low": 0.0, "high": 1.0, "log": True}}, "log scale"),
        ({"max_steps": {"type": "int", "low": 1.5, "high": 10}}, "ints"),
        ({"alpha": {"type": "uniform", "low": 0.1, "high": 1.0}}, "must be"),
        ({"alpha": {"type": "categorical", "choices": []}}, "choices"),
    ],
)
def test_bad_search_spaces_are_refused_at_registration(space, problem):
    @dataclasses.dataclass
    class BadConfig(ImmunizationConfig):
        alpha: float = dataclasses.field(default=1.0, metadata={"help": "a weight"})

        @classmethod
        def search_space(cls):
            return space

    with pytest.raises(ConfigError, match=problem):
        register_defense("bad_space_test", BadConfig, object)
    assert "bad_space_test" not in DEFENSES
