"""Running a queue consumer: decode, process, retry, dead-letter, acknowledge.

A handler raises PermanentMessageError for a message that can never succeed;
the message is then published to the dead-letter exchange with the reason in
`x-coggo-reason`, and acknowledged only after the broker confirmed that copy.
Transient faults (database or broker unreachable, serialization conflicts) are
retried in process with backoff; if they persist the message is rejected back
to the queue, which counts towards the queue's delivery limit.

`stop()` is the graceful half of SIGTERM: it cancels the subscription, so the
broker sends nothing more, waits for the messages already received to be
processed and settled, and closes the channel, which returns anything still
unacknowledged to the queue at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika
import asyncpg
import orjson
import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractIncomingMessage,
    AbstractQueue,
)
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

from coggo import metrics, topology
from coggo.broker import Broker
from coggo.errors import PermanentMessageError

log = structlog.get_logger(__name__)

Handler = Callable[[dict[str, Any], AbstractIncomingMessage], Awaitable[None]]

TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.exceptions.SerializationError,
    asyncpg.exceptions.DeadlockDetectedError,
    asyncpg.exceptions.UniqueViolationError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.TooManyConnectionsError,
)


# Headers of our own on a consumer's dead letter, beside those in coggo.topology:
# how many times consumers dead-lettered the message, and when it first died
# (unix seconds). The broker records its own dead-lettering in x-death, which
# RabbitMQ 4 rewrites when a message is published again, so these headers keep
# the history across replays.
DEATH_COUNT_HEADER = "x-coggo-death-count"
FIRST_DEATH_HEADER = "x-coggo-first-death-at"

# Deliveries that arrived before the broker confirmed a cancel may still be on
# their way to the callback. stop() waits this long for them to show up.
SETTLE_SECONDS = 0.05


def _is_transient(exc: BaseException) -> bool:
    return isinstance(exc, TRANSIENT_ERRORS)


class Consumer:
    """Consumes one work queue with a handler."""

    def __init__(
        self,
        broker: Broker,
        queue_name: str,
        handler: Handler,
        *,
        prefetch: int = 64,
        attempts: int = 4,
    ) -> None:
        self.broker = broker
        self.queue_name = queue_name
        self.handler = handler
        self.prefetch = prefetch
        self.attempts = attempts
        self.in_flight = 0
        self.processed = 0
        self.dead_lettered = 0
        self._channel: AbstractChannel | None = None
        self._queue: AbstractQueue | None = None
        self._tag: str | None = None
        self._stopping = False
        self._idle = asyncio.Event()
        self._idle.set()

    async def start(self) -> None:
        """Subscribe now if connected, and again after every reconnection."""
        await self.broker.add_on_connect(self._subscribe)

    async def _subscribe(self, connection: AbstractConnection) -> None:
        # The broker reconnects on its own; after stop() nothing subscribes again.
        if self._stopping:
            return
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=self.prefetch)
        self._channel = channel
        self._queue = await channel.get_queue(self.queue_name, ensure=False)
        self._tag = await self._queue.consume(self._on_message)
        log.info("consumer.started", queue=self.queue_name, prefetch=self.prefetch)

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop taking messages, wait for those in flight, then close the channel."""
        self._stopping = True
        if self._queue is not None and self._tag is not None:
            with contextlib.suppress(Exception):
                await self._queue.cancel(self._tag)
            self._tag = None
        try:
            async with asyncio.timeout(timeout):
                await self._wait_idle()
        except TimeoutError:
            log.warning(
                "consumer.stop_timed_out",
                queue=self.queue_name,
                in_flight=self.in_flight,
            )
        # Closing the channel returns any message still unacknowledged (after a
        # timeout) to the queue now, rather than when the connection closes.
        if self._channel is not None and not self._channel.is_closed:
            with contextlib.suppress(Exception):
                await self._channel.close()
        log.info("consumer.stopped", queue=self.queue_name, processed=self.processed)

    async def _wait_idle(self) -> None:
        while True:
            await self._idle.wait()
            await asyncio.sleep(SETTLE_SECONDS)
            if self._idle.is_set():
                return

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        self.in_flight += 1
        self._idle.clear()
        in_flight = metrics.MESSAGES_IN_FLIGHT.labels(self.queue_name)
        in_flight.inc()
        try:
            await self._process(message)
        except (aio_pika.exceptions.AMQPError, ConnectionError) as exc:
            # The channel closed under us: the broker redelivers the message,
            # and processing it again is a no-op by message id.
            log.warning(
                "message.settle_failed",
                queue=self.queue_name,
                message_id=message.message_id,
                error=repr(exc),
            )
        finally:
            in_flight.dec()
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()

    async def _handle(
        self, body: dict[str, Any], message: AbstractIncomingMessage
    ) -> None:
        """Run the handler, retrying transient faults in process with backoff."""
        try:
            await self.handler(body, message)
            return
        except Exception as exc:
            if not _is_transient(exc) or self.attempts <= 1:
                raise
        # The retrying machinery is built only for the rare message that needs it.
        async for attempt in AsyncRetrying(
            retry=retry_if_exception(_is_transient),
            stop=stop_after_attempt(self.attempts - 1),
            wait=wait_exponential_jitter(multiplier=0.1, max=2.0),
            reraise=True,
        ):
            with attempt:
                await self.handler(body, message)

    async def _process(self, message: AbstractIncomingMessage) -> None:
        try:
            body = orjson.loads(message.body)
            if not isinstance(body, dict):
                raise PermanentMessageError(
                    "malformed", "message body is not a JSON object"
                )
            await self._handle(body, message)
        except orjson.JSONDecodeError:
            await self._dead_letter(
                message, "malformed", "message body is not valid JSON"
            )
            return
        except PermanentMessageError as exc:
            await self._dead_letter(message, exc.reason, exc.detail)
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning(
                "message.requeued",
                queue=self.queue_name,
                message_id=message.message_id,
                error=repr(exc),
            )
            # reject counts towards the delivery limit on every RabbitMQ version.
            await message.reject(requeue=True)
            metrics.MESSAGES_FAILED.labels(self.queue_name).inc()
            return
        await message.ack()
        self.processed += 1
        metrics.MESSAGES_PROCESSED.labels(self.queue_name).inc()

    async def _dead_letter(
        self, message: AbstractIncomingMessage, reason: str, detail: str
    ) -> None:
        headers = dict(message.headers or {})
        headers[topology.REASON_HEADER] = reason
        headers[topology.ERROR_HEADER] = detail[:1000]
        headers[topology.ORIGINAL_EXCHANGE_HEADER] = message.exchange or ""
        headers[topology.ORIGINAL_ROUTING_KEY_HEADER] = message.routing_key or ""
        headers[DEATH_COUNT_HEADER] = _as_int(headers.get(DEATH_COUNT_HEADER)) + 1
        headers.setdefault(FIRST_DEATH_HEADER, int(time.time()))
        await self.broker.publish(
            self.broker.topology.dead_letter,
            self.queue_name,
            message.body,
            message_id=message.message_id or "",
            headers=headers,
            correlation_id=message.correlation_id,
            reply_to=message.reply_to,
        )
        # Acknowledged only now: the dead-letter copy is confirmed by the broker.
        await message.ack()
        self.dead_lettered += 1
        metrics.MESSAGES_DEAD_LETTERED.labels(self.queue_name, reason).inc()
        log.error(
            "message.dead_lettered",
            queue=self.queue_name,
            message_id=message.message_id,
            reason=reason,
            detail=detail[:200],
        )


def _as_int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0
