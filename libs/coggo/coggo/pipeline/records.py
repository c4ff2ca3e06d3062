"""Per-field last-writer-wins merging for records mirrored from a PIMS.

Each mirrored row keeps, in `versions`, the stamp of the event that last wrote
each logical field. A stamp orders events by `occurredAt` and, for equal
times, by a rank and then the event id (see `make_stamp`). So the newest event
wins every field it carries, whatever the order of delivery, and fields it
leaves out keep their values.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any


def make_stamp(occurred_at: datetime, event_id: str, rank: int = 0) -> str:
    """Build a version stamp that sorts by time, then by rank, then by event id.

    Equal times are common from a PIMS that stamps events to the second, so
    the rank lets a write that must win a tie (a cancellation) do so; among
    equal ranks the larger event id wins.
    """
    instant = occurred_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return f"{instant}|{rank}|{event_id}"


def merge_fields(
    row: Mapping[str, Any],
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
