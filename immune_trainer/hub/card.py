"""Model cards of registered defenses: :mod:`immune_trainer.model_card` with the defense's title and paper
looked up in the defense registry (:mod:`immune_trainer.defenses`).

:func:`build_model_card` renders the card of a report and :func:`write_model_card` writes a model folder's
README.md, badges and plot; ``immune-trainer card`` and ``immune-trainer push`` use them. The defense is
the one named by the caller or recorded in the report; the card also cites the paper of the immunization
conditions. A trainer writes its own card (``ImmunizationTrainer.create_model_card``).
"""

from __future__ import annotations

import os
from typing import Any

from ..attacks import ATTACKS
from ..conditions.report import ImmunizationReport
from ..model_card import folder_report, generate_model_card, save_model_card

__all__ = ["build_model_card", "write_model_card"]


def _defense_info(name: str | None) -> tuple[str | None, str | None, dict]:
    """(name, title, paper) of a registered defense; unknown names keep just the name."""
    if not name:
        return None, None, {}
    try:
        from ..defenses import get_defense

        spec = get_defense(name)
        title = getattr(spec.trainer_class, "_name", None) or spec.name
        return spec.name, title, dict(spec.paper or {})
    except Exception:  # noqa: BLE001 - an unregistered defense still gets a card
        return name, name, {}


def _immunization_paper() -> dict:
    try:
        from ..trainer import IMMUNIZATION_PAPER

        return dict(IMMUNIZATION_PAPER)
    except Exception:  # noqa: BLE001
        return {"title": "Immunization against harmful fine-tuning attacks", "id": "2402.16382"}


def _identity(report: ImmunizationReport | None, defense: str | None) -> dict[str, Any]:
    """The keyword arguments of :func:`~immune_trainer.model_card.generate_model_card` that name the defense
    (``defense``, or the one the report records) and the papers."""
    if report is not None:
        defense = defense or (report.defense or {}).get("name")
    name, title, paper = _defense_info(defense)
    return {
        "defense": name,
        "defense_title": title,
        "defense_paper": paper,
        "conditions_paper": _immunization_paper(),
        "registered_attacks": sorted(ATTACKS),
    }


def build_model_card(
    report: ImmunizationReport,
    *,
    folder: str | os.PathLike | None = None,
    model_name: str | None = None,
    defense: str | None = None,
    base_model: str | None = None,
    tags: list[str] | None = None,
    dataset_name: str | None = None,
    repo_id: str | None = None,
):
    """Render the card of an immunized model (nothing is written).

    The card names no absolute path of the machine that wrote it (paths inside ``folder`` become relative
    to it, others ``…/<name>``) and links only to the papers, the badges and the project URL of the
    package metadata (:func:`~immune_trainer.model_card.project_url`).

    Args:
        report: the evaluation of the model: a card states measured results only, so it is required.
        folder: the model folder, for the weight hashes and to link the plot when it exists there.
        model_name: heading and ``model_name`` of the model-index (default: the report's immunized model).
        defense: defense name when the report does not record one (its title and paper come from the
            registry).
        base_model: base model id (default: the report's).
        tags: extra YAML tags (``immune-trainer`` and the defense's tag are always added).
        dataset_name: dataset named in the eval results (default: the recorded attack data).
        repo_id: Hub repo id, named in the ``verify`` command (default: ``verify .`` in the folder).

    Returns:
        A ``huggingface_hub.ModelCard``.

    Raises:
        ReportError: no report, or the weights in ``folder`` are not the ones it measured.
    """
    return generate_model_card(
        report,
        folder=folder,
        model_name=model_name,
        base_model=base_model,
        tags=tags,
        dataset_name=dataset_name,
        repo_id=repo_id,
        **_identity(report, defense),
    )


def write_model_card(
    folder: str | os.PathLike,
    report: ImmunizationReport | None = None,
    *,
    plot: bool = True,
    overwrite: bool = False,
    **kwargs: Any,
):
    """Write ``README.md``, ``badges/*.svg`` and ``attack_curves.png`` into the model ``folder``.

    ``report`` defaults to ``folder/immunization_report.json`` (and is saved there when given and
    missing, so the folder is self-contained). Without a report no card is written: a card states
    measured results only. A ``README.md`` already in the folder is replaced only when this library
    wrote it (:func:`~immune_trainer.model_card.written_by_immune_trainer`) or ``overwrite`` is true. Other
    keyword arguments go to :func:`build_model_card`. Returns the ``ModelCard``.

    Raises:
        ReportError: there is no report, it cannot be read, or it measured other weights.
        OutputError: the folder is missing or cannot be written, or its README.md was not written by
            immune_trainer and ``overwrite`` is false.
    """
    report = folder_report(folder, report)
    identity = _identity(report, kwargs.pop("defense", None))
    return save_model_card(folder, report, plot=plot, overwrite=overwrite, **kwargs, **identity)
