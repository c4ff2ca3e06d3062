"""The shared parts of every worker process: a pool, a broker link, an outbox relay, ops routes."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any

import asyncpg
from aiohttp import web

from coggo.broker import Broker
from coggo.db import create_pool
from coggo.ops import check_database, serve_ops
from coggo.outbox import OutboxRelay
from coggo.settings import Settings
from coggo.topology import Topology

# Time the relay gets at shutdown to publish what the last work wrote. Rows it
# does not publish stay in the outbox for the relay of any other process.
RELAY_STOP_SECONDS = 10.0


@dataclass
class WorkerRuntime:
    settings: Settings
    topology: Topology
    pool: asyncpg.Pool
    broker: Broker
    relay: OutboxRelay
    _tasks: tuple[asyncio.Task[None], ...]
    _ops: web.AppRunner | None = None

    @classmethod
    async def start(
        cls, settings: Settings, name: str, **pool_options: Any
    ) -> WorkerRuntime:
        """Open the pool, start keeping the broker connected and the relay running."""
        topology = Topology(settings.topology_prefix)
        pool = await create_pool(
            settings.database_url, size=settings.db_pool_size, **pool_options
        )
        broker = Broker(settings.amqp_url, topology, name=name)
        relay = OutboxRelay(pool, broker)
        tasks = (
            asyncio.create_task(broker.maintain()),
            asyncio.create_task(relay.run()),
        )
        return cls(settings, topology, pool, broker, relay, tasks)

    async def serve_ops(self) -> None:
        """Serve /healthz, /readyz and /metrics on COGGO_METRICS_PORT, if set."""
        if not self.settings.metrics_port:
            return

        async def readiness() -> dict[str, bool]:
            return {
                "database": await check_database(self.pool),
                "broker": self.broker.connected,
            }

        self._ops = await serve_ops(
            self.settings.ingress_host, self.settings.metrics_port, readiness
        )

    async def close(self) -> None:
        """Let the relay publish what is pending, then close everything."""
        maintaining, relaying = self._tasks
        self.relay.stop()
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            await asyncio.wait_for(relaying, RELAY_STOP_SECONDS)
        if self._ops is not None:
            await self._ops.cleanup()
        await self.broker.close()
        maintaining.cancel()
        await self.pool.close()
