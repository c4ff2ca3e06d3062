"""The main job end to end: a signed webhook in, a scheduled visit and its event out."""

from __future__ import annotations

import asyncio
import time
import uuid

import aio_pika
import orjson
from coggo.topology import PATIENT_UPSERT_QUEUE, REASON_HEADER

from tests.support.events import (
    SPEC_EXAMPLE_EVENT,
    appointment_event,
    encode,
    signed_headers,
)
from tests.support.proxy import TcpProxy
from tests.support.stack import (
    Env,
    HttpClient,
    RunningService,
    drain,
    free_port,
    start_service,
    subprocess_service,
    wait_for_http,
    wait_until,
)

WEBHOOKS = "/v1/partner/webhooks"


async def _visits(env: Env) -> list[dict]:  # type: ignore[type-arg]
    rows = await env.pool.fetch(
        """
        SELECT v.status, v.scheduled_at, a.external_id AS appointment, p.external_id AS patient,
               c.external_id AS client
        FROM visits v
        JOIN appointments a ON a.id = v.appointment_id
        LEFT JOIN patients p ON p.id = v.patient_id
        LEFT JOIN clients c ON c.id = p.client_id
        """
    )
    return [dict(row) for row in rows]


async def _post(ingress: HttpClient, key: str, secret: str | None, event: dict) -> dict:  # type: ignore[type-arg]
    body = encode(event)
    response = await ingress.request(
        "POST", WEBHOOKS, data=body, headers=signed_headers(key, secret, body)
    )
    assert response.status == 200, response.body
    return response.body


async def test_spec_example_becomes_scheduled_visit(
    env: Env,
    ingress: HttpClient,
    upsert: RunningService,
    amqp: aio_pika.abc.AbstractConnection,
) -> None:
    channel = await amqp.channel()
    events = await env.collect_events(channel)
    created = await env.create_integration(default_timezone="UTC")

    await _post(ingress, created.api_key, created.signing_secret, SPEC_EXAMPLE_EVENT)
    visits = await wait_until(lambda: _visits(env))

    assert len(visits) == 1
    assert visits[0]["status"] == "scheduled"
    assert visits[0]["appointment"] == "apt_1029"
    assert visits[0]["patient"] == "pat_771"
    assert visits[0]["client"] == "cli_553"
    # 14:00 in New York on 12 June is 18:00 UTC (EDT, UTC-4).
    assert visits[0]["scheduled_at"].isoformat() == "2026-06-12T18:00:00+00:00"

    published = await drain(events)
    scheduled = [e for e in published if e["type"] == "visit.scheduled"]
    assert len(scheduled) == 1
    data = scheduled[0]["data"]
    assert data["externalAppointmentId"] == "apt_1029"
    assert data["externalPatientId"] == "pat_771"
    assert data["externalClientId"] == "cli_553"
    assert data["scheduledAt"] == "2026-06-12T18:00:00+00:00"
    assert scheduled[0]["clinicId"] == "clinic-1"
    assert {e["type"] for e in published} == {
        "client.upserted",
        "patient.upserted",
        "visit.scheduled",
    }
    # Domain events carry ids, never contact details.
    assert b"peggy" not in orjson.dumps(published).lower()


async def test_repeated_event_changes_nothing(
    env: Env,
    ingress: HttpClient,
    upsert: RunningService,
    amqp: aio_pika.abc.AbstractConnection,
) -> None:
    channel = await amqp.channel()
    events = await env.collect_events(channel)
    created = await env.create_integration()

    await _post(ingress, created.api_key, None, SPEC_EXAMPLE_EVENT)
    await wait_until(lambda: _visits(env))
    first = await drain(events)
    assert (await _post(ingress, created.api_key, None, SPEC_EXAMPLE_EVENT))[
        "duplicate"
    ] is True

    # The same content under a new event id is processed, but changes nothing.
    await _post(
        ingress, created.api_key, None, {**SPEC_EXAMPLE_EVENT, "id": "evt_again"}
    )
    await wait_until(
        lambda: env.pool.fetchval("SELECT count(*) = 2 FROM processed_messages")
    )
    assert len(await _visits(env)) == 1
    assert len(first) == 3
    assert await drain(events) == []


async def test_redelivered_message_is_processed_once(
    env: Env, upsert: RunningService, amqp: aio_pika.abc.AbstractConnection
) -> None:
    channel = await amqp.channel()
    events = await env.collect_events(channel)
    await env.create_integration()
    exchange = await channel.get_exchange(env.topology.webhooks)
    message_id = str(uuid.uuid4())
    body = orjson.dumps(
        {
            "id": message_id,
            "type": "appointment.created",
            "occurredAt": "2026-06-12T09:30:00Z",
            "clinicId": "clinic-1",
            "eventId": "evt_1",
            "data": appointment_event("evt_1")["data"],
        }
    )
    for _ in range(3):
        await exchange.publish(
            aio_pika.Message(body, message_id=message_id),
            routing_key="appointment.created",
        )
    await wait_until(lambda: _visits(env))
    published = await drain(events, settle=1.0)
    assert [e["type"] for e in published].count("visit.scheduled") == 1
    assert await env.pool.fetchval("SELECT count(*) FROM processed_messages") == 1


async def test_cancellation_cancels_visit(
    env: Env,
    ingress: HttpClient,
    upsert: RunningService,
    amqp: aio_pika.abc.AbstractConnection,
) -> None:
    channel = await amqp.channel()
    events = await env.collect_events(channel)
    created = await env.create_integration()
    await _post(ingress, created.api_key, None, appointment_event("evt_1"))
    await wait_until(lambda: _visits(env))
    await _post(
        ingress,
        created.api_key,
        None,
        {
            "id": "evt_2",
            "type": "appointment.cancelled",
            "occurredAt": "2026-06-12T10:00:00Z",
            "data": {"appointment": {"externalId": "apt_1"}},
        },
    )

    async def cancelled() -> bool:
        visits = await _visits(env)
        return visits[0]["status"] == "cancelled"

    await wait_until(cancelled)
    types = [e["type"] for e in await drain(events)]
    assert types.count("visit.cancelled") == 1
    assert types.count("visit.scheduled") == 1


async def test_invalid_message_is_dead_lettered_with_reason(
    env: Env, upsert: RunningService, amqp: aio_pika.abc.AbstractConnection
) -> None:
    channel = await amqp.channel()
    exchange = await channel.get_exchange(env.topology.webhooks)
    await exchange.publish(
        aio_pika.Message(
            b'{"id": "m1", "type": "appointment.created"}', message_id="m1"
        ),
        routing_key="appointment.created",
    )
    await exchange.publish(
        aio_pika.Message(b"\x00 not json", message_id="m2"),
        routing_key="appointment.created",
    )
    dead_letters = await channel.get_queue(
        env.topology.queue(PATIENT_UPSERT_QUEUE).dead_letter_queue
    )

    found = []

    async def two_dead() -> bool:
        message = await dead_letters.get(fail=False, no_ack=True)
        if message is not None:
            found.append(message)
        return len(found) == 2

    await wait_until(two_dead)
    reasons = {m.message_id: m.headers[REASON_HEADER] for m in found}
    assert reasons == {"m1": "invalid_message", "m2": "malformed"}
    work = await channel.get_queue(env.topology.name(PATIENT_UPSERT_QUEUE))
    assert work.declaration_result.message_count == 0


async def test_event_accepted_while_broker_down_is_processed_once(
    env: Env,
    infra,  # type: ignore[no-untyped-def]
) -> None:
    from ingress.__main__ import serve
    from patient_upsert.__main__ import serve as serve_upsert

    host, port = infra.amqp_url.split("@", 1)[1].split("/")[0].split(":")
    proxy = TcpProxy(host, int(port))
    await proxy.start()
    amqp_url = infra.amqp_url.replace(f"{host}:{port}", f"127.0.0.1:{proxy.port}")
    ingress_port = free_port()
    # Every service reaches RabbitMQ through the proxy, as if the broker went away.
    service = await start_service(
        serve, env.service_settings(amqp_url=amqp_url, ingress_port=ingress_port)
    )
    consumer = await start_service(
        serve_upsert, env.service_settings(amqp_url=amqp_url)
    )
    client = HttpClient(f"http://127.0.0.1:{ingress_port}")
    try:
        await wait_for_http(client.base_url + "/healthz")
        created = await env.create_integration()
        await wait_until(lambda: _ready(client))

        await proxy.cut()
        await _post(
            client,
            created.api_key,
            created.signing_secret,
            appointment_event("evt_down"),
        )
        await asyncio.sleep(1.5)
        assert await _visits(env) == []
        assert await env.pool.fetchval("SELECT count(*) FROM outbox") == 1

        await proxy.restore()
        visits = await wait_until(lambda: _visits(env), timeout=30)
        assert len(visits) == 1
        await wait_until(lambda: env.pool.fetchval("SELECT count(*) = 0 FROM outbox"))
        await asyncio.sleep(0.5)
        assert await env.pool.fetchval("SELECT count(*) FROM processed_messages") == 1
    finally:
        await client.close()
        await service.shutdown()
        await consumer.shutdown()
        await proxy.cut()


async def _ready(client: HttpClient) -> bool:
    return (await client.request("GET", "/readyz")).status == 200


async def test_event_survives_ingress_killed_after_200(
    env: Env,
    infra,
    upsert: RunningService,  # type: ignore[no-untyped-def]
) -> None:
    created = await env.create_integration()
    ingress_port = free_port()
    # The first ingress cannot reach RabbitMQ, so the event stays in the outbox.
    dead_broker = f"amqp://guest:guest@127.0.0.1:{free_port()}/"
    settings = env.service_settings(amqp_url=dead_broker, ingress_port=ingress_port)
    with subprocess_service("coggo-ingress", settings) as process:
        client = HttpClient(f"http://127.0.0.1:{ingress_port}")
        try:
            await wait_for_http(client.base_url + "/healthz", timeout=30)
            await _post(client, created.api_key, None, appointment_event("evt_kill"))
        finally:
            await client.close()
        process.kill()
        process.wait(10)

    assert await env.pool.fetchval("SELECT count(*) FROM outbox") == 1
    from ingress.__main__ import serve

    started = time.monotonic()
    replacement = await start_service(
        serve, env.service_settings(ingress_port=free_port())
    )
    try:
        visits = await wait_until(lambda: _visits(env), timeout=30)
        assert len(visits) == 1
        assert time.monotonic() - started < 30
    finally:
        await replacement.shutdown()
