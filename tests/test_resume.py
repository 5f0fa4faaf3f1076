"""A defense run killed after a checkpoint and resumed ends where an uninterrupted run ends."""

from __future__ import annotations

import pytest
import torch
from conftest import make_benign, make_pairs
from transformers import TrainerCallback

from immune_trainer.callbacks import ConditionsCallback, ConditionsCallbackConfig
from immune_trainer.defenses import GradientAscentConfig, GradientAscentTrainer
from immune_trainer.testing import tiny_causal_lm


class _Kill(TrainerCallback):
    """Simulates the process dying right after step ``step`` (after the checkpoint before it was saved)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


def _trainer(out, tokenizer, callbacks):
    args = GradientAscentConfig(
        output_dir=str(out),
        max_steps=6,
        per_device_train_batch_size=4,
        learning_rate=2e-3,
        logging_steps=1,
        save_strategy="steps",
        save_steps=3,
        report_to="none",
        max_length=64,
        disable_tqdm=True,
        seed=0,
        use_cpu=True,
    )
    return GradientAscentTrainer(
        model=tiny_causal_lm("llama", seed=0),
        args=args,
        harmful_dataset=make_pairs(16),
        retain_dataset=make_benign(10),  # not a multiple of the batch: the resume crosses a retain epoch
        processing_class=tokenizer,
        callbacks=callbacks,
    )


def _conditions_log(trainer):
    return [
        {k: v for k, v in h.items() if k.startswith("conditions/") and k != "conditions/probe_seconds"}
        for h in trainer.state.log_history
        if any(k.startswith("conditions/") for k in h)
    ]


def _callback(tokenizer):
    return ConditionsCallback(
        tokenizer,
        make_pairs(8, offset=40),
        make_pairs(4, offset=80),
        reference={"chat": make_benign(4)},
        config=ConditionsCallbackConfig(
            probe_every=3, probe_steps=2, learning_rates=[1e-3], max_eval_samples=4
        ),
    )


def test_resumed_defense_run_matches_uninterrupted(tmp_path, tokenizer):
    full = _trainer(tmp_path / "full", tokenizer, [_callback(tokenizer)])
    full.train()

    killed = _trainer(tmp_path / "killed", tokenizer, [_callback(tokenizer), _Kill(4)])
    with pytest.raises(KeyboardInterrupt):
        killed.train()
    assert (tmp_path / "killed" / "checkpoint-3").is_dir()

    resumed = _trainer(tmp_path / "killed", tokenizer, [_callback(tokenizer)])
    resumed.train(resume_from_checkpoint=str(tmp_path / "killed" / "checkpoint-3"))

    for (name, a), b in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.allclose(a, b, atol=1e-6), name

    # The per-term losses after the resume and the condition log are those of the uninterrupted run.
    def terms(trainer, step):
        return next(
            {k: v for k, v in h.items() if k.startswith("loss/")}
            for h in trainer.state.log_history
            if h.get("step") == step and "loss/retain" in h
        )

    for step in (4, 5, 6):
        assert terms(resumed, step) == pytest.approx(terms(full, step), rel=1e-5)
    got, want = _conditions_log(resumed), _conditions_log(full)
    assert len(got) == len(want) >= 2  # probes at steps 3 and 6 (the resumed run restored the first)
    for g, w in zip(got, want):
        assert g == pytest.approx(w, rel=1e-5)
