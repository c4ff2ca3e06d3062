"""Operational HTTP routes: /healthz, /readyz and /metrics.

/healthz returns 200 while the process runs its event loop, so a liveness probe
restarts only a stuck process. /readyz returns 200 only while every dependency
check passes (PostgreSQL runs a query, the RabbitMQ connection is open), and
503 with the failing checks otherwise. /metrics is the Prometheus text format of
the process's default registry.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import asyncpg
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from coggo.broker import Broker

ReadinessCheck = Callable[[], Awaitable[dict[str, bool]]]

# A hung PostgreSQL must not hold the probe open: the check fails after this long.
DATABASE_CHECK_TIMEOUT_SECONDS = 1.0


def add_ops_routes(app: web.Application, readiness: ReadinessCheck) -> None:
    """Add /healthz, /readyz and /metrics to an aiohttp application."""

    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_request: web.Request) -> web.Response:
        checks = await readiness()
        ready = all(checks.values())
        return web.json_response(
            {"status": "ready" if ready else "not_ready", "checks": checks},
            status=200 if ready else 503,
        )

    async def metrics(_request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)


async def serve_ops(host: str, port: int, readiness: ReadinessCheck) -> web.AppRunner:
    """Serve the operational routes of a worker on a side port."""
    app = web.Application()
    add_ops_routes(app, readiness)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


def service_readiness(pool: asyncpg.Pool, broker: Broker) -> ReadinessCheck:
    """Return the readiness check of a service that uses PostgreSQL and RabbitMQ."""

    async def readiness() -> dict[str, bool]:
        return {"database": await check_database(pool), "broker": broker.connected}

    return readiness


async def check_database(pool: asyncpg.Pool) -> bool:
    """Return True when PostgreSQL runs a query within DATABASE_CHECK_TIMEOUT_SECONDS."""
    try:
        async with asyncio.timeout(DATABASE_CHECK_TIMEOUT_SECONDS):
            return bool(await pool.fetchval("SELECT 1"))
    except Exception:
        # Whatever the failure (timeout, refused connection, closed pool), the
        # service cannot do its work, so it is not ready.
        return False
