"""Bus messages: webhooks handed to the pipeline, commands and domain events.

Every message is camelCase JSON with `id`, `type`, `occurredAt`, `clinicId` and
`data`, published persistent with `message_id` equal to `id`.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, ClassVar, Literal

import orjson
from pydantic import AwareDatetime, Field

from coggo.schemas.partner import PatientWithOwner, SoapJson, Vet, WireModel


def new_message_id() -> str:
    return str(uuid.uuid4())


def utc_now() -> datetime:
    return datetime.now(UTC)


class BusMessage(WireModel):
    """The fields every message on the bus carries."""

    id: str = Field(default_factory=new_message_id)
    type: str
    occurred_at: AwareDatetime = Field(default_factory=utc_now)
    clinic_id: str
    data: Any

    def to_bytes(self) -> bytes:
        """Encode for the bus: every field, defaults included."""
        return orjson.dumps(self.model_dump(mode="json", by_alias=True))


class WebhookMessage(BusMessage):
    """A PIMS event accepted by the ingress, routed by its event type.

    `eventId` is the PIMS's own id of the event, unique within its clinic; `id`
    is Coggo's id for the accepted delivery.
    """

    event_id: str
    data: dict[str, Any]


# Commands on `coggo.commands`, routed by `type`.


class ReconcileAppointmentsData(WireModel):
    days: int = Field(default=7, ge=1, le=30)


class ReconcileAppointments(BusMessage):
    type: Literal["reconcile.appointments"] = "reconcile.appointments"
    data: ReconcileAppointmentsData = Field(default_factory=ReconcileAppointmentsData)


class SpeciesRefresh(BusMessage):
    type: Literal["species.refresh"] = "species.refresh"
    data: dict[str, Any] = Field(default_factory=dict)


class PatientsSearchData(WireModel):
    q: str = Field(min_length=2, max_length=200)


class PatientsSearch(BusMessage):
    type: Literal["patients.search"] = "patients.search"
    data: PatientsSearchData


class PatientsImportData(WireModel):
    patient: PatientWithOwner


class PatientsImport(BusMessage):
    type: Literal["patients.import"] = "patients.import"
    data: PatientsImportData


class SoapPushData(WireModel):
    note_id: str = Field(min_length=1, max_length=255)
    version: int = Field(ge=1)
    external_patient_id: str = Field(min_length=1, max_length=255)
    external_appointment_id: str | None = None
    vet: Vet | None = None
    signed_at: AwareDatetime
    language: str | None = None
    note: SoapJson
    narrative: str | None = None


class SoapPush(BusMessage):
    type: Literal["soap.push"] = "soap.push"
    data: SoapPushData


# Domain events on `coggo.events`, routed by `type`. They carry ids, never
# client contact details.


class DomainEvent(BusMessage):
    """A change that has committed, published from the outbox."""

    TYPES: ClassVar[frozenset[str]] = frozenset(
        {
            "client.upserted",
            "patient.upserted",
            "patient.merged",
            "visit.scheduled",
            "visit.updated",
            "visit.cancelled",
            "reconcile.completed",
            "species.refreshed",
            "push.sent",
            "push.failed",
            "push.superseded",
        }
    )
    data: dict[str, Any]


class ClientRefs(WireModel):
    client_id: str
    external_client_id: str


class PatientRefs(WireModel):
    patient_id: str
    external_patient_id: str
    client_id: str | None = None
    external_client_id: str | None = None
    species: str | None = None
    species_resolved: bool = False


class VisitRefs(WireModel):
    visit_id: str
    status: Literal["scheduled", "cancelled"]
    appointment_id: str
    external_appointment_id: str
    patient_id: str
    external_patient_id: str
    client_id: str | None = None
    external_client_id: str | None = None
    scheduled_at: AwareDatetime
    timezone: str
    external_staff_id: str | None = None
