"""Pieces shared by the simulator's routes: the state key, JSON responses, errors."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import structlog
from aiohttp import web
from coggo.errors import BadRequest, CoggoError, PayloadTooLarge

from pims_sim.state import SimState

log = structlog.get_logger(__name__)

STATE_KEY = web.AppKey("pims_sim_state", SimState)
MAX_BODY_BYTES = 1024 * 1024

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class InvalidParameter(BadRequest):
    code = "invalid_parameter"


def json_response(
    data: Any, *, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    """Build a response with `data` as UTF-8 JSON, non-ASCII text left unescaped."""
    return web.Response(
        body=orjson.dumps(data),
        status=status,
        headers=headers,
        content_type="application/json",
    )


def error_response(error: CoggoError) -> web.Response:
    return json_response(error.body(), status=error.status, headers=error.headers)


async def read_body(request: web.Request) -> bytes:
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise PayloadTooLarge(
            f"body is {request.content_length} bytes; "
            f"the limit is {MAX_BODY_BYTES} bytes"
        )
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(
            f"body exceeds the limit of {MAX_BODY_BYTES} bytes"
        ) from None


@web.middleware
async def errors_middleware(
    request: web.Request, handler: Handler
) -> web.StreamResponse:
    """Turn every error into a JSON `{"error", "detail"}` body, never an HTML page."""
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    try:
        return await handler(request)
    except CoggoError as exc:
        log.info("request.rejected", route=route, status=exc.status, error=exc.code)
        return error_response(exc)
    except web.HTTPException as exc:
        log.info("request.rejected", route=route, status=exc.status, error=exc.reason)
        allow = {
            key: value for key, value in exc.headers.items() if key.lower() == "allow"
        }
        return json_response(
            {
                "error": exc.reason.lower().replace(" ", "_"),
                "detail": f"{request.method} {route}: {exc.reason}",
            },
            status=exc.status,
            headers=allow,
        )
    except Exception:
        # A bug in the simulator must not look like a PIMS that hangs up.
        log.exception("request.failed", route=route)
        return json_response(
            {"error": "internal_error", "detail": "the simulator failed; see its log"},
            status=500,
        )
