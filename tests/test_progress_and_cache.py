"""Progress bars a person can follow, and the cache that keeps base-model measurements."""

from __future__ import annotations

import json

import pytest

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


def test_model_cache_keeps_recent_entries_and_never_a_partial_one(tmp_path, model):
    import torch
    from transformers import AutoModelForCausalLM

    from immune_trainer.run_cache import ModelCache

    cache = ModelCache(tmp_path, kind="immunized", keep=2)
    assert cache.get({"a": 1}) is None
    path = cache.put(
        {"a": 1}, lambda d: model.save_pretrained(str(d)), extra={"log_history": [{"loss": 1.5}]}
    )
    found, extra = cache.get({"a": 1})
    assert found == path and extra == {"log_history": [{"loss": 1.5}]}
    loaded = AutoModelForCausalLM.from_pretrained(found)
    for (name, p), q in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(p, q), name
    assert cache.get({"a": 2}) is None  # another key
    # an entry whose recorded key does not match its name is not trusted
    entry = json.loads((path / "entry.json").read_text())
    (path / "entry.json").write_text(json.dumps({**entry, "key": {"a": 3}}))
    assert cache.get({"a": 1}) is None

    def fail(directory):
        (directory / "half.bin").write_bytes(b"x")
        raise RuntimeError("killed while saving")

    with pytest.raises(RuntimeError):
        cache.put({"a": 4}, fail)
    assert cache.get({"a": 4}) is None
    assert not any(p.name.startswith(".partial") for p in (tmp_path / "immunized").iterdir())
    for i in (5, 6, 7):  # only the two most recent entries stay
        cache.put({"a": i}, lambda d: (d / "w").write_text("w"))
    assert [cache.get({"a": i}) is not None for i in (5, 6, 7)] == [False, True, True]
    assert ModelCache(None).get({"a": 6}) is None and ModelCache(None).put({"a": 6}, fail) is None


@pytest.fixture
def demo_immunize(tmp_path, monkeypatch):
    """The demo's ``_immunize`` on a tiny llama (the base) with tiny data and budgets, the user cache under
    tmp_path: ``immunize(defense, folder, **DemoConfig changes) -> (model, log, reused)``."""
    from conftest import make_benign, make_pairs

    from immune_trainer.data import assets, embedded
    from immune_trainer.defenses import get_defense
    from immune_trainer.demo import run as demo
    from immune_trainer.testing import tiny_causal_lm, tiny_tokenizer

    monkeypatch.setattr(assets, "cache_dir", lambda: tmp_path / "cache")
    monkeypatch.setattr(embedded, "load_embedded", lambda *a, **k: make_benign(8))
    monkeypatch.setattr(demo, "_cuda", lambda: False)
    base, tok = tiny_causal_lm("llama", seed=0), tiny_tokenizer()
    splits = {"defense": make_pairs(8)}

    def immunize(name, folder, **overrides):
        cfg = demo.DemoConfig(quick=True, defense_steps=2, max_length=32, batch_size=2, **overrides)
        return demo._immunize(get_defense(name), cfg, base, tok, splits, tmp_path / folder)

    immunize.base = base
    return immunize


def test_demo_reuses_the_immunized_model_only_for_the_same_training(tmp_path, demo_immunize):
    import torch

    def immunize(folder, **overrides):
        return demo_immunize("gradient_ascent", folder, **overrides)

    first, log, reused = immunize("a")
    assert not reused and any("loss" in h for h in log)
    assert any(not torch.equal(p, q) for p, q in zip(first.parameters(), demo_immunize.base.parameters()))
    again, log_again, reused = immunize("b")
    assert reused and log_again == log
    for p, q in zip(first.state_dict().values(), again.state_dict().values()):
        assert torch.equal(p, q)
    assert (tmp_path / "b" / "model.safetensors").exists()  # the output folder is complete either way
    assert not immunize("c", defense_lr=1e-4)[2]  # other settings: trained again
    assert not immunize("d", no_cache=True)[2]


def test_a_model_left_in_the_output_folder_is_reused_after_the_cache_evicted_it(tmp_path, demo_immunize):
    """The cache keeps two models; a leaderboard trains eleven. Run again into the same folder, every model
    the earlier run finished is read back from its folder, and only for the same training."""
    import torch

    from immune_trainer.run_cache import TRAINING_RECORD

    immunize = demo_immunize
    first, log, _ = immunize("gradient_ascent", "out/gradient_ascent")
    for name in ("vaccine", "repnoise"):  # two more models: the first one leaves the cache
        immunize(name, f"out/{name}")
    again, log_again, reused = immunize("gradient_ascent", "out/gradient_ascent")
    assert reused and log_again == log
    for p, q in zip(first.state_dict().values(), again.state_dict().values()):
        assert torch.equal(p, q)
    # another training into the same folder: trained again, and the record then names the new training
    assert not immunize("gradient_ascent", "out/gradient_ascent", defense_lr=1e-4)[2]
    assert immunize("gradient_ascent", "out/gradient_ascent", defense_lr=1e-4)[2]
    assert (tmp_path / "out" / "gradient_ascent" / TRAINING_RECORD).exists()


def test_demo_harmless_weight_is_each_defenses_own_unless_given(tmp_path):
    """--harmless_weight reaches the defense's config; unset, every defense keeps its own default (security
    vectors requires 0, the others weigh the refusal term 1)."""
    from immune_trainer.defenses import get_defense
    from immune_trainer.demo import DemoConfig, build_defense_config
    from immune_trainer.demo.run import _defense_summary

    def weight(name, **kw):
        cfg = DemoConfig(output_dir=str(tmp_path), **kw)
        spec = get_defense(name)
        value = build_defense_config(spec, cfg, str(tmp_path)).harmless_weight
        recipe = _defense_summary(cfg)["recipes"]["gradient_ascent"]  # cfg.defense: the default one
        assert recipe.get("harmless_weight") == kw.get("harmless_weight")
        return value

    assert weight("gradient_ascent") == 1.0 == weight("vaccine")
    assert weight("security_vectors") == 0.0
    assert weight("gradient_ascent", harmless_weight=0.5) == 0.5
