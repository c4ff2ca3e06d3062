"""Where the tests find RabbitMQ and PostgreSQL.

With a Docker engine, testcontainers starts throwaway servers for the session.
Without one, the tests use the servers named by COGGO_AMQP_URL and
COGGO_DATABASE_URL (by default the local ones) and isolate each test by giving
it its own database and its own exchange and queue names.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/coggo"


@dataclass(frozen=True)
class Infra:
    amqp_url: str
    # URL of the server with no database name; tests append their own.
    postgres_server_url: str
    source: str


def _docker_available() -> bool:
    if os.environ.get("COGGO_TEST_NO_DOCKER"):
        return False
    try:
        import docker  # imported by testcontainers

        client = docker.from_env(timeout=3)
        client.ping()
    except Exception:
        return False
    return True


def _server_url(database_url: str) -> str:
    match = re.match(r"^(?P<base>.*/)[^/?]*(?P<query>\?.*)?$", database_url)
    if match is None:
        raise ValueError(
            "COGGO_DATABASE_URL must look like postgresql://user@host:port/name"
        )
    return match["base"]


@contextmanager
def provide_infra() -> Iterator[Infra]:
    if not _docker_available():
        yield Infra(
            amqp_url=os.environ.get("COGGO_AMQP_URL", DEFAULT_AMQP_URL),
            postgres_server_url=_server_url(
                os.environ.get("COGGO_DATABASE_URL", DEFAULT_DATABASE_URL)
            ),
            source="local services",
        )
        return

    from testcontainers.postgres import PostgresContainer
    from testcontainers.rabbitmq import RabbitMqContainer

    with ExitStack() as stack:
        postgres = stack.enter_context(PostgresContainer("postgres:16-alpine"))
        rabbit = stack.enter_context(RabbitMqContainer("rabbitmq:4.1-alpine"))
        host = postgres.get_container_host_ip()
        port = postgres.get_exposed_port(5432)
        yield Infra(
            amqp_url=(
                f"amqp://guest:guest@{rabbit.get_container_host_ip()}:"
                f"{rabbit.get_exposed_port(5672)}/"
            ),
            postgres_server_url=(
                f"postgresql://{postgres.username}:{postgres.password}@{host}:{port}/"
            ),
            source="testcontainers",
        )
