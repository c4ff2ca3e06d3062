"""Accepting one webhook event: parse, validate, store durably, deduplicate."""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson
from coggo.errors import (
    BadRequest,
    EventIdReused,
    PatientRequired,
    ServiceUnavailable,
    ValidationFailed,
)
from coggo.schemas.bus import WebhookMessage
from coggo.schemas.partner import (
    EventType,
    MissingPatient,
    WebhookEvent,
    parse_event_data,
)
from coggo.topology import Topology
from coggo.validation import describe_validation_error
from pydantic import ValidationError

# One statement, so one round trip: the event row (the idempotency key) and its
# outbox row commit together or not at all.
_STORE = """
WITH event AS (
    INSERT INTO inbound_events (id, clinic_id, event_id, event_type, content_hash)
    VALUES ($1, $2, $3, $4, $5)
    ON CONFLICT (clinic_id, event_id) DO NOTHING
    RETURNING id
)
INSERT INTO outbox (exchange, routing_key, message_id, body)
SELECT $6, $4, $1::text, $7 FROM event
RETURNING id
"""

_EXISTING_HASH = """
SELECT content_hash FROM inbound_events WHERE clinic_id = $1 AND event_id = $2
"""


@dataclass(frozen=True)
class Accepted:
    event: WebhookEvent
    message_id: str
    duplicate: bool


def decode_body(body: bytes) -> dict[str, Any]:
    """Decode the raw body into a JSON object, with an error naming the fault."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest(
            f"body is not valid UTF-8 (invalid byte at offset {exc.start}): "
            "send the event as UTF-8 JSON"
        ) from None
    if not text.strip():
        raise BadRequest("body is empty: send the event as a JSON object")
    try:
        parsed = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"body is not valid JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise BadRequest(
            f"body must be a JSON object, not a JSON {type(parsed).__name__}"
        )
    return parsed


def validate_event(payload: dict[str, Any]) -> WebhookEvent:
    """Check the event against WebhookEvent and the rules of its type."""
    try:
        event = WebhookEvent.model_validate(payload)
    except ValidationError as exc:
        raise ValidationFailed(describe_validation_error(exc)) from None
    try:
        parse_event_data(EventType(event.type), event.data)
    except MissingPatient as exc:
        raise PatientRequired(str(exc)) from None
    except ValidationError as exc:
        raise ValidationFailed(describe_validation_error(exc, "data")) from None
    return event


def _canonical(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {key: _canonical(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_canonical(item) for item in value]
    return value


def content_hash(payload: dict[str, Any]) -> bytes:
    """Hash the parsed JSON, so key order, spacing and 1 versus 1.0 do not matter."""
    canonical = orjson.dumps(_canonical(payload), option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(canonical).digest()


async def store_event(
    pool: asyncpg.Pool,
    topology: Topology,
    clinic_id: str,
    payload: dict[str, Any],
    event: WebhookEvent,
) -> Accepted:
    """Store the event and its outbox row, or recognise a repeat of it."""
    digest = content_hash(payload)
    message = WebhookMessage(
        id=str(uuid.uuid4()),
        type=event.type.value,
        occurred_at=event.occurred_at,
        clinic_id=clinic_id,
        event_id=event.id,
        data=event.data,
    )
    inserted = await pool.fetchval(
        _STORE,
        uuid.UUID(message.id),
        clinic_id,
        event.id,
        event.type.value,
        digest,
        topology.webhooks,
        message.to_bytes(),
    )
    if inserted is not None:
        return Accepted(event, message.id, duplicate=False)

    # A conflicting insert waited for the first writer to commit, so the row is visible.
    existing = await pool.fetchval(_EXISTING_HASH, clinic_id, event.id)
    if existing is None:
        raise ServiceUnavailable(
            f"event id {event.id!r} could not be stored or found; retry the request"
        )
    if bytes(existing) != digest:
        raise EventIdReused(
            f"event id {event.id!r} was already received with different content: "
            "give every distinct event a new id"
        )
    return Accepted(event, message.id, duplicate=True)
