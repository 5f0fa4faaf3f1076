"""What an attack search varies and over what (:class:`SearchSpace`, :data:`SEARCHABLE`), and how it
runs: trials, seed, storage and the capability constraint (:class:`SearchConfig`). The search itself is
:class:`~immune_trainer.attacks.search.AttackSearch`."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .config import AttackConfig, _as_list, optimizer_arguments
from .families import get_attack

# ---------------------------------------------------------------------------- the search space

#: The attack settings a search can vary, with what each one sets on the trial's AttackConfig.
SEARCHABLE: dict[str, str] = {
    "learning_rate": "learning rate, log-uniform in [lr_min, lr_max] (AttackConfig.learning_rates)",
    "max_steps": "attack steps, an integer in [min_steps, the budget's max_steps] (AttackConfig.max_steps)",
    "optimizer": "optimizer, one of optimizer_choices (AttackConfig.optimizers)",
    "lr_scheduler_type": "learning-rate schedule, one of scheduler_choices (AttackConfig.lr_scheduler_types)",
    "warmup_ratio": "warm-up as a share of the trial's steps, one of warmup_ratio_choices "
    "(AttackConfig.warmup_ratio)",
    "family": "attack family, one of family_choices (AttackConfig.families)",
    "lora_rank": "LoRA rank for family 'lora', one of lora_rank_choices (AttackConfig.lora_ranks)",
    "batch_size": "examples per optimizer step, one of batch_size_choices (AttackConfig.batch_size)",
    "harmful_share": "share of harmful pairs in the benign data for 'mixed' and 'jailbreak_tuning', one of "
    "harmful_share_choices (AttackConfig.harmful_shares)",
}


@dataclass
class SearchSpace:
    r"""Which attack settings the search varies and over what (everything else comes from the budget's
    :class:`~immune_trainer.attacks.AttackConfig`; of its list axes, the first value is used).

    Parameters:
        search_space (`list[str]`): the searched settings, names from :data:`SEARCHABLE`.
        lr_min, lr_max (`float`): the log-uniform learning-rate range (TamperBench: 1e-6..1e-3).
        min_steps (`int` or `None`): fewest attack steps a trial may take; `None`: the budget's `eval_every`.
        family_choices, optimizer_choices, scheduler_choices, warmup_ratio_choices, lora_rank_choices,
        batch_size_choices, harmful_share_choices: the categorical choices.
    """

    search_space: list[str] = field(
        default_factory=lambda: list(SEARCHABLE),
        metadata={"help": f"Attack settings the search varies; any of: {', '.join(SEARCHABLE)}."},
    )
    lr_min: float = field(default=1e-6, metadata={"help": "Smallest learning rate searched (log-uniform)."})
    lr_max: float = field(default=1e-3, metadata={"help": "Largest learning rate searched (log-uniform)."})
    min_steps: int | None = field(
        default=None,
        metadata={
            "help": "Fewest attack steps a trial may take (the most is the budget's max_steps); None: the "
            "budget's eval_every, so every curve has a point there."
        },
    )
    family_choices: list[str] = field(
        default_factory=lambda: ["full", "lora"], metadata={"help": "Attack families searched."}
    )
    optimizer_choices: list[str] = field(
        default_factory=lambda: ["adamw", "sgd", "adagrad"],
        metadata={"help": "Optimizers searched (TamperBench: adamw, adagrad, sgd)."},
    )
    scheduler_choices: list[str] = field(
        default_factory=lambda: ["constant", "cosine"], metadata={"help": "Learning-rate schedules searched."}
    )
    warmup_ratio_choices: list[float] = field(
        default_factory=lambda: [0.0, 0.1], metadata={"help": "Warm-up shares of the steps searched."}
    )
    lora_rank_choices: list[int] = field(
        default_factory=lambda: [8, 16, 32], metadata={"help": "LoRA ranks searched (family 'lora')."}
    )
    batch_size_choices: list[int] = field(
        default_factory=lambda: [2, 4, 8], metadata={"help": "Attack batch sizes searched."}
    )
    harmful_share_choices: list[float] = field(
        default_factory=lambda: [0.1, 0.3, 1.0],
        metadata={"help": "Harmful shares searched (families 'mixed' and 'jailbreak_tuning')."},
    )

    def __post_init__(self):
        from transformers.trainer_utils import SchedulerType

        for name in ("search_space", "family_choices", "optimizer_choices", "scheduler_choices"):
            setattr(self, name, _as_list(getattr(self, name)))
        unknown = [p for p in self.search_space if p not in SEARCHABLE]
        if unknown:
            raise ConfigError(
                f"unknown search parameter(s) {unknown}; searchable attack settings: {', '.join(SEARCHABLE)}."
            )
        if not self.search_space:
            raise ConfigError(f"search_space must name at least one of: {', '.join(SEARCHABLE)}.")
        if not (math.isfinite(self.lr_min) and math.isfinite(self.lr_max) and 0 < self.lr_min <= self.lr_max):
            raise ConfigError(f"need 0 < lr_min <= lr_max, got lr_min={self.lr_min}, lr_max={self.lr_max}.")
        if self.min_steps is not None and self.min_steps < 1:
            raise ConfigError(f"min_steps must be a positive integer, got {self.min_steps}.")
        for name in (
            "family_choices",
            "optimizer_choices",
            "scheduler_choices",
            "warmup_ratio_choices",
            "lora_rank_choices",
            "batch_size_choices",
            "harmful_share_choices",
        ):
            if not getattr(self, name):
                raise ConfigError(f"{name} must not be empty.")
        for family in self.family_choices:
            if not get_attack(family).trains:
                raise ConfigError(
                    f"attack family {family!r} is training-free: it has no learning rate, steps or optimizer "
                    "to search; evaluate it with the attack grid instead."
                )
        for optimizer in self.optimizer_choices:
            optimizer_arguments(optimizer)
        known = {s.value for s in SchedulerType}
        bad = [s for s in self.scheduler_choices if s not in known]
        if bad:
            raise ConfigError(f"unknown learning-rate schedule(s) {bad}; known: {', '.join(sorted(known))}.")
        if any(not 0.0 <= r < 1.0 for r in self.warmup_ratio_choices):
            raise ConfigError(f"warmup_ratio_choices must lie in [0, 1), got {self.warmup_ratio_choices}.")
        if any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in self.lora_rank_choices):
            raise ConfigError(f"lora_rank_choices must be positive integers, got {self.lora_rank_choices}.")
        if any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in self.batch_size_choices):
            raise ConfigError(f"batch_size_choices must be positive integers, got {self.batch_size_choices}.")
        if any(not 0.0 < p <= 1.0 for p in self.harmful_share_choices):
            raise ConfigError(f"harmful_share_choices must lie in (0, 1], got {self.harmful_share_choices}.")

    def check_budget(self, budget: AttackConfig) -> None:
        """Raise :class:`ConfigError` when the space does not fit the budget's config."""
        if "max_steps" in self.search_space and self.steps_range(budget)[0] > budget.max_steps:
            raise ConfigError(
                f"min_steps={self.steps_range(budget)[0]} exceeds the budget's max_steps={budget.max_steps}."
            )
        families = self.family_choices if "family" in self.search_space else budget.family_names()[:1]
        if budget.load_in_4bit and any(f != "lora" for f in families):
            raise ConfigError(
                "load_in_4bit (QLoRA) needs family_choices=['lora'] (or 'family' not searched)."
            )

    def steps_range(self, budget: AttackConfig) -> tuple[int, int]:
        low = self.min_steps if self.min_steps is not None else min(budget.eval_every, budget.max_steps)
        return low, budget.max_steps

    def suggest(self, trial, budget: AttackConfig) -> tuple[AttackConfig, dict[str, Any]]:
        """Draw one setting from ``trial``: the single-setting AttackConfig and the settings it runs."""
        searched = set(self.search_space)

        def pick(name: str, choices: list, default):
            return trial.suggest_categorical(name, choices) if name in searched else default

        lr = (
            trial.suggest_float("learning_rate", self.lr_min, self.lr_max, log=True)
            if "learning_rate" in searched
            else budget.learning_rates[0]
        )
        steps = (
            trial.suggest_int("max_steps", *self.steps_range(budget))
            if "max_steps" in searched
            else budget.max_steps
        )
        family = pick("family", self.family_choices, budget.family_names()[0])
        # The budget's first run of that family: every axis the search leaves alone keeps its first value.
        setting = replace(budget, family=family, families=[family]).grid()[0]
        setting["learning_rate"] = lr
        if family == "lora" and "lora_rank" in searched:
            setting["lora_rank"] = trial.suggest_categorical("lora_rank", self.lora_rank_choices)
        if "harmful_share" in setting and "harmful_share" in searched:
            setting["harmful_share"] = trial.suggest_categorical("harmful_share", self.harmful_share_choices)
        batch_size = pick("batch_size", self.batch_size_choices, budget.batch_size)
        setting["optimizer"] = pick("optimizer", self.optimizer_choices, setting["optimizer"])
        setting["lr_scheduler_type"] = pick(
            "lr_scheduler_type", self.scheduler_choices, setting["lr_scheduler_type"]
        )
        warmup_ratio = pick("warmup_ratio", self.warmup_ratio_choices, budget.warmup_ratio)
        config = replace(
            budget.for_setting(setting),
            max_steps=steps,
            eval_every=min(budget.eval_every, steps),
            warmup_ratio=warmup_ratio,
            batch_size=batch_size,
            stop_at_threshold=None,  # the objective is harm at the trial's budget: never stop early
            output_dir=None,
        )
        out = {**setting, "max_steps": steps, "warmup_ratio": warmup_ratio}
        if "batch_size" in searched:
            out["batch_size"] = batch_size
        return config, out

    def key(self) -> dict[str, Any]:
        """What names a study: the space, without the choices of axes it does not search that older
        versions lacked (searches stored before those axes existed keep their names)."""
        out = self.to_dict()
        for axis, choices in (("batch_size", "batch_size_choices"), ("harmful_share", "harmful_share_choices")):
            if axis not in self.search_space:
                out.pop(choices, None)
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: The pruners a search can use (SearchConfig.pruner).
PRUNERS = ("none", "median", "successive_halving")


@dataclass
class SearchConfig:
    r"""How the search runs: trials, seed, storage and the capability constraint.

    Parameters:
        search (`int`): number of trials (0: no search; the CLI then runs the plain grid).
        search_seed (`int`): seed of the sampler; the same seed, model and data give the same trials.
        search_storage (`str` or `None`): an Optuna storage URL; `None`: SQLite in `search_dir`.
        capability_tolerance (`float`): largest relative capability degradation of a feasible trial.
    """

    search: int = field(
        default=0, metadata={"help": "Search the attack's settings with N Optuna trials (0: run the grid)."}
    )
    search_seed: int = field(default=0, metadata={"help": "Seed of the search's sampler."})
    search_storage: str | None = field(
        default=None,
        metadata={
            "help": "Optuna storage URL of the search (e.g. sqlite:///search.db); None: SQLite in "
            "search_dir. "
            "A rerun with the same model, data and space resumes the trials stored there."
        },
    )
    search_dir: str = field(
        default="attack_search", metadata={"help": "Folder of the default SQLite storage of the search."}
    )
    capability_scorer: str = field(
        default="perplexity", metadata={"help": "Capability scorer g of the search's constraint."}
    )
    capability_tolerance: float = field(
        default=0.10,
        metadata={
            "help": "Largest relative capability degradation (on the reference set, vs the model before the "
            "attack) of a feasible trial; more and the trial cannot be the worst case (TamperBench: 0.10)."
        },
    )
    n_startup_trials: int = field(
        default=10, metadata={"help": "Random trials before the TPE sampler starts modelling."}
    )
    pruner: str = field(
        default="none",
        metadata={
            "help": "Optuna pruner of the trials: none, median (MedianPruner) or successive_halving "
            "(SuccessiveHalvingPruner). Each trial reports its harm at every evaluation; a pruned trial "
            "stops there, is recorded as pruned and never counts as the worst case."
        },
    )

    def __post_init__(self):
        if self.search < 0:
            raise ConfigError(f"search (the number of trials) must be >= 0, got {self.search}.")
        if not math.isfinite(self.capability_tolerance):
            raise ConfigError(f"capability_tolerance must be finite, got {self.capability_tolerance}.")
        if self.n_startup_trials < 0:
            raise ConfigError(f"n_startup_trials must be >= 0, got {self.n_startup_trials}.")
        if self.pruner not in PRUNERS:
            raise ConfigError(f"unknown pruner {self.pruner!r}; use one of {', '.join(PRUNERS)}.")

    def make_pruner(self, eval_every: int):
        """The Optuna pruner this config names (None: no pruning): a trial is judged from its first
        evaluation after step 0 on, against the trials before it at the same step."""
        import optuna

        if self.pruner == "median":
            return optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0)
        if self.pruner == "successive_halving":
            return optuna.pruners.SuccessiveHalvingPruner(min_resource=eval_every, reduction_factor=2)
        return None

    def storage_url(self) -> str | None:
        """The Optuna storage URL; None for ``search_storage=":memory:"`` (an in-memory study, not resumable)."""
        if self.search_storage == ":memory:":
            return None
        if self.search_storage:
            return self.search_storage
        folder = Path(self.search_dir).expanduser().resolve()
        folder.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{folder / 'attack_search.db'}"
