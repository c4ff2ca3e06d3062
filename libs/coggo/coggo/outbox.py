"""Transactional outbox: messages written with the change they announce.

Writers insert a row in the same transaction as their change. The relay
publishes pending rows with publisher confirms and deletes them only after the
broker confirmed, so a crash or a broker outage at any point leads to a
republish, never to a loss. Consumers drop the resulting duplicates by
`message_id`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any

import asyncpg
import orjson
import structlog

from coggo import metrics
from coggo.broker import Broker, OutgoingMessage
from coggo.schemas.bus import DomainEvent

log = structlog.get_logger(__name__)

SHUTDOWN_DRAIN_SECONDS = 5.0

INSERT_SQL = """
INSERT INTO outbox (exchange, routing_key, message_id, body, headers, mandatory)
VALUES ($1, $2, $3, $4, $5::text::jsonb, $6)
"""


async def enqueue(
    connection: asyncpg.Connection,
    exchange: str,
    routing_key: str,
    message_id: str,
    body: bytes,
    headers: dict[str, Any] | None = None,
    *,
    mandatory: bool = True,
) -> None:
    """Add one message to the outbox inside the caller's transaction."""
    await connection.execute(
        INSERT_SQL,
        exchange,
        routing_key,
        message_id,
        body,
        orjson.dumps(headers or {}).decode(),
        mandatory,
    )


async def enqueue_events(
    connection: asyncpg.Connection, exchange: str, events: Sequence[DomainEvent]
) -> None:
    """Add domain events to the outbox; they may find no queue bound."""
    if events:
        await connection.executemany(
            INSERT_SQL,
            [
                (exchange, event.type, event.id, event.to_bytes(), "{}", False)
                for event in events
            ],
        )


class OutboxRelay:
    """Publishes outbox rows; every replica runs one, sharing rows by row locks."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        broker: Broker,
        *,
        batch_size: int = 500,
        poll_interval: float = 1.0,
    ) -> None:
        self.pool = pool
        self.broker = broker
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self._wake = asyncio.Event()
        self._stopping = False
        self.published = 0

    def notify(self) -> None:
        """Wake the relay because a row was just committed."""
        self._wake.set()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()

    async def run(self) -> None:
        failures = 0
        while not self._stopping:
            # Cleared before the drain, so a notify() during it is not lost.
            self._wake.clear()
            try:
                count = await self.drain_once()
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                delay = min(0.2 * 2 ** min(failures, 5), 5.0)
                log.warning(
                    "outbox.publish_failed",
                    attempt=failures,
                    retry_in=delay,
                    error=repr(exc),
                )
                await asyncio.sleep(delay)
                continue
            if count >= self.batch_size:
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_interval)
        # Publish what was written just before the stop; what fails here waits
        # in the outbox for any other replica, or for the next start.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.drain_once(), SHUTDOWN_DRAIN_SECONDS)

    async def drain_once(self) -> int:
        """Publish one batch of pending rows; return how many were published."""
        await metrics.sample_outbox_backlog(self.pool)
        async with self.pool.acquire() as connection, connection.transaction():
            # SKIP LOCKED lets several replicas drain side by side; a row stays
            # locked until its publish is confirmed and the row deleted.
            rows = await connection.fetch(
                """
                SELECT id, exchange, routing_key, message_id, body, headers, mandatory
                FROM outbox ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED
                """,
                self.batch_size,
            )
            if not rows:
                return 0
            await self.broker.publish_many(
                [
                    OutgoingMessage(
                        row["exchange"],
                        row["routing_key"],
                        row["body"],
                        message_id=row["message_id"],
                        headers=row["headers"],
                        mandatory=row["mandatory"],
                    )
                    for row in rows
                ]
            )
            await connection.execute(
                "DELETE FROM outbox WHERE id = ANY($1::bigint[])",
                [row["id"] for row in rows],
            )
        self.published += len(rows)
        metrics.OUTBOX_PUBLISHED.inc(len(rows))
        log.debug("outbox.published", count=len(rows))
        return len(rows)
