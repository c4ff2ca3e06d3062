"""The pushes table: taking in commands, claiming due attempts, recording outcomes.

Every state change that announces something writes its domain event to the
outbox in the same transaction. Changes that decide between versions of one
note (taking in a command, marking a version sent) first take a transaction
advisory lock on (clinic, note), so an old version can never be queued after
a newer one was marked sent.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import asyncpg
from coggo.outbox import enqueue_events
from coggo.schemas.bus import DomainEvent, SoapPush
from coggo.soap.envelope import envelope_id

# The version column is a PostgreSQL integer.
MAX_VERSION = 2**31 - 1
# Headers the broker sets itself when it dead-letters; they are not copied.
_BROKER_HEADERS = ("x-death", "x-first-death-", "x-last-death-")


class Intake(StrEnum):
    """What taking in one soap.push command did."""

    QUEUED = "queued"
    DUPLICATE = "duplicate"
    SUPERSEDED = "superseded"
    # A failed push whose command arrived again, e.g. replayed from the dead-letter queue.
    REQUEUED = "requeued"


@dataclass(frozen=True)
class ClaimedPush:
    """A push whose next attempt this process has claimed."""

    id: uuid.UUID
    clinic_id: str
    note_id: str
    version: int
    # Attempts including the one just claimed.
    attempts: int
    # Attempts before this claim. When it already equals the maximum, the last
    # attempt was interrupted or its dead-lettering failed, so no new attempt
    # is made and the push is failed with what is known.
    previous_attempts: int
    command: bytes
    command_id: str
    command_headers: dict[str, Any]
    last_status: int | None
    last_error: str | None


def storable_headers(headers: Mapping[str, Any] | None) -> dict[str, Any]:
    """Keep the AMQP headers of a command that can go back on its dead-letter copy."""
    kept: dict[str, Any] = {}
    for name, value in (headers or {}).items():
        if name.startswith(_BROKER_HEADERS):
            continue
        if isinstance(value, bytes):
            kept[name] = value.decode("utf-8", "replace")
        elif value is None or isinstance(value, str | int | float | bool):
            kept[name] = value
        else:
            kept[name] = str(value)
    return kept


def push_event(
    event_type: str,
    *,
    push_id: uuid.UUID,
    clinic_id: str,
    note_id: str,
    version: int,
    attempts: int,
    last_status: int | None,
    **extra: Any,
) -> DomainEvent:
    """Build a push.* domain event: ids, counts and the outcome, never note content."""
    return DomainEvent(
        type=event_type,
        clinic_id=clinic_id,
        data={
            "clinicId": clinic_id,
            "noteId": note_id,
            "version": version,
            "envelopeId": str(push_id),
            "attempts": attempts,
            "lastStatus": last_status,
            **extra,
        },
    )


async def _lock_note(
    connection: asyncpg.Connection, clinic_id: str, note_id: str
) -> None:
    await connection.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended($1 || chr(31) || $2, 0))",
        clinic_id,
        note_id,
    )


_CLAIM_SQL = """
WITH busy AS (
    SELECT clinic_id, in_flight
    FROM unnest($2::text[], $3::integer[]) AS b (clinic_id, in_flight)
), due AS (
    SELECT p.id, p.clinic_id, p.next_attempt_at
    FROM pushes p
    WHERE p.state = 'pending'
      AND p.next_attempt_at <= now()
      AND (p.leased_until IS NULL OR p.leased_until <= now())
      AND NOT EXISTS (
          SELECT 1 FROM busy b WHERE b.clinic_id = p.clinic_id AND b.in_flight >= $4
      )
      -- One attempt per note at a time, and an older version waits while a
      -- newer one is pending: if the newer one is sent, the older is superseded.
      AND NOT EXISTS (
          SELECT 1 FROM pushes o
          WHERE o.clinic_id = p.clinic_id AND o.note_id = p.note_id
            AND o.version <> p.version AND o.state = 'pending'
            AND (o.version > p.version OR o.leased_until > now())
      )
    ORDER BY p.next_attempt_at
    LIMIT $5
), ranked AS (
    SELECT d.id, d.next_attempt_at,
           row_number() OVER (PARTITION BY d.clinic_id ORDER BY d.next_attempt_at, d.id)
               + coalesce(b.in_flight, 0) AS slot
    FROM due d LEFT JOIN busy b ON b.clinic_id = d.clinic_id
), picked AS (
    -- The conditions on p are repeated here because FOR UPDATE rechecks only
    -- this level: a row another dispatcher claimed meanwhile is left out.
    SELECT p.id, p.attempts AS previous_attempts
    FROM pushes p JOIN ranked r ON r.id = p.id
    WHERE r.slot <= $4
      AND p.state = 'pending'
      AND p.next_attempt_at <= now()
      AND (p.leased_until IS NULL OR p.leased_until <= now())
    ORDER BY r.next_attempt_at
    LIMIT $1
    FOR UPDATE OF p SKIP LOCKED
)
UPDATE pushes p SET
    attempts = least(p.attempts + 1, $6),
    leased_until = now() + make_interval(secs => $7),
    updated_at = now()
FROM picked
WHERE p.id = picked.id
RETURNING p.id, p.clinic_id, p.note_id, p.version, p.attempts,
          picked.previous_attempts, p.command, p.command_id, p.command_headers,
          p.last_status, p.last_error
"""

_NEXT_DUE_SQL = """
SELECT extract(epoch FROM min(greatest(p.next_attempt_at, p.leased_until)) - now())
FROM pushes p
WHERE p.state = 'pending'
  AND p.clinic_id <> ALL($1::text[])
  AND NOT EXISTS (
      SELECT 1 FROM pushes o
      WHERE o.clinic_id = p.clinic_id AND o.note_id = p.note_id
        AND o.version <> p.version AND o.state = 'pending'
        AND (o.version > p.version OR o.leased_until > now())
  )
"""


class PushStore:
    """Reads and writes the pushes table and the outbox of push events."""

    def __init__(self, pool: asyncpg.Pool, events_exchange: str) -> None:
        self.pool = pool
        self.events_exchange = events_exchange

    async def take_in(
        self, command: SoapPush, body: bytes, headers: Mapping[str, Any] | None
    ) -> Intake:
        """Record a soap.push command, deciding by (clinic, note, version) what it is."""
        data = command.data
        push_id = envelope_id(command.clinic_id, data.note_id, data.version)
        stored_headers = storable_headers(headers)

        async with self.pool.acquire() as connection, connection.transaction():
            await _lock_note(connection, command.clinic_id, data.note_id)
            versions = await connection.fetch(
                "SELECT version, state FROM pushes WHERE clinic_id = $1 AND note_id = $2",
                command.clinic_id,
                data.note_id,
            )
            same = [row for row in versions if row["version"] == data.version]
            if same:
                if same[0]["state"] != "failed":
                    return Intake.DUPLICATE
                await self._requeue(connection, push_id, command, body, stored_headers)
                return Intake.REQUEUED

            newer_sent = [
                row["version"]
                for row in versions
                if row["state"] == "sent" and row["version"] > data.version
            ]
            if newer_sent:
                await self._insert_superseded(
                    connection, push_id, command, stored_headers, max(newer_sent)
                )
                return Intake.SUPERSEDED

            await connection.execute(
                """
                INSERT INTO pushes (id, clinic_id, note_id, version, command,
                    command_id, command_headers)
                VALUES ($1, $2, $3, $4, $5, $6, $7)
                """,
                push_id,
                command.clinic_id,
                data.note_id,
                data.version,
                body,
                command.id,
                stored_headers,
            )
        return Intake.QUEUED

    async def _requeue(
        self,
        connection: asyncpg.Connection,
        push_id: uuid.UUID,
        command: SoapPush,
        body: bytes,
        headers: dict[str, Any],
    ) -> None:
        await connection.execute(
            """
            UPDATE pushes SET state = 'pending', attempts = 0, next_attempt_at = now(),
                leased_until = NULL, last_status = NULL, last_error = NULL,
                command = $2, command_id = $3, command_headers = $4,
                finished_at = NULL, updated_at = now()
            WHERE id = $1
            """,
            push_id,
            body,
            command.id,
            headers,
        )

    async def _insert_superseded(
        self,
        connection: asyncpg.Connection,
        push_id: uuid.UUID,
        command: SoapPush,
        headers: dict[str, Any],
        newer_version: int,
    ) -> None:
        data = command.data
        await connection.execute(
            """
            INSERT INTO pushes (id, clinic_id, note_id, version, state, command_id,
                command_headers, superseded_by, finished_at)
            VALUES ($1, $2, $3, $4, 'superseded', $5, $6, $7, now())
            """,
            push_id,
            command.clinic_id,
            data.note_id,
            data.version,
            command.id,
            headers,
            newer_version,
        )
        event = push_event(
            "push.superseded",
            push_id=push_id,
            clinic_id=command.clinic_id,
            note_id=data.note_id,
            version=data.version,
            attempts=0,
            last_status=None,
            supersededByVersion=newer_version,
        )
        await enqueue_events(connection, self.events_exchange, [event])

    async def claim(
        self,
        limit: int,
        *,
        busy: Mapping[str, int],
        clinic_limit: int,
        max_attempts: int,
        lease_seconds: float,
    ) -> list[ClaimedPush]:
        """Claim up to `limit` due attempts, at most `clinic_limit` per clinic in flight.

        `busy` holds the attempts this process already runs per clinic. Each
        claimed push counts one more attempt and is leased for `lease_seconds`.
        """
        clinics = list(busy)
        rows = await self.pool.fetch(
            _CLAIM_SQL,
            limit,
            clinics,
            [busy[clinic] for clinic in clinics],
            clinic_limit,
            # Candidates looked at: enough to fill the batch from several clinics.
            limit * 4 + clinic_limit,
            max_attempts,
            lease_seconds,
        )
        return [
            ClaimedPush(
                id=row["id"],
                clinic_id=row["clinic_id"],
                note_id=row["note_id"],
                version=row["version"],
                attempts=row["attempts"],
                previous_attempts=row["previous_attempts"],
                command=row["command"],
                command_id=row["command_id"],
                command_headers=row["command_headers"],
                last_status=row["last_status"],
                last_error=row["last_error"],
            )
            for row in rows
        ]

    async def seconds_until_due(self, excluded_clinics: list[str]) -> float | None:
        """Return when the next attempt outside `excluded_clinics` is due, or None."""
        value = await self.pool.fetchval(_NEXT_DUE_SQL, excluded_clinics)
        return float(value) if value is not None else None

    async def schedule_retry(
        self,
        push: ClaimedPush,
        delay: float,
        status: int | None,
        error: str | None,
    ) -> bool:
        """Release the lease and set the next attempt `delay` seconds from now.

        Returns False when the push is no longer this claim's to update: it was
        finished, or another dispatcher claimed it after the lease ran out.
        """
        updated = await self.pool.fetchval(
            """
            UPDATE pushes SET leased_until = NULL,
                next_attempt_at = now() + make_interval(secs => $2),
                last_status = $3, last_error = $4, updated_at = now()
            WHERE id = $1 AND state = 'pending' AND attempts = $5
            RETURNING true
            """,
            push.id,
            delay,
            status,
            error,
            push.attempts,
        )
        return bool(updated)

    async def mark_sent(self, push: ClaimedPush, status: int) -> list[DomainEvent]:
        """Mark the push sent and supersede older versions still pending.

        Returns the events written, none when the push was already finished.
        """
        async with self.pool.acquire() as connection, connection.transaction():
            await _lock_note(connection, push.clinic_id, push.note_id)
            attempts = await connection.fetchval(
                """
                UPDATE pushes SET state = 'sent', leased_until = NULL,
                    last_status = $2, last_error = NULL, command = NULL,
                    finished_at = now(), updated_at = now()
                WHERE id = $1 AND state = 'pending'
                RETURNING attempts
                """,
                push.id,
                status,
            )
            if attempts is None:
                return []
            older = await connection.fetch(
                """
                UPDATE pushes SET state = 'superseded', superseded_by = $3,
                    leased_until = NULL, command = NULL,
                    finished_at = now(), updated_at = now()
                WHERE clinic_id = $1 AND note_id = $2 AND version < $3
                  AND state = 'pending'
                RETURNING id, version, attempts, last_status
                """,
                push.clinic_id,
                push.note_id,
                push.version,
            )
            events = [
                push_event(
                    "push.sent",
                    push_id=push.id,
                    clinic_id=push.clinic_id,
                    note_id=push.note_id,
                    version=push.version,
                    attempts=attempts,
                    last_status=status,
                )
            ]
            events += [
                push_event(
                    "push.superseded",
                    push_id=row["id"],
                    clinic_id=push.clinic_id,
                    note_id=push.note_id,
                    version=row["version"],
                    attempts=row["attempts"],
                    last_status=row["last_status"],
                    supersededByVersion=push.version,
                )
                for row in older
            ]
            await enqueue_events(connection, self.events_exchange, events)
        return events

    async def mark_failed(
        self, push: ClaimedPush, status: int | None, error: str
    ) -> DomainEvent | None:
        """Mark the push failed once its dead-letter copy is confirmed.

        Returns the push.failed event, or None when the push was already finished.
        """
        async with self.pool.acquire() as connection, connection.transaction():
            attempts = await connection.fetchval(
                """
                UPDATE pushes SET state = 'failed', leased_until = NULL,
                    last_status = $2, last_error = $3, command = NULL,
                    finished_at = now(), updated_at = now()
                WHERE id = $1 AND state = 'pending'
                RETURNING attempts
                """,
                push.id,
                status,
                error,
            )
            if attempts is None:
                return None
            event = push_event(
                "push.failed",
                push_id=push.id,
                clinic_id=push.clinic_id,
                note_id=push.note_id,
                version=push.version,
                attempts=attempts,
                last_status=status,
                lastError=error,
            )
            await enqueue_events(connection, self.events_exchange, [event])
        return event
