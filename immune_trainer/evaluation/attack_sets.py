"""The attacks of an evaluation: phi read off the base model, the generalization sets' attack, and the
threat model's record of what was run (the grid, or the values a search tried)."""

from __future__ import annotations

import statistics
from dataclasses import replace
from typing import Any

from ..attacks import ATTACKS, AttackConfig, AttackSearch, AttackSuite, HarmfulFineTuningAttack
from ..conditions import AttackCurve
from ..errors import ConfigError
from .config import EvaluationConfig


def _model_id(model) -> str:
    return str(
        getattr(model, "name_or_path", None)
        or getattr(getattr(model, "config", None), "_name_or_path", "")
        or type(model).__name__
    )


def dependency_versions() -> dict[str, str]:
    """Versions of the libraries a measurement depends on (for the report's reproducibility block)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in (
        "torch",
        "transformers",
        "trl",
        "peft",
        "datasets",
        "accelerate",
        "evaluate",
        "huggingface_hub",
    ):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def threshold_from_base(curves: list[AttackCurve], step: int) -> float:
    """The base model's median f over the grid at ``step`` (phi when the user gives none)."""
    values = []
    for curve in curves:
        family = ATTACKS.get(curve.config.get("family", "full"))
        if family is not None and not family.trains:
            continue  # a training-free attack has no steps to read phi at
        match = [p.value for p in curve.points if p.step == step]
        if not match:
            raise ConfigError(
                f"cannot read phi off the base model at attack step {step}: the curves were evaluated at steps "
                f"{[p.step for p in curve.points]}; set threshold_step to one of them or give threshold."
            )
        values.append(match[0])
    if not values:
        raise ConfigError("phi cannot be read off training-free attacks alone; give threshold.")
    return float(statistics.median(values))


def _grid_axes(config: AttackConfig) -> dict[str, Any]:
    """The threat model's record of the grid axes beyond learning rates, samples and seeds."""
    families = config.family_names()
    axes: dict[str, Any] = {
        "families": families,
        "optimizers": list(config.optimizers),
        "lr_scheduler_types": config.schedules(),
        "warmup_ratio": config.warmup_ratio,
    }
    if "lora" in families:
        axes["lora_ranks"] = list(config.lora_ranks or [config.lora_r])
    if "mixed" in families:
        axes["harmful_shares"] = list(config.harmful_shares)
    if "embedding" in families or "embedding_universal" in families:
        axes["num_virtual_tokens"] = config.num_virtual_tokens
    if "embedding" in families:  # the per-prompt suffix's budget
        axes["embedding_steps"] = config.embedding_steps
        axes["embedding_lr"] = config.embedding_lr
    if "refusal_ablation" in families or "refusal_ablation_fixed" in families:
        axes["refusal_layer"] = config.refusal_layer
    return axes


def _suite_grid(suite: AttackSuite) -> dict[str, Any]:
    """The threat model's record of a suite: the union of every axis, and each member's own settings."""

    def union(values):
        return list(dict.fromkeys(values))

    grid: dict[str, Any] = {
        "learning_rates": union(lr for c in suite.configs for lr in c.learning_rates),
        "num_samples": union(n for c in suite.configs for n in c.num_samples),
        "seeds": union(s for c in suite.configs for s in c.seeds),
    }
    for c in suite.configs:
        for axis, value in _grid_axes(c).items():
            if isinstance(value, list):
                grid[axis] = union([*grid.get(axis, []), *value])
            else:
                grid.setdefault(axis, value)
    if len(suite.configs) > 1:
        grid["settings"] = [
            {
                "families": c.family_names(),
                "learning_rates": list(c.learning_rates),
                "seeds": list(c.seeds),
                **{k: v for k, v in _grid_axes(c).items() if k != "families"},
                "max_steps": c.max_steps,
            }
            for c in suite.configs
        ]
    return grid


def _generalization_attack(attack: AttackSuite, cfg: EvaluationConfig) -> AttackSuite:
    """The attack run on the generalization sets: the same grid, with its own step budget if given."""
    steps = cfg.generalization_max_steps
    if steps is None or all(c.max_steps == steps for c in attack.configs):
        return attack
    suite = AttackSuite(
        [
            HarmfulFineTuningAttack(
                replace(a.config, max_steps=steps, eval_every=min(a.config.eval_every, steps)),
                scorer=a.scorer,
            )
            for a in attack.attacks
        ]
    )
    suite.show_progress = attack.show_progress
    return suite


def _with_output_dir(attack: HarmfulFineTuningAttack, output_dir: str) -> HarmfulFineTuningAttack:
    out = HarmfulFineTuningAttack(replace(attack.config, output_dir=output_dir), scorer=attack.scorer)
    out.show_progress = attack.show_progress
    return out


def is_search(attack) -> bool:
    """Whether ``attack`` is an :class:`~immune_trainer.attacks.AttackSearch` (not a fixed grid)."""
    return isinstance(attack, AttackSearch)

def _generalization_search(search, cfg: EvaluationConfig):
    """The search of the generalization sets: the same search under the generalization budget."""
    steps = cfg.generalization_max_steps
    if steps is None or steps == search.config.max_steps:
        return search
    return search.with_config(
        replace(search.config, max_steps=steps, eval_every=min(search.config.eval_every, steps))
    )


def _budget(attack) -> int:
    configs = getattr(attack, "configs", None) or [attack.config]
    return max(c.max_steps for c in configs)


def _searched_grid(curves: dict[str, dict[str, list[AttackCurve]]]) -> dict[str, list]:
    """The grid a search actually ran: the values of the feasible trials on the main attack set."""
    runs = [c.config for who in curves.values() for c in who.get("attack", [])]
    axes = (
        ("learning_rates", "learning_rate"),
        ("num_samples", "num_samples"),
        ("seeds", "seed"),
        ("families", "family"),
        ("optimizers", "optimizer"),
        ("lr_scheduler_types", "lr_scheduler_type"),
        ("warmup_ratios", "warmup_ratio"),
        ("lora_ranks", "lora_rank"),
        ("harmful_shares", "harmful_share"),
        ("max_steps", "max_steps"),
    )
    grid = {axis: sorted({run[key] for run in runs if key in run}) for axis, key in axes}
    return {axis: values for axis, values in grid.items() if values}


def _asdict(obj) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(obj)
