"""The reconciliation worker, the reference PIMS and the bus, as the tests drive them."""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aio_pika
import orjson
import pytest
from aiohttp import web
from coggo.settings import Settings
from pims_sim.app import build_app
from pims_sim.faults import FaultSpec
from pims_sim.state import SimConfig, SimState

from tests.support.stack import Env, RunningService, start_service

SIM_SECRET = "whsec_reconcile_test"


@dataclass
class Pims:
    """A reference PIMS running in this process on 127.0.0.1."""

    state: SimState
    url: str

    def fault(self, **fields: Any) -> None:
        self.state.faults.set(FaultSpec.model_validate(fields))

    def calls(self, endpoint: str) -> int:
        return self.state.calls[endpoint]


async def start_pims(**config: Any) -> tuple[Pims, web.AppRunner]:
    state = SimState.create(SimConfig(secret=SIM_SECRET, **config))
    runner = web.AppRunner(build_app(state), shutdown_timeout=1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return Pims(state, f"http://127.0.0.1:{runner.addresses[0][1]}"), runner


@pytest.fixture
async def pims_factory() -> AsyncIterator[Callable[..., Any]]:
    """Start reference PIMS instances; all of them stop after the test."""
    runners: list[web.AppRunner] = []

    async def start(**config: Any) -> Pims:
        pims, runner = await start_pims(**config)
        runners.append(runner)
        return pims

    yield start
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def pims(pims_factory: Callable[..., Any]) -> Pims:
    started: Pims = await pims_factory(seed=11, appointments=20)
    return started


def worker_settings(env: Env, **overrides: Any) -> Settings:
    """Settings of the worker; loopback targets are allowed unless overridden."""
    values: dict[str, Any] = {"allow_private_targets": True}
    values.update(overrides)
    return env.service_settings(**values)


@pytest.fixture
async def reconciliation(env: Env) -> AsyncIterator[RunningService]:
    """The real reconciliation worker, allowed to call the loopback PIMS."""
    from reconciliation.__main__ import serve

    service = await start_service(serve, worker_settings(env))
    yield service
    await service.shutdown()


def replace_appointments(
    state: SimState, change: Callable[[list[dict[str, Any]]], list[Any]]
) -> None:
    """Make GET /appointments return `change(list)` instead of the clinic's list."""
    clinic = state.clinic
    original = clinic.upcoming_appointments

    def upcoming(days: int, now: datetime) -> list[Any]:
        return change(original(days, now))

    clinic.upcoming_appointments = upcoming  # type: ignore[method-assign]


def replace_search(state: SimState, results: list[Any]) -> None:
    """Make GET /patients return `results` for every query."""
    state.clinic.search_patients = lambda query, limit=20: results  # type: ignore[method-assign]


def set_species_catalog(state: SimState, species: list[dict[str, Any]]) -> None:
    """Make GET /species return `species` as the catalog."""
    state.clinic.species_catalog = lambda: {"species": species}  # type: ignore[method-assign]


def command_body(
    command_type: str, clinic_id: str, data: dict[str, Any], command_id: str
) -> bytes:
    return orjson.dumps(
        {
            "id": command_id,
            "type": command_type,
            "occurredAt": datetime.now(UTC).isoformat(),
            "clinicId": clinic_id,
            "data": data,
        }
    )


class Bus:
    """Commands in, domain events and replies out, on one test's topology."""

    def __init__(self, env: Env, channel: aio_pika.abc.AbstractChannel) -> None:
        self.env = env
        self.channel = channel
        self.events: aio_pika.abc.AbstractQueue | None = None
        self.seen: list[dict[str, Any]] = []

    @classmethod
    async def open(cls, env: Env, connection: aio_pika.abc.AbstractConnection) -> Bus:
        bus = cls(env, await connection.channel())
        bus.events = await env.collect_events(bus.channel)
        return bus

    async def send(
        self,
        command_type: str,
        data: dict[str, Any],
        *,
        clinic_id: str = "clinic-1",
        command_id: str | None = None,
        reply_to: str | None = None,
        correlation_id: str | None = None,
    ) -> str:
        """Publish one command; return its id."""
        command_id = command_id or str(uuid.uuid4())
        exchange = await self.channel.get_exchange(self.env.topology.commands)
        await exchange.publish(
            aio_pika.Message(
                command_body(command_type, clinic_id, data, command_id),
                message_id=command_id,
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                reply_to=reply_to,
                correlation_id=correlation_id,
            ),
            routing_key=command_type,
        )
        return command_id

    async def _read_events(self) -> None:
        assert self.events is not None
        while True:
            message = await self.events.get(fail=False, no_ack=True)
            if message is None:
                return
            self.seen.append(orjson.loads(message.body))

    async def event_for(
        self, event_type: str, command_id: str, timeout: float = 30.0
    ) -> dict[str, Any]:
        """Wait for the event of `event_type` whose data names `command_id`."""
        deadline = time.monotonic() + timeout
        while True:
            await self._read_events()
            for event in self.seen:
                data = event.get("data") or {}
                if event["type"] == event_type and data.get("commandId") == command_id:
                    return event
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"no {event_type} for command {command_id} within {timeout} s; "
                    f"saw {[event['type'] for event in self.seen]}"
                )
            await asyncio.sleep(0.05)

    async def events_of(
        self, event_type: str, settle: float = 0.5
    ) -> list[dict[str, Any]]:
        """Return every event of `event_type` seen until none arrived for `settle` s."""
        count = -1
        while count != len(self.seen):
            count = len(self.seen)
            await asyncio.sleep(settle)
            await self._read_events()
        return [event for event in self.seen if event["type"] == event_type]

    async def request(
        self,
        command_type: str,
        data: dict[str, Any],
        *,
        clinic_id: str = "clinic-1",
        timeout: float = 10.0,
    ) -> tuple[dict[str, Any], aio_pika.abc.AbstractIncomingMessage, float]:
        """Send a request/reply command; return the reply, its message and the seconds taken."""
        replies = await self.channel.declare_queue(exclusive=True, auto_delete=True)
        correlation_id = str(uuid.uuid4())
        started = time.monotonic()
        await self.send(
            command_type,
            data,
            clinic_id=clinic_id,
            reply_to=replies.name,
            correlation_id=correlation_id,
        )
        deadline = started + timeout
        while time.monotonic() < deadline:
            message = await replies.get(fail=False, no_ack=True)
            if message is not None:
                return orjson.loads(message.body), message, time.monotonic() - started
            await asyncio.sleep(0.01)
        raise AssertionError(f"no reply to {command_type} within {timeout} s")


@dataclass
class AdminResult:
    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return orjson.loads(self.stdout)


async def run_admin(
    settings: Settings, *args: str, timeout: float = 90.0
) -> AdminResult:
    """Run the coggo-admin console script with the test's settings."""
    env = dict(os.environ)
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        env[f"COGGO_{name.upper()}"] = str(value)
    script = os.path.join(os.path.dirname(sys.executable), "coggo-admin")
    process = await asyncio.create_subprocess_exec(
        script,
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout)
    assert process.returncode is not None
    return AdminResult(process.returncode, stdout.decode(), stderr.decode())
