"""Processing webhook messages in batches: deduplicate, apply, write domain events.

Each delivery waits on a future while a batcher groups the deliveries that
arrive together into one transaction, up to `max_batch` of them. A batch
costs about as many round trips to PostgreSQL as a single event, which is
where the consumer's throughput comes from. If a batch fails for a reason
other than a transient fault, its messages are retried one by one, so one
bad message is dead-lettered alone and the others are processed.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import structlog
from aio_pika.abc import AbstractIncomingMessage
from coggo.consumer import TRANSIENT_ERRORS
from coggo.errors import PermanentMessageError
from coggo.outbox import OutboxRelay, enqueue_events
from coggo.pipeline.upsert import EventContext, PendingEvent, apply_events
from coggo.schemas.bus import WebhookMessage
from coggo.schemas.partner import EventType, MissingPatient, parse_event_data
from coggo.topology import Topology
from coggo.validation import describe_validation_error
from pydantic import ValidationError

log = structlog.get_logger(__name__)

CONSUMER_NAME = "patient-upsert"
TIMEZONE_CACHE_SECONDS = 60.0


@dataclass
class Delivery:
    webhook: WebhookMessage
    event_type: EventType
    data: Any
    done: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


def parse_message(body: dict[str, Any]) -> tuple[WebhookMessage, EventType, Any]:
    """Validate a webhook message; a message that fails can never succeed."""
    try:
        webhook = WebhookMessage.model_validate(body)
        event_type = EventType(webhook.type)
        data = parse_event_data(event_type, webhook.data)
    except (ValidationError, MissingPatient, ValueError) as exc:
        detail = (
            describe_validation_error(exc)
            if isinstance(exc, ValidationError)
            else str(exc)
        )
        raise PermanentMessageError("invalid_message", detail) from None
    return webhook, event_type, data


class WebhookHandler:
    """The consumer's handler; `run()` must be running for deliveries to finish."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        topology: Topology,
        relay: OutboxRelay,
        *,
        max_batch: int = 100,
        concurrency: int = 3,
        linger: float = 0.005,
    ) -> None:
        self.pool = pool
        self.topology = topology
        self.relay = relay
        self.max_batch = max_batch
        self.linger = linger
        self._queue: asyncio.Queue[Delivery] = asyncio.Queue()
        self._slots = asyncio.Semaphore(concurrency)
        self._timezones: dict[str, tuple[float, str]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def __call__(
        self, body: dict[str, Any], message: AbstractIncomingMessage
    ) -> None:
        webhook, event_type, data = parse_message(body)
        delivery = Delivery(webhook, event_type, data)
        self._queue.put_nowait(delivery)
        await delivery.done

    async def run(self) -> None:
        """Group waiting deliveries into batches, as many at once as there are slots."""
        while True:
            first = await self._queue.get()
            # While every slot is busy, deliveries pile up and the next batch grows.
            await self._slots.acquire()
            batch = [first]
            deadline = asyncio.get_running_loop().time() + self.linger
            while len(batch) < self.max_batch:
                if self._queue.empty():
                    # Let deliveries already on their way join, briefly.
                    remaining = deadline - asyncio.get_running_loop().time()
                    if remaining <= 0:
                        break
                    try:
                        batch.append(
                            await asyncio.wait_for(self._queue.get(), remaining)
                        )
                    except TimeoutError:
                        break
                    continue
                batch.append(self._queue.get_nowait())
            task = asyncio.create_task(self._run_batch(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run_batch(self, batch: list[Delivery]) -> None:
        try:
            try:
                await self._commit(batch)
            except TRANSIENT_ERRORS as exc:
                # The consumer retries each message; they meet again in new batches.
                _fail(batch, exc)
                return
            except Exception as exc:
                if len(batch) == 1:
                    _fail(batch, _classify(exc))
                    return
                # One message spoiled the batch: apply each alone, so the
                # others succeed and only the bad one is dead-lettered.
                log.warning("webhook.batch_split", size=len(batch), error=repr(exc))
                for delivery in batch:
                    try:
                        await self._commit([delivery])
                    except Exception as single:
                        _fail([delivery], _classify(single))
                    else:
                        _succeed([delivery])
                return
            _succeed(batch)
        finally:
            self._slots.release()

    async def _commit(self, batch: list[Delivery]) -> None:
        ids = sorted({delivery.webhook.id for delivery in batch})
        async with self.pool.acquire() as connection, connection.transaction():
            fresh = {
                row["message_id"]
                for row in await connection.fetch(
                    """
                    INSERT INTO processed_messages (consumer, message_id)
                    SELECT $1, unnest($2::text[])
                    ON CONFLICT DO NOTHING RETURNING message_id
                    """,
                    CONSUMER_NAME,
                    ids,
                )
            }
            pending: list[PendingEvent] = []
            for delivery in batch:
                webhook = delivery.webhook
                if webhook.id not in fresh:
                    continue
                fresh.discard(webhook.id)
                context = EventContext(
                    clinic_id=webhook.clinic_id,
                    event_id=webhook.event_id,
                    occurred_at=webhook.occurred_at,
                    default_timezone=await self._default_timezone(
                        connection, webhook.clinic_id
                    ),
                )
                pending.append(
                    PendingEvent(context, delivery.event_type, delivery.data)
                )
            events = await apply_events(connection, pending)
            await enqueue_events(connection, self.topology.events, events)

        if events:
            self.relay.notify()
        for item in pending:
            log.info(
                "webhook.processed",
                clinic_id=item.context.clinic_id,
                event_id=item.context.event_id,
                event_type=item.event_type.value,
                domain_events=len(item.context.events),
            )
        skipped = len(batch) - len(pending)
        if skipped:
            log.info("webhook.already_processed", count=skipped)

    async def _default_timezone(
        self, connection: asyncpg.Connection, clinic_id: str
    ) -> str:
        """Return the clinic's default zone; a change reaches us within a minute."""
        now = time.monotonic()
        cached = self._timezones.get(clinic_id)
        if cached is not None and cached[0] > now:
            return cached[1]
        zone = await connection.fetchval(
            "SELECT default_timezone FROM integrations WHERE clinic_id = $1", clinic_id
        )
        self._timezones[clinic_id] = (now + TIMEZONE_CACHE_SECONDS, zone or "UTC")
        return zone or "UTC"


def _classify(exc: BaseException) -> BaseException:
    """Turn an error no retry can fix into a dead-letter reason; keep the others."""
    if isinstance(exc, (*TRANSIENT_ERRORS, PermanentMessageError)):
        return exc
    if isinstance(exc, (asyncpg.DataError, ValueError, OverflowError)):
        return PermanentMessageError("unprocessable", f"{type(exc).__name__}: {exc}")
    return exc


def _succeed(batch: list[Delivery]) -> None:
    for delivery in batch:
        if not delivery.done.done():
            delivery.done.set_result(None)


def _fail(batch: list[Delivery], exc: BaseException) -> None:
    for delivery in batch:
        if not delivery.done.done():
            delivery.done.set_exception(exc)
