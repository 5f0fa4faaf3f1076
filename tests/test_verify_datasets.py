"""The data a report records (report.datasets) and `verify` re-running the attack from it alone."""

from __future__ import annotations

import json

import datasets
import pytest
from conftest import make_pairs

from immune_trainer.cli import hub as hub_cli
from immune_trainer.conditions.report import ImmunizationReport, ThreatModel, build_report
from immune_trainer.data import embedded
from immune_trainer.hub.card import write_model_card
from immune_trainer.hub.verify import _load_data, recorded_datasets, verify
from immune_trainer.model_card import REPORT_FILE


def _write_jsonl(path, ds):
    path.write_text("".join(json.dumps(row) + "\n" for row in ds))
    return str(path)


@pytest.fixture(scope="module")
def evaluated_folder(tmp_path_factory):
    """`immune-trainer evaluate` (evaluate_from_specs) on tiny models and jsonl SPECs, then a card."""
    from immune_trainer.attacks import AttackConfig
    from immune_trainer.data.loading import ModelArguments
    from immune_trainer.evaluation import EvaluationConfig, EvaluationData, evaluate_from_specs
    from immune_trainer.testing import tiny_causal_lm, tiny_tokenizer

    root = tmp_path_factory.mktemp("specs")
    tok = tiny_tokenizer()
    for name, seed in (("base", 0), ("immunized", 1)):
        tiny_causal_lm("llama", seed=seed).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    train = _write_jsonl(root / "train.jsonl", make_pairs(8))
    ev = _write_jsonl(root / "eval.jsonl", make_pairs(6, offset=100))
    data = EvaluationData(base_model=str(root / "base"), dataset=train, eval_dataset=ev, eval_limit=3)
    attack = AttackConfig(learning_rates=[1e-3, 3e-3], max_steps=2, eval_every=1, batch_size=4, max_length=64)
    report = evaluate_from_specs(
        ModelArguments(model=str(root / "immunized")), data, attack, EvaluationConfig()
    )
    write_model_card(root / "immunized", report, plot=False)
    return root


def test_evaluate_records_the_data_specs_in_the_typed_field(evaluated_folder):
    report = ImmunizationReport.load(evaluated_folder / "immunized" / REPORT_FILE)
    assert report.datasets["attack_train"] == str(evaluated_folder / "train.jsonl")
    assert report.datasets["attack_eval"] == str(evaluated_folder / "eval.jsonl")
    assert report.datasets["eval_limit"] == 3 and report.datasets["split_seed"] == 0
    assert "datasets" not in report.extra


def test_verify_reruns_from_the_recorded_specs_alone(evaluated_folder, capsys):
    result = verify(str(evaluated_folder / "immunized"))
    runs = [c for c in result.checks if c.claim.startswith("run ")]
    assert len(runs) == 2 and all(c.passed for c in runs)
    assert result.passed
    assert hub_cli.cmd_verify([str(evaluated_folder / "immunized")]) == 0
    assert "VERIFY PASSED" in capsys.readouterr().out


def test_verify_uses_the_recorded_eval_limit(evaluated_folder):
    """Measured on the first 3 eval rows: re-measuring on all 6 is a different claim."""
    report = ImmunizationReport.load(evaluated_folder / "immunized" / REPORT_FILE)
    train, ev = _load_data(report, None, None)
    assert len(train) == 8 and len(ev) == 3
    assert ev["prompt"] == make_pairs(6, offset=100)["prompt"][:3]


def _report_with(datasets_field=None, extra=None):
    return build_report(
        threat_model=ThreatModel(
            attack_family="full", scorer="harmful_loss", higher_is_better=True, threshold=1.0
        ),
        base_model="b",
        immunized_model="m",
        base_curves=None,
        immunized_curves={},
        datasets=datasets_field,
        extra=extra,
    )


def test_embedded_specs_are_reloaded_with_the_recorded_split_seed(monkeypatch):
    """The demo records embedded:harmful_qa/... SPECs, its split seed and how many eval rows it scored."""
    calls = []

    def fake_load_embedded(name, split=None, *, cache=None, seed=0):
        calls.append((name, split, seed))
        return datasets.Dataset.from_dict({"prompt": [f"{split} {seed} {i}" for i in range(10)]})

    monkeypatch.setattr(embedded, "load_embedded", fake_load_embedded)
    report = _report_with(
        {
            "attack_train": "embedded:harmful_qa/attack",
            "attack_eval": "embedded:harmful_qa/in_domain",
            "eval_limit": 4,
            "split_seed": 7,
        }
    )
    train, ev = _load_data(report, None, None)
    assert calls == [("harmful_qa", "attack", 7), ("harmful_qa", "in_domain", 7)]
    # The demo scores splits["in_domain"].select(range(eval_pairs)): the same first rows.
    assert len(train) == 10 and ev["prompt"] == [f"in_domain 7 {i}" for i in range(4)]


def test_older_reports_keep_their_specs_in_extra():
    old = _report_with(extra={"datasets": {"attack_train": "a.jsonl", "attack_eval": "b.jsonl"}})
    assert recorded_datasets(old) == {"attack_train": "a.jsonl", "attack_eval": "b.jsonl"}
    new = _report_with({"attack_train": "c.jsonl", "attack_eval": "d.jsonl"}, extra={"datasets": {"x": "y"}})
    assert recorded_datasets(new) == {"attack_train": "c.jsonl", "attack_eval": "d.jsonl"}
    assert recorded_datasets(_report_with()) == {}
