"""Run the ingress: `coggo-ingress` or `python -m ingress`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib

import asyncpg
import structlog
from aiohttp import web
from coggo.broker import Broker
from coggo.credentials import SecretBox
from coggo.db import create_pool
from coggo.outbox import OutboxRelay
from coggo.service import run_service
from coggo.settings import Settings
from coggo.topology import Topology

from ingress.app import Ingress, build_app

log = structlog.get_logger(__name__)


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    box = SecretBox.from_settings(settings)
    topology = Topology(settings.topology_prefix)
    # The ingress never changes session state (no SET, LISTEN, advisory locks
    # or cursors), so the pool skips the reset query that asyncpg would send on
    # every release, a round trip per query. An open transaction is still
    # rolled back on release.
    pool = await create_pool(
        settings.database_url, size=settings.db_pool_size, reset=_keep_session
    )
    broker = Broker(settings.amqp_url, topology, name="coggo-ingress")
    relay = OutboxRelay(pool, broker)
    ingress = Ingress(pool=pool, broker=broker, topology=topology, box=box, relay=relay)

    # The ingress takes events while RabbitMQ is down: they wait in the outbox.
    connecting = asyncio.create_task(broker.maintain())
    relaying = asyncio.create_task(relay.run())
    refreshing = asyncio.create_task(ingress.keys.run())

    runner = web.AppRunner(build_app(ingress), access_log=None, shutdown_timeout=10)
    await runner.setup()
    site = web.TCPSite(
        runner, settings.ingress_host, settings.ingress_port, reuse_port=True
    )
    await site.start()
    log.info(
        "ingress.listening", host=settings.ingress_host, port=settings.ingress_port
    )

    await stop.wait()
    log.info("ingress.stopping")
    # Stop taking requests first; requests in flight finish within shutdown_timeout.
    await runner.cleanup()
    refreshing.cancel()
    relay.stop()
    with contextlib.suppress(asyncio.CancelledError, TimeoutError):
        await asyncio.wait_for(relaying, 10)
    connecting.cancel()
    await broker.close()
    await pool.close()


async def _keep_session(connection: asyncpg.Connection) -> None:
    """Return a connection to the pool as it is."""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="coggo-ingress",
        description=(
            "Serve the Coggo Partner API: GET /v1/partner/ping and POST "
            "/v1/partner/webhooks, plus /healthz, /readyz and /metrics. "
            "Configured by COGGO_* environment variables "
            "(COGGO_DATABASE_URL, COGGO_AMQP_URL, COGGO_INGRESS_PORT, COGGO_SECRET_KEY)."
        ),
    )
    parser.parse_args(argv)
    run_service("coggo-ingress", serve)


if __name__ == "__main__":
    main()
