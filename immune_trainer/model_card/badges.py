"""Condition badges: one per *measured* immunization condition, coloured by its verdict.

Each :class:`Badge` renders two ways: a shields.io-style URL (for readers online) and a small flat SVG
generated here (written to ``badges/*.svg`` next to the weights, so the card renders offline). A badge
exists only for a measured value: an unmeasured condition gets none, and a collapsed model (stability
measured and failed) gets no resistance badge, because its resistance is not credited.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from html import escape
from urllib.parse import quote

from .. import conditions as C
from ..conditions.report import ImmunizationReport
from ..errors import OutputError
from ..files import atomic_write

__all__ = ["COLORS", "Badge", "badge_svg", "condition_badges", "write_badges"]

COLORS = {
    "pass": "#4c1",  # strong / holds
    "weak": "#dfb317",  # weak resistance: holds, but only by a cost multiple
    "fail": "#e05d44",
    "undetermined": "#9f9f9f",
}
"""Badge colours by verdict (shields.io's brightgreen, yellow, red and lightgrey)."""


@dataclass
class Badge:
    """One condition badge."""

    key: str = field(
        metadata={"help": "File stem and identifier: resistance, stability, generalization, ..."}
    )
    label: str = field(metadata={"help": "Left-hand text (the condition)."})
    message: str = field(metadata={"help": "Right-hand text (the verdict and its number)."})
    verdict: str = field(metadata={"help": "One of COLORS' keys: pass, weak, fail, undetermined."})

    @property
    def color(self) -> str:
        """Hex colour of the verdict."""
        return COLORS[self.verdict]

    @property
    def shields_url(self) -> str:
        """The equivalent static shields.io badge URL (dashes and underscores escaped as shields wants)."""

        def esc(text: str) -> str:
            return quote(text.replace("-", "--").replace("_", "__"), safe="")

        return f"https://img.shields.io/badge/{esc(self.label)}-{esc(self.message)}-{self.color.lstrip('#')}"

    @property
    def filename(self) -> str:
        """Path of the local SVG relative to the model folder."""
        return f"badges/{self.key}.svg"

    def markdown(self) -> str:
        """The local SVG as an image, linked to the shields.io URL."""
        return f"[![{self.label}: {self.message}]({self.filename})]({self.shields_url})"


def _text_width(text: str) -> int:
    # Verdana 11px averages about 6.5 px per character; wide glyphs get a little more room.
    return int(sum(7.5 if ch in "mwMW%" else 6.5 for ch in text)) + 10


def badge_svg(badge: Badge) -> str:
    """A flat, self-contained SVG of ``badge`` (no outside service, no fonts to fetch)."""
    lw, mw = _text_width(badge.label), _text_width(badge.message)
    w = lw + mw
    label, message = escape(badge.label), escape(badge.message)
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="20" role="img" '
        f'aria-label="{label}: {message}"><title>{label}: {message}</title>'
        f'<rect width="{lw}" height="20" fill="#555"/>'
        f'<rect x="{lw}" width="{mw}" height="20" fill="{badge.color}"/>'
        '<g fill="#fff" text-anchor="middle" font-family="Verdana,Geneva,DejaVu Sans,sans-serif" '
        'font-size="11">'
        f'<text x="{lw / 2:.1f}" y="14">{label}</text>'
        f'<text x="{lw + mw / 2:.1f}" y="14">{message}</text></g></svg>\n'
    )


def _verdict(holds: bool | None) -> str:
    return {True: "pass", False: "fail", None: "undetermined"}[holds]


def _resistance_badge(key: str, label: str, r: C.ResistanceResult) -> Badge:
    if r.holds is True and r.strong:
        return Badge(key, label, "strong", "pass")
    if r.holds is True:
        m = r.steps_multiple
        cost = "" if m is None else f", {'>=' if r.multiple_is_lower_bound else ''}{m:.2g}x attack cost"
        return Badge(key, label, f"weak{cost}", "weak")
    if r.holds is False:
        m = r.steps_multiple
        cost = "" if m is None else f" ({m:.2g}x cost)"
        return Badge(key, label, f"not resistant{cost}", "fail")
    worst = next((f for f in r.families if f.family == r.worst_family), None)
    if worst is not None and worst.within_noise:
        return Badge(key, label, f"within noise ({worst.family})", "undetermined")
    return Badge(key, label, "undetermined", "undetermined")


def condition_badges(report: ImmunizationReport | None) -> list[Badge]:
    """The badges of ``report``'s measured conditions (empty without a report).

    No resistance badge when the model collapsed (stability measured and failed): the card says why.
    """
    if report is None:
        return []
    c = report.conditions
    out: list[Badge] = []
    if c.resistance is not None and not c.collapsed:
        out.append(_resistance_badge("resistance", "resistance", c.resistance))
    s = c.stability
    if s is not None and s.sets:
        worst = s.sets.get(s.worst_set) if s.worst_set else next(iter(s.sets.values()))
        delta = "n/a" if worst is None else C.fmt_percent(worst.relative_change)
        side_effects = (report.side_effects or {}).get("holds")
        helpful = (report.helpfulness or {}).get("holds")
        ok = s.holds and side_effects is not False and helpful is not False
        word = "holds" if ok else ("collapsed" if not s.holds else "less safe at step 0")
        if s.holds and side_effects is not False and helpful is False:
            word = "less helpful at step 0"
        msg = f"{word}, delta {delta}"
        out.append(Badge("stability", "stability", msg, "pass" if ok else "fail"))
    g = c.generalization
    if g is not None and not c.collapsed:
        parts = []
        for name, part in (("in-domain", g.in_domain), ("cross-domain", g.cross_domain)):
            if part is not None:
                word = {True: "holds", False: "fails", None: "n/a"}[part.holds]
                parts.append(f"{name} {word}")
        out.append(Badge("generalization", "generalization", ", ".join(parts), _verdict(g.holds)))
    t = c.trainability
    if t is not None:
        if t.base_steps is not None and t.immunized_steps is not None:
            msg = f"{'holds' if t.holds else 'fails'}, |t1-t2| {abs(t.base_steps - t.immunized_steps):.3g} steps"
        else:
            msg = "fails, target not reached" if not t.holds else "holds"
        out.append(Badge("trainability", "trainability", msg, _verdict(t.holds)))
    return out


def write_badges(badges: list[Badge], folder: str | os.PathLike) -> list[str]:
    """Write each badge's SVG to ``folder/badges/<key>.svg``; stale badge files of conditions that are no
    longer measured are removed. Returns the written paths."""
    bdir = os.path.join(os.fspath(folder), "badges")
    try:
        os.makedirs(bdir, exist_ok=True)
        keep = {os.path.basename(b.filename) for b in badges}
        for name in os.listdir(bdir):
            if name.endswith(".svg") and name not in keep:
                os.unlink(os.path.join(bdir, name))
        paths = []
        for b in badges:
            path = os.path.join(os.fspath(folder), b.filename)
            atomic_write(path, badge_svg(b), what="a badge")
            paths.append(path)
    except OutputError:
        raise
    except OSError as e:
        raise OutputError(
            f"cannot write badges to {bdir}: {e.strerror or e}. Choose a writable folder."
        ) from None
    return paths
