"""Several attack grids judged as one (:class:`AttackSuite`), and :func:`as_suite`, which makes one of
whatever an evaluation is given (a config, an attack, a list of either, a suite)."""

from __future__ import annotations

import json

from ..errors import ConfigError
from .config import AttackConfig, scorer_key
from .harness import AttackResult, HarmfulFineTuningAttack


class AttackSuite:
    """Several attack grids judged as one: the worst case is over every grid of the suite.

    Use it when the settings of one family do not fit another (LoRA needs a higher learning rate than
    full fine-tuning; a mixed-data attack has its own harmful share). Every member measures harm with the
    same scorer, so their curves compare.

    Example::

        suite = AttackSuite([AttackConfig(families=["full"], learning_rates=[8e-5], seeds=[0, 1]),
                             AttackConfig(families=["lora"], learning_rates=[3e-4], lr_scheduler_types=["cosine"])])
        curves = suite.run(model, tokenizer, harmful_train, harmful_eval).curves

    Raises:
        ConfigError: an empty suite, or members whose scorers differ.
    """

    def __init__(self, attacks):
        members = [
            a if isinstance(a, HarmfulFineTuningAttack) else HarmfulFineTuningAttack(a) for a in attacks
        ]
        if not members:
            raise ConfigError("an attack suite needs at least one attack configuration.")
        keys = {json.dumps(scorer_key(m.scorer), sort_keys=True) for m in members}
        if len(keys) > 1:
            raise ConfigError(
                "every attack of a suite must measure harm with the same scorer and settings (same scorer, "
                f"max_length and eval_batch_size); got {sorted(keys)}."
            )
        scorer = members[0].scorer
        for m in members:
            m.scorer = scorer
        self.attacks = members

    @property
    def scorer(self):
        return self.attacks[0].scorer

    @property
    def config(self) -> AttackConfig:
        """The first member's config (the suite's reference for budgets and batch sizes)."""
        return self.attacks[0].config

    @property
    def configs(self) -> list[AttackConfig]:
        return [a.config for a in self.attacks]

    def family_names(self) -> list[str]:
        return list(dict.fromkeys(f for c in self.configs for f in c.family_names()))

    @property
    def show_progress(self) -> bool:
        return self.attacks[0].show_progress

    @show_progress.setter
    def show_progress(self, value: bool) -> None:
        for a in self.attacks:
            a.show_progress = value

    def run(self, model, tokenizer, harmful_train, harmful_eval, **kwargs) -> AttackResult:
        """Run every member (see :meth:`HarmfulFineTuningAttack.run`) and return all their curves."""
        curves = []
        for attack in self.attacks:
            curves += attack.run(model, tokenizer, harmful_train, harmful_eval, **kwargs).curves
        return AttackResult(curves=curves, config=self.config)

    def members(self, families) -> AttackSuite | None:
        """The sub-suite whose grids only hold ``families`` (None when no member qualifies)."""
        chosen = [a for a in self.attacks if set(a.config.family_names()) <= set(families)]
        return AttackSuite(chosen) if chosen else None

    def others(self, families) -> AttackSuite | None:
        """The sub-suite of the members :meth:`members` leaves out."""
        chosen = [a for a in self.attacks if not set(a.config.family_names()) <= set(families)]
        return AttackSuite(chosen) if chosen else None

    def replace(self, **changes) -> AttackSuite:
        """A suite of the same members with ``changes`` applied to each config."""
        from dataclasses import replace

        suite = AttackSuite(
            [HarmfulFineTuningAttack(replace(a.config, **changes), scorer=a.scorer) for a in self.attacks]
        )
        suite.show_progress = self.show_progress
        return suite


def as_suite(attack) -> AttackSuite:
    """An :class:`AttackSuite` from an attack, a config, a list of either, or a suite (None: the default grid)."""
    if isinstance(attack, AttackSuite):
        return attack
    if attack is None or isinstance(attack, (AttackConfig, HarmfulFineTuningAttack)):
        return AttackSuite([attack if attack is not None else AttackConfig()])
    if isinstance(attack, (list, tuple)):
        return AttackSuite(list(attack))
    raise ConfigError(
        f"attack must be an AttackConfig, a HarmfulFineTuningAttack, a list of them or an AttackSuite, got "
        f"{type(attack).__name__}."
    )
