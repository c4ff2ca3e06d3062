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
from coggo.pipeline.upsert import EventContext, PendingEvent, apply_events
from coggo.schemas.partner import EventType, parse_event_data

from tests.bench.common import bench_env, environment
from tests.bench.report import Section

EVENTS = int(os.environ.get("COGGO_BENCH_UPSERT_EVENTS", "50000"))
CLINIC = "bench-clinic"
CONCURRENCY = 10
CONSUMERS = int(os.environ.get("COGGO_BENCH_UPSERT_CONSUMERS", "2"))
# The consumer's defaults: batches of up to 100 messages, pool size minus 2 at once.
BATCH = 100
WORKERS = CONCURRENCY - 2


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
                        "weight": {
                            "value": 5 + index % 30,
                            "unit": "lb" if index % 2 else "kg",
                        },
                        "externalClientId": f"cli_{index % 12000}",
                    },
                },
            }
        )
    return messages


async def publish(
    amqp_url: str, exchange_name: str, messages: list[dict[str, Any]]
) -> float:
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


async def drain_with_consumers(settings: Any, count: int) -> tuple[float, list[int]]:
    """Start the consumer processes and time them until every message is processed."""
    env = environment(settings)
    env["COGGO_DB_POOL_SIZE"] = str(CONCURRENCY)
    connection = await asyncpg.connect(settings.database_url)
    script = Path(sys.executable).parent / "coggo-patient-upsert"
    started = time.perf_counter()
    processes = [
        subprocess.Popen(
            [str(script)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        for _ in range(CONSUMERS)
    ]
    profiler = None
    if os.environ.get("COGGO_BENCH_PROFILE"):
        # py-spy samples the first consumer while it drains.
        profiler = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "py-spy"),
                "record",
                "--pid",
                str(processes[0].pid),
                "--format",
                "raw",
                "--output",
                os.environ["COGGO_BENCH_PROFILE"],
                "--duration",
                "20",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    try:
        done = 0
        last_report = started
        while done < count:
            await asyncio.sleep(0.25)
            done = await connection.fetchval("SELECT count(*) FROM processed_messages")
            for process in processes:
                if process.poll() is not None:
                    error = process.stderr.read().decode()[-2000:]  # type: ignore[union-attr]
                    raise RuntimeError(f"consumer exited: {error}")
            if time.perf_counter() - last_report > 5:
                backlog = await connection.fetchval("SELECT count(*) FROM outbox")
                print(
                    f"    {done}/{count} processed, {backlog} domain events waiting",
                    flush=True,
                )
                last_report = time.perf_counter()
        elapsed = time.perf_counter() - started
        memory = [_rss_kib(process.pid) for process in processes]
    finally:
        if profiler is not None:
            profiler.wait(60)
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(30)
        await connection.close()
    return elapsed, memory


def _rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


async def straight_sql(
    database_url: str, messages: list[dict[str, Any]], events_exchange: str
) -> float:
    """Run the consumer's SQL for every message directly: same batches, same concurrency."""
    pool = await create_pool(database_url, size=CONCURRENCY)
    batches: asyncio.Queue[list[dict[str, Any]]] = asyncio.Queue()
    for offset in range(0, len(messages), BATCH):
        batches.put_nowait(messages[offset : offset + BATCH])

    async def worker() -> None:
        while not batches.empty():
            batch = batches.get_nowait()
            pending = []
            for message in batch:
                event_type = EventType(message["type"])
                context = EventContext(
                    CLINIC,
                    message["eventId"],
                    datetime.fromisoformat(message["occurredAt"]),
                    "UTC",
                )
                pending.append(
                    PendingEvent(
                        context,
                        event_type,
                        parse_event_data(event_type, message["data"]),
                    )
                )
            async with pool.acquire() as connection, connection.transaction():
                await connection.execute(
                    "INSERT INTO processed_messages (consumer, message_id) SELECT 'bench', unnest($1::text[])",
                    [message["id"] for message in batch],
                )
                events = await apply_events(connection, pending)
                await enqueue_events(connection, events_exchange, events)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(WORKERS)))
    elapsed = time.perf_counter() - started
    await pool.close()
    return elapsed


async def run() -> Section:
    section = Section(
        "patient-upsert: draining queued appointment events",
        f"make bench ARGS=patient_upsert  (COGGO_BENCH_UPSERT_EVENTS={EVENTS}, "
        f"COGGO_BENCH_UPSERT_CONSUMERS={CONSUMERS})",
    )
    messages = build_messages(EVENTS)
    async with bench_env("upsert") as env:
        connection = await asyncpg.connect(env.database_url)
        await create_integration(
            connection,
            SecretBox("bench-secret-key"),
            clinic_id=CLINIC,
            provider="bench",
        )
        await connection.close()
        publish_seconds = await publish(
            env.settings.amqp_url, env.topology.webhooks, messages
        )
        print(f"    queued {EVENTS} events in {publish_seconds:.1f} s", flush=True)
        consumer_seconds, memory = await drain_with_consumers(env.settings, EVENTS)

    async with bench_env("upsert-sql") as env:
        sql_seconds = await straight_sql(
            env.database_url, messages, env.topology.events
        )

    consumer_rate = EVENTS / consumer_seconds
    sql_rate = EVENTS / sql_seconds
    section.add("events drained", EVENTS)
    section.add(
        "consumer rate", consumer_rate, "events/s", ">= 1500", consumer_rate >= 1500
    )
    section.add("straight SQL rate", sql_rate, "events/s")
    ratio = consumer_rate / sql_rate
    section.add("consumer / straight SQL", round(ratio, 2), "", ">= 0.6", ratio >= 0.6)
    section.add("largest consumer resident memory", round(max(memory) / 1024, 1), "MiB")
    section.notes.append(
        f"{CONSUMERS} consumer processes (replicas) drain one queue, each with {CONCURRENCY} "
        f"database connections, prefetch 256 and batches of at most {BATCH} events; each "
        "publishes 3 domain events per message through its outbox. The straight SQL side "
        f"runs {WORKERS} such batches at once in one process and writes the same outbox "
        "rows but publishes nothing."
    )
    return section
