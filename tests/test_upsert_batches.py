"""The patient-upsert batcher: one bad message in a batch fails alone."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from coggo.broker import Broker
from coggo.errors import PermanentMessageError
from coggo.outbox import OutboxRelay
from patient_upsert.handler import Delivery, WebhookHandler, parse_message

from tests.support.events import appointment_event
from tests.support.pipeline import apply
from tests.support.stack import Env


def _message(event: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": str(uuid.uuid4()),
        "type": event["type"],
        "occurredAt": event["occurredAt"],
        "clinicId": "clinic-1",
        "eventId": event["id"],
        "data": event["data"],
    }


def _merge(event_id: str, merged: str, survivor: str) -> dict[str, Any]:
    return {
        "id": event_id,
        "type": "patient.merged",
        "occurredAt": "2026-06-12T11:00:00Z",
        "data": {"patient": {"externalId": merged}, "mergedIntoExternalId": survivor},
    }


async def test_bad_message_fails_alone_in_batch(env: Env) -> None:
    await env.create_integration()
    await apply(env.pool, _merge("m1", "pat_a", "pat_b"))
    relay = OutboxRelay(
        env.pool, Broker(env.settings.amqp_url, env.topology, name="test")
    )
    handler = WebhookHandler(env.pool, env.topology, relay)

    good = [
        _message(
            appointment_event(
                f"e{index}", appointment=f"apt_{index}", patient=f"p{index}"
            )
        )
        for index in range(5)
    ]
    # Merging pat_b back into pat_a would form a cycle: it can never be applied.
    cycle = _message(_merge("m2", "pat_b", "pat_a"))
    deliveries = [
        Delivery(*parse_message(body)) for body in [*good[:2], cycle, *good[2:]]
    ]

    await handler._slots.acquire()  # _run_batch releases the slot it was given
    await handler._run_batch(deliveries)

    outcomes = await asyncio.gather(
        *(delivery.done for delivery in deliveries), return_exceptions=True
    )
    assert outcomes[:2] == [None, None]
    assert outcomes[3:] == [None, None, None]
    assert isinstance(outcomes[2], PermanentMessageError)
    assert outcomes[2].reason == "merge_cycle"
    assert await env.pool.fetchval("SELECT count(*) FROM visits") == 5
    assert await env.pool.fetchval("SELECT count(*) FROM processed_messages") == 5
