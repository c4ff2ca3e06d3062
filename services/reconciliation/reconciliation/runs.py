"""Runs of appointment reconciliation and species refresh: the guard, the table, the event.

One run per clinic and kind is active at a time. The guard is a session-level
PostgreSQL advisory lock, keyed by a 64-bit hash of kind and clinic and taken
with `pg_try_advisory_lock` on the connection that does the run. A second
request that finds the lock taken is not run and reports `skipped`.
PostgreSQL releases the lock when its session ends, so a crashed worker does
not block a clinic.

Every command gets one row in `reconcile_runs`, keyed by the command id, and
exactly one `reconcile.completed` or `species.refreshed` event, written to the
outbox in the transaction that ends the run.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import asyncpg
from coggo.outbox import enqueue_events
from coggo.schemas.bus import DomainEvent, utc_now

from reconciliation.errors import CommandError

RunKind = Literal["appointments", "species"]

EVENT_TYPES: dict[RunKind, str] = {
    "appointments": "reconcile.completed",
    "species": "species.refreshed",
}

# Items listed one by one in the event; all of them are counted.
MAX_LISTED_SKIPS = 50
RUNNING_ROW_POLLS = 20
RUNNING_ROW_POLL_SECONDS = 0.05


@dataclass(frozen=True)
class SkippedItem:
    index: int
    external_id: str | None
    reason: str
    detail: str

    def wire(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "externalId": self.external_id,
            "reason": self.reason,
            "detail": self.detail,
        }


@dataclass
class RunReport:
    """Outcome and counts of one run, stored in `reconcile_runs` and sent in its event."""

    kind: RunKind
    command_id: str
    clinic_id: str
    run_id: uuid.UUID = field(default_factory=uuid.uuid4)
    status: str = "running"
    error: str | None = None
    detail: str | None = None
    started_at: datetime = field(default_factory=utc_now)
    finished_at: datetime | None = None
    days: int | None = None
    fetched: int | None = None
    processed: int = 0
    truncated: int | None = None
    skipped: list[SkippedItem] = field(default_factory=list)
    # Set on a skipped request: the run that was active instead.
    running_run_id: str | None = None
    running_command_id: str | None = None

    def skip(
        self, index: int, external_id: str | None, reason: str, detail: str
    ) -> None:
        self.skipped.append(SkippedItem(index, external_id, reason, detail))

    def fail(self, status: str, error: CommandError) -> None:
        self.status = status
        self.error = error.code
        self.detail = error.detail

    def finish(self) -> None:
        self.finished_at = utc_now()

    @property
    def duration_ms(self) -> int:
        end = self.finished_at or utc_now()
        return round((end - self.started_at).total_seconds() * 1000)

    def kind_data(self) -> dict[str, Any]:
        """Fields of this kind of run in the event; subclasses add theirs."""
        return {}

    def event_data(self) -> dict[str, Any]:
        reasons = Counter(item.reason for item in self.skipped)
        data: dict[str, Any] = {
            "commandId": self.command_id,
            "runId": str(self.run_id),
            "status": self.status,
            "error": self.error,
            "detail": self.detail,
            "startedAt": self.started_at.isoformat(),
            "finishedAt": self.finished_at.isoformat() if self.finished_at else None,
            "durationMs": self.duration_ms,
            "fetched": self.fetched,
            "processed": self.processed,
            "skipped": len(self.skipped),
            "skippedReasons": dict(sorted(reasons.items())),
            "skippedItems": [item.wire() for item in self.skipped[:MAX_LISTED_SKIPS]],
            **self.kind_data(),
        }
        if self.running_run_id is not None:
            data["runningRunId"] = self.running_run_id
            data["runningCommandId"] = self.running_command_id
        return data


def _lock_name(kind: RunKind, clinic_id: str) -> str:
    return f"coggo.reconciliation:{kind}:{clinic_id}"


async def try_lock(
    connection: asyncpg.Connection, kind: RunKind, clinic_id: str
) -> bool:
    """Take the run guard of a clinic and kind on this connection, without waiting."""
    return bool(
        await connection.fetchval(
            "SELECT pg_try_advisory_lock(hashtextextended($1, 0))",
            _lock_name(kind, clinic_id),
        )
    )


async def unlock(connection: asyncpg.Connection, kind: RunKind, clinic_id: str) -> None:
    await connection.execute(
        "SELECT pg_advisory_unlock(hashtextextended($1, 0))",
        _lock_name(kind, clinic_id),
    )


async def find_run(
    connection: asyncpg.Connection, command_id: str
) -> asyncpg.Record | None:
    return await connection.fetchrow(
        "SELECT id, status FROM reconcile_runs WHERE command_id = $1", command_id
    )


async def find_running(
    connection: asyncpg.Connection, kind: RunKind, clinic_id: str
) -> asyncpg.Record | None:
    """Return the active run of a clinic and kind, waiting briefly for its row.

    The holder of the guard stores its row just after taking the guard, so a
    request that found the guard taken may look before that row commits.
    """
    for _ in range(RUNNING_ROW_POLLS):
        row = await connection.fetchrow(
            """
            SELECT id, command_id, started_at FROM reconcile_runs
            WHERE clinic_id = $1 AND kind = $2 AND status = 'running'
            ORDER BY started_at DESC LIMIT 1
            """,
            clinic_id,
            kind,
        )
        if row is not None:
            return row
        await asyncio.sleep(RUNNING_ROW_POLL_SECONDS)
    return None


def _event(report: RunReport) -> DomainEvent:
    return DomainEvent(
        type=EVENT_TYPES[report.kind],
        clinic_id=report.clinic_id,
        data=report.event_data(),
    )


async def record_unstarted(
    connection: asyncpg.Connection, report: RunReport, events_exchange: str
) -> bool:
    """Store a rejected or skipped run and its event; return False for a repeat."""
    report.finish()
    async with connection.transaction():
        inserted = await connection.fetchval(
            """
            INSERT INTO reconcile_runs (id, command_id, clinic_id, kind, status, days,
                error, detail, result, started_at, finished_at)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
            ON CONFLICT (command_id) DO NOTHING RETURNING true
            """,
            report.run_id,
            report.command_id,
            report.clinic_id,
            report.kind,
            report.status,
            report.days,
            report.error,
            report.detail,
            report.event_data(),
            report.started_at,
            report.finished_at,
        )
        if inserted:
            await enqueue_events(connection, events_exchange, [_event(report)])
    return bool(inserted)


async def start_run(
    connection: asyncpg.Connection, report: RunReport, events_exchange: str
) -> bool:
    """Store the run as running; return False if its command already finished.

    Call it holding the guard. Holding the guard proves that no other run of
    this clinic and kind is active. Rows still marked running therefore belong
    to workers that stopped mid-run. They are closed as failed with their
    event, so that a requester waiting for them receives a result.
    """
    async with connection.transaction():
        await _close_interrupted(connection, report, events_exchange)
        run_id = await connection.fetchval(
            """
            INSERT INTO reconcile_runs (id, command_id, clinic_id, kind, status, days,
                started_at)
            VALUES ($1, $2, $3, $4, 'running', $5, $6)
            ON CONFLICT (command_id) DO UPDATE SET started_at = EXCLUDED.started_at
                WHERE reconcile_runs.status = 'running'
            RETURNING id
            """,
            report.run_id,
            report.command_id,
            report.clinic_id,
            report.kind,
            report.days,
            report.started_at,
        )
    if run_id is None:
        return False
    # A redelivered command continues under the id of its first attempt.
    report.run_id = run_id
    return True


async def _close_interrupted(
    connection: asyncpg.Connection, report: RunReport, events_exchange: str
) -> None:
    rows = await connection.fetch(
        """
        SELECT id, command_id, started_at, days FROM reconcile_runs
        WHERE clinic_id = $1 AND kind = $2 AND status = 'running' AND command_id <> $3
        FOR UPDATE
        """,
        report.clinic_id,
        report.kind,
        report.command_id,
    )
    for row in rows:
        interrupted = type(report)(
            kind=report.kind,
            command_id=row["command_id"],
            clinic_id=report.clinic_id,
            run_id=row["id"],
            started_at=row["started_at"],
            days=row["days"],
        )
        interrupted.fail(
            "failed",
            CommandError(
                "interrupted",
                "the worker running this request stopped before it finished; "
                "send the request again",
            ),
        )
        await finish_run(connection, interrupted, events_exchange)


async def finish_run(
    connection: asyncpg.Connection, report: RunReport, events_exchange: str
) -> None:
    """Store the outcome of a started run and add its event to the outbox."""
    if report.finished_at is None:
        report.finish()
    async with connection.transaction():
        await connection.execute(
            """
            UPDATE reconcile_runs SET status = $2, error = $3, detail = $4,
                fetched = $5, processed = $6, skipped = $7, truncated = $8,
                result = $9, finished_at = $10
            WHERE id = $1
            """,
            report.run_id,
            report.status,
            report.error,
            report.detail,
            report.fetched,
            report.processed,
            len(report.skipped),
            report.truncated,
            report.event_data(),
            report.finished_at,
        )
        await enqueue_events(connection, events_exchange, [_event(report)])
