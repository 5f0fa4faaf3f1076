"""ConditionsCallback and ConditionsEarlyStoppingCallback on a tiny model."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import free_port, make_benign, make_pairs
from transformers import TrainerCallback, TrainerControl, TrainerState

from immune_trainer.callbacks import (
    ConditionsCallback,
    ConditionsCallbackConfig,
    ConditionsEarlyStoppingCallback,
)
from immune_trainer.conditions.report import ImmunizationReport
from immune_trainer.defenses import GradientAscentConfig, GradientAscentTrainer
from immune_trainer.errors import ConfigError, DataError
from immune_trainer.testing import tiny_causal_lm, tiny_tokenizer


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads; on a shared 2-core machine they thrash."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _args(out, **kw):
    base = dict(
        output_dir=str(out),
        max_steps=6,
        per_device_train_batch_size=4,
        learning_rate=2e-3,
        logging_steps=3,
        save_strategy="no",
        report_to="none",
        max_length=64,
        disable_tqdm=True,
        seed=0,
    )
    base.update(kw)
    return GradientAscentConfig(**base)


def _callback(tok, **kw):
    cfg = dict(probe_every=3, probe_steps=1, learning_rates=[1e-3], batch_size=4, max_eval_samples=4)
    extra = {k: kw.pop(k) for k in list(kw) if k in ("reference", "benign", "cross_domain", "in_domain")}
    cfg.update(kw)
    return ConditionsCallback(
        tok, make_pairs(8), make_pairs(4, offset=100), config=ConditionsCallbackConfig(**cfg), **extra
    )


def _model():
    model = tiny_causal_lm("llama", seed=0)
    # Dropout makes every training step draw from the global RNG: a probe that consumed it would show.
    for module in model.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.2
    return model


def _weights(model):
    return torch.cat([p.detach().flatten().clone() for p in model.parameters()])


class _Recorder(TrainerCallback):
    """Stands in for TensorBoard / W&B: remembers what on_log received."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


def test_probes_log_persist_checkpoint_resume_and_report(tmp_path, tok):
    out = tmp_path / "run"
    recorder = _Recorder()
    cb = _callback(tok, reference={"ref": make_benign(4)}, benign=(make_benign(8), make_benign(4)))
    model = _model()
    trainer = GradientAscentTrainer(
        model=model,
        args=_args(out, save_strategy="steps", save_steps=3),
        harmful_dataset=make_pairs(16),
        processing_class=tok,
        callbacks=[cb, recorder],
    )
    trainer.train()

    probes = [h for h in trainer.state.log_history if "conditions/probe" in h]
    assert [h["step"] for h in probes][:2] == [3, 6]
    first = probes[0]
    for key in (
        "conditions/resistance/harm_before_probe",
        "conditions/resistance/harm_after_probe",
        "conditions/resistance/probe_drop",
        "conditions/stability/ref/relative_change",
        "conditions/stability/holds",
    ):
        assert key in first, key
    # The probe attack trains on the harmful data, so harm (response loss) goes down: drop > 0.
    assert first["conditions/resistance/probe_drop"] > 0
    assert first["conditions/resistance/harm_after_probe"] < first["conditions/resistance/harm_before_probe"]
    # Loggers (on_log of the other callbacks) saw the values too.
    assert any("conditions/resistance/harm_after_probe" in logs for logs in recorder.logs)
    # Persisted in trainer_state.json of the checkpoint, with the callback's exported state.
    saved = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert any("conditions/resistance/probe_drop" in h for h in saved["log_history"])
    stored = saved["stateful_callbacks"]["ConditionsCallback"]["attributes"]
    assert stored["base"]["curves"]["attack"] == cb.base["curves"]["attack"]

    # The report of the run: base = starting model, immunized = final weights.
    path = out / "immunization_report.json"
    assert cb.report_path == str(path)
    report = ImmunizationReport.load(path)
    assert report.threat_model.max_steps == 1 and report.threat_model.attack_family == "full"
    base_curve = report.curves["base"]["attack"][0]
    assert base_curve.points[0].value == pytest.approx(cb.base["curves"]["attack"][0]["points"][0]["value"])
    assert report.conditions.stability is not None and report.conditions.trainability is not None
    assert report.capability["base"]["ref"] == pytest.approx(cb.base["capability"]["ref"])

    # Resume from checkpoint-3 with a fresh callback: the starting values come from the checkpoint,
    # not from the (already trained) resumed weights.
    resumed_cb = _callback(tok, reference={"ref": make_benign(4)}, benign=(make_benign(8), make_benign(4)))
    resumed = GradientAscentTrainer(
        model=_model(),
        args=_args(tmp_path / "run2", save_strategy="steps", save_steps=3),
        harmful_dataset=make_pairs(16),
        processing_class=tok,
        callbacks=[resumed_cb],
    )
    measured_at_resume = []
    original_measure = resumed_cb.measure
    resumed_cb.measure = lambda m, **kw: measured_at_resume.append(1) or original_measure(m, **kw)
    resumed.train(resume_from_checkpoint=str(out / "checkpoint-3"))
    assert resumed_cb.base["curves"] == cb.base["curves"]
    assert resumed_cb.base["capability"] == cb.base["capability"]
    assert resumed_cb.threshold == cb.threshold
    # One probe at step 6 (the final one), none to re-measure the start.
    assert len(measured_at_resume) == 1
    assert resumed_cb.num_probes == 2


def test_trained_weights_identical_with_and_without_callback(tmp_path, tok):
    def train(callbacks):
        model = _model()
        GradientAscentTrainer(
            model=model,
            args=_args(tmp_path / str(len(callbacks)), max_steps=8, per_device_train_batch_size=4),
            harmful_dataset=make_pairs(12),  # 3 steps per epoch: probes fall mid-epoch and between epochs
            processing_class=tok,
            callbacks=callbacks,
        ).train()
        return _weights(model)

    cb = _callback(tok, probe_every=2, write_report=False)
    plain = train([])
    with_cb = train([cb])
    assert cb.num_probes >= 4  # probes at 2, 4, 6, 8 really ran
    assert torch.equal(plain, with_cb)


def test_early_stopping_fires_on_stability_break(tmp_path, tok):
    # Reference = the harmful data itself: gradient ascent makes its perplexity worse, so a zero
    # tolerance breaks at the first probe.
    cb = _callback(tok, reference={"harmful": make_pairs(4)}, stability_tolerance=0.0, write_report=False)
    stopper = ConditionsEarlyStoppingCallback(patience=0)
    trainer = GradientAscentTrainer(
        model=_model(),
        args=_args(tmp_path, max_steps=12),
        harmful_dataset=make_pairs(16),
        processing_class=tok,
        callbacks=[cb, stopper],
    )
    trainer.train()
    probe = next(h for h in trainer.state.log_history if "conditions/probe" in h)
    assert probe["conditions/stability/harmful/relative_degradation"] > 0
    assert probe["conditions/stability/holds"] == 0.0
    assert trainer.state.global_step == 3
    assert "stability" in stopper.stop_reason


def _feed(stopper, entries):
    state = TrainerState()
    control = TrainerControl()
    stopper.on_train_begin(None, state, control)
    for step, entry in enumerate(entries, start=1):
        state.log_history.append({**entry, "conditions/probe": float(step), "step": step})
        stopper.on_step_end(None, state, control)
        if control.should_training_stop:
            return step
    return None


def test_early_stopping_patience_counts_consecutive_successes():
    ok = {"conditions/all_hold": 1.0, "conditions/stability/holds": 1.0}
    bad = {"conditions/all_hold": 0.0, "conditions/stability/holds": 1.0}
    assert _feed(ConditionsEarlyStoppingCallback(patience=2), [ok, bad, ok, ok, ok]) == 4
    assert _feed(ConditionsEarlyStoppingCallback(patience=0), [ok, ok, ok]) is None
    broke = {"conditions/all_hold": 0.0, "conditions/stability/x/relative_degradation": 0.3}
    own_tolerance = ConditionsEarlyStoppingCallback(patience=0, stability_tolerance=0.2)
    assert _feed(own_tolerance, [{**broke, "conditions/stability/x/relative_degradation": 0.1}, broke]) == 2
    assert _feed(ConditionsEarlyStoppingCallback(stop_on_stability_break=False), [broke]) is None


def test_bad_configuration_and_data_get_clear_errors(tok):
    with pytest.raises(ConfigError, match="probe_steps"):
        ConditionsCallbackConfig(probe_steps=0)
    with pytest.raises(ConfigError, match="unknown attack family"):
        ConditionsCallbackConfig(family="nope")
    with pytest.raises(ConfigError, match="restore_callback_states_from_checkpoint"):
        ConditionsCallback()
    with pytest.raises(DataError, match="empty"):
        ConditionsCallback(tok, make_pairs(4), make_pairs(0))
    with pytest.raises(DataError, match=r"\(train, eval\)"):
        ConditionsCallback(tok, make_pairs(4), make_pairs(4), benign=make_benign(4))
    with pytest.raises(ConfigError, match="patience"):
        ConditionsEarlyStoppingCallback(patience=-1)
    with pytest.raises(ConfigError, match="outside the range"):
        ConditionsCallback(tok, make_pairs(4), make_pairs(4), config=ConditionsCallbackConfig(threshold=-1.0))


def test_probes_at_evaluation_reach_the_metrics(tmp_path, tok):
    cb = _callback(tok, probe_every=0, write_report=False)
    trainer = GradientAscentTrainer(
        model=_model(),
        args=_args(tmp_path, max_steps=4, eval_strategy="steps", eval_steps=2),
        harmful_dataset=make_pairs(16),
        eval_dataset=make_pairs(4, offset=50),
        processing_class=tok,
        callbacks=[cb],
    )
    trainer.train()
    steps = [h["step"] for h in trainer.state.log_history if "conditions/probe" in h]
    assert steps == [2, 4]  # one probe per evaluation; none repeated at train end
    metrics = trainer.evaluate()  # same step as the last probe: its values, no new probe
    assert "eval_loss" in metrics and "conditions/resistance/probe_drop" in metrics
    assert cb.num_probes == 2


_DDP_SCRIPT = """
import json, os, sys
import torch
torch.set_num_threads(1)
import datasets
from immune_trainer.callbacks import ConditionsCallback, ConditionsCallbackConfig
from immune_trainer.defenses import GradientAscentConfig, GradientAscentTrainer
from immune_trainer.testing import tiny_causal_lm, tiny_tokenizer

def rows(n, offset=0):
    return datasets.Dataset.from_list(
        [{"prompt": f"Explain step {i + offset}.", "completion": f"Sure, step {i + offset}: mix and bake."}
         for i in range(n)])

out = sys.argv[1]
tok = tiny_tokenizer()
cb = ConditionsCallback(tok, rows(8), rows(4, 100), reference={"r": rows(4, 200)},
    config=ConditionsCallbackConfig(probe_every=2, probe_steps=2, learning_rates=[1e-3], max_eval_samples=4))
args = GradientAscentConfig(output_dir=out, max_steps=4, per_device_train_batch_size=2, learning_rate=2e-3,
    save_strategy="no", report_to="none", max_length=64, disable_tqdm=True, seed=0, use_cpu=True)
trainer = GradientAscentTrainer(model=tiny_causal_lm("llama"), args=args, harmful_dataset=rows(16),
    processing_class=tok, callbacks=[cb])
trainer.train()
vals = [h for h in trainer.state.log_history if "conditions/probe" in h]
world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
with open(os.path.join(out, f"rank{os.environ.get('RANK', 0)}.json"), "w") as f:
    json.dump({"world": world, "vals": vals}, f)
if torch.distributed.is_initialized():  # a clean teardown: no gloo thread left running at exit
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
"""


@pytest.mark.slow
def test_ddp_two_processes_probe_identically_without_hanging(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "ddp.py"
    script.write_text(_DDP_SCRIPT)
    out = tmp_path / "out"
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--master_port", str(free_port()), str(script), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world"] == ranks[1]["world"] == 2
    assert ranks[0]["vals"] and ranks[0]["vals"] == ranks[1]["vals"]
    assert (out / "immunization_report.json").exists()
