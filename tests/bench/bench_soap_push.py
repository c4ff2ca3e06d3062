"""Deliver SOAP pushes to reference PIMS, with and without one PIMS that hangs.

Starts its own database and topology (tests.bench.common.bench_env), one
reference PIMS per clinic in this process on 127.0.0.1, and `coggo-soap-push`
as a child process with its default settings. Three phases:

1. Throughput: queues PUSHES commands spread over the healthy clinics, then
   starts the dispatcher and times from the first envelope a PIMS receives to
   the last, as the patient-upsert benchmark times its consumer.
2. Latency with every PIMS healthy: publishes at RATE per second for SECONDS
   seconds to the healthy clinics. Latency runs from the publish to the PIMS
   receiving the envelope.
3. The same, while one more clinic gets its share of the pushes and its PIMS
   holds every request open until the dispatcher's 10 s time limit.

Phases 2 and 3 alternate ROUNDS times, so that load from other processes on
the machine falls on both alike. After each phase 3 the hanging clinic's
backlog is deleted, so that phase 2 measures clinics without one. The target
for phase 3 is a p99 latency of the healthy clinics within 1.2 times that of
phase 2.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import asyncpg
import orjson
from aiohttp import web
from coggo.credentials import SecretBox
from coggo.integrations import create_integration
from coggo.logs import configure_logging
from coggo.soap.envelope import envelope_id
from pims_sim.app import build_app
from pims_sim.faults import FaultSpec
from pims_sim.state import SimConfig, SimState

from tests.bench.common import BenchEnv, bench_env, environment
from tests.bench.report import Section
from tests.support.soap import hard_note
from tests.support.stack import free_port

HEALTHY_CLINICS = int(os.environ.get("COGGO_BENCH_SOAP_CLINICS", "10"))
PUSHES = int(os.environ.get("COGGO_BENCH_SOAP_PUSHES", "3000"))
RATE = float(os.environ.get("COGGO_BENCH_SOAP_RATE", "100"))
SECONDS = float(os.environ.get("COGGO_BENCH_SOAP_SECONDS", "6"))
ROUNDS = int(os.environ.get("COGGO_BENCH_SOAP_ROUNDS", "5"))
HANGING_CLINIC = "bench-hanging"
TARGET_RATE = 300.0
TARGET_RATIO = 1.2


@dataclass
class Clinic:
    clinic_id: str
    state: SimState
    runner: web.AppRunner
    # Envelope id -> time.monotonic() of the first request that carried it.
    received: dict[str, float] = field(default_factory=dict)


@dataclass
class Stack:
    env: BenchEnv
    clinics: dict[str, Clinic]
    exchange: aio_pika.abc.AbstractExchange
    sent_at: dict[str, float] = field(default_factory=dict)

    @property
    def healthy(self) -> list[str]:
        return [name for name in self.clinics if name != HANGING_CLINIC]

    def received(self) -> dict[str, float]:
        merged: dict[str, float] = {}
        for clinic in self.clinics.values():
            merged.update(clinic.received)
        return merged


async def _start_clinic(
    connection: asyncpg.Connection, box: SecretBox, clinic_id: str
) -> Clinic:
    created = await create_integration(
        connection,
        box,
        clinic_id=clinic_id,
        provider="bench",
        external_clinic_id=f"ext-{clinic_id}",
    )
    state = SimState.create(
        SimConfig(secret=created.signing_secret, appointments=0, clients=0)
    )
    app = build_app(state)
    received: dict[str, float] = {}

    @web.middleware
    async def record(
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        message_id = request.headers.get("X-Coggo-Id")
        if message_id is not None and message_id not in received:
            received[message_id] = time.monotonic()
        return await handler(request)

    app.middlewares.append(record)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    await connection.execute(
        "UPDATE integrations SET push_url = $2 WHERE clinic_id = $1",
        clinic_id,
        f"http://127.0.0.1:{port}/push",
    )
    return Clinic(clinic_id, state, runner, received)


@asynccontextmanager
async def _stack() -> AsyncIterator[Stack]:
    """Clinics with their PIMS, and a publisher; the dispatcher is started apart."""
    async with bench_env("soap") as env:
        box = SecretBox("bench-secret-key")
        connection = await asyncpg.connect(env.database_url)
        clinics: dict[str, Clinic] = {}
        amqp = await aio_pika.connect(env.settings.amqp_url)
        try:
            names = [f"bench-{number}" for number in range(HEALTHY_CLINICS)]
            for clinic_id in [*names, HANGING_CLINIC]:
                clinics[clinic_id] = await _start_clinic(connection, box, clinic_id)
            channel = await amqp.channel(publisher_confirms=True)
            exchange = await channel.get_exchange(env.topology.commands)
            yield Stack(env, clinics, exchange)
        finally:
            await connection.close()
            await amqp.close()
            for clinic in clinics.values():
                await clinic.runner.cleanup()


@asynccontextmanager
async def _dispatcher(env: BenchEnv) -> AsyncIterator[None]:
    """Run `coggo-soap-push` with its default settings until the block ends."""
    metrics_port = free_port()
    variables = environment(env.settings)
    variables["COGGO_ALLOW_PRIVATE_TARGETS"] = "true"
    variables["COGGO_METRICS_PORT"] = str(metrics_port)
    script = Path(sys.executable).parent / "coggo-soap-push"
    process = await asyncio.create_subprocess_exec(
        str(script),
        env=variables,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        await _wait_ready(f"http://127.0.0.1:{metrics_port}/readyz", process)
        yield
    finally:
        if process.returncode is None:
            process.terminate()
        await asyncio.wait_for(process.wait(), 30)


async def _wait_ready(url: str, process: asyncio.subprocess.Process) -> None:
    deadline = time.monotonic() + 30
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if process.returncode is not None:
                raise RuntimeError(f"coggo-soap-push exited with {process.returncode}")
            try:
                async with session.get(url) as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise TimeoutError(f"coggo-soap-push was not ready at {url} within 30 s")


def _command(clinic_id: str, note_id: str) -> tuple[str, bytes]:
    command: dict[str, Any] = {
        "id": str(uuid.uuid4()),
        "type": "soap.push",
        "occurredAt": "2026-06-12T15:00:00Z",
        "clinicId": clinic_id,
        "data": {
            "noteId": note_id,
            "version": 1,
            "externalPatientId": "pat_771",
            "externalAppointmentId": "apt_1029",
            "vet": {"name": "Dr. Bench", "externalStaffId": "stf_1"},
            "signedAt": "2026-06-12T14:55:00Z",
            "language": "en",
            "note": hard_note(),
        },
    }
    return str(envelope_id(clinic_id, note_id, 1)), orjson.dumps(command)


async def _publish(stack: Stack, clinic_id: str, note_id: str) -> str:
    push_id, body = _command(clinic_id, note_id)
    stack.sent_at[push_id] = time.monotonic()
    await stack.exchange.publish(
        aio_pika.Message(
            body,
            message_id=push_id,
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        ),
        routing_key="soap.push",
    )
    return push_id


async def _wait_received(stack: Stack, ids: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        received = stack.received()
        missing = sum(1 for push_id in ids if push_id not in received)
        if missing == 0:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{missing} of {len(ids)} pushes not received")
        await asyncio.sleep(0.05)


async def _queue_backlog(stack: Stack) -> list[str]:
    ids: list[str] = []
    for offset in range(0, PUSHES, 200):
        batch = range(offset, min(offset + 200, PUSHES))
        ids += await asyncio.gather(
            *(
                _publish(
                    stack, stack.healthy[index % len(stack.healthy)], f"tp-{index}"
                )
                for index in batch
            )
        )
    return ids


async def _throughput(stack: Stack, ids: list[str]) -> float:
    """Wait until the queued pushes are delivered; return pushes per second."""
    await _wait_received(stack, ids, timeout=300)
    received = stack.received()
    times = [received[push_id] for push_id in ids]
    return (len(ids) - 1) / (max(times) - min(times))


async def _latencies(stack: Stack, phase: str, *, with_hanging: bool) -> list[float]:
    """Publish at RATE per second for SECONDS; return the healthy clinics' latencies."""
    targets = [*stack.healthy, HANGING_CLINIC] if with_hanging else stack.healthy
    count = int(RATE * SECONDS)
    started = time.monotonic()
    measured: list[str] = []
    for index in range(count):
        delay = started + index / RATE - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        clinic_id = targets[index % len(targets)]
        push_id = await _publish(stack, clinic_id, f"{phase}-{index}")
        if clinic_id != HANGING_CLINIC:
            measured.append(push_id)
    await _wait_received(stack, measured, timeout=60)
    received = stack.received()
    return [received[push_id] - stack.sent_at[push_id] for push_id in measured]


async def _drop_backlog(stack: Stack, clinic_id: str) -> None:
    """Delete the clinic's pending pushes, so the next healthy round has no backlog.

    Attempts already in flight stay held open until their time limit.
    """
    connection = await asyncpg.connect(stack.env.database_url)
    try:
        await connection.execute(
            "DELETE FROM pushes WHERE clinic_id = $1 AND state = 'pending'",
            clinic_id,
        )
    finally:
        await connection.close()


def _p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[98]


async def run() -> Section:
    # The reference PIMS logs every push at INFO, which would cost this
    # process more than it measures.
    configure_logging("bench-soap-push", level="warning")
    section = Section(
        "SOAP push dispatcher",
        ".venv/bin/python -m tests.bench soap_push",
    )
    baseline: list[float] = []
    degraded: list[float] = []
    async with _stack() as stack:
        backlog = await _queue_backlog(stack)
        async with _dispatcher(stack.env):
            rate = await _throughput(stack, backlog)
            section.add(
                f"pushes delivered, {PUSHES} queued for {HEALTHY_CLINICS} clinics",
                rate,
                "/s",
                f">= {TARGET_RATE:g}/s",
                rate >= TARGET_RATE,
            )

            hanging = stack.clinics[HANGING_CLINIC]
            hanging.state.faults.set(FaultSpec(endpoint="push", timeout=True))
            for round_number in range(ROUNDS):
                baseline += await _latencies(
                    stack, f"healthy-{round_number}", with_hanging=False
                )
                degraded += await _latencies(
                    stack, f"hanging-{round_number}", with_hanging=True
                )
                await _drop_backlog(stack, HANGING_CLINIC)
            hung_calls = hanging.state.calls["push"]

    baseline_p99 = _p99(baseline) * 1000
    degraded_p99 = _p99(degraded) * 1000
    ratio = degraded_p99 / baseline_p99
    section.add(f"p99 latency, {RATE:g}/s to healthy PIMS", baseline_p99, "ms")
    section.add(
        "p99 latency of healthy clinics while one PIMS hangs", degraded_p99, "ms"
    )
    section.add(
        "ratio of the two p99 latencies",
        ratio,
        "x",
        f"<= {TARGET_RATIO:g}",
        ratio <= TARGET_RATIO,
    )
    section.add(
        "median latency, healthy / one hanging",
        f"{statistics.median(baseline) * 1000:.1f} / "
        f"{statistics.median(degraded) * 1000:.1f}",
        "ms",
    )
    section.notes += [
        f"{HEALTHY_CLINICS} healthy clinics, each with its own reference PIMS in "
        "the benchmark process; coggo-soap-push as a child process with its "
        "default settings (8 attempts at once per clinic, 128 in all, 10 s "
        "time limit).",
        "Latency runs from the publish of the soap.push command to the PIMS "
        f"receiving the envelope, at {RATE:g} commands/s, in {ROUNDS} rounds "
        f"of {SECONDS:g} s with every PIMS healthy and {SECONDS:g} s with one "
        f"clinic in {HEALTHY_CLINICS + 1} whose PIMS never answers "
        f"({hung_calls} attempts to it in all).",
        f"Load average (1 min) at the end: {os.getloadavg()[0]:.1f} on "
        f"{os.cpu_count()} cores; other processes on the machine move these "
        "figures, the p99 most.",
    ]
    return section
