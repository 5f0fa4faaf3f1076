"""Check a demo report: it loads with the current schema and every condition carries a number.

    python scripts/check_demo_report.py demo_output/immunization_report.json

Used by CI after `immune-trainer demo --quick`. Exits non-zero naming what is missing.
"""

from __future__ import annotations

import math
import sys

from immune_trainer.conditions.report import SCHEMA_VERSION, ImmunizationReport


def problems(report: ImmunizationReport) -> list[str]:
    c = report.conditions
    out = []

    def number(value, what):
        if value is None or not isinstance(value, (int, float)) or math.isnan(value):
            out.append(f"{what} has no number ({value!r})")

    if c.resistance is None:
        out.append("resistance was not measured")
    else:
        number(c.resistance.worst_value, "resistance.worst_value")
    if c.stability is None:
        out.append("stability was not measured")
    else:
        for name, s in c.stability.sets.items():
            number(s.base, f"stability.{name}.base")
            number(s.immunized, f"stability.{name}.immunized")
    for part in ("in_domain", "cross_domain"):
        result = None if c.generalization is None else getattr(c.generalization, part)
        if result is None:
            out.append(f"{part.replace('_', '-')} generalization was not measured")
        else:
            number(result.worst_value, f"generalization.{part}.worst_value")
    if report.side_effects is None:
        out.append("side effects (stability's second half) were not measured")
    if report.datasets is None or "attack_train" not in report.datasets:
        out.append("the report does not record the data specs verify needs")
    else:
        # verify rebuilds every set from the record (immune_trainer.evaluation.recorded): PASSED needs all
        from immune_trainer.evaluation.recorded import condition_datasets

        missing = condition_datasets(report.datasets, strict=False).missing
        out += [f"verify cannot rebuild the {part} data: {why}" for part, why in missing.items()]
    if report.extra.get("base_model_source") != "embedded":
        out.append("the report does not name the embedded base model (extra['base_model_source']) for verify")
    families = set(report.threat_model.attack_family.split(","))
    if len(families) < 2:
        out.append(f"the attack grid holds one family only ({report.threat_model.attack_family})")
    if c.trainability is None:
        out.append("trainability was not measured")
    else:
        number(c.trainability.base_final, "trainability.base_final")
        number(c.trainability.immunized_final, "trainability.immunized_final")
    number(report.threat_model.threshold, "threat_model.threshold")
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    path = argv[0] if argv else "demo_output/immunization_report.json"
    report = ImmunizationReport.load(path)
    found = problems(report)
    if report.schema_version != SCHEMA_VERSION:
        found.append(f"schema version {report.schema_version} != {SCHEMA_VERSION}")
    if found:
        print(f"{path}: " + "; ".join(found), file=sys.stderr)
        return 1
    print(
        f"{path}: schema {report.schema_version}, every condition measured; verdict: {report.conditions.summary}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
