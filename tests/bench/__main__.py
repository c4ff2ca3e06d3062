"""Run the benchmarks: `make bench`, or `python -m tests.bench [NAME ...]`.

Each `bench_<name>.py` module here has `async def run() -> Section`. The
benchmarks start the services themselves against the local PostgreSQL and
RabbitMQ, print their figures as they go and record them in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import pkgutil
import sys

import tests.bench
from tests.bench.report import Section, record


def available() -> list[str]:
    return sorted(
        module.name.removeprefix("bench_")
        for module in pkgutil.iter_modules(tests.bench.__path__)
        if module.name.startswith("bench_")
    )


async def run(names: list[str]) -> list[Section]:
    sections = []
    for name in names:
        module = importlib.import_module(f"tests.bench.bench_{name}")
        print(f"== {name}", flush=True)
        sections.append(await module.run())
    return sections


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="make bench",
        description="Run the benchmarks and record their figures in docs/benchmarks.md.",
    )
    parser.add_argument(
        "names",
        nargs="*",
        help=f"benchmarks to run (default: all of {', '.join(available())})",
    )
    parser.add_argument(
        "--no-record",
        action="store_true",
        help="print the figures without writing docs/benchmarks.md",
    )
    args = parser.parse_args()
    names = args.names or available()
    unknown = sorted(set(names) - set(available()))
    if unknown:
        parser.error(
            f"unknown benchmark {unknown[0]!r}; choose from {', '.join(available())}"
        )
    sections = asyncio.run(run(names))
    if not args.no_record:
        record(sections)
    sys.exit(0)


if __name__ == "__main__":
    main()
