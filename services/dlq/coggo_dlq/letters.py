"""The history a dead letter carries in its headers: why it died, how often, and where from.

Two mechanisms put messages in `<queue>.dlq`, and their headers differ:

- A consumer (coggo.consumer.Consumer) publishes a message it can never process
  to the dead-letter exchange itself, with `x-coggo-reason`, the exchange and
  routing key it was received from, and its own death count and times.
- The broker dead-letters a message that was rejected without requeue
  (`rejected`), exceeded the queue's delivery limit (`delivery_limit`), expired
  or overflowed, and records that in `x-death`, newest entry first.

A message that was replayed and died again may carry both. A dead letter
leaves its queue only by a replay (or a purge), so between two replays a
message dies once. Its current reason is therefore the consumer's when the
consumer's death count grew since the last replay, and the broker's otherwise.
The replay records that count in `x-coggo-replayed-death-count`, so no clocks
are compared.

RabbitMQ 3.x keeps the x-death entries a replayed copy carries and adds to
them; RabbitMQ 4 replaces them with its own (x-headers belong to the broker).
So the death count is at least the number of replays plus one, and the first
death time is carried in `x-coggo-first-death-at` once a message is replayed.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from aio_pika.abc import AbstractIncomingMessage
from coggo import topology
from coggo.consumer import DEATH_COUNT_HEADER, FIRST_DEATH_HEADER

# Per-delivery counters the broker adds when a quorum queue delivers a message.
# They describe reads of the dead-letter queue, not the message, so a replayed
# copy leaves them out.
DELIVERY_HEADERS = frozenset({"x-delivery-count", "x-acquired-count"})

# The consumer death count of a message when it was last replayed.
REPLAYED_DEATH_COUNT_HEADER = "x-coggo-replayed-death-count"


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, str):
        return value
    return None


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _time(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, int) and not isinstance(value, bool):
        return datetime.fromtimestamp(value, UTC)
    return None


@dataclass(frozen=True)
class DeadLetter:
    """One message read from a dead-letter queue, with what its headers tell."""

    message: AbstractIncomingMessage
    message_id: str | None
    event_type: str | None
    clinic_id: str | None
    reason: str
    death_count: int
    first_death_at: datetime | None
    replay_count: int
    exchange: str | None
    routing_key: str | None
    reads: int

    @classmethod
    def from_message(
        cls, message: AbstractIncomingMessage, work_queue: str
    ) -> DeadLetter:
        headers: dict[str, Any] = dict(message.headers or {})
        raw_deaths = headers.get("x-death")
        deaths = [
            entry
            for entry in (raw_deaths if isinstance(raw_deaths, list) else [])
            if isinstance(entry, dict)
        ]
        event_type, clinic_id = _body_fields(message.body)
        exchange, routing_key = _origin(headers, deaths, work_queue)
        first_times = [_time(entry.get("time")) for entry in deaths]
        first_times.append(_time(headers.get(FIRST_DEATH_HEADER)))
        known_times = [moment for moment in first_times if moment is not None]
        return cls(
            message=message,
            message_id=message.message_id,
            event_type=event_type,
            clinic_id=clinic_id,
            reason=_reason(headers, deaths),
            death_count=_death_count(headers, deaths),
            first_death_at=min(known_times) if known_times else None,
            replay_count=_count(headers.get(topology.REPLAY_COUNT_HEADER)),
            exchange=exchange,
            routing_key=routing_key,
            reads=_count(headers.get("x-delivery-count")),
        )

    def summary(self) -> dict[str, Any]:
        """Return the fields `list` prints, as JSON-ready values."""
        return {
            "messageId": self.message_id,
            "type": self.event_type,
            "clinicId": self.clinic_id,
            "reason": self.reason,
            "deathCount": self.death_count,
            "firstDeathAt": (
                None if self.first_death_at is None else self.first_death_at.isoformat()
            ),
            "replayCount": self.replay_count,
            "exchange": self.exchange,
            "routingKey": self.routing_key,
        }

    def replay_headers(self) -> dict[str, Any]:
        """Return the headers of the replayed copy: all of them, one replay more."""
        headers = {
            name: value
            for name, value in (self.message.headers or {}).items()
            if name not in DELIVERY_HEADERS
        }
        headers[topology.REPLAY_COUNT_HEADER] = self.replay_count + 1
        headers[REPLAYED_DEATH_COUNT_HEADER] = _consumer_deaths(headers)
        if self.first_death_at is not None:
            headers.setdefault(FIRST_DEATH_HEADER, int(self.first_death_at.timestamp()))
        return headers

    def matches(
        self,
        *,
        message_id: str | None = None,
        event_type: str | None = None,
        clinic_id: str | None = None,
        reason: str | None = None,
    ) -> bool:
        """Return True when every given filter equals this letter's value."""
        filters = (
            (message_id, self.message_id),
            (event_type, self.event_type),
            (clinic_id, self.clinic_id),
            (reason, self.reason),
        )
        return all(value is None or value == actual for value, actual in filters)


def _body_fields(body: bytes) -> tuple[str | None, str | None]:
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None, None
    if not isinstance(parsed, dict):
        return None, None
    return _text(parsed.get("type")), _text(parsed.get("clinicId"))


def _consumer_deaths(headers: dict[str, Any]) -> int:
    count = _count(headers.get(DEATH_COUNT_HEADER))
    # A consumer dead letter from before the count header existed.
    if count == 0 and topology.REASON_HEADER in headers:
        return 1
    return count


def _reason(headers: dict[str, Any], deaths: list[dict[str, Any]]) -> str:
    ours = _text(headers.get(topology.REASON_HEADER))
    broker = _text(deaths[0].get("reason")) if deaths else None
    at_replay = _count(headers.get(REPLAYED_DEATH_COUNT_HEADER))
    if ours is not None and _consumer_deaths(headers) > at_replay:
        return ours
    return broker or ours or "unknown"


def _death_count(headers: dict[str, Any], deaths: list[dict[str, Any]]) -> int:
    counted = sum(_count(entry.get("count")) for entry in deaths)
    counted += _consumer_deaths(headers)
    replays = _count(headers.get(topology.REPLAY_COUNT_HEADER))
    return max(counted, replays + 1)


def _origin(
    headers: dict[str, Any], deaths: list[dict[str, Any]], work_queue: str
) -> tuple[str | None, str | None]:
    exchange = _text(headers.get(topology.ORIGINAL_EXCHANGE_HEADER))
    routing_key = _text(headers.get(topology.ORIGINAL_ROUTING_KEY_HEADER))
    if exchange is not None and routing_key is not None:
        return exchange, routing_key
    # The broker's entry for the work queue names the exchange and routing keys
    # the message was published with before it died there.
    entries = [entry for entry in deaths if _text(entry.get("queue")) == work_queue]
    for entry in entries or deaths:
        keys = entry.get("routing-keys") or []
        if keys:
            return _text(entry.get("exchange")), _text(keys[0])
    return None, None


def describe_body(body: bytes) -> Any:
    """Return the body as parsed JSON, or as text when it is not JSON."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return body.decode("utf-8", "replace")


def plain_headers(headers: dict[str, Any]) -> dict[str, Any]:
    """Convert header values (times, bytes, nested tables) to JSON-ready values."""
    return {name: _plain(value) for name, value in headers.items()}


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value
