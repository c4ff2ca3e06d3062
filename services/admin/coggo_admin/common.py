"""Shared plumbing of the coggo-admin verbs: output, errors and the database."""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import asyncpg
from coggo.credentials import MissingSecretKey, SecretBox
from coggo.settings import get_settings


class AdminError(Exception):
    """An operator error, printed as one line without a traceback."""


def emit(args: argparse.Namespace, data: dict[str, Any], lines: list[str]) -> None:
    """Print a result as JSON with --json, else as the given lines."""
    if args.json:
        print(json.dumps(data, default=str, ensure_ascii=False))
    else:
        print("\n".join(lines))


async def connect() -> asyncpg.Connection:
    settings = get_settings()
    try:
        return await asyncpg.connect(settings.database_url)
    except (OSError, asyncpg.PostgresError) as exc:
        raise AdminError(
            f"cannot connect to PostgreSQL ({type(exc).__name__}): check "
            "COGGO_DATABASE_URL and that the server is running, then run "
            "`coggo-admin db upgrade`"
        ) from None


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    """Accept --json after the verb too, without overriding one given before it."""
    parser.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS,
        help="print the result as one JSON object",
    )


@contextlib.asynccontextmanager
async def database() -> AsyncIterator[asyncpg.Connection]:
    """Connect for one verb, turning a missing schema into an operator error."""
    connection = await connect()
    try:
        yield connection
    except (asyncpg.UndefinedTableError, asyncpg.UndefinedColumnError) as exc:
        raise AdminError(
            f"the database schema is missing or out of date ({exc}): run "
            "`coggo-admin db upgrade`"
        ) from None
    finally:
        await connection.close()


def secret_box() -> SecretBox:
    """Return the box for secrets at rest, or fail with what to set."""
    try:
        return SecretBox.from_settings(get_settings())
    except MissingSecretKey as exc:
        raise AdminError(str(exc)) from None


def add_clinic_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--clinic-id",
        required=True,
        help="Coggo's id of the clinic (see `integration list`)",
    )


async def find_integration(
    connection: asyncpg.Connection, clinic_id: str
) -> asyncpg.Record:
    """Return the clinic's integration row, or fail naming the unknown clinic."""
    row = await connection.fetchrow(
        "SELECT * FROM integrations WHERE clinic_id = $1", clinic_id
    )
    if row is None:
        raise AdminError(
            f"no integration for clinic {clinic_id!r}: check the id with "
            "`coggo-admin integration list`, or create one with "
            "`coggo-admin integration create`"
        )
    return row


def timestamp(value: datetime | None) -> str | None:
    """Format a stored time as ISO 8601, keeping None."""
    return None if value is None else value.isoformat()
