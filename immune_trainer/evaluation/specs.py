"""``immune-trainer evaluate``: the models and datasets named by SPEC strings, loaded and evaluated."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..attacks import AttackConfig
from ..errors import ConfigError
from .config import EvaluationConfig
from .pipeline import evaluate_conditions
from .recorded import condition_datasets

__all__ = ["DatasetSpecs", "EvaluationData", "evaluate_from_specs", "load_reference_spec"]


def load_reference_spec(spec: str, limit: int | None = None):
    """A stability reference set from its SPEC: ``lm_eval:TASK[,TASK...][?OPTION=VALUE&...]`` names
    lm-evaluation-harness tasks (an :class:`~immune_trainer.scoring.LMEvalTasks`, ``limit`` rows per task
    unless the SPEC sets one), any other SPEC a dataset (its first ``limit`` rows)."""
    from ..data.loading import load_dataset_spec
    from ..scoring import LM_EVAL_SPEC_PREFIX, LMEvalTasks

    if spec.startswith(LM_EVAL_SPEC_PREFIX):
        return LMEvalTasks.from_spec(spec, limit=limit or None)
    ds = load_dataset_spec(spec)
    return ds.select(range(limit)) if limit and len(ds) > limit else ds


@dataclass
class DatasetSpecs:
    """The harmful, reference and benign datasets of an evaluation, each a dataset SPEC (see the CLI); what
    ``immune-trainer evaluate`` and ``immune-trainer leaderboard --config`` both take."""

    dataset: str = field(
        default="embedded:harmful_qa/attack", metadata={"help": "Harmful data the attacker trains on."}
    )
    eval_dataset: str = field(
        default="embedded:harmful_qa/in_domain",
        metadata={"help": "Held-out harmful data on which f is measured."},
    )
    cross_domain_dataset: str | None = field(
        default=None,
        metadata={"help": "Harmful data of another harm domain (attack and evaluation split 50/50)."},
    )
    reference: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Reference sets for stability, as NAME=SPEC (several after one --reference); SPEC "
            "lm_eval:TASK[,TASK...] names lm-evaluation-harness tasks (e.g. mmlu=lm_eval:mmlu), scored by "
            "their accuracy."
        },
    )
    benign_dataset: str | None = field(
        default=None, metadata={"help": "Benign task for trainability (split 80/20 into train and eval)."}
    )
    harmful_prompts: str | None = field(
        default=None,
        metadata={
            "help": "Held-out harmful prompts (a 'prompt' column) for the side-effects check at step 0, "
            "e.g. embedded:donotanswer."
        },
    )
    benign_requests: str | None = field(
        default="embedded:benign_requests",
        metadata={
            "help": "Benign requests, many that look unsafe (XSTest-style; a 'prompt' column), for the "
            "over-refusal check of helpfulness at step 0 (part of stability): embedded:benign_requests "
            "(offline, shipped), Paul/XSTest (the real XSTest, from the Hub), or none."
        },
    )
    eval_limit: int = field(
        default=0, metadata={"help": "Use at most this many rows of each eval set (0 = all)."}
    )

    def record(self) -> dict:
        """The data record (:mod:`immune_trainer.evaluation.recorded`) the report keeps, so that
        ``immune-trainer verify`` rebuilds the same rows from the report alone: eval sets keep their first
        ``eval_limit`` rows; cross-domain and benign data are cut by train_test_split with seed 0."""
        for item in self.reference:
            if "=" not in item:
                raise ConfigError(f"--reference takes NAME=SPEC, got {item!r}.")
        requests = self.benign_requests
        return {
            "attack_train": self.dataset,
            "attack_eval": self.eval_dataset,
            "eval_limit": self.eval_limit,
            "split_seed": 0,
            "cross_domain": self.cross_domain_dataset,
            "cross_domain_split": "train_test_split" if self.cross_domain_dataset else None,
            "reference": list(self.reference),
            "benign": self.benign_dataset,
            "harmful_prompts": self.harmful_prompts,
            "benign_requests": None if (requests or "none").lower() == "none" else requests,
        }


@dataclass
class EvaluationData(DatasetSpecs):
    """Datasets and the base model for ``immune-trainer evaluate`` (each a dataset SPEC, see the CLI)."""

    base_model: str = field(default="embedded", metadata={"help": "The model before immunization."})
    defense: str | None = field(
        default=None,
        metadata={
            "help": "The registered defense --model was trained with (recorded in the report). A defense that "
            "protects only while something is applied during fine-tuning (security_vectors) needs it: its hook "
            "is built from the --model folder and applied to every fine-tuning of the immunized model, which "
            "is attacked as deployed (the folder's weights without the vector)."
        },
    )


def evaluate_from_specs(
    model_args,
    data: EvaluationData,
    attack_cfg: AttackConfig,
    cfg: EvaluationConfig,
    progress=None,
    calibration=None,
):
    """The ``immune-trainer evaluate`` command: load everything from SPECs and run :func:`evaluate_conditions`
    (the attack calibrated with ``calibration``, a :class:`~immune_trainer.attacks.CalibrationConfig`, unless
    ``cfg.fixed_grid``)."""
    from dataclasses import replace

    from ..data.loading import load_model_and_tokenizer

    # What data is used, written first and the datasets built from it (DatasetSpecs.record).
    record = data.record()
    spec = None
    if data.defense:
        from ..defenses import get_defense

        spec = get_defense(data.defense)  # an unknown name fails before any model is loaded
    hook = None
    if spec is not None and spec.attack_time_hook is not None:
        # The defense's output folder holds its adapter (the vector) over a base model: transformers loads
        # the base with the adapter on, the attack runs with the hook and the model is deployed without it.
        from ..attacks import drop_adapters

        hook = spec.attack_time_hook(model_args.model)
        immunized, tokenizer = _load_adapter_folder(model_args)
        immunized = drop_adapters(immunized)
    else:
        immunized, tokenizer = load_model_and_tokenizer(model_args)
    base, _ = load_model_and_tokenizer(replace(model_args, model=data.base_model, tokenizer=None))
    sets = condition_datasets(record).datasets
    attack = attack_cfg
    if not cfg.fixed_grid and calibration is not None:
        from pathlib import Path

        from ..attacks import CalibratedAttack

        if not sets.reference:
            raise ConfigError(
                "the calibrated attack (the default) needs --reference NAME=SPEC for its capability cap; "
                "or pass --fixed_grid to run the grid as given."
            )
        attack = CalibratedAttack(
            replace(attack_cfg, output_dir=None),
            calibration,
            reference=sets.reference,
            storage_dir=str(Path(cfg.cache_dir) / "search") if cfg.cache_dir else None,
        )
    report = evaluate_conditions(
        base,
        immunized,
        tokenizer,
        sets,
        attack=attack,
        config=cfg,
        progress=progress,
        base_name=data.base_model,
        immunized_name=model_args.model,
        defense=None if spec is None else {"name": spec.name, "config": {}},
        prepare_immunized=hook,
    )
    report.datasets = record
    return report


def _load_adapter_folder(model_args):
    """A defense's adapter folder (its ``adapter_config.json`` names the base model) as a model with the
    adapter on, and its tokenizer (``--tokenizer``, else the folder's)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_args.model, use_safetensors=True, trust_remote_code=model_args.trust_remote_code
        )
        tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer or model_args.model)
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"cannot load the defense's folder {model_args.model!r} (an adapter over the base model its "
            f"adapter_config.json names): {e}"
        ) from None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer
