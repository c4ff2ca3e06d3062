"""Run the reconciliation worker: `coggo-reconciliation` or `python -m reconciliation`."""

from __future__ import annotations

import argparse
import asyncio

import structlog
from coggo.consumer import Consumer
from coggo.credentials import SecretBox
from coggo.outbound import OutboundClient
from coggo.runtime import WorkerRuntime
from coggo.service import run_service
from coggo.settings import Settings
from coggo.topology import RECONCILIATION_QUEUE

from reconciliation.handler import CommandHandler
from reconciliation.pims import PimsClient
from reconciliation.worker import Worker

log = structlog.get_logger(__name__)

# Time that runs in flight get to finish after SIGTERM; their messages return
# to the queue if they do not, and the next worker continues them.
STOP_TIMEOUT_SECONDS = 25.0


def run_slot_count(pool_size: int) -> int:
    """Return how many runs may hold a database connection at once.

    Half the pool, so that searches and imports always find a connection.
    """
    return max(1, pool_size // 2)


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    box = SecretBox.from_settings(settings)
    runtime = await WorkerRuntime.start(settings, "coggo-reconciliation")
    outbound = OutboundClient(allow_private=settings.allow_private_targets)
    worker = Worker(
        pool=runtime.pool,
        box=box,
        topology=runtime.topology,
        broker=runtime.broker,
        relay=runtime.relay,
        pims=PimsClient(outbound),
        run_slots=asyncio.Semaphore(run_slot_count(settings.db_pool_size)),
    )
    consumer = Consumer(
        runtime.broker,
        runtime.topology.name(RECONCILIATION_QUEUE),
        CommandHandler(worker),
        prefetch=settings.prefetch,
    )
    await consumer.start()
    await runtime.serve_ops()

    await stop.wait()
    log.info("reconciliation.stopping", in_flight=consumer.in_flight)
    await consumer.stop(timeout=STOP_TIMEOUT_SECONDS)
    await runtime.close()
    await outbound.close()


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
