"""Running the real services in the test process, against real servers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import aiohttp
import asyncpg
import orjson
from coggo.credentials import SecretBox
from coggo.integrations import CreatedIntegration, create_integration
from coggo.settings import Settings
from coggo.topology import Topology

ServiceMain = Callable[[Settings, asyncio.Event], Awaitable[None]]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class RunningService:
    task: asyncio.Task[None]
    stop: asyncio.Event

    async def shutdown(self, timeout: float = 20.0) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, timeout)


async def start_service(main: ServiceMain, settings: Settings) -> RunningService:
    stop = asyncio.Event()
    task = asyncio.create_task(main(settings, stop))
    await asyncio.sleep(0)
    return RunningService(task, stop)


async def wait_for_http(url: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while True:
            try:
                async with session.get(url) as response:
                    if response.status < 500:
                        return
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not answer within {timeout} s")
            await asyncio.sleep(0.05)


async def wait_until(
    check: Callable[[], Awaitable[Any]], timeout: float = 15.0, interval: float = 0.05
) -> Any:
    """Poll `check` until it returns a truthy value; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)


@dataclass
class Response:
    status: int
    body: dict[str, Any]
    headers: dict[str, str]


@dataclass
class Env:
    """One test's own database and topology on the shared servers."""

    settings: Settings
    pool: asyncpg.Pool
    topology: Topology
    box: SecretBox = field(default_factory=lambda: SecretBox("test-secret-key"))

    def service_settings(self, **overrides: Any) -> Settings:
        values = self.settings.model_dump()
        values.update(overrides)
        return Settings(**values)

    async def create_integration(
        self, clinic_id: str = "clinic-1", **kwargs: Any
    ) -> CreatedIntegration:
        async with self.pool.acquire() as connection:
            return await create_integration(
                connection,
                self.box,
                clinic_id=clinic_id,
                provider=kwargs.pop("provider", "vetsim"),
                **kwargs,
            )

    async def collect_events(
        self, channel: aio_pika.abc.AbstractChannel
    ) -> aio_pika.abc.AbstractQueue:
        """Bind a private queue to coggo.events that receives every domain event."""
        queue = await channel.declare_queue(exclusive=True)
        await queue.bind(self.topology.events, routing_key="#")
        return queue


async def drain(
    queue: aio_pika.abc.AbstractQueue, *, settle: float = 0.3
) -> list[dict[str, Any]]:
    """Read every message the queue contains now and until it stays empty for `settle` s."""
    found = []
    deadline = time.monotonic() + settle
    while time.monotonic() < deadline:
        message = await queue.get(fail=False, no_ack=True)
        if message is None:
            await asyncio.sleep(0.02)
            continue
        found.append(orjson.loads(message.body))
        deadline = time.monotonic() + settle
    return found


class HttpClient:
    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.session = aiohttp.ClientSession()

    async def request(
        self,
        method: str,
        path: str,
        *,
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Response:
        async with self.session.request(
            method, self.base_url + path, data=data, headers=headers
        ) as response:
            raw = await response.read()
            try:
                body = orjson.loads(raw) if raw else {}
            except orjson.JSONDecodeError:
                body = {"_text": raw.decode("utf-8", "replace")}
            return Response(response.status, body, dict(response.headers))

    async def close(self) -> None:
        await self.session.close()


@contextlib.contextmanager
def subprocess_service(
    command: str, settings: Settings, *, extra_env: dict[str, str] | None = None
) -> Any:
    """Run a service's console script as a child process with the test's settings."""
    env = dict(os.environ)
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        env[f"COGGO_{name.upper()}"] = str(value)
    env["COGGO_LOG_FORMAT"] = "json"
    env.update(extra_env or {})
    script = os.path.join(os.path.dirname(sys.executable), command)
    process = subprocess.Popen(  # noqa: S603
        [script], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
        process.wait(10)


async def raw_request(
    base_url: str, path: str, header_lines: list[bytes], body: bytes
) -> tuple[int, bytes]:
    """Send hand-written request bytes, for headers no HTTP client would send."""
    host, port = base_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        has_length = any(
            line.lower().startswith(b"content-length") for line in header_lines
        )
        head = [
            f"POST {path} HTTP/1.1".encode(),
            f"Host: {host}".encode(),
            b"Connection: close",
        ]
        head += header_lines
        if not has_length:
            head.append(f"Content-Length: {len(body)}".encode())
        writer.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
        await writer.drain()
        response = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    status_line, _, rest = response.partition(b"\r\n")
    status = int(status_line.split()[1])
    return status, rest.partition(b"\r\n\r\n")[2]
