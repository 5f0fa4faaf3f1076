"""DefenseSweep and `immune-trainer sweep`: Optuna trials on a tiny model, a few steps each."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import make_benign, make_pairs
from optuna.trial import TrialState

from immune_trainer import AttackConfig, EvaluationConfig
from immune_trainer.attacks import HarmfulFineTuningAttack, model_fingerprint
from immune_trainer.cli import ImmunizeArguments, main
from immune_trainer.cli.commands import _defense_from_config
from immune_trainer.conditions.report import ImmunizationReport
from immune_trainer.data.loading import parse_cli_args
from immune_trainer.defenses import GradientAscentTrainer, get_defense
from immune_trainer.errors import ConfigError, DataError
from immune_trainer.sweep import DefenseSweep, SweepConfig, search_space
from immune_trainer.sweep.results import CONFIRMATION_ATTACK, SCREENING_ATTACK
from immune_trainer.testing import tiny_causal_lm, tiny_tokenizer

SPACE = {
    "alpha": {"type": "float", "low": 0.5, "high": 4.0, "log": True},
    "learning_rate": {"type": "float", "low": 1e-3, "high": 5e-3, "log": True},
    "retain_weight": None,
}
DEFENSE_ARGS = {"max_steps": 4, "per_device_train_batch_size": 4, "max_length": 64, "seed": 0}
ATTACK_FLAGS = ["--learning_rates", "1e-3", "3e-3", "--max_steps", "4", "--eval_every", "2"]
ATTACK_FLAGS += ["--batch_size", "4", "--max_length", "64"]
SCREENING_ONLY = ["--prune", "false", "--stability_tolerance", "100", "--confirm_top_k", "0"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny model folder, the data as JSONL files, and the space / fixed defense args as YAML."""
    root = tmp_path_factory.mktemp("sweep_files")
    tiny_causal_lm("llama", seed=0).save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    for name, ds in {
        "defense": make_pairs(16),
        "retain": make_benign(16),
        "attack": make_pairs(12, offset=50),
        "eval": make_pairs(4, offset=100),
        "chat": make_benign(4),
    }.items():
        ds.to_json(root / f"{name}.jsonl")
    (root / "space.yaml").write_text(yaml.safe_dump(SPACE))
    (root / "defense_args.yaml").write_text(yaml.safe_dump(DEFENSE_ARGS))
    return root


def sweep_argv(files, out, *extra):
    return [
        "sweep",
        "--defense",
        "gradient_ascent",
        "--model",
        str(files / "model"),
        "--dataset",
        str(files / "defense.jsonl"),
        "--retain_dataset",
        str(files / "retain.jsonl"),
        "--attack_dataset",
        str(files / "attack.jsonl"),
        "--eval_dataset",
        str(files / "eval.jsonl"),
        "--reference",
        f"chat={files / 'chat.jsonl'}",
        "--space",
        str(files / "space.yaml"),
        "--defense_args",
        str(files / "defense_args.yaml"),
        "--attack_families",
        "full",
        "--output_dir",
        str(out),
        *ATTACK_FLAGS,
        *extra,
    ]


class RunSpy:
    """Counts the attack runs actually trained (not reused from the sweep's folder), by model fingerprint."""

    def __init__(self, monkeypatch):
        self.fingerprints: list[str] = []
        original = HarmfulFineTuningAttack._run_one

        def spy(attack, model, *args, **kwargs):
            self.fingerprints.append(model_fingerprint(model))
            return original(attack, model, *args, **kwargs)

        monkeypatch.setattr(HarmfulFineTuningAttack, "_run_one", spy)


def load_study(out, name="gradient_ascent_sweep"):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{out / 'sweep.db'}")


@pytest.fixture(scope="module")
def cli_sweep(files, tmp_path_factory):
    """Two trials through the command line, tolerance wide enough that every trial is stable, chosen on the
    screening attack alone (--confirm_top_k 0: the behaviour before the confirmation)."""
    out = tmp_path_factory.mktemp("sweep") / "out"
    with pytest.MonkeyPatch.context() as mp:
        spy = RunSpy(mp)
        code = main(sweep_argv(files, out, "--n_trials", "2", *SCREENING_ONLY))
    assert code == 0
    return out, spy.fingerprints


def test_trials_run_and_every_report_is_kept(cli_sweep, files):
    out, fingerprints = cli_sweep
    study = load_study(out)
    trials = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(trials) == 2 and study.user_attrs["phi"] > 0
    for t in trials:
        report = ImmunizationReport.load(out / "trials" / str(t.number) / "immunization_report.json")
        # The objective is the report's own worst-case cost multiple, the trial's params its config.
        assert t.value == pytest.approx(report.conditions.resistance.steps_multiple)
        assert report.conditions.threshold == pytest.approx(study.user_attrs["phi"])
        assert report.defense["config"]["alpha"] == pytest.approx(t.params["alpha"])
        assert report.defense["config"]["max_steps"] == 4
        degradation = report.conditions.stability.worst_degradation
        assert t.user_attrs["stability_degradation"] == pytest.approx(degradation)
        assert t.constraints["stability"] == pytest.approx(degradation - 100.0)
    # The base model was attacked once per grid setting for the whole sweep, every trial reused it.
    base = model_fingerprint(tiny_causal_lm("llama", seed=0))
    assert fingerprints.count(base) == 2
    assert len(fingerprints) == 2 + 2 * 2  # + each trial's two attack runs


def test_outputs_table_pareto_plot_and_best_report(cli_sweep, capsys):
    out, _ = cli_sweep
    study = load_study(out)
    best = study.best_trial
    # confirm_top_k=0: the screening's best is the choice, and every record says what chose it.
    assert not [k for k in study.user_attrs if k.startswith("confirmation:")]
    assert "calibrated_multiple" not in (out / "trials.md").read_text()
    assert "# chosen on the screening attack only" in (out / "best.yaml").read_text()
    table = (out / "trials.md").read_text()
    assert table.count("| complete |") == 2 and "alpha" in table
    assert (out / "trials.csv").read_text().splitlines()[0].startswith("trial,state,cost_multiple")
    pareto = json.loads((out / "pareto_front.json").read_text())
    assert pareto["best_trial"] == best.number == pareto["screening_best_trial"]
    assert pareto["chosen_by"] == "screening" and pareto["confirmations"] == []
    assert "not re-measured under the calibrated attack" in pareto["choice"]
    assert best.number in [t["number"] for t in pareto["front"]]
    assert (out / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = ImmunizationReport.load(out / "trials" / str(best.number) / "immunization_report.json")
    assert report.extra["sweep"]["best_trial"] == best.number
    assert report.extra["sweep"]["chosen_by"] == "screening"
    assert report.extra["sweep"]["attack"] == SCREENING_ATTACK == best.user_attrs["attack"]
    assert report.extra["sweep"]["plot"] == str((out / "frontier.png").resolve())


def test_best_yaml_parses_through_immunize_and_trains(cli_sweep, files, tmp_path):
    out, _ = cli_sweep
    best = load_study(out).best_trial
    path = out / "best.yaml"
    argv = ["--config", str(path)]
    spec = get_defense(_defense_from_config(argv))
    data, config = parse_cli_args([ImmunizeArguments, spec.config_class], argv, prog="immunize")
    assert spec.name == "gradient_ascent" and data.model == str(files / "model")
    assert config.alpha == pytest.approx(best.params["alpha"])
    assert config.learning_rate == pytest.approx(best.params["learning_rate"])
    assert config.max_steps == 4 and data.dataset == str(files / "defense.jsonl")
    assert (
        main(["immunize", "--config", str(path), "--output_dir", str(tmp_path / "best"), "--use_cpu", "true"])
        == 0
    )
    assert (tmp_path / "best" / "model.safetensors").is_file()


def test_killed_sweep_resumes_with_only_the_missing_trials(cli_sweep, files, tmp_path, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(cli_sweep[0], out)
    before = {t.number: t.params for t in load_study(out).get_trials(states=(TrialState.COMPLETE,))}

    original = GradientAscentTrainer.train
    monkeypatch.setattr(
        GradientAscentTrainer, "train", lambda self, *a, **k: (_ for _ in ()).throw(RuntimeError("killed"))
    )
    with pytest.raises(RuntimeError, match="killed"):
        main(sweep_argv(files, out, "--n_trials", "3", *SCREENING_ONLY))
    monkeypatch.setattr(GradientAscentTrainer, "train", original)

    spy = RunSpy(monkeypatch)
    assert main(sweep_argv(files, out, "--n_trials", "3", *SCREENING_ONLY)) == 0
    study = load_study(out)
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == 3 and len(study.get_trials(states=(TrialState.FAIL,))) == 1
    assert {t.number: t.params for t in complete if t.number in before} == before
    assert len(spy.fingerprints) == 2  # one new trial's two attack runs; the base's came from the folder
    # Nothing is left to do: a rerun with the same n_trials adds no trial.
    assert main(sweep_argv(files, out, "--n_trials", "3", *SCREENING_ONLY)) == 0
    assert len(load_study(out).trials) == 4


# ---------------------------------------------------------------------------- Python API


@pytest.fixture(scope="module")
def data():
    return dict(
        harmful_dataset=make_pairs(16),
        retain_dataset=make_benign(16),
        attack_train=make_pairs(12, offset=50),
        attack_eval=make_pairs(4, offset=100),
    )


def attack():
    return AttackConfig(learning_rates=[1e-3, 3e-3], max_steps=4, eval_every=2, batch_size=4, max_length=64)


def tiny_sweep(data, out, *, reference=None, attacks=None, evaluation=None, space=SPACE, **config):
    """A sweep of the tiny llama on ``data`` writing to ``out``: the gradient-ascent space ``space``, one full
    attack (``attack()``), a benign reference set; ``config`` changes the SweepConfig."""
    return DefenseSweep(
        tiny_causal_lm("llama", seed=0),
        tiny_tokenizer(),
        **data,
        reference=reference if reference is not None else {"chat": make_benign(4)},
        attacks=attacks if attacks is not None else attack(),
        evaluation=evaluation,
        config=SweepConfig(**{"output_dir": str(out), "attack_families": ["full"], **config}),
        space=space,
        defense_args=DEFENSE_ARGS,
        progress=False,
    )


def test_unstable_trials_are_infeasible_and_never_best(data, tmp_path):
    # Ascent on the placeholder "harmful" responses raises their perplexity: with tolerance 0 the reference
    # set made of them degrades, so every trial violates the stability constraint.
    space = {
        "alpha": 4.0,
        "learning_rate": {"type": "float", "low": 3e-3, "high": 5e-3},
        "retain_weight": None,
    }
    sweep = tiny_sweep(
        data,
        tmp_path,
        reference={"harm_like": make_pairs(4, offset=200)},
        evaluation=EvaluationConfig(stability_tolerance=0.0),
        space=space,
        n_trials=2,
        prune=False,
    )
    result = sweep.run()
    complete = result.study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == 2
    for t in complete:
        assert t.user_attrs["stability_degradation"] > 0
        assert t.constraints["stability"] > 0 and t.user_attrs["feasible"] is False
    assert result.best_trial is None and result.best_config_path is None and result.pareto_front == []
    with pytest.raises(ValueError):
        _ = result.study.best_trial  # Optuna itself sees no feasible trial
    assert "| no |" in result.table


def test_a_no_op_defense_is_pruned_after_the_fastest_attack(data, tmp_path):
    # A zero learning rate leaves the model as it was: the fastest attack crosses phi exactly as on the base.
    space = {"learning_rate": 0.0, "alpha": {"type": "float", "low": 0.5, "high": 1.0}, "retain_weight": None}
    sweep = tiny_sweep(data, tmp_path, space=space, n_trials=2)
    result = sweep.run()
    trials = result.study.trials
    assert [t.state for t in trials] == [TrialState.PRUNED, TrialState.PRUNED]
    for t in trials:
        assert t.intermediate_values == {0: 1.0}
        report = ImmunizationReport.load(tmp_path / "trials" / str(t.number) / "immunization_report.json")
        assert report.extra["sweep"]["pruned"] is True
        assert report.conditions.stability is None  # stopped before stability was measured
        assert len(report.curves["immunized"]["attack"]) == 1  # only the fastest attack ran
    assert result.best_trial is None and result.plot_path is None


@pytest.mark.slow
def test_multi_objective_pareto_front_over_attack_families(data, tmp_path):
    sweep = tiny_sweep(
        data,
        tmp_path,
        evaluation=EvaluationConfig(stability_tolerance=100.0),
        n_trials=2,
        attack_families=["full", "lora"],
        multi_objective=True,
        prune=False,
        confirm_top_k=0,
    )
    result = sweep.run()
    study = result.study
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    pareto = json.loads((tmp_path / "pareto_front.json").read_text())
    assert {t["number"] for t in pareto["front"]} == {t.number for t in study.best_trials}
    for t in study.get_trials(states=(TrialState.COMPLETE,)):
        multiples = t.user_attrs["family_multiples"]
        assert set(multiples) == {"full", "lora"}
        # a family that cannot be judged gives the trial no credit; otherwise the worst family counts
        judged = [float(m) for m in multiples.values() if m is not None]
        expected = min(judged) if len(judged) == len(multiples) else 0.0
        assert t.values[0] == pytest.approx(expected)
        assert t.values[1] == pytest.approx(t.user_attrs["stability_degradation"])
        folder = tmp_path / "trials" / str(t.number)
        families = {
            ImmunizationReport.load(p).threat_model.attack_family
            for p in folder.glob("immunization_report*.json")
        }
        assert families == {"full", "lora"}
    assert result.plot_path and result.best_config_path


# ---------------------------------------------------------------------------- bad input


def test_search_space_overrides_and_rejects_bad_entries(tmp_path):
    space = search_space(
        "gradient_ascent",
        {"alpha": 2.0, "retain_weight": None, "max_steps": {"type": "int", "low": 2, "high": 8}},
    )
    assert space["alpha"] == 2.0 and "retain_weight" not in space and space["max_steps"]["type"] == "int"
    with pytest.raises(ConfigError, match="not a field of GradientAscentConfig"):
        search_space("gradient_ascent", {"alphaa": {"type": "float", "low": 1, "high": 2}})
    with pytest.raises(ConfigError, match="log-scaled range needs low > 0"):
        search_space("gradient_ascent", {"alpha": {"type": "float", "low": 0.0, "high": 2, "log": True}})
    with pytest.raises(ConfigError, match="low .* is above high"):
        search_space("gradient_ascent", {"alpha": {"type": "float", "low": 3.0, "high": 2.0}})
    with pytest.raises(ConfigError, match="type must be one of"):
        search_space("gradient_ascent", {"alpha": {"type": "uniform", "low": 1, "high": 2}})
    bad = tmp_path / "space.yaml"
    bad.write_text("- alpha\n")
    with pytest.raises(ConfigError, match="must hold a YAML mapping"):
        search_space("gradient_ascent", str(bad))


def test_sweep_refuses_what_it_cannot_measure(data, tmp_path):
    model, tok = tiny_causal_lm("llama", seed=0), tiny_tokenizer()
    with pytest.raises(DataError, match="at least one reference set"):
        DefenseSweep(model, tok, **data, reference={}, config=SweepConfig(output_dir=str(tmp_path)))
    with pytest.raises(ConfigError, match="attack-time hook"):
        DefenseSweep(
            model,
            tok,
            **data,
            reference={"c": make_benign(4)},
            config=SweepConfig(defense="security_vectors", output_dir=str(tmp_path)),
            space={"lora_r": 4},
        )
    with pytest.raises(ConfigError, match="does not have"):
        DefenseSweep(
            model,
            tok,
            **data,
            reference={"c": make_benign(4)},
            config=SweepConfig(output_dir=str(tmp_path)),
            defense_args={"max_stepz": 3},
        )


def test_cli_errors_name_the_problem(files, tmp_path, capsys):
    assert main(sweep_argv(files, tmp_path, "--reference", "no-equals-sign")) == 1
    assert "--reference takes NAME=SPEC" in capsys.readouterr().err
    assert main(["sweep", "--defense", "nope"]) == 1
    assert "unknown defense 'nope'" in capsys.readouterr().err


def test_attack_configs_share_the_sweep_folder_and_keep_apart(data, tmp_path):
    grids = [attack(), AttackConfig(learning_rates=[1e-2], max_steps=2, eval_every=1, output_dir="elsewhere")]
    sweep = DefenseSweep(
        tiny_causal_lm("llama", seed=0),
        tiny_tokenizer(),
        **data,
        reference={"chat": make_benign(4)},
        attacks=grids,
        config=SweepConfig(output_dir=str(tmp_path / "out")),
        progress=False,
    )
    # A list is run as given (no family expansion); the base's runs of every config land in one folder.
    assert sweep.labels == ["full0", "full1"]
    assert {a.config.output_dir for a in sweep.attacks} == {str((tmp_path / "out").resolve())}
    assert [a.config.learning_rates for a in sweep.attacks] == [[1e-3, 3e-3], [1e-2]]


@pytest.mark.slow
def test_a_sweep_killed_mid_trial_retries_that_trial_on_restart(files, tmp_path):
    """SIGKILL leaves the trial RUNNING in the storage; its heartbeat stops, and the next process marks it
    failed and runs its parameters again."""
    import os
    import signal
    import sqlite3
    import subprocess
    import sys
    import time

    out = tmp_path / "out"
    argv = sweep_argv(files, out, *SCREENING_ONLY, "--heartbeat_interval", "1")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "immune_trainer.cli", *argv, "--n_trials", "1"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "stderr.txt", "w"),  # noqa: SIM115 - closed with the process
    )
    try:
        deadline = time.monotonic() + 240
        searched = sum(1 for v in SPACE.values() if isinstance(v, dict))
        running = False
        while not running and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
            # Read the storage with plain sqlite: optuna would create its tables, racing the sweep.
            try:
                with sqlite3.connect(f"file:{out / 'sweep.db'}?mode=ro", uri=True) as db:
                    # Running, with both hyperparameters drawn: the trial is training.
                    drawn = db.execute(
                        "SELECT count(*) FROM trials t JOIN trial_params p ON p.trial_id = t.trial_id "
                        "WHERE t.state = 'RUNNING'"
                    ).fetchone()[0]
                running = drawn == searched
            except sqlite3.OperationalError:  # no database or no tables yet
                pass
        assert running, (
            f"no running trial seen; the sweep printed:\n{(tmp_path / 'stderr.txt').read_text()[-3000:]}"
        )
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    (killed,) = load_study(out).get_trials(states=(TrialState.RUNNING,))
    time.sleep(3)  # past the grace period of two heartbeats

    assert main([*argv, "--n_trials", "1"]) == 0
    study = load_study(out)
    assert study.trials[killed.number].state == TrialState.FAIL
    (complete,) = study.get_trials(states=(TrialState.COMPLETE,))
    assert complete.params == killed.params  # the killed trial's parameters, run again


# ---------------------------------------------------------------------------- confirmation


class FakeConfirmation:
    """Stands in for the calibrated evaluation of the confirmation: checks that it is asked for the calibrated
    attack on >= 2 seeds, and returns the trial's screening report with the worst-case multiple set from
    ``multiples`` (by call: the first confirmed trial, the second, ...). The screening runs for real."""

    def __init__(self, monkeypatch, multiples):
        from immune_trainer.sweep import study as study_module

        self.multiples = list(multiples)
        self.trials: list[int] = []
        real = study_module.evaluate_conditions

        def fake(base, immunized, tokenizer, datasets, attack=None, config=None, **kwargs):
            if config.fixed_grid:
                return real(base, immunized, tokenizer, datasets, attack=attack, config=config, **kwargs)
            from immune_trainer.attacks import CalibratedAttack

            assert isinstance(attack, CalibratedAttack) and attack.calibration.calibrate_seeds >= 2
            assert config.threshold is None  # phi comes from the calibrated base runs, not the screening's
            number = int(kwargs["immunized_name"].split("trial ")[1].split()[0])
            folder = Path(config.cache_dir).parent / "trials" / str(number)
            report = ImmunizationReport.load(folder / "immunization_report.json")
            multiple = self.multiples[len(self.trials)]
            self.trials.append(number)
            resistance = report.conditions.resistance
            resistance.steps_multiple, resistance.multiple_is_lower_bound = multiple, False
            for fam in resistance.families:
                fam.steps_multiple, fam.decided, fam.multiple_is_lower_bound = multiple, True, False
            return report

        monkeypatch.setattr(study_module, "evaluate_conditions", fake)


def confirming_sweep(data, out, **config):
    return tiny_sweep(
        data, out, evaluation=EvaluationConfig(stability_tolerance=100.0), **{"n_trials": 3, "prune": False, **config}
    )


@pytest.fixture(scope="module")
def confirmed(data, tmp_path_factory):
    """Three screened trials; the two best confirmed, the calibrated evaluation reversing their order."""
    out = tmp_path_factory.mktemp("confirm") / "out"
    with pytest.MonkeyPatch.context() as mp:
        fake = FakeConfirmation(mp, [0.5, 3.0])
        result = confirming_sweep(data, out, confirm_top_k=2).run()
    return out, result, fake.trials


def test_the_confirmation_chooses_when_the_calibrated_attack_disagrees(confirmed):
    out, result, confirmed_trials = confirmed
    study = result.study
    first, second = confirmed_trials  # the screening's best first
    trials = {t.number: t for t in study.get_trials(states=(TrialState.COMPLETE,))}
    assert trials[first].user_attrs["cost_multiple"] >= trials[second].user_attrs["cost_multiple"]
    # The screening ranked `first` higher; under the calibrated attack it is 0.5x against 3x: `second` is chosen.
    assert result.best_trial.number == second and result.chosen_by == "calibrated"
    by_trial = {c["trial"]: c for c in result.confirmations}
    assert set(by_trial) == {first, second}
    for number, multiple in ((first, 0.5), (second, 3.0)):
        c = by_trial[number]
        # Both numbers are kept: the calibrated one and the screening's, and which attack gave each.
        assert c["cost_multiple"] == pytest.approx(multiple) and c["decided"] is True and c["feasible"]
        assert c["screening"]["cost_multiple"] == pytest.approx(trials[number].user_attrs["cost_multiple"])
        assert c["attack"] == CONFIRMATION_ATTACK and c["screening"]["attack"] == SCREENING_ATTACK
        confirmed_report = ImmunizationReport.load(c["report"])
        assert confirmed_report.extra["sweep"]["attack"] == CONFIRMATION_ATTACK
    pareto = json.loads((out / "pareto_front.json").read_text())
    assert pareto["best_trial"] == second and pareto["chosen_by"] == "calibrated"
    assert pareto["screening_attack"] == SCREENING_ATTACK
    assert "chosen under the calibrated attack" in pareto["choice"]
    assert {c["trial"] for c in pareto["confirmations"]} == {first, second}
    # best.yaml trains the confirmed choice, and says how it was chosen; the best report is the confirmed one.
    best_yaml = (out / "best.yaml").read_text()
    assert yaml.safe_load(best_yaml)["alpha"] == pytest.approx(trials[second].params["alpha"])
    assert "# chosen under the calibrated attack" in best_yaml
    assert result.best_report_path == by_trial[second]["report"]
    assert ImmunizationReport.load(result.best_report_path).extra["sweep"]["chosen_by"] == "calibrated"
    assert "calibrated_multiple" in result.table and "| calibrated_feasible |" in result.table
    # Every trial's own record says its numbers are the screening attack's.
    assert all(t.user_attrs["attack"] == SCREENING_ATTACK for t in trials.values())


def test_a_confirmed_trial_unstable_under_the_full_evaluation_is_never_chosen(confirmed, data, tmp_path):
    out, result, (first, second) = confirmed
    shutil.copytree(out, tmp_path / "out")
    sweep = confirming_sweep(data, tmp_path / "out", confirm_top_k=2)
    sweep._phi = result.study.user_attrs["phi"]
    # The 3x trial fails helpfulness (over-refusal) on the full evaluation: the 0.5x one is the choice.
    confirmations = [
        {**c, "feasible": False, "helpfulness_holds": False} if c["trial"] == second else c
        for c in result.confirmations
    ]
    assert sweep.summarize(result.study, confirmations).best_trial.number == first
    none_stable = [{**c, "feasible": False} for c in result.confirmations]
    again = sweep.summarize(result.study, none_stable)
    assert again.best_trial is None and "none of the confirmed trials" in again.choice


def test_a_resumed_sweep_does_not_redo_its_confirmations(confirmed, data, tmp_path, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(confirmed[0], out)
    fake = FakeConfirmation(monkeypatch, [])  # any confirmation asked for would fail: none is left
    spy = RunSpy(monkeypatch)
    result = confirming_sweep(data, out, confirm_top_k=2).run()
    assert fake.trials == [] and spy.fingerprints == []
    assert result.best_trial.number == confirmed[1].best_trial.number
    assert result.confirmations == confirmed[1].confirmations
    # Other calibration settings are another measurement: the confirmations are made again.
    fake = FakeConfirmation(monkeypatch, [0.5, 3.0])
    from immune_trainer.attacks import CalibrationConfig

    sweep = confirming_sweep(data, out, confirm_top_k=2)
    sweep.calibration = CalibrationConfig(calibrate_trials=5)
    sweep.run()
    assert sorted(fake.trials) == sorted(confirmed[2])


def test_confirmation_settings_are_checked(data, tmp_path):
    from immune_trainer.attacks import CalibrationConfig

    with pytest.raises(ConfigError, match="confirm_top_k must be an integer >= 0"):
        SweepConfig(confirm_top_k=-1)
    with pytest.raises(ConfigError, match=">= 2 seeds; calibrate_seeds is 1"):
        DefenseSweep(
            tiny_causal_lm("llama", seed=0),
            tiny_tokenizer(),
            **data,
            reference={"c": make_benign(4)},
            config=SweepConfig(output_dir=str(tmp_path)),
            calibration=CalibrationConfig(calibrate_seeds=1),
        )


@pytest.mark.slow
def test_the_cli_confirms_under_the_real_calibrated_attack(files, tmp_path, monkeypatch, capsys):
    """No fake: the best trial is retrained and measured with the calibrated attack; a rerun reuses it."""
    out = tmp_path / "out"
    argv = sweep_argv(
        files,
        out,
        "--n_trials",
        "2",
        "--prune",
        "false",
        "--stability_tolerance",
        "100",
        "--confirm_top_k",
        "1",
        "--calibrate_trials",
        "2",
    )
    assert main(argv) == 0
    assert "chosen under the calibrated attack" in capsys.readouterr().out
    pareto = json.loads((out / "pareto_front.json").read_text())
    (c,) = pareto["confirmations"]
    assert pareto["best_trial"] == c["trial"] and c["calibrate_seeds"] == 2
    report = ImmunizationReport.load(c["report"])
    assert report.search["kind"] == "calibrated" and report.search["seeds"] == 2
    assert report.threat_model.threshold == pytest.approx(c["phi"])
    assert c["cost_multiple"] == pytest.approx(report.conditions.resistance.steps_multiple)
    spy = RunSpy(monkeypatch)
    assert main(argv) == 0
    assert spy.fingerprints == []  # neither the trials nor the confirmation ran again


def test_the_leaderboard_tunes_with_the_confirmed_choice(data, tmp_path, monkeypatch):
    from immune_trainer.evaluation import ConditionDatasets
    from immune_trainer.leaderboard import _tune

    fake = FakeConfirmation(monkeypatch, [0.5, 3.0])
    datasets = ConditionDatasets(
        data["attack_train"], data["attack_eval"], reference={"chat": make_benign(4)}
    )
    args = {**DEFENSE_ARGS, "retain_weight": 1.0}
    chosen = _tune(
        get_defense("gradient_ascent"),
        tiny_causal_lm("llama", seed=0),
        tiny_tokenizer(),
        data["harmful_dataset"],
        data["retain_dataset"],
        datasets,
        attack(),
        EvaluationConfig(stability_tolerance=100.0),
        args,
        tmp_path,
        3,
        None,
    )
    study = load_study(tmp_path / "sweep")
    _, second = fake.trials
    assert chosen == study.trials[second].params  # the confirmed choice, not the screening's best


def test_a_calibrated_attack_is_screened_as_its_grid_and_confirms_with_its_calibration(data, tmp_path):
    from immune_trainer.attacks import CalibratedAttack, CalibrationConfig

    calibration = CalibrationConfig(calibrate_trials=3, calibrate_seeds=3)
    calibrated = CalibratedAttack(
        AttackConfig(families=["full", "lora"], max_steps=4, eval_every=2),
        calibration,
        reference={"chat": make_benign(4)},
    )
    sweep = DefenseSweep(
        tiny_causal_lm("llama", seed=0),
        tiny_tokenizer(),
        **data,
        reference={"chat": make_benign(4)},
        attacks=calibrated,
        config=SweepConfig(output_dir=str(tmp_path), attack_families=["mixed"]),
        progress=False,
    )
    # its own families (not attack_families) as the screening grid, its calibration for the confirmation
    assert sweep.labels == ["full", "lora"] and sweep.calibration is calibration
    assert {a.config.max_steps for a in sweep.attacks} == {4}
    assert sweep._calibrated_attack(tmp_path).family_names() == ["full", "lora"]
