"""The reconciliation worker against the reference PIMS over HTTP, a real broker and database."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Callable
from typing import Any

import aio_pika
import orjson
import pytest
from coggo.integrations import PimsCredentials, store_pims_credentials
from coggo.topology import REASON_HEADER, RECONCILIATION_QUEUE

from tests.support.reconcile import (
    Bus,
    Pims,
    pims,
    pims_factory,
    reconciliation,
    replace_appointments,
    replace_search,
    run_admin,
    set_species_catalog,
    worker_settings,
)
from tests.support.stack import (
    Env,
    RunningService,
    free_port,
    start_service,
    wait_until,
)

__all__ = ["pims", "pims_factory", "reconciliation"]

PimsFactory = Callable[..., Any]

EXAMPLE_OWNER = {
    "externalId": "cli_900",
    "firstName": "Ada",
    "lastName": "Quill",
    "email": "ada.quill@example.com",
    "phone": "+15135550142",
}


def import_patient(**fields: Any) -> dict[str, Any]:
    patient = {
        "externalId": "pat_900",
        "name": "Pixel",
        "speciesKey": "2",
        "breed": "Maine Coon",
        "sex": "male",
        "age": {"value": 3, "unit": "years"},
        "weight": {"value": 11, "unit": "lb"},
        "owner": dict(EXAMPLE_OWNER),
    }
    patient.update(fields)
    return patient


async def open_bus(env: Env, amqp: aio_pika.abc.AbstractConnection) -> Bus:
    return await Bus.open(env, amqp)


async def expected_nearest(pims: Pims, count: int) -> list[str]:
    ordered = sorted(pims.state.clinic.appointments, key=lambda a: a.starts_at_utc)
    return [scheduled.appointment.external_id for scheduled in ordered[:count]]


# Appointment reconciliation


async def test_reconcile_processes_nearest_100_of_150(
    env: Env,
    pims_factory: PimsFactory,
    reconciliation: RunningService,
    amqp: aio_pika.abc.AbstractConnection,
) -> None:
    sim: Pims = await pims_factory(seed=5, appointments=150)
    # Farthest first, so processing in list order would pick the wrong 100.
    replace_appointments(sim.state, lambda items: list(reversed(items)))
    await env.create_integration(pims_base_url=sim.url, default_timezone="UTC")
    bus = await open_bus(env, amqp)

    command_id = await bus.send("reconcile.appointments", {"days": 30})
    event = await bus.event_for("reconcile.completed", command_id)

    data = event["data"]
    assert event["clinicId"] == "clinic-1"
    assert data["status"] == "succeeded"
    assert data["error"] is None
    assert data["days"] == 30
    assert data["fetched"] == 150
    assert data["processed"] == 100
    assert data["truncated"] == 50
    assert data["skipped"] == 0
    assert data["durationMs"] >= 0

    nearest = await expected_nearest(sim, 100)
    stored = await env.pool.fetch("SELECT external_id FROM appointments")
    assert sorted(row["external_id"] for row in stored) == sorted(nearest)
    assert await env.pool.fetchval("SELECT count(*) FROM visits") == 100

    run = await env.pool.fetchrow(
        "SELECT * FROM reconcile_runs WHERE command_id = $1", command_id
    )
    assert run["status"] == "succeeded"
    assert run["kind"] == "appointments"
    assert (run["fetched"], run["processed"], run["truncated"]) == (150, 100, 50)
    assert run["result"]["runId"] == data["runId"]

    # Cancelled appointments get a cancelled visit; the others a scheduled one.
    scheduled = [
        a
        for a in sim.state.clinic.appointments
        if a.appointment.external_id in nearest
        and a.appointment.status is not None
        and a.appointment.status.value == "scheduled"
    ]
    visits = await bus.events_of("visit.scheduled")
    assert len(visits) == len(scheduled)
    cancelled = await env.pool.fetchval(
        "SELECT count(*) FROM visits WHERE status = 'cancelled'"
    )
    assert cancelled == 100 - len(scheduled)


async def test_reconcile_skips_invalid_items_and_processes_rest(
    env: Env,
    pims_factory: PimsFactory,
    reconciliation: RunningService,
    amqp: aio_pika.abc.AbstractConnection,
) -> None:
    sim: Pims = await pims_factory(seed=3, appointments=10)

    def add_invalid(items: list[dict[str, Any]]) -> list[Any]:
        no_start = copy.deepcopy(items[1])
        no_start["appointment"]["externalId"] = "apt_no_start"
        del no_start["appointment"]["startsAt"]
        no_patient = copy.deepcopy(items[2])
        no_patient["appointment"]["externalId"] = "apt_no_patient"
        no_patient["appointment"]["status"] = "scheduled"
        del no_patient["patient"]
        bad_weight = copy.deepcopy(items[3])
        bad_weight["appointment"]["externalId"] = "apt_bad_weight"
        bad_weight["patient"]["weight"] = {"value": 4, "unit": "stone"}
        duplicate = copy.deepcopy(items[4])
        return [
            "not an appointment",
            *items[:5],
            no_start,
            no_patient,
            duplicate,
            bad_weight,
            *items[5:],
        ]

    replace_appointments(sim.state, add_invalid)
    await env.create_integration(pims_base_url=sim.url)
    bus = await open_bus(env, amqp)

    command_id = await bus.send("reconcile.appointments", {"days": 30})
    data = (await bus.event_for("reconcile.completed", command_id))["data"]

    assert data["status"] == "succeeded"
    assert data["fetched"] == 15
    assert data["processed"] == 10
    assert data["skipped"] == 5
    assert data["truncated"] == 0
    assert data["skippedReasons"] == {
        "duplicate_item": 1,
        "invalid_item": 3,
        "patient_required": 1,
    }
    by_id = {item["externalId"]: item for item in data["skippedItems"]}
    assert by_id["apt_no_start"]["reason"] == "invalid_item"
    assert "startsAt" in by_id["apt_no_start"]["detail"]
    assert by_id["apt_no_patient"]["reason"] == "patient_required"
    assert by_id["apt_bad_weight"]["reason"] == "invalid_item"
    assert "weight" in by_id["apt_bad_weight"]["detail"]
    assert by_id[None]["index"] == 0
    assert by_id[None]["reason"] == "invalid_item"
    assert await env.pool.fetchval("SELECT count(*) FROM appointments") == 10
    # Skip reasons name fields, never client data.
    assert b"@example" not in orjson.dumps(data)


async def test_reconcile_retries_500_then_succeeds(
    env: Env,
    pims: Pims,
    reconciliation: RunningService,
    amqp: aio_pika.abc.AbstractConnection,
) -> None:
    pims.fault(endpoint="appointments", status=500, times=2)
    await env.create_integration(pims_base_url=pims.url)
    bus = await open_bus(env, amqp)

    command_id = await bus.send("reconcile.appointments", {"days": 30})
    data = (await bus.event_for("reconcile.completed", command_id))["data"]

    assert data["status"] == "succeeded"
    assert data["processed"] == 20
    assert pims.calls("appointments") == 3


async def test_reconcile_reports_pims_down(
    env: Env, reconciliation: RunningService, amqp: aio_pika.abc.AbstractConnection
) -> None:
    await env.create_integration(pims_base_url=f"http://127.0.0.1:{free_port()}")
    bus = await open_bus(env, amqp)

    command_id = await bus.send("reconcile.appointments", {"days": 3})
    data = (await bus.event_for("reconcile.completed", command_id))["data"]

    assert data["status"] == "failed"
    assert data["error"] == "pims_unavailable"
    assert data["processed"] == 0
    status = await env.pool.fetchval(
        "SELECT status FROM reconcile_runs WHERE command_id = $1", command_id
    )
    assert status == "failed"


async def test_reconcile_sends_stored_credentials(
    env: Env,
    pims_factory: PimsFactory,
    reconciliation: RunningService,
    amqp: aio_pika.abc.AbstractConnection,
) -> None:
    sim: Pims = await pims_factory(seed=2, appointments=4, token="tok_sim_123")
    created = await env.create_integration(pims_base_url=sim.url)
    bus = await open_bus(env, amqp)

    without = await bus.send("reconcile.appointments", {"days": 30})
    unauthorized = (await bus.event_for("reconcile.completed", without))["data"]
    async with env.pool.acquire() as connection:
        await store_pims_credentials(
            connection,
            env.box,
            created.integration_id,
            PimsCredentials(scheme="bearer", secret="tok_sim_123"),
        )
    with_token = await bus.send("reconcile.appointments", {"days": 30})
    accepted = (await bus.event_for("reconcile.completed", with_token))["data"]

    assert unauthorized["status"] == "failed"
    assert unauthorized["error"] == "pims_unauthorized"
    assert accepted["status"] == "succeeded"
    assert accepted["processed"] == 4


@pytest.mark.parametrize("days", [0, 31, -1, "7", 2.5, True])
async def test_reconcile_rejects_days_out_of_range(
    env: Env,
    pims: Pims,
    reconciliation: RunningService,
    amqp: aio_pika.abc.AbstractConnection,
    days: Any,
) -> None:
    await env.create_integration(pims_base_url=pims.url)
    bus = await open_bus(env, amqp)

    command_id = await bus.send("reconcile.appointments", {"days": days})
    data = (await bus.event_for("reconcile.completed", command_id))["data"]

    assert data["status"] == "rejected"
    assert data["error"] == "invalid_days"
    assert "1 to 30" in data["detail"]
    assert pims.calls("appointments") == 0


async def test_reconcile_defaults_to_seven_days(
    env: Env,
    pims: Pims,
    reconciliation: RunningService,
    amqp: aio_pika.abc.AbstractConnection,
) -> None:
    await env.create_integration(pims_base_url=pims.url)
    bus = await open_bus(env, amqp)

    command_id = await bus.send("reconcile.appointments", {})
    data = (await bus.event_for("reconcile.completed", command_id))["data"]

    assert data["status"] == "succeeded"
    assert data["days"] == 7
    # The reference PIMS spreads 20 appointments over 29 days.
    assert 0 < data["fetched"] < 20


async def test_reconcile_paused_integration_rejected(
    env: Env,
    pims: Pims,
    reconciliation: RunningService,
    amqp: aio_pika.abc.AbstractConnection,
) -> None:
    await env.create_integration(pims_base_url=pims.url)
    await env.pool.execute("UPDATE integrations SET status = 'paused'")
    bus = await open_bus(env, amqp)

    reconcile_id = await bus.send("reconcile.appointments", {"days": 7})
    refresh_id = await bus.send("species.refresh", {})
    reconciled = (await bus.event_for("reconcile.completed", reconcile_id))["data"]
    refreshed = (await bus.event_for("species.refreshed", refresh_id))["data"]

    assert reconciled["status"] == "rejected"
    assert reconciled["error"] == "integration_paused"
    assert refreshed["status"] == "rejected"
    assert refreshed["error"] == "integration_paused"
    assert pims.calls("appointments") == 0
    assert pims.calls("species") == 0


async def test_reconcile_without_base_url_rejected(
    env: Env, reconciliation: RunningService, amqp: aio_pika.abc.AbstractConnection
) -> None:
    await env.create_integration()
    bus = await open_bus(env, amqp)

    reconcile_id = await bus.send("reconcile.appointments", {"days": 7})
    refresh_id = await bus.send("species.refresh", {})
    unknown_id = await bus.send(
        "reconcile.appointments", {"days": 7}, clinic_id="clinic-unknown"
    )
    reconciled = (await bus.event_for("reconcile.completed", reconcile_id))["data"]
    refreshed = (await bus.event_for("species.refreshed", refresh_id))["data"]
    unknown = await bus.event_for("reconcile.completed", unknown_id)

    assert reconciled["status"] == "rejected"
    assert reconciled["error"] == "no_base_url"
    assert "--pims-base-url" in reconciled["detail"]
    assert refreshed["error"] == "no_base_url"
    assert unknown["clinicId"] == "clinic-unknown"
    assert unknown["data"]["error"] == "integration_not_found"


async def test_reconcile_private_target_blocked_by_default(
    env: Env, pims: Pims, amqp: aio_pika.abc.AbstractConnection
) -> None:
    from reconciliation.__main__ import serve

    service = await start_service(
        serve, worker_settings(env, allow_private_targets=False)
    )
    try:
        await env.create_integration(pims_base_url=pims.url)
        bus = await open_bus(env, amqp)
        command_id = await bus.send("reconcile.appointments", {"days": 7})
        data = (await bus.event_for("reconcile.completed", command_id))["data"]
    finally:
        await service.shutdown()

    assert data["status"] == "failed"
    assert data["error"] == "target_blocked"
    assert pims.calls("appointments") == 0


@pytest.mark.parametrize(
    ("command_type", "event_type", "endpoint"),
    [
        ("reconcile.appointments", "reconcile.completed", "appointments"),
        ("species.refresh", "species.refreshed", "species"),
    ],
)
async def test_concurrent_requests_run_once(
    env: Env,
    pims: Pims,
    reconciliation: RunningService,
    amqp: aio_pika.abc.AbstractConnection,
    command_type: str,
    event_type: str,
    endpoint: str,
) -> None:
    pims.fault(endpoint=endpoint, delay=1.5, times=1)
    await env.create_integration(pims_base_url=pims.url)
    bus = await open_bus(env, amqp)

    first = await bus.send(command_type, {"days": 7})
    second = await bus.send(command_type, {"days": 7})
    results = {
        command_id: (await bus.event_for(event_type, command_id))["data"]
        for command_id in (first, second)
    }

    statuses = sorted(data["status"] for data in results.values())
    assert statuses == ["skipped", "succeeded"]
    ran = next(data for data in results.values() if data["status"] == "succeeded")
    skipped = next(data for data in results.values() if data["status"] == "skipped")
    assert skipped["error"] == "already_running"
    assert skipped["runningCommandId"] == ran["commandId"]
    assert skipped["runningRunId"] == ran["runId"]
    assert pims.calls(endpoint) == 1
    rows = await env.pool.fetch("SELECT status FROM reconcile_runs")
    assert sorted(row["status"] for row in rows) == ["skipped", "succeeded"]


async def test_redelivered_command_runs_once(
    env: Env,
    pims: Pims,
    reconciliation: RunningService,
    amqp: aio_pika.abc.AbstractConnection,
) -> None:
    await env.create_integration(pims_base_url=pims.url)
    bus = await open_bus(env, amqp)

    command_id = await bus.send("reconcile.appointments", {"days": 30})
    await bus.event_for("reconcile.completed", command_id)
    await bus.send("reconcile.appointments", {"days": 30}, command_id=command_id)
    await wait_until(
        lambda: _queue_empty(amqp, env.topology.name(RECONCILIATION_QUEUE))
    )

    assert len(await bus.events_of("reconcile.completed")) == 1
    assert pims.calls("appointments") == 1


async def _queue_empty(amqp: aio_pika.abc.AbstractConnection, name: str) -> bool:
    channel = await amqp.channel()
    try:
        queue = await channel.declare_queue(name, passive=True)
        return queue.declaration_result.message_count == 0
    finally:
        await channel.close()


async def test_stop_finishes_run_in_flight(
    env: Env, pims: Pims, amqp: aio_pika.abc.AbstractConnection
) -> None:
    from reconciliation.__main__ import serve

    pims.fault(endpoint="appointments", delay=1.0, times=1)
    await env.create_integration(pims_base_url=pims.url)
    bus = await open_bus(env, amqp)
    service = await start_service(serve, worker_settings(env))

    command_id = await bus.send("reconcile.appointments", {"days": 30})
    await wait_until(_called(pims, "appointments"))
    await service.shutdown()

    data = (await bus.event_for("reconcile.completed", command_id))["data"]
    assert data["status"] == "succeeded"
    assert data["processed"] == 20


def _called(pims: Pims, endpoint: str) -> Callable[[], Any]:
    async def check() -> bool:
        return pims.calls(endpoint) > 0

    return check


# Species refresh


async def test_species_refresh_maps_labels_in_any_case(
    env: Env,
    pims: Pims,
    reconciliation: RunningService,
    amqp: aio_pika.abc.AbstractConnection,
) -> None:
    set_species_catalog(
        pims.state,
        [
            {"key": "1", "label": "CANINE"},
            {"key": "2", "label": "feline"},
            {"key": "3", "label": "  Guinea   PIG "},
            {"key": "4", "label": "BIRD - Psittacine"},
            {"key": "cat"},
            {"key": "9"},
            {"label": "no key"},
        ],
    )
    await env.create_integration(pims_base_url=pims.url)
    bus = await open_bus(env, amqp)

    command_id = await bus.send("species.refresh", {})
    data = (await bus.event_for("species.refreshed", command_id))["data"]

    rows = await env.pool.fetch(
        "SELECT pims_key, label, species, manual FROM species_map ORDER BY pims_key"
    )
    mapping = {row["pims_key"]: row["species"] for row in rows}
    assert mapping == {
        "1": "canine",
        "2": "feline",
        "3": "rodent",
        "4": None,
        "9": None,
        "cat": "feline",
    }
    assert not any(row["manual"] for row in rows)
    assert data["status"] == "succeeded"
    assert data["fetched"] == 7
    assert data["mapped"] == 4
    assert data["unmapped"] == 2
    assert sorted(data["unmappedKeys"]) == ["4", "9"]
    assert data["skipped"] == 1
    assert data["skippedItems"][0]["reason"] == "invalid_item"


async def test_species_refresh_keeps_manual_mappings(
    env: Env,
    pims: Pims,
    reconciliation: RunningService,
    amqp: aio_pika.abc.AbstractConnection,
) -> None:
    await env.create_integration(pims_base_url=pims.url)
    await env.pool.execute(
        """
        INSERT INTO species_map (clinic_id, pims_key, label, species, manual) VALUES
            ('clinic-1', '4', 'Birds', 'avian', true),
            ('clinic-1', '2', 'Feline', 'canine', true),
            ('clinic-1', '1', 'Canine', 'equine', false)
        """
    )
    bus = await open_bus(env, amqp)

    command_id = await bus.send("species.refresh", {})
    data = (await bus.event_for("species.refreshed", command_id))["data"]

    rows = {
        row["pims_key"]: row
        for row in await env.pool.fetch("SELECT * FROM species_map")
    }
    assert rows["4"]["species"] == "avian"
    assert rows["4"]["manual"] is True
    # The label follows the catalog; the mapping stays as the operator set it.
    assert rows["4"]["label"] == "BIRD - Psittacine"
    assert rows["2"]["species"] == "canine"
    assert rows["2"]["manual"] is True
    # An automatic mapping is recomputed from the label.
    assert rows["1"]["species"] == "canine"
    assert data["manual"] == 2
    assert "4" not in data["unmappedKeys"]


async def test_species_refresh_resolves_pending_patient(
    env: Env,
    pims: Pims,
    reconciliation: RunningService,
    amqp: aio_pika.abc.AbstractConnection,
) -> None:
    await env.create_integration(pims_base_url=pims.url)
    bus = await open_bus(env, amqp)
    imported, _, _ = await bus.request(
        "patients.import", {"patient": import_patient(speciesKey="2")}
    )
    assert imported["data"]["ok"] is True
    before = await env.pool.fetchrow(
        "SELECT species, species_resolved FROM patients WHERE external_id = 'pat_900'"
    )

    command_id = await bus.send("species.refresh", {})
    data = (await bus.event_for("species.refreshed", command_id))["data"]

    after = await env.pool.fetchrow(
        "SELECT species, species_resolved FROM patients WHERE external_id = 'pat_900'"
    )
    assert before["species_resolved"] is False
    assert before["species"] is None
    assert after["species_resolved"] is True
    assert after["species"] == "feline"
    assert data["patientsResolved"] == 1


# Patient search


async def test_search_returns_normalized_patients(
    env: Env,
    pims: Pims,
    reconciliation: RunningService,
    amqp: aio_pika.abc.AbstractConnection,
) -> None:
    await env.create_integration(pims_base_url=pims.url)
    await env.pool.execute(
        "INSERT INTO species_map (clinic_id, pims_key, label, species) "
        "VALUES ('clinic-1', '1', 'Canine', 'canine')"
    )
    bus = await open_bus(env, amqp)

    reply, message, elapsed = await bus.request(
        "patients.search", {"q": "peggy.bartl@example.com"}
    )

    assert reply["type"] == "patients.search.result"
    assert message.correlation_id is not None
    data = reply["data"]
    assert data["ok"] is True
    assert data["dropped"] == 0
    patients = {patient["externalId"]: patient for patient in data["patients"]}
    assert set(patients) == {"pat_771", "pat_772"}
    sky = patients["pat_771"]
    assert sky["species"] == "canine"
    assert sky["speciesResolved"] is True
    assert sky["speciesLabel"] == "Canine"
    assert sky["weightKg"] == 11
    assert sky["dateOfBirth"] == "2023-06-08"
    assert sky["dateOfBirthEstimated"] is False
    assert sky["owner"]["externalId"] == "cli_553"
    assert sky["record"]["owner"]["externalId"] == "cli_553"
    assert sky["patientId"] is None
    zoe = patients["pat_772"]
    # 9.5 lb; the age of 4 years gives an estimated birth date.
    assert zoe["weightKg"] == pytest.approx(4.3091, abs=1e-4)
    assert zoe["dateOfBirthEstimated"] is True
    assert zoe["dateOfBirth"] is not None
    assert zoe["species"] is None
    assert zoe["speciesResolved"] is False
    assert elapsed < 2.0


async def test_search_caps_results_and_drops_invalid(
    env: Env,
    pims: Pims,
    reconciliation: RunningService,
    amqp: aio_pika.abc.AbstractConnection,
) -> None:
    valid = [
        import_patient(externalId=f"pat_{number}", name=f"Pet {number}")
        for number in range(25)
    ]
    invalid = [{"externalId": "pat_x", "name": "No owner"}, "not a patient"]
    replace_search(pims.state, [invalid[0], *valid, invalid[1]])
    await env.create_integration(pims_base_url=pims.url)
    bus = await open_bus(env, amqp)

    reply, _, _ = await bus.request("patients.search", {"q": "Pet"})

    data = reply["data"]
    assert data["ok"] is True
    assert data["count"] == 20
    assert len(data["patients"]) == 20
    assert data["dropped"] == 2
    assert data["truncated"] == 5
    assert data["patients"][0]["externalId"] == "pat_0"


async def test_search_slow_pims_replies_timeout_within_2s(
    env: Env,
    pims: Pims,
    reconciliation: RunningService,
    amqp: aio_pika.abc.AbstractConnection,
) -> None:
    pims.fault(endpoint="patients", delay=3.0)
    await env.create_integration(pims_base_url=pims.url)
    bus = await open_bus(env, amqp)

    reply, _, elapsed = await bus.request("patients.search", {"q": "Sky"})

    assert reply["data"]["ok"] is False
    assert reply["data"]["error"] == "pims_timeout"
    assert elapsed < 2.0
    assert pims.calls("patients") == 1


async def test_search_pims_down_replies_unavailable(
    env: Env, reconciliation: RunningService, amqp: aio_pika.abc.AbstractConnection
) -> None:
    await env.create_integration(pims_base_url=f"http://127.0.0.1:{free_port()}")
    bus = await open_bus(env, amqp)

    reply, _, elapsed = await bus.request("patients.search", {"q": "Sky"})

    assert reply["data"]["ok"] is False
    assert reply["data"]["error"] == "pims_unavailable"
    assert elapsed < 2.0


@pytest.mark.parametrize("query", ["a", " b ", "", None, 42])
async def test_search_rejects_short_query(
    env: Env,
    pims: Pims,
    reconciliation: RunningService,
    amqp: aio_pika.abc.AbstractConnection,
    query: Any,
) -> None:
    await env.create_integration(pims_base_url=pims.url)
    bus = await open_bus(env, amqp)

    reply, _, _ = await bus.request("patients.search", {"q": query})

    assert reply["data"]["ok"] is False
    assert reply["data"]["error"] == "invalid_query"
    assert "2 characters" in reply["data"]["detail"]
    assert pims.calls("patients") == 0


async def test_search_paused_or_without_base_url_replies_error(
    env: Env,
    pims: Pims,
    reconciliation: RunningService,
    amqp: aio_pika.abc.AbstractConnection,
) -> None:
    await env.create_integration("clinic-paused", pims_base_url=pims.url)
    await env.pool.execute(
        "UPDATE integrations SET status = 'paused' WHERE clinic_id = 'clinic-paused'"
    )
    await env.create_integration("clinic-no-url")
    bus = await open_bus(env, amqp)

    paused, _, _ = await bus.request(
        "patients.search", {"q": "Sky"}, clinic_id="clinic-paused"
    )
    no_url, _, _ = await bus.request(
        "patients.search", {"q": "Sky"}, clinic_id="clinic-no-url"
    )

    assert paused["data"]["error"] == "integration_paused"
    assert no_url["data"]["error"] == "no_base_url"
    assert pims.calls("patients") == 0


async def test_search_without_reply_to_is_dead_lettered(
    env: Env, reconciliation: RunningService, amqp: aio_pika.abc.AbstractConnection
) -> None:
    await env.create_integration()
    bus = await open_bus(env, amqp)
    command_id = await bus.send("patients.search", {"q": "Sky"})

    dead_letters = await bus.channel.get_queue(
        env.topology.queue(RECONCILIATION_QUEUE).dead_letter_queue
    )
    message = await wait_until(lambda: dead_letters.get(fail=False, no_ack=True))

    assert message.message_id == command_id
    assert message.headers[REASON_HEADER] == "missing_reply_to"


# Patient import


async def test_import_publishes_patient_upserted(
    env: Env,
    pims: Pims,
    reconciliation: RunningService,
    amqp: aio_pika.abc.AbstractConnection,
) -> None:
    await env.create_integration(pims_base_url=pims.url)
    bus = await open_bus(env, amqp)

    command_id = await bus.send("patients.import", {"patient": import_patient()})
    upserted = await wait_until(lambda: bus.events_of("patient.upserted", settle=0.1))

    row = await env.pool.fetchrow(
        """
        SELECT p.id, p.weight_kg, p.date_of_birth_estimated, p.species_key,
               c.external_id AS owner, c.email
        FROM patients p JOIN clients c ON c.id = p.client_id
        WHERE p.external_id = 'pat_900'
        """
    )
    assert row["owner"] == "cli_900"
    assert row["email"] == "ada.quill@example.com"
    assert row["weight_kg"] == pytest.approx(4.9895, abs=1e-4)
    assert row["date_of_birth_estimated"] is True
    assert row["species_key"] == "2"
    assert len(upserted) == 1
    assert upserted[0]["data"]["patientId"] == str(row["id"])
    assert upserted[0]["data"]["externalClientId"] == "cli_900"
    assert len(_seen(bus, "client.upserted")) == 1
    assert b"ada.quill" not in orjson.dumps(bus.seen)

    # The same command again changes nothing and publishes nothing.
    await bus.send(
        "patients.import", {"patient": import_patient()}, command_id=command_id
    )
    await asyncio.sleep(0.5)
    assert len(await bus.events_of("patient.upserted")) == 1


def _seen(bus: Bus, event_type: str) -> list[dict[str, Any]]:
    return [event for event in bus.seen if event["type"] == event_type]


async def test_import_replies_with_stored_ids(
    env: Env,
    pims: Pims,
    reconciliation: RunningService,
    amqp: aio_pika.abc.AbstractConnection,
) -> None:
    await env.create_integration(pims_base_url=pims.url)
    bus = await open_bus(env, amqp)

    reply, _, _ = await bus.request("patients.import", {"patient": import_patient()})
    invalid, _, _ = await bus.request(
        "patients.import", {"patient": {"externalId": "pat_1", "name": "No owner"}}
    )

    stored = await env.pool.fetchrow(
        "SELECT id, client_id FROM patients WHERE external_id = 'pat_900'"
    )
    assert reply["type"] == "patients.import.result"
    assert reply["data"]["ok"] is True
    assert reply["data"]["patientId"] == str(stored["id"])
    assert reply["data"]["clientId"] == str(stored["client_id"])
    assert invalid["data"]["ok"] is False
    assert invalid["data"]["error"] == "invalid_patient"
    assert "owner" in invalid["data"]["detail"]


async def test_import_for_paused_integration_is_dead_lettered(
    env: Env, reconciliation: RunningService, amqp: aio_pika.abc.AbstractConnection
) -> None:
    await env.create_integration()
    await env.pool.execute("UPDATE integrations SET status = 'paused'")
    bus = await open_bus(env, amqp)

    await bus.send("patients.import", {"patient": import_patient()})
    dead_letters = await bus.channel.get_queue(
        env.topology.queue(RECONCILIATION_QUEUE).dead_letter_queue
    )
    message = await wait_until(lambda: dead_letters.get(fail=False, no_ack=True))

    assert message.headers[REASON_HEADER] == "integration_paused"
    assert await env.pool.fetchval("SELECT count(*) FROM patients") == 0


# coggo-admin verbs


async def test_admin_reconcile_wait_prints_result(
    env: Env, pims: Pims, reconciliation: RunningService
) -> None:
    await env.create_integration(pims_base_url=pims.url)

    result = await run_admin(
        env.settings,
        "reconcile",
        "--clinic-id",
        "clinic-1",
        "--days",
        "30",
        "--wait",
        "--timeout",
        "60",
        "--json",
    )

    assert result.code == 0, result.stderr
    event = result.json()
    assert event["type"] == "reconcile.completed"
    assert event["clinicId"] == "clinic-1"
    assert event["data"]["status"] == "succeeded"
    assert event["data"]["days"] == 30
    assert event["data"]["fetched"] == 20
    assert event["data"]["processed"] == 20


async def test_admin_species_refresh_wait_prints_result(
    env: Env, pims: Pims, reconciliation: RunningService
) -> None:
    await env.create_integration(pims_base_url=pims.url)

    result = await run_admin(
        env.settings, "species", "refresh", "--clinic-id", "clinic-1", "--wait"
    )

    assert result.code == 0, result.stderr
    assert "succeeded" in result.stdout
    assert "unmapped keys: 4" in result.stdout
    stored = await env.pool.fetchval("SELECT count(*) FROM species_map")
    assert stored == 8


async def test_admin_reconcile_without_wait_queues_command(
    env: Env, pims: Pims, amqp: aio_pika.abc.AbstractConnection
) -> None:
    await env.create_integration(pims_base_url=pims.url)

    result = await run_admin(
        env.settings, "--json", "reconcile", "--clinic-id", "clinic-1"
    )

    assert result.code == 0, result.stderr
    sent = result.json()
    channel = await amqp.channel()
    queue = await channel.get_queue(env.topology.name(RECONCILIATION_QUEUE))
    message = await queue.get(no_ack=True)
    body = orjson.loads(message.body)
    assert message.message_id == sent["commandId"]
    assert body["type"] == "reconcile.appointments"
    assert body["clinicId"] == "clinic-1"
    assert body["data"] == {"days": 7}
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT


async def test_admin_wait_reports_failed_run(
    env: Env, pims: Pims, reconciliation: RunningService
) -> None:
    pims.fault(endpoint="species", status=404)
    await env.create_integration(pims_base_url=pims.url)

    result = await run_admin(
        env.settings, "species", "refresh", "--clinic-id", "clinic-1", "--wait"
    )

    assert result.code == 1
    assert "failed" in result.stdout
    assert "pims_error" in result.stdout


async def test_admin_verbs_explain_errors(env: Env, pims: Pims) -> None:
    await env.create_integration("clinic-no-url")

    unknown = await run_admin(env.settings, "reconcile", "--clinic-id", "nope")
    no_url = await run_admin(
        env.settings, "species", "refresh", "--clinic-id", "clinic-no-url"
    )
    too_far = await run_admin(
        env.settings, "reconcile", "--clinic-id", "clinic-1", "--days", "31"
    )

    assert unknown.code == 2
    assert "no integration for clinic 'nope'" in unknown.stderr
    assert no_url.code == 2
    assert "--pims-base-url" in no_url.stderr
    assert too_far.code == 2
    assert "from 1 to 30" in too_far.stderr


@pytest.mark.parametrize(
    "verb", [("reconcile",), ("species", "refresh")], ids=["reconcile", "refresh"]
)
async def test_admin_verbs_have_help(env: Env, verb: tuple[str, ...]) -> None:
    result = await run_admin(env.settings, *verb, "--help")

    assert result.code == 0
    for option in ("--clinic-id", "--wait", "--timeout", "--json"):
        assert option in result.stdout
