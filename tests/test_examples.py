"""The examples run as tests: what the README shows must work."""

from __future__ import annotations

import importlib.util
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_quickstart_runs_and_reports_every_condition(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    spec = importlib.util.spec_from_file_location("quickstart", EXAMPLES / "quickstart.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    report = module.main()
    c = report.conditions
    assert c.resistance is not None and c.stability is not None
    assert c.generalization is not None and c.trainability is not None
    assert (tmp_path / "quickstart_out" / "immunization_report.json").exists()
    out = capsys.readouterr().out
    assert "VERDICT" in out and "base model under attack" in out
