"""Drain queued appointment events through the patient-upsert consumer.

Publishes N `appointment.created` messages to the webhooks exchange, then
starts `coggo-patient-upsert` and times how long it takes to process them all.
In the same run, the same events go straight through the pipeline's SQL with
asyncpg (no broker, no message parsing) at the same concurrency, which gives
the rate the database allows; the ratio of the two is the consumer's overhead.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import orjson

from coggo.credentials import SecretBox
from coggo.db import create_pool
from coggo.integrations import create_integration
from coggo.outbox import enqueue_events
from coggo.pipeline.upsert import EventContext, apply_event
from coggo.schemas.partner import EventType, parse_event_data
from tests.bench.common import bench_env, environment
from tests.bench.report import Section

EVENTS = int(os.environ.get("COGGO_BENCH_UPSERT_EVENTS", "50000"))
CLINIC = "bench-clinic"
CONCURRENCY = 10


def build_messages(count: int) -> list[dict[str, Any]]:
    start = datetime(2026, 6, 1, tzinfo=UTC)
    messages = []
    for index in range(count):
        occurred = start + timedelta(seconds=index)
        messages.append(
            {
                "id": str(uuid.uuid4()),
                "type": "appointment.created",
                "occurredAt": occurred.isoformat(),
                "clinicId": CLINIC,
                "eventId": f"evt_{index}",
                "data": {
                    "appointment": {
                        "externalId": f"apt_{index}",
                        "startsAt": f"2026-07-{1 + index % 28:02d}T{8 + index % 10:02d}:30:00",
                        "timezone": "America/New_York",
                        "reason": "Annual exam",
                    },
                    "client": {
                        "externalId": f"cli_{index % 12000}",
                        "firstName": "Owner",
                        "lastName": f"Number {index % 12000}",
                        "email": f"owner{index % 12000}@example.com",
                    },
                    "patient": {
                        "externalId": f"pat_{index % 20000}",
                        "name": f"Pet {index % 20000}",
                        "species": "dog" if index % 2 else "cat",
                        "breed": ["Beagle", "Collie", "Mixed"][index % 3],
                        "weight": {"value": 5 + index % 30, "unit": "lb" if index % 2 else "kg"},
                        "externalClientId": f"cli_{index % 12000}",
                    },
                },
            }
        )
    return messages


async def publish(amqp_url: str, exchange_name: str, messages: list[dict[str, Any]]) -> float:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(exchange_name)
        started = time.perf_counter()
        for offset in range(0, len(messages), 1000):
            await asyncio.gather(
                *(
                    exchange.publish(
                        aio_pika.Message(
                            orjson.dumps(message),
                            message_id=message["id"],
                            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                        ),
                        routing_key=message["type"],
                    )
                    for message in messages[offset : offset + 1000]
                )
            )
        return time.perf_counter() - started


async def drain_with_consumer(settings: Any, count: int) -> tuple[float, int]:
    """Start the consumer process and time it until every message is processed."""
    env = environment(settings)
    env["COGGO_PREFETCH"] = "200"
    env["COGGO_DB_POOL_SIZE"] = str(CONCURRENCY)
    pool = await asyncpg.connect(settings.database_url)
    script = Path(sys.executable).parent / "coggo-patient-upsert"
    started = time.perf_counter()
    process = subprocess.Popen([str(script)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # noqa: S603
    try:
        done = 0
        last_report = started
        while done < count:
            await asyncio.sleep(0.25)
            done = await pool.fetchval("SELECT count(*) FROM processed_messages")
            if process.poll() is not None:
                raise RuntimeError(f"consumer exited: {process.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
            if time.perf_counter() - last_report > 5:
                print(f"    consumer: {done}/{count} processed", flush=True)
                last_report = time.perf_counter()
        elapsed = time.perf_counter() - started
        rss = _rss_kib(process.pid)
    finally:
        process.terminate()
        process.wait(30)
        await pool.close()
    return elapsed, rss


def _rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


async def straight_sql(database_url: str, messages: list[dict[str, Any]], events_exchange: str) -> float:
    """Run the same pipeline SQL for every message directly, CONCURRENCY at a time."""
    pool = await create_pool(database_url, size=CONCURRENCY)
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    for message in messages:
        queue.put_nowait(message)

    async def worker() -> None:
        while not queue.empty():
            message = queue.get_nowait()
            event_type = EventType(message["type"])
            data = parse_event_data(event_type, message["data"])
            async with pool.acquire() as connection, connection.transaction():
                await connection.execute(
                    "INSERT INTO processed_messages (consumer, message_id) VALUES ('bench', $1)",
                    message["id"],
                )
                context = EventContext(
                    CLINIC, message["eventId"], datetime.fromisoformat(message["occurredAt"]), "UTC"
                )
                events = await apply_event(connection, context, event_type, data)
                await enqueue_events(connection, events_exchange, events)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    elapsed = time.perf_counter() - started
    await pool.close()
    return elapsed


async def run() -> Section:
    section = Section(
        "patient-upsert: draining queued appointment events",
        f"make bench ARGS=patient_upsert  (COGGO_BENCH_UPSERT_EVENTS={EVENTS})",
    )
    messages = build_messages(EVENTS)
    async with bench_env("upsert") as env:
        connection = await asyncpg.connect(env.database_url)
        await create_integration(
            connection, SecretBox("bench-secret-key"), clinic_id=CLINIC, provider="bench"
        )
        await connection.close()
        publish_seconds = await publish(env.settings.amqp_url, env.topology.webhooks, messages)
        print(f"    queued {EVENTS} events in {publish_seconds:.1f} s", flush=True)
        consumer_seconds, rss = await drain_with_consumer(env.settings, EVENTS)

    async with bench_env("upsert-sql") as env:
        sql_seconds = await straight_sql(env.database_url, messages, env.topology.events)

    consumer_rate = EVENTS / consumer_seconds
    sql_rate = EVENTS / sql_seconds
    section.add("events drained", EVENTS)
    section.add("consumer rate", consumer_rate, "events/s", ">= 1500", consumer_rate >= 1500)
    section.add("straight SQL rate", sql_rate, "events/s")
    ratio = consumer_rate / sql_rate
    section.add("consumer / straight SQL", round(ratio, 2), "", ">= 0.6", ratio >= 0.6)
    section.add("consumer resident memory at the end", round(rss / 1024, 1), "MiB")
    section.notes.append(
        f"{CONCURRENCY} database connections on both sides; the consumer runs as its own process "
        "with prefetch 200 and publishes 3 domain events per message through its outbox."
    )
    return section
