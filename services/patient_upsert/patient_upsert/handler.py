"""Processing one webhook message: deduplicate, apply, write domain events."""

from __future__ import annotations

import time
from typing import Any

import asyncpg
import structlog
from aio_pika.abc import AbstractIncomingMessage
from coggo import metrics
from coggo.errors import PermanentMessageError
from coggo.outbox import OutboxRelay, enqueue_events
from coggo.pipeline.upsert import EventContext, apply_event
from coggo.schemas.bus import WebhookMessage
from coggo.schemas.partner import EventType, MissingPatient, parse_event_data
from coggo.topology import PATIENT_UPSERT_QUEUE, Topology
from pydantic import ValidationError

log = structlog.get_logger(__name__)

CONSUMER_NAME = "patient-upsert"
TIMEZONE_CACHE_SECONDS = 60.0


class WebhookHandler:
    def __init__(
        self, pool: asyncpg.Pool, topology: Topology, relay: OutboxRelay
    ) -> None:
        self.pool = pool
        self.topology = topology
        self.relay = relay
        self._timezones: dict[str, tuple[float, str]] = {}

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

    async def __call__(
        self, body: dict[str, Any], message: AbstractIncomingMessage
    ) -> None:
        try:
            webhook = WebhookMessage.model_validate(body)
            event_type = EventType(webhook.type)
            data = parse_event_data(event_type, webhook.data)
        except (ValidationError, MissingPatient, ValueError) as exc:
            raise PermanentMessageError("invalid_message", _summary(exc)) from None

        async with self.pool.acquire() as connection, connection.transaction():
            first = await connection.fetchval(
                """
                INSERT INTO processed_messages (consumer, message_id) VALUES ($1, $2)
                ON CONFLICT DO NOTHING RETURNING true
                """,
                CONSUMER_NAME,
                webhook.id,
            )
            if not first:
                log.info("webhook.already_processed", message_id=webhook.id)
                return
            timezone = await self._default_timezone(connection, webhook.clinic_id)
            context = EventContext(
                clinic_id=webhook.clinic_id,
                event_id=webhook.event_id,
                occurred_at=webhook.occurred_at,
                default_timezone=timezone,
            )
            events = await apply_event(connection, context, event_type, data)
            await enqueue_events(connection, self.topology.events, events)

        if events:
            self.relay.notify()
        metrics.MESSAGES_PROCESSED.labels(PATIENT_UPSERT_QUEUE).inc()
        log.info(
            "webhook.processed",
            clinic_id=webhook.clinic_id,
            event_id=webhook.event_id,
            event_type=webhook.type,
            domain_events=len(events),
        )


def _summary(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        first = exc.errors(include_url=False, include_input=False)[0]
        path = ".".join(str(part) for part in first["loc"])
        return f"{path}: {first['msg']}"
    return str(exc)
