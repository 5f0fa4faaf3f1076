"""``immune-trainer leaderboard``: every defense on the embedded default under one attack, ranked; on any
model and data with ``--model`` (or a ``--config`` file naming ``model``, e.g.
``examples/leaderboard_gpu.yaml``); or a ranking of reports that exist already (``--reports``)."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["LeaderboardArguments", "cmd_leaderboard"]


@dataclass
class LeaderboardArguments:
    """What ``immune-trainer leaderboard`` ranks: the demo's options set the budgets of a new run on the
    embedded default; with ``--model`` (or ``model:`` in ``--config``) the options are those of
    :class:`~immune_trainer.leaderboard_specs.LeaderboardData` and ``immune-trainer evaluate``'s attack and
    measurement (``immune-trainer leaderboard --model M --help`` lists them)."""

    reports: list[str] | None = field(
        default=None,
        metadata={
            "help": "Rank these reports (files or model folders, one per defense) instead of running the "
            "defenses; the tables go to --leaderboard_dir."
        },
    )
    leaderboard_dir: str | None = field(
        default=None,
        metadata={
            "help": "Where leaderboard.md, .csv and .png go (default: the demo's --output_dir; with --model, the "
            "defenses' folders too, default 'leaderboard')."
        },
    )


def _names_a_model(argv: list[str]) -> bool:
    """True when ``--model`` is given on the command line or as ``model:`` in the ``--config`` YAML."""
    from pathlib import Path

    import yaml

    if any(a == "--model" or a.startswith("--model=") for a in argv):
        return True
    if "--config" in argv and argv.index("--config") + 1 < len(argv):
        try:
            loaded = yaml.safe_load(Path(argv[argv.index("--config") + 1]).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError, UnicodeDecodeError):
            return False  # parse_cli_args names the problem with the file
        return isinstance(loaded, dict) and "model" in loaded
    return False


def _cmd_from_specs(argv: list[str]) -> int:
    """The leaderboard of ``--model`` on the data SPECs, budgets and attack of the options (or --config)."""
    from ..attacks import AttackConfig, CalibrationConfig
    from ..data.loading import ModelArguments, parse_cli_args
    from ..evaluation import EvaluationConfig
    from ..leaderboard_specs import LeaderboardData, leaderboard_from_specs

    model_args, args, data, attack_cfg, evaluation, calibration = parse_cli_args(
        [ModelArguments, LeaderboardArguments, LeaderboardData, AttackConfig, EvaluationConfig, CalibrationConfig],
        argv,
        prog="immune-trainer leaderboard",
    )
    if args.reports:
        from ..errors import ConfigError

        raise ConfigError("--reports ranks existing reports: give it without --model (and without a model: key).")
    out = args.leaderboard_dir or "leaderboard"
    board = leaderboard_from_specs(
        model_args, data, attack_cfg, evaluation, calibration=calibration, output_dir=out,
        progress=lambda m: print(m, flush=True),
    )
    paths = board.save(out)
    print(board.to_markdown())
    print("\n" + "\n".join(f"{k}: {v}" for k, v in paths.items()))
    return 0


def cmd_leaderboard(argv: list[str]) -> int:
    from ..conditions.leaderboard import leaderboard_from_reports
    from ..data.loading import parse_cli_args
    from ..defenses import list_defenses
    from ..demo import DemoConfig

    argv = list(argv)
    if _names_a_model(argv):
        return _cmd_from_specs(argv)
    if "--output_dir" not in argv and not any(a.startswith("--output_dir=") for a in argv):
        argv += ["--output_dir", "leaderboard"]
    if "--defense" not in argv and not any(a.startswith("--defense=") for a in argv):
        argv += ["--defense", *list_defenses()]
    args, demo = parse_cli_args([LeaderboardArguments, DemoConfig], argv, prog="immune-trainer leaderboard")
    out = args.leaderboard_dir or demo.output_dir
    if args.reports:
        reports = list(args.reports)
    else:
        from ..demo import run_demo

        if len(demo.defense) < 2:
            from ..errors import ConfigError

            raise ConfigError("a leaderboard ranks at least two defenses: name them with --defense A B ...")
        summary = run_demo(demo)
        reports = summary["reports"]
    board = leaderboard_from_reports(reports)
    paths = board.save(out)
    print(board.to_markdown())
    print("\n" + "\n".join(f"{k}: {v}" for k, v in paths.items()))
    return 0
