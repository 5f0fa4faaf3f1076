"""Model cards of immunized models, rendered from an immunization report.

:mod:`.render` builds the card (:func:`generate_model_card`) and writes a model folder's README.md, badges and
plot (:func:`save_model_card`); :mod:`.claims` says what the card claims and what was not tested;
:mod:`.badges` draws the condition badges and :mod:`.plots` the attack curves.

Below the trainers: the caller names the defense and its paper. ``ImmunizationTrainer.create_model_card``
passes the trainer's own; :mod:`immune_trainer.hub.card` (``immune-trainer card``, ``push``) looks up a
registered defense.
"""

from __future__ import annotations

from .badges import COLORS, Badge, badge_svg, condition_badges, write_badges
from .claims import claims, eval_results, not_tested
from .plots import plot_attack_curves
from .render import (
    GENERATED_MARKER,
    PLOT_FILE,
    REPORT_FILE,
    WEIGHT_PATTERNS,
    card_hashes,
    folder_report,
    generate_model_card,
    project_url,
    save_model_card,
    template_path,
    unfilled_hub_template,
    weights_sha256,
    written_by_immune_trainer,
)

__all__ = [
    "COLORS",
    "GENERATED_MARKER",
    "PLOT_FILE",
    "REPORT_FILE",
    "WEIGHT_PATTERNS",
    "Badge",
    "badge_svg",
    "card_hashes",
    "claims",
    "condition_badges",
    "eval_results",
    "folder_report",
    "generate_model_card",
    "not_tested",
    "plot_attack_curves",
    "project_url",
    "save_model_card",
    "template_path",
    "weights_sha256",
    "write_badges",
    "unfilled_hub_template",
    "written_by_immune_trainer",
]
