"""The attack harness: equation 1 run through a real Trainer on copies of the model."""

from __future__ import annotations

import datasets
import pytest
import torch
from conftest import make_pairs

from immune_trainer.attacks import (
    ATTACKS,
    AttackConfig,
    AttackFamily,
    HarmfulFineTuningAttack,
    get_attack,
    register_attack,
)
from immune_trainer.errors import ConfigError, DataError


def _attack(**kw):
    cfg = dict(learning_rates=[2e-3], max_steps=6, eval_every=3, batch_size=4, max_length=64)
    cfg.update(kw)
    return HarmfulFineTuningAttack(AttackConfig(**cfg))


def test_attack_lowers_harmful_loss_on_undefended_model(model, tokenizer, harmful, harmful_eval):
    result = _attack().run(model, tokenizer, harmful, harmful_eval)
    (curve,) = result.curves
    assert [p.step for p in curve.points] == [0, 3, 6]
    values = [p.value for p in curve.points]
    assert values[-1] < values[0] - 0.3
    # Tokens and FLOPs grow with the steps; FLOPs = 6 N tokens for full fine-tuning.
    assert curve.points[0].tokens == 0 and curve.points[1].tokens > 0
    assert curve.points[2].tokens > curve.points[1].tokens
    n = model.num_parameters(exclude_embeddings=True)
    assert curve.points[2].flops == pytest.approx(6 * n * curve.points[2].tokens)
    assert curve.config == {
        "family": "full",
        "learning_rate": 2e-3,
        "num_samples": 0,
        "seed": 0,
        "optimizer": "adamw",
        "lr_scheduler_type": "constant",
    }
    assert result.worst_value(higher_is_better=True) == min(values)


def test_input_model_is_never_modified(model, tokenizer, harmful, harmful_eval):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    flags = [p.requires_grad for p in model.parameters()]
    _attack(family="lora").run(model, tokenizer, harmful, harmful_eval)
    _attack().run(model, tokenizer, harmful, harmful_eval)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not model.training
    assert flags == [p.requires_grad for p in model.parameters()]
    assert not hasattr(model, "peft_config")


def test_lora_family_attacks_and_costs_less_per_token(model, tokenizer, harmful, harmful_eval):
    result = _attack(family="lora", learning_rates=[1e-2]).run(model, tokenizer, harmful, harmful_eval)
    (curve,) = result.curves
    assert curve.points[-1].value < curve.points[0].value
    n = model.num_parameters(exclude_embeddings=True)
    assert curve.points[-1].flops == pytest.approx(4 * n * curve.points[-1].tokens)


def test_grid_covers_every_setting_and_is_reproducible(model, tokenizer, harmful, harmful_eval):
    attack = _attack(learning_rates=[1e-3, 2e-3], num_samples=[8, 0], seeds=[0, 1], max_steps=2, eval_every=2)
    result = attack.run(model, tokenizer, harmful, harmful_eval)
    assert len(result.curves) == 8
    settings = {(c.config["learning_rate"], c.config["num_samples"], c.config["seed"]) for c in result.curves}
    assert len(settings) == 8
    again = _attack(learning_rates=[1e-3], num_samples=[8], seeds=[1], max_steps=2, eval_every=2).run(
        model, tokenizer, harmful, harmful_eval
    )
    match = next(c for c in result.curves if c.config == again.curves[0].config)
    assert [p.value for p in match.points] == [p.value for p in again.curves[0].points]


def test_prepare_model_hook_is_applied_to_each_copy(model, tokenizer, harmful, harmful_eval):
    seen = []

    def hook(m):
        seen.append(m)
        assert m is not model
        return m

    _attack(seeds=[0, 1], max_steps=1, eval_every=1).run(
        model, tokenizer, harmful, harmful_eval, prepare_model=hook
    )
    assert len(seen) == 2 and seen[0] is not seen[1]


def test_interrupted_grid_resumes_from_finished_settings(
    tmp_path, model, tokenizer, harmful, harmful_eval, monkeypatch
):
    out = str(tmp_path / "attack")
    first = _attack(learning_rates=[1e-3, 2e-3], max_steps=2, eval_every=1, output_dir=out)
    calls = []
    original = HarmfulFineTuningAttack._run_one

    def crash_on_second(self, *args, **kwargs):
        calls.append(args[4]["learning_rate"])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(HarmfulFineTuningAttack, "_run_one", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        first.run(model, tokenizer, harmful, harmful_eval)
    monkeypatch.setattr(HarmfulFineTuningAttack, "_run_one", original)

    ran = []

    def count(self, *args, **kwargs):
        ran.append(args[4]["learning_rate"])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(HarmfulFineTuningAttack, "_run_one", count)
    resumed = _attack(learning_rates=[1e-3, 2e-3], max_steps=2, eval_every=1, output_dir=out).run(
        model, tokenizer, harmful, harmful_eval
    )
    assert ran == [2e-3]  # the finished 1e-3 run was reused
    monkeypatch.setattr(HarmfulFineTuningAttack, "_run_one", original)
    fresh = _attack(learning_rates=[1e-3, 2e-3], max_steps=2, eval_every=1).run(
        model, tokenizer, harmful, harmful_eval
    )
    assert [c.to_dict() for c in resumed.curves] == [c.to_dict() for c in fresh.curves]
    # A different model does not reuse the saved runs.
    other = type(model)(model.config)
    ran.clear()
    monkeypatch.setattr(HarmfulFineTuningAttack, "_run_one", count)
    _attack(learning_rates=[1e-3, 2e-3], max_steps=2, eval_every=1, output_dir=out).run(
        other, tokenizer, harmful, harmful_eval
    )
    assert ran == [1e-3, 2e-3]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"learning_rates": [0.0]}, "learning_rates"),
        ({"learning_rates": []}, "learning_rates"),
        ({"max_steps": 0}, "max_steps"),
        ({"eval_every": 0}, "eval_every"),
        ({"num_samples": [-1]}, "num_samples"),
        ({"seeds": []}, "seeds"),
        ({"family": "telepathy"}, "unknown attack family 'telepathy'"),
    ],
)
def test_bad_config_gets_clear_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        AttackConfig(**kwargs)


def test_bad_data_gets_clear_error(model, tokenizer, harmful, harmful_eval):
    empty = datasets.Dataset.from_dict({"prompt": [], "completion": []})
    with pytest.raises(DataError, match="empty"):
        _attack().run(model, tokenizer, empty, harmful_eval)
    with pytest.raises(DataError, match="empty"):
        _attack().run(model, tokenizer, harmful, empty)
    with pytest.raises(DataError, match="num_samples=100 exceeds the 24 rows"):
        _attack(num_samples=[100]).run(model, tokenizer, harmful, harmful_eval)
    with pytest.raises(DataError, match="column"):
        _attack().run(model, tokenizer, datasets.Dataset.from_dict({"question": ["hi"]}), harmful_eval)


def test_attack_registry_accepts_new_families():
    class Frozen(AttackFamily):
        name = "test_frozen_embeddings"
        description = "test family"

    family = register_attack(Frozen())
    try:
        assert get_attack("test_frozen_embeddings") is family
        with pytest.raises(ConfigError, match="already registered"):
            register_attack(Frozen())
    finally:
        ATTACKS.pop("test_frozen_embeddings")
    assert make_pairs(2)[0]["prompt"]
