"""The `SoapPushEnvelope` of the Partner API, built from a `soap.push` command."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from coggo.schemas.bus import SoapPush
from coggo.soap.render import capture_note, html_fragment, note_for_push, text_blocks

# Namespace of the uuid5 envelope ids. Changing it changes every envelope id,
# so a PIMS would see an amended push as a new one.
ENVELOPE_NAMESPACE = uuid.UUID("5c0a6f2e-0d4b-5b8e-9c61-6f0d2c1e7a43")


def envelope_id(clinic_id: str, note_id: str, version: int) -> uuid.UUID:
    """Return the envelope id of one (clinic, note, version): the same on every attempt."""
    # A JSON array keeps the parts apart whatever characters the ids contain.
    name = orjson.dumps([clinic_id, note_id, version]).decode()
    return uuid.uuid5(ENVELOPE_NAMESPACE, name)


def format_datetime(moment: datetime) -> str:
    """Format an aware datetime as RFC 3339, with "Z" for UTC."""
    if moment.utcoffset() == timedelta(0):
        return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")
    return moment.isoformat()


def build_envelope(
    command: SoapPush,
    note: Mapping[str, Any],
    *,
    external_clinic_id: str | None,
) -> dict[str, Any]:
    """Build the envelope of one push as JSON-ready camelCase.

    `note` is the command's `data.note` as received, so `formats.json` carries
    the note unchanged except for an empty `vitals` node, which is dropped.
    `occurredAt` is the command's, so every attempt sends the same body.
    Optional meta fields without a value are left out rather than sent as null.
    """
    data = command.data
    meta: dict[str, Any] = {
        "externalPatientId": data.external_patient_id,
        "externalAppointmentId": data.external_appointment_id,
        "externalClinicId": external_clinic_id,
        "vet": data.vet.wire(exclude_none=True) if data.vet is not None else None,
        "noteId": data.note_id,
        "version": data.version,
        "signedAt": format_datetime(data.signed_at),
        "language": data.language,
    }

    formats: dict[str, Any] = {"json": note_for_push(note)}
    captured = capture_note(data.note, data.narrative)
    text = text_blocks(captured)
    if text:
        formats["text"] = text
    fragment = html_fragment(captured)
    if fragment:
        formats["html"] = fragment

    return {
        "id": str(envelope_id(command.clinic_id, data.note_id, data.version)),
        "occurredAt": format_datetime(command.occurred_at),
        "meta": {key: value for key, value in meta.items() if value is not None},
        "formats": formats,
    }


def encode_envelope(envelope: Mapping[str, Any]) -> bytes:
    """Encode the envelope as the exact bytes that are signed and sent."""
    return orjson.dumps(envelope)
