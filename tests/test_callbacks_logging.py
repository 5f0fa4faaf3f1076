"""The values ConditionsCallback measures reach the logging tools (TensorBoard here) under conditions/...

A tiny model is trained with ``report_to=["tensorboard"]``; the event files are read back with
tensorboard's ``EventAccumulator``.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_pairs

from immune_trainer.callbacks import PREFIX, ConditionsCallback, ConditionsCallbackConfig
from immune_trainer.defenses import GradientAscentConfig, GradientAscentTrainer
from immune_trainer.testing import tiny_causal_lm, tiny_tokenizer

pytest.importorskip("tensorboard")


def _scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[tuple[int, float]]] = {}
    for run in sorted(p for p in logdir.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(run.parent), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


@pytest.mark.parametrize("at_evaluate", [False, True])
def test_condition_values_reach_tensorboard(tmp_path, monkeypatch, at_evaluate):
    torch.set_num_threads(1)
    logdir = tmp_path / "tb"
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(logdir))
    tok = tiny_tokenizer()
    callback = ConditionsCallback(
        tok,
        make_pairs(8),
        make_pairs(4, offset=100),
        config=ConditionsCallbackConfig(
            probe_every=0 if at_evaluate else 2,
            probe_steps=1,
            learning_rates=[1e-3],
            batch_size=4,
            max_eval_samples=4,
            write_report=False,
        ),
    )
    schedule = dict(eval_strategy="steps", eval_steps=2) if at_evaluate else {}
    args = GradientAscentConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=5,
        per_device_train_batch_size=4,
        learning_rate=2e-3,
        logging_steps=2,
        save_strategy="no",
        report_to=["tensorboard"],
        max_length=64,
        disable_tqdm=True,
        seed=0,
        **schedule,
    )
    trainer = GradientAscentTrainer(
        model=tiny_causal_lm("llama", seed=0),
        args=args,
        harmful_dataset=make_pairs(16),
        eval_dataset=make_pairs(4, offset=200) if at_evaluate else None,
        processing_class=tok,
        callbacks=[callback],
    )
    trainer.train()

    scalars = _scalars(logdir)
    conditions = {tag: points for tag, points in scalars.items() if f"/{PREFIX}" in f"/{tag}"}
    assert conditions, f"no conditions/... scalar in TensorBoard; tags: {sorted(scalars)}"
    # Every value the callback logged to the Trainer's history is in TensorBoard, at the same step.
    logged = [e for e in trainer.state.log_history if any(k.startswith(PREFIX) for k in e)]
    assert [e["step"] for e in logged] == [2, 4, 5]  # 5: the final probe
    for entry in logged:
        for key, value in entry.items():
            if not key.startswith(PREFIX):
                continue
            tags = [t for t in conditions if t.endswith(key)]
            assert tags, f"{key} did not reach TensorBoard"
            steps = {s: v for t in tags for s, v in conditions[t]}
            assert steps.get(entry["step"]) == pytest.approx(value, rel=1e-5), (key, entry["step"])
    assert any(t.endswith("conditions/resistance/harm_after_probe") for t in conditions)
    # The final probe was logged while TensorBoard's run was open: no writer was reopened after it closed.
    assert len(list(logdir.rglob("events.out.tfevents.*"))) == 1
