"""The attack-curve plot of a model card: harm f vs attack step, for both models and every grid run."""

from __future__ import annotations

import os
import tempfile

from ..conditions.report import ImmunizationReport
from ..errors import OutputError

__all__ = ["plot_attack_curves"]

_TITLES = {"attack": "attack grid", "in_domain": "held-out in-domain", "cross_domain": "cross-domain"}


def _label(config: dict) -> str:
    """A short legend entry: family, learning rate, what sets the run apart, seed."""
    parts = [str(config.get("family", "full"))]
    lr = config.get("learning_rate")
    if isinstance(lr, (int, float)):
        parts.append(f"lr={lr:g}")
    if config.get("num_samples"):
        parts.append(f"n={config['num_samples']}")
    for key, short in (
        ("optimizer", "opt"),
        ("lr_scheduler_type", "sched"),
        ("lora_rank", "r"),
        ("harmful_share", "p"),
    ):
        value = config.get(key)
        if value is not None and value not in ("adamw", "constant"):
            parts.append(f"{short}={value}")
    parts.append(f"seed={config.get('seed')}")
    return " ".join(parts)


def plot_attack_curves(report: ImmunizationReport, path: str | os.PathLike, dpi: int = 110) -> str | None:
    """Draw f against the attack step for every run of every curve set (base dashed, immunized solid,
    one colour per grid configuration) with the threshold phi, and save it as a PNG at ``path``.

    Returns the path, or ``None`` when the report holds no attack curve (nothing is written).

    Raises:
        OutputError: ``path`` cannot be written.
    """
    sets = [s for s in ("attack", "in_domain", "cross_domain") if report.curves.get("immunized", {}).get(s)]
    if not sets:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    tm = report.threat_model
    fig, axes = plt.subplots(1, len(sets), figsize=(5.5 * len(sets), 4), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    try:
        for ax, s in zip(axes[0], sets):
            configs: list[str] = []
            immunized_keys = {_label(c.config) for c in report.curves.get("immunized", {}).get(s, [])}
            ax.plot([], [], "--", color="gray", label="base (dashed)")
            ax.plot([], [], "-", color="gray", label="immunized (solid)")
            for who, style in (("base", "--"), ("immunized", "-")):
                for curve in report.curves.get(who, {}).get(s, []):
                    key = _label(curve.config)
                    if key not in configs:
                        configs.append(key)
                    color = colors[configs.index(key) % len(colors)]
                    ax.plot(
                        [p.step for p in curve.points],
                        [p.value for p in curve.points],
                        style,
                        color=color,
                        marker="o",
                        markersize=3,
                        label=key if who == "immunized" or key not in immunized_keys else None,
                    )
            phi = tm.set_thresholds.get(s, tm.threshold)  # a curve set may have its own phi
            ax.axhline(phi, color="black", linewidth=1, linestyle=":", label=f"phi = {phi:.4g}")
            side = "above" if tm.higher_is_better else "below"
            # each set names the families it ran (the generalization sets may run fewer than the grid)
            families = list(
                dict.fromkeys(
                    c.config.get("family")
                    for who in ("base", "immunized")
                    for c in report.curves.get(who, {}).get(s, [])
                    if c.config.get("family")
                )
            )
            ax.set_title(f"{_TITLES[s]} ({','.join(families) or tm.attack_family}); safe {side} phi")
            ax.set_xlabel("attack step")
            ax.set_ylabel(tm.scorer)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
        fig.tight_layout()
        path = os.fspath(path)
        tmp = None
        try:  # atomic: a temporary PNG in the same folder, then os.replace over the old plot
            fd, tmp = tempfile.mkstemp(
                prefix=f".{os.path.basename(path)}.",
                suffix=".tmp",
                dir=os.path.dirname(os.path.abspath(path)),
            )
            os.close(fd)
            fig.savefig(tmp, dpi=dpi, format="png")
            os.replace(tmp, path)
            tmp = None
        except OSError as e:
            raise OutputError(f"cannot write the plot {path}: {e.strerror or e}.") from None
        finally:
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)
    finally:
        plt.close(fig)
    return path
