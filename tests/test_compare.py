"""compare_reports and `immune-trainer compare`: synthetic reports side by side (no training)."""

from __future__ import annotations

import csv
import io
import math

import pytest

from immune_trainer import conditions as C
from immune_trainer.cli import main as cli_main
from immune_trainer.conditions import AttackCurve, CurvePoint
from immune_trainer.conditions.compare import REPORT_FILE, compare_reports
from immune_trainer.conditions.report import ThreatModel, build_report
from immune_trainer.errors import ConfigError, ReportError

PHI = 2.0
BASE = [2.4, 2.1, 1.8, 1.5, 1.2]  # crosses phi = 2.0 between steps 5 and 10


def curve(values, lr=1e-4):
    return AttackCurve(
        config={"learning_rate": lr, "seed": 0},
        points=[CurvePoint(step=5 * i, tokens=100 * i, flops=1e9 * i, value=v) for i, v in enumerate(values)],
    )


def report(
    defense, family="full", *, imm=(3.0, 2.8, 2.5, 2.2, 1.9), phi=PHI, ppl=10.2, cross=None, max_steps=20
):
    threat = ThreatModel(
        attack_family=family,
        scorer="harmful_loss",
        higher_is_better=True,
        threshold=phi,
        scorer_range=(0.0, math.inf),
        grid={"learning_rates": [1e-4], "seeds": [0]},
        max_steps=max_steps,
    )
    base_curves = {"attack": [curve(BASE)]}
    imm_curves = {"attack": [curve(list(imm))]}
    if cross is not None:
        base_curves["cross_domain"] = [curve(BASE)]
        imm_curves["cross_domain"] = [curve(cross)]
    return build_report(
        threat_model=threat,
        base_model="tiny-base",
        immunized_model=f"out/{defense}",
        base_curves=base_curves,
        immunized_curves=imm_curves,
        base_capability={"ppl": 10.0, "qa": 0.5},
        immunized_capability={"ppl": ppl, "qa": 0.49},
        capability_higher_is_better={"ppl": False, "qa": True},
        defense={"name": defense, "config": {"alpha": 1.0}},
    )


@pytest.fixture
def reports(tmp_path):
    items = {
        "repnoise_full": report("repnoise", cross=[3.0, 2.9, 2.6, 2.3, 1.9]),
        "vaccine_full": report("vaccine", imm=(2.5, 2.2, 1.9, 1.7, 1.5)),
        "repnoise_lora": report("repnoise", "lora", imm=(3.0, 2.9, 2.8, 2.7, 2.6)),
        "collapsed_full": report("tar", ppl=30.0),
    }
    paths = {}
    for name, r in items.items():
        folder = tmp_path / name
        folder.mkdir()
        paths[name] = r.save(folder / REPORT_FILE)
    return items, paths


def test_table_has_one_cell_per_defense_and_family(reports):
    items, paths = reports
    comp = compare_reports(list(paths.values()))
    assert comp.defenses == ["repnoise", "vaccine", "tar"]
    assert comp.attack_families == ["full", "lora"]
    assert comp.comparable
    md = comp.to_markdown()
    assert md.splitlines()[0] == "| defense | full | lora |"
    rep = next(line for line in md.splitlines() if line.startswith("| repnoise |"))
    full_cell, lora_cell = rep.split(" | ")[1:3]
    r = items["repnoise_full"].conditions
    assert f"cost {C.fmt_number(r.resistance.steps_multiple, 3)}x" in full_cell
    assert f"cross-domain {C.fmt_number(r.generalization.cross_domain.steps_multiple, 3)}x" in full_cell
    assert f"stability {C.fmt_percent(r.stability.sets[r.stability.worst_set].relative_change)}" in full_cell
    assert full_cell.endswith(", IMMUNIZED")
    # The LoRA attack never crossed: the multiple is a lower bound, resistance strong.
    assert "cost >=" in lora_cell and "cross-domain n/a" in lora_cell
    vac = next(line for line in md.splitlines() if line.startswith("| vaccine |"))
    assert "NOT IMMUNIZED" in vac and vac.rstrip().endswith("| - |")  # no lora report for vaccine
    tar = next(line for line in md.splitlines() if line.startswith("| tar |"))
    assert "COLLAPSED" in tar and "stability +200.0% (ppl)" in tar


def test_csv_parses_back_to_the_reports_numbers(reports):
    items, paths = reports
    comp = compare_reports([paths["repnoise_full"], paths["vaccine_full"], paths["collapsed_full"]])
    rows = list(csv.DictReader(io.StringIO(comp.to_csv())))
    assert [r["defense"] for r in rows] == ["repnoise", "vaccine", "tar"]
    for row, key in zip(rows, ("repnoise_full", "vaccine_full", "collapsed_full")):
        c = items[key].conditions
        assert float(row["cost_multiple"]) == pytest.approx(c.resistance.steps_multiple)
        assert float(row["stability_change"]) == pytest.approx(
            c.stability.sets[c.stability.worst_set].relative_change
        )
        assert row["stability_set"] == c.stability.worst_set
        assert row["comparable"] == "yes" and row["note"] == ""
    assert float(rows[0]["cross_domain_multiple"]) == pytest.approx(
        items["repnoise_full"].conditions.generalization.cross_domain.steps_multiple
    )
    assert rows[1]["cross_domain_multiple"] == ""  # not measured
    assert [r["verdict"] for r in rows] == ["IMMUNIZED", "NOT IMMUNIZED", "COLLAPSED"]


def test_runs_extended_past_the_budget_to_decide_a_claim_are_the_same_attacker(reports):
    """The calibrated attack extends a run that never crossed within the budget; its grid then lists the
    longer run lengths. Same attacker, same budget: comparable. A different learning rate is not."""
    items, _ = reports
    extended = report("booster")
    extended.threat_model.grid = {**extended.threat_model.grid, "max_steps": [20, 40]}
    other_lr = report("booster")
    other_lr.threat_model.grid = {**other_lr.threat_model.grid, "learning_rates": [1e-3]}
    comp = compare_reports([items["repnoise_full"], extended, other_lr])
    assert [r.note for r in comp.rows][:2] == ["", ""]
    assert comp.rows[2].note.startswith("comparable: no \u2014 different attack grid")


def test_calibrated_reports_are_compared_by_their_search_not_by_the_winners_it_found(reports):
    """Under one calibrated search each immunized model has its own winning learning rate, so the grids (the
    union of the winners) differ: still the same attacker. Another search space is not."""
    search = {"kind": "calibrated", "n_trials": 3, "seeds": 2, "space": {"lr_range": [3e-5, 1e-3]}, "sets": {}}
    a, b, c = report("repnoise"), report("booster"), report("vaccine")
    b.threat_model.grid = {**b.threat_model.grid, "learning_rates": [1e-4, 2e-4]}
    for r in (a, b, c):
        r.search = {**search, "sets": {"attack": {"winners": r.defense["name"]}}}
    c.search["space"] = {"lr_range": [3e-5, 1e-4]}
    fixed = report("tar")
    comp = compare_reports([a, b, c, fixed])
    notes = [r.note for r in comp.rows]
    assert notes[:2] == ["", ""]
    assert notes[2].startswith("comparable: no \u2014 different attack search (") and "1e-04" in notes[2].replace(
        "0.0001", "1e-04"
    )
    assert notes[3] == "comparable: no \u2014 different attack search (a calibrated search vs a fixed grid)"


def test_outputs_are_written(reports, tmp_path):
    _, paths = reports
    out = compare_reports(list(paths.values())).save(tmp_path / "cmp")
    assert open(out["heatmap"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert open(out["markdown"]).read().startswith("| defense |")
    assert next(csv.reader(open(out["csv"])))[:2] == ["defense", "attack_family"]


def test_reports_that_measured_different_things_are_flagged(reports):
    items, paths = reports
    other_phi = report("booster", phi=1.8)
    other_grid = report("booster", max_steps=40)
    comp = compare_reports([items["repnoise_full"], other_phi, other_grid, items["repnoise_lora"]])
    assert not comp.comparable
    notes = [r.note for r in comp.rows]
    assert notes[0] == "" and notes[3] == ""  # the reference, and another family's grid is not compared
    assert notes[1] == "comparable: no \u2014 different phi (1.8 vs 2)"
    assert notes[2] == "comparable: no \u2014 different attack budget (40 vs 20 steps)"
    md = comp.to_markdown()
    assert "comparable: no \u2014 different phi (1.8 vs 2)" in md and "(not comparable)" in md
    rows = list(csv.DictReader(io.StringIO(comp.to_csv())))
    assert [r["comparable"] for r in rows] == ["yes", "no", "no", "yes"]
    # The same defense twice in one family: both kept, told apart by where they came from.
    assert comp.defenses[1:3] == ["booster (report 2)", "booster (report 3)"]


def test_bad_inputs_are_clear_errors(tmp_path, reports):
    _, paths = reports
    with pytest.raises(ReportError, match="no report at .*missing"):
        compare_reports([paths["repnoise_full"], tmp_path / "missing" / REPORT_FILE])
    with pytest.raises(ConfigError, match="at least one"):
        compare_reports([])
    with pytest.raises(ConfigError, match="report paths"):
        compare_reports([42])


def test_compare_command(reports, tmp_path, capsys):
    _, paths = reports
    folders = [str(p.rsplit("/", 1)[0]) for p in paths.values()]  # model folders are accepted too
    assert cli_main(["compare", *folders, "--output_dir", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "| defense | full | lora |" in out and "comparison.png" in out
    assert (tmp_path / "out" / "comparison.csv").exists()
    assert cli_main(["compare", str(tmp_path / "nowhere.json")]) == 1
    assert "no report at" in capsys.readouterr().err


def test_a_suite_of_families_gives_one_cell_per_family():
    def fam_curve(values, family):
        c = curve(values)
        c.config["family"] = family
        return c

    threat = ThreatModel(
        attack_family="full,lora",
        scorer="harmful_loss",
        higher_is_better=True,
        threshold=PHI,
        scorer_range=(0.0, math.inf),
        grid={"learning_rates": [1e-4], "seeds": [0]},
        max_steps=20,
    )
    suite = build_report(
        threat_model=threat,
        base_model="tiny-base",
        immunized_model="out/suite",
        base_curves={"attack": [fam_curve(BASE, "full"), fam_curve([2.4, 2.3, 2.2, 2.1, 1.9], "lora")]},
        immunized_curves={
            "attack": [
                fam_curve([3.0, 2.8, 2.5, 2.2, 1.9], "full"),
                fam_curve([3.0, 2.9, 2.8, 2.7, 2.6], "lora"),
            ]
        },
        defense={"name": "suite_defense", "config": {}},
    )
    table = compare_reports([suite])
    assert table.attack_families == ["full", "lora"]
    full, lora = table.get("suite_defense", "full"), table.get("suite_defense", "lora")
    # full: base crosses at 6.67, immunized at 18.33; lora: the immunized model never crosses (a bound,
    # 20 / 17.5 steps: below 2x, so undetermined and not strong).
    assert (
        full.cost_multiple == pytest.approx(18.333 / 6.667, rel=1e-3)
        and not full.cost_multiple_is_lower_bound
    )
    assert lora.cost_multiple_is_lower_bound and not lora.strong
    assert full.verdict == lora.verdict  # the verdict is the report's, in every cell
