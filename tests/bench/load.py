"""Load generator and machine ceilings for the ingress benchmark, one process each.

`python -m tests.bench.load send SPEC` sends signed `appointment.created`
webhooks over keep-alive HTTP/1.1 connections, with raw requests and a minimal
response parser on uvloop so that the generator costs little CPU per request.
Two modes:

- open loop (`rate` set): request i is due at start + i / rate. A request that
  finds every connection busy waits in a backlog, and its latency counts from
  the due time, so queueing in the server is not hidden by the generator
  slowing down (coordinated omission).
- closed loop (`rate` null): every connection sends its next request as soon
  as the previous response arrives, which finds the maximum throughput.

It writes the outcome of every request to `SPEC.out` (see `Outcomes`) and a
JSON summary, with its own CPU time, to stdout.

The other commands measure what this machine allows for each part of one
request, done the way the ingress does it. `serve-bare` runs an aiohttp
handler that reads the body and returns 200. `publish` sends persistent
publishes with confirms into a quorum queue. `insert` commits single-row
inserts.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import hashlib
import hmac
import pickle
import resource
import sys
import time
import uuid
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import orjson
import uvloop

WEBHOOKS_PATH = "/v1/partner/webhooks"
# Requests still unanswered this long after the last one was due count as failed.
DRAIN_SECONDS = 30.0


@dataclass
class LoadSpec:
    """What one `send` run does; the benchmark writes it as JSON."""

    host: str
    port: int
    keys: list[tuple[str, str]]
    tag: str
    requests: int
    seconds: float
    connections: int
    rate: float | None = None


@dataclass
class Outcomes:
    """One entry per completed request: its index, status and monotonic times.

    `due` is when the request was scheduled (open loop) or sent (closed loop);
    `done` is when its response was complete. Both come from time.monotonic(),
    which is CLOCK_MONOTONIC and so comparable across processes of one machine.
    """

    index: array[int] = field(default_factory=lambda: array("q"))
    status: array[int] = field(default_factory=lambda: array("h"))
    due: array[float] = field(default_factory=lambda: array("d"))
    done: array[float] = field(default_factory=lambda: array("d"))

    def add(self, index: int, status: int, due: float, done: float) -> None:
        self.index.append(index)
        self.status.append(status)
        self.due.append(due)
        self.done.append(done)


def appointment_id(tag: str, index: int) -> str:
    """The appointment external id of request `index`, matched in visit.scheduled."""
    return f"apt-{tag}-{index}"


def event_body(tag: str, index: int) -> bytes:
    """An `appointment.created` event with ids of its own, as a PIMS sends it."""
    return orjson.dumps(
        {
            "id": f"evt-{tag}-{index}",
            "type": "appointment.created",
            "occurredAt": "2026-06-12T09:30:00Z",
            "data": {
                "appointment": {
                    "externalId": appointment_id(tag, index),
                    "startsAt": f"2026-07-{1 + index % 28:02d}T{8 + index % 10:02d}:30:00",
                    "timezone": "America/New_York",
                    "reason": "Annual exam",
                },
                "client": {
                    "externalId": f"cli-{tag}-{index}",
                    "firstName": "Owner",
                    "lastName": f"Number {index}",
                },
                "patient": {
                    "externalId": f"pat-{tag}-{index}",
                    "name": f"Pet {index}",
                    "species": "dog" if index % 2 else "cat",
                    "breed": "Beagle",
                    "weight": {"value": 5 + index % 30, "unit": "kg"},
                },
            },
        }
    )


class RequestBuilder:
    """Builds request `index`: the key is `index % len(keys)`, signed at build time."""

    def __init__(self, spec: LoadSpec) -> None:
        self.spec = spec
        self.keys = [(key, secret.encode()) for key, secret in spec.keys]
        self.head = (
            f"POST {WEBHOOKS_PATH} HTTP/1.1\r\n"
            f"Host: {spec.host}:{spec.port}\r\n"
            "Content-Type: application/json\r\n"
        )

    def build(self, index: int) -> bytes:
        key, secret = self.keys[index % len(self.keys)]
        body = event_body(self.spec.tag, index)
        message_id = f"msg-{self.spec.tag}-{index}"
        timestamp = int(time.time())
        signed = f"{message_id}.{timestamp}.".encode() + body
        signature = base64.b64encode(
            hmac.new(secret, signed, hashlib.sha256).digest()
        ).decode()
        head = (
            f"{self.head}Authorization: Bearer {key}\r\n"
            f"X-Coggo-Id: {message_id}\r\n"
            f"X-Coggo-Timestamp: {timestamp}\r\n"
            f"X-Coggo-Signature: {signature}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        return head.encode() + body


class Connection(asyncio.Protocol):
    """One keep-alive connection with at most one request in flight."""

    def __init__(self, generator: Generator) -> None:
        self.generator = generator
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.request: tuple[int, float] | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def send(self, index: int, due: float, data: bytes) -> None:
        assert self.transport is not None
        self.request = (index, due)
        self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end].lower()
            length = 0
            marker = head.find(b"\r\ncontent-length:")
            if marker >= 0:
                line_end = head.find(b"\r\n", marker + 2)
                value = head[marker + 17 : line_end if line_end >= 0 else None]
                length = int(value.strip())
            total = end + 4 + length
            if len(self.buffer) < total:
                return
            status = int(self.buffer[9:12])
            self.buffer = self.buffer[total:]
            self._finish(status)

    def _finish(self, status: int) -> None:
        request, self.request = self.request, None
        if request is not None:
            self.generator.answered(self, request[0], status, request[1])

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        # Status 0 marks a request whose connection closed before a response.
        self._finish(0)


class Generator:
    def __init__(self, spec: LoadSpec) -> None:
        self.spec = spec
        self.builder = RequestBuilder(spec)
        self.outcomes = Outcomes()
        self.idle: collections.deque[Connection] = collections.deque()
        self.backlog: collections.deque[tuple[int, float]] = collections.deque()
        self.next_index = 0
        self.in_flight = 0
        self.sending = True
        self.deadline = 0.0
        self.settled = asyncio.Event()
        self.sending_ended = asyncio.Event()

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(self.spec.connections):
            _, protocol = await loop.create_connection(
                lambda: Connection(self), self.spec.host, self.spec.port
            )
            self.idle.append(protocol)

    def answered(
        self, connection: Connection, index: int, status: int, due: float
    ) -> None:
        self.outcomes.add(index, status, due, time.monotonic())
        self.in_flight -= 1
        if not connection.closed:
            self.idle.append(connection)
        self.pump()

    def pump(self) -> None:
        closed_loop = self.spec.rate is None
        if closed_loop and self.next_index >= self.spec.requests:
            self.sending = False
            self.sending_ended.set()
        while self.idle:
            if self.backlog:
                index, due = self.backlog.popleft()
            elif closed_loop and self.sending and self.next_index < self.spec.requests:
                if time.monotonic() >= self.deadline:
                    self.sending = False
                    self.sending_ended.set()
                    break
                index, due = self.next_index, time.monotonic()
                self.next_index += 1
            else:
                break
            connection = self.idle.popleft()
            self.in_flight += 1
            connection.send(index, due, self.builder.build(index))
        if not self.sending and self.in_flight == 0 and not self.backlog:
            self.settled.set()

    async def run(self) -> dict[str, Any]:
        await self.connect()
        cpu_before = _cpu_seconds()
        started = time.monotonic()
        self.deadline = started + self.spec.seconds
        if self.spec.rate is None:
            self.pump()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.sending_ended.wait(), self.spec.seconds)
        else:
            await self._schedule(started, self.spec.rate)
        self.sending = False
        self.pump()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.settled.wait(), DRAIN_SECONDS)
        finished = time.monotonic()
        unsent = len(self.backlog)
        return {
            "tag": self.spec.tag,
            "rate": self.spec.rate,
            "connections": self.spec.connections,
            "scheduled": self.next_index,
            "answered": len(self.outcomes.index),
            "unsent": unsent,
            "unanswered": self.in_flight,
            "seconds": finished - started,
            "sending_seconds": min(self.spec.seconds, finished - started),
            "cpu_seconds": _cpu_seconds() - cpu_before,
        }

    async def _schedule(self, started: float, rate: float) -> None:
        total = min(self.spec.requests, int(rate * self.spec.seconds))
        while self.next_index < total:
            now = time.monotonic()
            due_count = min(total, int((now - started) * rate) + 1)
            while self.next_index < due_count:
                self.backlog.append((self.next_index, started + self.next_index / rate))
                self.next_index += 1
            self.pump()
            wake = started + self.next_index / rate
            await asyncio.sleep(max(0.0, wake - time.monotonic()))


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def send(spec_path: Path) -> None:
    raw = orjson.loads(spec_path.read_bytes())
    raw["keys"] = [tuple(pair) for pair in raw["keys"]]
    generator = Generator(LoadSpec(**raw))
    summary = uvloop.run(generator.run())
    with open(f"{spec_path}.out", "wb") as output:
        pickle.dump(vars(generator.outcomes), output)
    sys.stdout.write(orjson.dumps(summary).decode() + "\n")


async def serve_bare(host: str, port: int, seconds: float) -> None:
    """Serve POST /v1/partner/webhooks by reading the body and returning 200."""
    from aiohttp import web

    async def handler(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(
            body=b'{"received":true,"duplicate":false}', content_type="application/json"
        )

    app = web.Application()
    app.router.add_post(WEBHOOKS_PATH, handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port, reuse_port=True).start()
    # The benchmark stops this server; the time limit only bounds a forgotten one.
    await asyncio.sleep(seconds)
    await runner.cleanup()


async def publish(url: str, seconds: float, window: int, body_size: int) -> None:
    """Publish persistent messages with confirms into a new quorum queue for `seconds`."""
    import aio_pika

    queue_name = f"bench-ceiling-{uuid.uuid4().hex[:8]}"
    body = b"x" * body_size
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        queue = await channel.declare_queue(
            queue_name, durable=True, arguments={"x-queue-type": "quorum"}
        )
        try:
            count = 0
            started = time.monotonic()
            cpu_before = _cpu_seconds()
            while time.monotonic() - started < seconds:
                await asyncio.gather(
                    *(
                        channel.default_exchange.publish(
                            aio_pika.Message(
                                body,
                                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                                message_id=str(count + offset),
                            ),
                            routing_key=queue_name,
                        )
                        for offset in range(window)
                    )
                )
                count += window
            elapsed = time.monotonic() - started
            cpu = _cpu_seconds() - cpu_before
        finally:
            await queue.delete(if_unused=False, if_empty=False)
    _print_rate(count, elapsed, cpu)


async def insert(url: str, seconds: float, connections: int, body_size: int) -> None:
    """Insert one row per transaction from `connections` connections for `seconds`."""
    import asyncpg

    table = f"bench_ceiling_{uuid.uuid4().hex[:8]}"
    pool = await asyncpg.create_pool(url, min_size=connections, max_size=connections)
    assert pool is not None
    await pool.execute(
        f"CREATE TABLE {table} (id bigserial PRIMARY KEY, key text NOT NULL, "
        "body bytea NOT NULL, created_at timestamptz NOT NULL DEFAULT now())"
    )
    body = b"x" * body_size
    statement = f"INSERT INTO {table} (key, body) VALUES ($1, $2)"
    count = 0
    started = time.monotonic()
    cpu_before = _cpu_seconds()

    async def worker() -> None:
        nonlocal count
        async with pool.acquire() as connection:
            while time.monotonic() - started < seconds:
                await connection.execute(statement, str(count), body)
                count += 1

    try:
        await asyncio.gather(*(worker() for _ in range(connections)))
        elapsed = time.monotonic() - started
        cpu = _cpu_seconds() - cpu_before
    finally:
        await pool.execute(f"DROP TABLE {table}")
        await pool.close()
    _print_rate(count, elapsed, cpu)


def _print_rate(count: int, elapsed: float, cpu: float) -> None:
    summary = {"count": count, "seconds": elapsed, "cpu_seconds": cpu}
    sys.stdout.write(orjson.dumps(summary).decode() + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.load",
        description="Load generator and ceiling measurements of the ingress benchmark.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    sender = commands.add_parser("send", help="send the webhooks described in SPEC")
    sender.add_argument("spec", type=Path, help="JSON file with the LoadSpec fields")
    bare = commands.add_parser(
        "serve-bare", help="serve a handler that only reads the body"
    )
    bare.add_argument("--host", default="127.0.0.1")
    bare.add_argument("--port", type=int, required=True)
    bare.add_argument(
        "--seconds", type=float, default=600, help="stop after this many seconds"
    )
    publisher = commands.add_parser("publish", help="measure confirmed publishes")
    publisher.add_argument("--url", required=True, help="AMQP URL of the broker")
    publisher.add_argument("--seconds", type=float, default=10)
    publisher.add_argument(
        "--window", type=int, default=500, help="publishes awaiting confirms at once"
    )
    publisher.add_argument(
        "--body-size", type=int, default=1000, help="message size in bytes"
    )
    inserter = commands.add_parser(
        "insert", help="measure committed single-row inserts"
    )
    inserter.add_argument(
        "--url", required=True, help="PostgreSQL URL of a scratch database"
    )
    inserter.add_argument("--seconds", type=float, default=10)
    inserter.add_argument("--connections", type=int, default=16)
    inserter.add_argument(
        "--body-size", type=int, default=1000, help="row payload in bytes"
    )
    args = parser.parse_args()

    if args.command == "send":
        send(args.spec)
    elif args.command == "serve-bare":
        uvloop.run(serve_bare(args.host, args.port, args.seconds))
    elif args.command == "publish":
        uvloop.run(publish(args.url, args.seconds, args.window, args.body_size))
    else:
        uvloop.run(insert(args.url, args.seconds, args.connections, args.body_size))


if __name__ == "__main__":
    main()
