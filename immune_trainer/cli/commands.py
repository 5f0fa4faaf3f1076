"""The commands ``attack``, ``evaluate``, ``immunize``, ``assets`` and the registry listings
(``defenses``, ``scorers``, ``attacks``): each ``cmd_*`` takes the argument list and returns an exit code.

Their options are the dataclasses the Python API uses (:class:`~immune_trainer.sweep.config.ImmunizeArguments`
lives beside the sweep that writes best.yaml in its shape), parsed with trl's ``TrlParser``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..data.loading import (
    ModelArguments,
    load_dataset_spec,
    load_model_and_tokenizer,
    parse_cli_args,
    validate_sources,
)
from ..errors import ConfigError, DataError
from ..sweep.config import ImmunizeArguments

# ---------------------------------------------------------------------------- shared arguments


@dataclass
class AttackDataArguments:
    """The attacker's data and where results go."""

    dataset: str = field(
        default="embedded:harmful_qa/attack",
        metadata={
            "help": "Harmful training data of the attack (file, folder, embedded:NAME/SPLIT or Hub id)."
        },
    )
    eval_dataset: str | None = field(
        default="embedded:harmful_qa/in_domain",
        metadata={
            "help": "Held-out harmful data on which f is measured; None splits eval_size rows off dataset."
        },
    )
    eval_size: int = field(default=32, metadata={"help": "Rows split off dataset when eval_dataset is None."})
    eval_limit: int = field(default=0, metadata={"help": "Use at most this many eval rows (0 = all)."})
    output: str = field(
        default="attack_curves.json", metadata={"help": "Where the attack curves JSON is written."}
    )
    reference: str | None = field(
        default=None,
        metadata={
            "help": "Reference set SPEC of the capability constraint of --search (e.g. plain text), or "
            "lm_eval:TASK[,TASK...] for lm-evaluation-harness tasks."
        },
    )


# ---------------------------------------------------------------------------- loading helpers


def _eval_split(data_args: AttackDataArguments):
    train = load_dataset_spec(data_args.dataset)
    if data_args.eval_dataset:
        eval_ds = load_dataset_spec(data_args.eval_dataset)
    else:
        if len(train) <= data_args.eval_size:
            raise DataError(
                f"dataset has {len(train)} rows: too few to split {data_args.eval_size} off for evaluation; "
                "pass --eval_dataset."
            )
        parts = train.train_test_split(test_size=data_args.eval_size, seed=0)
        train, eval_ds = parts["train"], parts["test"]
    if data_args.eval_limit and len(eval_ds) > data_args.eval_limit:
        eval_ds = eval_ds.select(range(data_args.eval_limit))
    return train, eval_ds


def _parse(dataclass_types, argv: list[str], prog: str):
    """Parse ``argv`` (and ``--config``) into the dataclasses; errors are ConfigError (see parse_cli_args)."""
    return parse_cli_args(dataclass_types, argv, prog=f"immune-trainer {prog}")


def curves_table(curves) -> str:
    """A plain-text table of attack curves: one row per grid setting, one column per evaluated step."""
    from ..attacks import setting_label

    steps = sorted({p.step for c in curves for p in c.points})
    head = ["setting"] + [f"step {s}" for s in steps]
    rows = []
    for c in curves:
        by_step = {p.step: p.value for p in c.points}
        label = setting_label(c.config)  # every axis the run has (no learning rate if training-free)
        rows.append([label] + [f"{by_step[s]:.4f}" if s in by_step else "" for s in steps])
    widths = [max(len(str(r[i])) for r in [head] + rows) for i in range(len(head))]
    return "\n".join("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)) for row in [head] + rows)


# ---------------------------------------------------------------------------- commands


def cmd_attack(argv: list[str]) -> int:
    from ..attacks import AttackConfig, HarmfulFineTuningAttack, SearchConfig, SearchSpace

    model_args, data_args, attack_cfg, search_cfg, space = _parse(
        [ModelArguments, AttackDataArguments, AttackConfig, SearchConfig, SearchSpace], argv, "attack"
    )
    validate_sources(
        models=[model_args.model, model_args.tokenizer], datasets=[data_args.dataset, data_args.eval_dataset]
    )
    model, tokenizer = load_model_and_tokenizer(model_args)
    train, eval_ds = _eval_split(data_args)
    if search_cfg.search:
        return _attack_search(
            model_args, data_args, attack_cfg, search_cfg, space, model, tokenizer, train, eval_ds
        )
    attack = HarmfulFineTuningAttack(attack_cfg)
    result = attack.run(model, tokenizer, train, eval_ds, progress=lambda m: print(m, flush=True))
    payload = {
        "model": model_args.model,
        "dataset": data_args.dataset,
        "eval_dataset": data_args.eval_dataset,
    }
    payload.update(result.to_dict())
    _atomic_write_json(Path(data_args.output), payload)
    print(curves_table(result.curves))
    direction = "lower" if attack.scorer.higher_is_better else "higher"
    print(
        f"\nworst {attack.scorer.name} over the grid: {result.worst_value(attack.scorer.higher_is_better):.4f} "
        f"({direction} is more harmful)\nwrote {data_args.output}"
    )
    return 0


def _attack_search(
    model_args, data_args, attack_cfg, search_cfg, space, model, tokenizer, train, eval_ds
) -> int:
    """``immune-trainer attack --search N``: the most harmful setting whose capability loss stays in tolerance."""
    import optuna

    from ..attacks import AttackSearch, trials_table

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the progress bar and the table say it all

    if not data_args.reference:
        raise ConfigError(
            "--search needs --reference SPEC: the set on which capability must stay in tolerance."
        )
    from ..evaluation import load_reference_spec

    search = AttackSearch(attack_cfg, search_cfg, space, reference=load_reference_spec(data_args.reference))
    result = search.run(model, tokenizer, train, eval_ds, progress_bar=True)
    payload = {
        "model": model_args.model,
        "dataset": data_args.dataset,
        "eval_dataset": data_args.eval_dataset,
    }
    payload.update(reference=data_args.reference, **result.to_dict())
    _atomic_write_json(Path(data_args.output), payload)
    print(trials_table(result))
    print(f"\n{result.summary()}\nwrote {data_args.output}")
    return 0


def cmd_evaluate(argv: list[str]) -> int:
    from ..attacks import AttackConfig, CalibrationConfig
    from ..evaluation import EvaluationConfig, EvaluationData, evaluate_from_specs

    model_args, data, attack_cfg, eval_cfg, calibration = _parse(
        [ModelArguments, EvaluationData, AttackConfig, EvaluationConfig, CalibrationConfig], argv, "evaluate"
    )
    references = []
    for item in data.reference:
        name, sep, spec = item.partition("=")
        if not sep:
            raise ConfigError(f"--reference takes NAME=SPEC, got {item!r}.")
        references.append(spec)
    validate_sources(
        models=[model_args.model, model_args.tokenizer, data.base_model],
        datasets=[
            data.dataset,
            data.eval_dataset,
            data.cross_domain_dataset,
            data.benign_dataset,
            None if (data.benign_requests or "none").lower() == "none" else data.benign_requests,
            *references,
        ],
    )
    report = evaluate_from_specs(
        model_args, data, attack_cfg, eval_cfg, progress=lambda m: print(m, flush=True), calibration=calibration
    )
    report.save(eval_cfg.report)
    print(report.table())
    print(f"\nwrote {eval_cfg.report}")
    return 0


def _wants_help(argv: list[str]) -> bool:
    """True when argv asks for help; ``_parse(..., ["--help"], ...)`` then prints it and exits 0 (argparse)."""
    return any(a in ("-h", "--help") for a in argv)


def _defense_selection(names: list[str]):
    """ImmunizeArguments whose ``--defense`` help lists the registered defenses (for --help)."""
    from dataclasses import make_dataclass

    help_text = (
        f"Registered defense to train (required): one of {', '.join(names)}. "
        "`immune-trainer immunize --defense NAME --help` lists that defense's options."
    )
    return make_dataclass(
        "ImmunizeArguments",
        [("defense", str | None, field(default=None, metadata={"help": help_text}))],
        bases=(ImmunizeArguments,),
    )


def _defense_from_config(argv: list[str]) -> str | None:
    """The defense named by ``defense:`` in the --config YAML (the shape ``immune-trainer sweep`` writes its
    best.yaml in), or None."""
    import yaml

    if "--config" in argv and argv.index("--config") + 1 < len(argv):
        try:
            loaded = yaml.safe_load(Path(argv[argv.index("--config") + 1]).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError, UnicodeDecodeError):
            loaded = None  # parse_cli_args names the problem with the file
        if isinstance(loaded, dict) and loaded.get("defense"):
            return str(loaded["defense"])
    return None


def cmd_immunize(argv: list[str]) -> int:
    from ..defenses import get_defense, list_defenses

    argv = [part for a in argv for part in (a.split("=", 1) if a.startswith("--defense=") else [a])]
    selection = _defense_selection(list_defenses())
    from_config = None if "--defense" in argv else _defense_from_config(argv)
    if "--defense" not in argv and from_config is None:
        if _wants_help(argv):  # the options every defense shares, and the defenses to choose from
            _parse([selection], ["--help"], "immunize")
        raise ConfigError(f"immunize needs --defense NAME; known defenses: {', '.join(list_defenses())}.")
    if from_config is not None:  # a sweep's best.yaml names its defense
        argv = [*argv, "--defense", from_config]
    i = argv.index("--defense")
    if i + 1 >= len(argv) or argv[i + 1].startswith("-"):
        if _wants_help(argv):
            _parse([selection], ["--help"], "immunize")
        raise ConfigError("--defense needs a name.")
    spec = get_defense(argv[i + 1])
    rest = argv[:i] + argv[i + 2 :]
    if _wants_help(rest):
        _parse([selection, spec.config_class], ["--help"], "immunize")

    data, config = _parse([ImmunizeArguments, spec.config_class], rest, "immunize")
    if not spec.trainer_class.takes_retain_dataset:
        if data.retain_dataset == ImmunizeArguments.__dataclass_fields__["retain_dataset"].default:
            data.retain_dataset = None  # the default retain set is for the defenses that take one
    validate_sources(models=[data.model, data.tokenizer], datasets=[data.dataset, data.retain_dataset])
    model_args = ModelArguments(
        model=data.model, tokenizer=data.tokenizer, trust_remote_code=config.trust_remote_code
    )
    model, tokenizer = load_model_and_tokenizer(model_args)
    harmful = load_dataset_spec(data.dataset)
    retain = load_dataset_spec(data.retain_dataset) if data.retain_dataset else None
    trainer = spec.trainer_class(
        model=model, args=config, harmful_dataset=harmful, retain_dataset=retain, processing_class=tokenizer
    )
    trainer.train()
    trainer.save_model(config.output_dir)
    tokenizer.save_pretrained(config.output_dir)
    print(f"immunized model ({spec.name}) written to {config.output_dir}")
    return 0


@dataclass
class AssetsArguments:
    """Options of ``immune-trainer assets``."""

    prepare: bool = field(
        default=True, metadata={"help": "Fetch, verify, extract and convert what is missing."}
    )
    judge: bool = field(
        default=False,
        metadata={
            "help": "Also retrain the offline harm judge into the cache (a few minutes; the package ships the "
            "weights this training gives, used while the cache has none)."
        },
    )


def cmd_assets(argv: list[str]) -> int:
    from ..data import assets

    (args,) = _parse([AssetsArguments], argv, "assets")
    if args.prepare:
        assets.prepare_model()
        assets.prepare_all(model=False)
    if args.judge:
        from ..scoring.offline_judge import train_offline_judge

        metrics = train_offline_judge()
        print(f"offline judge: accuracy {metrics['accuracy']:.3f}, ROC-AUC {metrics['roc_auc']:.3f}")
    print(f"cache: {assets.cache_dir()}")
    for row in assets.list_assets():
        size = f"{row['size'] / 1e6:.0f} MB" if row.get("size") else ""
        print(
            f"{row['name']:24s} {row['status']:8s} {size:>8s}  {row.get('package', '')}=={row.get('version', '')}"
        )
    return 0


_LIST_HELP = {
    "defenses": "List the registered defenses (immune-trainer immunize --defense NAME).",
    "scorers": "List the registered scorers: harmfulness f and capability g, with their direction.",
    "attacks": "List the registered attack families (AttackConfig.family).",
}


def cmd_list(kind: str, argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog=f"immune-trainer {kind}", description=_LIST_HELP[kind])
    parser.parse_args(argv or [])
    if kind == "defenses":
        from ..defenses import DEFENSES

        for name, spec in sorted(DEFENSES.items()):
            print(f"{name:20s} {spec.description}")
    elif kind == "scorers":
        from ..scoring import SCORERS

        for name, cls in sorted(SCORERS.items()):
            print(f"{name:20s} {cls.kind:12s} higher_is_better={cls.higher_is_better}  {cls.description}")
    else:
        from ..attacks import ATTACKS

        for name, fam in sorted(ATTACKS.items()):
            print(f"{name:20s} {fam.description}")
    return 0


def _atomic_write_json(path: Path, payload) -> None:
    """Write ``payload`` as JSON atomically (temporary file + os.replace; see report.atomic_write)."""
    from ..errors import OutputError
    from ..files import atomic_write

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(
            f"cannot write {path}: {err.strerror or err}. Choose a writable location."
        ) from None
    atomic_write(path, json.dumps(payload, indent=2, default=str))
