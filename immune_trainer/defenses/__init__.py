"""The defenses: one config/trainer pair per method, registered by name.

``get_defense("gradient_ascent")`` returns a :class:`DefenseSpec` with the config class, the trainer
class, the paper and an optional attack-time hook (for defenses such as Security Vectors that only
protect while something is applied during fine-tuning). The CLI's ``immunize --defense NAME`` and the
model card find defenses through this registry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError


@dataclass(frozen=True)
class DefenseSpec:
    """What the registry knows about a defense."""

    name: str
    config_class: type
    trainer_class: type
    description: str = ""
    attack_time_hook: Callable[[Any], Any] | None = field(default=None)

    @property
    def paper(self) -> dict:
        return getattr(self.trainer_class, "_paper", {})


DEFENSES: dict[str, DefenseSpec] = {}


def register_defense(
    name: str,
    config_class: type,
    trainer_class: type,
    description: str = "",
    attack_time_hook: Callable[[Any], Any] | None = None,
) -> DefenseSpec:
    """Register a defense under ``name`` (lower-case, unique)."""
    if name != name.lower() or not name.replace("_", "").isalnum():
        raise ConfigError(f"defense names are lower-case identifiers, got {name!r}.")
    if name in DEFENSES:
        raise ConfigError(f"a defense named {name!r} is already registered.")
    spec = DefenseSpec(name, config_class, trainer_class, description, attack_time_hook)
    DEFENSES[name] = spec
    return spec


def get_defense(name: str) -> DefenseSpec:
    """The registered defense called ``name``; unknown names raise ConfigError listing the known ones."""
    key = name.lower().replace("-", "_")
    if key not in DEFENSES:
        raise ConfigError(f"unknown defense {name!r}; known defenses: {', '.join(sorted(DEFENSES))}.")
    return DEFENSES[key]


def list_defenses() -> list[str]:
    return sorted(DEFENSES)


from .gradient_ascent import GradientAscentConfig, GradientAscentTrainer  # noqa: E402

register_defense(
    "gradient_ascent",
    GradientAscentConfig,
    GradientAscentTrainer,
    "Bounded gradient ascent on harmful responses with retain losses (RepNoise's ascent term alone).",
)

__all__ = [
    "DEFENSES",
    "DefenseSpec",
    "GradientAscentConfig",
    "GradientAscentTrainer",
    "get_defense",
    "list_defenses",
    "register_defense",
]
