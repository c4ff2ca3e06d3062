"""coggo-admin: operate the Coggo PIMS integration."""

from __future__ import annotations

import argparse
import asyncio
import sys

import asyncpg
from coggo.logs import configure_logging

from coggo_admin import (
    commands,
    db,
    integrations,
    keys,
    records,
    signing_secrets,
    species,
)
from coggo_admin.common import AdminError

# Each module adds its group of verbs to the parser.
VERB_GROUPS = (
    db,
    integrations,
    keys,
    signing_secrets,
    species,
    commands,
    records,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="coggo-admin",
        description=(
            "Operate the Coggo PIMS integration: database migrations, clinic "
            "integrations, keys, species and commands. Reads COGGO_DATABASE_URL, "
            "COGGO_AMQP_URL and COGGO_SECRET_KEY."
        ),
    )
    parser.add_argument(
        "--json", action="store_true", help="print results as one JSON object"
    )
    groups = parser.add_subparsers(dest="group", required=True, metavar="GROUP")
    for module in VERB_GROUPS:
        module.register(groups)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    configure_logging("coggo-admin", level="warning")
    try:
        code = asyncio.run(args.run(args))
    except AdminError as exc:
        print(f"coggo-admin: error: {exc}", file=sys.stderr)
        code = 2
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        print(
            f"coggo-admin: error: the database call failed ({type(exc).__name__}: "
            f"{exc}); check that PostgreSQL is reachable and try again",
            file=sys.stderr,
        )
        code = 1
    sys.exit(code)


if __name__ == "__main__":
    main()
