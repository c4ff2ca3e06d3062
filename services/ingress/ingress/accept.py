"""Accepting one webhook event: parse, validate, store durably, deduplicate."""

from __future__ import annotations

import enum
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
from coggo.validation import describe_validation_error
from pydantic import ValidationError

# One statement, so one round trip, for a whole batch of events: the event
# rows (the idempotency keys) and their outbox rows commit together or not at
# all. Rows are inserted in key order, so two batches that share a key wait
# for each other instead of deadlocking. The outbox INSERT runs even though
# the final SELECT does not read it, as every data-modifying WITH does.
_STORE = """
WITH incoming AS (
    SELECT * FROM unnest(
        $1::uuid[], $2::text[], $3::text[], $4::text[], $5::bytea[], $6::bytea[]
    ) AS t (id, clinic_id, event_id, event_type, content_hash, body)
),
event AS (
    INSERT INTO inbound_events (id, clinic_id, event_id, event_type, content_hash)
    SELECT id, clinic_id, event_id, event_type, content_hash
    FROM incoming ORDER BY clinic_id, event_id
    ON CONFLICT (clinic_id, event_id) DO NOTHING
    RETURNING id
),
queued AS (
    INSERT INTO outbox (exchange, routing_key, message_id, body)
    SELECT $7, incoming.event_type, incoming.id::text, incoming.body
    FROM incoming JOIN event ON event.id = incoming.id
)
SELECT id FROM event
"""

_EXISTING_HASHES = """
SELECT e.clinic_id, e.event_id, e.content_hash
FROM unnest($1::text[], $2::text[]) AS k (clinic_id, event_id)
JOIN inbound_events e ON e.clinic_id = k.clinic_id AND e.event_id = k.event_id
"""

# Errors that one event of a batch can cause (invalid text such as a NUL
# character, a deadlock); the batch is then stored again one event at a time.
STORE_ISOLATE = (
    asyncpg.DataError,
    asyncpg.IntegrityConstraintViolationError,
    asyncpg.TransactionRollbackError,
)


class StoreOutcome(enum.Enum):
    STORED = "stored"
    DUPLICATE = "duplicate"
    ID_REUSED = "id_reused"
    NOT_FOUND = "not_found"


@dataclass(frozen=True)
class EventRecord:
    """One event ready to store: its idempotency key, content hash and bus message."""

    message_id: uuid.UUID
    clinic_id: str
    event_id: str
    event_type: str
    digest: bytes
    body: bytes


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


def _nul_path(value: Any, path: str) -> str | None:
    """Return the path of the first key or string holding a NUL character."""
    if isinstance(value, str):
        return path if "\x00" in value else None
    if isinstance(value, dict):
        for key, item in value.items():
            child = f"{path}.{key}" if path else key
            if "\x00" in key:
                return child
            found = _nul_path(item, child)
            if found is not None:
                return found
    if isinstance(value, list):
        for index, item in enumerate(value):
            found = _nul_path(item, f"{path}[{index}]")
            if found is not None:
                return found
    return None


def validate_event(payload: dict[str, Any], body: bytes) -> WebhookEvent:
    """Check the event against WebhookEvent and the rules of its type."""
    # JSON escapes NUL as \u0000, and PostgreSQL text cannot store it.
    if b"\\u0000" in body:
        path = _nul_path(payload, "")
        if path is not None:
            raise ValidationFailed(
                f"{path or 'body'}: contains a NUL character (\\u0000), which "
                "PostgreSQL cannot store; remove it"
            )
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


def prepare_record(
    clinic_id: str, payload: dict[str, Any], event: WebhookEvent
) -> EventRecord:
    """Build the bus message of an accepted event and the keys to store it under."""
    message = WebhookMessage(
        id=str(uuid.uuid4()),
        type=event.type.value,
        occurred_at=event.occurred_at,
        clinic_id=clinic_id,
        event_id=event.id,
        data=event.data,
    )
    return EventRecord(
        message_id=uuid.UUID(message.id),
        clinic_id=clinic_id,
        event_id=event.id,
        event_type=event.type.value,
        digest=content_hash(payload),
        body=message.to_bytes(),
    )


async def store_events(
    pool: asyncpg.Pool, exchange: str, records: list[EventRecord]
) -> list[StoreOutcome]:
    """Store events with their outbox rows, or recognise repeats; one outcome each."""
    async with pool.acquire() as connection:
        inserted = {
            row["id"]
            for row in await connection.fetch(
                _STORE,
                [record.message_id for record in records],
                [record.clinic_id for record in records],
                [record.event_id for record in records],
                [record.event_type for record in records],
                [record.digest for record in records],
                [record.body for record in records],
                exchange,
            )
        }
        repeats = [record for record in records if record.message_id not in inserted]
        existing: dict[tuple[str, str], bytes] = {}
        if repeats:
            # A conflicting insert waited for the first writer to commit, so
            # the row is visible to this new statement.
            rows = await connection.fetch(
                _EXISTING_HASHES,
                [record.clinic_id for record in repeats],
                [record.event_id for record in repeats],
            )
            existing = {
                (row["clinic_id"], row["event_id"]): bytes(row["content_hash"])
                for row in rows
            }
    return [_outcome(record, inserted, existing) for record in records]


def _outcome(
    record: EventRecord,
    inserted: set[uuid.UUID],
    existing: dict[tuple[str, str], bytes],
) -> StoreOutcome:
    if record.message_id in inserted:
        return StoreOutcome.STORED
    digest = existing.get((record.clinic_id, record.event_id))
    if digest is None:
        return StoreOutcome.NOT_FOUND
    if digest != record.digest:
        return StoreOutcome.ID_REUSED
    return StoreOutcome.DUPLICATE


def accepted(record: EventRecord, outcome: StoreOutcome) -> bool:
    """Return whether the event is a duplicate, or raise the error of its outcome."""
    if outcome is StoreOutcome.NOT_FOUND:
        raise ServiceUnavailable(
            f"event id {record.event_id!r} could not be stored or found; retry the request"
        )
    if outcome is StoreOutcome.ID_REUSED:
        raise EventIdReused(
            f"event id {record.event_id!r} was already received with different content: "
            "give every distinct event a new id"
        )
    return outcome is StoreOutcome.DUPLICATE
