"""Fault injection: counts the calls of each endpoint and applies its fault."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import orjson
import structlog
from aiohttp import web

from pims_sim.faults import Endpoint, FaultSpec
from pims_sim.http_common import STATE_KEY, Handler, json_response
from pims_sim.state import SimState

log = structlog.get_logger(__name__)

# How often a request held open by a timeout fault checks whether its client is gone.
POLL_SECONDS = 0.1

# Valid JSON of the wrong shape for each endpoint: wrong types and missing
# required keys, with the top-level key a client looks for still present.
WRONG_SHAPE_BODIES: dict[str, Any] = {
    "species": {"species": [{"label": "Canine"}, {"key": 7, "label": None}]},
    "patients": {"patients": [{"externalId": 771, "owner": "cli_553"}]},
    "appointments": {
        "appointments": [
            {"appointment": {"externalId": "apt_1029", "startsAt": 1781272800}}
        ]
    },
    "push": ["stored"],
}


def with_faults(endpoint: Endpoint, handler: Handler) -> Handler:
    """Wrap an endpoint's handler so that calls are counted and faults applied."""

    async def handle(request: web.Request) -> web.StreamResponse:
        state = request.app[STATE_KEY]
        state.calls[endpoint] += 1
        fault = state.faults.take(endpoint)
        if fault is None:
            return await handler(request)

        log.info("fault.applied", endpoint=endpoint, fault=fault.wire())
        if fault.delay:
            await _sleep_unless_stopping(state, fault.delay)
        if fault.timeout:
            return await _hold_open(request, state)
        if fault.malformed_kind is not None:
            response = await handler(request)
            return _malformed_response(endpoint, fault, response)
        status = fault.response_status
        if status is not None:
            return _status_response(endpoint, fault, status)
        return await handler(request)

    return handle


async def _sleep_unless_stopping(state: SimState, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(state.stopping.wait(), seconds)


async def _hold_open(request: web.Request, state: SimState) -> web.StreamResponse:
    # aiohttp does not cancel a handler when its client disconnects, so the
    # handler watches the connection itself and ends once the client is gone.
    while not state.stopping.is_set():
        transport = request.transport
        if transport is None or transport.is_closing():
            break
        await _sleep_unless_stopping(state, POLL_SECONDS)
    return json_response(
        {
            "error": "simulated_timeout",
            "detail": "the request was held open on purpose",
        },
        status=503,
    )


def _fault_headers(fault: FaultSpec) -> dict[str, str]:
    headers = {}
    if fault.retry_after is not None:
        headers["Retry-After"] = str(fault.retry_after)
    if fault.location is not None:
        headers["Location"] = fault.location
    return headers


def _status_response(endpoint: str, fault: FaultSpec, status: int) -> web.Response:
    headers = _fault_headers(fault)
    if status in {204, 304}:
        return web.Response(status=status, headers=headers)
    return json_response(
        {
            "error": "simulated_fault",
            "detail": f"a fault set on the simulator returns {status} for {endpoint}",
        },
        status=status,
        headers=headers,
    )


def _malformed_response(
    endpoint: str, fault: FaultSpec, response: web.StreamResponse
) -> web.Response:
    if fault.malformed_kind == "shape":
        body = orjson.dumps(WRONG_SHAPE_BODIES[endpoint])
    else:
        original = response.body if isinstance(response, web.Response) else None
        whole = (
            original if isinstance(original, bytes) and original else b'{"ok": true}'
        )
        # A strict prefix of a JSON object never parses: its closing brace is missing.
        body = whole[: max(1, len(whole) // 2)]
    return web.Response(
        body=body,
        status=fault.status if fault.status is not None else response.status,
        headers=_fault_headers(fault),
        content_type="application/json",
    )
