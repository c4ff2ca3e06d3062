"""The dispatcher: runs due push attempts, records outcomes, dead-letters failures.

Retries are scheduled in PostgreSQL, not in the broker. Each push is a row
with its attempt count and the time its next attempt is due. This loop claims
due rows with FOR UPDATE SKIP LOCKED, so any number of replicas share them.
A `kill -9` between attempts loses nothing, because the schedule is
already committed. A kill during an attempt leaves a lease that runs out,
after which the push is due again, and the interrupted attempt counts as one
of the five. The consumer of coggo.soap-push only records commands and
acknowledges them, so no prefetch slot is held while a PIMS is slow. Attempts
run here as tasks, at most `max_in_flight` per process and
`clinic_max_in_flight` per clinic, so that one clinic whose PIMS hangs does
not delay the others.

Delays in the broker were not chosen because none fits both RabbitMQ 3.10
and 4.x. A message with a per-message TTL can wait behind unexpired ones
until they are consumed or expire (RabbitMQ TTL guide), so a long Retry-After
would hold back shorter delays queued behind it. One queue per fixed delay
cannot honour an arbitrary Retry-After. Quorum queues gain a delivery delay only in RabbitMQ 4.4, and
the delayed-message plugin is unmaintained and keeps delayed messages on one
node without replication (its README).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import aio_pika
import orjson
import structlog
from coggo import metrics as shared_metrics
from coggo import topology
from coggo.broker import Broker
from coggo.consumer import TRANSIENT_ERRORS
from coggo.outbound import OutboundClient
from coggo.outbox import OutboxRelay
from coggo.pipeline.patients import surviving_external_id
from coggo.schemas.bus import SoapPush
from coggo.soap.envelope import build_envelope, encode_envelope

from soap_push import metrics
from soap_push.delivery import (
    AttemptResult,
    TargetCache,
    describe_missing_target,
    post_envelope,
)
from soap_push.options import PushOptions
from soap_push.retry import RetryPolicy
from soap_push.store import ClaimedPush, PushStore

log = structlog.get_logger(__name__)

T = TypeVar("T")

SOAP_PUSH_ROUTING_KEY = "soap.push"
DEAD_LETTER_REASON = "push_failed"
# Headers of our own on the dead-letter copy, besides x-coggo-reason and x-coggo-error.
LAST_STATUS_HEADER = "x-coggo-last-status"
ATTEMPTS_HEADER = "x-coggo-attempts"
# When the dead-letter copy cannot be published, the push is tried again this much later.
DEAD_LETTER_RETRY_SECONDS = 5.0
# Shortest sleep of the loop when a due attempt could not be claimed, e.g.
# because another replica holds its row lock for a moment.
MIN_WAIT_SECONDS = 0.05
# Tries of one database write after an attempt: waits of 0.2, 0.4, 0.8 and 1.6 s.
DATABASE_ATTEMPTS = 5
INTERRUPTED_ERROR = (
    "the last attempt was interrupted before the PIMS responded "
    "(the dispatcher stopped or lost the database)"
)

_PUBLISH_ERRORS = (
    aio_pika.exceptions.AMQPError,
    aio_pika.exceptions.ChannelInvalidStateError,
    ConnectionError,
    TimeoutError,
    OSError,
)


class Dispatcher:
    """Claims due push attempts and runs each as a task, within the limits."""

    def __init__(
        self,
        *,
        store: PushStore,
        targets: TargetCache,
        client: OutboundClient,
        broker: Broker,
        relay: OutboxRelay,
        options: PushOptions,
        policy: RetryPolicy,
    ) -> None:
        self.store = store
        self.targets = targets
        self.client = client
        self.broker = broker
        self.relay = relay
        self.options = options
        self.policy = policy
        self._wake = asyncio.Event()
        self._stopping = False
        self._busy: Counter[str] = Counter()
        self._tasks: set[asyncio.Task[None]] = set()
        # When the sleeping loop looks for due attempts next (time.monotonic());
        # infinite while it is not sleeping, since it looks again anyway.
        self._next_look = math.inf

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    def notify(self) -> None:
        """Wake the loop because a push was just queued."""
        self._wake.set()

    def _look_within(self, seconds: float) -> None:
        """Wake the loop if an attempt is due before the loop would look again."""
        if time.monotonic() + seconds < self._next_look:
            self._wake.set()

    async def run(self) -> None:
        """Claim and start due attempts until `stop()`."""
        failures = 0
        while not self._stopping:
            # Cleared before the claim, so a notify during the claim is not lost.
            self._wake.clear()
            try:
                wait = await self._dispatch_once()
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                wait = min(0.2 * 2 ** min(failures, 5), 5.0)
                log.warning(
                    "push.claim_failed",
                    attempt=failures,
                    retry_in=wait,
                    error=repr(exc),
                )
            if wait > 0 and not self._stopping:
                await self._sleep(wait)

    async def _sleep(self, seconds: float) -> None:
        self._next_look = time.monotonic() + seconds
        try:
            await asyncio.wait_for(self._wake.wait(), seconds)
        except TimeoutError:
            return
        finally:
            self._next_look = math.inf
        # Woken early, mostly by a new push: wait a moment for the pushes that
        # arrive with it, so one claim serves them all.
        await asyncio.sleep(self.options.gather_seconds)

    async def stop(self, timeout: float) -> None:
        """Stop claiming and wait up to `timeout` seconds for attempts in flight.

        An attempt still running after that is cancelled; its lease runs out
        and the push is attempted again by whichever dispatcher runs then.
        """
        self._stopping = True
        self._wake.set()
        if not self._tasks:
            return
        log.info("push.waiting_for_attempts", in_flight=len(self._tasks))
        _done, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=1.0)
            log.warning("push.attempts_abandoned", count=len(pending))

    async def _dispatch_once(self) -> float:
        """Start the attempts that are due; return how long to sleep before looking again."""
        poll = self.options.poll_seconds
        free = self.options.max_in_flight - len(self._tasks)
        if free <= 0:
            # A finishing attempt wakes the loop.
            return poll

        claimed = await self.store.claim(
            free,
            busy=dict(self._busy),
            clinic_limit=self.options.clinic_max_in_flight,
            max_attempts=self.policy.attempts,
            lease_seconds=self.options.lease_seconds,
        )
        for push in claimed:
            self._start(push)
        if len(claimed) == free:
            return 0.0

        saturated = [
            clinic
            for clinic, count in self._busy.items()
            if count >= self.options.clinic_max_in_flight
        ]
        due_in = await self.store.seconds_until_due(saturated)
        if due_in is None:
            return poll
        return min(poll, max(due_in, MIN_WAIT_SECONDS))

    def _start(self, push: ClaimedPush) -> None:
        self._busy[push.clinic_id] += 1
        metrics.PUSH_ATTEMPTS_IN_FLIGHT.inc()
        task = asyncio.create_task(self._process(push))
        self._tasks.add(task)

        def finished(done: asyncio.Task[None]) -> None:
            # Only a freed slot that due attempts may be waiting for wakes the loop.
            was_full = len(self._tasks) >= self.options.max_in_flight
            clinic_was_full = (
                self._busy[push.clinic_id] >= self.options.clinic_max_in_flight
            )
            self._tasks.discard(done)
            self._busy[push.clinic_id] -= 1
            if self._busy[push.clinic_id] <= 0:
                del self._busy[push.clinic_id]
            metrics.PUSH_ATTEMPTS_IN_FLIGHT.dec()
            if was_full or clinic_was_full:
                self._wake.set()

        task.add_done_callback(finished)

    async def _process(self, push: ClaimedPush) -> None:
        bound = log.bind(
            clinic_id=push.clinic_id,
            note_id=push.note_id,
            version=push.version,
            envelope_id=str(push.id),
            attempt=push.attempts,
        )
        try:
            if push.newer_sent_version is not None:
                await self._supersede(push, bound)
                return
            if push.interrupted:
                bound.warning(
                    "push.attempt_interrupted", previous=push.previous_attempts
                )
            if push.previous_attempts >= self.policy.attempts:
                if push.interrupted or push.last_error is None:
                    await self._fail(push, bound, None, INTERRUPTED_ERROR)
                else:
                    await self._fail(push, bound, push.last_status, push.last_error)
                return

            started = time.monotonic()
            result = await self._attempt(push)
            elapsed = time.monotonic() - started
            metrics.PUSH_ATTEMPT_SECONDS.observe(elapsed)

            if result.delivered:
                assert result.status is not None
                shared_metrics.PUSH_ATTEMPTS.labels("sent").inc()
                await self._sent(push, bound, result.status, elapsed)
            elif push.attempts < self.policy.attempts:
                shared_metrics.PUSH_ATTEMPTS.labels("retry").inc()
                await self._retry_later(push, bound, result)
            else:
                shared_metrics.PUSH_ATTEMPTS.labels("failed").inc()
                await self._fail(
                    push, bound, result.status, result.error or "attempt failed"
                )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # A fault of our own, not of the PIMS: try again after the usual backoff.
            delay = self.policy.delay(push.attempts)
            bound.exception("push.attempt_crashed", retry_in=round(delay, 3))
            with contextlib.suppress(Exception):
                await self.store.schedule_retry(
                    push, delay, None, f"dispatcher error: {type(exc).__name__}"
                )
                self._look_within(delay)

    async def _attempt(self, push: ClaimedPush) -> AttemptResult:
        payload = orjson.loads(push.command)
        command = SoapPush.model_validate(payload)
        target = await _retrying(lambda: self.targets.get(push.clinic_id))
        if target is None or not target.push_url or not target.secret:
            return AttemptResult(None, describe_missing_target(push.clinic_id, target))

        # A note written for a patient that has since been merged away lands on
        # the survivor, as its appointments and visits did.
        survivor = await _retrying(
            lambda: surviving_external_id(
                self.store.pool, push.clinic_id, command.data.external_patient_id
            )
        )
        command.data.external_patient_id = survivor
        envelope = build_envelope(
            command,
            payload["data"]["note"],
            external_clinic_id=target.external_clinic_id,
        )
        return await post_envelope(
            self.client,
            target.push_url,
            target.secret,
            str(push.id),
            encode_envelope(envelope),
        )

    async def _sent(
        self,
        push: ClaimedPush,
        bound: structlog.typing.FilteringBoundLogger,
        status: int,
        elapsed: float,
    ) -> None:
        finished = await _retrying(lambda: self.store.mark_sent(push, status))
        if finished is None:
            bound.info("push.already_finished", status=status)
            return
        self.relay.notify()
        if finished.older_versions_due:
            self._look_within(0.0)
        metrics.PUSHES_FINISHED.labels("sent").inc()
        bound.info("push.sent", status=status, duration_ms=round(elapsed * 1000, 1))

    async def _supersede(
        self, push: ClaimedPush, bound: structlog.typing.FilteringBoundLogger
    ) -> None:
        finished = await _retrying(lambda: self.store.mark_superseded(push))
        if finished is None:
            return
        self.relay.notify()
        metrics.PUSHES_FINISHED.labels("superseded").inc()
        bound.info("push.superseded", superseded_by_version=push.newer_sent_version)

    async def _retry_later(
        self,
        push: ClaimedPush,
        bound: structlog.typing.FilteringBoundLogger,
        result: AttemptResult,
    ) -> None:
        delay = self.policy.delay(push.attempts, result.retry_after)
        await _retrying(
            lambda: self.store.schedule_retry(push, delay, result.status, result.error)
        )
        self._look_within(delay)
        next_attempt_at = datetime.now(UTC) + timedelta(seconds=delay)
        bound.warning(
            "push.attempt_failed",
            status=result.status,
            error=result.error,
            retry_after=result.retry_after,
            retry_in=round(delay, 3),
            next_attempt_at=next_attempt_at.isoformat(),
            attempts_left=self.policy.attempts - push.attempts,
        )

    async def _fail(
        self,
        push: ClaimedPush,
        bound: structlog.typing.FilteringBoundLogger,
        status: int | None,
        error: str,
    ) -> None:
        """Dead-letter the command, then mark the push failed.

        The push becomes `failed` only after the broker confirmed the copy in
        coggo.soap-push.dlq. If the publish fails, the push stays pending with
        its attempts used up, and the next claim dead-letters it again.
        """
        try:
            await self._dead_letter(push, status, error)
        except _PUBLISH_ERRORS as exc:
            await _retrying(
                lambda: self.store.schedule_retry(
                    push, DEAD_LETTER_RETRY_SECONDS, status, error
                )
            )
            self._look_within(DEAD_LETTER_RETRY_SECONDS)
            bound.warning(
                "push.dead_letter_failed",
                retry_in=DEAD_LETTER_RETRY_SECONDS,
                error=repr(exc),
            )
            return

        finished = await _retrying(lambda: self.store.mark_failed(push, status, error))
        if finished is None:
            bound.info("push.already_finished", status=status)
            return
        self.relay.notify()
        metrics.PUSHES_FINISHED.labels("failed").inc()
        bound.error("push.failed", status=status, error=error)

    async def _dead_letter(
        self, push: ClaimedPush, status: int | None, error: str
    ) -> None:
        names = self.broker.topology
        headers: dict[str, Any] = dict(push.command_headers)
        headers[topology.REASON_HEADER] = DEAD_LETTER_REASON
        headers[topology.ERROR_HEADER] = error[:1000]
        headers[topology.ORIGINAL_EXCHANGE_HEADER] = names.commands
        headers[topology.ORIGINAL_ROUTING_KEY_HEADER] = SOAP_PUSH_ROUTING_KEY
        headers[ATTEMPTS_HEADER] = push.attempts
        if status is not None:
            headers[LAST_STATUS_HEADER] = status
        else:
            headers.pop(LAST_STATUS_HEADER, None)
        await self.broker.publish(
            names.dead_letter,
            names.name(topology.SOAP_PUSH_QUEUE),
            push.command,
            message_id=push.command_id,
            headers=headers,
        )


async def _retrying(operation: Callable[[], Awaitable[T]]) -> T:
    """Run a database operation, retrying brief faults for about three seconds.

    Should they last longer, the error propagates and the push's lease runs
    out, so the attempt is made again later.
    """
    for attempt in range(1, DATABASE_ATTEMPTS + 1):
        try:
            return await operation()
        except TRANSIENT_ERRORS:
            if attempt == DATABASE_ATTEMPTS:
                raise
            await asyncio.sleep(0.1 * 2**attempt)
    raise AssertionError("unreachable: the last attempt returns or raises")
