"""Hub tooling: model cards with condition badges, the attack-curve plot, publishing and ``verify``.

``verify`` lives in :mod:`immune_trainer.hub.verify` (``from immune_trainer.hub.verify import verify``).
Imported lazily so that ``import immune_trainer.hub`` stays cheap (matplotlib, torch and
huggingface_hub load only when used).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Badge": "badges",
    "condition_badges": "badges",
    "write_badges": "badges",
    "badge_svg": "badges",
    "plot_attack_curves": "plots",
    "build_model_card": "card",
    "write_model_card": "card",
    "create_trainer_model_card": "card",
    "weights_sha256": "card",
    "not_tested": "card",
    "claims": "card",
    "push_model_folder": "push",
    "VerificationResult": "verify",
    "within_tolerance": "verify",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'immune_trainer.hub' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
