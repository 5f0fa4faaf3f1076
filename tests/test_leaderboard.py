"""The leaderboard: every defense trained and measured under one attack, ranked; resumable; its tables."""

from __future__ import annotations

import copy
import csv
import io

import datasets
import pytest
from conftest import make_benign, make_pairs

from immune_trainer import AttackConfig, ConditionDatasets, EvaluationConfig
from immune_trainer.conditions.leaderboard import _cell, leaderboard_from_reports
from immune_trainer.conditions.report import ImmunizationReport
from immune_trainer.conditions.schema import Crossing, FamilyResistance, ResistanceResult
from immune_trainer.errors import ConfigError
from immune_trainer.leaderboard import run_leaderboard
from immune_trainer.testing import tiny_causal_lm, tiny_tokenizer


def _sets():
    text = datasets.Dataset.from_dict({"text": ["The quick brown fox jumps over the lazy dog. " * 3] * 4})
    return ConditionDatasets(
        attack_train=make_pairs(16),
        attack_eval=make_pairs(6, offset=100),
        reference={"plain_text": text},
        benign_train=make_benign(16),
        benign_eval=make_benign(6),
    )


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    out = tmp_path_factory.mktemp("board")
    messages = []
    kwargs = dict(
        harmful_dataset=make_pairs(24),
        retain_dataset=make_benign(24),
        datasets=_sets(),
        defenses=["gradient_ascent", "vaccine"],
        defense_args=dict(max_steps=4, per_device_train_batch_size=4, learning_rate=3e-3, max_length=64,
                          use_cpu=True, seed=0),
        attack=AttackConfig(learning_rates=[2e-3], max_steps=4, eval_every=2, max_length=64),
        evaluation=EvaluationConfig(
            benign_scorer="benign_loss", benign_max_steps=4, benign_eval_every=2, benign_learning_rate=2e-3
        ),
        output_dir=str(out),
        progress=messages.append,
    )
    base = tiny_causal_lm("llama", seed=0)
    tokenizer = tiny_tokenizer()
    before = copy.deepcopy(base.state_dict())
    result = run_leaderboard(base, tokenizer, **kwargs)
    # evaluate_conditions never changes the caller's config (phi once leaked into the next defense's run)
    assert kwargs["evaluation"].threshold is None
    return result, out, messages, (base, tokenizer, kwargs, before)


def test_every_defense_is_trained_measured_under_the_same_attack_and_ranked(board):
    result, out, messages, (base, _, _, before) = board
    assert {r.defense for r in result.rows} == {"gradient_ascent", "vaccine"}
    # one attacker for every defense: the same phi, grid and budget in every report (so nothing is flagged)
    reports = [ImmunizationReport.load(out / name / "immunization_report.json") for name in ("gradient_ascent", "vaccine")]
    assert reports[0].threat_model.threshold == pytest.approx(reports[1].threat_model.threshold)
    assert reports[0].threat_model.grid == reports[1].threat_model.grid
    assert all(not r.notes for r in result.rows)
    # the order is the ranking rule's
    assert [r.rank_key() for r in result.rows] == sorted(r.rank_key() for r in result.rows)
    # each row's numbers are its report's
    for row in result.rows:
        report = next(r for r in reports if r.defense["name"] == row.defense)
        for fam in report.conditions.resistance.families:
            assert row.families[fam.family].multiple == fam.steps_multiple
        assert row.defense_time_s == pytest.approx(report.extra["leaderboard"]["defense_s"])
    # the base model was never modified
    assert all((before[k] == v).all() for k, v in base.state_dict().items())
    table = (out / "leaderboard.md").read_text()
    assert "gradient_ascent" in table and "vaccine" in table and "worst case" in table
    rows = list(csv.DictReader(io.StringIO((out / "leaderboard.csv").read_text())))
    assert [r["defense"] for r in rows] == [r.defense for r in result.rows]
    assert (out / "leaderboard.png").exists()


def test_a_second_run_reuses_the_reports_and_a_changed_setting_measures_again(board):
    _, out, _, (base, tokenizer, kwargs, _) = board
    messages = []
    again = run_leaderboard(base, tokenizer, **{**kwargs, "progress": messages.append})
    assert sum("reusing" in m for m in messages) == 2
    assert not any("training" in m for m in messages)
    assert [r.defense for r in again.rows]  # the same table, read back
    messages.clear()
    changed = {**kwargs, "progress": messages.append, "defenses": ["gradient_ascent"],
               "per_defense_args": {"gradient_ascent": {"alpha": 0.5}}}
    run_leaderboard(base, tokenizer, **changed)
    assert any("gradient_ascent: training" in m for m in messages)
    messages.clear()
    stronger = {**kwargs, "progress": messages.append, "defenses": ["vaccine"],
                "attack": AttackConfig(learning_rates=[4e-3], max_steps=4, eval_every=2, max_length=64)}
    run_leaderboard(base, tokenizer, **stronger)  # another attacker: measured again, never read back
    assert any("vaccine: training" in m for m in messages)


def test_a_defense_that_trains_on_harmful_data_only_is_ranked_beside_those_given_a_retain_set(board, tmp_path):
    """The leaderboard holds one retain set for every defense; Security Vectors refuses one, so it gets none
    (the embedded leaderboard once stopped there)."""
    _, _, _, (base, tokenizer, kwargs, _) = board
    messages = []
    result = run_leaderboard(base, tokenizer, **{**kwargs, "defenses": ["security_vectors"],
                                                 "output_dir": str(tmp_path), "progress": messages.append})
    assert [r.defense for r in result.rows] == ["security_vectors"]
    assert (tmp_path / "security_vectors" / "immunization_report.json").exists()


def test_ranking_puts_a_collapsed_model_last_and_refuses_two_reports_of_one_defense(board):
    _, out, _, _ = board
    a = ImmunizationReport.load(out / "gradient_ascent" / "immunization_report.json")
    b = ImmunizationReport.load(out / "vaccine" / "immunization_report.json")
    collapsed = copy.deepcopy(a)
    collapsed.defense = {"name": "collapsing"}
    collapsed.conditions.collapsed = True
    collapsed.conditions.immunized = False
    immunized = copy.deepcopy(b)
    immunized.defense = {"name": "winner"}
    immunized.conditions.immunized = True
    immunized.conditions.collapsed = False
    board2 = leaderboard_from_reports([collapsed, a, immunized])
    assert board2.rows[0].defense == "winner" and board2.rows[0].verdict == "IMMUNIZED"
    assert board2.rows[-1].defense == "collapsing" and board2.rows[-1].verdict == "COLLAPSED"
    with pytest.raises(ConfigError, match="two reports of defense 'gradient_ascent'"):
        leaderboard_from_reports([a, copy.deepcopy(a)])
    with pytest.raises(ConfigError, match="at least one report"):
        leaderboard_from_reports([])


def test_the_helpfulness_rows_of_stability_are_columns_of_the_board(board):
    """A model that refuses benign requests is not stable: the board shows each report's over-refusal and
    generated exact match, base -> immunized, and whether each holds."""
    _, out, _, _ = board
    a = ImmunizationReport.load(out / "gradient_ascent" / "immunization_report.json")
    b = ImmunizationReport.load(out / "vaccine" / "immunization_report.json")
    a.helpfulness = {
        "base": {"over_refusal_rate": 0.0, "exact_match": 1 / 3},
        "immunized": {"over_refusal_rate": 0.1, "exact_match": 1 / 6},
        "over_refusal_holds": False,
        "exact_match_holds": False,
    }
    b.helpfulness = None
    board2 = leaderboard_from_reports([a, b])
    md = board2.to_markdown()
    assert "| over refusal | generated exact match |" in md
    row = next(r for r in board2.rows if r.defense == "gradient_ascent")
    assert row.helpfulness == {"over_refusal": "0 -> 0.1 FAILS", "generated_exact_match": "0.333 -> 0.167 FAILS"}
    assert next(r for r in board2.rows if r.defense == "vaccine").helpfulness == {}
    rows = list(csv.DictReader(io.StringIO(board2.to_csv())))
    assert {r["over_refusal"] for r in rows} == {"0 -> 0.1 FAILS", ""}


def test_unknown_defense_and_stray_per_defense_args_fail_before_training(tmp_path):
    base, tok = tiny_causal_lm("llama", seed=0), tiny_tokenizer()
    with pytest.raises(ConfigError, match="no_such_defense"):
        run_leaderboard(base, tok, harmful_dataset=make_pairs(4), datasets=_sets(), defenses=["no_such_defense"],
                        output_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="per_defense_args names defenses not in the leaderboard: tar"):
        run_leaderboard(base, tok, harmful_dataset=make_pairs(4), datasets=_sets(), defenses=["gradient_ascent"],
                        per_defense_args={"tar": {}}, output_dir=str(tmp_path))


def test_cli_ranks_existing_reports(board, tmp_path, capsys):
    from immune_trainer.cli import main

    _, out, _, _ = board
    rc = main(["leaderboard", "--reports", str(out / "gradient_ascent"), str(out / "vaccine"),
               "--leaderboard_dir", str(tmp_path)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| rank | defense |" in printed
    assert (tmp_path / "leaderboard.csv").exists()


def _family(**kw):
    return FamilyResistance(**{"family": "full", "holds": None, "strong": False, **kw})


def _whole(**kw):
    fields = {
        "holds": None,
        "strong": False,
        "threshold": 1.0,
        "higher_is_better": True,
        "min_cost_multiple": 2.0,
    }
    return ResistanceResult(
        **{**fields, "worst_crossing": None, "worst_config": None, "worst_value": 0.5, **kw}
    )


@pytest.mark.parametrize("record", [_family, _whole])
def test_a_family_cell_reads_the_same_for_a_family_and_a_whole_resistance(record):
    """One rule for the cells of a family's judgement and of a resistance judged as a whole (a report of one
    family, the in- and cross-domain attacks): the base never crossing is undetermined (credited 0), a
    multiple is shown (a bound with >=), strong resistance is credited without limit."""
    crossed = Crossing(step=10.0, tokens=100.0, flops=1e6)
    never = _cell(record())
    assert never.undetermined and never.text() == "undetermined" and never.credited() == 0.0
    weak = _cell(record(base_crossing=crossed, steps_multiple=1.5, holds=False))
    assert (weak.text(), weak.credited(), weak.undetermined) == ("1.5x", 1.5, False)
    bound = _cell(record(base_crossing=crossed, steps_multiple=3.0, multiple_is_lower_bound=True, holds=True))
    assert bound.text() == ">=3x" and bound.credited() == 3.0
    strong = _cell(record(base_crossing=crossed, strong=True, holds=True))
    assert strong.text() == "strong" and strong.credited() == float("inf")
    assert _cell(None) is None


def test_a_training_free_family_the_base_never_failed_shows_no_multiple_not_undetermined():
    """A training-free family is judged on step 0 alone: when the base never crossed phi it has no multiple
    to show ("n/a"), the rule the family cells had before they shared one function with whole results."""
    cell = _cell(_family(training_free=True))
    assert (cell.undetermined, cell.text(), cell.credited()) == (False, "n/a", 0.0)
