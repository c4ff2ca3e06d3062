"""Run the reconciliation worker: `coggo-reconciliation` or `python -m reconciliation`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib

import structlog
from coggo.broker import Broker
from coggo.consumer import Consumer
from coggo.credentials import SecretBox
from coggo.db import create_pool
from coggo.ops import check_database, serve_ops
from coggo.outbound import OutboundClient
from coggo.outbox import OutboxRelay
from coggo.service import run_service
from coggo.settings import Settings
from coggo.topology import RECONCILIATION_QUEUE, Topology

from reconciliation.handler import CommandHandler
from reconciliation.pims import PimsClient
from reconciliation.worker import Worker

log = structlog.get_logger(__name__)

# Time that runs in flight get to finish after SIGTERM; their messages return
# to the queue if they do not, and the next worker continues them.
STOP_TIMEOUT_SECONDS = 25.0
FINAL_DRAIN_SECONDS = 5.0


def run_slot_count(pool_size: int) -> int:
    """Return how many runs may hold a database connection at once.

    Half the pool, so that searches and imports always find a connection.
    """
    return max(1, pool_size // 2)


async def publish_remaining(relay: OutboxRelay) -> None:
    """Publish the events that the last runs wrote, before the broker closes.

    Rows left over are published later by the relay of any other process.
    """
    try:
        await asyncio.wait_for(relay.drain_once(), FINAL_DRAIN_SECONDS)
    except Exception as exc:
        log.warning("outbox.final_publish_failed", error=repr(exc))


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    box = SecretBox.from_settings(settings)
    topology = Topology(settings.topology_prefix)
    pool = await create_pool(settings.database_url, size=settings.db_pool_size)
    broker = Broker(settings.amqp_url, topology, name="coggo-reconciliation")
    maintaining = asyncio.create_task(broker.maintain())
    relay = OutboxRelay(pool, broker)
    relaying = asyncio.create_task(relay.run())
    outbound = OutboundClient(allow_private=settings.allow_private_targets)

    worker = Worker(
        pool=pool,
        box=box,
        topology=topology,
        broker=broker,
        relay=relay,
        pims=PimsClient(outbound),
        run_slots=asyncio.Semaphore(run_slot_count(settings.db_pool_size)),
    )
    consumer = Consumer(
        broker,
        topology.name(RECONCILIATION_QUEUE),
        CommandHandler(worker),
        prefetch=settings.prefetch,
    )
    await consumer.start()

    ops = None
    if settings.metrics_port:

        async def readiness() -> dict[str, bool]:
            return {"database": await check_database(pool), "broker": broker.connected}

        ops = await serve_ops(settings.ingress_host, settings.metrics_port, readiness)

    await stop.wait()
    log.info("reconciliation.stopping", in_flight=consumer.in_flight)
    await consumer.stop(timeout=STOP_TIMEOUT_SECONDS)
    relay.stop()
    with contextlib.suppress(asyncio.CancelledError, TimeoutError):
        await asyncio.wait_for(relaying, 10)
    await publish_remaining(relay)
    if ops is not None:
        await ops.cleanup()
    await outbound.close()
    await broker.close()
    maintaining.cancel()
    await pool.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="coggo-reconciliation",
        description=(
            "Consume reconcile.appointments, species.refresh, patients.search "
            "and patients.import from the coggo.reconciliation queue: call each "
            "clinic's PIMS, apply what it returns through the upsert pipeline, "
            "and publish reconcile.completed and species.refreshed on "
            "coggo.events. Configured by COGGO_* environment variables; "
            "COGGO_METRICS_PORT serves /healthz, /readyz and /metrics on a side "
            "port."
        ),
    )
    parser.parse_args(argv)
    run_service("coggo-reconciliation", serve)


if __name__ == "__main__":
    main()
