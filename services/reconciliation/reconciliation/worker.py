"""The worker's shared parts and the flow every guarded run follows."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import structlog
from aio_pika.abc import AbstractIncomingMessage
from coggo.broker import Broker
from coggo.consumer import TRANSIENT_ERRORS
from coggo.credentials import SecretBox
from coggo.outbox import OutboxRelay
from coggo.schemas.bus import utc_now
from coggo.schemas.partner import WireModel
from coggo.topology import Topology
from pydantic import AwareDatetime, Field

from reconciliation import metrics, runs
from reconciliation.errors import CommandError
from reconciliation.integration import PimsTarget, load_target
from reconciliation.pims import PimsClient

log = structlog.get_logger(__name__)


class Command(WireModel):
    """The envelope of a command on `coggo.commands`; `data` is checked per type."""

    id: str = Field(min_length=1, max_length=255)
    type: str
    clinic_id: str = Field(min_length=1, max_length=255)
    occurred_at: AwareDatetime = Field(default_factory=utc_now)
    data: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def from_message(
        cls, body: dict[str, Any], message: AbstractIncomingMessage
    ) -> Command:
        """Validate a command; `id` and `type` default to the AMQP properties."""
        fields = dict(body)
        if not fields.get("id") and message.message_id:
            fields["id"] = message.message_id
        if not fields.get("type") and message.routing_key:
            fields["type"] = message.routing_key
        if fields.get("data") is None:
            fields["data"] = {}
        return cls.model_validate(fields)


@dataclass
class Worker:
    """Shared dependencies of the command handlers: database, bus and PIMS client."""

    pool: asyncpg.Pool
    box: SecretBox
    topology: Topology
    broker: Broker
    relay: OutboxRelay
    pims: PimsClient
    # Runs hold a database connection for their whole duration; this bounds
    # them so that searches always find a free connection in the pool.
    run_slots: asyncio.Semaphore


RunWork = Callable[[asyncpg.Connection, PimsTarget], Awaitable[None]]


async def execute_run(
    worker: Worker,
    report: runs.RunReport,
    work: RunWork,
    *,
    invalid: CommandError | None = None,
) -> None:
    """Run `work` under the clinic's run guard and record the run with its event.

    `invalid` rejects the command before anything else happens. A CommandError
    or an unexpected exception from `work` fails the run. A transient database
    or broker fault propagates instead, so that the consumer retries the
    command, which then continues the same run.
    """
    bound = log.bind(
        clinic_id=report.clinic_id, command_id=report.command_id, kind=report.kind
    )
    async with worker.run_slots, worker.pool.acquire() as connection:
        existing = await runs.find_run(connection, report.command_id)
        if existing is not None and existing["status"] != "running":
            bound.info("run.already_finished", run_id=str(existing["id"]))
            return

        try:
            if invalid is not None:
                raise invalid
            target = await load_target(connection, worker.box, report.clinic_id)
        except CommandError as exc:
            report.fail("rejected", exc)
            await _record_unstarted(worker, connection, report, bound)
            return

        if not await runs.try_lock(connection, report.kind, report.clinic_id):
            await _record_skipped(worker, connection, report, bound)
            return
        try:
            await _run_locked(worker, connection, report, target, work, bound)
        finally:
            # Unlocking on a broken connection fails, but the lock died with it.
            if not connection.is_closed():
                await runs.unlock(connection, report.kind, report.clinic_id)
    worker.relay.notify()


async def _run_locked(
    worker: Worker,
    connection: asyncpg.Connection,
    report: runs.RunReport,
    target: PimsTarget,
    work: RunWork,
    bound: Any,
) -> None:
    events = worker.topology.events
    if not await runs.start_run(connection, report, events):
        bound.info("run.already_finished")
        return
    bound = bound.bind(run_id=str(report.run_id))
    bound.info("run.started", days=report.days)
    try:
        await work(connection, target)
    except CommandError as exc:
        report.fail("failed", exc)
    except TRANSIENT_ERRORS:
        # The consumer retries the command, which continues this run.
        raise
    except Exception:
        bound.exception("run.crashed")
        report.fail(
            "failed",
            CommandError(
                "internal_error",
                "the run failed inside Coggo; see the reconciliation worker's log",
            ),
        )
    else:
        report.status = "succeeded"
    report.finish()
    await runs.finish_run(connection, report, events)

    metrics.RUNS.labels(report.kind, report.status).inc()
    outcome = bound.info if report.status == "succeeded" else bound.warning
    outcome(
        "run.finished",
        status=report.status,
        error=report.error,
        fetched=report.fetched,
        processed=report.processed,
        skipped=len(report.skipped),
        truncated=report.truncated,
        duration_ms=report.duration_ms,
    )


async def _record_unstarted(
    worker: Worker,
    connection: asyncpg.Connection,
    report: runs.RunReport,
    bound: Any,
) -> None:
    if await runs.record_unstarted(connection, report, worker.topology.events):
        worker.relay.notify()
        metrics.RUNS.labels(report.kind, report.status).inc()
    bound.warning(
        "run.not_started",
        status=report.status,
        error=report.error,
        detail=report.detail,
    )


async def _record_skipped(
    worker: Worker,
    connection: asyncpg.Connection,
    report: runs.RunReport,
    bound: Any,
) -> None:
    running = await runs.find_running(connection, report.kind, report.clinic_id)
    detail = (
        f"another {report.kind} run for clinic {report.clinic_id!r} is in "
        "progress; this request was not run again, and that run's event "
        "carries the result"
    )
    report.fail("skipped", CommandError("already_running", detail))
    if running is not None:
        report.running_run_id = str(running["id"])
        report.running_command_id = running["command_id"]
    await _record_unstarted(worker, connection, report, bound)
