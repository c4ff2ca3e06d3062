"""The AMQP connection each service holds, with confirmed, persistent publishes.

The connection is a plain aio-pika connection that this module reopens itself:
`maintain()` reconnects with backoff whenever it closes and then runs the
registered on-connect callbacks, which is where consumers subscribe again.
Keeping reconnection here, rather than in aio-pika's robust classes, makes the
behaviour after an outage explicit and testable.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import aio_pika
import aiormq
import structlog
from aio_pika.abc import AbstractChannel, AbstractConnection

from coggo.topology import Topology

log = structlog.get_logger(__name__)

PUBLISH_TIMEOUT_SECONDS = 10.0
CONNECT_TIMEOUT_SECONDS = 10.0
MAX_BACKOFF_SECONDS = 5.0

OnConnect = Callable[[AbstractConnection], Awaitable[None]]


class BrokerUnavailable(ConnectionError):
    pass


@dataclass(frozen=True)
class OutgoingMessage:
    """One message for `Broker.publish_many`."""

    exchange: str
    routing_key: str
    body: bytes
    message_id: str
    headers: dict[str, Any] | None = None
    mandatory: bool = True


class Broker:
    """One connection to RabbitMQ that declares the topology each time it opens.

    Publishes are persistent and mandatory (unless `mandatory=False`) on a channel
    with publisher confirms that raises on returns, so a publish that returns
    without error was routed to a queue and accepted by the broker.
    """

    def __init__(self, url: str, topology: Topology, *, name: str) -> None:
        self.url = url
        self.topology = topology
        self.name = name
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self._lock = asyncio.Lock()
        self._closed = asyncio.Event()
        self._closed.set()
        self._on_connect: list[OnConnect] = []
        self._stopping = False

    @property
    def connected(self) -> bool:
        return (
            self._connection is not None
            and not self._connection.is_closed
            and self._channel is not None
            and not self._channel.is_closed
        )

    async def add_on_connect(self, callback: OnConnect) -> None:
        """Run `callback` after every (re)connection, and now if already connected."""
        self._on_connect.append(callback)
        if self.connected:
            assert self._connection is not None
            await callback(self._connection)

    async def connect(self, *, attempts: int | None = None) -> None:
        """Connect, retrying with backoff; `attempts=None` retries until it succeeds."""
        delay = 0.2
        attempt = 0
        while not self.connected:
            attempt += 1
            try:
                await self._open()
            except (OSError, aio_pika.exceptions.AMQPError, TimeoutError) as exc:
                if attempts is not None and attempt >= attempts:
                    raise BrokerUnavailable(f"cannot reach RabbitMQ: {exc!r}") from exc
                log.warning(
                    "broker.connect_failed",
                    attempt=attempt,
                    retry_in=round(delay, 2),
                    error=repr(exc),
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_BACKOFF_SECONDS)

    async def maintain(self) -> None:
        """Keep the connection open until `close()`; run this as a task."""
        while not self._stopping:
            await self.connect()
            await self._closed.wait()
            if not self._stopping:
                log.warning("broker.connection_lost")

    async def _open(self) -> None:
        async with self._lock:
            if self.connected:
                return
            await self._discard()
            connection = await aio_pika.connect(
                self.url,
                timeout=CONNECT_TIMEOUT_SECONDS,
                client_properties={"connection_name": self.name},
            )
            try:
                channel = await connection.channel(
                    publisher_confirms=True, on_return_raises=True
                )
                await self.topology.declare(channel)
                for callback in self._on_connect:
                    await callback(connection)
            except BaseException:
                await connection.close()
                raise
            self._connection = connection
            self._channel = channel
            self._closed.clear()
            connection.close_callbacks.add(self._connection_closed)
            log.info("broker.connected")

    def _connection_closed(self, *_args: Any) -> None:
        self._closed.set()

    async def _discard(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None and not connection.is_closed:
            with contextlib.suppress(Exception):
                await connection.close()
        self._closed.set()

    async def channel(self, *, prefetch: int | None = None) -> AbstractChannel:
        """Open a new channel on the current connection, for a consumer."""
        if not self.connected:
            await self.connect(attempts=1)
        assert self._connection is not None
        channel = await self._connection.channel()
        if prefetch is not None:
            await channel.set_qos(prefetch_count=prefetch)
        return channel

    async def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        *,
        message_id: str,
        headers: dict[str, Any] | None = None,
        correlation_id: str | None = None,
        reply_to: str | None = None,
        mandatory: bool = True,
    ) -> None:
        """Publish one persistent JSON message and wait for the broker's confirm."""
        if not self.connected:
            await self.connect(attempts=1)
        assert self._channel is not None
        message = aio_pika.Message(
            body,
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=message_id,
            headers=headers or {},
            correlation_id=correlation_id,
            reply_to=reply_to,
        )
        try:
            target = await self._channel.get_exchange(exchange, ensure=False)
            await target.publish(
                message,
                routing_key=routing_key,
                mandatory=mandatory,
                timeout=PUBLISH_TIMEOUT_SECONDS,
            )
        except (
            aio_pika.exceptions.ChannelInvalidStateError,
            ConnectionError,
            TimeoutError,
        ):
            # The link is gone or stuck: drop it so the next publish reconnects.
            async with self._lock:
                await self._discard()
            raise

    async def publish_many(self, messages: Sequence[OutgoingMessage]) -> None:
        """Publish persistent JSON messages and wait until the broker confirmed all.

        Behaves like `publish` for each message, with less work per message:
        it publishes on the channel's aiormq channel directly and does not
        wait for each frame to reach the socket, only for the confirms. Raises
        the first error if any message was not confirmed.
        """
        if not messages:
            return
        if not self.connected:
            await self.connect(attempts=1)
        assert self._channel is not None
        try:
            # `wait` is a parameter of aiormq's Channel, not of its abstract class.
            channel = cast(aiormq.Channel, await self._channel.get_underlay_channel())
            results = await asyncio.gather(
                *(
                    channel.basic_publish(
                        message.body,
                        exchange=message.exchange,
                        routing_key=message.routing_key,
                        properties=aiormq.spec.Basic.Properties(
                            content_type="application/json",
                            delivery_mode=aio_pika.DeliveryMode.PERSISTENT.value,
                            message_id=message.message_id,
                            headers=message.headers or {},
                        ),
                        mandatory=message.mandatory,
                        timeout=PUBLISH_TIMEOUT_SECONDS,
                        wait=False,
                    )
                    for message in messages
                ),
                return_exceptions=True,
            )
            for result in results:
                if isinstance(result, BaseException):
                    raise result
        except (
            aio_pika.exceptions.ChannelInvalidStateError,
            ConnectionError,
            TimeoutError,
        ):
            # The link is gone or stuck: drop it so the next publish reconnects.
            async with self._lock:
                await self._discard()
            raise

    async def close(self) -> None:
        self._stopping = True
        async with self._lock:
            await self._discard()
