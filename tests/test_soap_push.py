"""The SOAP-push dispatcher against the reference PIMS, RabbitMQ and PostgreSQL.

Every test runs the real dispatcher (in this process, or as a child process
where it is killed) and the reference PIMS on 127.0.0.1, with backoff in
tenths of a second.
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import orjson
import pytest
from coggo.integrations import CreatedIntegration
from coggo.soap.envelope import envelope_id
from coggo.topology import (
    ERROR_HEADER,
    ORIGINAL_EXCHANGE_HEADER,
    ORIGINAL_ROUTING_KEY_HEADER,
    REASON_HEADER,
    SOAP_PUSH_QUEUE,
)
from soap_push.options import PushOptions
from soap_push.retry import MAX_RETRY_AFTER_SECONDS, RetryPolicy, parse_retry_after
from structlog.testing import capture_logs

from tests.support.events import sign
from tests.support.pipeline import apply
from tests.support.soap import (
    Pims,
    hard_note,
    publish_command,
    push_command,
    push_row,
    simple_note,
    start_dispatcher,
    start_pims,
    state_is,
)
from tests.support.stack import (
    Env,
    RunningService,
    drain,
    subprocess_service,
    wait_until,
)

CLINIC = "clinic-1"
StartClinic = Callable[..., Awaitable[tuple[CreatedIntegration, Pims]]]


@pytest.fixture
async def start_clinic(env: Env) -> AsyncIterator[StartClinic]:
    """Create a clinic's integration and its own reference PIMS as its push target."""
    started: list[Pims] = []

    async def start(
        clinic_id: str = CLINIC,
        *,
        pims_secret: str | None = None,
        push_url: Callable[[Pims], str | None] | None = None,
    ) -> tuple[CreatedIntegration, Pims]:
        created = await env.create_integration(
            clinic_id, external_clinic_id=f"ext-{clinic_id}"
        )
        pims = await start_pims(pims_secret or created.signing_secret)
        started.append(pims)
        url = push_url(pims) if push_url is not None else pims.push_url
        await env.pool.execute(
            "UPDATE integrations SET push_url = $2 WHERE clinic_id = $1",
            clinic_id,
            url,
        )
        return created, pims

    yield start
    for pims in started:
        await pims.close()


@pytest.fixture
async def channel(
    amqp: aio_pika.abc.AbstractRobustConnection,
) -> aio_pika.abc.AbstractChannel:
    return await amqp.channel()


@pytest.fixture
async def events(
    env: Env, channel: aio_pika.abc.AbstractChannel
) -> aio_pika.abc.AbstractQueue:
    return await env.collect_events(channel)


@pytest.fixture
async def dispatcher(env: Env) -> AsyncIterator[RunningService]:
    service = await start_dispatcher(env)
    yield service
    await service.shutdown()


async def _dead_letter(
    env: Env, channel: aio_pika.abc.AbstractChannel, timeout: float = 15.0
) -> aio_pika.abc.AbstractIncomingMessage:
    queue = await channel.get_queue(
        env.topology.queue(SOAP_PUSH_QUEUE).dead_letter_queue
    )

    async def take() -> aio_pika.abc.AbstractIncomingMessage | None:
        return await queue.get(fail=False, no_ack=True)

    message: aio_pika.abc.AbstractIncomingMessage = await wait_until(
        take, timeout=timeout
    )
    return message


def _of_type(published: list[dict[str, Any]], event_type: str) -> list[dict[str, Any]]:
    return [event for event in published if event["type"] == event_type]


async def _published(
    queue: aio_pika.abc.AbstractQueue,
    *event_types: str,
    settle: float = 0.3,
    timeout: float = 10.0,
) -> list[dict[str, Any]]:
    """Read domain events until `event_types` have arrived, then for `settle` s more.

    Events leave through the outbox relay, which may publish a second after
    the change, so reading only what is queued at one moment can miss one.
    Repeat a type to wait for several events of it.
    """
    expected = Counter(event_types)
    found: list[dict[str, Any]] = []

    async def arrived() -> bool:
        found.extend(await drain(queue, settle=0.05))
        seen = Counter(event["type"] for event in found)
        return all(seen[name] >= count for name, count in expected.items())

    await wait_until(arrived, timeout=timeout)
    found.extend(await drain(queue, settle=settle))
    return found


async def _settle(seconds: float = 0.6) -> None:
    """Give the dispatcher time to do what it must not do, before checking it did not."""
    await asyncio.sleep(seconds)


class TestDelivery:
    async def test_all_formats_delivered(
        self,
        env: Env,
        channel: aio_pika.abc.AbstractChannel,
        events: aio_pika.abc.AbstractQueue,
        start_clinic: StartClinic,
        dispatcher: RunningService,
    ) -> None:
        _created, pims = await start_clinic()
        command = push_command(
            CLINIC,
            note=hard_note(),
            externalAppointmentId="apt_1029",
            vet={"name": "Dr. Ana Lópes", "externalStaffId": "stf_44"},
            language="fr",
        )

        await publish_command(channel, env.topology, command)
        row = await wait_until(state_is(env, "sent", CLINIC))

        stored = pims.stored()
        assert len(stored) == 1
        envelope = stored[0]["envelope"]
        assert envelope["id"] == str(envelope_id(CLINIC, "note-1", 1))
        assert envelope["id"] == str(row["id"])
        assert envelope["meta"]["externalClinicId"] == f"ext-{CLINIC}"
        assert envelope["meta"]["externalAppointmentId"] == "apt_1029"
        assert envelope["meta"]["vet"] == {
            "name": "Dr. Ana Lópes",
            "externalStaffId": "stf_44",
        }
        assert envelope["meta"]["language"] == "fr"
        assert envelope["meta"]["signedAt"] == "2026-06-12T14:55:00Z"

        formats = envelope["formats"]
        expected_json = hard_note()
        del expected_json["vitals"]
        assert formats["json"] == expected_json
        assert formats["text"]["objective"] == (
            "Temperature (Rectal): 36.89 °C\nWeight: 11 kg\n"
            "Symptoms <b>seen</b>: Vomiting, Lethargy & weakness"
        )
        assert "assessment" not in formats["text"]
        assert "<script>" not in formats["html"]
        assert "&lt;script&gt;" in formats["html"]
        assert "食欲不振" in formats["html"]

        sent = _of_type(await _published(events, "push.sent"), "push.sent")
        assert len(sent) == 1
        assert sent[0]["clinicId"] == CLINIC
        assert sent[0]["data"] == {
            "clinicId": CLINIC,
            "noteId": "note-1",
            "version": 1,
            "envelopeId": envelope["id"],
            "attempts": 1,
            "lastStatus": 200,
        }
        assert row["has_command"] is False

    async def test_note_for_merged_patient_goes_to_survivor(
        self,
        env: Env,
        channel: aio_pika.abc.AbstractChannel,
        start_clinic: StartClinic,
        dispatcher: RunningService,
    ) -> None:
        _created, pims = await start_clinic()
        merge = {
            "id": "evt_merge",
            "type": "patient.merged",
            "occurredAt": "2026-06-12T10:00:00Z",
            "data": {
                "patient": {"externalId": "pat_771"},
                "mergedIntoExternalId": "pat_900",
            },
        }
        await apply(env.pool, merge, clinic=CLINIC)

        await publish_command(channel, env.topology, push_command(CLINIC))
        await wait_until(state_is(env, "sent", CLINIC))

        envelope = pims.stored()[0]["envelope"]
        assert envelope["meta"]["externalPatientId"] == "pat_900"

    async def test_signature_verifies_with_clinic_secret(
        self,
        env: Env,
        channel: aio_pika.abc.AbstractChannel,
        start_clinic: StartClinic,
        dispatcher: RunningService,
    ) -> None:
        created, pims = await start_clinic()

        await publish_command(channel, env.topology, push_command(CLINIC))
        await wait_until(state_is(env, "sent", CLINIC))

        request = pims.requests[0]
        body = orjson.dumps(pims.stored()[0]["envelope"])
        assert request.message_id == str(envelope_id(CLINIC, "note-1", 1))
        assert request.timestamp is not None
        assert abs(int(request.timestamp) - time.time()) < 60
        assert request.signature == sign(
            created.signing_secret, request.message_id, request.timestamp, body
        )

    async def test_wrong_secret_rejected_by_pims(
        self,
        env: Env,
        channel: aio_pika.abc.AbstractChannel,
        start_clinic: StartClinic,
        dispatcher: RunningService,
    ) -> None:
        _created, pims = await start_clinic(pims_secret="cgs_not_the_clinic_secret")

        await publish_command(channel, env.topology, push_command(CLINIC))
        row = await wait_until(state_is(env, "failed", CLINIC))

        assert row["last_status"] == 401
        assert pims.push_calls == 5
        assert pims.stored() == []

    async def test_narrative_only_note(
        self,
        env: Env,
        channel: aio_pika.abc.AbstractChannel,
        start_clinic: StartClinic,
        dispatcher: RunningService,
    ) -> None:
        _created, pims = await start_clinic()
        note = {
            "schemaVersion": "1.0",
            "vitals": {"weight": "", "confidence": "medium"},
        }
        command = push_command(
            CLINIC, note=note, narrative="Bright & alert.\n\n<i>Recheck</i> in 2 weeks."
        )

        await publish_command(channel, env.topology, command)
        await wait_until(state_is(env, "sent", CLINIC))

        formats = pims.stored()[0]["envelope"]["formats"]
        assert formats["json"] == {"schemaVersion": "1.0"}
        assert formats["text"] == {
            "narrative": "Bright & alert.\n\n<i>Recheck</i> in 2 weeks."
        }
        assert formats["html"] == (
            '<div class="coggo-soap"><section data-section="narrative">'
            "<p>Bright &amp; alert.</p><p>&lt;i&gt;Recheck&lt;/i&gt; in 2 weeks.</p>"
            "</section></div>"
        )

    async def test_captured_vitals_sent(
        self,
        env: Env,
        channel: aio_pika.abc.AbstractChannel,
        start_clinic: StartClinic,
        dispatcher: RunningService,
    ) -> None:
        _created, pims = await start_clinic()
        note = simple_note()
        note["vitals"] = {
            "temperature": {"value": 36.89, "unit": "celsius", "raw": 98.4},
            "heartRate": "",
            "confidence": "high",
        }

        await publish_command(channel, env.topology, push_command(CLINIC, note=note))
        await wait_until(state_is(env, "sent", CLINIC))

        pushed = pims.stored()[0]["envelope"]["formats"]["json"]
        assert pushed["vitals"] == note["vitals"]

    async def test_logs_hold_no_secret_or_content(
        self,
        env: Env,
        channel: aio_pika.abc.AbstractChannel,
        start_clinic: StartClinic,
        dispatcher: RunningService,
    ) -> None:
        created, pims = await start_clinic()
        pims.set_fault(status=500, times=1)

        with capture_logs() as logs:
            await publish_command(
                channel, env.topology, push_command(CLINIC, note=hard_note())
            )
            await wait_until(state_is(env, "sent", CLINIC))

        retried = [entry for entry in logs if entry["event"] == "push.attempt_failed"]
        assert len(retried) == 1
        assert retried[0]["log_level"] == "warning"
        assert retried[0]["status"] == 500
        assert datetime.fromisoformat(retried[0]["next_attempt_at"]) > datetime.now(
            UTC
        ) - timedelta(seconds=5)
        sent = [entry for entry in logs if entry["event"] == "push.sent"]
        assert len(sent) == 1
        assert sent[0]["log_level"] == "info"

        text = repr(logs)
        signatures = [request.signature for request in pims.requests]
        assert created.signing_secret not in text
        assert all(value is not None and value not in text for value in signatures)
        for content in ("limping", "script", "食欲不振", "Recheck in 2 weeks"):
            assert content not in text


class TestRetries:
    async def test_500_then_200(
        self,
        env: Env,
        channel: aio_pika.abc.AbstractChannel,
        events: aio_pika.abc.AbstractQueue,
        start_clinic: StartClinic,
        dispatcher: RunningService,
    ) -> None:
        _created, pims = await start_clinic()
        pims.set_fault(status=500, times=1)

        await publish_command(channel, env.topology, push_command(CLINIC))
        row = await wait_until(state_is(env, "sent", CLINIC))

        assert row["attempts"] == 2
        assert row["last_status"] == 200
        assert pims.push_calls == 2
        stored = pims.stored()
        assert len(stored) == 1
        assert stored[0]["deliveries"] == 1
        ids = {request.message_id for request in pims.requests}
        assert ids == {str(row["id"])}
        sent = _of_type(await _published(events, "push.sent"), "push.sent")
        assert [event["data"]["attempts"] for event in sent] == [2]

    async def test_five_failures_dead_lettered(
        self,
        env: Env,
        channel: aio_pika.abc.AbstractChannel,
        events: aio_pika.abc.AbstractQueue,
        start_clinic: StartClinic,
        dispatcher: RunningService,
    ) -> None:
        _created, pims = await start_clinic()
        pims.set_fault(status=503)
        command = push_command(CLINIC)

        with capture_logs() as logs:
            body = await publish_command(channel, env.topology, command)
            dead = await _dead_letter(env, channel)
            row = await wait_until(state_is(env, "failed", CLINIC))

        assert dead.body == body
        assert dead.message_id == command["id"]
        headers = dead.headers
        assert headers[REASON_HEADER] == "push_failed"
        assert headers["x-coggo-last-status"] == 503
        assert "503" in str(headers[ERROR_HEADER])
        assert headers["x-coggo-attempts"] == 5
        assert headers[ORIGINAL_EXCHANGE_HEADER] == env.topology.commands
        assert headers[ORIGINAL_ROUTING_KEY_HEADER] == "soap.push"

        assert row["attempts"] == 5
        assert row["last_status"] == 503
        assert row["has_command"] is False
        await _settle()
        assert pims.push_calls == 5

        failed = _of_type(await _published(events, "push.failed"), "push.failed")
        assert len(failed) == 1
        assert failed[0]["data"]["attempts"] == 5
        assert failed[0]["data"]["lastStatus"] == 503
        warnings = [entry for entry in logs if entry["event"] == "push.attempt_failed"]
        errors = [entry for entry in logs if entry["event"] == "push.failed"]
        assert len(warnings) == 4
        assert [entry["log_level"] for entry in errors] == ["error"]

    async def test_timeout_retried(
        self,
        env: Env,
        channel: aio_pika.abc.AbstractChannel,
        start_clinic: StartClinic,
    ) -> None:
        _created, pims = await start_clinic()
        pims.set_fault(timeout=True, times=1)
        service = await start_dispatcher(
            env,
            PushOptions(timeout_seconds=0.5, backoff_seconds=0.05, poll_seconds=0.2),
        )
        try:
            with capture_logs() as logs:
                await publish_command(channel, env.topology, push_command(CLINIC))
                row = await wait_until(state_is(env, "sent", CLINIC))
        finally:
            await service.shutdown()

        assert row["attempts"] == 2
        assert pims.push_calls == 2
        first, second = pims.requests
        assert second.monotonic - first.monotonic >= 0.5
        failures = [entry for entry in logs if entry["event"] == "push.attempt_failed"]
        assert failures[0]["status"] is None
        assert "timed out" in failures[0]["error"]

    async def test_retry_after_honoured(
        self,
        env: Env,
        channel: aio_pika.abc.AbstractChannel,
        start_clinic: StartClinic,
        dispatcher: RunningService,
    ) -> None:
        _created, pims = await start_clinic()
        pims.set_fault(status=429, retry_after=2, times=1)

        await publish_command(channel, env.topology, push_command(CLINIC))
        row = await wait_until(state_is(env, "sent", CLINIC))

        assert row["attempts"] == 2
        first, second = pims.requests
        assert second.monotonic - first.monotonic >= 2.0
        # Signed afresh: same envelope id, new timestamp and signature.
        assert first.message_id == second.message_id == str(row["id"])
        assert first.timestamp != second.timestamp
        assert first.signature != second.signature

    async def test_redirect_not_followed(
        self,
        env: Env,
        channel: aio_pika.abc.AbstractChannel,
        start_clinic: StartClinic,
        dispatcher: RunningService,
    ) -> None:
        _created, pims = await start_clinic()
        pims.set_fault(status=307, location=pims.push_url, times=1)

        await publish_command(channel, env.topology, push_command(CLINIC))
        row = await wait_until(state_is(env, "sent", CLINIC))

        assert row["attempts"] == 2
        assert pims.push_calls == 2

    async def test_failed_push_sent_when_replayed(
        self,
        env: Env,
        channel: aio_pika.abc.AbstractChannel,
        start_clinic: StartClinic,
        dispatcher: RunningService,
    ) -> None:
        _created, pims = await start_clinic()
        pims.set_fault(status=500)
        await publish_command(channel, env.topology, push_command(CLINIC))
        dead = await _dead_letter(env, channel)
        await wait_until(state_is(env, "failed", CLINIC))
        pims.state.faults.clear()

        exchange = await channel.get_exchange(env.topology.commands)
        await exchange.publish(
            aio_pika.Message(dead.body, message_id=dead.message_id, headers={}),
            routing_key=str(dead.headers[ORIGINAL_ROUTING_KEY_HEADER]),
        )
        row = await wait_until(state_is(env, "sent", CLINIC))

        assert row["attempts"] == 1
        assert len(pims.stored()) == 1
        assert pims.push_calls == 6

    async def test_missing_push_url_dead_lettered(
        self,
        env: Env,
        channel: aio_pika.abc.AbstractChannel,
        start_clinic: StartClinic,
        dispatcher: RunningService,
    ) -> None:
        _created, pims = await start_clinic(push_url=lambda _pims: None)

        await publish_command(channel, env.topology, push_command(CLINIC))
        dead = await _dead_letter(env, channel)

        assert "no push URL" in str(dead.headers[ERROR_HEADER])
        assert "x-coggo-last-status" not in dead.headers
        assert pims.push_calls == 0


class TestVersions:
    async def test_amended_version_sent(
        self,
        env: Env,
        channel: aio_pika.abc.AbstractChannel,
        events: aio_pika.abc.AbstractQueue,
        start_clinic: StartClinic,
        dispatcher: RunningService,
    ) -> None:
        _created, pims = await start_clinic()

        await publish_command(channel, env.topology, push_command(CLINIC, version=1))
        await wait_until(state_is(env, "sent", CLINIC, version=1))
        amended = push_command(CLINIC, version=2, note=simple_note("Amended text"))
        await publish_command(channel, env.topology, amended)
        await wait_until(state_is(env, "sent", CLINIC, version=2))

        stored = sorted(pims.stored(), key=lambda push: push["version"])
        assert [push["version"] for push in stored] == [1, 2]
        assert stored[0]["envelopeId"] != stored[1]["envelopeId"]
        text = stored[1]["envelope"]["formats"]["text"]["subjective"]
        assert text == "Chief complaint: Amended text"
        published = await _published(events, "push.sent", "push.sent")
        sent = _of_type(published, "push.sent")
        assert sorted(event["data"]["version"] for event in sent) == [1, 2]

    async def test_sent_version_not_sent_again(
        self,
        env: Env,
        channel: aio_pika.abc.AbstractChannel,
        events: aio_pika.abc.AbstractQueue,
        start_clinic: StartClinic,
        dispatcher: RunningService,
    ) -> None:
        _created, pims = await start_clinic()

        await publish_command(channel, env.topology, push_command(CLINIC))
        await wait_until(state_is(env, "sent", CLINIC))
        await publish_command(channel, env.topology, push_command(CLINIC))
        await _settle()

        assert pims.push_calls == 1
        assert await env.pool.fetchval("SELECT count(*) FROM pushes") == 1
        published = await _published(events, "push.sent")
        assert len(_of_type(published, "push.sent")) == 1

    async def test_old_version_after_newer_superseded(
        self,
        env: Env,
        channel: aio_pika.abc.AbstractChannel,
        events: aio_pika.abc.AbstractQueue,
        start_clinic: StartClinic,
        dispatcher: RunningService,
    ) -> None:
        _created, pims = await start_clinic()

        await publish_command(channel, env.topology, push_command(CLINIC, version=2))
        await wait_until(state_is(env, "sent", CLINIC, version=2))
        await publish_command(channel, env.topology, push_command(CLINIC, version=1))
        row = await wait_until(state_is(env, "superseded", CLINIC, version=1))
        await _settle()

        assert row["superseded_by"] == 2
        assert row["attempts"] == 0
        assert pims.push_calls == 1
        assert [push["version"] for push in pims.stored()] == [2]
        published = await _published(events, "push.superseded")
        superseded = _of_type(published, "push.superseded")
        assert len(superseded) == 1
        assert superseded[0]["data"]["version"] == 1
        assert superseded[0]["data"]["supersededByVersion"] == 2
        assert superseded[0]["data"]["envelopeId"] == str(
            envelope_id(CLINIC, "note-1", 1)
        )

    async def test_pending_older_version_superseded(
        self,
        env: Env,
        channel: aio_pika.abc.AbstractChannel,
        events: aio_pika.abc.AbstractQueue,
        start_clinic: StartClinic,
    ) -> None:
        _created, pims = await start_clinic()
        pims.set_fault(status=500, times=1)
        service = await start_dispatcher(
            env, PushOptions(backoff_seconds=3.0, poll_seconds=0.2)
        )
        try:
            await publish_command(
                channel, env.topology, push_command(CLINIC, version=1)
            )

            async def retry_scheduled() -> bool:
                row = await push_row(env, CLINIC, version=1)
                return row is not None and row["last_status"] == 500

            await wait_until(retry_scheduled)
            await publish_command(
                channel, env.topology, push_command(CLINIC, version=2)
            )
            await wait_until(state_is(env, "sent", CLINIC, version=2))
            older = await wait_until(
                state_is(env, "superseded", CLINIC, version=1), timeout=1.0
            )
        finally:
            await service.shutdown()

        assert older["superseded_by"] == 2
        assert older["attempts"] == 1
        assert pims.push_calls == 2
        assert [push["version"] for push in pims.stored()] == [2]
        published = await _published(events, "push.sent", "push.superseded")
        assert [e["data"]["version"] for e in _of_type(published, "push.sent")] == [2]
        assert [
            e["data"]["version"] for e in _of_type(published, "push.superseded")
        ] == [1]


class TestIsolation:
    async def test_hanging_pims_does_not_delay_other_clinic(
        self,
        env: Env,
        channel: aio_pika.abc.AbstractChannel,
        start_clinic: StartClinic,
    ) -> None:
        _slow, hanging = await start_clinic("clinic-slow")
        _fast, healthy = await start_clinic("clinic-fast")
        hanging.set_fault(timeout=True)
        options = PushOptions(
            timeout_seconds=5.0,
            backoff_seconds=0.05,
            max_in_flight=16,
            clinic_max_in_flight=4,
            poll_seconds=0.2,
        )
        service = await start_dispatcher(env, options)
        try:
            for number in range(30):
                await publish_command(
                    channel, env.topology, push_command("clinic-slow", f"n{number}")
                )
            await wait_until(lambda: _calls_at_least(hanging, 4))
            started = time.monotonic()
            await publish_command(channel, env.topology, push_command("clinic-fast"))
            await wait_until(state_is(env, "sent", "clinic-fast"), timeout=10)
            elapsed = time.monotonic() - started
            hanging_calls = hanging.push_calls
        finally:
            # Closing the hanging PIMS ends its held requests, so the shutdown
            # does not wait for their time limit.
            await hanging.close()
            await service.shutdown()

        assert elapsed < 1.0
        assert hanging_calls == 4
        assert len(healthy.stored()) == 1

    async def test_sigterm_finishes_attempt_in_flight(
        self,
        env: Env,
        channel: aio_pika.abc.AbstractChannel,
        events: aio_pika.abc.AbstractQueue,
        start_clinic: StartClinic,
    ) -> None:
        _created, pims = await start_clinic()
        pims.set_fault(delay=1.0, times=1)
        service = await start_dispatcher(env)

        await publish_command(channel, env.topology, push_command(CLINIC))
        await wait_until(lambda: _calls_at_least(pims, 1))
        await service.shutdown()
        row = await push_row(env, CLINIC)

        assert row is not None
        assert row["state"] == "sent"
        assert row["attempts"] == 1
        published = await _published(events, "push.sent")
        assert len(_of_type(published, "push.sent")) == 1

    async def test_kill_between_attempts_loses_nothing(
        self,
        env: Env,
        channel: aio_pika.abc.AbstractChannel,
        events: aio_pika.abc.AbstractQueue,
        start_clinic: StartClinic,
    ) -> None:
        _created, pims = await start_clinic()
        pims.set_fault(status=500, times=1)
        settings = env.service_settings(allow_private_targets=True)
        variables = {
            "COGGO_SOAP_PUSH_BACKOFF_SECONDS": "3",
            "COGGO_SOAP_PUSH_POLL_SECONDS": "0.2",
            "COGGO_LOG_LEVEL": "warning",
        }

        async def retry_scheduled() -> bool:
            row = await push_row(env, CLINIC)
            return (
                row is not None
                and row["last_status"] == 500
                and row["leased_until"] is None
            )

        with subprocess_service(
            "coggo-soap-push", settings, extra_env=variables
        ) as first:
            await publish_command(channel, env.topology, push_command(CLINIC))
            await wait_until(retry_scheduled, timeout=30)
            first.kill()
            await asyncio.to_thread(first.wait, 10)
        between = await push_row(env, CLINIC)
        calls_between = pims.push_calls

        with subprocess_service(
            "coggo-soap-push", settings, extra_env=variables
        ) as second:
            row = await wait_until(state_is(env, "sent", CLINIC), timeout=30)
            second.send_signal(signal.SIGTERM)
            exit_code = await asyncio.to_thread(second.wait, 30)

        assert between is not None
        assert between["state"] == "pending"
        assert between["attempts"] == 1
        assert calls_between == 1
        assert row["attempts"] == 2
        assert exit_code == 0
        assert pims.push_calls == 2
        stored = pims.stored()
        assert len(stored) == 1
        assert stored[0]["deliveries"] == 1
        published = await _published(events, "push.sent")
        assert len(_of_type(published, "push.sent")) == 1

    async def test_kill_during_attempt_retried_after_lease(
        self,
        env: Env,
        channel: aio_pika.abc.AbstractChannel,
        events: aio_pika.abc.AbstractQueue,
        start_clinic: StartClinic,
    ) -> None:
        _created, pims = await start_clinic()
        pims.set_fault(timeout=True, times=1)
        settings = env.service_settings(allow_private_targets=True)
        variables = {
            "COGGO_SOAP_PUSH_TIMEOUT_SECONDS": "2",
            "COGGO_SOAP_PUSH_LEASE_MARGIN_SECONDS": "0.5",
            "COGGO_SOAP_PUSH_POLL_SECONDS": "0.2",
            "COGGO_LOG_LEVEL": "warning",
        }

        with subprocess_service(
            "coggo-soap-push", settings, extra_env=variables
        ) as first:
            await publish_command(channel, env.topology, push_command(CLINIC))
            await wait_until(lambda: _calls_at_least(pims, 1), timeout=30)
            first.kill()
            await asyncio.to_thread(first.wait, 10)
        during = await push_row(env, CLINIC)

        with subprocess_service(
            "coggo-soap-push", settings, extra_env=variables
        ) as second:
            row = await wait_until(state_is(env, "sent", CLINIC), timeout=30)
            second.send_signal(signal.SIGTERM)
            await asyncio.to_thread(second.wait, 30)

        assert during is not None
        assert during["state"] == "pending"
        assert during["leased_until"] is not None
        assert row["attempts"] == 2
        assert pims.requests[1].unix_time >= during["leased_until"].timestamp()
        stored = pims.stored()
        assert len(stored) == 1
        assert stored[0]["deliveries"] == 1
        published = await _published(events, "push.sent")
        assert len(_of_type(published, "push.sent")) == 1


class TestOutboundGuard:
    @pytest.mark.parametrize(
        ("url_template", "reason"),
        [
            ("https://127.0.0.1:{port}/push", "not a public address"),
            ("https://localhost:{port}/push", "non-public address"),
            ("http://127.0.0.1:{port}/push", "HTTPS"),
        ],
    )
    async def test_loopback_push_url_refused(
        self,
        env: Env,
        channel: aio_pika.abc.AbstractChannel,
        start_clinic: StartClinic,
        url_template: str,
        reason: str,
    ) -> None:
        _created, pims = await start_clinic(
            push_url=lambda started: url_template.format(port=started.port)
        )
        service = await start_dispatcher(env, allow_private_targets=False)
        try:
            await publish_command(channel, env.topology, push_command(CLINIC))
            dead = await _dead_letter(env, channel)
            row = await wait_until(state_is(env, "failed", CLINIC))
        finally:
            await service.shutdown()

        assert reason in str(dead.headers[ERROR_HEADER])
        assert row["attempts"] == 5
        assert row["last_status"] is None
        assert pims.push_calls == 0
        assert pims.requests == []


class TestCommands:
    async def test_invalid_command_dead_lettered(
        self,
        env: Env,
        channel: aio_pika.abc.AbstractChannel,
        dispatcher: RunningService,
    ) -> None:
        command = push_command(CLINIC)
        del command["data"]["note"]

        await publish_command(channel, env.topology, command)
        dead = await _dead_letter(env, channel)

        assert dead.headers[REASON_HEADER] == "invalid_message"
        assert "data.note" in str(dead.headers[ERROR_HEADER])
        assert await env.pool.fetchval("SELECT count(*) FROM pushes") == 0

    async def test_command_ids_kept_for_dead_letter(
        self,
        env: Env,
        channel: aio_pika.abc.AbstractChannel,
        start_clinic: StartClinic,
        dispatcher: RunningService,
    ) -> None:
        _created, pims = await start_clinic()
        pims.set_fault(status=502)
        command_id = str(uuid.uuid4())

        await publish_command(
            channel,
            env.topology,
            push_command(CLINIC, command_id=command_id),
            headers={"x-request-id": "req-77"},
        )
        dead = await _dead_letter(env, channel)

        assert dead.message_id == command_id
        assert dead.headers["x-request-id"] == "req-77"
        assert dead.headers["x-coggo-last-status"] == 502


async def _calls_at_least(pims: Pims, count: int) -> bool:
    return pims.push_calls >= count


class TestRetryPolicy:
    def test_exponential_without_jitter(self) -> None:
        policy = RetryPolicy(first_delay=30, multiplier=4, max_delay=3600, jitter=0)

        delays = [policy.delay(attempt) for attempt in range(1, 5)]
        assert delays == [30, 120, 480, 1920]

    def test_capped(self) -> None:
        policy = RetryPolicy(first_delay=30, multiplier=4, max_delay=600, jitter=0)

        assert policy.delay(4) == 600

    def test_jitter_within_bounds(self) -> None:
        policy = RetryPolicy(first_delay=10, multiplier=2, jitter=0.2)

        for _ in range(200):
            assert 8 <= policy.delay(1) <= 12

    def test_retry_after_is_minimum(self) -> None:
        policy = RetryPolicy(first_delay=1, jitter=0)

        assert policy.delay(1, retry_after=90) == 90
        assert policy.delay(1, retry_after=0.5) == 1

    def test_invalid_settings_rejected(self) -> None:
        with pytest.raises(ValueError, match="attempts"):
            RetryPolicy(attempts=0)
        with pytest.raises(ValueError, match="multiplier"):
            RetryPolicy(multiplier=0.5)


class TestRetryAfter:
    NOW = datetime(2026, 6, 12, 15, 0, tzinfo=UTC)

    def test_seconds(self) -> None:
        assert parse_retry_after("120", now=self.NOW) == 120

    def test_http_date(self) -> None:
        later = self.NOW + timedelta(seconds=45)
        header = later.strftime("%a, %d %b %Y %H:%M:%S GMT")

        assert parse_retry_after(header, now=self.NOW) == 45

    def test_date_in_past_is_zero(self) -> None:
        assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=self.NOW) == 0

    @pytest.mark.parametrize("value", [None, "", "soon", "-5", "1.5", "１２"])
    def test_invalid_ignored(self, value: str | None) -> None:
        assert parse_retry_after(value, now=self.NOW) is None

    def test_capped(self) -> None:
        assert parse_retry_after("999999999", now=self.NOW) == MAX_RETRY_AFTER_SECONDS
