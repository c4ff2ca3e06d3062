"""The patient-upsert pipeline on a real database: every data rule, order and repeat."""

from __future__ import annotations

from datetime import date

import pytest
from coggo.errors import PermanentMessageError

from tests.support.events import appointment_event
from tests.support.pipeline import apply, row, snapshot, types, visit
from tests.support.stack import Env


def patient_event(
    event_id: str,
    patient: str = "pat_1",
    occurred_at: str = "2026-06-12T10:00:00Z",
    **fields,
):  # type: ignore[no-untyped-def]
    return {
        "id": event_id,
        "type": "patient.updated",
        "occurredAt": occurred_at,
        "data": {
            "patient": {
                "externalId": patient,
                "name": fields.pop("name", "Pet"),
                **fields,
            }
        },
    }


def client_event(
    event_id: str,
    client: str = "cli_1",
    occurred_at: str = "2026-06-12T10:00:00Z",
    **fields,
):  # type: ignore[no-untyped-def]
    return {
        "id": event_id,
        "type": "client.updated",
        "occurredAt": occurred_at,
        "data": {"client": {"externalId": client, **fields}},
    }


def merge_event(
    event_id: str, merged: str, survivor: str, occurred_at: str = "2026-06-12T11:00:00Z"
):  # type: ignore[no-untyped-def]
    return {
        "id": event_id,
        "type": "patient.merged",
        "occurredAt": occurred_at,
        "data": {"patient": {"externalId": merged}, "mergedIntoExternalId": survivor},
    }


def cancel_event(
    event_id: str, appointment: str = "apt_1", occurred_at: str = "2026-06-12T12:00:00Z"
):  # type: ignore[no-untyped-def]
    return {
        "id": event_id,
        "type": "appointment.cancelled",
        "occurredAt": occurred_at,
        "data": {"appointment": {"externalId": appointment}},
    }


# Each event type


async def test_appointment_created_stores_everything(env: Env) -> None:
    events = await apply(env.pool, appointment_event("e1"), timezone="America/New_York")
    assert types(events) == ["client.upserted", "patient.upserted", "visit.scheduled"]
    stored = await visit(env.pool, "apt_1")
    assert stored is not None
    assert stored["status"] == "scheduled"
    assert stored["patient"] == "pat_1"
    assert (await row(env.pool, "patients", "pat_1"))["external_client_id"] == "cli_1"


async def test_client_updated_changes_client_only(env: Env) -> None:
    await apply(env.pool, appointment_event("e1"))
    events = await apply(
        env.pool,
        client_event("e2", email="new@example.com", occurred_at="2026-06-13T00:00:00Z"),
    )
    assert types(events) == ["client.upserted"]
    assert (await row(env.pool, "clients", "cli_1"))["email"] == "new@example.com"
    assert "new@example.com" not in str(events[0].data)


async def test_patient_updated_changes_patient(env: Env) -> None:
    await apply(env.pool, appointment_event("e1"))
    events = await apply(
        env.pool, patient_event("e2", name="Rex", occurred_at="2026-06-13T00:00:00Z")
    )
    assert types(events) == ["patient.upserted"]
    assert (await row(env.pool, "patients", "pat_1"))["name"] == "Rex"


async def test_same_event_twice_emits_nothing_second_time(env: Env) -> None:
    first = await apply(env.pool, appointment_event("e1"))
    before = await snapshot(env.pool)
    second = await apply(env.pool, appointment_event("e1"))
    assert len(first) == 3
    assert second == []
    assert await snapshot(env.pool) == before


async def test_no_op_update_emits_nothing(env: Env) -> None:
    await apply(env.pool, appointment_event("e1"))
    events = await apply(
        env.pool,
        appointment_event(
            "e2", event_type="appointment.updated", occurred_at="2026-06-13T00:00:00Z"
        ),
    )
    assert events == []


# RFC 7396 merge


async def test_absent_field_keeps_stored_value(env: Env) -> None:
    await apply(env.pool, patient_event("e1", breed="Beagle", color="Tan"))
    await apply(
        env.pool, patient_event("e2", occurred_at="2026-06-13T00:00:00Z", color="Black")
    )
    patient = await row(env.pool, "patients", "pat_1")
    assert patient["breed"] == "Beagle"
    assert patient["color"] == "Black"


@pytest.mark.parametrize("cleared", [None, ""])
async def test_null_or_empty_clears_field(env: Env, cleared: str | None) -> None:
    await apply(env.pool, client_event("e1", email="a@example.com", phone="+1555"))
    await apply(
        env.pool, client_event("e2", occurred_at="2026-06-13T00:00:00Z", email=cleared)
    )
    client = await row(env.pool, "clients", "cli_1")
    assert client["email"] is None
    assert client["phone"] == "+1555"


@pytest.mark.parametrize("cleared", [None, ""])
async def test_null_clears_weight_and_birth_date(env: Env, cleared: str | None) -> None:
    await apply(
        env.pool,
        patient_event("e1", weightKg=4.0, dateOfBirth="2020-01-01", sex="male"),
    )
    await apply(
        env.pool,
        patient_event(
            "e2",
            occurred_at="2026-06-13T00:00:00Z",
            weightKg=cleared,
            dateOfBirth=cleared,
            sex=cleared,
        ),
    )
    patient = await row(env.pool, "patients", "pat_1")
    assert patient["weight_kg"] is None
    assert patient["date_of_birth"] is None
    assert patient["sex"] is None


# Ordering


async def test_older_event_does_not_overwrite(env: Env) -> None:
    await apply(
        env.pool, patient_event("e2", name="New", occurred_at="2026-06-13T00:00:00Z")
    )
    events = await apply(
        env.pool, patient_event("e1", name="Old", occurred_at="2026-06-12T00:00:00Z")
    )
    assert (await row(env.pool, "patients", "pat_1"))["name"] == "New"
    assert events == []


async def test_older_event_still_sets_fields_newer_lacked(env: Env) -> None:
    await apply(
        env.pool, patient_event("e2", name="New", occurred_at="2026-06-13T00:00:00Z")
    )
    await apply(
        env.pool,
        patient_event(
            "e1", name="Old", breed="Collie", occurred_at="2026-06-12T00:00:00Z"
        ),
    )
    patient = await row(env.pool, "patients", "pat_1")
    assert patient["name"] == "New"
    assert patient["breed"] == "Collie"


async def test_equal_times_larger_event_id_wins_either_order(env: Env) -> None:
    same = "2026-06-12T10:00:00Z"
    await apply(env.pool, patient_event("evt_b", name="B", occurred_at=same))
    await apply(env.pool, patient_event("evt_a", name="A", occurred_at=same))
    assert (await row(env.pool, "patients", "pat_1"))["name"] == "B"
    await apply(env.pool, patient_event("evt_c", name="C", occurred_at=same))
    assert (await row(env.pool, "patients", "pat_1"))["name"] == "C"


async def test_offsets_compare_as_instants(env: Env) -> None:
    await apply(
        env.pool,
        patient_event("e1", name="Later", occurred_at="2026-06-12T10:00:00-04:00"),
    )
    await apply(
        env.pool,
        patient_event("e2", name="Earlier", occurred_at="2026-06-12T12:00:00Z"),
    )
    assert (await row(env.pool, "patients", "pat_1"))["name"] == "Later"


async def test_cancellation_before_creation_is_remembered(env: Env) -> None:
    cancelled = await apply(
        env.pool, cancel_event("e2", occurred_at="2026-06-12T12:00:00Z")
    )
    created = await apply(
        env.pool, appointment_event("e1", occurred_at="2026-06-12T09:00:00Z")
    )
    stored = await visit(env.pool, "apt_1")
    assert stored is not None
    assert stored["status"] == "cancelled"
    assert stored["patient"] == "pat_1"
    assert "visit.scheduled" not in types(cancelled + created)


async def test_newer_creation_after_cancellation_reschedules(env: Env) -> None:
    await apply(env.pool, appointment_event("e1", occurred_at="2026-06-12T09:00:00Z"))
    await apply(env.pool, cancel_event("e2", occurred_at="2026-06-12T10:00:00Z"))
    events = await apply(
        env.pool,
        appointment_event(
            "e3", event_type="appointment.updated", occurred_at="2026-06-12T11:00:00Z"
        )
        | {},
    )
    # An update without a status does not reopen a cancelled appointment.
    assert (await visit(env.pool, "apt_1"))["status"] == "cancelled"  # type: ignore[index]
    assert "visit.scheduled" not in types(events)
    rebooked = appointment_event(
        "e4", event_type="appointment.updated", occurred_at="2026-06-12T12:00:00Z"
    )
    rebooked["data"]["appointment"]["status"] = "scheduled"
    events = await apply(env.pool, rebooked)
    assert (await visit(env.pool, "apt_1"))["status"] == "scheduled"  # type: ignore[index]
    assert "visit.scheduled" in types(events)


async def test_status_cancelled_on_update_cancels(env: Env) -> None:
    await apply(env.pool, appointment_event("e1"))
    update = appointment_event(
        "e2", event_type="appointment.updated", occurred_at="2026-06-13T00:00:00Z"
    )
    update["data"]["appointment"]["status"] = "cancelled"
    events = await apply(env.pool, update)
    assert types(events) == ["visit.cancelled"]


async def test_appointment_moved_to_other_patient_relinks_visit(env: Env) -> None:
    await apply(env.pool, appointment_event("e1", patient="pat_1"))
    events = await apply(
        env.pool,
        appointment_event(
            "e2",
            event_type="appointment.updated",
            patient="pat_2",
            occurred_at="2026-06-13T00:00:00Z",
        ),
    )
    assert (await visit(env.pool, "apt_1"))["patient"] == "pat_2"  # type: ignore[index]
    assert "visit.updated" in types(events)


async def test_rescheduled_appointment_updates_visit_time(env: Env) -> None:
    await apply(env.pool, appointment_event("e1"))
    events = await apply(
        env.pool,
        appointment_event(
            "e2",
            event_type="appointment.updated",
            starts_at="2026-06-14T09:00:00",
            occurred_at="2026-06-13T00:00:00Z",
        ),
    )
    assert types(events) == ["visit.updated"]
    assert (await visit(env.pool, "apt_1"))[
        "scheduled_at"
    ].isoformat() == "2026-06-14T13:00:00+00:00"  # type: ignore[index]


async def test_owner_changes_through_external_client_id(env: Env) -> None:
    await apply(env.pool, appointment_event("e1", client="cli_1"))
    await apply(
        env.pool,
        patient_event(
            "e2", externalClientId="cli_2", occurred_at="2026-06-13T00:00:00Z"
        ),
    )
    patient = await row(env.pool, "patients", "pat_1")
    new_owner = await row(env.pool, "clients", "cli_2")
    assert patient["client_id"] == new_owner["id"]
    assert patient["external_client_id"] == "cli_2"


# Merges


async def test_merge_moves_appointments_and_visits(env: Env) -> None:
    await apply(
        env.pool, appointment_event("e1", patient="pat_old", appointment="apt_1")
    )
    await apply(
        env.pool, appointment_event("e2", patient="pat_new", appointment="apt_2")
    )
    events = await apply(env.pool, merge_event("e3", "pat_old", "pat_new"))
    assert types(events) == ["patient.merged"]
    assert events[0].data["appointmentsMoved"] == 1
    assert (await visit(env.pool, "apt_1"))["patient"] == "pat_new"  # type: ignore[index]
    survivor = await row(env.pool, "patients", "pat_new")
    assert (await row(env.pool, "appointments", "apt_1"))["patient_id"] == survivor[
        "id"
    ]
    assert (await row(env.pool, "patients", "pat_old"))["merged_into_id"] == survivor[
        "id"
    ]


async def test_merge_into_unknown_survivor_creates_it(env: Env) -> None:
    await apply(env.pool, appointment_event("e1", patient="pat_old"))
    await apply(env.pool, merge_event("e2", "pat_old", "pat_new"))
    survivor = await row(env.pool, "patients", "pat_new")
    assert (await visit(env.pool, "apt_1"))["patient"] == "pat_new"  # type: ignore[index]
    await apply(
        env.pool,
        patient_event(
            "e3", patient="pat_new", name="Survivor", occurred_at="2026-06-13T00:00:00Z"
        ),
    )
    assert (await row(env.pool, "patients", "pat_new"))["id"] == survivor["id"]
    assert (await row(env.pool, "patients", "pat_new"))["name"] == "Survivor"


async def test_merge_before_merged_patient_is_known(env: Env) -> None:
    await apply(env.pool, merge_event("e1", "pat_old", "pat_new"))
    await apply(
        env.pool,
        appointment_event("e2", patient="pat_old", occurred_at="2026-06-13T00:00:00Z"),
    )
    assert (await visit(env.pool, "apt_1"))["patient"] == "pat_new"  # type: ignore[index]


async def test_later_events_for_merged_id_land_on_survivor(env: Env) -> None:
    await apply(env.pool, patient_event("e1", patient="pat_old", name="Old"))
    await apply(env.pool, patient_event("e2", patient="pat_new", name="New"))
    await apply(
        env.pool,
        merge_event("e3", "pat_old", "pat_new", occurred_at="2026-06-12T11:00:00Z"),
    )
    await apply(
        env.pool,
        patient_event(
            "e4", patient="pat_old", name="Renamed", occurred_at="2026-06-12T12:00:00Z"
        ),
    )
    assert (await row(env.pool, "patients", "pat_new"))["name"] == "Renamed"
    # The record the PIMS id names keeps what was addressed to it as well.
    assert (await row(env.pool, "patients", "pat_old"))["name"] == "Renamed"


async def test_data_newer_than_late_merge_reach_survivor(env: Env) -> None:
    await apply(
        env.pool,
        patient_event(
            "e2", patient="pat_new", name="New", occurred_at="2026-06-12T10:00:00Z"
        ),
    )
    await apply(
        env.pool,
        patient_event(
            "e4",
            patient="pat_old",
            name="Renamed",
            weightKg=3.0,
            occurred_at="2026-06-12T12:00:00Z",
        ),
    )
    events = await apply(
        env.pool,
        merge_event("e3", "pat_old", "pat_new", occurred_at="2026-06-12T11:00:00Z"),
    )
    survivor = await row(env.pool, "patients", "pat_new")
    assert survivor["name"] == "Renamed"
    assert survivor["weight_kg"] == 3.0
    assert types(events) == ["patient.upserted", "patient.merged"]


async def test_events_older_than_merge_stay_on_merged_record(env: Env) -> None:
    await apply(
        env.pool,
        patient_event(
            "e2", patient="pat_new", name="New", occurred_at="2026-06-12T10:00:00Z"
        ),
    )
    await apply(
        env.pool,
        merge_event("e3", "pat_old", "pat_new", occurred_at="2026-06-12T11:00:00Z"),
    )
    await apply(
        env.pool,
        patient_event(
            "e1", patient="pat_old", name="Old", occurred_at="2026-06-12T09:00:00Z"
        ),
    )
    assert (await row(env.pool, "patients", "pat_new"))["name"] == "New"
    assert (await row(env.pool, "patients", "pat_old"))["name"] == "Old"


async def test_merge_chain_resolves_to_last_survivor(env: Env) -> None:
    await apply(env.pool, appointment_event("e1", patient="pat_a"))
    await apply(
        env.pool,
        merge_event("e2", "pat_a", "pat_b", occurred_at="2026-06-12T11:00:00Z"),
    )
    await apply(
        env.pool,
        merge_event("e3", "pat_b", "pat_c", occurred_at="2026-06-12T12:00:00Z"),
    )
    pat_c = await row(env.pool, "patients", "pat_c")
    assert (await row(env.pool, "patients", "pat_a"))["merged_into_id"] == pat_c["id"]
    assert (await visit(env.pool, "apt_1"))["patient"] == "pat_c"  # type: ignore[index]
    await apply(
        env.pool,
        appointment_event(
            "e4",
            patient="pat_a",
            appointment="apt_2",
            occurred_at="2026-06-13T00:00:00Z",
        ),
    )
    assert (await visit(env.pool, "apt_2"))["patient"] == "pat_c"  # type: ignore[index]


async def test_merge_chain_in_reverse_order_gives_same_result(env: Env) -> None:
    await apply(env.pool, appointment_event("e1", patient="pat_a"))
    await apply(
        env.pool,
        merge_event("e3", "pat_b", "pat_c", occurred_at="2026-06-12T12:00:00Z"),
    )
    await apply(
        env.pool,
        merge_event("e2", "pat_a", "pat_b", occurred_at="2026-06-12T11:00:00Z"),
    )
    pat_c = await row(env.pool, "patients", "pat_c")
    assert (await row(env.pool, "patients", "pat_a"))["merged_into_id"] == pat_c["id"]
    assert (await visit(env.pool, "apt_1"))["patient"] == "pat_c"  # type: ignore[index]


async def test_repeated_merge_changes_nothing(env: Env) -> None:
    await apply(env.pool, appointment_event("e1", patient="pat_old"))
    await apply(env.pool, merge_event("e2", "pat_old", "pat_new"))
    before = await snapshot(env.pool)
    events = await apply(
        env.pool,
        merge_event("e3", "pat_old", "pat_new", occurred_at="2026-06-12T12:00:00Z"),
    )
    assert events == []
    assert (await snapshot(env.pool))["visits"] == before["visits"]


async def test_merge_cycle_is_rejected(env: Env) -> None:
    await apply(env.pool, merge_event("e1", "pat_a", "pat_b"))
    with pytest.raises(PermanentMessageError, match="merge"):
        await apply(
            env.pool,
            merge_event("e2", "pat_b", "pat_a", occurred_at="2026-06-12T12:00:00Z"),
        )


# Species, breeds, colors


async def test_species_key_resolves_through_clinic_map(env: Env) -> None:
    await env.pool.execute(
        "INSERT INTO species_map (clinic_id, pims_key, label, species) VALUES ('clinic-1', '1', 'Canine', 'canine')"
    )
    await apply(env.pool, patient_event("e1", speciesKey="1"))
    patient = await row(env.pool, "patients", "pat_1")
    assert patient["species"] == "canine"
    assert patient["species_resolved"] is True


@pytest.mark.parametrize(
    ("name", "species"),
    [
        ("Canine", "canine"),
        ("DOG", "canine"),
        ("k9", "canine"),
        (" Feline ", "feline"),
        ("kitty", "feline"),
        ("Horse", "equine"),
        ("guinea pig", "rodent"),
    ],
)
async def test_legacy_species_names_and_synonyms(
    env: Env, name: str, species: str
) -> None:
    await apply(env.pool, patient_event("e1", species=name))
    assert (await row(env.pool, "patients", "pat_1"))["species"] == species


async def test_unmapped_species_kept_and_resolved_later(env: Env) -> None:
    from coggo.pipeline.upsert import resolve_pending_species

    events = await apply(env.pool, patient_event("e1", speciesKey="42"))
    patient = await row(env.pool, "patients", "pat_1")
    assert patient["species_key"] == "42"
    assert patient["species"] is None
    assert patient["species_resolved"] is False
    assert events[0].data["speciesResolved"] is False

    await env.pool.execute(
        "INSERT INTO species_map (clinic_id, pims_key, label, species, manual) VALUES ('clinic-1', '42', 'Hedgehog', 'rodent', true)"
    )
    async with env.pool.acquire() as connection, connection.transaction():
        assert (
            await resolve_pending_species(connection, "clinic-1", "coggo.events") == 1
        )
    announced = await env.pool.fetch("SELECT routing_key, body FROM outbox")
    assert [row["routing_key"] for row in announced] == ["patient.upserted"]
    assert b'"speciesResolved":true' in announced[0]["body"]
    patient = await row(env.pool, "patients", "pat_1")
    assert patient["species"] == "rodent"
    assert patient["species_resolved"] is True


async def test_unknown_species_name_is_kept_unresolved(env: Env) -> None:
    await apply(env.pool, patient_event("e1", species="Dragon"))
    patient = await row(env.pool, "patients", "pat_1")
    assert patient["species_raw"] == "Dragon"
    assert patient["species_resolved"] is False


async def test_breeds_and_colors_join_lists_once(env: Env) -> None:
    await apply(
        env.pool,
        patient_event(
            "e1",
            patient="p1",
            species="dog",
            breed="Golden Retriever ",
            color="Black & Tan",
        ),
    )
    await apply(
        env.pool,
        patient_event(
            "e2",
            patient="p2",
            species="dog",
            breed="golden  retriever",
            color="black & tan",
        ),
    )
    await apply(
        env.pool,
        patient_event(
            "e3", patient="p3", species="dog", breed="GOLDEN RETRIEVER", color="Brindle"
        ),
    )
    breeds = await env.pool.fetch("SELECT name, species FROM breeds")
    colors = await env.pool.fetch("SELECT name FROM colors ORDER BY folded")
    assert [(b["name"], b["species"]) for b in breeds] == [
        ("Golden Retriever", "canine")
    ]
    assert [c["name"] for c in colors] == ["Black & Tan", "Brindle"]


# Units and dates


@pytest.mark.parametrize(
    ("fields", "kilograms"),
    [
        ({"weight": {"value": 22, "unit": "lb"}}, 9.9790),
        ({"weight": {"value": 11, "unit": "kg"}}, 11.0),
        ({"weightKg": 7.5}, 7.5),
        ({"weight": {"value": 10, "unit": "lb"}, "weightKg": 99}, 4.5359),
    ],
)
async def test_weight_in_kilograms(env: Env, fields: dict, kilograms: float) -> None:  # type: ignore[type-arg]
    await apply(env.pool, patient_event("e1", **fields))
    assert (await row(env.pool, "patients", "pat_1"))["weight_kg"] == pytest.approx(
        kilograms, abs=1e-4
    )


@pytest.mark.parametrize(
    ("fields", "born", "estimated"),
    [
        ({"dateOfBirth": "2020-02-29"}, date(2020, 2, 29), False),
        (
            {"dateOfBirth": "2020-02-29", "age": {"value": 1, "unit": "years"}},
            date(2020, 2, 29),
            False,
        ),
        ({"age": {"value": 3, "unit": "years"}}, date(2023, 6, 12), True),
        ({"age": {"value": 18, "unit": "months"}}, date(2024, 12, 12), True),
        ({"age": {"value": 10, "unit": "weeks"}}, date(2026, 4, 3), True),
        ({"age": {"value": 1.5, "unit": "years"}}, date(2024, 12, 12), True),
    ],
)
async def test_birth_date_from_date_or_age(
    env: Env, fields: dict, born: date, estimated: bool
) -> None:  # type: ignore[type-arg]
    await apply(
        env.pool, patient_event("e1", occurred_at="2026-06-12T10:00:00Z", **fields)
    )
    patient = await row(env.pool, "patients", "pat_1")
    assert patient["date_of_birth"] == born
    assert patient["date_of_birth_estimated"] is estimated


async def test_age_month_end_is_clamped(env: Env) -> None:
    await apply(
        env.pool,
        patient_event(
            "e1", occurred_at="2026-03-31T10:00:00Z", age={"value": 1, "unit": "months"}
        ),
    )
    assert (await row(env.pool, "patients", "pat_1"))["date_of_birth"] == date(
        2026, 2, 28
    )


async def test_missing_timezone_uses_integration_default(env: Env) -> None:
    event = appointment_event("e1", starts_at="2026-01-15T09:00:00")
    del event["data"]["appointment"]["timezone"]
    await apply(env.pool, event, timezone="Europe/Berlin")
    appointment = await row(env.pool, "appointments", "apt_1")
    assert appointment["timezone"] == "Europe/Berlin"
    assert appointment["starts_at"].isoformat() == "2026-01-15T08:00:00+00:00"


@pytest.mark.parametrize(
    ("starts_at", "instant", "local"),
    [
        ("2026-06-12T14:00:00", "2026-06-12T18:00:00+00:00", "2026-06-12T14:00:00"),
        (
            "2026-06-12T14:00:00-05:00",
            "2026-06-12T19:00:00+00:00",
            "2026-06-12T15:00:00",
        ),
        ("2026-06-12T18:00:00Z", "2026-06-12T18:00:00+00:00", "2026-06-12T14:00:00"),
        # Spring forward in New York: 02:30 does not exist and is read as 03:30 EDT.
        ("2026-03-08T02:30:00", "2026-03-08T07:30:00+00:00", "2026-03-08T02:30:00"),
        # Fall back: 01:30 happens twice; the first (EDT) is taken.
        ("2026-11-01T01:30:00", "2026-11-01T05:30:00+00:00", "2026-11-01T01:30:00"),
    ],
)
async def test_start_time_zones_and_dst(
    env: Env, starts_at: str, instant: str, local: str
) -> None:
    await apply(env.pool, appointment_event("e1", starts_at=starts_at))
    appointment = await row(env.pool, "appointments", "apt_1")
    assert appointment["starts_at"].isoformat() == instant
    assert appointment["starts_at_local"].isoformat() == local


async def test_unicode_names_round_trip(env: Env) -> None:
    await apply(
        env.pool, patient_event("e1", name="Zoë 🐾 Мурка", breed="Shiba Inu 柴犬")
    )
    patient = await row(env.pool, "patients", "pat_1")
    assert patient["name"] == "Zoë 🐾 Мурка"
    assert patient["breed"] == "Shiba Inu 柴犬"


@pytest.mark.parametrize(
    "order",
    [("e1", "e2", "e3"), ("e3", "e2", "e1"), ("e2", "e3", "e1"), ("e1", "e3", "e2")],
)
async def test_same_second_cancellation_wins_any_order(
    env: Env, order: tuple[str, ...]
) -> None:
    second = "2026-06-12T10:00:00Z"
    updated = appointment_event(
        "e2", event_type="appointment.updated", occurred_at=second
    )
    updated["data"]["appointment"]["status"] = "scheduled"
    events = {
        # The cancellation's id sorts first, so only its rank can make it win.
        "e1": cancel_event("a_cancel", occurred_at=second),
        "e2": updated,
        "e3": appointment_event("z_create", occurred_at=second),
    }
    for name in order:
        await apply(env.pool, events[name])
    stored = await visit(env.pool, "apt_1")
    assert stored is not None
    assert stored["status"] == "cancelled"
