"""The Partner API's PIMS-hosted endpoints: species, patients, appointments, push."""

from __future__ import annotations

import hmac
import re

import structlog
from aiohttp import web
from coggo.errors import InvalidSignature, Unauthorized, ValidationFailed
from coggo.schemas.partner import SoapPushEnvelope
from coggo.signing import (
    ID_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    SignatureHeaders,
    verify_request,
)
from coggo.validation import describe_validation_error
from pydantic import ValidationError

from pims_sim.clinic import MAX_DAYS_AHEAD
from pims_sim.http_common import (
    STATE_KEY,
    InvalidParameter,
    json_response,
    read_body,
)
from pims_sim.validation import decode_json_object

log = structlog.get_logger(__name__)

MIN_QUERY_LENGTH = 2
MAX_QUERY_LENGTH = 200
DEFAULT_DAYS = 7


def _check_token(request: web.Request) -> None:
    token = request.app[STATE_KEY].config.token
    if token is None:
        return
    header = request.headers.get("Authorization", "")
    scheme, _, credentials = header.partition(" ")
    valid = scheme.lower() == "bearer" and hmac.compare_digest(
        credentials.strip().encode("utf-8", "surrogateescape"), token.encode()
    )
    if not valid:
        raise Unauthorized(
            "Authorization header is missing or invalid: send Authorization: Bearer "
            "with the token this PIMS was started with"
        )


async def list_species(request: web.Request) -> web.Response:
    _check_token(request)
    return json_response(request.app[STATE_KEY].clinic.species_catalog())


async def search_patients(request: web.Request) -> web.Response:
    _check_token(request)
    raw = request.query.get("q")
    if raw is None:
        raise InvalidParameter(
            f"query parameter q is missing: send at least {MIN_QUERY_LENGTH} characters"
        )
    query = raw.strip()
    if len(query) < MIN_QUERY_LENGTH:
        raise InvalidParameter(
            f"query parameter q must be at least {MIN_QUERY_LENGTH} characters "
            f"after trimming spaces; it has {len(query)}"
        )
    if len(query) > MAX_QUERY_LENGTH:
        raise InvalidParameter(
            f"query parameter q must be at most {MAX_QUERY_LENGTH} characters; "
            f"it has {len(query)}"
        )

    patients = request.app[STATE_KEY].clinic.search_patients(query)
    # The query may be a name, e-mail address or phone number: log its length only.
    log.info("patients.searched", query_length=len(query), results=len(patients))
    return json_response({"patients": patients})


def parse_days(raw: str | None) -> int:
    """Parse the `days` query parameter: an integer from 1 to 30, default 7."""
    if raw is None:
        return DEFAULT_DAYS
    value = raw.strip()
    if re.fullmatch(r"\d{1,4}", value) is None or not 1 <= int(value) <= MAX_DAYS_AHEAD:
        raise InvalidParameter(
            f"query parameter days must be an integer from 1 to {MAX_DAYS_AHEAD}; "
            f"got {raw[:20]!r}"
        )
    return int(value)


async def list_appointments(request: web.Request) -> web.Response:
    _check_token(request)
    days = parse_days(request.query.get("days"))

    state = request.app[STATE_KEY]
    appointments = state.clinic.upcoming_appointments(days, state.clock())
    log.info("appointments.listed", days=days, results=len(appointments))
    return json_response({"appointments": appointments})


def _require_signature_headers(headers: SignatureHeaders) -> None:
    # The Partner API makes all three headers required on the push, unlike the
    # webhook, where the signature is optional.
    missing = [
        name
        for name, value in (
            (ID_HEADER, headers.message_id),
            (TIMESTAMP_HEADER, headers.timestamp),
            (SIGNATURE_HEADER, headers.signature),
        )
        if value is None
    ]
    if missing:
        raise InvalidSignature(
            f"{', '.join(missing)} missing: every push must carry {ID_HEADER}, "
            f"{TIMESTAMP_HEADER} and {SIGNATURE_HEADER}"
        )


async def receive_push(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    body = await read_body(request)

    headers = SignatureHeaders.from_mapping(request.headers)
    _require_signature_headers(headers)
    verify_request(headers, body, [state.config.secret])

    payload = decode_json_object(body)
    try:
        envelope = SoapPushEnvelope.model_validate(payload)
    except ValidationError as exc:
        raise ValidationFailed(describe_validation_error(exc)) from None

    meta = envelope.meta
    stored, duplicate = state.pushes.add(
        meta.note_id, meta.version, envelope.id, payload
    )
    log.info(
        "push.stored",
        note_id=meta.note_id,
        version=meta.version,
        envelope_id=envelope.id,
        duplicate=duplicate,
        deliveries=stored.deliveries,
    )
    return json_response({"stored": True, "duplicate": duplicate})
