"""Inspection and fault control under /_sim, for the tests and the demo."""

from __future__ import annotations

import structlog
from aiohttp import web
from coggo.errors import ValidationFailed
from coggo.validation import describe_validation_error
from pydantic import ValidationError

from pims_sim.faults import ENDPOINTS, FaultSpec
from pims_sim.http_common import STATE_KEY, InvalidParameter, json_response, read_body
from pims_sim.validation import decode_json_object

log = structlog.get_logger(__name__)


async def health(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    return json_response(
        {
            "status": "ok",
            "seed": state.config.seed,
            "timezone": state.config.timezone,
            "clients": len(state.clinic.clients),
            "patients": len(state.clinic.patients),
            "appointments": len(state.clinic.appointments),
            "pushes": len(state.pushes),
        }
    )


async def show_data(request: web.Request) -> web.Response:
    """Return every record of the clinic, appointments earliest first."""
    clinic = request.app[STATE_KEY].clinic
    appointments = sorted(clinic.appointments, key=lambda item: item.starts_at_utc)
    return json_response(
        {
            **clinic.species_catalog(),
            "patients": [
                clinic.patient_with_owner(patient) for patient in clinic.patients
            ],
            "appointments": [clinic.appointment_item(item) for item in appointments],
        }
    )


async def list_pushes(request: web.Request) -> web.Response:
    note_id = request.query.get("noteId")
    pushes = request.app[STATE_KEY].pushes.list(note_id)
    return json_response({"pushes": [push.wire() for push in pushes]})


async def delete_pushes(request: web.Request) -> web.Response:
    deleted = request.app[STATE_KEY].pushes.clear()
    log.info("pushes.deleted", count=deleted)
    return json_response({"deleted": deleted})


async def list_faults(request: web.Request) -> web.Response:
    return json_response({"faults": request.app[STATE_KEY].faults.describe()})


async def set_fault(request: web.Request) -> web.Response:
    payload = decode_json_object(await read_body(request))
    try:
        spec = FaultSpec.model_validate(payload)
    except ValidationError as exc:
        raise ValidationFailed(describe_validation_error(exc)) from None

    request.app[STATE_KEY].faults.set(spec)
    log.info("fault.set", endpoint=spec.endpoint, fault=spec.wire())
    return json_response({"fault": spec.wire()})


async def clear_faults(request: web.Request) -> web.Response:
    endpoint = request.query.get("endpoint")
    if endpoint is not None and endpoint not in ENDPOINTS:
        raise InvalidParameter(
            f"query parameter endpoint must be one of {', '.join(ENDPOINTS)}; "
            f"got {endpoint[:40]!r}"
        )
    request.app[STATE_KEY].faults.clear(endpoint)
    log.info("fault.cleared", endpoint=endpoint or "all")
    return json_response({"cleared": endpoint or "all"})


async def count_calls(request: web.Request) -> web.Response:
    calls = request.app[STATE_KEY].calls
    return json_response(
        {"calls": {endpoint: calls[endpoint] for endpoint in ENDPOINTS}}
    )


async def reset_calls(request: web.Request) -> web.Response:
    request.app[STATE_KEY].calls.clear()
    return json_response({"calls": dict.fromkeys(ENDPOINTS, 0)})
