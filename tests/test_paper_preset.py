"""examples/paper.yaml: the papers' protocol for `immune-trainer evaluate` parses into the evaluate options
and names only datasets, tasks and judges the library knows (it runs where the Hub and a GPU are)."""

from __future__ import annotations

from pathlib import Path

from immune_trainer.attacks import ATTACKS, AttackConfig, CalibrationConfig
from immune_trainer.cli.commands import _parse
from immune_trainer.data.loading import ModelArguments, check_dataset_spec
from immune_trainer.evaluation import EvaluationConfig, EvaluationData
from immune_trainer.scoring import list_scorers

PAPER = Path(__file__).resolve().parent.parent / "examples" / "paper.yaml"


def test_the_paper_preset_parses_and_names_known_things():
    argv = ["--config", str(PAPER), "--model", "immunized", "--base_model", "Qwen/Qwen2.5-0.5B-Instruct"]
    model, data, attack, cfg, calibration = _parse(
        [ModelArguments, EvaluationData, AttackConfig, EvaluationConfig, CalibrationConfig], argv, "evaluate"
    )
    assert not cfg.fixed_grid and calibration.calibrate_trials == 8 and calibration.calibrate_seeds == 3
    assert all(f in ATTACKS for f in attack.family_names())
    assert {cfg.attacked_harm_judge, cfg.side_effects_judge} <= set(list_scorers())
    assert any(r.startswith("mmlu=lm_eval:") for r in data.reference)
    specs = [data.dataset, data.eval_dataset, data.cross_domain_dataset, data.benign_dataset,
             data.harmful_prompts, data.benign_requests]
    for spec in [s for s in specs if s] + [r.split("=", 1)[1] for r in data.reference if "lm_eval:" not in r]:
        check_dataset_spec(spec)  # the syntax, offline (the Hub ids are fetched where the Hub is)
