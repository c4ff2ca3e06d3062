"""What the benchmarks share: a throwaway database and topology on the local servers."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import aio_pika
import asyncpg
from coggo import db
from coggo.settings import Settings
from coggo.topology import Topology

from tests.support.infra import DEFAULT_AMQP_URL, DEFAULT_DATABASE_URL

AMQP_URL = os.environ.get("COGGO_AMQP_URL", DEFAULT_AMQP_URL)
SERVER_URL = (
    os.environ.get("COGGO_DATABASE_URL", DEFAULT_DATABASE_URL).rsplit("/", 1)[0] + "/"
)


@dataclass
class BenchEnv:
    database_url: str
    topology: Topology
    settings: Settings


@asynccontextmanager
async def bench_env(name: str) -> AsyncIterator[BenchEnv]:
    """A fresh migrated database and topology prefix, removed afterwards."""
    suffix = uuid.uuid4().hex[:8]
    database = f"coggo_bench_{name}_{suffix}"
    admin = await asyncpg.connect(SERVER_URL + "postgres")
    await admin.execute(f'CREATE DATABASE "{database}"')
    url = SERVER_URL + database
    connection = await asyncpg.connect(url)
    await db.upgrade(connection)
    await connection.close()

    topology = Topology(prefix=f"bench-{name}-{suffix}.")
    amqp = await aio_pika.connect(AMQP_URL)
    channel = await amqp.channel()
    await topology.declare(channel)
    settings = Settings(
        amqp_url=AMQP_URL,
        database_url=url,
        topology_prefix=topology.prefix,
        secret_key="bench-secret-key",
        log_level="warning",
    )
    try:
        yield BenchEnv(url, topology, settings)
    finally:
        channel = await amqp.channel()
        await topology.delete(channel)
        await amqp.close()
        await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        await admin.close()


def environment(settings: Settings) -> dict[str, str]:
    """Environment variables that give a child process these settings."""
    env = dict(os.environ)
    for key, value in settings.model_dump().items():
        if value is None:
            continue
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        env[f"COGGO_{key.upper()}"] = str(value)
    env["COGGO_LOG_FORMAT"] = "json"
    return env
