"""Figures a benchmark prints and records in docs/benchmarks.md."""

from __future__ import annotations

import os
import platform
import subprocess
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "benchmarks.md"
BEGIN = "<!-- figures of the latest `make bench` run: begin -->"
END = "<!-- figures of the latest `make bench` run: end -->"


@dataclass
class Figure:
    name: str
    value: float | int | str
    unit: str = ""
    target: str = ""
    met: bool | None = None

    def row(self) -> str:
        value = (
            f"{self.value:,.1f}" if isinstance(self.value, float) else str(self.value)
        )
        verdict = {True: "met", False: "NOT met", None: ""}[self.met]
        return f"| {self.name} | {value} {self.unit} | {self.target} | {verdict} |"


@dataclass
class Section:
    title: str
    command: str
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(
        self,
        name: str,
        value: float | int | str,
        unit: str = "",
        target: str = "",
        met: bool | None = None,
    ) -> Figure:
        figure = Figure(name, value, unit, target, met)
        self.figures.append(figure)
        print(
            f"  {figure.name}: {figure.value if not isinstance(figure.value, float) else round(figure.value, 2)} {unit} {('(target ' + target + ', ' + ('met' if met else 'NOT met') + ')') if target and met is not None else ''}",
            flush=True,
        )
        return figure

    def markdown(self) -> str:
        lines = [
            f"### {self.title}",
            "",
            f"Command: `{self.command}`",
            "",
            "| figure | value | target | |",
            "| --- | --- | --- | --- |",
        ]
        lines += [figure.row() for figure in self.figures]
        if self.notes:
            lines.append("")
            lines += [f"- {note}" for note in self.notes]
        return "\n".join(lines)


def hardware() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = ""
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f", {kib / 1024 / 1024:.0f} GiB memory"
    except (OSError, ValueError, IndexError):
        pass
    versions = []
    for command in (["psql", "--version"], ["rabbitmqctl", "version"]):
        try:
            output = subprocess.run(
                command, capture_output=True, text=True, timeout=20, check=False
            )
            versions.append(output.stdout.strip().splitlines()[-1])
        except (OSError, subprocess.SubprocessError, IndexError):
            continue
    return (
        f"{os.cpu_count()} cores ({cpu}){memory}; Python {platform.python_version()}; "
        f"PostgreSQL and RabbitMQ local ({'; RabbitMQ '.join(versions)})"
    )


def record(sections: list[Section]) -> None:
    """Replace the latest-run block of docs/benchmarks.md with these sections."""
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    block = "\n\n".join(
        [
            BEGIN,
            f"Run of {stamp} on {hardware()}.",
            *(section.markdown() for section in sections),
            END,
        ]
    )
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        text = head + block + tail
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(text)
    print(f"recorded in {DOC}")
