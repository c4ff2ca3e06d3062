"""Run the patient-upsert consumer: `coggo-patient-upsert` or `python -m patient_upsert`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib

import structlog
from coggo.broker import Broker
from coggo.consumer import Consumer
from coggo.db import create_pool
from coggo.ops import check_database, serve_ops
from coggo.outbox import OutboxRelay
from coggo.service import run_service
from coggo.settings import Settings
from coggo.topology import PATIENT_UPSERT_QUEUE, Topology

from patient_upsert.handler import WebhookHandler

log = structlog.get_logger(__name__)


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    topology = Topology(settings.topology_prefix)
    pool = await create_pool(settings.database_url, size=settings.db_pool_size)
    broker = Broker(settings.amqp_url, topology, name="coggo-patient-upsert")
    maintaining = asyncio.create_task(broker.maintain())
    relay = OutboxRelay(pool, broker)
    relaying = asyncio.create_task(relay.run())

    handler = WebhookHandler(
        pool, topology, relay, concurrency=max(1, settings.db_pool_size - 2)
    )
    batching = asyncio.create_task(handler.run())
    consumer = Consumer(
        broker, topology.name(PATIENT_UPSERT_QUEUE), handler, prefetch=settings.prefetch
    )
    await consumer.start()

    ops = None
    if settings.metrics_port:

        async def readiness() -> dict[str, bool]:
            return {"database": await check_database(pool), "broker": broker.connected}

        ops = await serve_ops(settings.ingress_host, settings.metrics_port, readiness)

    await stop.wait()
    log.info("patient_upsert.stopping")
    await consumer.stop()
    batching.cancel()
    relay.stop()
    with contextlib.suppress(asyncio.CancelledError, TimeoutError):
        await asyncio.wait_for(relaying, 10)
    if ops is not None:
        await ops.cleanup()
    await broker.close()
    maintaining.cancel()
    await pool.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="coggo-patient-upsert",
        description=(
            "Consume PIMS events from the coggo.patient-upsert queue and keep "
            "clients, patients, appointments and scheduled visits in step, "
            "publishing domain events on coggo.events. Configured by COGGO_* "
            "environment variables; COGGO_METRICS_PORT serves /healthz, /readyz "
            "and /metrics on a side port."
        ),
    )
    parser.parse_args(argv)
    run_service("coggo-patient-upsert", serve)


if __name__ == "__main__":
    main()
