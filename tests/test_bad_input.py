"""Reliability: every bad input a user can give gets a deliberate error that names the problem and the fix.

Two tables drive most of this file: one over the Python API (the exception class, a subclass of
``ImmuneTrainerError``, and a regex of its message) and one over the command line (exit status 1 and
``error: <message>`` on stderr, never a traceback). Then: outputs are written atomically (a failure while
writing keeps the previous file and leaves no temporary file), models load as safetensors only with
remote code off, 4-bit QLoRA refuses to run without CUDA and bitsandbytes, and every registered defense
trains with gradient checkpointing.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import pytest
import torch
import transformers
import yaml
from conftest import make_benign, make_pairs

from immune_trainer import data as data_lib
from immune_trainer.attacks import AttackConfig, HarmfulFineTuningAttack, register_attack
from immune_trainer.cli import main
from immune_trainer.conditions import AttackCurve, CurvePoint
from immune_trainer.conditions.report import ImmunizationReport, ThreatModel, build_report
from immune_trainer.data import formats as data_formats
from immune_trainer.data.loading import ModelArguments, load_dataset_spec, load_model_and_tokenizer
from immune_trainer.defenses import (
    DEFENSES,
    GradientAscentConfig,
    GradientAscentTrainer,
    RepNoiseConfig,
    RepNoiseTrainer,
    get_defense,
)
from immune_trainer.errors import (
    ConfigError,
    DataError,
    ImmuneTrainerError,
    ModelStructureError,
    OutputError,
    ReportError,
)
from immune_trainer.evaluation import ConditionDatasets, evaluate_conditions
from immune_trainer.files import atomic_write
from immune_trainer.modeling import find_decoder_structure
from immune_trainer.scoring import get_scorer
from immune_trainer.testing import tiny_causal_lm, tiny_tokenizer

# ---------------------------------------------------------------------------------------------- fixtures


@functools.lru_cache(maxsize=1)
def _tok():
    return tiny_tokenizer()


@functools.lru_cache(maxsize=1)
def _model():
    return tiny_causal_lm("llama", seed=0)


def _bert():
    config = transformers.BertConfig(
        vocab_size=512, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    torch.manual_seed(0)
    return transformers.BertForMaskedLM(config)


def _report() -> ImmunizationReport:
    def curve(values):
        return AttackCurve(
            config={"family": "full", "learning_rate": 3e-5},
            points=[CurvePoint(step=5 * i, tokens=0, flops=0.0, value=v) for i, v in enumerate(values)],
        )

    threat = ThreatModel(
        attack_family="full",
        scorer="harmful_loss",
        higher_is_better=True,
        threshold=2.0,
        scorer_range=(0.0, math.inf),
        threshold_source="given by the user",
        grid={"learning_rates": [3e-5], "num_samples": [0], "seeds": [0]},
        max_steps=10,
        eval_every=5,
        batch_size=4,
        max_length=64,
    )
    return build_report(
        threat_model=threat,
        base_model="base",
        immunized_model="immunized",
        base_curves={"attack": [curve([2.2, 2.0, 1.9])]},
        immunized_curves={"attack": [curve([3.0, 2.6, 2.3])]},
    )


def _model_folder(root: Path, name: str = "model") -> Path:
    folder = root / name
    _model().save_pretrained(folder)
    _tok().save_pretrained(folder)
    return folder


def _pickle_only_folder(root: Path) -> Path:
    """A model folder whose weights are only a pickle (``torch.save`` of a state dict)."""
    folder = root / "pickle_model"
    folder.mkdir()
    _model().config.save_pretrained(folder)
    _tok().save_pretrained(folder)
    torch.save(_model().state_dict(), folder / "pytorch_model.bin")
    return folder


def _remote_code_folder(root: Path) -> Path:
    """A model folder whose config.json asks for custom code (auto_map) that must never run.

    The custom module, if it were ever imported, writes ``EXECUTED`` next to itself.
    """
    folder = _model_folder(root, "remote_code_model")
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "immune_custom_llama"
    config["auto_map"] = {
        "AutoConfig": "custom_model.CustomConfig",
        "AutoModelForCausalLM": "custom_model.CustomModel",
    }
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "custom_model.py").write_text(
        "from pathlib import Path\nPath(__file__).with_name('EXECUTED').write_text('ran')\n"
    )
    return folder


def _ds(rows: list[dict]) -> datasets.Dataset:
    return datasets.Dataset.from_list(rows)


def _empty_prompt_completion() -> datasets.Dataset:
    return datasets.Dataset.from_dict({"prompt": [], "completion": []})


def _attack(**kw) -> HarmfulFineTuningAttack:
    cfg = dict(learning_rates=[1e-3], max_steps=1, eval_every=1, batch_size=2, max_length=64)
    cfg.update(kw)
    return HarmfulFineTuningAttack(AttackConfig(**cfg))


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _evaluate_with_out_of_range_phi():
    attack = HarmfulFineTuningAttack(
        AttackConfig(learning_rates=[1e-3], max_steps=1, eval_every=1), scorer=get_scorer("offline_judge")
    )
    sets = ConditionDatasets(attack_train=make_pairs(4), attack_eval=make_pairs(2, offset=50))
    return evaluate_conditions(_model(), _model(), _tok(), sets, attack=attack, threshold=2.0)


def _repnoise_on_bert(tmp: Path):
    cfg = RepNoiseConfig(
        output_dir=str(tmp / "rn"),
        max_steps=1,
        per_device_train_batch_size=2,
        save_strategy="no",
        report_to="none",
        max_length=64,
        disable_tqdm=True,
        use_cpu=True,
    )
    trainer = RepNoiseTrainer(model=_bert(), args=cfg, harmful_dataset=make_pairs(2), processing_class=_tok())
    trainer.train()


# ---------------------------------------------------------------------------------------------- API table


@dataclass
class Case:
    id: str
    trigger: Any  # callable(tmp_path) that feeds the bad input
    error: type[ImmuneTrainerError]
    match: str


API_CASES = [
    # --- datasets: formats, empty sets, missing columns
    Case(
        "dataset_dict_instead_of_split",
        lambda t: data_lib.detect_format(datasets.DatasetDict({"train": make_pairs(2)})),
        DataError,
        r"DatasetDict with splits \['train'\]; pass one split",
    ),
    Case(
        "list_instead_of_dataset",
        lambda t: data_lib.tokenize_supervised([{"prompt": "a", "completion": "b"}], _tok()),
        DataError,
        r"expected a datasets\.Dataset.*Dataset\.from_list",
    ),
    Case(
        "empty_dataset",
        lambda t: data_lib.tokenize_supervised(_empty_prompt_completion(), _tok()),
        DataError,
        r"is empty; it needs at least one row",
    ),
    Case(
        "missing_columns",
        lambda t: data_lib.tokenize_supervised(_ds([{"question": "q", "answer": "a"}]), _tok()),
        DataError,
        r"has columns \['answer', 'question'\]; expected 'prompt' and 'completion'.*column_map",
    ),
    Case(
        "wrong_column_types",
        lambda t: data_lib.detect_format(_ds([{"prompt": 3, "completion": "a"}])),
        DataError,
        r"must both be str .* row 0 has prompt int",
    ),
    Case(
        "messages_without_assistant_turn",
        lambda t: data_lib.tokenize_supervised(
            _ds([{"messages": [{"role": "user", "content": "hi"}]}]), _tok()
        ),
        DataError,
        r"row 0: column 'messages' has no assistant turn",
    ),
    Case(
        "column_map_names_missing_column",
        lambda t: data_lib.tokenize_supervised(make_pairs(2), _tok(), column_map={"response": "completion"}),
        DataError,
        r"column_map names columns \['response'\].*does not have",
    ),
    Case(
        "tokenizer_without_pad_token",
        lambda t: data_lib.tokenize_supervised(make_pairs(2), tiny_tokenizer(pad_token=False)),
        DataError,
        r"no pad token.*tokenizer\.pad_token = tokenizer\.eos_token",
    ),
    Case(
        "prompt_longer_than_max_length",
        lambda t: data_lib.tokenize_supervised(make_pairs(2), _tok(), max_length=4),
        DataError,
        r"row 0: the prompt has \d+ tokens.*max_length=4; raise max_length",
    ),
    Case(
        "mismatched_pair_counts",
        lambda t: data_lib.pair_datasets(make_pairs(3), make_pairs(2), _tok()),
        DataError,
        r"harmful dataset has 3 rows but the harmless one has 2",
    ),
    # --- registries
    Case(
        "unknown_defense",
        lambda t: get_defense("vaccinee"),
        ConfigError,
        r"unknown defense 'vaccinee'.*repnoise",
    ),
    Case(
        "unknown_scorer",
        lambda t: get_scorer("harm_loss"),
        ConfigError,
        r"Unknown scorer 'harm_loss'.*harmful_loss",
    ),
    Case(
        "unknown_attack_family",
        lambda t: AttackConfig(family="qlora"),
        ConfigError,
        r"unknown attack family 'qlora'; known families: .*full, identity_shift, .*jailbreak_tuning, lora",
    ),
    Case(
        "attack_family_registered_twice",
        lambda t: register_attack(type("Dup", (), {"name": "full"})()),
        ConfigError,
        r"'full' is already registered",
    ),
    # --- attack configuration values
    Case(
        "attack_negative_learning_rate",
        lambda t: AttackConfig(learning_rates=[-1e-5]),
        ConfigError,
        r"learning_rates must be positive",
    ),
    Case(
        "attack_learning_rate_not_a_number",
        lambda t: AttackConfig(learning_rates=["fast"]),
        ConfigError,
        r"learning_rates must be positive numbers, got \['fast'\]",
    ),
    Case(
        "attack_zero_max_steps",
        lambda t: AttackConfig(max_steps=0),
        ConfigError,
        r"max_steps must be positive",
    ),
    Case("attack_zero_max_length", lambda t: AttackConfig(max_length=0), ConfigError, r"max_length must be"),
    Case(
        "attack_zero_lora_rank",
        lambda t: AttackConfig(family="lora", lora_r=0),
        ConfigError,
        r"lora_r must be",
    ),
    Case(
        "attack_4bit_with_full_fine_tuning",
        lambda t: AttackConfig(family="full", load_in_4bit=True),
        ConfigError,
        r"load_in_4bit \(QLoRA\) applies to family='lora'",
    ),
    Case(
        "attack_num_samples_larger_than_data",
        lambda t: _attack(num_samples=[100]).run(_model(), _tok(), make_pairs(4), make_pairs(2, offset=50)),
        DataError,
        r"num_samples=100 exceeds the 4 rows",
    ),
    Case(
        "attack_eval_dataset_empty",
        lambda t: _attack().run(_model(), _tok(), make_pairs(4), _empty_prompt_completion()),
        DataError,
        r"held-out harmful evaluation dataset is empty",
    ),
    Case(
        "attack_train_dataset_empty",
        lambda t: _attack().run(_model(), _tok(), _empty_prompt_completion(), make_pairs(2)),
        DataError,
        r"harmful training dataset is empty",
    ),
    # --- defense configuration values
    Case(
        "defense_negative_alpha",
        lambda t: GradientAscentConfig(output_dir=str(t / "o"), report_to="none", alpha=-1.0),
        ConfigError,
        r"alpha must be a finite non-negative number, got -1\.0",
    ),
    Case(
        "defense_nan_weight",
        lambda t: RepNoiseConfig(output_dir=str(t / "o"), report_to="none", retain_weight=float("nan")),
        ConfigError,
        r"retain_weight must be a finite non-negative number",
    ),
    Case(
        "defense_zero_max_length",
        lambda t: GradientAscentConfig(output_dir=str(t / "o"), report_to="none", max_length=0),
        ConfigError,
        r"max_length must be positive",
    ),
    Case(
        "defense_without_tokenizer",
        lambda t: GradientAscentTrainer(
            model=_model(),
            args=GradientAscentConfig(output_dir=str(t / "o"), report_to="none"),
            harmful_dataset=make_pairs(2),
        ),
        ConfigError,
        r"Pass the tokenizer as processing_class",
    ),
    # --- model structure
    Case(
        "bert_has_no_decoder_layers",
        lambda t: find_decoder_structure(_bert()),
        ModelStructureError,
        r"Could not find the decoder layers of BertForMaskedLM",
    ),
    Case(
        "repnoise_on_bert",
        _repnoise_on_bert,
        ModelStructureError,
        r"decoder layers of BertForMaskedLM",
    ),
    # --- phi outside the judge's range
    Case(
        "threshold_outside_scorer_range",
        lambda t: get_scorer("offline_judge").validate_threshold(2.0),
        ConfigError,
        r"phi=2\.0 is outside the range of scorer 'offline_judge', \[0\.0, 1\.0\]",
    ),
    Case(
        "evaluate_conditions_threshold_outside_judge_range",
        lambda t: _evaluate_with_out_of_range_phi(),
        ConfigError,
        r"outside the range of scorer 'offline_judge'",
    ),
    Case(
        "threshold_not_finite",
        lambda t: get_scorer("harmful_loss").validate_threshold(float("nan")),
        ConfigError,
        r"outside the range of scorer 'harmful_loss'",
    ),
    # --- reports
    Case(
        "corrupted_report_json",
        lambda t: ImmunizationReport.load(_write(t / "r.json", '{"schema_version": "1.0", "mod')),
        ReportError,
        r"r\.json is not valid JSON \(line 1, column \d+.*regenerate the report",
    ),
    Case(
        "report_not_an_object",
        lambda t: ImmunizationReport.load(_write(t / "r.json", "[1, 2]")),
        ReportError,
        r"expected a JSON object, got list",
    ),
    Case("report_missing", lambda t: ImmunizationReport.load(t / "nope.json"), ReportError, r"no report at"),
    Case(
        "report_saved_under_a_regular_file",
        lambda t: _report().save(_write(t / "file.txt", "x") / "report.json"),
        OutputError,
        r"cannot write the report to .*file\.txt/report\.json",
    ),
    # --- dataset SPECs and model paths
    Case(
        "dataset_spec_does_not_exist",
        lambda t: load_dataset_spec(str(t / "missing.jsonl")),
        DataError,
        r"missing\.jsonl' does not exist; check the path",
    ),
    Case(
        "dataset_spec_unsupported_suffix",
        lambda t: load_dataset_spec(str(_write(t / "data.txt", "hello"))),
        DataError,
        r"use \.json, \.jsonl, \.csv or \.parquet",
    ),
    Case(
        "dataset_file_empty",
        lambda t: load_dataset_spec(str(_write(t / "empty.jsonl", ""))),
        DataError,
        r"empty\.jsonl' is empty",
    ),
    Case(
        "dataset_file_corrupted",
        lambda t: load_dataset_spec(str(_write(t / "bad.jsonl", '{"prompt": "a", \n'))),
        DataError,
        r"cannot read dataset file .*bad\.jsonl' as json",
    ),
    Case(
        "dataset_folder_not_saved_dataset",
        lambda t: load_dataset_spec(str(_write(t / "folder" / "notes.md", "x").parent)),
        DataError,
        r"is not a dataset written by Dataset\.save_to_disk",
    ),
    Case(
        "model_path_does_not_exist",
        lambda t: load_model_and_tokenizer(ModelArguments(model=str(t / "no_model"))),
        ConfigError,
        r"cannot load model .*no_model': no such folder.*save_pretrained",
    ),
    Case(
        "model_folder_pickle_only",
        lambda t: load_model_and_tokenizer(ModelArguments(model=str(_pickle_only_folder(t)))),
        ConfigError,
        r"only pickle weights \(pytorch_model\.bin\); immune_trainer loads safetensors only",
    ),
    Case(
        "model_needs_remote_code",
        lambda t: load_model_and_tokenizer(ModelArguments(model=str(_remote_code_folder(t)))),
        ConfigError,
        r"needs custom code .*trust_remote_code is off, so none was run",
    ),
]


@pytest.mark.parametrize("case", API_CASES, ids=[c.id for c in API_CASES])
def test_bad_input_gets_a_deliberate_error(case, tmp_path):
    assert issubclass(case.error, ImmuneTrainerError)
    with pytest.raises(case.error, match=case.match) as info:
        case.trigger(tmp_path)
    # The message is ours (not a library's re-raised text), and it is one readable sentence or more.
    assert type(info.value).__module__ == "immune_trainer.errors"
    assert len(str(info.value)) > 20


def test_table_is_broad():
    assert len(API_CASES) >= 24
    assert len({c.id for c in API_CASES}) == len(API_CASES)
    assert {c.error for c in API_CASES} >= {
        ConfigError,
        DataError,
        ReportError,
        ModelStructureError,
        OutputError,
    }


def test_tokenizer_without_chat_template_uses_the_plain_format_with_a_warning(caplog, monkeypatch):
    monkeypatch.setattr(data_formats, "_warned_plain_format", set())
    tok = tiny_tokenizer(chat_template=False)
    with caplog.at_level(logging.WARNING, logger="immune_trainer"):
        out = data_lib.tokenize_supervised(make_pairs(2), tok, max_length=128)
    assert len(out) == 2
    assert "no chat template" in caplog.text and "plain format" in caplog.text
    text = tok.decode(out[0]["input_ids"])
    assert "User: Explain step 0" in text and "Assistant:" in text
    # Labels cover the response only: the prompt part is masked.
    assert out[0]["labels"][0] == -100 and out[0]["labels"][-1] != -100


# ---------------------------------------------------------------------------------------------- CLI table


@pytest.fixture(scope="module")
def cli_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_cli")
    _model_folder(root)
    make_pairs(6).to_json(root / "train.jsonl")
    make_pairs(2, offset=100).to_json(root / "eval.jsonl")
    (root / "unknown_key.yaml").write_text(yaml.safe_dump({"max_steps": 1, "max_stepz": 2}))
    (root / "broken.yaml").write_text("learning_rates: [0.001\n")
    card = root / "card_corrupt"
    card.mkdir()
    (card / "immunization_report.json").write_text('{"schema_version": "1.0", "conditi')
    _pickle_only_folder(root)
    return root


def _attack_argv(root: Path, **over) -> list[str]:
    args = {
        "--model": str(root / "model"),
        "--dataset": str(root / "train.jsonl"),
        "--eval_dataset": str(root / "eval.jsonl"),
        "--max_steps": "1",
        "--eval_every": "1",
        "--max_length": "64",
        "--output": str(root / "curves.json"),
    }
    args.update(over)
    return ["attack"] + [x for k, v in args.items() for x in (k, v)]


CLI_CASES = [
    (
        "config_file_missing",
        lambda r: ["attack", "--config", str(r / "missing.yaml")],
        r"config file .*missing\.yaml' does not exist",
    ),
    (
        "config_unknown_key",
        lambda r: ["attack", "--config", str(r / "unknown_key.yaml")],
        r"unknown key\(s\) \['max_stepz'\]",
    ),
    (
        "config_invalid_yaml",
        lambda r: ["attack", "--config", str(r / "broken.yaml")],
        r"broken\.yaml' is not valid YAML",
    ),
    (
        "model_path_missing",
        lambda r: _attack_argv(r, **{"--model": str(r / "nope")}),
        r"cannot load model .*nope': no such folder",
    ),
    (
        "model_pickle_only",
        lambda r: _attack_argv(r, **{"--model": str(r / "pickle_model")}),
        r"only pickle weights",
    ),
    (
        "dataset_spec_missing",
        lambda r: _attack_argv(r, **{"--dataset": str(r / "nope.jsonl")}),
        r"nope\.jsonl' does not exist",
    ),
    (
        "eval_dataset_empty",
        lambda r: _attack_argv(r, **{"--eval_dataset": str(_write(r / "e.jsonl", ""))}),
        r"e\.jsonl' is empty",
    ),
    (
        "num_samples_too_large",
        lambda r: _attack_argv(r, **{"--num_samples": "50"}),
        r"num_samples=50 exceeds the 6 rows",
    ),
    (
        "negative_learning_rate",
        lambda r: _attack_argv(r, **{"--learning_rates": "-0.1"}),
        r"learning_rates must be positive",
    ),
    (
        "unknown_attack_family",
        lambda r: _attack_argv(r, **{"--family": "qlora"}),
        r"unknown attack family 'qlora'",
    ),
    ("unknown_scorer", lambda r: _attack_argv(r, **{"--scorer": "nope"}), r"Unknown scorer 'nope'"),
    (
        "qlora_on_cpu",
        lambda r: _attack_argv(r, **{"--family": "lora", "--load_in_4bit": "true"}),
        r"4-bit QLoRA needs a CUDA GPU and bitsandbytes",
    ),
    (
        "unknown_defense",
        lambda r: ["immunize", "--defense", "nope"],
        r"unknown defense 'nope'; known defenses",
    ),
    (
        "immunize_without_defense",
        lambda r: ["immunize", "--model", str(r / "model")],
        r"immunize needs --defense NAME",
    ),
    (
        "defense_negative_alpha",
        lambda r: [
            "immunize",
            "--defense",
            "gradient_ascent",
            "--model",
            str(r / "model"),
            "--output_dir",
            str(r / "o"),
            "--alpha",
            "-1",
        ],
        r"alpha must be a finite non-negative",
    ),
    (
        "card_corrupted_report",
        lambda r: ["card", str(r / "card_corrupt")],
        r"immunization_report\.json is not valid JSON",
    ),
    (
        "card_missing_folder",
        lambda r: ["card", str(r / "no_folder")],
        r"model folder .*no_folder does not exist",
    ),
    ("card_without_folder", lambda r: ["card"], r"usage: immune-trainer card DIR"),
    (
        "output_under_a_regular_file",
        lambda r: _attack_argv(r, **{"--output": str(_write(r / "f.txt", "x") / "c.json")}),
        r"cannot write .*f\.txt/c\.json",
    ),
]


@pytest.mark.parametrize("make_argv, match", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input_exits_1_with_one_error_line(make_argv, match, cli_dir, capsys):
    if "CUDA" in match and torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: the CPU refusal does not apply")
    code = main(make_argv(cli_dir))
    captured = capsys.readouterr()
    assert code == 1, captured.err
    assert "Traceback" not in captured.err + captured.out
    assert "error: " in captured.err
    assert __import__("re").search(match, captured.err), captured.err


def test_cli_table_is_broad():
    assert len(CLI_CASES) >= 15


@pytest.mark.parametrize(
    "argv",
    [["attack", "--no_such_option", "1"], ["attack", "--max_steps", "many"]],
    ids=["unknown", "bad_int"],
)
def test_cli_usage_errors_exit_2_the_argparse_way(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "usage: immune-trainer attack" in err and "error:" in err and "Traceback" not in err


def test_cli_unknown_command_exits_2(capsys):
    assert main(["immunise"]) == 2
    assert "unknown command 'immunise'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- atomic writes


def _fail(*args, **kwargs):
    raise OSError(28, "No space left on device")


def _no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


def test_atomic_write_keeps_previous_file_when_writing_fails(tmp_path, monkeypatch):
    target = tmp_path / "x.json"
    atomic_write(target, '{"v": 1}')
    monkeypatch.setattr(os, "replace", _fail)
    with pytest.raises(OutputError, match="No space left on device"):
        atomic_write(target, '{"v": 2}')
    assert target.read_text() == '{"v": 1}' and _no_temp_files(tmp_path)


def test_report_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "immunization_report.json"
    report = _report()
    report.save(path)
    before = path.read_text()
    # A failure in the middle of writing (the text is half out) and one at the rename.
    real_fdopen = os.fdopen

    class HalfWritten:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: HalfWritten(real_fdopen(fd, *a, **k)))
    report.extra["changed"] = True
    with pytest.raises(OutputError):
        report.save(path)
    monkeypatch.setattr(os, "fdopen", real_fdopen)
    monkeypatch.setattr(os, "replace", _fail)
    with pytest.raises(OutputError):
        report.save(path)
    assert path.read_text() == before and _no_temp_files(tmp_path)
    assert ImmunizationReport.load(path).to_dict() == json.loads(before)


def test_model_card_and_badges_are_written_atomically(tmp_path, monkeypatch):
    from immune_trainer.hub.card import write_model_card

    folder = tmp_path / "immunized"
    folder.mkdir()
    _report().save(folder / "immunization_report.json")
    write_model_card(folder, plot=False, model_name="tiny")
    readme = (folder / "README.md").read_text()
    badges = {p.name: p.read_text() for p in (folder / "badges").glob("*.svg")}
    assert "tiny" in readme and badges

    monkeypatch.setattr(os, "replace", _fail)
    with pytest.raises(OutputError, match="No space left on device"):
        write_model_card(folder, plot=False, model_name="other name")
    assert (folder / "README.md").read_text() == readme
    assert {p.name: p.read_text() for p in (folder / "badges").glob("*.svg")} == badges
    assert _no_temp_files(folder)


def test_attack_curves_plot_is_written_atomically(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from immune_trainer.model_card.plots import plot_attack_curves

    path = tmp_path / "attack_curves.png"
    path.write_bytes(b"old plot")
    monkeypatch.setattr(os, "replace", _fail)
    with pytest.raises(OutputError, match="cannot write the plot"):
        plot_attack_curves(_report(), path)
    assert path.read_bytes() == b"old plot" and _no_temp_files(tmp_path)


def test_cli_attack_output_is_atomic(cli_dir, monkeypatch, capsys):
    out = cli_dir / "atomic_curves.json"
    out.write_text('{"previous": true}')

    monkeypatch.setattr(os, "replace", _fail)
    assert main(_attack_argv(cli_dir, **{"--output": str(out)})) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert json.loads(out.read_text()) == {"previous": True} and _no_temp_files(cli_dir)


def test_saved_attack_runs_are_atomic(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    attack = _attack(output_dir=str(runs))
    attack.run(_model(), _tok(), make_pairs(4), make_pairs(2, offset=50))
    (saved,) = (runs / "attack_runs").glob("*.json")
    before = saved.read_text()
    monkeypatch.setattr(os, "replace", _fail)
    # The same run again is reused (nothing written); a changed one must not corrupt the saved file.
    attack.run(_model(), _tok(), make_pairs(4), make_pairs(2, offset=50))
    with pytest.raises(OutputError):
        _attack(output_dir=str(runs), max_steps=2).run(
            _model(), _tok(), make_pairs(4), make_pairs(2, offset=50)
        )
    assert saved.read_text() == before and _no_temp_files(runs)


# ---------------------------------------------------------------------------------------------- safe loading


def test_pickle_weights_are_never_unpickled(tmp_path, monkeypatch):
    folder = _pickle_only_folder(tmp_path)
    calls = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(a) or pytest.fail("torch.load called"))
    with pytest.raises(ConfigError, match="safetensors only"):
        load_model_and_tokenizer(ModelArguments(model=str(folder)))
    with pytest.raises(ConfigError):
        GradientAscentTrainer(
            model=str(folder),
            args=GradientAscentConfig(output_dir=str(tmp_path / "o"), report_to="none"),
            harmful_dataset=make_pairs(2),
        )
    assert calls == []


def test_remote_code_is_off_by_default_and_never_runs(tmp_path):
    folder = _remote_code_folder(tmp_path)
    assert ModelArguments().trust_remote_code is False
    assert GradientAscentConfig(output_dir=str(tmp_path / "o"), report_to="none").trust_remote_code is False
    with pytest.raises(ConfigError, match="--trust_remote_code"):
        load_model_and_tokenizer(ModelArguments(model=str(folder)))
    assert not (folder / "EXECUTED").exists()


def test_a_safetensors_folder_loads(tmp_path):
    folder = _model_folder(tmp_path)
    model, tok = load_model_and_tokenizer(ModelArguments(model=str(folder)))
    ids = tok("hello", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, _model()(ids).logits, atol=1e-6)


def test_every_from_pretrained_in_the_library_is_safetensors_only():
    root = Path(__import__("immune_trainer").__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        text = path.read_text()
        for i, chunk in enumerate(text.split("ForCausalLM.from_pretrained(")[1:]):
            call = chunk[: chunk.index(")\n") if ")\n" in chunk else 300]
            if "use_safetensors=True" not in call and "gguf_file" not in call:
                offenders.append(f"{path.name} #{i}")
        for cls in ("AutoModel.from_pretrained(", "SequenceClassification.from_pretrained("):
            for chunk in text.split(cls)[1:]:
                if "use_safetensors=True" not in chunk[: chunk.index(")")]:
                    offenders.append(f"{path.name} {cls}")
    assert offenders == []


# ---------------------------------------------------------------------------------------------- QLoRA


def test_qlora_without_cuda_or_bitsandbytes_is_a_clear_config_error():
    import importlib.util

    from immune_trainer.attacks import check_4bit_available

    if torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("CUDA and bitsandbytes present: QLoRA can run here")
    cfg = AttackConfig(family="lora", load_in_4bit=True, learning_rates=[1e-3], max_steps=1, eval_every=1)
    assert cfg.to_dict()["load_in_4bit"] is True
    with pytest.raises(
        ConfigError, match=r"pip install immune-trainer\[bnb\]\).*family='lora' without load_in_4bit"
    ):
        check_4bit_available()
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="4-bit QLoRA needs a CUDA GPU"):
        HarmfulFineTuningAttack(cfg).run(model, _tok(), make_pairs(4), make_pairs(2, offset=50))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_load_in_4bit_defaults_off_and_has_help():
    field = AttackConfig.__dataclass_fields__["load_in_4bit"]
    assert AttackConfig().load_in_4bit is False
    assert "bitsandbytes" in field.metadata["help"] and "CUDA" in field.metadata["help"]


# ---------------------------------------------------------------------------------------------- gradient checkpointing


def _defense_config(spec, tmp_path):
    kw = dict(
        output_dir=str(tmp_path / spec.name),
        max_steps=1,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        save_strategy="no",
        logging_steps=1,
        report_to="none",
        max_length=64,
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
    )
    fields = spec.config_class.__dataclass_fields__
    # transformers 5 renamed gradient_checkpointing to activation_checkpointing (the old name still works
    # with a FutureWarning); use whichever this version has.
    prefix = "activation" if "activation_checkpointing" in fields else "gradient"
    kw[f"{prefix}_checkpointing"] = True
    kw[f"{prefix}_checkpointing_kwargs"] = {"use_reentrant": False}
    for name, value in {"inner_steps": 1, "tr_every": 1, "adversary_learning_rates": [1e-2]}.items():
        if name in fields:
            kw[name] = value
    return spec.config_class(**kw)


@pytest.mark.parametrize("name", sorted(DEFENSES))
def test_every_defense_trains_with_gradient_checkpointing(name, tmp_path):
    spec = DEFENSES[name]
    model = tiny_causal_lm("llama", seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = spec.trainer_class(
        model=model,
        args=_defense_config(spec, tmp_path),
        harmful_dataset=make_pairs(4),
        # Security Vectors trains on harmful data only (it refuses a retain set).
        retain_dataset=None if name == "security_vectors" else make_benign(4),
        processing_class=_tok(),
    )
    result = trainer.train()
    assert math.isfinite(result.training_loss)
    trained = trainer.model
    flag = (
        "is_activation_checkpointing"
        if hasattr(trained, "is_activation_checkpointing")
        else "is_gradient_checkpointing"
    )
    assert getattr(trained, flag, False), f"{name}: checkpointing was not switched on"
    changed = [
        n for n, p in trained.named_parameters() if n in before and not torch.equal(before[n], p.detach())
    ]
    trainable_adapters = [n for n, p in trained.named_parameters() if n not in before and p.requires_grad]
    assert changed or trainable_adapters, f"{name}: one step changed nothing"


def test_each_plot_panel_names_the_families_its_set_ran(tmp_path, monkeypatch):
    import matplotlib.axes

    from immune_trainer.model_card.plots import plot_attack_curves

    report = _report()
    lora = AttackCurve(
        config={"family": "lora", "learning_rate": 1e-3},
        points=[CurvePoint(step=5 * i, tokens=0, flops=0.0, value=v) for i, v in enumerate([3.0, 2.8, 2.7])],
    )
    report.curves["immunized"]["attack"].append(lora)
    report.threat_model.attack_family = "full,lora"
    report.curves["base"]["in_domain"] = [report.curves["base"]["attack"][0]]
    report.curves["immunized"]["in_domain"] = [report.curves["immunized"]["attack"][0]]
    titles = []
    original = matplotlib.axes.Axes.set_title
    monkeypatch.setattr(
        matplotlib.axes.Axes, "set_title", lambda self, t, *a, **k: (titles.append(t), original(self, t, *a, **k))[1]
    )
    plot_attack_curves(report, tmp_path / "curves.png")
    assert titles[0].startswith("attack grid (full,lora)") and "(full)" in titles[1]
