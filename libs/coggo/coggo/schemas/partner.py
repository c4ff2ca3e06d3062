"""Pydantic models of every schema in the Coggo Partner API (OpenAPI 3.1).

Inbound models accept `null` and `""` for optional fields because a PIMS clears
a stored value that way (the merge rules of RFC 7396); `model_fields_set` distinguishes
an absent field from a cleared one. Unknown keys are ignored, so a PIMS that
sends more than the spec names is not rejected for it.
"""

from __future__ import annotations

import math
from datetime import date, datetime
from enum import StrEnum
from functools import lru_cache
from typing import Annotated, Any, Literal
from zoneinfo import available_timezones

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationInfo,
    field_validator,
)
from pydantic.alias_generators import to_camel

ExternalId = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=255)
]
Text = Annotated[str, StringConstraints(max_length=10_000)]
ShortText = Annotated[str, StringConstraints(max_length=500)]


class WireModel(BaseModel):
    """Base of wire models: camelCase on the wire, unknown keys ignored."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="ignore",
        allow_inf_nan=False,
    )

    def wire(self, **kwargs: Any) -> dict[str, Any]:
        """Dump as JSON-ready camelCase, leaving out fields that were not set."""
        return self.model_dump(mode="json", by_alias=True, exclude_unset=True, **kwargs)


class Error(WireModel):
    error: str
    detail: str | None = None


class Client(WireModel):
    external_id: ExternalId
    first_name: ShortText | None = None
    last_name: ShortText | None = None
    email: ShortText | None = None
    phone: ShortText | None = None
    address_line1: ShortText | None = None
    address_line2: ShortText | None = None
    city: ShortText | None = None
    state_region: ShortText | None = None
    postal_code: ShortText | None = None


class AgeUnit(StrEnum):
    YEARS = "years"
    MONTHS = "months"
    WEEKS = "weeks"


class WeightUnit(StrEnum):
    KG = "kg"
    LB = "lb"


class Age(WireModel):
    value: Annotated[float, Field(ge=0, le=1000)]
    unit: AgeUnit


class Weight(WireModel):
    value: Annotated[float, Field(gt=0, le=100_000)]
    unit: WeightUnit


class Sex(StrEnum):
    MALE = "male"
    FEMALE = "female"
    UNKNOWN = "unknown"


class ReproductiveStatus(StrEnum):
    INTACT = "intact"
    NEUTERED = "neutered"
    SPAYED = "spayed"
    UNKNOWN = "unknown"


def _blank_to_none(value: Any) -> Any:
    return None if value == "" else value


class Patient(WireModel):
    external_id: ExternalId
    name: Annotated[
        str, StringConstraints(strip_whitespace=True, min_length=1, max_length=500)
    ]
    species_key: ShortText | None = None
    species: ShortText | None = None
    breed: ShortText | None = None
    color: ShortText | None = None
    sex: Sex | None = None
    reproductive_status: ReproductiveStatus | None = None
    date_of_birth: date | None = None
    age: Age | None = None
    weight: Weight | None = None
    weight_kg: Annotated[float, Field(gt=0, le=100_000)] | None = None
    external_client_id: ExternalId | None = None

    # An empty string clears these fields like null does; they are not free text.
    clear_blank_values = field_validator(
        "sex",
        "reproductive_status",
        "date_of_birth",
        "age",
        "weight",
        "weight_kg",
        "external_client_id",
        mode="before",
    )(_blank_to_none)

    @field_validator("weight_kg", mode="after")
    @classmethod
    def _finite_weight(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("must be a finite number of kilograms")
        return value


class PatientRef(WireModel):
    """A patient named only by its external id (the merged-away record)."""

    external_id: ExternalId


class PatientWithOwner(Patient):
    owner: Client


# Times outside these years are typing errors, and near the ends of Python's
# calendar a conversion to UTC would overflow.
EARLIEST_YEAR = 1900
LATEST_YEAR = 2200

# Names zoneinfo resolves that are not IANA zones a clinic can be in: the host's
# own zone, POSIX rule aliases and the leap-second variants.
_NOT_CLINIC_ZONES = frozenset({"localtime", "posixrules", "Factory"})


def _check_year(moment: datetime | date) -> None:
    if not EARLIEST_YEAR <= moment.year <= LATEST_YEAR:
        raise ValueError(
            f"must be a date between the years {EARLIEST_YEAR} and {LATEST_YEAR}"
        )


def _check_starts_at(value: str) -> str:
    text = value[:-1] + "+00:00" if value.endswith(("Z", "z")) else value
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            "must be an ISO 8601 local time such as 2026-06-12T14:00:00"
        ) from None
    _check_year(parsed)
    return value


@lru_cache(maxsize=1)
def _clinic_zones() -> frozenset[str]:
    return frozenset(
        name
        for name in available_timezones()
        if name not in _NOT_CLINIC_ZONES and not name.startswith(("posix/", "right/"))
    )


def _check_timezone(value: str | None) -> str | None:
    if value is None:
        return None
    if value not in _clinic_zones():
        raise ValueError("must be an IANA time zone name such as America/New_York")
    return value


def _check_occurred_at(value: Any) -> Any:
    # A number would be read as unix seconds; the spec requires RFC 3339 text.
    if not isinstance(value, str):
        raise ValueError(
            "must be an RFC 3339 date-time string such as 2026-06-12T09:30:00Z"
        )
    return value


class AppointmentStatus(StrEnum):
    SCHEDULED = "scheduled"
    CANCELLED = "cancelled"


class Appointment(WireModel):
    external_id: ExternalId
    # Local clinic time without offset, paired with `timezone`; an offset is tolerated.
    starts_at: Annotated[
        str, StringConstraints(strip_whitespace=True, min_length=10, max_length=40)
    ]
    timezone: ShortText | None = None
    duration_minutes: Annotated[int, Field(strict=True, ge=0, le=100_000)] | None = None
    reason: Text | None = None
    external_staff_id: ShortText | None = None
    status: AppointmentStatus | None = None

    clear_blank_values = field_validator(
        "status", "duration_minutes", "timezone", mode="before"
    )(_blank_to_none)
    check_starts_at = field_validator("starts_at")(_check_starts_at)
    check_timezone = field_validator("timezone")(_check_timezone)


class AppointmentRef(WireModel):
    """The appointment of a cancellation, which may carry its id alone."""

    external_id: ExternalId
    starts_at: ShortText | None = None
    timezone: ShortText | None = None
    status: AppointmentStatus | None = None

    clear_blank_values = field_validator("starts_at", "timezone", mode="before")(
        _blank_to_none
    )
    check_starts_at = field_validator("starts_at")(
        lambda value: None if value is None else _check_starts_at(value)
    )
    check_timezone = field_validator("timezone")(_check_timezone)


class EventType(StrEnum):
    APPOINTMENT_CREATED = "appointment.created"
    APPOINTMENT_UPDATED = "appointment.updated"
    APPOINTMENT_CANCELLED = "appointment.cancelled"
    CLIENT_UPDATED = "client.updated"
    PATIENT_UPDATED = "patient.updated"
    PATIENT_MERGED = "patient.merged"


class EventData(WireModel):
    appointment: Appointment | AppointmentRef | None = None
    client: Client | None = None
    patient: Patient | PatientRef | None = None
    merged_into_external_id: ExternalId | None = None


class WebhookEvent(WireModel):
    """The envelope of an event; `data` is checked by `parse_event_data`."""

    id: Annotated[
        str, StringConstraints(strip_whitespace=True, min_length=1, max_length=255)
    ]
    type: EventType
    occurred_at: AwareDatetime
    data: dict[str, Any]

    check_occurred_at_text = field_validator("occurred_at", mode="before")(
        _check_occurred_at
    )

    @field_validator("occurred_at")
    @classmethod
    def _occurred_at_in_range(cls, value: datetime) -> datetime:
        _check_year(value)
        return value


class MissingPatient(ValueError):
    """`data.patient` is absent from an event type that requires it."""


_APPOINTMENT_UPSERTS = {EventType.APPOINTMENT_CREATED, EventType.APPOINTMENT_UPDATED}


def parse_event_data(event_type: EventType, data: dict[str, Any]) -> EventData:
    """Validate `data` by the rules of one event type and return the typed form."""
    model = _DATA_MODELS[event_type]
    if event_type in _APPOINTMENT_UPSERTS and data.get("patient") is None:
        raise MissingPatient(
            f"data.patient is required for {event_type.value}: send the full patient "
            "so Coggo can link the appointment to it"
        )
    parsed = model.model_validate(data)
    return EventData.model_construct(
        _fields_set=parsed.model_fields_set, **dict(parsed)
    )


class _AppointmentUpsertData(WireModel):
    appointment: Appointment
    client: Client | None = None
    patient: Patient


class _AppointmentCancelData(WireModel):
    appointment: AppointmentRef
    client: Client | None = None
    patient: Patient | None = None


class _ClientUpdatedData(WireModel):
    client: Client


class _PatientUpdatedData(WireModel):
    patient: Patient
    client: Client | None = None


class _PatientMergedData(WireModel):
    patient: PatientRef
    merged_into_external_id: ExternalId

    @field_validator("merged_into_external_id")
    @classmethod
    def _not_into_itself(cls, value: str, info: ValidationInfo) -> str:
        merged = info.data.get("patient")
        if merged is not None and merged.external_id == value:
            raise ValueError(
                "must name another patient than data.patient.externalId; "
                "a patient cannot be merged into itself"
            )
        return value


_DATA_MODELS: dict[EventType, type[WireModel]] = {
    EventType.APPOINTMENT_CREATED: _AppointmentUpsertData,
    EventType.APPOINTMENT_UPDATED: _AppointmentUpsertData,
    EventType.APPOINTMENT_CANCELLED: _AppointmentCancelData,
    EventType.CLIENT_UPDATED: _ClientUpdatedData,
    EventType.PATIENT_UPDATED: _PatientUpdatedData,
    EventType.PATIENT_MERGED: _PatientMergedData,
}


class PingResponse(WireModel):
    ok: bool
    clinic_id: str
    provider: str
    scopes: list[str]
    status: Literal["active", "paused"]


class WebhookReceipt(WireModel):
    received: bool
    duplicate: bool


class SpeciesItem(WireModel):
    key: ExternalId
    label: ShortText | None = None


class SpeciesCatalog(WireModel):
    species: list[SpeciesItem]


class PatientSearchResponse(WireModel):
    patients: list[dict[str, Any]]


class AppointmentListItem(WireModel):
    appointment: Appointment
    client: Client | None = None
    patient: Patient | None = None


class AppointmentListResponse(WireModel):
    appointments: list[dict[str, Any]]


# SOAP notes (Coggo to PIMS).

SoapValue = str | float | list[str]


class SoapField(WireModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True, allow_inf_nan=False)

    name: str
    label: str
    type: Literal["free_text", "number_with_unit", "select", "checkbox_text"]
    ui_control: (
        Literal["textarea", "number_input", "dropdown", "checkbox_group"] | None
    ) = Field(default=None, alias="ui_control")
    unit: str | None = None
    options: list[Any] | None = None
    value: SoapValue


class SoapSection(WireModel):
    title: str
    fields: list[SoapField]


class Temperature(WireModel):
    value: float | None = None
    unit: str | None = None
    raw: float | None = None


class Vitals(WireModel):
    weight: str | None = None
    temperature: Temperature | None = None
    heart_rate: str | None = None
    respiratory_rate: str | None = None
    crt_seconds: str | None = None
    pain_score: str | None = None
    bcs: str | None = None
    mucous_membranes: str | None = None
    pulse_quality: str | None = None
    hydration: str | None = None
    confidence: Literal["low", "medium", "high"] | None = None


class TemplateExtension(WireModel):
    template_id: str | None = None
    fields: dict[str, Any] | None = None


class SoapJson(WireModel):
    schema_version: Literal["1.0"]
    subjective: SoapSection | None = None
    objective: SoapSection | None = None
    assessment: SoapSection | None = None
    plan: SoapSection | None = None
    vitals: Vitals | None = None
    template_extension: TemplateExtension | None = None


class Vet(WireModel):
    name: str | None = None
    external_staff_id: str | None = None


class SoapPushMeta(WireModel):
    external_patient_id: str
    external_appointment_id: str | None = None
    external_clinic_id: str | None = None
    vet: Vet | None = None
    note_id: str
    version: int
    signed_at: AwareDatetime | None = None
    language: str | None = None


class SoapText(WireModel):
    subjective: str | None = None
    objective: str | None = None
    assessment: str | None = None
    plan: str | None = None
    narrative: str | None = None


class SoapFormats(WireModel):
    json_: SoapJson | None = Field(default=None, alias="json")
    text: SoapText | None = None
    html: str | None = None


class SoapPushEnvelope(WireModel):
    id: str
    occurred_at: AwareDatetime
    meta: SoapPushMeta
    formats: SoapFormats
