"""Progress bars a person can follow, and the cache that keeps base-model measurements."""

from __future__ import annotations

import json

from immune_trainer.progress import StageBar, StepBar
from immune_trainer.run_cache import RunCache, content_hash


def test_stage_bar_counts_stages_and_writes_every_message(monkeypatch, capsys):
    monkeypatch.delenv("IMMUNE_TRAINER_NO_PROGRESS", raising=False)
    written = []
    bar = StageBar(3, "evaluation", is_stage=lambda m: m.startswith("["), write=written.append)
    for message in ["[a] one", "detail", "[b] two", "[c] three"]:
        bar(message)
    assert bar.bar.n == 2  # a stage is counted when the next one starts
    bar.close()
    assert written == ["[a] one", "detail", "[b] two", "[c] three"]
    assert "3/3" in capsys.readouterr().err


def test_bars_are_off_when_asked(monkeypatch):
    monkeypatch.setenv("IMMUNE_TRAINER_NO_PROGRESS", "1")
    assert StageBar(2, "x", write=lambda m: None).bar is None

    class State:
        is_world_process_zero, max_steps, global_step = True, 4, 0

    step = StepBar("defense")
    step.on_train_begin(None, State(), None)
    assert step.bar is None


def test_step_bar_follows_the_trainer_and_shows_only_chosen_keys(model, tmp_path, monkeypatch, capsys):
    from transformers import PrinterCallback, Trainer, TrainingArguments

    monkeypatch.delenv("IMMUNE_TRAINER_NO_PROGRESS", raising=False)
    import datasets

    ds = datasets.Dataset.from_dict({"input_ids": [[1, 2, 3, 4]] * 8, "labels": [[1, 2, 3, 4]] * 8})
    bar = StepBar("train", keys=("loss",), leave=True)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=2,
        logging_steps=1,
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        save_strategy="no",
    )
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[bar])
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    err = capsys.readouterr()
    assert "3/3" in err.err and "loss=" in err.err
    assert "grad_norm" not in err.err + err.out  # no raw log dictionary on screen


def test_run_cache_computes_once_and_ignores_other_keys(tmp_path):
    cache = RunCache(tmp_path)
    calls = []

    def compute():
        calls.append(1)
        return {"value": 1.5}

    key = {"model": "abc", "data": content_hash([{"x": 1}])}
    assert cache.get_or_compute("capability", key, compute) == {"value": 1.5}
    assert RunCache(tmp_path).get_or_compute("capability", key, compute) == {"value": 1.5}
    assert len(calls) == 1
    assert RunCache(tmp_path).get_or_compute("capability", {**key, "model": "other"}, compute)
    assert len(calls) == 2
    path = cache.path("capability", key)
    payload = json.loads(path.read_text())
    payload["key"]["model"] = "tampered"  # a file stored under another key is never trusted
    path.write_text(json.dumps(payload))
    assert cache.get("capability", key) is None
    assert RunCache(None).get_or_compute("capability", key, compute) == {"value": 1.5}
    assert len(calls) == 3


def test_content_hash_tells_datasets_apart():
    import datasets

    a = datasets.Dataset.from_dict({"prompt": ["a", "b"]})
    b = datasets.Dataset.from_dict({"prompt": ["a", "c"]})
    assert content_hash(a) == content_hash(a.to_list()) != content_hash(b)
