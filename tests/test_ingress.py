"""The ingress over real HTTP: every check of /ping and /webhooks with its status and body."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from tests.support.events import (
    SPEC_EXAMPLE_EVENT,
    appointment_event,
    encode,
    example_event,
    sign,
    signed_headers,
)
from tests.support.stack import Env, HttpClient, raw_request

WEBHOOKS = "/v1/partner/webhooks"
PING = "/v1/partner/ping"


async def _outbox_count(env: Env) -> int:
    return int(await env.pool.fetchval("SELECT count(*) FROM inbound_events"))


async def _set_integration(env: Env, clinic_id: str, **columns: object) -> None:
    for column, value in columns.items():
        await env.pool.execute(
            f"UPDATE integrations SET {column} = $2 WHERE clinic_id = $1",
            clinic_id,
            value,
        )


# /ping


async def test_ping_returns_integration(env: Env, ingress: HttpClient) -> None:
    created = await env.create_integration("clinic-ping")
    response = await ingress.request(
        "GET", PING, headers={"Authorization": f"Bearer {created.api_key}"}
    )
    assert response.status == 200
    assert response.body["ok"] is True
    assert response.body["clinicId"] == "clinic-ping"
    assert response.body["provider"] == "vetsim"
    assert response.body["status"] == "active"
    assert sorted(response.body["scopes"]) == ["integration:read", "webhooks:write"]


async def test_ping_paused_integration_reports_paused(
    env: Env, ingress: HttpClient
) -> None:
    created = await env.create_integration("clinic-paused")
    await _set_integration(env, "clinic-paused", status="paused")
    response = await ingress.request(
        "GET", PING, headers={"Authorization": f"Bearer {created.api_key}"}
    )
    assert response.status == 200
    assert response.body["status"] == "paused"


async def test_ping_plan_without_partner_api_is_402(
    env: Env, ingress: HttpClient
) -> None:
    created = await env.create_integration("clinic-plan")
    await _set_integration(env, "clinic-plan", plan_enabled=False)
    response = await ingress.request(
        "GET", PING, headers={"Authorization": f"Bearer {created.api_key}"}
    )
    assert response.status == 402
    assert response.body["error"] == "integration_paused"
    assert "plan" in response.body["detail"]


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer", "Basic abc", "Bearer cgk_live_unknown", "Bearer " + "x" * 600],
)
async def test_ping_bad_key_is_401(
    env: Env, ingress: HttpClient, authorization: str | None
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    response = await ingress.request("GET", PING, headers=headers)
    assert response.status == 401
    assert response.body["error"] == "unauthorized"
    assert (
        "Authorization" in response.body["detail"] or "key" in response.body["detail"]
    )


async def test_ping_revoked_key_is_401(env: Env, ingress: HttpClient) -> None:
    created = await env.create_integration("clinic-revoked")
    await env.pool.execute("UPDATE api_keys SET revoked_at = now()")
    await asyncio.sleep(2.1)  # the key cache lives two seconds
    response = await ingress.request(
        "GET", PING, headers={"Authorization": f"Bearer {created.api_key}"}
    )
    assert response.status == 401
    assert "revoked" in response.body["detail"]


# /webhooks: authentication, pause, scope


async def test_webhook_missing_key_is_401(env: Env, ingress: HttpClient) -> None:
    response = await ingress.request("POST", WEBHOOKS, data=encode(SPEC_EXAMPLE_EVENT))
    assert response.status == 401
    assert response.body["error"] == "unauthorized"
    assert "Authorization" in response.body["detail"]


async def test_webhook_paused_integration_is_402(env: Env, ingress: HttpClient) -> None:
    created = await env.create_integration("clinic-paused")
    await _set_integration(env, "clinic-paused", status="paused")
    body = encode(SPEC_EXAMPLE_EVENT)
    response = await ingress.request(
        "POST", WEBHOOKS, data=body, headers=signed_headers(created.api_key, None, body)
    )
    assert response.status == 402
    assert response.body["error"] == "integration_paused"
    assert await _outbox_count(env) == 0


async def test_webhook_plan_disabled_is_402(env: Env, ingress: HttpClient) -> None:
    created = await env.create_integration("clinic-plan")
    await _set_integration(env, "clinic-plan", plan_enabled=False)
    body = encode(SPEC_EXAMPLE_EVENT)
    response = await ingress.request(
        "POST", WEBHOOKS, data=body, headers=signed_headers(created.api_key, None, body)
    )
    assert response.status == 402
    assert response.body["error"] == "integration_paused"


async def test_webhook_key_without_scope_is_403(env: Env, ingress: HttpClient) -> None:
    created = await env.create_integration("clinic-read", scopes=["integration:read"])
    body = encode(SPEC_EXAMPLE_EVENT)
    response = await ingress.request(
        "POST", WEBHOOKS, data=body, headers=signed_headers(created.api_key, None, body)
    )
    assert response.status == 403
    assert response.body["error"] == "insufficient_scope"
    assert "webhooks:write" in response.body["detail"]


# /webhooks: rate limit


async def test_webhook_rate_limit_is_429_with_retry_after(
    env: Env, ingress: HttpClient
) -> None:
    created = await env.create_integration("clinic-busy")
    headers = {"Authorization": f"Bearer {created.api_key}"}
    statuses = []
    for _ in range(120):
        response = await ingress.request("POST", WEBHOOKS, data=b"{}", headers=headers)
        statuses.append(response.status)
    assert 429 not in statuses

    # The allowance refills at two requests a second, so on a slow machine a
    # few more may pass before the key is limited.
    for _ in range(20):
        limited = await ingress.request("POST", WEBHOOKS, data=b"{}", headers=headers)
        if limited.status == 429:
            break
    assert limited.status == 429
    assert limited.body["error"] == "rate_limited"
    retry_after = int(limited.headers["Retry-After"])
    assert 1 <= retry_after <= 60

    for _ in range(20):
        ping = await ingress.request("GET", PING, headers=headers)
        if ping.status == 429:
            break
    assert ping.status == 429


async def test_rate_limit_is_per_key(env: Env, ingress: HttpClient) -> None:
    busy = await env.create_integration("clinic-a")
    quiet = await env.create_integration("clinic-b")
    for _ in range(121):
        await ingress.request(
            "GET", PING, headers={"Authorization": f"Bearer {busy.api_key}"}
        )
    response = await ingress.request(
        "GET", PING, headers={"Authorization": f"Bearer {quiet.api_key}"}
    )
    assert response.status == 200


# /webhooks: body


async def test_webhook_body_over_one_mebibyte_is_413(
    env: Env, ingress: HttpClient
) -> None:
    created = await env.create_integration()
    event = example_event()
    event["data"]["appointment"]["reason"] = "x" * (1024 * 1024)
    body = encode(event)
    response = await ingress.request(
        "POST", WEBHOOKS, data=body, headers=signed_headers(created.api_key, None, body)
    )
    assert response.status == 413
    assert response.body["error"] == "payload_too_large"
    assert "1048576" in response.body["detail"]


async def test_webhook_chunked_body_over_limit_is_413(
    env: Env, ingress: HttpClient
) -> None:
    created = await env.create_integration()

    async def chunks():  # type: ignore[no-untyped-def]
        for _ in range(20):
            yield b"x" * 65536

    async with ingress.session.post(
        ingress.base_url + WEBHOOKS,
        data=chunks(),
        headers={"Authorization": f"Bearer {created.api_key}"},
    ) as response:
        assert response.status == 413
        assert (await response.json())["error"] == "payload_too_large"


async def test_webhook_wrong_content_type_is_415(env: Env, ingress: HttpClient) -> None:
    created = await env.create_integration()
    body = encode(SPEC_EXAMPLE_EVENT)
    headers = signed_headers(created.api_key, None, body)
    headers["Content-Type"] = "text/plain"
    response = await ingress.request("POST", WEBHOOKS, data=body, headers=headers)
    assert response.status == 415
    assert "application/json" in response.body["detail"]


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"", "empty"),
        (b"   ", "empty"),
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe{}", "UTF-8"),
        (b'{"id": "\xc3"}', "UTF-8"),
        (b"[1, 2]", "JSON object"),
        (b'"text"', "JSON object"),
        (b"null", "JSON object"),
        (b"12", "JSON object"),
        (b'{"a": NaN}', "not valid JSON"),
        (b'{"a": 1}{"b": 2}', "not valid JSON"),
    ],
)
async def test_webhook_unparseable_body_is_400(
    env: Env, ingress: HttpClient, body: bytes, fragment: str
) -> None:
    created = await env.create_integration()
    response = await ingress.request(
        "POST", WEBHOOKS, data=body, headers=signed_headers(created.api_key, None, body)
    )
    assert response.status == 400
    assert response.body["error"] == "bad_request"
    assert fragment in response.body["detail"]


# /webhooks: signature and replay window


async def test_webhook_signed_with_spec_formula_is_accepted(
    env: Env, ingress: HttpClient
) -> None:
    created = await env.create_integration()
    body = encode(SPEC_EXAMPLE_EVENT)
    response = await ingress.request(
        "POST",
        WEBHOOKS,
        data=body,
        headers=signed_headers(created.api_key, created.signing_secret, body),
    )
    assert response.status == 200
    assert response.body == {"received": True, "duplicate": False}


async def test_webhook_unsigned_is_accepted(env: Env, ingress: HttpClient) -> None:
    created = await env.create_integration()
    body = encode(SPEC_EXAMPLE_EVENT)
    response = await ingress.request(
        "POST", WEBHOOKS, data=body, headers=signed_headers(created.api_key, None, body)
    )
    assert response.status == 200


async def test_webhook_wrong_signature_is_401(env: Env, ingress: HttpClient) -> None:
    created = await env.create_integration()
    body = encode(SPEC_EXAMPLE_EVENT)
    headers = signed_headers(created.api_key, "cgs_not_the_secret", body)
    response = await ingress.request("POST", WEBHOOKS, data=body, headers=headers)
    assert response.status == 401
    assert response.body["error"] == "invalid_signature"
    assert "X-Coggo-Signature" in response.body["detail"]
    assert await _outbox_count(env) == 0


async def test_webhook_signature_over_other_body_is_401(
    env: Env, ingress: HttpClient
) -> None:
    created = await env.create_integration()
    body = encode(SPEC_EXAMPLE_EVENT)
    headers = signed_headers(created.api_key, created.signing_secret, body)
    # Same JSON, other bytes: the signature covers the raw body.
    response = await ingress.request(
        "POST",
        WEBHOOKS,
        data=json.dumps(SPEC_EXAMPLE_EVENT, indent=1).encode(),
        headers=headers,
    )
    assert response.status == 401
    assert response.body["error"] == "invalid_signature"


@pytest.mark.parametrize("missing", ["X-Coggo-Id", "X-Coggo-Timestamp"])
async def test_webhook_signature_without_companion_header_is_401(
    env: Env, ingress: HttpClient, missing: str
) -> None:
    created = await env.create_integration()
    body = encode(SPEC_EXAMPLE_EVENT)
    headers = signed_headers(created.api_key, created.signing_secret, body)
    del headers[missing]
    response = await ingress.request("POST", WEBHOOKS, data=body, headers=headers)
    assert response.status == 401
    assert response.body["error"] == "invalid_signature"
    assert missing in response.body["detail"]


@pytest.mark.parametrize("skew", [-299, 299])
async def test_webhook_timestamp_within_window_is_accepted(
    env: Env, ingress: HttpClient, skew: int
) -> None:
    created = await env.create_integration()
    body = encode(SPEC_EXAMPLE_EVENT)
    headers = signed_headers(created.api_key, created.signing_secret, body, skew=skew)
    response = await ingress.request("POST", WEBHOOKS, data=body, headers=headers)
    assert response.status == 200


@pytest.mark.parametrize("skew", [-301, 301])
@pytest.mark.parametrize("signed", [True, False])
async def test_webhook_timestamp_outside_window_is_401(
    env: Env, ingress: HttpClient, skew: int, signed: bool
) -> None:
    created = await env.create_integration()
    body = encode(SPEC_EXAMPLE_EVENT)
    headers = signed_headers(created.api_key, created.signing_secret, body, skew=skew)
    if not signed:
        del headers["X-Coggo-Signature"]
    response = await ingress.request("POST", WEBHOOKS, data=body, headers=headers)
    assert response.status == 401
    assert response.body["error"] == "timestamp_out_of_window"
    assert "300 seconds" in response.body["detail"]
    assert await _outbox_count(env) == 0


@pytest.mark.parametrize(
    "timestamp",
    [
        "",
        "abc",
        "1e9",
        "-5",
        "+1700000000",
        "1700000000.5",
        "0x65",
        "١٧٠٠٠٠٠٠٠٠",
        "9" * 40,
        " ",
        "1700000000 1700000000",
        "NaN",
    ],
)
async def test_webhook_malformed_timestamp_is_401(
    env: Env, ingress: HttpClient, timestamp: str
) -> None:
    created = await env.create_integration()
    body = encode(SPEC_EXAMPLE_EVENT)
    headers = {
        "Authorization": f"Bearer {created.api_key}",
        "Content-Type": "application/json",
        "X-Coggo-Id": "m1",
        "X-Coggo-Timestamp": timestamp,
        "X-Coggo-Signature": sign(created.signing_secret, "m1", timestamp, body),
    }
    response = await ingress.request("POST", WEBHOOKS, data=body, headers=headers)
    assert response.status == 401
    assert response.body["error"] == "timestamp_out_of_window"
    assert "X-Coggo-Timestamp" in response.body["detail"]


@pytest.mark.parametrize(
    "signature",
    ["", "=", "not base64!", "A" * 44, "é" * 10, "A" * 5000, "sha256=abc"],
)
async def test_webhook_malformed_signature_is_401(
    env: Env, ingress: HttpClient, signature: str
) -> None:
    created = await env.create_integration()
    body = encode(SPEC_EXAMPLE_EVENT)
    headers = signed_headers(created.api_key, created.signing_secret, body)
    headers["X-Coggo-Signature"] = signature
    response = await ingress.request(
        "POST",
        WEBHOOKS,
        data=body,
        headers={k: v.encode().decode("latin-1") for k, v in headers.items()},
    )
    assert response.status == 401
    assert response.body["error"] == "invalid_signature"


# /webhooks: validation


@pytest.mark.parametrize(
    ("mutate", "path"),
    [
        (lambda e: e.pop("id"), "id"),
        (lambda e: e.update(type="appointment.deleted"), "type"),
        (lambda e: e.update(occurredAt="yesterday"), "occurredAt"),
        (lambda e: e.update(occurredAt="2026-06-12T09:30:00"), "occurredAt"),
        (lambda e: e.pop("data"), "data"),
        (lambda e: e.update(data=[]), "data"),
        (
            lambda e: e["data"]["appointment"].pop("startsAt"),
            "data.appointment.startsAt",
        ),
        (
            lambda e: e["data"]["appointment"].update(startsAt="soon"),
            "data.appointment.startsAt",
        ),
        (
            lambda e: e["data"]["appointment"].update(timezone="Mars/Base"),
            "data.appointment.timezone",
        ),
        (
            lambda e: e["data"]["patient"].update(weight={"value": 0, "unit": "kg"}),
            "data.patient.weight.value",
        ),
        (
            lambda e: e["data"]["patient"].update(weight={"value": -3, "unit": "lb"}),
            "data.patient.weight.value",
        ),
        (
            lambda e: e["data"]["patient"].update(weight={"value": 3, "unit": "stone"}),
            "data.patient.weight.unit",
        ),
        (lambda e: e["data"]["patient"].update(weightKg=0), "data.patient.weightKg"),
        (
            lambda e: e["data"]["patient"].update(weightKg="heavy"),
            "data.patient.weightKg",
        ),
        (lambda e: e["data"]["patient"].update(sex="yes"), "data.patient.sex"),
        (
            lambda e: e["data"]["patient"].update(dateOfBirth="2023-02-30"),
            "data.patient.dateOfBirth",
        ),
        (lambda e: e["data"]["client"].pop("externalId"), "data.client.externalId"),
        (lambda e: e["data"]["patient"].pop("name"), "data.patient.name"),
        (lambda e: e.update(occurredAt=1700000000), "occurredAt"),
        (lambda e: e.update(occurredAt="0001-01-01T00:00:00+14:00"), "occurredAt"),
        (lambda e: e.update(occurredAt="9999-12-31T23:59:59-14:00"), "occurredAt"),
        (
            lambda e: e["data"]["appointment"].update(startsAt="9999-12-31T23:59:59"),
            "data.appointment.startsAt",
        ),
        (
            lambda e: e["data"]["appointment"].update(timezone="localtime"),
            "data.appointment.timezone",
        ),
        (
            lambda e: e["data"]["appointment"].update(timezone="right/UTC"),
            "data.appointment.timezone",
        ),
        (
            lambda e: e["data"]["appointment"].update(durationMinutes=True),
            "data.appointment.durationMinutes",
        ),
        (
            lambda e: e["data"]["client"].update(firstName="Ann\u0000"),
            "data.client.firstName",
        ),
        (lambda e: e.update(id="evt\u0000x"), "id"),
    ],
)
async def test_webhook_invalid_field_is_400_naming_it(
    env: Env,
    ingress: HttpClient,
    mutate,
    path: str,  # type: ignore[no-untyped-def]
) -> None:
    created = await env.create_integration()
    event = example_event()
    mutate(event)
    body = encode(event)
    response = await ingress.request(
        "POST", WEBHOOKS, data=body, headers=signed_headers(created.api_key, None, body)
    )
    assert response.status == 400
    assert response.body["error"] == "validation_failed"
    assert response.body["detail"].startswith(path + ":")
    assert await _outbox_count(env) == 0


@pytest.mark.parametrize("event_type", ["appointment.created", "appointment.updated"])
async def test_webhook_without_patient_is_patient_required(
    env: Env, ingress: HttpClient, event_type: str
) -> None:
    created = await env.create_integration()
    event = example_event(type=event_type)
    del event["data"]["patient"]
    body = encode(event)
    response = await ingress.request(
        "POST", WEBHOOKS, data=body, headers=signed_headers(created.api_key, None, body)
    )
    assert response.status == 400
    assert response.body["error"] == "patient_required"
    assert response.body["code"] == "patient_required"
    assert "data.patient" in response.body["detail"]


async def test_cancellation_without_patient_is_accepted(
    env: Env, ingress: HttpClient
) -> None:
    created = await env.create_integration()
    event = {
        "id": "evt_cancel",
        "type": "appointment.cancelled",
        "occurredAt": "2026-06-12T10:00:00Z",
        "data": {"appointment": {"externalId": "apt_1029"}},
    }
    body = encode(event)
    response = await ingress.request(
        "POST", WEBHOOKS, data=body, headers=signed_headers(created.api_key, None, body)
    )
    assert response.status == 200


# /webhooks: idempotency


async def test_webhook_repeat_returns_duplicate_flag(
    env: Env, ingress: HttpClient
) -> None:
    created = await env.create_integration()
    body = encode(SPEC_EXAMPLE_EVENT)
    headers = signed_headers(created.api_key, None, body)
    first = await ingress.request("POST", WEBHOOKS, data=body, headers=headers)
    # Same content, other key order and spacing: still the same event.
    reordered = json.dumps(
        dict(reversed(list(SPEC_EXAMPLE_EVENT.items()))), indent=2
    ).encode()
    second = await ingress.request("POST", WEBHOOKS, data=reordered, headers=headers)
    assert first.body == {"received": True, "duplicate": False}
    assert second.status == 200
    assert second.body == {"received": True, "duplicate": True}
    assert await _outbox_count(env) == 1


async def test_webhook_reused_id_with_other_content_is_409(
    env: Env, ingress: HttpClient
) -> None:
    created = await env.create_integration()
    body = encode(SPEC_EXAMPLE_EVENT)
    await ingress.request(
        "POST", WEBHOOKS, data=body, headers=signed_headers(created.api_key, None, body)
    )
    changed = example_event()
    changed["data"]["appointment"]["reason"] = "Vaccination"
    changed_body = encode(changed)
    response = await ingress.request(
        "POST",
        WEBHOOKS,
        data=changed_body,
        headers=signed_headers(created.api_key, None, changed_body),
    )
    assert response.status == 409
    assert response.body["error"] == "event_id_reused"
    assert "evt_8f2c41" in response.body["detail"]


async def test_same_event_id_from_two_clinics_is_two_events(
    env: Env, ingress: HttpClient
) -> None:
    first = await env.create_integration("clinic-a")
    second = await env.create_integration("clinic-b")
    body = encode(SPEC_EXAMPLE_EVENT)
    for created in (first, second):
        response = await ingress.request(
            "POST",
            WEBHOOKS,
            data=body,
            headers=signed_headers(created.api_key, None, body),
        )
        assert response.body["duplicate"] is False


async def test_twenty_concurrent_deliveries_store_one_event(
    env: Env, ingress: HttpClient
) -> None:
    created = await env.create_integration()
    body = encode(appointment_event("evt_race"))
    headers = signed_headers(created.api_key, created.signing_secret, body)
    responses = await asyncio.gather(
        *(
            ingress.request("POST", WEBHOOKS, data=body, headers=headers)
            for _ in range(20)
        )
    )
    assert [r.status for r in responses] == [200] * 20
    assert sum(1 for r in responses if r.body["duplicate"] is False) == 1
    assert await _outbox_count(env) == 1
    assert await env.pool.fetchval("SELECT count(*) FROM outbox") <= 1


# Odd requests


@pytest.mark.parametrize(
    "header_lines",
    [
        [b"Authorization: Bearer \x7f\x01"],
        [b"Authorization: Bearer " + "\u00e9".encode() * 100],
        [
            b"X-Coggo-Id: " + b"x" * 4000,
            b"X-Coggo-Signature: abc",
            b"X-Coggo-Timestamp: 1",
        ],
        [b'Content-Type: application/json; charset="' + b"x" * 3000],
        [b"Content-Length: abc"],
        [b"Content-Length: -1"],
        [b"Content-Length: 99999999999999999999999"],
        [b"Transfer-Encoding: chunked", b"Content-Length: 2"],
        [b"Authorization Bearer missing-colon"],
        [b"X-Coggo-Timestamp: \xff\xfe"],
    ],
)
async def test_odd_headers_get_4xx_with_detail(
    env: Env, ingress: HttpClient, header_lines: list[bytes]
) -> None:
    status, body = await raw_request(ingress.base_url, WEBHOOKS, header_lines, b"{}")
    assert 400 <= status < 500
    assert body.strip()


async def test_oversized_header_gets_4xx(env: Env, ingress: HttpClient) -> None:
    response = await ingress.request(
        "POST", WEBHOOKS, data=b"{}", headers={"X-Padding": "x" * 20000}
    )
    assert 400 <= response.status < 500


async def test_unknown_route_is_404_json(ingress: HttpClient) -> None:
    response = await ingress.request("GET", "/v1/partner/nothing")
    assert response.status == 404
    assert response.body["error"] == "not_found"
    assert "POST /v1/partner/webhooks" in response.body["detail"]


async def test_wrong_method_is_405_json(ingress: HttpClient) -> None:
    response = await ingress.request("GET", WEBHOOKS)
    assert response.status == 405
    assert response.body["detail"].endswith("use POST")


async def test_health_and_readiness(ingress: HttpClient) -> None:
    health = await ingress.request("GET", "/healthz")
    assert health.status == 200
    started = time.monotonic()
    while True:
        ready = await ingress.request("GET", "/readyz")
        if ready.status == 200 or time.monotonic() - started > 10:
            break
        await asyncio.sleep(0.1)
    assert ready.status == 200
    assert ready.body["checks"] == {"database": True, "broker": True}


async def test_merge_into_itself_is_400_naming_field(
    env: Env, ingress: HttpClient
) -> None:
    created = await env.create_integration()
    event = {
        "id": "evt_merge",
        "type": "patient.merged",
        "occurredAt": "2026-06-12T10:00:00Z",
        "data": {"patient": {"externalId": "pat_1"}, "mergedIntoExternalId": "pat_1"},
    }
    body = encode(event)
    response = await ingress.request(
        "POST", WEBHOOKS, data=body, headers=signed_headers(created.api_key, None, body)
    )
    assert response.status == 400
    assert response.body["error"] == "validation_failed"
    assert response.body["detail"].startswith("data.mergedIntoExternalId:")
    assert "merged into itself" in response.body["detail"]
