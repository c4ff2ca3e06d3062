"""Signed webhook events sent to the Coggo ingress, as a PIMS sends them."""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp
import orjson
import structlog
from coggo.signing import sign_headers

from pims_sim.clinic import (
    EXAMPLE_APPOINTMENT,
    EXAMPLE_CLIENT,
    EXAMPLE_EVENT_ID,
    EXAMPLE_PATIENT,
    Clinic,
    generate_clinic,
)

log = structlog.get_logger(__name__)

WEBHOOKS_PATH = "/v1/partner/webhooks"
DEFAULT_TIMEOUT_SECONDS = 10.0
# Response bodies are cut to this many characters; the ingress sends far fewer.
MAX_BODY_CHARS = 2000


@dataclass(frozen=True)
class SendResult:
    """The outcome of one event: the HTTP status, or None when no response came."""

    event_id: str
    status: int | None
    body: str

    @property
    def accepted(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    def line(self) -> str:
        """Format the result as one line: event id, status (or "error"), body."""
        status = str(self.status) if self.status is not None else "error"
        return f"{self.event_id} {status} {self.body}"


def format_timestamp(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def example_event(
    now: datetime | None = None, event_id: str = EXAMPLE_EVENT_ID
) -> dict[str, Any]:
    """Build the Partner API's example `appointment.created` event, occurring now."""
    occurred_at = now if now is not None else datetime.now(UTC)
    return {
        "id": event_id,
        "type": "appointment.created",
        "occurredAt": format_timestamp(occurred_at),
        "data": {
            "appointment": dict(EXAMPLE_APPOINTMENT),
            "client": dict(EXAMPLE_CLIENT),
            "patient": {**EXAMPLE_PATIENT, "weight": dict(EXAMPLE_PATIENT["weight"])},
        },
    }


def appointment_events(
    clinic: Clinic, now: datetime | None = None
) -> list[dict[str, Any]]:
    """Build one `appointment.created` event for each appointment of the clinic.

    Event ids end in a random suffix, so every call makes new events: a second
    run is processed again instead of being rejected as a reused event id.
    """
    occurred_at = format_timestamp(now if now is not None else datetime.now(UTC))
    run = secrets.token_hex(4)
    events = []
    for scheduled in clinic.appointments:
        item = clinic.appointment_item(scheduled)
        events.append(
            {
                "id": f"evt_{scheduled.appointment.external_id}_{run}",
                "type": "appointment.created",
                "occurredAt": occurred_at,
                "data": item,
            }
        )
    return events


def build_events(
    *,
    example: bool = False,
    appointments: int | None = None,
    seed: int = 1,
    clients: int = 30,
    timezone: str = "America/New_York",
    event_id: str = EXAMPLE_EVENT_ID,
) -> list[dict[str, Any]]:
    """Build the example event, or one event per generated appointment.

    Exactly one of `example` and `appointments` must be given. `seed`, `clients`
    and `timezone` select the generated clinic, and `event_id` names the example.
    """
    if example == (appointments is not None):
        raise ValueError("pass either example=True or appointments=N, not both")
    if example:
        return [example_event(event_id=event_id)]
    clinic = generate_clinic(
        seed, appointments=appointments or 0, clients=clients, timezone=timezone
    )
    return appointment_events(clinic)


async def send_events(
    ingress_url: str,
    api_key: str,
    secret: str,
    events: Iterable[dict[str, Any]] | None = None,
    *,
    example: bool = False,
    appointments: int | None = None,
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
    session: aiohttp.ClientSession | None = None,
) -> list[SendResult]:
    """POST each event, signed, to `{ingress_url}/v1/partner/webhooks`, in order.

    Send `events` as given, or else build them with `build_events` from
    `example` or `appointments`. Every event is sent even when an earlier one
    fails. A failure to connect or a timeout gives a result with status None.
    `timeout_seconds` limits each event.
    """
    if events is None:
        events = build_events(example=example, appointments=appointments)
    elif example or appointments is not None:
        raise ValueError("pass events, or example or appointments, not both")
    url = ingress_url.rstrip("/") + WEBHOOKS_PATH
    if session is None:
        async with aiohttp.ClientSession() as own_session:
            return await _send_all(
                own_session, url, api_key, secret, events, timeout_seconds
            )
    return await _send_all(session, url, api_key, secret, events, timeout_seconds)


async def _send_all(
    session: aiohttp.ClientSession,
    url: str,
    api_key: str,
    secret: str,
    events: Iterable[dict[str, Any]],
    timeout_seconds: float,
) -> list[SendResult]:
    results = []
    for event in events:
        result = await _send_one(session, url, api_key, secret, event, timeout_seconds)
        results.append(result)
        if result.status is None:
            log.warning(
                "webhook.send_failed", event_id=result.event_id, error=result.body
            )
        else:
            log.info("webhook.sent", event_id=result.event_id, status=result.status)
    return results


async def _send_one(
    session: aiohttp.ClientSession,
    url: str,
    api_key: str,
    secret: str,
    event: dict[str, Any],
    timeout_seconds: float,
) -> SendResult:
    event_id = str(event.get("id", ""))
    body = orjson.dumps(event)
    # The timestamp is taken now, so a retried event is signed afresh.
    headers = {
        "Authorization": f"Bearer {api_key}",
        "Content-Type": "application/json",
        **sign_headers(secret, event_id, body),
    }
    try:
        async with session.post(
            url,
            data=body,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=timeout_seconds),
            allow_redirects=False,
        ) as response:
            text = await response.text(errors="replace")
            return SendResult(event_id, response.status, text[:MAX_BODY_CHARS].strip())
    except TimeoutError:
        return SendResult(
            event_id, None, f"timed out after {timeout_seconds:g} seconds"
        )
    except aiohttp.ClientError as exc:
        return SendResult(event_id, None, f"request failed: {exc}")
