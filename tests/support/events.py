"""Events and signatures built the way a PIMS would, independently of the product."""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import json
import time
from datetime import UTC, datetime
from typing import Any

# The `appointmentCreated` example of the Partner API spec, verbatim.
SPEC_EXAMPLE_EVENT: dict[str, Any] = {
    "id": "evt_8f2c41",
    "type": "appointment.created",
    "occurredAt": "2026-06-12T09:30:00Z",
    "data": {
        "appointment": {
            "externalId": "apt_1029",
            "startsAt": "2026-06-12T14:00:00",
            "timezone": "America/New_York",
            "reason": "Lameness re-check",
            "externalStaffId": "stf_44",
        },
        "client": {
            "externalId": "cli_553",
            "firstName": "Peggy",
            "lastName": "Bartl",
            "email": "peggy.bartl@example.com",
            "phone": "+15134041567",
        },
        "patient": {
            "externalId": "pat_771",
            "name": "Sky",
            "speciesKey": "1",
            "breed": "Golden Retriever",
            "color": "Golden",
            "sex": "female",
            "reproductiveStatus": "spayed",
            "dateOfBirth": "2023-06-08",
            "weight": {"value": 11, "unit": "kg"},
        },
    },
}


def example_event(**overrides: Any) -> dict[str, Any]:
    event = copy.deepcopy(SPEC_EXAMPLE_EVENT)
    event.update(overrides)
    return event


def appointment_event(
    event_id: str,
    *,
    event_type: str = "appointment.created",
    appointment: str = "apt_1",
    patient: str = "pat_1",
    client: str = "cli_1",
    occurred_at: str = "2026-06-12T09:30:00Z",
    starts_at: str = "2026-06-12T14:00:00",
    **patient_fields: Any,
) -> dict[str, Any]:
    return {
        "id": event_id,
        "type": event_type,
        "occurredAt": occurred_at,
        "data": {
            "appointment": {
                "externalId": appointment,
                "startsAt": starts_at,
                "timezone": "America/New_York",
            },
            "client": {"externalId": client, "lastName": "Owner"},
            "patient": {"externalId": patient, "name": "Pet", **patient_fields},
        },
    }


def sign(secret: str, event_id: str, timestamp: int | str, body: bytes) -> str:
    """base64(HMAC-SHA256(secret, "{id}.{timestamp}.{raw body}")), as the spec states."""
    message = f"{event_id}.{timestamp}.".encode() + body
    return base64.b64encode(
        hmac.new(secret.encode(), message, hashlib.sha256).digest()
    ).decode()


def encode(event: dict[str, Any]) -> bytes:
    return json.dumps(event).encode()


def signed_headers(
    key: str,
    secret: str | None,
    body: bytes,
    *,
    message_id: str = "msg-1",
    skew: int = 0,
) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    if secret is not None:
        timestamp = int(time.time()) + skew
        headers.update(
            {
                "X-Coggo-Id": message_id,
                "X-Coggo-Timestamp": str(timestamp),
                "X-Coggo-Signature": sign(secret, message_id, timestamp, body),
            }
        )
    return headers


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
