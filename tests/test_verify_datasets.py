"""The data a report records (report.datasets), the datasets it describes (evaluation.recorded) and `verify`
re-measuring from it alone."""

from __future__ import annotations

import json

import datasets
import pytest
from conftest import make_pairs

from immune_trainer.cli import hub as hub_cli
from immune_trainer.conditions.report import ImmunizationReport, ThreatModel, build_report
from immune_trainer.data import embedded
from immune_trainer.errors import DataError
from immune_trainer.evaluation.recorded import condition_datasets
from immune_trainer.hub.card import write_model_card
from immune_trainer.hub.verify import recorded_datasets, verify
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
        ModelArguments(model=str(root / "immunized")), data, attack, EvaluationConfig(fixed_grid=True)
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
    """Both models attacked again on the recorded data (the base named by its path), phi read off the base
    again; nothing else was measured, so nothing else is claimed: PASSED."""
    result = verify(str(evaluated_folder / "immunized"))
    checks = {c.claim: c for c in result.checks}
    assert checks["resistance: phi"].passed and checks["resistance: base model's attack curves"].passed
    assert "2 runs" == checks["resistance: immunized model's attack curves"].claimed
    assert result.passed, result.table()
    assert hub_cli.cmd_verify([str(evaluated_folder / "immunized")]) == 0
    assert "VERIFY PASSED" in capsys.readouterr().out


def test_verify_uses_the_recorded_eval_limit(evaluated_folder):
    """Measured on the first 3 eval rows: re-measuring on all 6 is a different claim."""
    report = ImmunizationReport.load(evaluated_folder / "immunized" / REPORT_FILE)
    ds = condition_datasets(recorded_datasets(report)).datasets
    train, ev = ds.attack_train, ds.attack_eval
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
    ds = condition_datasets(recorded_datasets(report)).datasets
    train, ev = ds.attack_train, ds.attack_eval
    assert calls == [("harmful_qa", "attack", 7), ("harmful_qa", "in_domain", 7)]
    # The demo scores splits["in_domain"].select(range(eval_pairs)): the same first rows.
    assert len(train) == 10 and ev["prompt"] == [f"in_domain 7 {i}" for i in range(4)]


def test_older_reports_keep_their_specs_in_extra():
    old = _report_with(extra={"datasets": {"attack_train": "a.jsonl", "attack_eval": "b.jsonl"}})
    assert recorded_datasets(old) == {"attack_train": "a.jsonl", "attack_eval": "b.jsonl"}
    new = _report_with({"attack_train": "c.jsonl", "attack_eval": "d.jsonl"}, extra={"datasets": {"x": "y"}})
    assert recorded_datasets(new) == {"attack_train": "c.jsonl", "attack_eval": "d.jsonl"}
    assert recorded_datasets(_report_with()) == {}


def test_the_demo_record_describes_every_set_it_measured(monkeypatch):
    """Every key the demo records is understood: cross-domain cut in halves after a shuffle with the split
    seed, reference sets cut to reference_rows, the embedded side-effect prompts drawn with the seed."""
    from immune_trainer.evaluation import side_effects
    from immune_trainer.evaluation.recorded import SIDE_EFFECT_PROMPTS

    def fake_load_embedded(name, split=None, *, cache=None, seed=0):
        return datasets.Dataset.from_dict({"prompt": [f"{name} {split} {seed} {i}" for i in range(10)]})

    drawn = []

    def fake_prompts(n, seed=0, *, cache=None):
        drawn.append((n, seed))
        return datasets.Dataset.from_dict({"prompt": [f"p{i}" for i in range(n)]})

    monkeypatch.setattr(embedded, "load_embedded", fake_load_embedded)
    monkeypatch.setattr(side_effects, "embedded_side_effect_prompts", fake_prompts)
    record = {
        "attack_train": "embedded:harmful_qa/defense",
        "attack_eval": "embedded:harmful_qa/in_domain",
        "in_domain_train": "embedded:harmful_qa/attack",
        "in_domain_eval": "embedded:harmful_qa/in_domain",
        "cross_domain": "embedded:harmful_qa/cross_domain",
        "cross_domain_split": "halves",
        "benign_train": "embedded:arithmetic/train",
        "benign_eval": "embedded:arithmetic/eval",
        "reference": ["shakespeare=embedded:shakespeare/eval", "chat_answers=embedded:chat_responses"],
        "harmful_prompts": SIDE_EFFECT_PROMPTS,
        "harmful_prompts_rows": 4,
        "split_seed": 3,
        "eval_limit": 2,
        "reference_rows": 6,
    }
    built = condition_datasets(record)
    ds = built.datasets
    assert not built.missing
    assert len(ds.attack_train) == 10 and ds.attack_eval["prompt"] == [
        "harmful_qa in_domain 3 0",
        "harmful_qa in_domain 3 1",
    ]
    cross = fake_load_embedded("harmful_qa", "cross_domain", seed=3).shuffle(seed=3)["prompt"]
    assert ds.cross_domain_train["prompt"] == cross[:5] and ds.cross_domain_eval["prompt"] == cross[5:7]
    assert {k: len(v) for k, v in ds.reference.items()} == {"shakespeare": 6, "chat_answers": 6}
    assert len(ds.benign_train) == 10 and len(ds.benign_eval) == 2
    assert drawn == [(4, 3)] and len(ds.harmful_prompts) == 4
    # An older record that does not say how the cross-domain set was cut: that part is left out, named.
    del record["cross_domain_split"]
    old = condition_datasets(record, strict=False)
    assert old.datasets.cross_domain_train is None and "cross_domain_split" in old.missing["cross_domain"]
    with pytest.raises(DataError, match="cross_domain_split"):
        condition_datasets(record)


def test_an_older_demo_record_without_the_prompt_count_leaves_the_prompts_out():
    """The demo once recorded the embedded side-effect prompts without how many it drew: not guessed."""
    built = condition_datasets(
        {"harmful_prompts": "embedded:side_effect_prompts", "eval_limit": 8}, strict=False
    )
    assert (
        built.datasets.harmful_prompts is None and "harmful_prompts_rows" in built.missing["harmful_prompts"]
    )
