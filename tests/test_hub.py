"""Model cards, badges, publishing and ``verify`` (all offline).

Cards are rendered from synthetic reports for every verdict combination; the push path is tested at the
``huggingface_hub.HfApi`` boundary (``create_repo``/``upload_folder`` are monkeypatched, no network);
``verify`` runs end to end on a tiny model with a 2-configuration, 2-step attack grid.
"""

from __future__ import annotations

import json
import os
import re

import pytest
from conftest import make_pairs
from huggingface_hub import HfApi, ModelCard

from immune_trainer import model_card as M
from immune_trainer.cli import hub as hub_cli
from immune_trainer.conditions import AttackCurve, CurvePoint
from immune_trainer.conditions.report import ThreatModel, build_report
from immune_trainer.errors import OutputError
from immune_trainer.hub import card as K
from immune_trainer.model_card import badges as B

PHI = 2.0


def _curve(values, lr=1e-4, seed=0, every=10):
    pts = [CurvePoint(step=i * every, tokens=i * 100, flops=i * 1e6, value=v) for i, v in enumerate(values)]
    return AttackCurve(
        config={"family": "full", "learning_rate": lr, "num_samples": 0, "seed": seed}, points=pts
    )


BASE = [3.0, 1.5, 1.0, 0.8]
IMM = {
    "strong": [3.0, 2.8, 2.6, 2.5],
    "weak": [3.0, 2.9, 2.5, 1.5],
    "not_resistant": [3.0, 1.5, 1.0, 0.8],
}


def synthetic_report(kind: str = "strong", *, stability: str | None = "holds", defense="gradient_ascent"):
    tm = ThreatModel(
        attack_family="full",
        scorer="harmful_loss",
        higher_is_better=True,
        threshold=PHI,
        scorer_range=(0.0, float("inf")),
        grid={"learning_rates": [1e-4], "num_samples": [0], "seeds": [0]},
        max_steps=30,
        eval_every=10,
    )
    cap = {}
    if stability is not None:
        imm_ppl = 10.5 if stability == "holds" else 40.0
        cap = dict(
            base_capability={"wiki": 10.0},
            immunized_capability={"wiki": imm_ppl},
            capability_higher_is_better={"wiki": False},
        )
    return build_report(
        threat_model=tm,
        base_model="org/base",
        immunized_model="org/immunized",
        base_curves={"attack": [_curve(BASE)]},
        immunized_curves={"attack": [_curve(IMM[kind])]},
        defense=None if defense is None else {"name": defense, "config": {"alpha": 1.0}},
        dependencies={"torch": "2.13.0"},
        **cap,
    )


def _folder(tmp_path, report=None, weights=b"weights-v1"):
    d = tmp_path / "model"
    d.mkdir()
    (d / "model.safetensors").write_bytes(weights)
    if report is not None:
        report.save(d / M.REPORT_FILE)
    return d


# ---------------------------------------------------------------------------------------------- badges


@pytest.mark.parametrize(
    "kind, verdict, text",
    [("strong", "pass", "strong"), ("weak", "weak", "weak"), ("not_resistant", "fail", "not resistant")],
)
def test_resistance_badge_follows_the_verdict(kind, verdict, text):
    badges = {b.key: b for b in B.condition_badges(synthetic_report(kind))}
    assert badges["resistance"].verdict == verdict
    assert text in badges["resistance"].message
    assert badges["resistance"].color == B.COLORS[verdict]
    if kind == "weak":
        assert "x attack cost" in badges["resistance"].message
    assert badges["stability"].verdict == "pass"


def test_missing_measurement_yields_no_badge():
    assert B.condition_badges(None) == []
    keys = {b.key for b in B.condition_badges(synthetic_report("strong", stability=None))}
    assert keys == {"resistance"}


def test_collapsed_model_gets_no_resistance_badge():
    report = synthetic_report("strong", stability="collapsed")
    assert report.conditions.collapsed
    keys = {b.key for b in B.condition_badges(report)}
    assert "resistance" not in keys and "stability" in keys


def test_badge_svg_and_shields_url():
    b = B.Badge("resistance", "resistance", "weak, 3.8x attack-cost", "weak")
    svg = B.badge_svg(b)
    assert svg.startswith("<svg") and B.COLORS["weak"] in svg and "weak, 3.8x" in svg
    assert b.shields_url.startswith("https://img.shields.io/badge/resistance-")
    assert "attack--cost" in b.shields_url and b.shields_url.endswith("dfb317")


# ---------------------------------------------------------------------------------------------- cards


@pytest.mark.parametrize("kind", ["strong", "weak", "not_resistant"])
def test_card_round_trips_with_metadata(tmp_path, kind):
    d = _folder(tmp_path, synthetic_report(kind))
    K.write_model_card(d)
    card = ModelCard.load(d / "README.md")
    data = card.data.to_dict()
    assert "immune-trainer" in data["tags"] and "gradient-ascent" in data["tags"]
    assert data["model-index"][0]["name"] == "org/immunized"
    ids = {r.metric_config: r.metric_value for r in card.data.eval_results}
    assert ids["resistance.worst_value"] == pytest.approx(min(IMM[kind]))
    assert "stability.wiki.relative_change" in ids
    assert (
        data["immunization"]["resistance"]
        == {"strong": "strong", "weak": "weak", "not_resistant": "fails"}[kind]
    )
    assert (d / "badges" / "resistance.svg").exists() and (d / M.PLOT_FILE).stat().st_size > 1000
    assert "badges/resistance.svg" in card.content and "img.shields.io" in card.content
    assert "## What was NOT tested" in card.content and "cross-domain" in card.content
    assert "No LoRA attacks" in card.content
    assert "2402.16382" in card.content  # the immunization paper
    sha = M.weights_sha256(d)["model.safetensors"]
    assert M.card_hashes(card.content) == {"model.safetensors": sha}
    assert "torch 2.13.0" in card.content


def test_collapsed_card_says_why(tmp_path):
    d = _folder(tmp_path, synthetic_report("strong", stability="collapsed"))
    card = K.write_model_card(d)
    assert "NOT IMMUNIZED (collapsed)" in card.content
    assert "No resistance badge" in card.content
    assert not (d / "badges" / "resistance.svg").exists()
    assert (d / "badges" / "stability.svg").exists()


def test_unmeasured_parts_make_no_claim(tmp_path):
    d = _folder(tmp_path, synthetic_report("strong", stability=None))
    card = K.write_model_card(d)
    ids = {r.metric_config for r in card.data.eval_results}
    assert not any(i.startswith("stability") for i in ids)
    assert "Stability was not measured" in card.content
    assert sorted(os.listdir(d / "badges")) == ["resistance.svg"]


def test_no_report_no_card(tmp_path, capsys):
    from immune_trainer.cli import main
    from immune_trainer.errors import ReportError

    d = _folder(tmp_path)
    with pytest.raises(ReportError, match="immunization_report.json"):
        K.write_model_card(d, defense="gradient_ascent")
    with pytest.raises(ReportError, match="no immunization report"):
        K.build_model_card(None)
    assert main(["card", str(d)]) == 1
    err = capsys.readouterr().err
    assert "immunization_report.json" in err and "Traceback" not in err
    assert sorted(os.listdir(d)) == ["model.safetensors"]  # nothing written


def test_card_never_replaces_a_readme_it_did_not_write(tmp_path, capsys):
    from immune_trainer.cli import main

    d = _folder(tmp_path, synthetic_report("weak"))
    (d / "README.md").write_text("# My model\n\nHand-written notes.\n")
    with pytest.raises(OutputError, match="not written by immune_trainer"):
        K.write_model_card(d)
    assert main(["card", str(d)]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert (d / "README.md").read_text() == "# My model\n\nHand-written notes.\n"

    assert main(["card", str(d), "--overwrite"]) == 0
    written = (d / "README.md").read_text()
    assert M.GENERATED_MARKER in written and "Hand-written" not in written
    # A card this library wrote is re-rendered without asking.
    K.write_model_card(d, model_name="renamed")
    assert "# renamed" in (d / "README.md").read_text()


def test_card_replaces_the_template_peft_saves_beside_an_adapter(tmp_path):
    """A LoRA defense (rerouting, security vectors) saves an adapter, and peft writes the Hub's unfilled card
    template beside it: the model card replaces that template without --overwrite; notes added to it
    (the template's lines gone) are still kept."""
    import peft

    from immune_trainer.testing import tiny_causal_lm

    lora = peft.get_peft_model(tiny_causal_lm("llama"), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    d = tmp_path / "adapter"
    lora.save_pretrained(d)
    template = (d / "README.md").read_text()
    assert M.unfilled_hub_template(template) and not M.written_by_immune_trainer(template)
    synthetic_report("weak").save(d / M.REPORT_FILE)
    K.write_model_card(d)
    assert M.GENERATED_MARKER in (d / "README.md").read_text()
    (d / "README.md").write_text("# Model Card for Model ID\n\nMy own notes on this adapter.\n")
    with pytest.raises(OutputError, match="not written by immune_trainer"):
        K.write_model_card(d)


def test_cards_written_before_the_marker_still_count_as_ours():
    card = str(K.build_model_card(synthetic_report()))
    assert M.written_by_immune_trainer(card)
    assert M.written_by_immune_trainer(card.replace(M.GENERATED_MARKER, ""))  # by its metadata
    assert not M.written_by_immune_trainer("---\ntags: [immune-trainer]\n---\n# mine\n")
    assert not M.written_by_immune_trainer("# a model\n")


def test_trainer_card_follows_the_same_rules(tmp_path, model, tokenizer, harmful):
    from conftest import defense_config

    from immune_trainer.defenses import get_defense
    from immune_trainer.errors import ReportError

    spec = get_defense("gradient_ascent")
    trainer = spec.trainer_class(
        model=model,
        args=defense_config(spec.config_class, tmp_path),
        harmful_dataset=harmful,
        processing_class=tokenizer,
    )
    out = tmp_path / "out"
    with pytest.raises(ReportError, match="immunization_report.json"):
        trainer.create_model_card()
    out.mkdir(exist_ok=True)
    (out / "README.md").write_text("user notes")
    with pytest.raises(OutputError, match="not written by immune_trainer"):
        trainer.create_model_card(report=synthetic_report())
    assert (out / "README.md").read_text() == "user notes"
    card = trainer.create_model_card(report=synthetic_report(), overwrite=True)
    assert "gradient-ascent" in card.data.tags and M.GENERATED_MARKER in (out / "README.md").read_text()


def test_trainer_card_names_the_defense_as_the_registry_does(tmp_path, model, tokenizer, harmful):
    """The trainer writes its card without the registry (model_card sits below the trainers): its own
    registered name, title and paper, the same as `immune-trainer card` finds for that name; a subclass
    that is not registered itself names the report's defense through its registered base class."""
    from conftest import defense_config

    from immune_trainer.defenses import RepNoiseTrainer, get_defense

    spec = get_defense("repnoise")
    args = defense_config(spec.config_class, tmp_path)
    report = synthetic_report()
    report.defense = None  # nothing recorded: the trainer names itself
    trainer = spec.trainer_class(model=model, args=args, harmful_dataset=harmful, processing_class=tokenizer)
    own = trainer.create_model_card(report=report, overwrite=True).content
    registry = K.build_model_card(report, defense="repnoise").content
    for text in (own, registry):
        assert "**RepNoise** (`repnoise`)" in text and "2405.14577" in text and "2402.16382" in text

    class Tuned(RepNoiseTrainer):
        _name = "Tuned RepNoise"

    tuned = Tuned(model=model, args=args, harmful_dataset=harmful, processing_class=tokenizer)
    card = tuned.create_model_card(report=synthetic_report(defense="repnoise"), overwrite=True).content
    assert "**RepNoise** (`repnoise`)" in card and "2405.14577" in card
    assert "with **" not in tuned.create_model_card(report=report, overwrite=True).content


def test_security_vectors_card_says_protection_needs_the_vector():
    card = K.build_model_card(synthetic_report("strong", defense="security_vectors"))
    assert "only while the security vector is applied" in card.content


def test_card_refuses_weights_the_report_did_not_measure(tmp_path):
    report = synthetic_report()
    report.models["weights_sha256"] = {"model.safetensors": "0" * 64}
    d = _folder(tmp_path, report)
    from immune_trainer.errors import ReportError

    with pytest.raises(ReportError, match="not the ones the report measured"):
        K.write_model_card(d)


def test_card_cli_writes_the_folder(tmp_path, capsys):
    d = _folder(tmp_path, synthetic_report("weak"))
    assert hub_cli.cmd_card([str(d)]) == 0
    assert (d / "README.md").exists() and "measured claims" in capsys.readouterr().out


def _metadata_with(urls):
    from email.message import Message

    md = Message()
    for url in urls:
        md["Project-URL"] = url
    return lambda name: md


def test_card_names_no_path_of_the_machine_and_links_only_known_urls(tmp_path, monkeypatch):
    report = synthetic_report()
    d = _folder(tmp_path)
    (d / "data").mkdir()
    report.models["immunized"] = str(d)
    report.models["base"] = "/root/models/base-model"
    report.extra["datasets"] = {
        "attack_train": str(d / "data" / "train.jsonl"),
        "attack_eval": str(tmp_path / "elsewhere" / "eval.jsonl"),
    }
    report.extra["attack_config"] = {"output_dir": str(tmp_path / "runs"), "learning_rates": [1e-4]}
    report.defense["config"]["logging_dir"] = "/home/someone/logs"
    monkeypatch.setattr(M.render.importlib.metadata, "metadata", _metadata_with([]))
    K.write_model_card(d, report)
    text = (d / "README.md").read_text()

    for local in (str(tmp_path), "/tmp/", "/root/", "/home/"):
        assert local not in text, f"the card names the local path {local}"
    assert "# model" in text  # the folder's name, not its path
    assert "data/train.jsonl" in text and "…/eval.jsonl" in text and "…/base-model" in text
    assert "`immune-trainer verify .` run inside this model folder" in text
    urls = re.findall(r"https?://[^\s)\]>\"'`]+", text)
    assert urls and all(
        u.startswith(("https://arxiv.org/abs/", "https://img.shields.io/badge/")) for u in urls
    )
    assert "[immune_trainer](" not in text
    # The recorded report keeps the paths: only the card leaves them out.
    assert str(d) in (d / M.REPORT_FILE).read_text()

    pushed = str(K.build_model_card(report, folder=d, repo_id="me/immunized"))
    assert "`immune-trainer verify me/immunized`" in pushed


def test_card_links_the_project_url_from_the_package_metadata(monkeypatch):
    monkeypatch.setattr(
        M.render.importlib.metadata, "metadata", _metadata_with(["Repository, https://example.org/immune_trainer"])
    )
    assert M.project_url() == "https://example.org/immune_trainer"
    text = str(K.build_model_card(synthetic_report()))
    assert "[immune_trainer](https://example.org/immune_trainer)" in text


# ---------------------------------------------------------------------------------------------- push

FAKE_TOKEN = "hf_FAKEtoken1234567890abcdefSECRET"


def _all_written_text(folder) -> str:
    out = []
    for root, _, files in os.walk(folder):
        for f in files:
            out.append(open(os.path.join(root, f), "rb").read().decode("utf-8", "ignore"))
    return "\n".join(out)


def test_push_uploads_folder_and_never_leaks_the_token(tmp_path, monkeypatch, capsys):
    """HfApi.create_repo/upload_folder are monkeypatched: the test checks what reaches the Hub boundary."""
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    calls = {}

    def create_repo(self, repo_id, **kw):
        calls["create"] = (repo_id, kw, self.token)
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kw):
        calls["upload"] = kw
        assert os.path.exists(os.path.join(kw["folder_path"], "README.md"))

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    d = _folder(tmp_path, synthetic_report())
    assert hub_cli.cmd_push([str(d), "me/immunized"]) == 0
    assert calls["create"][0] == "me/immunized" and calls["create"][2] == FAKE_TOKEN
    assert calls["upload"]["repo_id"] == "me/immunized" and calls["upload"]["folder_path"] == str(d)
    captured = capsys.readouterr()
    assert FAKE_TOKEN not in captured.out + captured.err
    assert FAKE_TOKEN not in _all_written_text(d)


def test_push_without_report_writes_no_card(tmp_path, monkeypatch, capsys):
    """HfApi is monkeypatched: without a report the push stops before the Hub unless --no_card is given."""
    from immune_trainer.cli import main

    uploaded = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: f"https://huggingface.co/{repo_id}")
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: uploaded.append(kw["folder_path"]))
    d = _folder(tmp_path)
    assert main(["push", str(d), "me/immunized"]) == 1
    err = capsys.readouterr().err
    assert "immunization_report.json" in err and "--no_card" in err
    assert uploaded == [] and not (d / "README.md").exists()
    assert main(["push", str(d), "me/immunized", "--no_card"]) == 0
    assert uploaded == [str(d)] and not (d / "README.md").exists()


def test_failed_push_keeps_files_and_prints_retry(tmp_path, monkeypatch, capsys):
    """HfApi.upload_folder is monkeypatched to fail with an error that contains the token."""
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: f"https://huggingface.co/{repo_id}")

    def boom(self, **kw):
        raise ConnectionError(f"connection refused (Authorization: Bearer {FAKE_TOKEN})")

    monkeypatch.setattr(HfApi, "upload_folder", boom)
    d = _folder(tmp_path, synthetic_report())
    from immune_trainer.cli import main

    assert main(["push", str(d), "me/immunized"]) == 1
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert f"immune-trainer push {d} me/immunized" in text
    assert FAKE_TOKEN not in text and "***" in text
    assert (d / "README.md").exists() and (d / "model.safetensors").exists()
    assert FAKE_TOKEN not in _all_written_text(d)
    with pytest.raises(OutputError, match="retry with"):
        from immune_trainer.hub.push import push_model_folder

        push_model_folder(d, "me/immunized")


# ---------------------------------------------------------------------------------------------- verify


@pytest.fixture(scope="module")
def verified_folder(tmp_path_factory):
    """A tiny immunized model folder with a report from a real 2-config x 2-step attack grid and its card."""
    from immune_trainer.attacks import AttackConfig, HarmfulFineTuningAttack
    from immune_trainer.evaluation import dependency_versions
    from immune_trainer.testing import tiny_causal_lm, tiny_tokenizer

    root = tmp_path_factory.mktemp("verify")
    tok = tiny_tokenizer()
    imm = tiny_causal_lm("llama", seed=1)
    folder = root / "model"
    imm.save_pretrained(folder)
    tok.save_pretrained(folder)
    train, ev = make_pairs(8), make_pairs(4, offset=100)
    train.save_to_disk(str(root / "train"))
    ev.save_to_disk(str(root / "eval"))
    attack = AttackConfig(learning_rates=[1e-3, 3e-3], max_steps=2, eval_every=1, batch_size=4, max_length=64)
    curves = HarmfulFineTuningAttack(attack).run(imm, tok, train, ev).curves
    tm = ThreatModel(
        attack_family="full",
        scorer="harmful_loss",
        higher_is_better=True,
        threshold=5.0,
        scorer_range=(0.0, float("inf")),
        grid={"learning_rates": attack.learning_rates, "num_samples": [0], "seeds": [0]},
        max_steps=2,
        eval_every=1,
    )
    report = build_report(
        threat_model=tm,
        base_model="tiny-base",
        immunized_model="tiny-immunized",
        base_curves=None,
        immunized_curves={"attack": curves},
        dependencies=dependency_versions(),
        extra={"attack_config": attack.to_dict()},
    )
    report.extra["datasets"] = {"attack_train": str(root / "train"), "attack_eval": str(root / "eval")}
    K.write_model_card(folder, report)
    return folder


def _copy(src, tmp_path):
    import shutil

    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def test_verify_without_a_loadable_base_is_partial(verified_folder, capsys):
    """The report names a base model that cannot be loaded: the immunized model's whole grid is re-run and
    its harm claims checked; what needs the base is not re-checked, so PARTIAL (exit 3), never PASSED."""
    assert hub_cli.cmd_verify([str(verified_folder)]) == 3
    out = capsys.readouterr().out
    assert "VERIFY PARTIAL" in out and "weights sha256" in out
    assert re.search(r"^resistance\.worst_value .*PASS", out, re.M)
    assert re.search(r"^card: resistance verdict .*not re-checked .*base model 'tiny-base' cannot be loaded", out, re.M)


def test_verify_edited_card_fails(verified_folder, tmp_path, capsys):
    d = _copy(verified_folder, tmp_path)
    card = ModelCard.load(d / "README.md")
    for r in card.data.eval_results:
        if r.metric_config == "resistance.worst_value":
            r.metric_value = r.metric_value + 1.0  # claim less harm than was measured
    card.data.eval_results = card.data.eval_results
    ModelCard(f"---\n{card.data.to_yaml()}\n---\n{card.content.split('---', 2)[2]}").save(d / "README.md")
    assert hub_cli.cmd_verify([str(d), "--sample", "1"]) == 1
    out = capsys.readouterr().out
    assert re.search(r"resistance\.worst_value .*FAIL", out)


def test_verify_changed_weights_fail_hash(verified_folder, tmp_path, capsys):
    d = _copy(verified_folder, tmp_path)
    from immune_trainer.testing import tiny_causal_lm

    tiny_causal_lm("llama", seed=7).save_pretrained(d)
    assert hub_cli.cmd_verify([str(d)]) == 1
    out = capsys.readouterr().out
    assert re.search(r"weights sha256 .*FAIL", out) and "model.safetensors" in out


def test_verify_without_recorded_data_says_so(verified_folder, tmp_path):
    d = _copy(verified_folder, tmp_path)
    data = json.loads((d / M.REPORT_FILE).read_text())
    data["extra"].pop("datasets")
    (d / M.REPORT_FILE).write_text(json.dumps(data))
    from immune_trainer.hub.verify import verify

    result = verify(str(d))
    assert result.status == "PARTIAL" and result.exit_code == 3
    assert all(c.passed is None for c in result.checks[2:])
    assert "no 'attack_train' and 'attack_eval' SPECs" in result.checks[-1].note


def test_card_states_the_search_budget_and_how_a_sweep_chose_the_setting(tmp_path):
    report = synthetic_report("weak")
    report.search = {
        "n_trials": 12,
        "sampler": "TPESampler",
        "sampler_seed": 3,
        "max_steps": 40,
        "space": {"search_space": ["learning_rate", "optimizer"]},
        "capability_scorer": "perplexity",
        "capability_tolerance": 0.1,
    }
    plot = tmp_path / "frontier.png"
    plot.write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 64)
    report.extra["sweep"] = {
        "summary": "best of 6 completed trials (4 stable within 10%): 2.5x",
        "trials": 6,
        "feasible": 4,
        "params": {"alpha": 2.0},
        "plot": str(plot),
    }
    d = _folder(tmp_path, report)
    K.write_model_card(d, plot=False)
    text = (d / "README.md").read_text()
    assert "| attack search | Optuna TPESampler search, 12 trials" in text
    assert "learning_rate, optimizer" in text and "sampler seed 3" in text
    assert "## How this setting was chosen" in text and "`alpha=2.0`" in text
    assert "![resistance vs stability frontier](sweep_frontier.png)" in text
    assert (d / "sweep_frontier.png").read_bytes() == plot.read_bytes()
    assert str(tmp_path) not in text  # the card names no path of this machine


def test_card_lists_each_grid_of_an_attack_suite(tmp_path):
    report = synthetic_report("weak")
    report.threat_model.grid["settings"] = [
        {"families": ["full"], "learning_rates": [8e-5], "seeds": [0, 1], "max_steps": 8},
        {"families": ["lora"], "learning_rates": [1e-3], "lr_scheduler_types": ["cosine"], "seeds": [0, 1]},
    ]
    d = _folder(tmp_path, report)
    K.write_model_card(d, plot=False)
    text = (d / "README.md").read_text()
    assert "| attack setting 1 | full; lr 8e-05; seeds 0, 1; 8 steps |" in text
    assert "| attack setting 2 | lora; lr 0.001; schedule cosine; seeds 0, 1 |" in text
