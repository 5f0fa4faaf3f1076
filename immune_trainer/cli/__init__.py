"""The ``immune-trainer`` command line: thin commands over the Python API.

Every command's options are the same dataclasses the Python API uses, parsed with trl's
``TrlParser`` (an ``HfArgumentParser``), so any option can also come from ``--config file.yaml``;
flags given on the command line override the file.

    immune-trainer attack    --model PATH --dataset SPEC [--eval_dataset SPEC] [--learning_rates ...]
    immune-trainer attack    --search N --reference SPEC ...   (Optuna search for the worst feasible attack)
    immune-trainer evaluate  --base_model PATH --model PATH --dataset SPEC ...
    immune-trainer immunize  --defense NAME --model PATH --dataset SPEC --output_dir DIR ...
    immune-trainer sweep     --defense NAME --model PATH --reference NAME=SPEC ... --n_trials N
    immune-trainer defenses | scorers | attacks      (list what is registered)

A dataset SPEC is a local file (.json, .jsonl, .csv, .parquet), a folder written by
``Dataset.save_to_disk``, ``embedded:NAME[/SPLIT]`` (the embedded offline data), or a Hub id with an
optional split (``PKU-Alignment/BeaverTails:30k_test``).

The commands live in :mod:`.commands` (attack, evaluate, immunize, assets, the listings), :mod:`.sweep`
and :mod:`.hub` (card, push, verify); :func:`main` dispatches to them. Nothing in the library imports
this package.
"""

from __future__ import annotations

import json
import logging
import sys

from ..errors import ImmuneTrainerError
from .commands import (
    AssetsArguments,
    AttackDataArguments,
    ImmunizeArguments,
    cmd_assets,
    cmd_attack,
    cmd_evaluate,
    cmd_immunize,
    cmd_list,
    curves_table,
)

__all__ = [
    "COMMANDS",
    "USAGE",
    "AssetsArguments",
    "AttackDataArguments",
    "ImmunizeArguments",
    "cmd_assets",
    "cmd_attack",
    "cmd_evaluate",
    "cmd_immunize",
    "cmd_list",
    "curves_table",
    "main",
]

logger = logging.getLogger("immune_trainer")

COMMANDS = (
    "attack",
    "evaluate",
    "immunize",
    "sweep",
    "demo",
    "assets",
    "card",
    "push",
    "verify",
    "compare",
    "leaderboard",
    "schema",
    "defenses",
    "scorers",
    "attacks",
)


USAGE = """usage: immune-trainer COMMAND [options] [--config file.yaml]

commands:
  attack     run the harmful fine-tuning attack grid on a model and write its curves
  evaluate   measure the four immunization conditions of a model against its base model
  immunize   train a defense (--defense NAME) on a model
  sweep      search a defense's hyperparameters (Optuna) for resistance under a stability constraint
  demo       the embedded end-to-end demo (offline model and data)
  assets     prepare and list the embedded offline assets
  card       write the model card of an immunized model folder
  push       push an immunized model folder and its card to the Hub
  verify     re-measure every claim of a model card (both models, the recorded data): PASSED, PARTIAL, FAILED
  compare    put reports side by side (defenses x attack families): table, CSV, heatmap
  leaderboard  every defense under one attack, ranked (embedded default; --config examples/leaderboard_gpu.yaml)
  schema     print the JSON Schema of the immunization report
  defenses | scorers | attacks   list what is registered

Run `immune-trainer COMMAND --help` for a command's options."""


def _quiet_progress_bars() -> None:
    """No per-file progress bars from datasets/transformers: the commands print their own progress."""
    try:
        import datasets
        from transformers.utils import logging as hf_logging

        datasets.disable_progress_bars()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - both are dependencies
        pass


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("transformers", "datasets", "httpx", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    _quiet_progress_bars()
    from ..runtime import keep_freed_memory

    keep_freed_memory()  # before the first model is loaded (see immune_trainer.runtime)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    try:
        if command == "attack":
            return cmd_attack(rest)
        if command == "evaluate":
            return cmd_evaluate(rest)
        if command == "immunize":
            return cmd_immunize(rest)
        if command == "sweep":
            from .sweep import cmd_sweep

            return cmd_sweep(rest)
        if command in ("defenses", "scorers", "attacks"):
            return cmd_list(command, rest)
        if command == "demo":
            from ..demo import main as demo_main

            return demo_main(rest)
        if command == "assets":
            return cmd_assets(rest)
        if command == "compare":
            from ..conditions.compare import cmd_compare

            return cmd_compare(rest)
        if command == "leaderboard":
            from .leaderboard import cmd_leaderboard

            return cmd_leaderboard(rest)
        if command == "schema":
            import argparse

            from ..conditions.report import SCHEMA_VERSION, report_json_schema

            argparse.ArgumentParser(
                prog="immune-trainer schema",
                description=f"Print the JSON Schema (draft 2020-12) of the immunization report, version "
                f"{SCHEMA_VERSION}; the same file ships as immune_trainer/data/report_schema.json.",
            ).parse_args(rest)
            print(json.dumps(report_json_schema(), indent=2, allow_nan=False))
            return 0
        if command in ("card", "push", "verify"):
            from . import hub as hub_commands

            return getattr(hub_commands, f"cmd_{command}")(rest)
        print(f"immune-trainer: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    except ImmuneTrainerError as err:
        print(f"immune-trainer {command}: error: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        # A path the user gave that cannot be read or written (the library's own errors are above).
        where = f" {err.filename}" if getattr(err, "filename", None) else ""
        print(
            f"immune-trainer {command}: error: cannot access{where}: {err.strerror or err}.", file=sys.stderr
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
