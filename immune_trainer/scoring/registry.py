"""The scorer registry: the :class:`Scorer` base class, :class:`ScoreResult` and ``register_scorer``.

A scorer measures one number about a model on a dataset: how harmful its answers are (``kind =
"harmfulness"``, the f of Rosati et al. 2024) or how capable it still is (``kind = "capability"``,
the g). Every scorer declares, from the *defender's* point of view, whether a higher value is better
(``higher_is_better``), the closed interval its values live in (``range``), a ``name`` and a short
``description``. Thresholds phi are checked against that range with
:meth:`Scorer.validate_threshold`.

Scorers are dataclasses: their fields are their options (each with help text, so the CLI and configs
can expose them), and the registry maps names to classes, as peft and lighteval do::

    >>> from immune_trainer.scoring import get_scorer, list_scorers
    >>> "harmful_loss" in list_scorers()
    True
    >>> scorer = get_scorer("harmful_loss", batch_size=4)
    >>> scorer.higher_is_better, scorer.range
    (True, (0.0, inf))

Every scorer puts the model in eval mode (and restores each module's previous mode afterwards), runs
under ``torch.inference_mode`` in batches on the model's device, never changes a weight, and is
deterministic (greedy decoding, no dropout).
"""

from __future__ import annotations

import abc
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..errors import ConfigError

KINDS = ("harmfulness", "capability")


@dataclass
class ScoreResult:
    """The outcome of one scorer on one model and dataset.

    Attributes:
        value: the score.
        name: the scorer's registered name.
        higher_is_better: direction from the defender's point of view.
        details: everything else worth keeping (token counts, n, sample generations, the set's name).
    """

    value: float
    name: str
    higher_is_better: bool
    details: dict = field(default_factory=dict)


SCORERS: dict[str, type[Scorer]] = {}
"""Registered scorer classes by name. Extend it with :func:`register_scorer`."""


def register_scorer(name: str) -> Callable[[type[Scorer]], type[Scorer]]:
    """Class decorator that registers a :class:`Scorer` subclass under ``name``.

    The class must declare ``kind``, ``higher_is_better``, ``range`` and ``description``; its
    ``name`` is set to ``name``. A name already taken raises :class:`ConfigError`.
    """

    def decorator(cls: type[Scorer]) -> type[Scorer]:
        if not (isinstance(cls, type) and issubclass(cls, Scorer)):
            raise ConfigError(f"register_scorer({name!r}) decorates {cls!r}, which is not a Scorer subclass.")
        if name in SCORERS:
            raise ConfigError(
                f"A scorer named {name!r} is already registered ({SCORERS[name].__qualname__}); "
                "pick another name."
            )
        if getattr(cls, "kind", None) not in KINDS:
            raise ConfigError(f"Scorer {name!r} must declare kind as one of {KINDS}.")
        if not isinstance(getattr(cls, "higher_is_better", None), bool):
            raise ConfigError(f"Scorer {name!r} must declare higher_is_better: bool.")
        lo, hi = getattr(cls, "range", (None, None))
        if lo is None or hi is None or not lo < hi:
            raise ConfigError(f"Scorer {name!r} must declare range = (low, high) with low < high.")
        cls.name = name
        SCORERS[name] = cls
        return cls

    return decorator


def list_scorers(kind: str | None = None) -> list[str]:
    """Sorted names of the registered scorers, optionally only those of ``kind``."""
    if kind is not None and kind not in KINDS:
        raise ConfigError(f"Unknown scorer kind {kind!r}; choose one of {KINDS}.")
    return sorted(n for n, c in SCORERS.items() if kind is None or c.kind == kind)


def get_scorer(name: str, **kwargs: Any) -> Scorer:
    """Build the scorer registered as ``name`` with its options ``kwargs``.

    Raises:
        ConfigError: unknown name (the message lists the registered ones) or unknown option.
    """
    if name not in SCORERS:
        raise ConfigError(f"Unknown scorer {name!r}. Registered scorers: {', '.join(list_scorers())}.")
    cls = SCORERS[name]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ConfigError(
            f"Scorer {name!r} has no option(s) {unknown}. Its options are: {', '.join(sorted(known))}."
        )
    return cls(**kwargs)


@dataclass
class Scorer(abc.ABC):
    """Base class of all scorers (harmfulness f or capability g).

    Subclasses are dataclasses whose fields are their options, declare the class attributes below,
    implement :meth:`score`, and register with :func:`register_scorer`.
    """

    name: ClassVar[str] = ""
    kind: ClassVar[str] = ""
    higher_is_better: ClassVar[bool]
    range: ClassVar[tuple[float, float]]
    description: ClassVar[str] = ""

    batch_size: int = field(default=8, metadata={"help": "Examples per forward pass or generate call."})
    limit: int | None = field(
        default=None, metadata={"help": "Score only the first `limit` examples (None: all of them)."}
    )

    def __post_init__(self) -> None:
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"{self.name}: batch_size must be a positive integer, got {self.batch_size!r}.")
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 1):
            raise ConfigError(f"{self.name}: limit must be a positive integer or None, got {self.limit!r}.")

    @abc.abstractmethod
    def score(self, model, tokenizer, dataset) -> ScoreResult:
        """Score ``model`` (with its ``tokenizer``) on ``dataset`` and return a :class:`ScoreResult`."""

    def prepare(self, tokenizer, dataset):
        """Return ``dataset`` in the form :meth:`score` consumes fastest, for repeated scoring.

        The attack harness scores the same held-out set many times; loss-based scorers tokenize it
        once here. The default returns the dataset unchanged.
        """
        return dataset

    def key_extras(self) -> dict[str, Any]:
        """What a score depends on besides the model, the data and the scalar options (which
        :func:`immune_trainer.attacks.scorer_key` reads off the fields): the run cache keys measurements
        by both. The default is nothing; ``lm_eval`` adds its task names and lm-eval's version."""
        return {}

    def validate_threshold(self, phi: float) -> float:
        """Return ``phi`` as a float if it is a finite number inside this scorer's ``range``.

        Raises:
            ConfigError: phi is not a number, not finite, or outside the range.
        """
        try:
            value = float(phi)
        except (TypeError, ValueError):
            raise ConfigError(f"Threshold phi for {self.name!r} must be a number, got {phi!r}.") from None
        lo, hi = self.range
        if not math.isfinite(value) or not lo <= value <= hi:
            raise ConfigError(
                f"Threshold phi={phi!r} is outside the range of scorer {self.name!r}, [{lo}, {hi}]; "
                f"choose a finite value in that range ({'higher' if self.higher_is_better else 'lower'} "
                "is better)."
            )
        return value

    def _result(self, value: float, details: dict) -> ScoreResult:
        return ScoreResult(
            value=float(value), name=self.name, higher_is_better=self.higher_is_better, details=details
        )
