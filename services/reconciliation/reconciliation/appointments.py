"""`reconcile.appointments`: fetch a clinic's upcoming appointments and upsert them.

Each appointment goes through the webhook pipeline as one event in its own
transaction. The event id is `reconcile:<run id>:<appointment externalId>` and
its occurredAt is the time the list was fetched, so a webhook that happened
later still wins, and an older one arriving afterwards does not undo the
reconciliation. An appointment with `status: cancelled` is applied as
`appointment.cancelled`. Any other is applied as `appointment.updated`, which
schedules a new appointment. It brings back a cancelled one only when the PIMS
sends `status: scheduled`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import structlog
from coggo.consumer import TRANSIENT_ERRORS
from coggo.errors import PermanentMessageError
from coggo.outbox import enqueue_events
from coggo.pipeline.normalize import appointment_time
from coggo.pipeline.upsert import EventContext, apply_event
from coggo.schemas.bus import utc_now
from coggo.schemas.partner import (
    AppointmentListItem,
    AppointmentStatus,
    EventData,
    EventType,
    MissingPatient,
    parse_event_data,
)
from pydantic import ValidationError
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)

from reconciliation import metrics
from reconciliation.errors import CommandError
from reconciliation.integration import PimsTarget
from reconciliation.pims import RetryPolicy
from reconciliation.runs import RunReport
from reconciliation.validation import describe_validation_error
from reconciliation.worker import Command, Worker, execute_run

log = structlog.get_logger(__name__)

MIN_DAYS = 1
MAX_DAYS = 30
DEFAULT_DAYS = 7
# The Partner API processes at most this many appointments per refresh.
MAX_APPOINTMENTS = 100
# NOTE: an estimate: 30 days of a busy practice (about 1500 appointments with
# embedded client and patient) fit in this with room to spare.
MAX_RESPONSE_BYTES = 8 * 1024 * 1024
FETCH_TIMEOUT_SECONDS = 15.0
FETCH_RETRY = RetryPolicy(attempts=4, initial_wait=0.5, max_wait=8.0, jitter=0.5)
# Attempts per appointment when the database reports a transient fault.
ITEM_ATTEMPTS = 3
JSON_TYPE_NAMES: dict[type, str] = {
    bool: "a boolean",
    str: "a string",
    float: "a fraction",
    list: "an array",
    dict: "an object",
}


@dataclass
class AppointmentsReport(RunReport):
    processed_through: datetime | None = None

    def kind_data(self) -> dict[str, Any]:
        return {
            "days": self.days,
            "truncated": self.truncated,
            "processedThrough": self.processed_through.isoformat()
            if self.processed_through
            else None,
        }


@dataclass(frozen=True)
class PlannedItem:
    """One valid appointment of the list, ready for the pipeline."""

    index: int
    external_id: str
    event_type: EventType
    data: EventData
    starts_at: datetime


def parse_days(data: dict[str, Any]) -> int:
    """Return `data.days`, 7 when absent; raise CommandError unless it is 1 to 30."""
    value = data.get("days")
    if value is None:
        return DEFAULT_DAYS
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        kind = JSON_TYPE_NAMES.get(type(value), type(value).__name__)
        raise CommandError(
            "invalid_days",
            f"data.days must be an integer from {MIN_DAYS} to {MAX_DAYS}; got {kind}",
        )
    if not MIN_DAYS <= value <= MAX_DAYS:
        raise CommandError(
            "invalid_days",
            f"data.days must be an integer from {MIN_DAYS} to {MAX_DAYS}; got {value}",
        )
    return value


async def handle_reconcile(worker: Worker, command: Command) -> None:
    report = AppointmentsReport(
        kind="appointments", command_id=command.id, clinic_id=command.clinic_id
    )
    invalid = None
    try:
        report.days = parse_days(command.data)
    except CommandError as exc:
        invalid = exc

    async def work(connection: asyncpg.Connection, target: PimsTarget) -> None:
        await reconcile(worker, connection, target, report)

    await execute_run(worker, report, work, invalid=invalid)


async def reconcile(
    worker: Worker,
    connection: asyncpg.Connection,
    target: PimsTarget,
    report: AppointmentsReport,
) -> None:
    """Fetch the appointments of the next `report.days` days and apply them."""
    body = await worker.pims.get_json(
        target,
        "/appointments",
        params={"days": report.days},
        timeout=FETCH_TIMEOUT_SECONDS,
        max_response_bytes=MAX_RESPONSE_BYTES,
        retry=FETCH_RETRY,
    )
    fetched_at = utc_now()
    items = _appointment_list(body)
    report.fetched = len(items)

    planned = plan_items(items, target.default_timezone, report)
    # Nearest first: the earliest start is the soonest visit a vet needs.
    planned.sort(key=lambda item: (item.starts_at, item.index))
    selected = planned[:MAX_APPOINTMENTS]
    report.truncated = len(planned) - len(selected)

    for item in selected:
        if await _apply_item(worker, connection, target, report, item, fetched_at):
            report.processed += 1
            report.processed_through = item.starts_at
    metrics.ITEMS.labels("processed").inc(report.processed)
    metrics.ITEMS.labels("skipped").inc(len(report.skipped))
    metrics.ITEMS.labels("truncated").inc(report.truncated)


def _appointment_list(body: Any) -> list[Any]:
    if not isinstance(body, dict) or not isinstance(body.get("appointments"), list):
        raise CommandError(
            "invalid_response",
            "the PIMS response to GET /appointments has no `appointments` array",
        )
    items: list[Any] = body["appointments"]
    return items


def _peek_external_id(raw: Any) -> str | None:
    appointment = raw.get("appointment") if isinstance(raw, dict) else None
    external_id = (
        appointment.get("externalId") if isinstance(appointment, dict) else None
    )
    return external_id[:255] if isinstance(external_id, str) else None


def plan_items(
    items: list[Any], default_timezone: str, report: RunReport
) -> list[PlannedItem]:
    """Validate each appointment as the spec describes it; skip invalid ones."""
    planned: list[PlannedItem] = []
    seen: set[str] = set()
    for index, raw in enumerate(items):
        external_id = _peek_external_id(raw)
        try:
            item = _plan_item(index, raw, default_timezone)
        except CommandError as exc:
            report.skip(index, external_id, exc.code, exc.detail)
            continue
        if item.external_id in seen:
            report.skip(
                index,
                item.external_id,
                "duplicate_item",
                "the list contains this appointment more than once; the first "
                "one was used",
            )
            continue
        seen.add(item.external_id)
        planned.append(item)
    return planned


def _plan_item(index: int, raw: Any, default_timezone: str) -> PlannedItem:
    if not isinstance(raw, dict):
        raise CommandError("invalid_item", f"appointments[{index}] is not an object")
    try:
        item = AppointmentListItem.model_validate(raw)
    except ValidationError as exc:
        raise CommandError("invalid_item", describe_validation_error(exc)) from None

    cancelled = item.appointment.status == AppointmentStatus.CANCELLED
    event_type = (
        EventType.APPOINTMENT_CANCELLED if cancelled else EventType.APPOINTMENT_UPDATED
    )
    try:
        data = parse_event_data(event_type, raw)
    except MissingPatient:
        raise CommandError(
            "patient_required",
            "a scheduled appointment needs its patient so Coggo can link the visit",
        ) from None
    except ValidationError as exc:
        raise CommandError("invalid_item", describe_validation_error(exc)) from None

    zone = item.appointment.timezone or default_timezone
    try:
        time = appointment_time(item.appointment.starts_at, zone)
    except (ValueError, KeyError) as exc:
        raise CommandError("invalid_start", f"appointment.startsAt: {exc}") from None
    return PlannedItem(
        index=index,
        external_id=item.appointment.external_id,
        event_type=event_type,
        data=data,
        starts_at=time.instant,
    )


async def _apply_item(
    worker: Worker,
    connection: asyncpg.Connection,
    target: PimsTarget,
    report: RunReport,
    item: PlannedItem,
    fetched_at: datetime,
) -> bool:
    """Apply one appointment in its own transaction; return False if it was skipped."""
    retrying = AsyncRetrying(
        retry=retry_if_exception_type(TRANSIENT_ERRORS),
        stop=stop_after_attempt(ITEM_ATTEMPTS),
        wait=wait_exponential_jitter(multiplier=0.1, max=1.0),
        reraise=True,
    )
    try:
        async for attempt in retrying:
            with attempt:
                async with connection.transaction():
                    context = EventContext(
                        clinic_id=target.clinic_id,
                        event_id=f"reconcile:{report.run_id}:{item.external_id}",
                        occurred_at=fetched_at,
                        default_timezone=target.default_timezone,
                    )
                    events = await apply_event(
                        connection, context, item.event_type, item.data
                    )
                    await enqueue_events(connection, worker.topology.events, events)
    except PermanentMessageError as exc:
        report.skip(item.index, item.external_id, exc.reason, exc.detail)
        return False
    return True
