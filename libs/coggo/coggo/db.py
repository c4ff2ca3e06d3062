"""PostgreSQL pools and the migration runner."""

from __future__ import annotations

import importlib.resources
import re
from typing import Any

import asyncpg
import orjson
import structlog

log = structlog.get_logger(__name__)

# Any fixed number works; all processes of the product take this lock to migrate.
_MIGRATION_LOCK = 0x436F67676F


async def _init_connection(connection: asyncpg.Connection) -> None:
    for kind in ("json", "jsonb"):
        await connection.set_type_codec(
            kind,
            encoder=lambda value: orjson.dumps(value).decode(),
            decoder=orjson.loads,
            schema="pg_catalog",
        )


async def create_pool(url: str, *, size: int = 10, **kwargs: Any) -> asyncpg.Pool:
    """Open a pool whose connections encode and decode JSON with orjson."""
    pool = await asyncpg.create_pool(
        url,
        min_size=1,
        max_size=size,
        init=_init_connection,
        command_timeout=30,
        **kwargs,
    )
    assert pool is not None
    return pool


def migration_files() -> list[tuple[int, str, str]]:
    """Return (version, name, sql) of every bundled migration, in order."""
    found = []
    folder = importlib.resources.files("coggo") / "migrations"
    for entry in folder.iterdir():
        match = re.fullmatch(r"(\d{4})_(\w+)\.sql", entry.name)
        if match:
            found.append((int(match[1]), match[2], entry.read_text("utf-8")))
    return sorted(found)


async def upgrade(connection: asyncpg.Connection) -> list[int]:
    """Apply pending migrations under an advisory lock; return the versions applied."""
    applied: list[int] = []
    await connection.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
    try:
        await connection.execute(
            """
            CREATE TABLE IF NOT EXISTS schema_version (
                version integer PRIMARY KEY,
                name text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now()
            )
            """
        )
        done = {
            row["version"]
            for row in await connection.fetch("SELECT version FROM schema_version")
        }
        for version, name, sql in migration_files():
            if version in done:
                continue
            async with connection.transaction():
                await connection.execute(sql)
                await connection.execute(
                    "INSERT INTO schema_version (version, name) VALUES ($1, $2)",
                    version,
                    name,
                )
            log.info("db.migration_applied", version=version, name=name)
            applied.append(version)
    finally:
        await connection.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK)
    return applied


async def current_version(connection: asyncpg.Connection) -> int | None:
    exists = await connection.fetchval(
        "SELECT to_regclass('schema_version') IS NOT NULL"
    )
    if not exists:
        return None
    value = await connection.fetchval("SELECT max(version) FROM schema_version")
    return int(value) if value is not None else None


def latest_version() -> int:
    return migration_files()[-1][0]


async def ensure_database(url: str) -> bool:
    """Create the database named in `url` when it does not exist; return True if created."""
    dsn_parts = re.match(r"^(?P<base>.*/)(?P<name>[^/?]+)(?P<query>\?.*)?$", url)
    if dsn_parts is None:
        raise ValueError("COGGO_DATABASE_URL must end with a database name")
    name = dsn_parts["name"]
    admin_url = f"{dsn_parts['base']}postgres{dsn_parts['query'] or ''}"
    connection = await asyncpg.connect(admin_url)
    try:
        exists = await connection.fetchval(
            "SELECT 1 FROM pg_database WHERE datname = $1", name
        )
        if exists:
            return False
        quoted = '"' + name.replace('"', '""') + '"'
        await connection.execute(f"CREATE DATABASE {quoted}")
        return True
    finally:
        await connection.close()
