"""Appointments and the one visit each appointment keeps."""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg

from coggo.errors import PermanentMessageError
from coggo.pipeline.clients import upsert_client
from coggo.pipeline.context import EventContext, cleared
from coggo.pipeline.normalize import appointment_time
from coggo.pipeline.patients import upsert_patient
from coggo.pipeline.records import lock_record, merge_fields, write_record
from coggo.schemas.partner import (
    Appointment,
    AppointmentRef,
    AppointmentStatus,
    Client,
    EventType,
    Patient,
)


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
    connection: asyncpg.Connection,
    context: EventContext,
    appointment: Appointment | AppointmentRef,
    patient: dict[str, Any] | None,
    status: AppointmentStatus | None,
) -> None:
    row, _ = await lock_record(
        connection, "appointments", context.clinic_id, appointment.external_id
    )
    updates = _appointment_updates(appointment, context, status=status)
    if patient is not None:
        updates["patient"] = {"patient_id": patient["id"]}
    changed, versions = merge_fields(row, updates, context.stamp)
    if versions != row["versions"]:
        await write_record(connection, "appointments", row["id"], changed, versions)
    await sync_visit(connection, context, {**dict(row), **changed}, patient)


async def upsert_appointment_event(
    connection: asyncpg.Connection,
    context: EventContext,
    event_type: EventType,
    appointment: Appointment,
    client: Client | None,
    patient: Patient,
) -> None:
    owner = await upsert_client(connection, context, client) if client else None
    patient_row = await upsert_patient(connection, context, patient, owner)

    status = appointment.status
    if status is None and event_type == EventType.APPOINTMENT_CREATED:
        status = AppointmentStatus.SCHEDULED
    await _write_appointment(connection, context, appointment, patient_row, status)


async def cancel_appointment(
    connection: asyncpg.Connection,
    context: EventContext,
    appointment: Appointment | AppointmentRef,
    client: Client | None,
    patient: Patient | None,
) -> None:
    patient_row = None
    if patient is not None:
        owner = await upsert_client(connection, context, client) if client else None
        patient_row = await upsert_patient(connection, context, patient, owner)
    await _write_appointment(
        connection, context, appointment, patient_row, AppointmentStatus.CANCELLED
    )


async def sync_visit(
    connection: asyncpg.Connection,
    context: EventContext,
    appointment: dict[str, Any],
    patient: dict[str, Any] | None = None,
) -> None:
    """Keep one visit per appointment, matching its status, time and patient."""
    # One statement creates the visit or locks the existing one.
    visit = await connection.fetchrow(
        """
        INSERT INTO visits AS v (id, clinic_id, appointment_id, patient_id, status, scheduled_at)
        VALUES ($1, $2, $3, $4, $5, $6)
        ON CONFLICT (appointment_id) DO UPDATE SET appointment_id = v.appointment_id
        RETURNING *, (xmax = 0) AS inserted
        """,
        uuid.uuid4(),
        context.clinic_id,
        appointment["id"],
        appointment["patient_id"],
        appointment["status"],
        appointment["starts_at"],
    )
    assert visit is not None
    status = appointment["status"]
    if visit["inserted"]:
        if status == "scheduled":
            await _emit_visit(
                connection, context, "visit.scheduled", visit, appointment, patient
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
    assignments = ", ".join(
        f"{column} = ${index + 2}" for index, column in enumerate(changed)
    )
    visit = await connection.fetchrow(
        f"UPDATE visits SET {assignments}, updated_at = now() WHERE id = $1 RETURNING *",
        visit["id"],
        *changed.values(),
    )
    assert visit is not None
    if "status" in changed:
        kind = "visit.cancelled" if status == "cancelled" else "visit.scheduled"
    else:
        kind = "visit.updated"
    await _emit_visit(connection, context, kind, visit, appointment, patient)


async def _emit_visit(
    connection: asyncpg.Connection,
    context: EventContext,
    kind: str,
    visit: asyncpg.Record,
    appointment: dict[str, Any],
    known: dict[str, Any] | None,
) -> None:
    patient = (
        known if known is not None and known["id"] == visit["patient_id"] else None
    )
    if patient is None and visit["patient_id"] is not None:
        patient = await connection.fetchrow(
            "SELECT external_id, client_id, external_client_id FROM patients WHERE id = $1",
            visit["patient_id"],
        )
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
            "externalStaffId": appointment.get("external_staff_id"),
        },
    )
