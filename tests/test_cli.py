"""The immune-trainer command line."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import make_pairs

from immune_trainer.cli import main
from immune_trainer.testing import tiny_causal_lm, tiny_tokenizer


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model_dir = root / "model"
    tiny_causal_lm("llama", seed=0).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    make_pairs(12).to_json(root / "train.jsonl")
    make_pairs(4, offset=100).to_json(root / "eval.jsonl")
    return root


def _attack_args(root):
    return {
        "model": str(root / "model"),
        "dataset": str(root / "train.jsonl"),
        "eval_dataset": str(root / "eval.jsonl"),
        "learning_rates": [0.002],
        "max_steps": 2,
        "eval_every": 1,
        "max_length": 64,
    }


def test_config_yaml_run_equals_flags_run(workdir, capsys):
    args = _attack_args(workdir)
    flags = []
    for key, value in args.items():
        flags += [f"--{key}"] + ([str(v) for v in value] if isinstance(value, list) else [str(value)])
    assert main(["attack", *flags, "--output", str(workdir / "flags.json")]) == 0
    out = capsys.readouterr().out
    assert "step 0" in out and "lr=0.002" in out

    config = workdir / "attack.yaml"
    config.write_text(yaml.safe_dump({**args, "output": str(workdir / "yaml.json")}))
    assert main(["attack", "--config", str(config)]) == 0
    from_flags = json.loads((workdir / "flags.json").read_text())
    from_yaml = json.loads((workdir / "yaml.json").read_text())
    assert from_flags["curves"] == from_yaml["curves"]
    assert from_flags["config"] == {**from_yaml["config"]}
    values = [p["value"] for p in from_flags["curves"][0]["points"]]
    assert len(values) == 3 and values[-1] < values[0]

    # A flag overrides the file.
    assert (
        main(["attack", "--config", str(config), "--max_steps", "1", "--output", str(workdir / "o.json")])
        == 0
    )
    assert json.loads((workdir / "o.json").read_text())["config"]["max_steps"] == 1


def test_immunize_trains_and_saves_a_model(workdir, capsys):
    out = workdir / "immunized"
    code = main(
        [
            "immunize",
            "--defense",
            "gradient_ascent",
            "--model",
            str(workdir / "model"),
            "--dataset",
            str(workdir / "train.jsonl"),
            "--retain_dataset",
            str(workdir / "eval.jsonl"),
            "--output_dir",
            str(out),
            "--max_steps",
            "2",
            "--max_length",
            "64",
            "--report_to",
            "none",
            "--save_strategy",
            "no",
        ]
    )
    assert code == 0
    assert (out / "model.safetensors").exists()
    assert "gradient_ascent" in capsys.readouterr().out


def test_immunize_a_defense_that_takes_no_retain_set_with_the_default_options(workdir, capsys):
    """security_vectors trains on harmful data only: the default retain set is not given to it (it refuses
    one); a retain set the user names is, and the defense's error says why not."""
    common = ["immunize", "--defense", "security_vectors", "--model", str(workdir / "model"), "--dataset",
              str(workdir / "train.jsonl"), "--max_steps", "1", "--max_length", "64", "--report_to", "none",
              "--save_strategy", "no"]
    assert main([*common, "--output_dir", str(workdir / "vector")]) == 0
    assert (workdir / "vector" / "adapter_config.json").exists()
    assert main([*common, "--output_dir", str(workdir / "v2"), "--retain_dataset", str(workdir / "eval.jsonl")]) == 1
    assert "do not pass a retain_dataset" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["immunize", "--defense", "nope"], "unknown defense 'nope'"),
        (["immunize", "--model", "x"], "needs --defense"),
        (["attack", "--model", "/nonexistent/model"], "cannot load model"),
        (["attack", "--model", "MODEL", "--dataset", "notes.txt"], "cannot read dataset file"),
        (["attack", "--model", "MODEL", "--dataset", "no_such_thing"], "neither a file"),
        (["attack", "--model", "MODEL", "--learning_rates", "-1"], "learning_rates"),
    ],
)
def test_bad_input_exits_with_a_clear_message(workdir, capsys, argv, message):
    (workdir / "notes.txt").write_text("hello")
    argv = [
        str(workdir / "model") if a == "MODEL" else (str(workdir / a) if a == "notes.txt" else a)
        for a in argv
    ]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_unknown_command_and_help(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err
    assert main([]) == 0
    assert "attack" in capsys.readouterr().out
    assert main(["defenses"]) == 0
    assert "gradient_ascent" in capsys.readouterr().out
