"""The ImmunizationTrainer base and the bounded gradient-ascent defense."""

from __future__ import annotations

import os
import re

import datasets
import pytest
import torch
from conftest import defense_config, flat_parameters, make_pairs, train_on_identical_batches
from transformers import TrainerCallback

from immune_trainer.data import build_pairs
from immune_trainer.defenses import GradientAscentConfig, GradientAscentTrainer, get_defense, list_defenses
from immune_trainer.errors import ConfigError, DataError, DivergenceError
from immune_trainer.scoring import get_scorer
from immune_trainer.testing import tiny_causal_lm, tiny_tokenizer


def _config(tmp_path, **kw):
    return defense_config(GradientAscentConfig, tmp_path, **{"max_steps": 20, "logging_steps": 5, **kw})


def _harmless_side(dataset):
    """The prompts of ``dataset`` with a fixed refusal, as prompt/completion rows."""
    return datasets.Dataset.from_list(
        [{"prompt": r["prompt"], "completion": "I can't help with that."} for r in dataset]
    )


def test_registry_finds_gradient_ascent():
    assert "gradient_ascent" in list_defenses()
    spec = get_defense("gradient-ascent")
    assert spec.trainer_class is GradientAscentTrainer
    assert spec.config_class is GradientAscentConfig
    assert spec.paper["id"] == "2405.14577"
    with pytest.raises(ConfigError, match="unknown defense 'nope'.*gradient_ascent"):
        get_defense("nope")


def test_gradient_ascent_raises_harmful_loss_and_keeps_harmless(tmp_path, harmful, harmful_eval, tokenizer):
    model = tiny_causal_lm("llama", seed=0)
    loss = get_scorer("harmful_loss")
    refusals_eval = _harmless_side(harmful_eval)
    harm_before = loss.score(model, tokenizer, harmful_eval).value
    harmless_before = loss.score(model, tokenizer, refusals_eval).value

    trainer = GradientAscentTrainer(
        model=model,
        args=_config(tmp_path, alpha=1.0, refusal_column="refusal"),
        harmful_dataset=harmful.add_column("refusal", ["I can't help with that."] * len(harmful)),
        processing_class=tokenizer,
    )
    trainer.train()
    harm_after = loss.score(model, tokenizer, harmful_eval).value
    harmless_after = loss.score(model, tokenizer, refusals_eval).value
    # Intended direction: harmful responses get less likely, refusals do not get worse (bound: +5%).
    assert harm_after > harm_before + 0.5
    assert harmless_after < harmless_before * 1.05
    # Each loss term is logged.
    logged = [h for h in trainer.state.log_history if "loss/harmful" in h]
    assert logged and {"loss/harmless", "loss/ascent"} <= set(logged[-1])


def test_retain_set_is_trained_and_logged(tmp_path, harmful, benign, tokenizer):
    model = tiny_causal_lm("llama", seed=0)
    benign_loss = get_scorer("benign_loss")
    before = benign_loss.score(model, tokenizer, benign).value
    trainer = GradientAscentTrainer(
        model=model,
        args=_config(tmp_path, alpha=0.5, retain_weight=2.0),
        harmful_dataset=harmful,
        retain_dataset=benign,
        processing_class=tokenizer,
    )
    trainer.train()
    assert "loss/retain" in trainer.state.log_history[-2]
    assert benign_loss.score(model, tokenizer, benign).value < before


def test_gradient_accumulation_scales_the_loss(tmp_path):
    """With identical rows every micro-batch is the same batch, so GA=2 x 2 must equal GA=1 x 2 (SGD)."""
    (one, _), (two, _) = (
        train_on_identical_batches(
            GradientAscentTrainer,
            tmp_path / f"ga{ga}",
            gradient_accumulation_steps=ga,
            arch="llama",
            max_steps=3,
        )
        for ga in (1, 2)
    )
    assert torch.allclose(flat_parameters(one), flat_parameters(two), atol=1e-6)


@pytest.mark.parametrize("defense", ["gradient_ascent", "repnoise"])
def test_part_by_part_backward_equals_one_backward_of_the_sum(tmp_path, harmful, tokenizer, defense):
    """training_step back-propagates the retain part before computing the harmful part (half the
    activation memory); the gradient must equal that of the summed loss."""
    spec = get_defense(defense)
    model = tiny_causal_lm("llama", seed=0)
    args = spec.config_class(
        output_dir=str(tmp_path), report_to="none", max_length=64, per_device_train_batch_size=4
    )
    trainer = spec.trainer_class(model=model, args=args, harmful_dataset=harmful, processing_class=tokenizer)
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 2
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    assert len(trainer.defense_loss_parts(model, batch)) == 2
    torch.manual_seed(0)  # RepNoise draws Gaussian noise
    trainer.training_step(model, dict(batch))
    streamed = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    torch.manual_seed(0)
    (trainer.compute_defense_loss(model, batch)["loss"] / 2).backward()
    for a, b in zip(streamed, (p.grad for p in model.parameters())):
        assert torch.allclose(a, b, atol=1e-6)
    args.harmless_weight = 0.0
    assert len(trainer.defense_loss_parts(model, batch)) == 1  # nothing to retain: one part


def test_paired_dataset_and_harmless_dataset_inputs(tmp_path, harmful, tokenizer):
    paired = build_pairs(harmful, tokenizer, max_length=64)
    model = tiny_causal_lm("llama", seed=0)
    t = GradientAscentTrainer(
        model=model, args=_config(tmp_path, max_steps=2), harmful_dataset=paired, processing_class=tokenizer
    )
    assert t.train_dataset is paired
    t2 = GradientAscentTrainer(
        model=model,
        args=_config(tmp_path, max_steps=2),
        harmful_dataset=harmful,
        harmless_dataset=_harmless_side(harmful),
        processing_class=tokenizer,
    )
    assert len(t2.train_dataset) == len(harmful)
    with pytest.raises(DataError, match="already paired"):
        GradientAscentTrainer(
            model=model,
            args=_config(tmp_path),
            harmful_dataset=paired,
            harmless_dataset=harmful,
            processing_class=tokenizer,
        )


def test_bad_inputs_get_clear_errors(tmp_path, harmful, tokenizer):
    model = tiny_causal_lm("llama", seed=0)
    with pytest.raises(DataError, match="harmful_dataset"):
        GradientAscentTrainer(model=model, args=_config(tmp_path), processing_class=tokenizer)
    with pytest.raises(ConfigError, match="processing_class"):
        GradientAscentTrainer(model=model, args=_config(tmp_path), harmful_dataset=harmful)
    with pytest.raises(DataError, match="pad"):
        GradientAscentTrainer(
            model=model,
            args=_config(tmp_path),
            harmful_dataset=harmful,
            processing_class=tiny_tokenizer(pad_token=False),
        )
    with pytest.raises(DataError, match="mismatch|rows|count"):
        GradientAscentTrainer(
            model=model,
            args=_config(tmp_path),
            harmful_dataset=harmful,
            harmless_dataset=_harmless_side(harmful.select(range(5))),
            processing_class=tokenizer,
        )
    with pytest.raises(ConfigError, match="alpha"):
        _config(tmp_path, alpha=-1.0)
    with pytest.raises(ConfigError, match="ImmunizationConfig"):
        from transformers import TrainingArguments

        GradientAscentTrainer(
            model=model,
            args=TrainingArguments(output_dir=str(tmp_path)),
            harmful_dataset=harmful,
            processing_class=tokenizer,
        )


class _PoisonAfter(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))


def test_nan_loss_stops_with_term_and_step_and_keeps_checkpoint(tmp_path, harmful, tokenizer):
    model = tiny_causal_lm("llama", seed=0)
    args = _config(tmp_path, max_steps=6, save_strategy="steps", save_steps=2)
    trainer = GradientAscentTrainer(
        model=model,
        args=args,
        harmful_dataset=harmful,
        processing_class=tokenizer,
        callbacks=[_PoisonAfter(2)],
    )
    with pytest.raises(DivergenceError, match=r"'harmless' became nan at step 3"):
        trainer.train()
    assert os.path.isdir(os.path.join(args.output_dir, "checkpoint-2"))


@pytest.mark.parametrize("arch", ["gpt2", "qwen2", "gemma"])
def test_gradient_ascent_on_other_architectures(tmp_path, arch, tokenizer):
    model = tiny_causal_lm(arch, seed=0)
    trainer = GradientAscentTrainer(
        model=model,
        args=_config(tmp_path, max_steps=3),
        harmful_dataset=make_pairs(8),
        processing_class=tokenizer,
    )
    out = trainer.train()
    assert out.global_step == 3


_TAR_FAST = {"inner_steps": 2, "tr_every": 1, "adversary_learning_rates": [1e-2]}


@pytest.mark.parametrize("defense", ["gradient_ascent", "booster", "tar", "vaccine", "seam", "ctrap"])
def test_training_step_prologue_puts_model_and_schedule_free_optimizer_in_train_mode(tmp_path, defense):
    """Every training_step written here (the base's and the defenses' own) starts as the Trainer's does:
    model.train(), then optimizer.train() for an optimizer that has one (schedule-free), then
    _prepare_inputs; the loss it returns is divided by the accumulation steps."""
    spec = get_defense(defense)
    extra = _TAR_FAST if defense == "tar" else {}
    args = defense_config(spec.config_class, tmp_path, per_device_train_batch_size=2, **extra)
    trainer = spec.trainer_class(
        model=tiny_causal_lm("llama", seed=0),
        args=args,
        harmful_dataset=make_pairs(8),
        retain_dataset=datasets.Dataset.from_list([{"prompt": "What is 2 + 2?", "completion": "4."}] * 8),
        processing_class=tiny_tokenizer(),
    )
    trainer.create_optimizer()
    model = trainer.model
    calls = []
    trainer.optimizer.train = lambda: calls.append(("optimizer.train", model.training))
    prepare = trainer._prepare_inputs

    def recording_prepare(inputs):
        calls.append(("prepare", model.training))
        return prepare(inputs)

    trainer._prepare_inputs = recording_prepare
    batch = next(iter(trainer.get_train_dataloader()))
    model.eval()
    losses = {}
    for ga in (1, 2):
        calls.clear()
        trainer.current_gradient_accumulation_steps = ga
        torch.manual_seed(0)
        losses[ga] = float(trainer.training_step(model, dict(batch)))
        assert calls[:2] == [("optimizer.train", True), ("prepare", True)]
        assert [c for c, _ in calls].count("optimizer.train") == 1
        model.zero_grad()
    assert losses[2] == pytest.approx(losses[1] / 2, rel=1e-5)


@pytest.mark.parametrize(
    ("defense", "field"),
    [
        ("booster", "lamb"),
        ("booster", "alpha"),
        ("ctrap", "lamb"),
        ("ctrap", "alpha"),
        ("gradient_ascent", "harmless_weight"),
        ("tar", "lambda_retain"),
    ],
)
@pytest.mark.parametrize("value", [-0.5, float("nan"), float("inf"), "0.1", None])
def test_negative_or_non_numeric_weight_gets_config_error_naming_it(tmp_path, defense, field, value):
    """A loss weight or step size that is negative, not finite or not a number is refused with a ConfigError
    naming the field and the value (not a TypeError from math.isfinite)."""
    config_class = get_defense(defense).config_class
    message = f"{field} must be a finite non-negative number, got {value!r}."
    with pytest.raises(ConfigError, match=re.escape(message)):
        config_class(output_dir=str(tmp_path), report_to="none", **{field: value})
