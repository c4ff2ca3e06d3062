"""coggo-admin db: schema migrations."""

from __future__ import annotations

import argparse
from typing import Any

import asyncpg
from coggo import db
from coggo.settings import get_settings

from coggo_admin.common import AdminError, add_json_flag, connect, emit


async def db_upgrade(args: argparse.Namespace) -> int:
    settings = get_settings()
    if args.create:
        try:
            await db.ensure_database(settings.database_url)
        except (OSError, asyncpg.PostgresError) as exc:
            raise AdminError(f"cannot create the database: {exc}") from None
    connection = await connect()
    try:
        applied = await db.upgrade(connection)
        version = await db.current_version(connection)
    finally:
        await connection.close()
    emit(
        args,
        {"applied": applied, "version": version},
        [f"schema version {version} ({len(applied)} migrations applied)"],
    )
    return 0


async def db_status(args: argparse.Namespace) -> int:
    connection = await connect()
    try:
        version = await db.current_version(connection)
    finally:
        await connection.close()
    latest = db.latest_version()
    emit(
        args,
        {"version": version, "latest": latest, "current": version == latest},
        [f"schema version {version}, latest {latest}"],
    )
    return 0 if version == latest else 1


def register(groups: Any) -> None:
    db_parser = groups.add_parser("db", help="database schema")
    verbs = db_parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    upgrade = verbs.add_parser("upgrade", help="apply pending migrations")
    upgrade.add_argument(
        "--create",
        action="store_true",
        help="create the database first if it does not exist",
    )
    upgrade.set_defaults(run=db_upgrade)
    status = verbs.add_parser(
        "status", help="print the schema version; exit 1 when migrations are pending"
    )
    status.set_defaults(run=db_status)
    for verb in (upgrade, status):
        add_json_flag(verb)
