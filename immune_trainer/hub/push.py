"""Publish an immunized model folder (weights, card, badges, plot, report) to the Hugging Face Hub.

Uses ``huggingface_hub.HfApi.create_repo`` and ``upload_folder``. The token comes from the argument, or
``huggingface_hub.get_token()`` (``HF_TOKEN``, then the saved login); it is never printed, logged or
written: any message that would contain it has it replaced by ``***``. A failed push leaves the folder
as it is and its error names the exact command to retry.
"""

from __future__ import annotations

import logging
import os
import shlex

from ..errors import OutputError, ReportError
from ..model_card import REPORT_FILE
from .card import write_model_card

__all__ = ["push_model_folder", "retry_command"]

logger = logging.getLogger(__name__)


def retry_command(folder: str, repo_id: str, private: bool = False) -> str:
    """The ``immune-trainer push`` command that retries this push (no token in it)."""
    cmd = f"immune-trainer push {shlex.quote(os.fspath(folder))} {shlex.quote(repo_id)}"
    return cmd + (" --private" if private else "")


def _scrub(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text


def push_model_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload immunized model with immune_trainer",
    write_card: bool = True,
    overwrite: bool = False,
) -> str:
    """Create (or reuse) the model repo ``repo_id`` and upload ``folder`` to it. Returns the repo URL.

    With ``write_card`` the card, badges and plot are (re)written from the folder's report first, so the
    published card matches the published weights (a README.md that immune_trainer did not write is
    replaced only with ``overwrite``; see :func:`~immune_trainer.hub.card.write_model_card`).

    Raises:
        ReportError: ``write_card`` and the folder has no immunization_report.json.
        OutputError: the folder is missing, or the Hub refused or could not be reached; the message gives
            the exact retry command and everything stays on disk.
    """
    from huggingface_hub import HfApi, get_token

    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise OutputError(f"model folder {folder} does not exist: nothing to push.")
    has_report = os.path.exists(os.path.join(folder, REPORT_FILE))
    if write_card:
        if not has_report:
            raise ReportError(
                f"no {REPORT_FILE} in {folder}: a card states measured results only, so none can be written. "
                "Measure the model first (`immune-trainer evaluate`), or push the folder as is with --no_card "
                "(write_card=False)."
            )
        write_model_card(folder, repo_id=repo_id, overwrite=overwrite)
    token = token or get_token()
    if not has_report:
        logger.warning("%s has no %s: the card makes no immunization claim.", folder, REPORT_FILE)
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            repo_type="model",
            commit_message=commit_message,
            ignore_patterns=[".*", "**/.*"],
        )
    except Exception as e:  # noqa: BLE001 - any Hub/network failure becomes one actionable error
        reason = _scrub(f"{type(e).__name__}: {e}", token).splitlines()[0][:300]
        login = "" if token else " No Hugging Face token was found: set HF_TOKEN or run `hf auth login`."
        raise OutputError(
            f"push of {folder} to {repo_id} failed ({reason}).{login} Everything is still on disk in {folder}; "
            f"retry with:\n  {retry_command(folder, repo_id, private)}"
        ) from None
    return str(url)
