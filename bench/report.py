"""Results and how they are shown: medians, ratios against targets, the Markdown table, docs/performance.md.

Owns: the result types every case fills in (``CaseResult``: metrics, subjects, the value of each run,
comparisons with their targets, notes), the Markdown the bench prints and writes, the raw JSON record,
and replacing the marked section of docs/performance.md. It must not run anything.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

DOCS_BEGIN = "<!-- bench:begin (written by `python bench/run.py --write-docs`; edit outside this section) -->"
DOCS_END = "<!-- bench:end -->"


@dataclass(frozen=True)
class Metric:
    key: str
    label: str  # with its unit, e.g. "Gbit/s"
    higher_is_better: bool = True
    digits: int = 1


@dataclass(frozen=True)
class Target:
    op: Literal[">=", "<="]
    value: float

    def met(self, got: float) -> bool:
        return got >= self.value if self.op == ">=" else got <= self.value

    def __str__(self) -> str:
        return f"{self.op} {self.value:g}"


@dataclass(frozen=True)
class Comparison:
    """``num`` against ``den`` on ``metric``: their ratio, or (``kind="diff"``) their difference."""

    label: str
    metric: str
    num: str
    den: str
    target: Target | None = None
    source: str = ""  # where the target comes from (issue number), for the reader
    kind: Literal["ratio", "diff"] = "ratio"


@dataclass
class CaseResult:
    key: str
    title: str
    metrics: list[Metric]
    #: Subject key -> label, in the order they are shown.
    subjects: dict[str, str] = field(default_factory=dict)
    #: Subject key -> one dict of metric values per repetition.
    runs: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    comparisons: list[Comparison] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0

    def add_run(self, subject: str, values: dict[str, float]) -> None:
        self.runs.setdefault(subject, []).append(values)

    def median(self, subject: str, metric: str) -> float | None:
        values = [run[metric] for run in self.runs.get(subject, []) if metric in run]
        return statistics.median(values) if values else None

    def compare(self, comparison: Comparison) -> float | None:
        num = self.median(comparison.num, comparison.metric)
        den = self.median(comparison.den, comparison.metric)
        if num is None or den is None:
            return None
        if comparison.kind == "diff":
            return num - den
        return num / den if den else None


def _fmt(value: float | None, digits: int) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def case_markdown(case: CaseResult) -> str:
    """The absolute figures of one case: a row per subject, median and the individual runs per metric."""
    out = [f"#### {case.title}", ""]
    if case.error:
        out += [f"**Not measured:** {case.error}", ""]
    if case.runs:
        head = ["subject"] + [f"{m.label} (median)" for m in case.metrics] + ["runs (first metric)"]
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "---|" * len(head))
        first = case.metrics[0]
        for key, label in case.subjects.items():
            if key not in case.runs:
                continue
            cells = [label] + [_fmt(case.median(key, m.key), m.digits) for m in case.metrics]
            cells.append(" / ".join(_fmt(r.get(first.key), first.digits) for r in case.runs[key]))
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    out += [f"- {note}" for note in case.notes]
    if case.notes:
        out.append("")
    return "\n".join(out)


def comparisons_markdown(cases: list[CaseResult]) -> str:
    out = [
        "| case | comparison | metric | value | target | |",
        "|---|---|---|---|---|---|",
    ]
    for case in cases:
        metrics = {m.key: m for m in case.metrics}
        for comp in case.comparisons:
            got = case.compare(comp)
            metric = metrics[comp.metric]
            if got is None:
                value = "-"
            elif comp.kind == "diff":
                value = f"{got:+.{max(metric.digits, 2)}f}"
            else:
                value = f"{got:.2f}x"
            verdict = ""
            if comp.target is not None and got is not None:
                verdict = "met" if comp.target.met(got) else "**missed**"
            target = "" if comp.target is None else str(comp.target) + ("x" if comp.kind == "ratio" else "")
            if comp.source and target:
                target += f" ({comp.source})"
            out.append(f"| {case.key} | {comp.label} | {metric.label} | {value} | {target} | {verdict} |")
    return "\n".join(out) + "\n"


def machine_markdown(machine: dict[str, Any]) -> str:
    lines = ["| | |", "|---|---|"]
    for key, value in machine.items():
        lines.append(f"| {key} | {value} |")
    return "\n".join(lines) + "\n"


def full_markdown(machine: dict[str, Any], cases: list[CaseResult], command: str) -> str:
    parts = [
        f"Command: `{command}`",
        "",
        machine_markdown(machine),
        "### Ratios and targets",
        "",
        comparisons_markdown(cases),
        "### Absolute figures",
        "",
    ]
    parts += [case_markdown(case) for case in cases]
    return "\n".join(parts)


def write_json(path: Path, machine: dict[str, Any], cases: list[CaseResult], command: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"command": command, "machine": machine, "cases": [asdict(case) for case in cases]}
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def write_docs(path: Path, section: str) -> None:
    """Put ``section`` between the bench markers of ``path`` (appended with its markers if absent)."""
    block = f"{DOCS_BEGIN}\n{section.rstrip()}\n{DOCS_END}"
    text = path.read_text() if path.exists() else "# pacslb performance\n"
    begin, end = text.find(DOCS_BEGIN), text.find(DOCS_END)
    if begin != -1 and end > begin:
        text = text[:begin] + block + text[end + len(DOCS_END) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
