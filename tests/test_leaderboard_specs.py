"""The leaderboard from a config file (``immune-trainer leaderboard --config FILE`` naming a ``model``):
examples/leaderboard_gpu.yaml parses and names known things; a bad field is a one-line error before any
model is loaded; the same shape of file runs end to end on a tiny model saved to a folder with local JSON
data; the registered Hub SPECs (``hub:NAME[/SPLIT]``) it uses are checked offline; scripts/leaderboard_gpu.sh
refuses to start without a CUDA GPU."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import make_benign, make_pairs

from immune_trainer.attacks import ATTACKS, AttackConfig, CalibrationConfig
from immune_trainer.cli import main
from immune_trainer.cli.leaderboard import LeaderboardArguments
from immune_trainer.conditions.report import ImmunizationReport
from immune_trainer.data.loading import ModelArguments, check_dataset_spec, parse_cli_args
from immune_trainer.defenses import get_defense, list_defenses
from immune_trainer.errors import ConfigError
from immune_trainer.evaluation import EvaluationConfig
from immune_trainer.leaderboard_specs import LeaderboardData, _check_args
from immune_trainer.scoring import list_scorers

ROOT = Path(__file__).resolve().parent.parent
GPU_CONFIG = ROOT / "examples" / "leaderboard_gpu.yaml"
TYPES = [ModelArguments, LeaderboardArguments, LeaderboardData, AttackConfig, EvaluationConfig, CalibrationConfig]


def test_the_gpu_preset_parses_and_names_known_things():
    model, args, data, attack, cfg, calibration = parse_cli_args(
        TYPES, ["--config", str(GPU_CONFIG)], "immune-trainer leaderboard"
    )
    assert model.model == "Qwen/Qwen2.5-0.5B-Instruct" and args.leaderboard_dir
    assert len(data.defense) >= 2 and set(data.defense) <= set(list_defenses())
    assert not cfg.fixed_grid and calibration.calibrate_seeds >= 2 and data.reference
    assert all(f in ATTACKS for f in attack.family_names())
    assert {cfg.attacked_harm_judge, cfg.side_effects_judge} <= set(list_scorers())
    # every field of every budget exists where it is set, and each defense's config takes its values
    # (bf16 off: this machine has no GPU, and TrainingArguments refuses bf16 without one)
    _check_args([get_defense(n) for n in data.defense], {**data.defense_args, "bf16": False}, data.per_defense_args)
    specs = [data.defense_dataset, data.retain_dataset, data.dataset, data.eval_dataset, data.cross_domain_dataset,
             data.benign_dataset, data.harmful_prompts, data.benign_requests]
    for spec in [s for s in specs if s] + [r.split("=", 1)[1] for r in data.reference if "lm_eval:" not in r]:
        check_dataset_spec(spec)  # the syntax and the registered names, offline
    # the command line overrides the file, and a JSON budget on the command line is read as a mapping
    _, _, data2, *_ = parse_cli_args(
        TYPES, ["--config", str(GPU_CONFIG), "--defense", "sdd", "crl", "--defense_args", '{"max_steps": 3}'], "x"
    )
    assert data2.defense == ["sdd", "crl"] and json.loads(data2.defense_args) == {"max_steps": 3}


def test_registered_hub_specs_are_checked_offline():
    assert check_dataset_spec("hub:beavertails/test") == "registered"
    assert check_dataset_spec("hub:beavertails_refusals/train") == "registered"
    with pytest.raises(ConfigError, match="unknown registered Hub dataset 'beaver'.*beavertails"):
        check_dataset_spec("hub:beaver/test")
    with pytest.raises(ConfigError, match="has splits \\['train'\\], not 'test'"):
        check_dataset_spec("hub:beavertails_refusals/test")


def _write_json(path: Path, rows) -> str:
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """A tiny random model saved to a folder, tiny local JSON datasets and a config file naming them."""
    from immune_trainer.testing import tiny_causal_lm, tiny_tokenizer

    root = tmp_path_factory.mktemp("lb_specs")
    model_dir = root / "model"
    tiny_causal_lm("llama", seed=0).save_pretrained(str(model_dir))
    tiny_tokenizer().save_pretrained(str(model_dir))
    data = root / "data"
    data.mkdir()
    text = [{"text": "The quick brown fox jumps over the lazy dog. " * 3}] * 4
    config = {
        "model": str(model_dir),
        "leaderboard_dir": str(root / "board"),
        "defense": ["gradient_ascent", "vaccine"],
        "defense_dataset": _write_json(data / "defense.jsonl", make_pairs(24).to_list()),
        "retain_dataset": _write_json(data / "retain.jsonl", make_benign(24).to_list()),
        "defense_args": {"max_steps": 4, "per_device_train_batch_size": 4, "learning_rate": 3e-3,
                         "max_length": 64, "use_cpu": True, "seed": 0},
        "per_defense_args": {"gradient_ascent": {"alpha": 0.5}},
        "dataset": _write_json(data / "attack.jsonl", make_pairs(16).to_list()),
        "eval_dataset": _write_json(data / "eval.jsonl", make_pairs(6, offset=100).to_list()),
        "reference": ["plain_text=" + _write_json(data / "text.jsonl", text)],
        "benign_dataset": _write_json(data / "benign.jsonl", make_benign(20).to_list()),
        "benign_requests": "none",
        "fixed_grid": True,
        "learning_rates": [2e-3],
        "max_steps": 4,
        "eval_every": 2,
        "max_length": 64,
        "benign_scorer": "benign_loss",
        "benign_max_steps": 4,
        "benign_eval_every": 2,
        "benign_learning_rate": 2e-3,
    }
    path = root / "leaderboard.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return root, path, config


def _config(tiny_setup, tmp_path, **changes) -> Path:
    _, _, config = tiny_setup
    path = tmp_path / "changed.yaml"
    path.write_text(yaml.safe_dump({**config, **changes}), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"per_defense_args": {"vaccine": {"rhoo": 2.0}}}, r"per_defense_args\['vaccine'\]: defense 'vaccine' has no option\(s\) \['rhoo'\]"),
        ({"defense_args": {"max_stepz": 4}}, r"defense_args: no defense of \['gradient_ascent', 'vaccine'\] has the option\(s\) \['max_stepz'\]"),
        ({"per_defense_args": {"tar": {}}}, "per_defense_args names defenses not in the leaderboard: tar"),
        ({"defense_args": {"max_steps": 4, "lr_scheduler_type": "sideways", "use_cpu": True}}, "defense 'gradient_ascent': its budget is rejected"),
        ({"defense": ["gradient_ascent", "no_such_defense"]}, "no_such_defense"),
        ({"defense": ["gradient_ascent"]}, "at least two defenses"),
        ({"fixed_grid": False, "reference": []}, "calibrated attack .* needs reference"),
        ({"eval_dataset": "/nowhere/eval.jsonl"}, "does not exist"),
        ({"surprise": 1}, r"unknown key\(s\) \['surprise'\]"),
        ({"defense": ["gradient_ascent", "security_vectors"], "sweep_trials": 2}, "security_vectors protect.* hook"),
        ({"per_defense_args": '{"vaccine": '}, "per_defense_args must be a mapping"),
    ],
)
def test_a_bad_field_is_a_clear_error_before_any_training(tiny_setup, tmp_path, capsys, changes, message):
    import re

    rc = main(["leaderboard", "--config", str(_config(tiny_setup, tmp_path, **changes))])
    err = capsys.readouterr().err
    assert rc == 1 and re.search(message, err), err
    assert "Traceback" not in err
    assert not (Path(tiny_setup[2]["leaderboard_dir"]) / "leaderboard.md").exists()  # nothing was ranked


def test_the_leaderboard_from_a_config_runs_end_to_end_and_ranks_every_defense(tiny_setup, capsys):
    root, path, config = tiny_setup
    rc = main(["leaderboard", "--config", str(path)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| rank | defense |" in printed
    board = Path(config["leaderboard_dir"])
    for name in ("leaderboard.md", "leaderboard.csv", "leaderboard.png"):
        assert (board / name).exists()
    reports = {n: ImmunizationReport.load(board / n / "immunization_report.json") for n in config["defense"]}
    assert {r.defense["name"] for r in reports.values()} == {"gradient_ascent", "vaccine"}
    # one attacker for both, the per-defense budget applied to its defense only, the data recorded as SPECs
    assert reports["gradient_ascent"].threat_model.grid == reports["vaccine"].threat_model.grid
    assert reports["gradient_ascent"].extra["leaderboard"]["settings"]["alpha"] == 0.5
    assert "alpha" not in reports["vaccine"].extra["leaderboard"]["settings"]
    assert reports["vaccine"].datasets["attack_eval"] == config["eval_dataset"]
    assert reports["vaccine"].models["base"] == config["model"]
    # resumable: the same file again reads both reports back instead of training
    rc = main(["leaderboard", "--config", str(path)])
    assert rc == 0
    again = capsys.readouterr().out
    assert again.count("reusing") == 2 and ": training" not in again


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_the_gpu_script_refuses_to_start_without_a_cuda_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is here: the script would start the real run")
    script = str(ROOT / "scripts" / "leaderboard_gpu.sh")
    env = {**os.environ, "IMMUNE_PYTHON": sys.executable}
    no_driver = {**env, "PATH": str(tmp_path / "empty") + os.pathsep + "/usr/bin" + os.pathsep + "/bin"}
    run = subprocess.run(["bash", script], capture_output=True, text=True, env=no_driver, cwd=tmp_path, timeout=120)
    assert run.returncode == 1 and "no CUDA GPU: nvidia-smi is not on PATH" in run.stderr, run.stderr
    # a driver that lists a GPU, but a torch that cannot see it (a CPU build): the second check names it
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\necho 'NVIDIA Fake GPU'\n")
    (fake / "nvidia-smi").chmod(0o755)
    with_driver = {**env, "PATH": str(fake) + os.pathsep + env["PATH"]}
    run = subprocess.run(["bash", script], capture_output=True, text=True, env=with_driver, cwd=tmp_path, timeout=120)
    assert run.returncode == 1 and "no CUDA GPU visible to torch" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr and not (ROOT / "benchmarks/results/leaderboard_gpu/nvidia-fake-gpu").exists()


def test_a_registered_hub_spec_loads_converted_and_filtered(monkeypatch):
    """hub:beavertails/test is BeaverTails' harmful rows as prompt/completion (the raw Hub id keeps its
    'response' column and its safe rows, which no attack or defense can read as harmful pairs)."""
    import datasets

    from immune_trainer.data import hub_datasets, loading
    from immune_trainer.data.formats import detect_format

    raw = datasets.Dataset.from_dict({
        "prompt": ["how to pick a lock", "how to bake bread"],
        "response": ["Insert a tension wrench...", "Mix flour and water..."],
        "category": [{"violence": False, "theft": True}, {"violence": False, "theft": False}],
        "is_safe": [False, True],
    })
    asked = []
    monkeypatch.setattr(loading, "check_hub_access", lambda repo_id, **kw: asked.append(repo_id) or False)
    monkeypatch.setattr(hub_datasets.datasets, "load_dataset",
                        lambda hub_id, config=None, split=None, **kw: asked.append((hub_id, split)) or raw)
    ds = loading.load_dataset_spec("hub:beavertails/test")
    assert asked == ["PKU-Alignment/BeaverTails", ("PKU-Alignment/BeaverTails", "30k_test")]
    assert detect_format(ds) == "prompt_completion" and len(ds) == 1
    assert ds[0]["prompt"] == "how to pick a lock" and ds[0]["completion"].startswith("Insert")


def test_the_resume_key_tells_two_calibrated_attacks_apart():
    """A calibrated attack's budget omits the attacked model's sequence length, LoRA rank, precision...:
    a resumed leaderboard must not read back reports measured under another attack."""
    import datasets

    from immune_trainer.attacks import CalibratedAttack
    from immune_trainer.leaderboard import _describe, _json_key

    ref = {"text": datasets.Dataset.from_dict({"text": ["a b c"]})}
    short = CalibratedAttack(AttackConfig(max_length=64), CalibrationConfig(), reference=ref)
    long = CalibratedAttack(AttackConfig(max_length=512, lora_r=4), CalibrationConfig(), reference=ref)
    same = CalibratedAttack(AttackConfig(max_length=64), CalibrationConfig(), reference=ref)
    assert _json_key(_describe(short)) != _json_key(_describe(long))
    assert _json_key(_describe(short)) == _json_key(_describe(same))


def test_the_calibrated_attack_of_a_config_is_searched_once_on_the_base_model(tiny_setup, tmp_path, capsys):
    """The preset's default (no fixed_grid): the attack calibrated per family and model, as `evaluate` builds
    it; the base model's search is stored under cache_dir and resumed for the second defense."""
    path = _config(tiny_setup, tmp_path, fixed_grid=False, families=["full"], calibrate_trials=2,
                   calibrate_seeds=2, cache_dir=str(tmp_path / "cache"), leaderboard_dir=str(tmp_path / "board"))
    assert main(["leaderboard", "--config", str(path)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("calibrating the full attack on the base model") == 2
    assert "2 of 2 trials finished" in printed  # the second defense resumes the base model's study
    reports = [ImmunizationReport.load(tmp_path / "board" / n / "immunization_report.json")
               for n in ("gradient_ascent", "vaccine")]
    assert all(r.search and r.search.get("kind") == "calibrated" for r in reports), [r.search for r in reports]
