"""Appointments and the one visit each appointment keeps."""

from __future__ import annotations

import uuid
from typing import Any

from coggo.errors import PermanentMessageError
from coggo.pipeline.clients import upsert_client
from coggo.pipeline.context import EventContext, cleared
from coggo.pipeline.normalize import appointment_time
from coggo.pipeline.patients import upsert_patient
from coggo.pipeline.records import merge_fields
from coggo.pipeline.store import Row, Store
from coggo.schemas.partner import (
    Appointment,
    AppointmentRef,
    AppointmentStatus,
    Client,
    EventType,
    Patient,
)

CANCELLATION_RANK = 1


def _appointment_updates(
    appointment: Appointment | AppointmentRef,
    context: EventContext,
    *,
    status: AppointmentStatus | None,
) -> dict[str, dict[str, Any]]:
    present = appointment.model_fields_set
    updates: dict[str, dict[str, Any]] = {}
    if appointment.starts_at:
        zone = appointment.timezone or context.default_timezone
        try:
            time = appointment_time(appointment.starts_at, zone)
        except (ValueError, KeyError) as exc:
            raise PermanentMessageError("invalid_start", str(exc)) from None
        updates["starts_at"] = {
            "starts_at_local": time.local,
            "timezone": time.timezone,
            "starts_at": time.instant,
        }
    if isinstance(appointment, Appointment):
        for name in ("duration_minutes", "reason", "external_staff_id"):
            if name in present:
                updates[name] = {name: cleared(getattr(appointment, name))}
    if status is not None:
        updates["status"] = {"status": status.value}
    return updates


async def _write_appointment(
    store: Store,
    context: EventContext,
    appointment: Appointment | AppointmentRef,
    patient: Row | None,
    status: AppointmentStatus | None,
) -> None:
    row, _ = await store.lock(
        "appointments", context.clinic_id, appointment.external_id
    )
    updates = _appointment_updates(appointment, context, status=status)
    if patient is not None:
        updates["patient"] = {"patient_id": patient["id"]}
    status_update = updates.pop("status", None)
    changed, versions = merge_fields(row, updates, context.stamp)
    if status_update is not None:
        # At equal occurredAt a cancellation beats a creation or an update, so
        # a PIMS that stamps to the second does not lose it to a same-second write.
        rank = CANCELLATION_RANK if status_update["status"] == "cancelled" else 0
        view = {**row, **changed, "versions": versions}
        more, versions = merge_fields(
            view, {"status": status_update}, context.ranked_stamp(rank)
        )
        changed.update(more)
    if versions != row["versions"]:
        store.save("appointments", row, changed, versions)
    await sync_visit(store, context, row, patient)


async def upsert_appointment_event(
    store: Store,
    context: EventContext,
    event_type: EventType,
    appointment: Appointment,
    client: Client | None,
    patient: Patient,
) -> None:
    owner = await upsert_client(store, context, client) if client else None
    patient_row = await upsert_patient(store, context, patient, owner)

    status = appointment.status
    if status is None and event_type == EventType.APPOINTMENT_CREATED:
        status = AppointmentStatus.SCHEDULED
    await _write_appointment(store, context, appointment, patient_row, status)


async def cancel_appointment(
    store: Store,
    context: EventContext,
    appointment: Appointment | AppointmentRef,
    client: Client | None,
    patient: Patient | None,
) -> None:
    patient_row = None
    if patient is not None:
        owner = await upsert_client(store, context, client) if client else None
        patient_row = await upsert_patient(store, context, patient, owner)
    await _write_appointment(
        store, context, appointment, patient_row, AppointmentStatus.CANCELLED
    )


async def sync_visit(
    store: Store, context: EventContext, appointment: Row, patient: Row | None = None
) -> None:
    """Keep one visit per appointment, matching its status, time and patient."""
    status = appointment["status"]
    visit = await store.visit_of(appointment)
    if visit is None:
        visit = {
            "id": uuid.uuid4(),
            "clinic_id": context.clinic_id,
            "appointment_id": appointment["id"],
            "patient_id": appointment["patient_id"],
            "status": status,
            "scheduled_at": appointment["starts_at"],
        }
        store.add_visit(visit)
        if status == "scheduled":
            await _emit_visit(
                store, context, "visit.scheduled", visit, appointment, patient
            )
        return

    changed = {
        column: value
        for column, value in (
            ("status", status),
            ("patient_id", appointment["patient_id"]),
            ("scheduled_at", appointment["starts_at"]),
        )
        if visit[column] != value
    }
    if not changed:
        return
    store.save_visit(visit, changed)
    if "status" in changed:
        kind = "visit.cancelled" if status == "cancelled" else "visit.scheduled"
    else:
        kind = "visit.updated"
    await _emit_visit(store, context, kind, visit, appointment, patient)


async def _emit_visit(
    store: Store,
    context: EventContext,
    kind: str,
    visit: Row,
    appointment: Row,
    known: Row | None,
) -> None:
    patient = (
        known if known is not None and known["id"] == visit["patient_id"] else None
    )
    if patient is None and visit["patient_id"] is not None:
        patient = await store.patient_by_id(visit["patient_id"])
    context.emit(
        kind,
        {
            "visitId": str(visit["id"]),
            "status": visit["status"],
            "appointmentId": str(appointment["id"]),
            "externalAppointmentId": appointment["external_id"],
            "patientId": str(visit["patient_id"]) if visit["patient_id"] else None,
            "externalPatientId": patient["external_id"] if patient else None,
            "clientId": str(patient["client_id"])
            if patient and patient["client_id"]
            else None,
            "externalClientId": patient["external_client_id"] if patient else None,
            "scheduledAt": visit["scheduled_at"].isoformat()
            if visit["scheduled_at"]
            else None,
            "timezone": appointment["timezone"],
            "externalStaffId": appointment["external_staff_id"],
        },
    )
