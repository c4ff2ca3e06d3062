"""Operations: health, readiness, metrics, graceful stop on SIGTERM and the secret key."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import uuid
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

import aio_pika
import aiohttp
import asyncpg
import orjson
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage
from coggo.broker import Broker
from coggo.consumer import Consumer
from coggo.topology import PATIENT_UPSERT_QUEUE
from prometheus_client.parser import text_string_to_metric_families

from tests.support.admin import OutputReader
from tests.support.events import appointment_event, encode, signed_headers
from tests.support.proxy import TcpProxy
from tests.support.stack import (
    Env,
    HttpClient,
    RunningService,
    free_port,
    start_service,
    subprocess_service,
    wait_for_http,
    wait_until,
)

WEBHOOKS = "/v1/partner/webhooks"


async def _wait_exit(process: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    """Wait for a child process to exit without blocking the event loop."""
    await asyncio.to_thread(process.wait, timeout)


async def _get(url: str) -> tuple[int, str, str]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, response.headers["Content-Type"], await response.text()


def _sample(text: str, name: str, **labels: str) -> float:
    """Return the value of one sample in Prometheus text, 0 when absent."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(
                sample.labels.get(key) == value for key, value in labels.items()
            ):
                return float(sample.value)
    return 0.0


async def _metrics(base_url: str) -> str:
    status, _, text = await _get(base_url + "/metrics")
    assert status == 200
    return text


def _webhook_message(clinic_id: str, index: int) -> bytes:
    event = appointment_event(
        f"evt_{index}", appointment=f"apt_{index}", patient=f"pat_{index}"
    )
    return orjson.dumps(
        {
            "id": str(uuid.uuid4()),
            "type": "appointment.created",
            "occurredAt": event["occurredAt"],
            "clinicId": clinic_id,
            "eventId": event["id"],
            "data": event["data"],
        }
    )


async def _publish_webhooks(
    env: Env, amqp: AbstractConnection, count: int
) -> list[str]:
    channel = await amqp.channel()
    exchange = await channel.get_exchange(env.topology.webhooks)
    ids = []
    for index in range(count):
        body = _webhook_message("clinic-1", index)
        message_id = orjson.loads(body)["id"]
        await exchange.publish(
            aio_pika.Message(
                body,
                message_id=message_id,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key="appointment.created",
        )
        ids.append(message_id)
    return ids


async def _queue_count(amqp: AbstractConnection, name: str) -> int:
    channel = await amqp.channel()
    try:
        underlay = await channel.get_underlay_channel()
        declared = await underlay.queue_declare(name, passive=True)
        return declared.message_count or 0
    finally:
        await channel.close()


# /healthz, /readyz, /metrics


async def test_ingress_health_readiness_and_metrics(
    env: Env, ingress: HttpClient
) -> None:
    status, _, body = await _get(ingress.base_url + "/healthz")
    assert status == 200
    assert orjson.loads(body) == {"status": "ok"}

    async def ready() -> bool:
        return (await _get(ingress.base_url + "/readyz"))[0] == 200

    await wait_until(ready)
    _, _, body = await _get(ingress.base_url + "/readyz")
    assert orjson.loads(body) == {
        "status": "ready",
        "checks": {"database": True, "broker": True},
    }

    status, content_type, text = await _get(ingress.base_url + "/metrics")
    assert status == 200
    assert content_type.startswith("text/plain")
    for name in (
        "coggo_http_requests_total",
        "coggo_events_accepted_total",
        "coggo_messages_processed_total",
        "coggo_messages_failed_total",
        "coggo_messages_dead_lettered_total",
        "coggo_outbox_backlog",
        "coggo_push_attempts_total",
        "coggo_reconcile_seconds",
    ):
        assert f"# TYPE {name}" in text, name
    assert _sample(text, "coggo_push_attempts_total", result="sent") == 0


async def test_readyz_fails_while_database_unreachable(env: Env) -> None:
    from ingress.__main__ import serve

    server = urlsplit(env.settings.database_url)
    assert server.hostname is not None
    proxy = TcpProxy(server.hostname, server.port or 5432)
    await proxy.start()
    database_url = env.settings.database_url.replace(
        server.netloc.rsplit("@", 1)[-1], f"127.0.0.1:{proxy.port}"
    )
    assert database_url != env.settings.database_url
    port = free_port()
    service = await start_service(
        serve, env.service_settings(database_url=database_url, ingress_port=port)
    )
    base = f"http://127.0.0.1:{port}"
    try:
        await wait_for_http(base + "/healthz")

        async def readiness(expected: int) -> bool:
            return (await _get(base + "/readyz"))[0] == expected

        await wait_until(lambda: readiness(200))
        await proxy.cut()
        await wait_until(lambda: readiness(503), timeout=10)
        _, _, body = await _get(base + "/readyz")
        assert orjson.loads(body) == {
            "status": "not_ready",
            "checks": {"database": False, "broker": True},
        }
        # Liveness does not depend on the database: a restart would not help.
        assert (await _get(base + "/healthz"))[0] == 200

        await proxy.restore()
        await wait_until(lambda: readiness(200), timeout=15)
    finally:
        await service.shutdown()
        await proxy.cut()


async def test_readyz_fails_while_broker_unreachable(env: Env) -> None:
    from ingress.__main__ import serve

    port = free_port()
    dead_broker = f"amqp://guest:guest@127.0.0.1:{free_port()}/"
    service = await start_service(
        serve, env.service_settings(amqp_url=dead_broker, ingress_port=port)
    )
    base = f"http://127.0.0.1:{port}"
    try:
        await wait_for_http(base + "/healthz")
        status, _, body = await _get(base + "/readyz")
        assert status == 503
        assert orjson.loads(body)["checks"] == {"database": True, "broker": False}
    finally:
        await service.shutdown()


async def test_worker_serves_ops_routes_on_side_port(env: Env) -> None:
    from patient_upsert.__main__ import serve

    port = free_port()
    service = await start_service(serve, env.service_settings(metrics_port=port))
    base = f"http://127.0.0.1:{port}"
    try:
        await wait_for_http(base + "/healthz")

        async def ready() -> bool:
            return (await _get(base + "/readyz"))[0] == 200

        await wait_until(ready)
        text = await _metrics(base)
        assert "# TYPE coggo_messages_processed_total counter" in text
        assert "# TYPE coggo_outbox_backlog gauge" in text
    finally:
        await service.shutdown()


# Metrics values


async def test_metrics_count_requests_events_and_messages(
    env: Env,
    ingress: HttpClient,
    upsert: RunningService,
    amqp: AbstractConnection,
) -> None:
    created = await env.create_integration("clinic-1")
    queue = env.topology.name(PATIENT_UPSERT_QUEUE)
    before = await _metrics(ingress.base_url)

    body = encode(appointment_event("evt_metrics"))
    response = await ingress.request(
        "POST",
        WEBHOOKS,
        data=body,
        headers=signed_headers(created.api_key, None, body),
    )
    assert response.status == 200
    unauthorized = await ingress.request(
        "POST", WEBHOOKS, data=body, headers={"Content-Type": "application/json"}
    )
    assert unauthorized.status == 401
    channel = await amqp.channel()
    exchange = await channel.get_exchange(env.topology.webhooks)
    await exchange.publish(
        aio_pika.Message(b'{"id": "bad-1", "type": "x"}', message_id="bad-1"),
        routing_key="appointment.created",
    )

    async def counted() -> str | None:
        text = await _metrics(ingress.base_url)
        processed = _sample(text, "coggo_messages_processed_total", queue=queue)
        dead = _sample(
            text,
            "coggo_messages_dead_lettered_total",
            queue=queue,
            reason="invalid_message",
        )
        return text if processed >= 1 and dead >= 1 else None

    after = await wait_until(counted)

    def delta(name: str, **labels: str) -> float:
        return _sample(after, name, **labels) - _sample(before, name, **labels)

    assert delta("coggo_http_requests_total", route=WEBHOOKS, status="200") == 1
    assert delta("coggo_http_requests_total", route=WEBHOOKS, status="401") == 1
    assert (
        delta(
            "coggo_events_accepted_total",
            type="appointment.created",
            duplicate="false",
        )
        == 1
    )
    assert delta("coggo_messages_processed_total", queue=queue) == 1
    assert (
        delta(
            "coggo_messages_dead_lettered_total",
            queue=queue,
            reason="invalid_message",
        )
        == 1
    )
    assert _sample(after, "coggo_messages_in_flight", queue=queue) == 0


async def test_consumer_counts_failed_and_in_flight_messages(
    env: Env, amqp: AbstractConnection
) -> None:
    """A transient failure returns the message to its queue and counts as failed."""
    from coggo import metrics

    queue = env.topology.name(PATIENT_UPSERT_QUEUE)
    release = asyncio.Event()
    calls: list[str] = []

    async def handler(
        _body: dict[str, object], message: AbstractIncomingMessage
    ) -> None:
        calls.append(message.message_id or "")
        # Every attempt at the first delivery fails, so the message goes back
        # to the queue; its redelivery is held until released.
        if not message.redelivered:
            raise OSError("database unreachable")
        await release.wait()

    broker = Broker(env.settings.amqp_url, env.topology, name="test-consumer")
    await broker.connect(attempts=3)
    consumer = Consumer(broker, queue, handler, attempts=2)
    failed = metrics.MESSAGES_FAILED.labels(queue)
    in_flight = metrics.MESSAGES_IN_FLIGHT.labels(queue)
    failed_before = failed._value.get()
    try:
        await consumer.start()
        await _publish_webhooks(env, amqp, 1)

        async def held() -> bool:
            return len(calls) == 3 and in_flight._value.get() == 1

        await wait_until(held)
        assert failed._value.get() - failed_before == 1
        release.set()
        await wait_until(lambda: _idle(consumer))
        assert in_flight._value.get() == 0
    finally:
        release.set()
        await consumer.stop()
        await broker.close()


async def _idle(consumer: Consumer) -> bool:
    return consumer.in_flight == 0 and consumer.processed == 1


async def test_outbox_backlog_rises_and_falls(env: Env, infra: object) -> None:
    from ingress.__main__ import serve

    amqp_url = env.settings.amqp_url
    host, port = amqp_url.split("@", 1)[1].split("/")[0].split(":")
    proxy = TcpProxy(host, int(port))
    await proxy.start()
    ingress_port = free_port()
    service = await start_service(
        serve,
        env.service_settings(
            amqp_url=amqp_url.replace(f"{host}:{port}", f"127.0.0.1:{proxy.port}"),
            ingress_port=ingress_port,
        ),
    )
    client = HttpClient(f"http://127.0.0.1:{ingress_port}")
    try:
        await wait_for_http(client.base_url + "/healthz")
        created = await env.create_integration("clinic-1")
        await proxy.cut()
        for index in range(3):
            body = encode(appointment_event(f"evt_backlog_{index}"))
            response = await client.request(
                "POST",
                WEBHOOKS,
                data=body,
                headers=signed_headers(created.api_key, None, body),
            )
            assert response.status == 200

        async def backlog(expected: float) -> bool:
            text = await _metrics(client.base_url)
            return _sample(text, "coggo_outbox_backlog") == expected

        await wait_until(lambda: backlog(3), timeout=20)
        await proxy.restore()
        await wait_until(lambda: backlog(0), timeout=30)
        assert await env.pool.fetchval("SELECT count(*) FROM outbox") == 0
    finally:
        await client.close()
        await service.shutdown()
        await proxy.cut()


# SIGTERM


async def _waiting_for_lock(pool: asyncpg.Pool) -> int:
    return int(
        await pool.fetchval(
            """
            SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation
            WHERE c.relname = 'processed_messages' AND NOT l.granted
              AND l.database = (SELECT oid FROM pg_database
                                WHERE datname = current_database())
            """
        )
    )


async def test_sigterm_finishes_messages_in_flight(
    env: Env, amqp: AbstractConnection
) -> None:
    await env.create_integration("clinic-1")
    total = 30
    await _publish_webhooks(env, amqp, total)
    queue = env.topology.name(PATIENT_UPSERT_QUEUE)
    metrics_port = free_port()

    # Holding this lock keeps every delivery the service takes in flight: its
    # handler waits to record the message as processed.
    blocker = await env.pool.acquire()
    transaction = blocker.transaction()
    await transaction.start()
    await blocker.execute("LOCK TABLE processed_messages IN SHARE ROW EXCLUSIVE MODE")
    released = False
    settings = env.service_settings(metrics_port=metrics_port, prefetch=5)
    try:
        with subprocess_service("coggo-patient-upsert", settings) as process:
            output = OutputReader(process).start()
            await wait_until(lambda: _waiting_for_lock(env.pool), timeout=30)
            text = await _metrics(f"http://127.0.0.1:{metrics_port}")
            assert _sample(text, "coggo_messages_in_flight", queue=queue) == 5

            process.send_signal(signal.SIGTERM)
            await asyncio.sleep(1.0)
            assert process.poll() is None, "the service exited with messages in flight"

            await transaction.rollback()
            released = True
            await _wait_exit(process)
            assert process.returncode == 0
            output.join()
    finally:
        if not released:
            await transaction.rollback()
        await env.pool.release(blocker)

    processed = await env.pool.fetchval("SELECT count(*) FROM processed_messages")
    remaining = await _queue_count(amqp, queue)
    assert processed == 5
    assert processed + remaining == total
    assert output.has_event("consumer.stopped")
    assert output.has_event("service.stopped")
    assert not output.has_event("consumer.stop_timed_out")
    assert not output.has_event("message.settle_failed")


async def test_sigterm_stops_ingress_cleanly(env: Env) -> None:
    port = free_port()
    settings = env.service_settings(ingress_port=port)
    with subprocess_service("coggo-ingress", settings) as process:
        output = OutputReader(process).start()
        await wait_for_http(f"http://127.0.0.1:{port}/healthz", timeout=30)
        process.send_signal(signal.SIGTERM)
        await _wait_exit(process)
        assert process.returncode == 0
        output.join()
    assert output.has_event("ingress.stopping")
    assert output.has_event("service.stopped")


async def test_consumer_does_not_resubscribe_after_stop(
    env: Env, amqp: AbstractConnection
) -> None:
    queue = env.topology.name(PATIENT_UPSERT_QUEUE)

    async def handler(
        _body: dict[str, object], _message: AbstractIncomingMessage
    ) -> None:
        return None

    broker = Broker(env.settings.amqp_url, env.topology, name="test-consumer")
    maintaining = asyncio.create_task(broker.maintain())
    consumer = Consumer(broker, queue, handler)
    try:
        await wait_until(_connected(broker))
        await consumer.start()
        await wait_until(lambda: _consumers(amqp, queue, 1))
        await consumer.stop()
        await wait_until(lambda: _consumers(amqp, queue, 0))

        # A reconnection after stop() must not start consuming again.
        assert broker._connection is not None
        await broker._connection.close()
        await wait_until(_connected(broker))
        await asyncio.sleep(0.5)
        assert await _consumers(amqp, queue, 0)
    finally:
        await broker.close()
        maintaining.cancel()


def _connected(broker: Broker) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return broker.connected

    return check


async def _consumers(amqp: AbstractConnection, name: str, expected: int) -> bool:
    channel = await amqp.channel()
    try:
        underlay = await channel.get_underlay_channel()
        declared = await underlay.queue_declare(name, passive=True)
        return declared.consumer_count == expected
    finally:
        await channel.close()


# COGGO_SECRET_KEY


async def _exit_of(
    command: str, env: Env, extra_env: dict[str, str]
) -> tuple[int, list[str]]:
    settings = env.service_settings(ingress_port=free_port(), metrics_port=0)
    with subprocess_service(command, settings, extra_env=extra_env) as process:
        output = OutputReader(process).start()
        await _wait_exit(process)
        assert process.returncode is not None, f"{command} did not exit"
        return process.returncode, output.join()


async def test_services_refuse_to_start_without_secret_key(env: Env) -> None:
    for command in ("coggo-ingress", "coggo-patient-upsert"):
        code, lines = await _exit_of(
            command, env, {"COGGO_SECRET_KEY": "", "COGGO_DEV_MODE": "false"}
        )
        assert code == 78, command
        assert len(lines) == 1, lines
        event = orjson.loads(lines[0])
        assert event["event"] == "service.start_refused"
        assert event["level"] == "error"
        assert "COGGO_SECRET_KEY is not set" in event["error"]
        assert "COGGO_DEV_MODE" in event["error"]


async def test_dev_mode_starts_without_secret_key(env: Env) -> None:
    port = free_port()
    settings = env.service_settings(ingress_port=port)
    with subprocess_service(
        "coggo-ingress",
        settings,
        extra_env={"COGGO_SECRET_KEY": "", "COGGO_DEV_MODE": "1"},
    ) as process:
        output = OutputReader(process).start()
        await wait_for_http(f"http://127.0.0.1:{port}/healthz", timeout=30)
        process.send_signal(signal.SIGTERM)
        await _wait_exit(process)
        output.join()
    assert output.has_event("service.development_key")
    assert process.returncode == 0


async def test_invalid_setting_is_one_line_error(env: Env) -> None:
    code, lines = await _exit_of(
        "coggo-patient-upsert", env, {"COGGO_PREFETCH": "many"}
    )
    assert code == 78
    assert len(lines) == 1, lines
    assert "invalid COGGO_PREFETCH" in lines[0]
