"""The reference PIMS (pims_sim), run in-process and called over real HTTP on loopback."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import re
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
import pytest
from aiohttp import web
from coggo.schemas.partner import (
    AppointmentListItem,
    EventType,
    PatientWithOwner,
    SpeciesCatalog,
    WebhookEvent,
    parse_event_data,
)
from pims_sim.app import build_app
from pims_sim.clinic import generate_clinic
from pims_sim.faults import parse_fault_option
from pims_sim.sender import appointment_events, example_event, send_events
from pims_sim.state import SimConfig, SimState
from pydantic import ValidationError

SECRET = "whsec_pims_sim_test"
LOCAL_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}$")


@dataclass
class Sim:
    state: SimState
    session: aiohttp.ClientSession
    url: str


StartSim = Callable[..., Awaitable[Sim]]


@pytest.fixture
async def start_sim() -> AsyncIterator[StartSim]:
    """Start simulators on 127.0.0.1 with a free port; all stop after the test."""
    runners: list[web.AppRunner] = []
    sessions: list[aiohttp.ClientSession] = []

    async def start(**config: Any) -> Sim:
        faults = config.pop("faults", ())
        state = SimState.create(SimConfig(secret=SECRET, **config), faults=faults)
        runner = web.AppRunner(build_app(state), shutdown_timeout=1)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        runners.append(runner)
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        # A fault that never lifts would otherwise hold a request for minutes.
        timeout = aiohttp.ClientTimeout(total=10)
        session = aiohttp.ClientSession(base_url=url, timeout=timeout)
        sessions.append(session)
        return Sim(state, session, url)

    yield start
    for session in sessions:
        await session.close()
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def sim(start_sim: StartSim) -> Sim:
    return await start_sim(seed=7)


def hmac_signature(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """Sign by the Partner API's formula, independently of the product's signer."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret.encode(), signed, hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


def signed_headers(
    body: bytes,
    *,
    secret: str = SECRET,
    message_id: str = "push_1",
    timestamp: int | None = None,
) -> dict[str, str]:
    stamp = int(time.time()) if timestamp is None else timestamp
    return {
        "Content-Type": "application/json",
        "X-Coggo-Id": message_id,
        "X-Coggo-Timestamp": str(stamp),
        "X-Coggo-Signature": hmac_signature(secret, message_id, stamp, body),
    }


def soap_envelope(note_id: str = "note_1", version: int = 1) -> dict[str, Any]:
    return {
        "id": f"push_{note_id}_v{version}",
        "occurredAt": "2026-12-04T15:00:00Z",
        "meta": {
            "externalPatientId": "pat_771",
            "externalAppointmentId": "apt_1029",
            "externalClinicId": "clinic_9",
            "vet": {"name": "Dr. Okafor", "externalStaffId": "stf_44"},
            "noteId": note_id,
            "version": version,
            "signedAt": "2026-12-04T14:59:00Z",
            "language": "en",
        },
        "formats": {
            "json": {
                "schemaVersion": "1.0",
                "subjective": {
                    "title": "Subjective",
                    "fields": [
                        {
                            "name": "history",
                            "label": "History",
                            "type": "free_text",
                            "value": "Lame on left fore for 3 days.",
                        }
                    ],
                },
            },
            "text": {"subjective": "History: Lame on left fore for 3 days."},
            "html": "<h3>Subjective</h3><p>History: Lame on left fore for 3 days.</p>",
        },
    }


async def post_push(
    sim: Sim, envelope: dict[str, Any], **signing: Any
) -> aiohttp.ClientResponse:
    body = json.dumps(envelope).encode()
    async with sim.session.post(
        "/push", data=body, headers=signed_headers(body, **signing)
    ) as response:
        await response.read()
        return response


async def get_json(sim: Sim, path: str, **params: str) -> tuple[int, Any]:
    async with sim.session.get(path, params=params) as response:
        return response.status, await response.json()


async def set_fault(sim: Sim, fault: dict[str, Any]) -> None:
    async with sim.session.post("/_sim/faults", json=fault) as response:
        assert response.status == 200, await response.text()


def starts_at_utc(appointment: dict[str, Any]) -> datetime:
    local = datetime.fromisoformat(appointment["startsAt"])
    return local.replace(tzinfo=ZoneInfo(appointment["timezone"])).astimezone(UTC)


# Species catalog


async def test_species_catalog_keys_and_labels(sim: Sim) -> None:
    status, body = await get_json(sim, "/species")

    assert status == 200
    SpeciesCatalog.model_validate(body)
    labels = {item["key"]: item["label"] for item in body["species"]}
    assert labels["1"] == "Canine"
    assert labels["2"] == "Feline"
    assert labels["7"] == "Equine"
    assert len(labels) >= 6
    assert any(label.islower() for label in labels.values())
    words = [word for label in labels.values() for word in label.split()]
    assert any(len(word) > 1 and word.isupper() for word in words)


# Patient search


async def test_search_matches_patient_name(sim: Sim) -> None:
    status, body = await get_json(sim, "/patients", q="sky")

    assert status == 200
    sky = next(p for p in body["patients"] if p["externalId"] == "pat_771")
    assert sky["name"] == "Sky"
    assert sky["owner"]["externalId"] == "cli_553"


@pytest.mark.parametrize(
    "query",
    [
        "peggy",
        "BARTL",
        "Peggy Bartl",
        "peggy.bartl@EXAMPLE.com",
        "+15134041567",
        "513-404-1567",
        "(513) 404 1567",
    ],
)
async def test_search_matches_owner_fields(sim: Sim, query: str) -> None:
    status, body = await get_json(sim, "/patients", q=query)

    assert status == 200
    ids = {patient["externalId"] for patient in body["patients"]}
    assert "pat_771" in ids
    # Peggy Bartl owns two patients, and both match a query on the owner.
    assert "pat_772" in ids


@pytest.mark.parametrize(
    ("query", "name"),
    [("мурка", "Мурка"), ("ZOË", "Zoë"), ("zoe\u0308", "Zoë"), ("BJØRN", "Bjørn")],
)
async def test_search_unicode_ignores_case(sim: Sim, query: str, name: str) -> None:
    status, body = await get_json(sim, "/patients", q=query)

    assert status == 200
    assert name in {patient["name"] for patient in body["patients"]}


async def test_search_no_match_is_empty_list(sim: Sim) -> None:
    status, body = await get_json(sim, "/patients", q="zzqx-no-such-patient")

    assert status == 200
    assert body == {"patients": []}


async def test_search_caps_results_at_20(sim: Sim) -> None:
    all_matches = sim.state.clinic.search_patients("example", limit=None)
    assert len(all_matches) > 20

    status, body = await get_json(sim, "/patients", q="example")

    assert status == 200
    assert len(body["patients"]) == 20


async def test_search_results_are_patient_with_owner(sim: Sim) -> None:
    status, body = await get_json(sim, "/patients", q="example")

    assert status == 200
    for patient in body["patients"]:
        parsed = PatientWithOwner.model_validate(patient)
        assert parsed.owner.external_id == patient["externalClientId"]


@pytest.mark.parametrize("params", [{}, {"q": ""}, {"q": "a"}, {"q": "  b  "}])
async def test_search_rejects_short_query(sim: Sim, params: dict[str, str]) -> None:
    status, body = await get_json(sim, "/patients", **params)

    assert status == 400
    assert body["error"] == "invalid_parameter"
    assert "q" in body["detail"].split()


async def test_search_rejects_overlong_query(sim: Sim) -> None:
    status, body = await get_json(sim, "/patients", q="x" * 201)

    assert status == 400
    assert "at most 200" in body["detail"]


# Appointments


async def test_appointments_days_filter(sim: Sim) -> None:
    counts = {}
    for days in (1, 7, 30):
        before = datetime.now(UTC)
        status, body = await get_json(sim, "/appointments", days=str(days))
        after = datetime.now(UTC)

        assert status == 200
        counts[days] = len(body["appointments"])
        for item in body["appointments"]:
            start = starts_at_utc(item["appointment"])
            assert start >= before - timedelta(seconds=1)
            assert start < after + timedelta(days=days)

    assert counts[1] <= counts[7] < counts[30]
    assert counts[30] == 20


async def test_appointments_default_is_7_days(sim: Sim) -> None:
    now = datetime.now(UTC)
    _, default = await get_json(sim, "/appointments")
    _, month = await get_json(sim, "/appointments", days="30")

    within_week = [
        item
        for item in month["appointments"]
        if starts_at_utc(item["appointment"]) < now + timedelta(days=7)
    ]
    assert default["appointments"] == within_week
    assert len(within_week) < len(month["appointments"])


@pytest.mark.parametrize("days", ["0", "31", "-1", "abc", "7.5", "", "1e1"])
async def test_appointments_reject_days_out_of_range(sim: Sim, days: str) -> None:
    status, body = await get_json(sim, "/appointments", days=days)

    assert status == 400
    assert body["error"] == "invalid_parameter"
    assert "days" in body["detail"]


async def test_appointments_use_webhook_shapes(sim: Sim) -> None:
    _, body = await get_json(sim, "/appointments", days="30")

    for item in body["appointments"]:
        AppointmentListItem.model_validate(item)
        assert LOCAL_TIME.match(item["appointment"]["startsAt"])
        assert item["appointment"]["timezone"] == "America/New_York"
        assert item["patient"]["externalClientId"] == item["client"]["externalId"]
    starts = [starts_at_utc(item["appointment"]) for item in body["appointments"]]
    assert starts == sorted(starts)


async def test_example_appointment_is_listed(sim: Sim) -> None:
    _, body = await get_json(sim, "/appointments", days="30")

    example = next(
        item
        for item in body["appointments"]
        if item["appointment"]["externalId"] == "apt_1029"
    )
    assert example["client"]["firstName"] == "Peggy"
    assert example["client"]["lastName"] == "Bartl"
    assert example["patient"]["externalId"] == "pat_771"
    assert example["patient"]["name"] == "Sky"
    assert example["appointment"]["startsAt"].endswith("T14:00:00")


async def test_appointments_count_and_timezone_configurable(
    start_sim: StartSim,
) -> None:
    sim = await start_sim(seed=3, appointments=5, timezone="Europe/Berlin")

    _, body = await get_json(sim, "/appointments", days="30")

    assert len(body["appointments"]) == 5
    for item in body["appointments"]:
        assert item["appointment"]["timezone"] == "Europe/Berlin"
        local_time = datetime.fromisoformat(item["appointment"]["startsAt"]).time()
        assert 8 <= local_time.hour < 18


# Generated data


async def test_data_covers_legacy_and_unicode_cases(sim: Sim) -> None:
    status, body = await get_json(sim, "/_sim/data")
    assert status == 200
    patients = body["patients"]

    units = {p["weight"]["unit"] for p in patients if "weight" in p}
    assert units == {"kg", "lb"}
    assert any("weightKg" in p for p in patients)
    assert any("age" in p and "dateOfBirth" not in p for p in patients)
    assert any("species" in p and "speciesKey" not in p for p in patients)
    assert {"Zoë", "Мурка"} <= {p["name"] for p in patients}

    catalog_keys = {item["key"] for item in body["species"]}
    used_keys = {p["speciesKey"] for p in patients if "speciesKey" in p}
    assert used_keys <= catalog_keys
    assert len(used_keys) >= 4

    pets_per_owner: dict[str, int] = {}
    for patient in patients:
        owner_id = patient["owner"]["externalId"]
        pets_per_owner[owner_id] = pets_per_owner.get(owner_id, 0) + 1
    assert max(pets_per_owner.values()) >= 3
    for patient in patients:
        PatientWithOwner.model_validate(patient)


def test_data_deterministic_per_seed() -> None:
    now = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)

    def snapshot(seed: int) -> list[dict[str, Any]]:
        clinic = generate_clinic(seed, now=now)
        items = [clinic.appointment_item(item) for item in clinic.appointments]
        return [clinic.patient_with_owner(p) for p in clinic.patients] + items

    assert snapshot(5) == snapshot(5)
    assert snapshot(5) != snapshot(6)


# SOAP push


async def test_push_with_valid_signature_stored(sim: Sim) -> None:
    envelope = soap_envelope()

    response = await post_push(sim, envelope)

    assert response.status == 200
    assert await response.json() == {"stored": True, "duplicate": False}
    _, listing = await get_json(sim, "/_sim/pushes")
    [stored] = listing["pushes"]
    assert stored["noteId"] == "note_1"
    assert stored["version"] == 1
    assert stored["envelopeId"] == "push_note_1_v1"
    assert stored["envelope"] == envelope
    assert datetime.fromisoformat(stored["receivedAt"]) <= datetime.now(UTC)


async def test_push_rejects_wrong_secret(sim: Sim) -> None:
    response = await post_push(sim, soap_envelope(), secret="not-the-secret")

    assert response.status == 401
    assert (await response.json())["error"] == "invalid_signature"
    assert len(sim.state.pushes) == 0


async def test_push_rejects_tampered_body(sim: Sim) -> None:
    body = json.dumps(soap_envelope()).encode()
    headers = signed_headers(body)
    tampered = body.replace(b"Lame on left fore", b"Lame on right fore")

    async with sim.session.post("/push", data=tampered, headers=headers) as response:
        assert response.status == 401
        assert (await response.json())["error"] == "invalid_signature"
    assert len(sim.state.pushes) == 0


@pytest.mark.parametrize(
    "header", ["X-Coggo-Id", "X-Coggo-Timestamp", "X-Coggo-Signature"]
)
async def test_push_rejects_missing_header(sim: Sim, header: str) -> None:
    body = json.dumps(soap_envelope()).encode()
    headers = signed_headers(body)
    del headers[header]

    async with sim.session.post("/push", data=body, headers=headers) as response:
        error = await response.json()
        assert response.status == 401
    assert error["error"] == "invalid_signature"
    assert header in error["detail"]
    assert len(sim.state.pushes) == 0


@pytest.mark.parametrize("offset", [-301, 301])
async def test_push_rejects_timestamp_outside_window(sim: Sim, offset: int) -> None:
    response = await post_push(
        sim, soap_envelope(), timestamp=int(time.time()) + offset
    )

    assert response.status == 401
    assert (await response.json())["error"] == "timestamp_out_of_window"
    assert len(sim.state.pushes) == 0


async def test_push_accepts_timestamp_inside_window(sim: Sim) -> None:
    response = await post_push(sim, soap_envelope(), timestamp=int(time.time()) - 290)

    assert response.status == 200


async def test_push_rejects_invalid_envelope(sim: Sim) -> None:
    envelope = soap_envelope()
    del envelope["meta"]["noteId"]

    response = await post_push(sim, envelope)

    assert response.status == 400
    error = await response.json()
    assert error["error"] == "validation_failed"
    assert "meta.noteId" in error["detail"]
    assert len(sim.state.pushes) == 0


@pytest.mark.parametrize("body", [b"", b"not json", b"[1, 2]", b"\xff\xfe"])
async def test_push_rejects_non_object_body(sim: Sim, body: bytes) -> None:
    async with sim.session.post(
        "/push", data=body, headers=signed_headers(body)
    ) as response:
        error = await response.json()
        assert response.status == 400
    assert error["error"] == "bad_request"
    assert "body" in error["detail"]


async def test_push_same_note_version_stored_once(sim: Sim) -> None:
    first = await post_push(sim, soap_envelope(version=1))
    repeat = await post_push(sim, soap_envelope(version=1), message_id="push_1_retry")
    amended = await post_push(sim, soap_envelope(version=2))

    assert first.status == 200
    assert await first.json() == {"stored": True, "duplicate": False}
    assert repeat.status == 200
    assert await repeat.json() == {"stored": True, "duplicate": True}
    assert await amended.json() == {"stored": True, "duplicate": False}
    _, listing = await get_json(sim, "/_sim/pushes")
    assert [(p["noteId"], p["version"]) for p in listing["pushes"]] == [
        ("note_1", 1),
        ("note_1", 2),
    ]
    assert listing["pushes"][0]["deliveries"] == 2


async def test_delete_pushes_empties_store(sim: Sim) -> None:
    await post_push(sim, soap_envelope())

    async with sim.session.delete("/_sim/pushes") as response:
        assert await response.json() == {"deleted": 1}
    _, listing = await get_json(sim, "/_sim/pushes")

    assert listing == {"pushes": []}


# Faults


async def test_status_fault_n_times_then_normal(sim: Sim) -> None:
    await set_fault(sim, {"endpoint": "push", "status": 500, "times": 2})

    statuses = []
    for _ in range(3):
        response = await post_push(sim, soap_envelope())
        statuses.append(response.status)

    assert statuses == [500, 500, 200]
    assert len(sim.state.pushes) == 1
    _, faults = await get_json(sim, "/_sim/faults")
    assert faults == {"faults": []}


async def test_status_fault_body_is_json_error(sim: Sim) -> None:
    await set_fault(sim, {"endpoint": "species", "status": 503})

    for _ in range(2):
        status, body = await get_json(sim, "/species")
        assert status == 503
        assert body["error"] == "simulated_fault"


async def test_delay_fault_slows_endpoint(sim: Sim) -> None:
    await set_fault(sim, {"endpoint": "patients", "delay": 0.6, "times": 1})

    started = time.monotonic()
    slow_status, slow_body = await get_json(sim, "/patients", q="sky")
    slow = time.monotonic() - started
    started = time.monotonic()
    fast_status, _ = await get_json(sim, "/patients", q="sky")
    fast = time.monotonic() - started

    assert slow_status == 200
    assert slow_body["patients"]
    assert slow >= 0.6
    assert fast_status == 200
    assert fast < 0.5


async def test_malformed_fault_sends_invalid_json(sim: Sim) -> None:
    await set_fault(sim, {"endpoint": "appointments", "malformed": True})

    async with sim.session.get("/appointments") as response:
        text = await response.text()
        assert response.status == 200
    with pytest.raises(ValueError, match=r"Expecting|Unterminated|delimiter"):
        json.loads(text)


async def test_malformed_shape_fault_fails_schema(sim: Sim) -> None:
    await set_fault(sim, {"endpoint": "species", "malformed": "shape"})

    status, body = await get_json(sim, "/species")

    assert status == 200
    assert "species" in body
    with pytest.raises(ValidationError):
        SpeciesCatalog.model_validate(body)


async def test_malformed_push_still_stores(sim: Sim) -> None:
    await set_fault(sim, {"endpoint": "push", "malformed": True, "times": 1})

    response = await post_push(sim, soap_envelope())

    assert response.status == 200
    assert len(sim.state.pushes) == 1


async def test_retry_after_fault_sets_header(sim: Sim) -> None:
    await set_fault(sim, {"endpoint": "push", "status": 429, "retry_after": 2})

    response = await post_push(sim, soap_envelope())

    assert response.status == 429
    assert response.headers["Retry-After"] == "2"
    assert len(sim.state.pushes) == 0


async def test_timeout_fault_holds_until_client_leaves(sim: Sim) -> None:
    await set_fault(sim, {"endpoint": "push", "timeout": True, "times": 1})
    body = json.dumps(soap_envelope()).encode()

    started = time.monotonic()
    with pytest.raises(asyncio.TimeoutError):
        async with sim.session.post(
            "/push",
            data=body,
            headers=signed_headers(body),
            timeout=aiohttp.ClientTimeout(total=0.5),
        ) as response:
            await response.read()
    assert time.monotonic() - started >= 0.5

    retry = await post_push(sim, soap_envelope())
    assert retry.status == 200
    assert len(sim.state.pushes) == 1


async def test_redirect_fault_sends_location(sim: Sim) -> None:
    await set_fault(
        sim, {"endpoint": "species", "status": 302, "location": "http://127.0.0.1:9/x"}
    )

    async with sim.session.get("/species", allow_redirects=False) as response:
        assert response.status == 302
        assert response.headers["Location"] == "http://127.0.0.1:9/x"


async def test_delete_faults_restores_endpoints(sim: Sim) -> None:
    await set_fault(sim, {"endpoint": "species", "status": 503})
    await set_fault(sim, {"endpoint": "patients", "status": 500})

    async with sim.session.delete("/_sim/faults", params={"endpoint": "species"}):
        pass
    species_status, _ = await get_json(sim, "/species")
    patients_status, _ = await get_json(sim, "/patients", q="sky")
    async with sim.session.delete("/_sim/faults"):
        pass
    cleared_status, _ = await get_json(sim, "/patients", q="sky")

    assert species_status == 200
    assert patients_status == 500
    assert cleared_status == 200


@pytest.mark.parametrize(
    ("fault", "field"),
    [
        ({"endpoint": "billing", "status": 500}, "endpoint"),
        ({"endpoint": "push", "status": 99}, "status"),
        ({"endpoint": "push", "status": "500"}, "status"),
        ({"endpoint": "push", "status": 500, "times": 0}, "times"),
        ({"endpoint": "push", "delay": -1}, "delay"),
        ({"endpoint": "push", "status": 500, "colour": "red"}, "colour"),
        ({"endpoint": "push"}, "at least one"),
        ({"endpoint": "push", "timeout": True, "status": 500}, "timeout"),
        ({"endpoint": "push", "malformed": "xml"}, "malformed"),
        ({"endpoint": "push", "status": 500, "location": "/x"}, "location"),
    ],
)
async def test_invalid_fault_rejected(
    sim: Sim, fault: dict[str, Any], field: str
) -> None:
    async with sim.session.post("/_sim/faults", json=fault) as response:
        error = await response.json()
        assert response.status == 400
    assert error["error"] == "validation_failed"
    assert field in error["detail"]
    _, faults = await get_json(sim, "/_sim/faults")
    assert faults == {"faults": []}


async def test_startup_fault_from_option(start_sim: StartSim) -> None:
    fault = parse_fault_option("push:status=429,retry_after=3,times=1")
    sim = await start_sim(faults=[fault])

    first = await post_push(sim, soap_envelope())
    second = await post_push(sim, soap_envelope())

    assert first.status == 429
    assert first.headers["Retry-After"] == "3"
    assert second.status == 200


@pytest.mark.parametrize(
    "option", ["push", "push:", "push:status", "push:status=500,=1", "x:status=500"]
)
def test_fault_option_rejects_bad_syntax(option: str) -> None:
    with pytest.raises(ValueError, match=r"fault|endpoint"):
        parse_fault_option(option)


async def test_calls_counted_per_endpoint(sim: Sim) -> None:
    await set_fault(sim, {"endpoint": "species", "status": 500, "times": 1})
    await get_json(sim, "/species")
    await get_json(sim, "/species")
    await get_json(sim, "/patients", q="a")
    await post_push(sim, soap_envelope())

    _, body = await get_json(sim, "/_sim/calls")

    assert body == {
        "calls": {"species": 2, "patients": 1, "appointments": 0, "push": 1}
    }
    async with sim.session.delete("/_sim/calls"):
        pass
    _, reset = await get_json(sim, "/_sim/calls")
    assert set(reset["calls"].values()) == {0}


# Routing, credentials and errors


async def test_health_reports_counts(sim: Sim) -> None:
    status, body = await get_json(sim, "/_sim/health")

    assert status == 200
    assert body["status"] == "ok"
    assert body["appointments"] == 20
    assert body["patients"] == len(sim.state.clinic.patients)


async def test_base_path_prefixes_pims_routes(start_sim: StartSim) -> None:
    sim = await start_sim(base_path="/pims/")

    prefixed, _ = await get_json(sim, "/pims/species")
    root, error = await get_json(sim, "/species")
    control, _ = await get_json(sim, "/_sim/health")

    assert prefixed == 200
    assert root == 404
    assert error["error"] == "not_found"
    assert control == 200


async def test_token_required_when_configured(start_sim: StartSim) -> None:
    sim = await start_sim(token="tok_123")

    missing, error = await get_json(sim, "/species")
    async with sim.session.get(
        "/species", headers={"Authorization": "Bearer tok_wrong"}
    ) as response:
        wrong = response.status
    async with sim.session.get(
        "/species", headers={"Authorization": "Bearer tok_123"}
    ) as response:
        right = response.status

    assert missing == 401
    assert error["error"] == "unauthorized"
    assert wrong == 401
    assert right == 200


async def test_wrong_method_is_json_405(sim: Sim) -> None:
    async with sim.session.post("/species", json={}) as response:
        body = await response.json()
        assert response.status == 405
    assert body["error"] == "method_not_allowed"
    assert "GET" in response.headers["Allow"]


# Sending webhooks


@dataclass
class FakeIngress:
    url: str
    received: list[tuple[dict[str, str], bytes]]
    # Event ids that the fake ingress rejects with 401.
    rejected_ids: set[str]


@pytest.fixture
async def fake_ingress() -> AsyncIterator[FakeIngress]:
    """Stand-in for the Coggo ingress that records requests and checks signatures."""
    received: list[tuple[dict[str, str], bytes]] = []
    rejected_ids: set[str] = set()

    async def webhooks(request: web.Request) -> web.Response:
        body = await request.read()
        received.append((dict(request.headers), body))
        expected = hmac_signature(
            SECRET,
            request.headers["X-Coggo-Id"],
            int(request.headers["X-Coggo-Timestamp"]),
            body,
        )
        event = json.loads(body)
        if request.headers["X-Coggo-Signature"] != expected or event["id"] in (
            rejected_ids
        ):
            return web.json_response({"error": "invalid_signature"}, status=401)
        return web.json_response({"received": True, "duplicate": False})

    app = web.Application()
    app.router.add_post("/v1/partner/webhooks", webhooks)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield FakeIngress(url, received, rejected_ids)
    await runner.cleanup()


async def test_send_example_event_signed(fake_ingress: FakeIngress) -> None:
    results = await send_events(
        fake_ingress.url + "/", "cgk_live_test", SECRET, [example_event()]
    )

    [result] = results
    assert result.status == 200
    assert result.accepted
    [(headers, body)] = fake_ingress.received
    assert headers["Authorization"] == "Bearer cgk_live_test"
    assert headers["X-Coggo-Id"] == "evt_8f2c41"
    assert abs(int(headers["X-Coggo-Timestamp"]) - time.time()) < 5
    event = json.loads(body)
    assert event["type"] == "appointment.created"
    occurred = datetime.fromisoformat(event["occurredAt"])
    assert abs((datetime.now(UTC) - occurred).total_seconds()) < 5
    assert event["data"]["appointment"]["externalId"] == "apt_1029"
    assert event["data"]["client"]["externalId"] == "cli_553"
    assert event["data"]["patient"] == {
        "externalId": "pat_771",
        "name": "Sky",
        "speciesKey": "1",
        "breed": "Golden Retriever",
        "color": "Golden",
        "sex": "female",
        "reproductiveStatus": "spayed",
        "dateOfBirth": "2023-06-08",
        "weight": {"value": 11, "unit": "kg"},
    }


async def test_send_builds_example_from_flag(fake_ingress: FakeIngress) -> None:
    results = await send_events(
        ingress_url=fake_ingress.url,
        api_key="cgk_live_test",
        secret=SECRET,
        example=True,
    )

    assert [result.event_id for result in results] == ["evt_8f2c41"]
    assert results[0].accepted
    with pytest.raises(ValueError, match="not both"):
        await send_events(
            fake_ingress.url, "cgk_live_test", SECRET, example=True, appointments=2
        )
    assert len(fake_ingress.received) == 1


def test_appointment_events_are_valid_webhooks() -> None:
    clinic = generate_clinic(2, appointments=12)

    events = appointment_events(clinic)

    assert len(events) == 12
    assert len({event["id"] for event in events}) == 12
    for event in events:
        parsed = WebhookEvent.model_validate(event)
        assert parsed.type == EventType.APPOINTMENT_CREATED
        parse_event_data(parsed.type, parsed.data)


async def test_send_reports_unreachable_ingress() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Nothing listens on the port once the probe socket is closed.
    results = await send_events(
        f"http://127.0.0.1:{port}", "cgk_live_test", SECRET, [example_event()]
    )

    assert results[0].status is None
    assert not results[0].accepted
    assert "request failed" in results[0].body


async def run_cli(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pims_sim",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def test_send_command_prints_one_line_per_event(
    fake_ingress: FakeIngress,
) -> None:
    code, stdout, _ = await run_cli(
        "send",
        "--ingress-url",
        fake_ingress.url,
        "--api-key",
        "cgk_live_test",
        "--secret",
        SECRET,
        "--appointments",
        "3",
    )

    lines = stdout.splitlines()
    assert code == 0
    assert len(lines) == 3
    for line in lines:
        event_id, status, body = line.split(" ", 2)
        assert event_id.startswith("evt_apt_")
        assert status == "200"
        assert json.loads(body) == {"received": True, "duplicate": False}
    assert len(fake_ingress.received) == 3


async def test_send_command_fails_when_refused(fake_ingress: FakeIngress) -> None:
    fake_ingress.rejected_ids.add("evt_8f2c41")

    code, stdout, _ = await run_cli(
        "send",
        "--ingress-url",
        fake_ingress.url,
        "--api-key",
        "cgk_live_test",
        "--secret",
        SECRET,
        "--example",
    )

    assert code == 1
    assert stdout.startswith("evt_8f2c41 401 ")


async def test_send_command_requires_credentials() -> None:
    env_free = {k: v for k, v in os.environ.items() if not k.startswith("COGGO_PIMS")}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pims_sim",
        "send",
        "--ingress-url",
        "http://127.0.0.1:9",
        "--example",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env_free,
    )
    _, stderr = await process.communicate()

    assert process.returncode == 2
    assert b"--api-key" in stderr


# Command line


@pytest.mark.parametrize(
    ("command", "phrases"),
    [
        ("serve", ["--port", "--secret", "--seed", "--appointments", "--timezone",
                   "--fault", "seconds", "count", "IANA"]),
        ("send", ["--ingress-url", "--api-key", "--secret", "--example",
                  "--appointments", "--timeout", "seconds"]),
    ],
)  # fmt: skip
async def test_help_explains_options(command: str, phrases: list[str]) -> None:
    code, stdout, _ = await run_cli(command, "--help")

    assert code == 0
    for phrase in phrases:
        assert phrase in stdout


async def test_serve_command_runs_until_sigterm() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pims_sim",
        "serve",
        "--port",
        str(port),
        "--secret",
        SECRET,
        "--appointments",
        "4",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        health = None
        async with aiohttp.ClientSession() as session:
            for _ in range(100):
                try:
                    async with session.get(
                        f"http://127.0.0.1:{port}/_sim/health"
                    ) as response:
                        health = await response.json()
                        break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.1)
        assert health is not None
        assert health["appointments"] == 4
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), 15)

    assert process.returncode == 0
    assert SECRET not in stderr.decode()
