"""Fixtures: real RabbitMQ and PostgreSQL, isolated per test."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import aio_pika
import asyncpg
import pytest
from coggo import db
from coggo.settings import Settings
from coggo.topology import Topology

from tests.support.infra import Infra, provide_infra
from tests.support.stack import (
    Env,
    HttpClient,
    RunningService,
    free_port,
    start_service,
    wait_for_http,
)

TEMPLATE = f"coggo_test_template_{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def infra() -> Iterator[Infra]:
    with provide_infra() as provided:
        yield provided


@pytest.fixture(scope="session")
async def template_database(infra: Infra) -> AsyncIterator[str]:
    """A database with every migration applied, copied for each test."""
    admin = await asyncpg.connect(infra.postgres_server_url + "postgres")
    await admin.execute(f'CREATE DATABASE "{TEMPLATE}"')
    connection = await asyncpg.connect(infra.postgres_server_url + TEMPLATE)
    try:
        await db.upgrade(connection)
    finally:
        await connection.close()
    yield TEMPLATE
    await admin.execute(f'DROP DATABASE IF EXISTS "{TEMPLATE}" WITH (FORCE)')
    await admin.close()


@pytest.fixture
async def database_url(infra: Infra, template_database: str) -> AsyncIterator[str]:
    name = f"coggo_test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(infra.postgres_server_url + "postgres")
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_database}"')
        yield infra.postgres_server_url + name
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
async def topology(infra: Infra) -> AsyncIterator[Topology]:
    """Exchanges and queues under a prefix of this test's own, removed afterwards."""
    declared = Topology(prefix=f"test-{uuid.uuid4().hex[:10]}.")
    connection = await aio_pika.connect(infra.amqp_url)
    try:
        channel = await connection.channel()
        await declared.declare(channel)
        yield declared
        channel = await connection.channel()
        await declared.delete(channel)
    finally:
        await connection.close()


@pytest.fixture
async def env(
    infra: Infra, database_url: str, topology: Topology
) -> AsyncIterator[Env]:
    from coggo.db import create_pool

    settings = Settings(
        amqp_url=infra.amqp_url,
        database_url=database_url,
        topology_prefix=topology.prefix,
        secret_key="test-secret-key",
        log_format="json",
    )
    pool = await create_pool(database_url, size=5)
    try:
        yield Env(settings=settings, pool=pool, topology=topology)
    finally:
        await pool.close()


@pytest.fixture
async def amqp(infra: Infra) -> AsyncIterator[aio_pika.abc.AbstractRobustConnection]:
    connection = await aio_pika.connect_robust(infra.amqp_url)
    yield connection
    await connection.close()


@pytest.fixture
async def ingress(env: Env) -> AsyncIterator[HttpClient]:
    """The real ingress service on a free loopback port."""
    from ingress.__main__ import serve

    port = free_port()
    service = await start_service(serve, env.service_settings(ingress_port=port))
    base = f"http://127.0.0.1:{port}"
    await wait_for_http(base + "/healthz")
    client = HttpClient(base)
    yield client
    await client.close()
    await service.shutdown()


@pytest.fixture
async def upsert(env: Env) -> AsyncIterator[RunningService]:
    """The real patient-upsert consumer."""
    from patient_upsert.__main__ import serve

    service = await start_service(serve, env.service_settings())
    yield service
    await service.shutdown()
