"""`immune-trainer COMMAND --help` prints usage and exits 0 for every command the top-level help lists."""

from __future__ import annotations

import os
import subprocess
import sys

from immune_trainer.cli import main


def _listed_commands(capsys) -> list[str]:
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    lines = text.split("commands:", 1)[1].split("\n\n", 1)[0].strip().splitlines()
    names = []
    for line in lines:
        head = line.strip().split("  ", 1)[0]
        names += [part.strip() for part in head.split("|")]
    return names


def _run_help(argv, capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as stop:  # argparse's help exits the way a shell command does
        code = stop.code or 0
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_top_level_help_lists_the_commands(capsys):
    names = _listed_commands(capsys)
    assert {"attack", "evaluate", "immunize", "card", "push", "verify", "defenses"} <= set(names)


def test_every_listed_command_prints_its_help(capsys):
    for name in _listed_commands(capsys):
        for flag in ("--help", "-h"):
            code, text = _run_help([name, flag], capsys)
            assert code == 0, f"{name} {flag} exited {code}: {text[-500:]}"
            assert f"usage: immune-trainer {name}" in text, f"{name} {flag} printed no usage: {text[:300]}"
            assert "Traceback" not in text and "error:" not in text, text[-500:]


def test_hub_commands_help_names_their_positional_arguments(capsys):
    for argv, positional in ((["card"], "DIR"), (["push"], "REPO"), (["verify"], "DIR_OR_REPO")):
        code, text = _run_help([*argv, "--help"], capsys)
        assert code == 0 and "positional arguments" in text and positional in text


def test_immunize_help_without_a_defense_lists_the_registered_defenses(capsys):
    from immune_trainer.defenses import list_defenses

    code, text = _run_help(["immunize", "--help"], capsys)
    assert code == 0 and "--defense" in text
    assert all(name in " ".join(text.split()) for name in list_defenses())
    # With a defense, the help shows that defense's own options too.
    code, text = _run_help(["immunize", "--defense", "gradient_ascent", "--help"], capsys)
    assert code == 0 and "--output_dir" in text and "--defense" in text
    # Without --help, a missing defense is still an error naming the choices.
    assert main(["immunize"]) == 1
    assert "needs --defense" in capsys.readouterr().err


def test_missing_positional_is_a_clear_error_not_a_traceback(capsys):
    assert main(["card"]) == 1
    assert "missing DIR" in capsys.readouterr().err
    assert main(["push", "some_folder"]) == 1
    assert "missing REPO" in capsys.readouterr().err


def test_help_from_the_installed_entry_point_exits_0_without_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "immune_trainer.cli", "verify", "--help"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-1000:]
    assert "usage: immune-trainer verify" in proc.stdout and "Traceback" not in proc.stderr
