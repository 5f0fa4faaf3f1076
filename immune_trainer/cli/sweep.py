"""``immune-trainer sweep``: load the model and data from SPECs, run a :class:`~immune_trainer.sweep.DefenseSweep`,
print its table."""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields, make_dataclass
from typing import Any

from ..attacks import AttackConfig, CalibrationConfig
from ..errors import ConfigError
from ..evaluation import EvaluationConfig, load_reference_spec
from ..sweep.config import SweepConfig, search_space
from ..sweep.study import DefenseSweep

__all__ = ["SweepData", "cmd_sweep"]


@dataclass
class SweepData:
    """Model data of ``immune-trainer sweep`` (each a dataset SPEC: file, folder, embedded:NAME or Hub id)."""

    dataset: str = field(
        default="embedded:harmful_qa/defense", metadata={"help": "Harmful data the defense trains against."}
    )
    retain_dataset: str | None = field(
        default="embedded:benign_qa", metadata={"help": "Capability data of the defense's retain loss."}
    )
    attack_dataset: str = field(
        default="embedded:harmful_qa/attack",
        metadata={"help": "Harmful data the attacker trains on (share no prompts with dataset)."},
    )
    eval_dataset: str = field(
        default="embedded:harmful_qa/in_domain",
        metadata={"help": "Held-out harmful data on which harm is measured."},
    )
    reference: list[str] = field(
        default_factory=lambda: [
            "plain_text=embedded:shakespeare/eval",
            "chat_answers=embedded:chat_responses",
        ],
        metadata={
            "help": "Stability reference sets as NAME=SPEC (the sweep's constraint holds on every one); "
            "SPEC lm_eval:TASK[,TASK...] names lm-evaluation-harness tasks (e.g. mmlu=lm_eval:mmlu)."
        },
    )
    eval_limit: int = field(
        default=0, metadata={"help": "Use at most this many rows of the eval and reference sets (0 = all)."}
    )


def _cli_dataclass(cls: type, drop: set[str]) -> type:
    """``cls`` without the fields in ``drop`` (same help texts), for a parser that already has those names."""
    kept = []
    for f in fields(cls):
        if f.name in drop:
            continue
        kwargs: dict[str, Any] = {"metadata": f.metadata}
        if f.default is not MISSING:
            kwargs["default"] = f.default
        if f.default_factory is not MISSING:
            kwargs["default_factory"] = f.default_factory
        kept.append((f.name, f.type, field(**kwargs)))
    out = make_dataclass(cls.__name__, kept)
    out.__module__ = cls.__module__  # its string annotations resolve in the original module
    out.__doc__ = cls.__doc__
    return out


_BENIGN_FIELDS = {f.name for f in fields(EvaluationConfig) if f.name.startswith(("benign_", "trainability_"))}


def cmd_sweep(argv: list[str]) -> int:
    """``immune-trainer sweep``: load the model and data from SPECs, run the study, print the table."""
    from dataclasses import asdict

    from ..data.loading import ModelArguments, load_dataset_spec, load_model_and_tokenizer, parse_cli_args

    # The sweep's output_dir holds the attack runs; --attack_families replaces --family; every trial writes
    # its own report; the sweep measures resistance and stability only (no generalization or benign task).
    # The trials are screened on the attack grid; the calibrated attack (CalibrationConfig's options) confirms
    # the best --confirm_top_k of them (--confirm_top_k 0 instead of --fixed_grid).
    attack_cls = _cli_dataclass(AttackConfig, {"output_dir", "family"})
    eval_cls = _cli_dataclass(
        EvaluationConfig, {"report", "generalization_max_steps", "fixed_grid"} | _BENIGN_FIELDS
    )
    model_args, data, cfg, attack_args, eval_args, calibration = parse_cli_args(
        [ModelArguments, SweepData, SweepConfig, attack_cls, eval_cls, CalibrationConfig],
        argv,
        prog="immune-trainer sweep",
    )
    attack_cfg = AttackConfig(**asdict(attack_args))
    eval_cfg = EvaluationConfig(**asdict(eval_args))
    search_space(cfg.defense, cfg.space)  # a bad defense or space fails before any model is loaded
    references = []
    for item in data.reference:
        name, sep, spec = item.partition("=")
        if not sep or not name:
            raise ConfigError(f"--reference takes NAME=SPEC, got {item!r}.")
        references.append((name, spec))
    model, tokenizer = load_model_and_tokenizer(model_args)

    def limited(ds):
        return ds.select(range(data.eval_limit)) if data.eval_limit and len(ds) > data.eval_limit else ds

    reference = {name: load_reference_spec(spec, data.eval_limit) for name, spec in references}
    specs = {
        "model": model_args.model,
        "tokenizer": model_args.tokenizer,
        "dataset": data.dataset,
        "retain_dataset": data.retain_dataset,
    }
    if model_args.trust_remote_code:
        specs["trust_remote_code"] = True
    sweep = DefenseSweep(
        model,
        tokenizer,
        harmful_dataset=load_dataset_spec(data.dataset),
        retain_dataset=load_dataset_spec(data.retain_dataset) if data.retain_dataset else None,
        attack_train=load_dataset_spec(data.attack_dataset),
        attack_eval=limited(load_dataset_spec(data.eval_dataset)),
        reference=reference,
        attacks=attack_cfg,
        evaluation=eval_cfg,
        config=cfg,
        data_specs=specs,
        calibration=calibration,
    )
    result = sweep.run()
    print(result.table)
    print(
        f"\nphi = {result.study.user_attrs.get('phi'):.4g}; wrote {result.table_path}, {result.csv_path}, "
        f"{result.pareto_path}" + (f", {result.plot_path}" if result.plot_path else "")
    )
    print(result.choice)
    if result.best_trial is None:
        print("no best setting (see the table's stability columns).")
    else:
        print(
            f"best: trial {result.best_trial.number} -> {result.best_config_path} "
            f"(train it: immune-trainer immunize --config {result.best_config_path})"
        )
    return 0
