"""The pushes table: taking in commands, claiming due attempts, recording outcomes.

Every state change that announces something writes its domain event to the
outbox in the same transaction. The common paths are single statements, since
the round trips to PostgreSQL are most of the cost of a push. One race is left
to the claim. An older version taken in while a newer one is being marked sent
can end up pending beside the sent one. The claim flags such a push, and the
dispatcher supersedes it instead of sending it.
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
    """Outcome of taking in one soap.push command."""

    QUEUED = "queued"
    DUPLICATE = "duplicate"
    SUPERSEDED = "superseded"
    # A failed push whose command arrived again, e.g. replayed from the dead-letter queue.
    REQUEUED = "requeued"


@dataclass(frozen=True)
class Finished:
    """A push that reached its final state, and the event written with it."""

    event: DomainEvent
    # Older versions of the note still pending, now due so they are superseded.
    older_versions_due: int = 0


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
    # The previous attempt's lease ran out: its dispatcher stopped mid-attempt,
    # so last_status and last_error are from the attempt before it.
    interrupted: bool
    command: bytes
    command_id: str
    command_headers: dict[str, Any]
    last_status: int | None
    last_error: str | None
    # The newest version of the note that was sent, when newer than this one:
    # this push must then be superseded, not sent.
    newer_sent_version: int | None = None


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
    SELECT p.id, p.attempts AS previous_attempts,
           p.leased_until IS NOT NULL AS interrupted
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
          picked.previous_attempts, picked.interrupted,
          p.command, p.command_id, p.command_headers,
          p.last_status, p.last_error,
          (
              SELECT max(n.version) FROM pushes n
              WHERE n.clinic_id = p.clinic_id AND n.note_id = p.note_id
                AND n.version > p.version AND n.state = 'sent'
          ) AS newer_sent_version
"""

# Queues a new push, or requeues a failed one whose command came again (e.g.
# replayed from the dead-letter queue). Returns no row when the version exists
# in another state or a newer version was sent, and take_in then finds out which.
_TAKE_IN_SQL = """
INSERT INTO pushes (id, clinic_id, note_id, version, command, command_id,
    command_headers)
SELECT $1, $2, $3, $4, $5, $6, $7
WHERE NOT EXISTS (
    SELECT 1 FROM pushes n
    WHERE n.clinic_id = $2 AND n.note_id = $3 AND n.version > $4
      AND n.state = 'sent'
)
ON CONFLICT (clinic_id, note_id, version) DO UPDATE SET
    state = 'pending', attempts = 0, next_attempt_at = now(),
    leased_until = NULL, last_status = NULL, last_error = NULL,
    command = excluded.command, command_id = excluded.command_id,
    command_headers = excluded.command_headers,
    finished_at = NULL, updated_at = now()
WHERE pushes.state = 'failed'
-- A new row has both timestamps from the same now(); a requeued one does not.
RETURNING created_at = updated_at AS inserted
"""

# Ends a pending push in `state` and writes its event to the outbox, in one
# statement, so the two commit together. When the push was sent, older versions
# of its note still pending are made due now: the claim then finds the newer
# version sent and the dispatcher supersedes them, with their own events.
_FINISH_SQL = """
WITH finished AS (
    UPDATE pushes SET state = $2, attempts = $3, leased_until = NULL,
        last_status = $4, last_error = $5, superseded_by = $6, command = NULL,
        finished_at = now(), updated_at = now()
    WHERE id = $1 AND state = 'pending'
    RETURNING clinic_id, note_id, version
), older AS (
    UPDATE pushes o SET next_attempt_at = now(), updated_at = now()
    FROM finished f
    WHERE $2 = 'sent' AND o.clinic_id = f.clinic_id AND o.note_id = f.note_id
      AND o.version < f.version AND o.state = 'pending'
    RETURNING o.id
), announced AS (
    INSERT INTO outbox (exchange, routing_key, message_id, body, headers, mandatory)
    SELECT $7, $8, $9, $10, '{}'::jsonb, false FROM finished
)
SELECT (SELECT count(*) FROM finished) AS finished,
       (SELECT count(*) FROM older) AS older
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

        row = await self.pool.fetchrow(
            _TAKE_IN_SQL,
            push_id,
            command.clinic_id,
            data.note_id,
            data.version,
            body,
            command.id,
            stored_headers,
        )
        if row is not None:
            return Intake.QUEUED if row["inserted"] else Intake.REQUEUED

        async with self.pool.acquire() as connection, connection.transaction():
            newer_version = await connection.fetchval(
                """
                SELECT max(version) FROM pushes
                WHERE clinic_id = $1 AND note_id = $2 AND version > $3
                  AND state = 'sent'
                """,
                command.clinic_id,
                data.note_id,
                data.version,
            )
            if newer_version is None:
                return Intake.DUPLICATE
            inserted = await connection.fetchval(
                """
                INSERT INTO pushes (id, clinic_id, note_id, version, state,
                    command_id, command_headers, superseded_by, finished_at)
                VALUES ($1, $2, $3, $4, 'superseded', $5, $6, $7, now())
                ON CONFLICT (clinic_id, note_id, version) DO NOTHING
                RETURNING true
                """,
                push_id,
                command.clinic_id,
                data.note_id,
                data.version,
                command.id,
                stored_headers,
                newer_version,
            )
            if not inserted:
                return Intake.DUPLICATE
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
        return Intake.SUPERSEDED

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
                interrupted=row["interrupted"],
                command=row["command"],
                command_id=row["command_id"],
                command_headers=row["command_headers"],
                last_status=row["last_status"],
                last_error=row["last_error"],
                newer_sent_version=row["newer_sent_version"],
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

    async def mark_sent(self, push: ClaimedPush, status: int) -> Finished | None:
        """Mark the push sent; return None when it was already finished."""
        event = push_event(
            "push.sent",
            push_id=push.id,
            clinic_id=push.clinic_id,
            note_id=push.note_id,
            version=push.version,
            attempts=push.attempts,
            last_status=status,
        )
        return await self._finish(push, "sent", event, last_status=status)

    async def mark_superseded(self, push: ClaimedPush) -> Finished | None:
        """Supersede a claimed push because a newer version of its note was sent.

        The claim counted an attempt that is not made, so the count goes back.
        Returns None when the push was already finished.
        """
        assert push.newer_sent_version is not None
        event = push_event(
            "push.superseded",
            push_id=push.id,
            clinic_id=push.clinic_id,
            note_id=push.note_id,
            version=push.version,
            attempts=push.previous_attempts,
            last_status=push.last_status,
            supersededByVersion=push.newer_sent_version,
        )
        return await self._finish(
            push,
            "superseded",
            event,
            attempts=push.previous_attempts,
            last_status=push.last_status,
            last_error=push.last_error,
            superseded_by=push.newer_sent_version,
        )

    async def mark_failed(
        self, push: ClaimedPush, status: int | None, error: str
    ) -> Finished | None:
        """Mark the push failed once its dead-letter copy is confirmed.

        Returns None when the push was already finished.
        """
        event = push_event(
            "push.failed",
            push_id=push.id,
            clinic_id=push.clinic_id,
            note_id=push.note_id,
            version=push.version,
            attempts=push.attempts,
            last_status=status,
            lastError=error,
        )
        return await self._finish(
            push, "failed", event, last_status=status, last_error=error
        )

    async def _finish(
        self,
        push: ClaimedPush,
        state: str,
        event: DomainEvent,
        *,
        attempts: int | None = None,
        last_status: int | None = None,
        last_error: str | None = None,
        superseded_by: int | None = None,
    ) -> Finished | None:
        row = await self.pool.fetchrow(
            _FINISH_SQL,
            push.id,
            state,
            push.attempts if attempts is None else attempts,
            last_status,
            last_error,
            superseded_by,
            self.events_exchange,
            event.type,
            event.id,
            event.to_bytes(),
        )
        if not row["finished"]:
            return None
        return Finished(event, older_versions_due=row["older"])
