"""Hyperparameter sweep of a defense: an Optuna study for the most attack-resistant stable setting.

:class:`DefenseSweep` (:mod:`.study`) runs the study; :class:`SweepConfig`, :func:`search_space` and
:func:`suggest` (:mod:`.config`) say what it searches; :class:`TrialOutcome` and :class:`SweepResult`
(:mod:`.results`) what it measured and wrote. ``immune-trainer sweep`` is :mod:`immune_trainer.cli.sweep`.

Imported lazily, so that the command line can read :mod:`.config` without importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

_EXPORTS = {
    "FALLBACK_SPACES": "config",
    "SPACE_TYPES": "config",
    "SweepConfig": "config",
    "search_space": "config",
    "suggest": "config",
    "SweepResult": "results",
    "TrialOutcome": "results",
    "trial_setting": "results",
    "OPTUNA_PAPER": "study",
    "DefenseSweep": "study",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)


if TYPE_CHECKING:  # pragma: no cover
    from .config import FALLBACK_SPACES, SPACE_TYPES, SweepConfig, search_space, suggest  # noqa: F401
    from .results import SweepResult, TrialOutcome, trial_setting  # noqa: F401
    from .study import OPTUNA_PAPER, DefenseSweep  # noqa: F401
