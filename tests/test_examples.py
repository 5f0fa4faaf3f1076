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


def _readme_table(heading: str) -> list[str]:
    """The first column (back-quoted names) of the first table after ``heading`` in the README."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index(heading) :]
    table = section[section.index("\n|") :].split("\n\n")[0]
    return [m.group(1) for m in re.finditer(r"^\| `([a-z_]+)`", table, re.M)]


def test_readme_tables_of_attack_families_and_defenses_match_the_registries():
    from immune_trainer.attacks import ATTACKS
    from immune_trainer.defenses import list_defenses

    assert _readme_table("## Attacks: families") == list(ATTACKS)
    assert sorted(_readme_table("## The defenses")) == sorted(list_defenses())


def test_readme_shows_the_demo_presets_as_they_are():
    """The demo's budgets are documented choices: the README's preset table is the one PRESETS gives."""
    from immune_trainer.demo import preset_table

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert preset_table() in text
