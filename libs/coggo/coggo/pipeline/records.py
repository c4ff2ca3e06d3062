"""Row locking and per-field last-writer-wins merging for mirrored PIMS records.

Each mirrored row keeps, in `versions`, the stamp of the event that last wrote
each logical field. A stamp orders events by `occurredAt` and, for equal
times, by the event id, so the newest event wins every field it carries no
matter in which order events are delivered; absent fields are left alone.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import asyncpg

TABLES = frozenset({"clients", "patients", "appointments"})


def make_stamp(occurred_at: datetime, event_id: str) -> str:
    """Build a version stamp that sorts by time, then by event id (the tie rule)."""
    instant = occurred_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return f"{instant}|{event_id}"


async def lock_record(
    connection: asyncpg.Connection, table: str, clinic_id: str, external_id: str
) -> tuple[asyncpg.Record, bool]:
    """Lock the row of one external record, creating an empty one if it is new.

    Returns the row and whether it was created. One statement does both: the
    conflict branch rewrites a column with its own value, which takes the row
    lock, so concurrent creators meet on the unique key and one row exists.
    """
    assert table in TABLES
    row = await connection.fetchrow(
        f"""
        INSERT INTO {table} AS t (id, clinic_id, external_id) VALUES ($1, $2, $3)
        ON CONFLICT (clinic_id, external_id) DO UPDATE SET clinic_id = t.clinic_id
        RETURNING *, (xmax = 0) AS inserted
        """,
        uuid.uuid4(),
        clinic_id,
        external_id,
    )
    assert row is not None
    return row, bool(row["inserted"])


def merge_fields(
    row: asyncpg.Record | dict[str, Any],
    updates: dict[str, dict[str, Any]],
    stamp: str,
) -> tuple[dict[str, Any], dict[str, str]]:
    """Apply the logical fields of one event that are newer than the stored ones.

    `updates` maps a logical field (stamped as one) to the columns it sets.
    Returns the columns whose values change and the new versions map.
    """
    versions: dict[str, str] = dict(row["versions"] or {})
    changed: dict[str, Any] = {}
    for field, columns in updates.items():
        if stamp <= versions.get(field, ""):
            continue
        versions[field] = stamp
        for column, value in columns.items():
            if row[column] != value:
                changed[column] = value
    return changed, versions


async def write_record(
    connection: asyncpg.Connection,
    table: str,
    row_id: uuid.UUID,
    changed: dict[str, Any],
    versions: dict[str, str],
) -> None:
    assert table in TABLES
    columns = list(changed)
    assignments = ", ".join(
        f"{column} = ${index + 3}" for index, column in enumerate(columns)
    )
    if assignments:
        assignments += ", "
    await connection.execute(
        f"UPDATE {table} SET {assignments}versions = $2, updated_at = now() WHERE id = $1",
        row_id,
        versions,
        *(changed[column] for column in columns),
    )
