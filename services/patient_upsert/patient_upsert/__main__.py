"""Run the patient-upsert consumer: `coggo-patient-upsert` or `python -m patient_upsert`."""

from __future__ import annotations

import argparse
import asyncio

import structlog
from coggo.consumer import Consumer
from coggo.runtime import WorkerRuntime
from coggo.service import run_service
from coggo.settings import Settings
from coggo.topology import PATIENT_UPSERT_QUEUE

from patient_upsert.handler import WebhookHandler

log = structlog.get_logger(__name__)


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    runtime = await WorkerRuntime.start(settings, "coggo-patient-upsert")
    handler = WebhookHandler(runtime.pool, runtime.topology, runtime.relay)
    batching = asyncio.create_task(handler.run())
    consumer = Consumer(
        runtime.broker,
        runtime.topology.name(PATIENT_UPSERT_QUEUE),
        handler,
        prefetch=settings.prefetch,
    )
    await consumer.start()
    await runtime.serve_ops()

    await stop.wait()
    log.info("patient_upsert.stopping")
    await consumer.stop()
    batching.cancel()
    await runtime.close()


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
