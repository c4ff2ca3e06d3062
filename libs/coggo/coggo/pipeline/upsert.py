"""Applying PIMS events to Coggo's clients, patients, appointments and visits.

All writes of one event happen in the caller's transaction, and the domain
events they cause are returned for the caller to put in the outbox in that same
transaction. An event that changes nothing returns no domain event.
"""

from __future__ import annotations

import asyncpg

from coggo.pipeline.appointments import cancel_appointment, upsert_appointment_event
from coggo.pipeline.clients import upsert_client
from coggo.pipeline.context import EventContext
from coggo.pipeline.patients import (
    merge_patients,
    resolve_pending_species,
    upsert_patient,
)
from coggo.schemas.bus import DomainEvent
from coggo.schemas.partner import Appointment, EventData, EventType, Patient

__all__ = [
    "EventContext",
    "apply_event",
    "resolve_pending_species",
    "upsert_client",
    "upsert_patient",
]


async def apply_event(
    connection: asyncpg.Connection,
    context: EventContext,
    event_type: EventType,
    data: EventData,
) -> list[DomainEvent]:
    """Apply one validated PIMS event; return the domain events it caused."""
    if event_type in (EventType.APPOINTMENT_CREATED, EventType.APPOINTMENT_UPDATED):
        assert isinstance(data.appointment, Appointment)
        assert isinstance(data.patient, Patient)
        await upsert_appointment_event(
            connection, context, event_type, data.appointment, data.client, data.patient
        )
    elif event_type == EventType.APPOINTMENT_CANCELLED:
        assert data.appointment is not None
        patient = data.patient if isinstance(data.patient, Patient) else None
        await cancel_appointment(
            connection, context, data.appointment, data.client, patient
        )
    elif event_type == EventType.CLIENT_UPDATED:
        assert data.client is not None
        await upsert_client(connection, context, data.client)
    elif event_type == EventType.PATIENT_UPDATED:
        assert isinstance(data.patient, Patient)
        owner = None
        if data.client is not None:
            owner = await upsert_client(connection, context, data.client)
        await upsert_patient(connection, context, data.patient, owner)
    elif event_type == EventType.PATIENT_MERGED:
        assert data.patient is not None
        assert data.merged_into_external_id is not None
        await merge_patients(
            connection, context, data.patient.external_id, data.merged_into_external_id
        )
    return context.events
