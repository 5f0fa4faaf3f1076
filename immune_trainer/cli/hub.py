"""``immune-trainer card | push | verify``: each ``cmd_*`` takes the argument list and returns an exit code.

Positional arguments (the folder, the repo id) come first; options are parsed with trl's ``TrlParser``
(so ``--config file.yaml`` works too).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from ..errors import ConfigError

__all__ = ["CardArguments", "PushArguments", "VerifyArguments", "cmd_card", "cmd_push", "cmd_verify"]


@dataclass
class CardArguments:
    """Options of ``immune-trainer card DIR``."""

    model_name: str | None = field(
        default=None, metadata={"help": "Card title / model-index name (default: the report's)."}
    )
    defense: str | None = field(
        default=None, metadata={"help": "Defense name if the report does not record one."}
    )
    tags: list[str] = field(default_factory=list, metadata={"help": "Extra YAML tags."})
    no_plot: bool = field(default=False, metadata={"help": "Do not draw attack_curves.png."})
    overwrite: bool = field(
        default=False,
        metadata={"help": "Replace a README.md that immune_trainer did not write (never done otherwise)."},
    )


@dataclass
class PushArguments:
    """Options of ``immune-trainer push DIR REPO``."""

    private: bool = field(default=False, metadata={"help": "Create the repository as private."})
    commit_message: str = field(
        default="Upload immunized model with immune_trainer",
        metadata={"help": "Commit message of the upload."},
    )
    no_card: bool = field(
        default=False, metadata={"help": "Upload the folder as is, without rewriting the card."}
    )
    overwrite: bool = field(
        default=False,
        metadata={"help": "Replace a README.md that immune_trainer did not write (never done otherwise)."},
    )


@dataclass
class VerifyArguments:
    """Options of ``immune-trainer verify DIR_OR_REPO``: re-measure every claim of the card.

    verify checks the weights' sha256 and that the card states its report's numbers, reloads the immunized
    weights and the base model, rebuilds the recorded data (report.datasets) and settings, and re-runs the
    evaluation on both models without a cache: the attack grid (phi read off the base model again when the
    report did), generalization, stability, side effects and trainability. It then re-judges every verdict
    and compares each number: harm values within TOLERANCE x |base f at step 0 - phi| of each harmful set;
    crossing steps and cost multiples within the range the re-measured curves give when moved by that much;
    capability, benign and side-effect numbers within TOLERANCE x their condition's tolerance; verdicts
    exactly. Exit status: 0 PASSED (every claim re-measured and matched), 3 PARTIAL (none mismatched, some
    could not be re-checked: their data or base model is not recorded, or --sample), 1 FAILED (a mismatch,
    named).
    """

    sample: int | None = field(
        default=None,
        metadata={
            "help": "Re-run only N settings of the main attack grid, on both models, and compare their curves "
            "(a spot check: claims over the whole grid are not re-checked, so the result is PARTIAL at best)."
        },
    )
    sample_seed: int = field(default=0, metadata={"help": "Seed choosing the sampled settings."})
    tolerance: float = field(
        default=0.25,
        metadata={
            "help": "Fraction of each number's margin a re-measured value may differ by: of |base f at step 0 "
            "- phi| for harm values (crossings and multiples: what curves moved by that much give), of the "
            "condition's tolerance for capability, benign and side-effect numbers. Verdicts must match exactly."
        },
    )
    base_model: str | None = field(
        default=None,
        metadata={"help": "The base model (folder, Hub id or 'embedded') if the one the report names cannot be loaded."},
    )
    dataset: str | None = field(
        default=None, metadata={"help": "Replace the recorded attack training data (SPEC)."}
    )
    eval_dataset: str | None = field(
        default=None, metadata={"help": "Replace the recorded attack eval data (SPEC)."}
    )


_POSITIONALS = {
    "DIR": "The model folder (saved with save_pretrained, holding immunization_report.json).",
    "REPO": "The Hub repository id to push to (org/name).",
    "DIR_OR_REPO": "A model folder with README.md and immunization_report.json, or a Hub repo id.",
}


def _print_help(cls, command: str, names: list[str]) -> None:
    """Print the command's help (positional arguments and the dataclass options) and exit 0, as argparse does."""
    from trl import TrlParser

    parser = TrlParser([cls], prog=f"immune-trainer {command}", description=cls.__doc__)
    for name in names:
        parser.add_argument(name, help=_POSITIONALS[name])
    parser.parse_args(["--help"])


def _split(argv: list[str], names: list[str], command: str, cls) -> tuple[list[str], list[str]]:
    if any(a in ("-h", "--help") for a in argv):
        _print_help(cls, command, names)
    pos = []
    rest = list(argv)
    while rest and len(pos) < len(names) and not rest[0].startswith("-"):
        pos.append(rest.pop(0))
    if len(pos) < len(names):
        raise ConfigError(
            f"usage: immune-trainer {command} {' '.join(names)} [options]; missing {names[len(pos)]}."
        )
    return pos, rest


def _parse(cls, rest: list[str], command: str, names: list[str]):
    from ..data.loading import parse_cli_args

    (args,) = parse_cli_args([cls], rest, prog=f"immune-trainer {command} {' '.join(names)}")
    return args


def cmd_card(argv: list[str]) -> int:
    """``immune-trainer card DIR``: write DIR/README.md, DIR/badges/*.svg and DIR/attack_curves.png."""
    from ..hub.card import write_model_card

    (folder,), rest = _split(argv, ["DIR"], "card", CardArguments)
    args = _parse(CardArguments, rest, "card", ["DIR"])
    card = write_model_card(
        folder,
        plot=not args.no_plot,
        model_name=args.model_name,
        defense=args.defense,
        tags=args.tags,
        overwrite=args.overwrite,
    )
    n = len(card.data.eval_results or [])
    print(f"wrote {folder}/README.md ({n} measured claims)")
    return 0


def cmd_push(argv: list[str]) -> int:
    """``immune-trainer push DIR REPO``: create the repo and upload the folder (card rewritten first)."""
    from ..hub.push import push_model_folder

    (folder, repo), rest = _split(argv, ["DIR", "REPO"], "push", PushArguments)
    args = _parse(PushArguments, rest, "push", ["DIR", "REPO"])
    url = push_model_folder(
        folder,
        repo,
        private=args.private,
        commit_message=args.commit_message,
        write_card=not args.no_card,
        overwrite=args.overwrite,
    )
    print(f"pushed {folder} to {url}")
    return 0


def cmd_verify(argv: list[str]) -> int:
    """``immune-trainer verify DIR_OR_REPO``: exit 0 PASSED (every claim re-measured and matched), 3 PARTIAL
    (no mismatch, some claims not re-checked), 1 FAILED (a mismatch)."""
    from ..hub.verify import verify

    (source,), rest = _split(argv, ["DIR_OR_REPO"], "verify", VerifyArguments)
    args = _parse(VerifyArguments, rest, "verify", ["DIR_OR_REPO"])
    from ..data.loading import validate_sources

    # the source is checked by verify(); a base model that cannot be loaded leaves its claims unchecked
    validate_sources(models=[args.base_model], datasets=[args.dataset, args.eval_dataset])
    result = verify(
        source,
        sample=args.sample,
        sample_seed=args.sample_seed,
        tolerance=args.tolerance,
        dataset=args.dataset,
        eval_dataset=args.eval_dataset,
        base_model=args.base_model,
        progress=lambda m: print(m, flush=True),
    )
    print(result.table())
    sys.stdout.flush()
    return result.exit_code
