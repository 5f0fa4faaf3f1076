"""``immune-trainer leaderboard``: every defense on the embedded default under one attack, ranked; or a
ranking of reports that exist already (``--reports``)."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["LeaderboardArguments", "cmd_leaderboard"]


@dataclass
class LeaderboardArguments:
    """What ``immune-trainer leaderboard`` ranks (the demo's options set the budgets of a new run)."""

    reports: list[str] | None = field(
        default=None,
        metadata={
            "help": "Rank these reports (files or model folders, one per defense) instead of running the "
            "defenses; the tables go to --leaderboard_dir."
        },
    )
    leaderboard_dir: str | None = field(
        default=None,
        metadata={"help": "Where leaderboard.md, .csv and .png go (default: the demo's --output_dir)."},
    )


def cmd_leaderboard(argv: list[str]) -> int:
    from ..conditions.leaderboard import leaderboard_from_reports
    from ..data.loading import parse_cli_args
    from ..defenses import list_defenses
    from ..demo import DemoConfig

    argv = list(argv)
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
