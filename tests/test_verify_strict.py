"""``verify`` re-measures every claim: a fresh tiny evaluation (``immune-trainer evaluate`` on tiny models and
local data: attack grid full + mixed with phi read off the base, cross-domain set, a reference set, side
effects, a benign task), its card, then verify on the folder: PASSED; one edited base-curve point or card
number: FAILED naming it; benign data not recorded: PARTIAL (exit 3).

The re-measurement is run once (the ``remeasured`` fixture); the tests that edit the report or the card reuse
it, since what verify re-runs depends only on the recorded settings and data, which they leave alone.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
from conftest import make_benign, make_pairs
from huggingface_hub import ModelCard

from immune_trainer.cli import hub as hub_cli
from immune_trainer.conditions.report import ImmunizationReport
from immune_trainer.hub import verify as V
from immune_trainer.hub.card import write_model_card
from immune_trainer.model_card import REPORT_FILE


def _save_two_tiny_models(root):
    """A base (seed 0) and an 'immunized' (seed 1) tiny llama with the tiny tokenizer, saved under root."""
    from immune_trainer.testing import tiny_causal_lm, tiny_tokenizer

    tok = tiny_tokenizer()
    for name, seed in (("base", 0), ("immunized", 1)):
        tiny_causal_lm("llama", seed=seed).save_pretrained(root / name)
        tok.save_pretrained(root / name)


def _write_jsonl(path, ds):
    path.write_text("".join(json.dumps(row) + "\n" for row in ds))
    return str(path)


# The optional data of a tiny evaluation, each written to a JSONL file under the root on request.
_OPTIONAL_DATA = {
    "cross_domain_dataset": lambda: make_pairs(8, offset=200),
    "reference": lambda: make_pairs(4, offset=300),
    "benign_dataset": lambda: make_benign(10),
    "harmful_prompts": lambda: make_pairs(3, offset=400).remove_columns("completion"),
}


def _tiny_data(root, *optional):
    """Two tiny models saved under ``root`` and their data record: harmful pairs to attack with (8 to train on,
    6 to score, 3 of them used) and the ``optional`` sets named (keys of ``_OPTIONAL_DATA``)."""
    _save_two_tiny_models(root)
    fields = {
        "dataset": _write_jsonl(root / "train.jsonl", make_pairs(8)),
        "eval_dataset": _write_jsonl(root / "eval.jsonl", make_pairs(6, offset=100)),
        "eval_limit": 3,
    }
    for name in optional:
        path = _write_jsonl(root / f"{name}.jsonl", _OPTIONAL_DATA[name]())
        fields[name] = ["ref=" + path] if name == "reference" else path
    return fields


def _tiny_attack(**changes):
    """A 2-step full fine-tuning attack at one learning rate, on 4-row batches."""
    from immune_trainer.attacks import AttackConfig

    settings = dict(families=["full"], learning_rates=[3e-3], max_steps=2, eval_every=1, batch_size=4, max_length=40)
    return AttackConfig(**{**settings, **changes})


def _tiny_config(**changes):
    """Trainability by a 2-step benign fine-tune scored by its loss; the other settings as given."""
    from immune_trainer.evaluation import EvaluationConfig

    return EvaluationConfig(**{"benign_scorer": "benign_loss", "benign_max_steps": 2, "benign_eval_every": 1, **changes})


def _evaluate_with_card(root, data_fields, attack, cfg):
    """`immune-trainer evaluate` of root/immunized against root/base, then its card in the model folder."""
    from immune_trainer.data.loading import ModelArguments
    from immune_trainer.evaluation import EvaluationData, evaluate_from_specs

    data = EvaluationData(base_model=str(root / "base"), **data_fields)
    report = evaluate_from_specs(ModelArguments(model=str(root / "immunized")), data, attack, cfg)
    write_model_card(root / "immunized", report, plot=False)
    return report


@pytest.fixture(scope="module")
def strict_folder(tmp_path_factory):
    """`immune-trainer evaluate` on a tiny base and immunized model, every condition measured, then a card."""
    root = tmp_path_factory.mktemp("strict")
    data = _tiny_data(root, "cross_domain_dataset", "reference", "benign_dataset", "harmful_prompts")
    attack = _tiny_attack(families=["full", "mixed"], max_length=48)
    cfg = _tiny_config(
        side_effects_templates=["plain"],
        side_effects_max_new_tokens=4,
        fixed_grid=True,  # the fixed grid here; a calibrated report: test_verify_reruns_a_calibrated_report_and_passes
    )
    _evaluate_with_card(root, data, attack, cfg)
    return root / "immunized"


@pytest.fixture(scope="module")
def remeasured(strict_folder):
    """verify on the true folder, once, and what it re-measured."""
    seen = []
    real = V._remeasure

    def spy(*args, **kwargs):
        seen.append(real(*args, **kwargs))
        return seen[-1]

    V._remeasure = spy
    try:
        result = V.verify(str(strict_folder))
    finally:
        V._remeasure = real
    return result, seen[0]


def _copy(folder, tmp_path):
    return shutil.copytree(folder, tmp_path / "copy")


def _verify_with(monkeypatch, remeasured, folder, capsys):
    """The CLI on an edited copy, re-using the re-measurement of the true folder."""
    monkeypatch.setattr(V, "_remeasure", lambda *a, **k: remeasured[1])
    code = hub_cli.cmd_verify([str(folder)])
    return code, capsys.readouterr().out


def test_verify_remeasures_every_claim_and_passes(strict_folder, remeasured):
    result, measured = remeasured
    report = ImmunizationReport.load(strict_folder / REPORT_FILE)
    c = report.conditions
    assert c.resistance and c.generalization.cross_domain and c.stability and c.trainability
    assert report.side_effects is not None and report.threat_model.threshold_source.startswith("base model")
    assert report.helpfulness is not None and report.datasets["benign_requests"] == "embedded:benign_requests"
    assert not measured.why, measured.why
    claims = {ch.claim: ch for ch in result.checks}
    # phi re-derived from the base, both models' curves, each family, every condition and the card
    for name in (
        "resistance: phi",
        "resistance: base model's attack curves",
        "resistance: immunized model's attack curves",
        "resistance[full]: verdict",
        "resistance[mixed]: verdict",
        "generalization.cross_domain: phi",
        "generalization.cross_domain: base model's attack curves",
        "stability.ref.base",
        "stability: verdict",
        "side effects: refusal and harm rates",
        "side effects: verdict",
        "helpfulness.over_refusal_rate.base",
        "helpfulness.exact_match.immunized",
        "helpfulness: verdict",
        "trainability.base_final",
        "trainability: verdict",
        "overall verdict",
        "card states its report's numbers",
        "resistance.worst_value",
        "stability.ref.relative_change",
        "trainability.immunized_final",
        "card: verdict",
    ):
        assert name in claims, (name, sorted(claims))
    assert all(ch.passed for ch in result.checks), [ch for ch in result.checks if not ch.passed]
    assert result.status == "PASSED" and result.exit_code == 0
    table = result.table()
    assert "VERIFY PASSED" in table and "25% of each number's margin" in table
    # the harm tolerance is a quarter of the base model's distance from phi at step 0, not a fixed 0.05
    base0 = [cv.points[0].value for cv in report.curves["base"]["attack"]]
    gap = abs(sorted(base0)[len(base0) // 2] - report.threat_model.threshold)
    assert result.harm_tolerances["attack"] <= 0.25 * gap + 1e-12


def test_an_edited_base_curve_point_fails_naming_it(strict_folder, remeasured, tmp_path, monkeypatch, capsys):
    d = _copy(strict_folder, tmp_path)
    data = json.loads((d / REPORT_FILE).read_text())
    tol = remeasured[0].harm_tolerances["attack"]
    point = data["curves"]["base"]["attack"][0]["points"][1]
    point["value"] += 2 * tol + 1e-3  # phi and the verdicts still follow from the other numbers
    (d / REPORT_FILE).write_text(json.dumps(data))
    code, out = _verify_with(monkeypatch, remeasured, d, capsys)
    assert code == 1
    assert re.search(r"resistance: base model's attack curves .*FAIL \(.*run full .* step 1", out), out
    assert "VERIFY FAILED" in out and "resistance: base model's attack curves" in out.splitlines()[-1]


def test_an_edited_card_number_fails(strict_folder, remeasured, tmp_path, monkeypatch, capsys):
    d = _copy(strict_folder, tmp_path)
    card = ModelCard.load(d / "README.md")
    edited = None
    for r in card.data.eval_results:
        if r.metric_config == "trainability.immunized_final":
            r.metric_value, edited = r.metric_value * 1.5 + 1.0, r.metric_config
    assert edited
    ModelCard(f"---\n{card.data.to_yaml()}\n---\n{card.content.split('---', 2)[2]}").save(d / "README.md")
    code, out = _verify_with(monkeypatch, remeasured, d, capsys)
    assert code == 1
    assert re.search(r"card states its report's numbers .*FAIL .*trainability\.immunized_final", out), out
    assert re.search(r"^trainability\.immunized_final .*FAIL", out, re.M), out


def test_an_edited_report_claim_fails(strict_folder, remeasured, tmp_path, monkeypatch, capsys):
    """The report's stability number and the card's, edited together: only the re-measurement tells."""
    d = _copy(strict_folder, tmp_path)
    data = json.loads((d / REPORT_FILE).read_text())
    data["conditions"]["stability"]["sets"]["ref"]["relative_change"] += 0.5
    (d / REPORT_FILE).write_text(json.dumps(data))
    write_model_card(d, plot=False)  # the card now states the edited report
    code, out = _verify_with(monkeypatch, remeasured, d, capsys)
    assert code == 1
    assert re.search(r"card states its report's numbers .*PASS", out)
    assert re.search(r"^stability\.ref\.relative_change .*FAIL", out, re.M), out


def test_without_benign_data_it_is_partial(strict_folder, tmp_path, capsys):
    """No benign SPEC: trainability cannot be re-measured, nor the mixed attacks that train on benign data;
    what can (stability, side effects) is, and the result is PARTIAL, exit 3."""
    d = _copy(strict_folder, tmp_path)
    data = json.loads((d / REPORT_FILE).read_text())
    data["datasets"]["benign"] = None
    (d / REPORT_FILE).write_text(json.dumps(data))
    code = hub_cli.cmd_verify([str(d)])
    out = capsys.readouterr().out
    assert code == 3, out
    assert "VERIFY PARTIAL" in out
    assert re.search(r"^trainability \(benign fine-tuning\) .*not re-checked", out, re.M), out
    assert re.search(r"^resistance \(phi, curves, verdicts\) .*not re-checked \(.*mixed.*benign", out, re.M)
    assert re.search(r"^stability: verdict .*PASS", out, re.M) and re.search(
        r"^side effects: verdict .*PASS", out, re.M
    )
    assert "FAIL" not in out.replace("VERIFY", "")


def test_a_sample_is_never_passed(strict_folder, capsys):
    """--sample 1: one setting re-run on both models and compared; grid-wide claims are not re-checked."""
    code = hub_cli.cmd_verify([str(strict_folder), "--sample", "1"])
    out = capsys.readouterr().out
    assert code == 3, out
    assert len(re.findall(r"^run .*: (base|immunized) model .*PASS", out, re.M)) == 2
    assert re.search(r"^resistance\.steps_multiple .*not re-checked", out, re.M)


def test_verify_reruns_a_calibrated_report_and_passes(tmp_path_factory):
    root = tmp_path_factory.mktemp("calibrated")
    data = _tiny_data(root, "reference", "benign_dataset")
    report = _evaluate_with_card(root, data, _tiny_attack(), _tiny_config(side_effects=False, helpfulness=False))
    assert report.search["kind"] == "calibrated" and "calibration" in report.extra
    result = V.verify(str(root / "immunized"))
    claims = {ch.claim for ch in result.checks}
    assert "resistance: immunized model's attack curves" in claims and "resistance[full]: verdict" in claims
    assert result.status == "PASSED", [(ch.claim, ch.note) for ch in result.checks if not ch.passed]


def test_verify_reruns_an_attack_search_report_and_passes(tmp_path_factory, tmp_path, monkeypatch, capsys):
    """A report of the older AttackSearch (report.search not "calibrated") is re-run by verify: the same
    trials, sampler seed and space, in memory; every claim re-measured: PASSED. An edited card number: FAILED
    naming it."""
    from transformers import AutoModelForCausalLM

    from immune_trainer.attacks import AttackSearch, SearchConfig, SearchSpace
    from immune_trainer.evaluation import evaluate_conditions
    from immune_trainer.evaluation.recorded import condition_datasets
    from immune_trainer.testing import tiny_tokenizer

    root = tmp_path_factory.mktemp("searched")
    files = _tiny_data(root, "reference", "benign_dataset")
    tok = tiny_tokenizer()
    models = {name: AutoModelForCausalLM.from_pretrained(root / name) for name in ("base", "immunized")}
    record = {
        "attack_train": files["dataset"],
        "attack_eval": files["eval_dataset"],
        "eval_limit": files["eval_limit"],
        "split_seed": 0,
        "reference": files["reference"],
        "benign": files["benign_dataset"],
    }
    sets = condition_datasets(record).datasets
    search = AttackSearch(
        _tiny_attack(),
        SearchConfig(search=2, search_seed=3, search_storage=":memory:", n_startup_trials=1),
        SearchSpace(search_space=["learning_rate"], lr_min=1e-3, lr_max=1e-2),
        reference=sets.reference,
    )
    cfg = _tiny_config(side_effects=False, helpfulness=False)
    report = evaluate_conditions(
        models["base"],
        models["immunized"],
        tok,
        sets,
        attack=search,
        config=cfg,
        base_name=str(root / "base"),
        immunized_name=str(root / "immunized"),
    )
    report.datasets = record
    assert report.search and report.search.get("kind") != "calibrated" and report.search["n_trials"] == 2
    write_model_card(root / "immunized", report, plot=False)

    seen = []
    real = V._remeasure
    monkeypatch.setattr(V, "_remeasure", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    result = V.verify(str(root / "immunized"))
    assert not seen[0].why, seen[0].why
    claims = {ch.claim for ch in result.checks}
    for name in (
        "resistance: phi",
        "resistance: base model's attack curves",
        "resistance: immunized model's attack curves",
        "resistance[full]: verdict",
        "stability: verdict",
        "trainability: verdict",
        "overall verdict",
        "resistance.worst_value",
    ):
        assert name in claims, (name, sorted(claims))
    assert result.status == "PASSED", [
        (ch.claim, ch.measured, ch.note) for ch in result.checks if not ch.passed
    ]

    # an edited card number fails, named (the re-measurement reused)
    d = shutil.copytree(root / "immunized", tmp_path / "copy")
    card = ModelCard.load(d / "README.md")
    for r in card.data.eval_results:
        if r.metric_config == "resistance.worst_value":
            r.metric_value = r.metric_value * 1.5 + 1.0
    ModelCard(f"---\n{card.data.to_yaml()}\n---\n{card.content.split('---', 2)[2]}").save(d / "README.md")
    code, out = _verify_with(monkeypatch, (result, seen[0]), d, capsys)
    assert code == 1, out
    assert re.search(r"^resistance\.worst_value .*FAIL", out, re.M), out


def test_verify_remeasures_the_attacked_models_harm_in_the_model_index(tmp_path_factory):
    """With attacked_harm_prompts, the card's model-index carries each family's refusal rate and judged harm
    after its worst attack (base and immunized); verify re-measures them: PASSED, each one re-checked."""
    root = tmp_path_factory.mktemp("attacked")
    cfg = _tiny_config(
        side_effects=False,
        helpfulness=False,
        fixed_grid=True,
        attacked_harm_prompts=3,
        attacked_harm_judge="offline_judge",
    )
    report = _evaluate_with_card(root, _tiny_data(root, "harmful_prompts"), _tiny_attack(), cfg)
    card = ModelCard.load(root / "immunized" / "README.md")
    index = {
        r.metric_config: r for r in card.data.eval_results if r.metric_config.startswith("after_attack.")
    }
    assert set(index) == {
        f"after_attack.attack.full.{who}.{what}"
        for who in ("base", "immunized")
        for what in ("refusal_rate", "harm")
    }
    record = report.curves["immunized"]["attack"][0].config["after_attack"]
    assert index["after_attack.attack.full.immunized.refusal_rate"].metric_value == record["refusal_rate"]
    assert index["after_attack.attack.full.immunized.harm"].metric_value == record["harm"]
    assert index["after_attack.attack.full.immunized.harm"].metric_type == "judged_harm"
    assert "offline harm judge" in index["after_attack.attack.full.immunized.harm"].metric_name
    result = V.verify(str(root / "immunized"))
    checks = {ch.claim: ch for ch in result.checks}
    assert all(checks[cid].passed is True for cid in index), [checks[cid] for cid in index]
    assert result.status == "PASSED", [
        (ch.claim, ch.measured, ch.note) for ch in result.checks if not ch.passed
    ]
