"""Applying PIMS events to Coggo's clients, patients, appointments and visits.

All writes of a batch of events happen in the caller's transaction, and the
domain events they cause are returned for the caller to put in the outbox in
that same transaction. An event that changes nothing causes no domain event.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from coggo.pipeline.appointments import cancel_appointment, upsert_appointment_event
from coggo.pipeline.clients import upsert_client
from coggo.pipeline.context import EventContext
from coggo.pipeline.patients import (
    merge_patients,
    resolve_pending_species,
    upsert_patient,
)
from coggo.pipeline.store import Key, Store
from coggo.schemas.bus import DomainEvent
from coggo.schemas.partner import Appointment, EventData, EventType, Patient

__all__ = [
    "EventContext",
    "PendingEvent",
    "apply_event",
    "apply_events",
    "resolve_pending_species",
    "upsert_client",
    "upsert_patient",
]


@dataclass(frozen=True)
class PendingEvent:
    """One validated event waiting to be applied."""

    context: EventContext
    event_type: EventType
    data: EventData


def _keys(events: Sequence[PendingEvent]) -> tuple[dict[str, set[Key]], set[Key]]:
    """Collect every record the events name, to lock them up front."""
    keys: dict[str, set[Key]] = {
        "clients": set(),
        "patients": set(),
        "appointments": set(),
    }
    species: set[Key] = set()
    for event in events:
        clinic, data = event.context.clinic_id, event.data
        if data.client is not None:
            keys["clients"].add((clinic, data.client.external_id))
        if data.patient is not None:
            keys["patients"].add((clinic, data.patient.external_id))
        if isinstance(data.patient, Patient):
            if data.patient.external_client_id:
                keys["clients"].add((clinic, data.patient.external_client_id))
            if data.patient.species_key:
                species.add((clinic, data.patient.species_key))
        if data.merged_into_external_id is not None:
            keys["patients"].add((clinic, data.merged_into_external_id))
        if data.appointment is not None:
            keys["appointments"].add((clinic, data.appointment.external_id))
    return keys, species


async def _apply(store: Store, event: PendingEvent) -> None:
    context, data = event.context, event.data
    if event.event_type in (
        EventType.APPOINTMENT_CREATED,
        EventType.APPOINTMENT_UPDATED,
    ):
        assert isinstance(data.appointment, Appointment)
        assert isinstance(data.patient, Patient)
        await upsert_appointment_event(
            store,
            context,
            event.event_type,
            data.appointment,
            data.client,
            data.patient,
        )
    elif event.event_type == EventType.APPOINTMENT_CANCELLED:
        assert data.appointment is not None
        patient = data.patient if isinstance(data.patient, Patient) else None
        await cancel_appointment(store, context, data.appointment, data.client, patient)
    elif event.event_type == EventType.CLIENT_UPDATED:
        assert data.client is not None
        await upsert_client(store, context, data.client)
    elif event.event_type == EventType.PATIENT_UPDATED:
        assert isinstance(data.patient, Patient)
        owner = None
        if data.client is not None:
            owner = await upsert_client(store, context, data.client)
        await upsert_patient(store, context, data.patient, owner)
    elif event.event_type == EventType.PATIENT_MERGED:
        assert data.patient is not None
        assert data.merged_into_external_id is not None
        await merge_patients(
            store, context, data.patient.external_id, data.merged_into_external_id
        )


async def apply_events(
    connection: asyncpg.Connection, events: Sequence[PendingEvent]
) -> list[DomainEvent]:
    """Apply validated events in order, inside the caller's transaction.

    Returns the domain events of all of them; each event's own are also in
    its context.
    """
    store = Store(connection)
    keys, species = _keys(events)
    await store.preload(keys, species)
    for event in events:
        await _apply(store, event)
    await store.flush()
    return [domain for event in events for domain in event.context.events]


async def apply_event(
    connection: asyncpg.Connection,
    context: EventContext,
    event_type: EventType,
    data: EventData,
) -> list[DomainEvent]:
    """Apply one validated PIMS event; return the domain events it caused."""
    return await apply_events(connection, [PendingEvent(context, event_type, data)])
