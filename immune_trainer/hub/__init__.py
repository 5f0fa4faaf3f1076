"""Hub tooling: model cards of registered defenses, publishing and ``verify``.

The card itself (condition badges, the attack-curve plot, the claims) is rendered by
:mod:`immune_trainer.model_card`; :mod:`.card` names the registered defense it describes, :mod:`.push`
publishes a model folder and :mod:`.verify` re-measures a card's claims (:mod:`.recheck` compares them)
(``from immune_trainer.hub.verify import verify``). The commands are :mod:`immune_trainer.cli.hub`.
Imported lazily so that ``import immune_trainer.hub`` stays cheap (matplotlib, torch and huggingface_hub
load only when used).
"""

from __future__ import annotations

from ..lazy import lazy_exports

_EXPORTS = {
    "Badge": "immune_trainer.model_card.badges",
    "condition_badges": "immune_trainer.model_card.badges",
    "write_badges": "immune_trainer.model_card.badges",
    "badge_svg": "immune_trainer.model_card.badges",
    "plot_attack_curves": "immune_trainer.model_card.plots",
    "build_model_card": "immune_trainer.hub.card",
    "write_model_card": "immune_trainer.hub.card",
    "weights_sha256": "immune_trainer.model_card.render",
    "not_tested": "immune_trainer.model_card.claims",
    "claims": "immune_trainer.model_card.claims",
    "push_model_folder": "immune_trainer.hub.push",
    "VerificationResult": "immune_trainer.hub.verify",
    "within_tolerance": "immune_trainer.hub.verify",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
