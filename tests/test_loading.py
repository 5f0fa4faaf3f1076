"""Every argument is checked before anything loads, and an unreachable Hub fails fast with one line.

The Hub is made unreachable in-process: ``huggingface_hub.constants.ENDPOINT`` points at a closed local
port (connection refused), or ``HF_HUB_OFFLINE=1`` is set; no test touches the network.
"""

from __future__ import annotations

import time

import pytest
from conftest import make_pairs

from immune_trainer.cli import main
from immune_trainer.data import loading
from immune_trainer.errors import ConfigError, DataError

CLOSED_PORT = "http://127.0.0.1:9"


@pytest.fixture(scope="module", autouse=True)
def imported():
    """Import what the commands import, so that the timings below measure the commands, not imports."""
    import trl  # noqa: F401

    import immune_trainer.attacks  # noqa: F401
    import immune_trainer.defenses  # noqa: F401
    import immune_trainer.evaluation  # noqa: F401
    import immune_trainer.hub.verify  # noqa: F401


@pytest.fixture
def hub_unreachable(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", CLOSED_PORT)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(loading, "_probe_cache", {})
    monkeypatch.setattr(loading, "_model_in_cache", lambda repo_id: False)


@pytest.fixture
def data_files(tmp_path):
    make_pairs(8).to_json(tmp_path / "train.jsonl")
    make_pairs(4, offset=100).to_json(tmp_path / "eval.jsonl")
    return tmp_path


def _fails_fast(argv, capsys, limit=8.0) -> str:
    start = time.monotonic()
    assert main(argv) == 1
    elapsed = time.monotonic() - start
    err = capsys.readouterr().err.strip()
    assert elapsed < limit, f"took {elapsed:.1f}s to fail"
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("command", ["evaluate", "attack"])
def test_unreachable_hub_fails_fast_with_one_line_naming_the_id(command, hub_unreachable, data_files, capsys):
    argv = [command, "--model", "someone/some-model"]
    argv += ["--dataset", str(data_files / "train.jsonl"), "--eval_dataset", str(data_files / "eval.jsonl")]
    if command == "evaluate":
        argv += ["--base_model", "someone/base-model"]
    err = _fails_fast(argv, capsys)
    assert "cannot reach the Hugging Face Hub" in err and CLOSED_PORT in err and "someone/" in err


def test_immunize_and_verify_fail_fast_too(hub_unreachable, capsys):
    err = _fails_fast(
        ["immunize", "--defense", "gradient_ascent", "--model", "someone/some-model", "--output_dir", "x"],
        capsys,
    )
    assert "'someone/some-model'" in err
    err = _fails_fast(["verify", "someone/immunized"], capsys)
    assert "cannot reach the Hugging Face Hub" in err and "'someone/immunized'" in err


def test_offline_mode_fails_at_once_for_an_uncached_model(monkeypatch, hub_unreachable, data_files, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    probes = []
    monkeypatch.setattr(loading, "_hub_unreachable_reason", lambda endpoint: probes.append(endpoint))
    err = _fails_fast(["attack", "--model", "someone/some-model", "--dataset", "embedded:harmful_qa"], capsys)
    assert "offline mode is on (HF_HUB_OFFLINE)" in err and "'someone/some-model'" in err
    assert probes == []  # offline: not even the reachability check


def test_local_arguments_are_checked_before_the_hub(monkeypatch, hub_unreachable, data_files, capsys):
    probes = []
    monkeypatch.setattr(
        loading, "_hub_unreachable_reason", lambda endpoint: probes.append(endpoint) or "down"
    )
    cases = [
        (["--dataset", "embedded:nope"], "unknown embedded dataset 'nope'"),
        (["--dataset", "embedded:harmful_qa/nosuchsplit"], "has no split 'nosuchsplit'"),
        (["--eval_dataset", str(data_files / "missing.jsonl")], "does not exist"),
        (["--reference", "wiki"], "NAME=SPEC"),
        (["--reference", "wiki=./no/such/folder"], "does not exist"),
        (["--base_model", "./no_such_model_dir"], "no such folder"),
    ]
    for extra, message in cases:
        err = _fails_fast(["evaluate", "--model", "someone/some-model", *extra], capsys)
        assert message in err
    assert probes == []  # every local mistake was reported before the Hub was asked anything


def test_check_dataset_spec_kinds(data_files):
    (data_files / "empty.jsonl").write_text("")
    (data_files / "notes.txt").write_text("hello")
    assert loading.check_dataset_spec("embedded:harmful_qa/attack") == "embedded"
    assert loading.check_dataset_spec(str(data_files / "train.jsonl")) == "file"
    assert loading.check_dataset_spec(str(data_files)) == "folder"
    assert loading.check_dataset_spec("org/name:test") == "hub"
    with pytest.raises(DataError, match="is empty"):
        loading.check_dataset_spec(str(data_files / "empty.jsonl"))
    with pytest.raises(DataError, match="use .json"):
        loading.check_dataset_spec(str(data_files / "notes.txt"))
    with pytest.raises(DataError, match="not a valid Hub id"):
        loading.check_dataset_spec("org/na me:split")


def test_cached_model_is_read_from_the_cache_when_the_hub_is_down(monkeypatch, hub_unreachable):
    monkeypatch.setattr(loading, "_model_in_cache", lambda repo_id: True)
    assert loading.check_hub_access("someone/cached-model") is True
    monkeypatch.setattr(loading, "_model_in_cache", lambda repo_id: False)
    with pytest.raises(ConfigError, match="cannot reach"):
        loading.check_hub_access("someone/other-model")
