"""Reading, replaying and purging one dead-letter queue.

Reading: messages are taken with basic.get without acknowledgement, one at a
time, up to the number the queue contained when the command started, so messages
that die again during a replay are not read a second time. Every message not
chosen stays unacknowledged until the end and is then returned with
basic.nack(requeue=True), in the order it was read, which keeps the queue's
order. If the process dies, the broker returns them when the connection drops.
Messages that another client keeps unacknowledged are not seen.

Replaying: the copy is published persistent and mandatory on a channel with
publisher confirms, and the dead letter is acknowledged only after the broker
confirmed the copy. A crash at any moment leaves each message in the
dead-letter queue, in its work queue, or in both, never in neither.

Each read counts as a delivery on RabbitMQ 4.0 to 4.2, which is why the
topology declares the dead-letter queues with a delivery limit of one million.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import aio_pika
import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractIncomingMessage,
    AbstractQueue,
)
from coggo.topology import QueueSpec
from pamqp.commands import Basic

from coggo_dlq.letters import DeadLetter

log = structlog.get_logger(__name__)

CONFIRM_TIMEOUT_SECONDS = 10.0
# Copies published and not yet confirmed at one time during a replay.
REPLAY_WINDOW = 64

Selector = Callable[[DeadLetter], bool]


class DeadLetterQueueMissing(Exception):
    """The dead-letter queue does not exist on the broker."""


@dataclass
class Outcome:
    """The result of a replay or purge, message by message."""

    scanned: int = 0
    selected: list[DeadLetter] = field(default_factory=list)
    done: list[DeadLetter] = field(default_factory=list)
    failed: list[tuple[DeadLetter, str]] = field(default_factory=list)


class DeadLetterQueue:
    """One `<queue>.dlq` on an open connection."""

    def __init__(self, connection: AbstractConnection, spec: QueueSpec) -> None:
        self.connection = connection
        self.spec = spec
        self.name = spec.dead_letter_queue

    async def count(self) -> int:
        """Return how many messages are ready in the queue."""
        channel = await self.connection.channel()
        try:
            queue = await self._open(channel)
            return queue.declaration_result.message_count or 0
        finally:
            await _close(channel)

    async def _open(self, channel: AbstractChannel) -> AbstractQueue:
        try:
            return await channel.declare_queue(self.name, passive=True)
        except aio_pika.exceptions.ChannelNotFoundEntity:
            raise DeadLetterQueueMissing(
                f"queue {self.name} does not exist: start the service that owns "
                f"{self.spec.name} once so it declares the topology, or check "
                "COGGO_TOPOLOGY_PREFIX"
            ) from None

    @contextlib.asynccontextmanager
    async def reading(
        self, limit: int | None = None
    ) -> AsyncIterator[AsyncIterator[DeadLetter]]:
        """Yield the queue's messages; those not acknowledged are returned at the end."""
        channel = await self.connection.channel()
        unsettled: list[AbstractIncomingMessage] = []
        try:
            queue = await self._open(channel)
            available = queue.declaration_result.message_count or 0
            if limit is not None:
                available = min(available, limit)

            async def letters() -> AsyncIterator[DeadLetter]:
                for _ in range(available):
                    message = await queue.get(no_ack=False, fail=False)
                    if message is None:
                        return
                    unsettled.append(message)
                    yield DeadLetter.from_message(message, self.spec.name)

            yield letters()
        finally:
            await self._return_unsettled(channel, unsettled)

    async def _return_unsettled(
        self, channel: AbstractChannel, unsettled: list[AbstractIncomingMessage]
    ) -> None:
        # basic.nack with requeue, not a channel close: RabbitMQ 4.3 does not
        # count a requeue by nack towards the delivery limit, but does count a
        # return on channel close.
        with contextlib.suppress(Exception):
            for message in unsettled:
                if not message.processed:
                    await message.nack(requeue=True)
        await _close(channel)

    async def find(self, message_id: str) -> DeadLetter | None:
        """Return the first message with this id, leaving the queue as it was."""
        async with self.reading() as letters:
            async for letter in letters:
                if letter.message_id == message_id:
                    return letter
        return None

    async def replay(
        self,
        select: Selector,
        *,
        dry_run: bool,
        limit: int | None = None,
        rate: float | None = None,
    ) -> Outcome:
        """Publish a copy of each chosen message to where it came from, then ack it."""
        outcome = Outcome()
        publisher = _Publisher(self.connection)
        window = asyncio.Semaphore(REPLAY_WINDOW)
        started = time.monotonic()
        tasks: set[asyncio.Task[None]] = set()

        def fail(letter: DeadLetter, error: str) -> None:
            outcome.failed.append((letter, error))
            log.warning(
                "dlq.replay_failed",
                queue=self.name,
                message_id=letter.message_id,
                error=error,
            )

        async def replay_one(letter: DeadLetter) -> None:
            try:
                await publisher.publish(letter)
            except Exception as exc:
                fail(letter, _describe_error(exc))
                return
            finally:
                window.release()
            # The broker confirmed the copy; only now may the dead letter go.
            try:
                await letter.message.ack()
            except Exception as exc:
                fail(
                    letter,
                    f"the copy was published but the dead letter could not be "
                    f"acknowledged ({_describe_error(exc)}); it is now in both queues",
                )
                return
            outcome.done.append(letter)

        async with self.reading() as letters:
            try:
                async for letter in letters:
                    outcome.scanned += 1
                    if not select(letter):
                        continue
                    if limit is not None and len(outcome.selected) >= limit:
                        break
                    outcome.selected.append(letter)
                    if dry_run:
                        continue
                    problem = await publisher.check_target(letter)
                    if problem is not None:
                        fail(letter, problem)
                        continue
                    if rate:
                        await _pace(started, len(outcome.selected), rate)
                    await window.acquire()
                    task = asyncio.create_task(replay_one(letter))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
            finally:
                # Every copy in flight is confirmed or failed before the
                # messages still unsettled are returned to the queue.
                if tasks:
                    await asyncio.gather(*tasks, return_exceptions=True)
                await publisher.close()
        return outcome

    async def purge(
        self, select: Selector, *, dry_run: bool, limit: int | None = None
    ) -> Outcome:
        """Acknowledge, and so delete, each chosen message."""
        outcome = Outcome()
        async with self.reading() as letters:
            async for letter in letters:
                outcome.scanned += 1
                if not select(letter):
                    continue
                if limit is not None and len(outcome.selected) >= limit:
                    break
                outcome.selected.append(letter)
                if not dry_run:
                    await letter.message.ack()
                    outcome.done.append(letter)
        return outcome


class _Publisher:
    """A confirming, mandatory publisher that reopens its channel after an error."""

    def __init__(self, connection: AbstractConnection) -> None:
        self.connection = connection
        self._channel: AbstractChannel | None = None
        self._lock = asyncio.Lock()
        self._exchanges: dict[str, str | None] = {}

    async def _ready_channel(self) -> AbstractChannel:
        async with self._lock:
            if self._channel is None or self._channel.is_closed:
                self._channel = await self.connection.channel(
                    publisher_confirms=True, on_return_raises=True
                )
            return self._channel

    async def check_target(self, letter: DeadLetter) -> str | None:
        """Return why the message cannot be replayed, or None when it can."""
        if letter.exchange is None or letter.routing_key is None:
            return (
                "the message names no exchange and routing key to return to "
                "(no x-coggo-original-* headers and no x-death entry)"
            )
        if letter.exchange == "":
            return None
        if letter.exchange not in self._exchanges:
            self._exchanges[letter.exchange] = await self._exchange_problem(
                letter.exchange
            )
        return self._exchanges[letter.exchange]

    async def _exchange_problem(self, name: str) -> str | None:
        # A passive declare of a missing exchange closes its channel, so it
        # runs on a channel of its own.
        channel = await self.connection.channel()
        try:
            await channel.declare_exchange(name, passive=True)
        except aio_pika.exceptions.ChannelNotFoundEntity:
            return f"exchange {name} does not exist"
        finally:
            await _close(channel)
        return None

    async def publish(self, letter: DeadLetter) -> None:
        source = letter.message
        copy = aio_pika.Message(
            source.body,
            headers=letter.replay_headers(),
            content_type=source.content_type,
            content_encoding=source.content_encoding,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            priority=source.priority,
            correlation_id=source.correlation_id,
            reply_to=source.reply_to,
            message_id=source.message_id,
            timestamp=source.timestamp,
            type=source.type,
            app_id=source.app_id,
        )
        # Not copied: `expiration`, which would let the copy expire again, and
        # `user_id`, which the broker requires to equal this connection's user.
        channel = await self._ready_channel()
        exchange = (
            channel.default_exchange
            if letter.exchange == ""
            else await channel.get_exchange(letter.exchange or "", ensure=False)
        )
        await exchange.publish(
            copy,
            routing_key=letter.routing_key or "",
            mandatory=True,
            timeout=CONFIRM_TIMEOUT_SECONDS,
        )

    async def close(self) -> None:
        if self._channel is not None:
            await _close(self._channel)


async def _pace(started: float, count: int, rate: float) -> None:
    due = started + (count - 1) / rate
    delay = due - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


def _describe_error(exc: BaseException) -> str:
    if isinstance(exc, aio_pika.exceptions.DeliveryError):
        frame = exc.frame
        if isinstance(frame, Basic.Return):
            return (
                f"unroutable: no queue is bound for routing key {frame.routing_key} "
                f"on exchange {frame.exchange} (broker returned {frame.reply_text})"
            )
        return "the broker refused the copy (negative confirm)"
    if isinstance(exc, TimeoutError):
        return f"no confirm from the broker within {CONFIRM_TIMEOUT_SECONDS:g} s"
    return f"{type(exc).__name__}: {exc}"


async def _close(channel: AbstractChannel) -> None:
    if not channel.is_closed:
        with contextlib.suppress(Exception):
            await channel.close()
