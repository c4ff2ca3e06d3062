"""HTTP routes of the ingress and the checks of POST /webhooks, in their order."""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import asyncpg
import structlog
from aiohttp import web
from coggo import metrics
from coggo.broker import Broker
from coggo.credentials import SecretBox
from coggo.errors import (
    CoggoError,
    PayloadTooLarge,
    RateLimited,
    ServiceUnavailable,
    UnsupportedMediaType,
)
from coggo.ops import add_ops_routes, check_database
from coggo.outbox import OutboxRelay
from coggo.rate_limit import RateLimitDecision, RateLimiter
from coggo.signing import SignatureHeaders, verify_request
from coggo.topology import Topology

from ingress.accept import (
    STORE_ISOLATE,
    EventRecord,
    StoreOutcome,
    accepted,
    decode_body,
    prepare_record,
    store_events,
    validate_event,
)
from ingress.auth import Caller, KeyCache, authenticate, require_webhook_access
from ingress.batching import Batcher

log = structlog.get_logger(__name__)

MAX_BODY_BYTES = 1024 * 1024
PREFIX = "/v1/partner"

# The two bodies of a 200 from POST /webhooks, encoded once.
_RECEIVED_BODY = b'{"received": true, "duplicate": false}'
_DUPLICATE_BODY = b'{"received": true, "duplicate": true}'

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# Batches of each kind in flight at once, each on its own pool connection.
STORE_CONCURRENCY = 4
RATE_LIMIT_CONCURRENCY = 1
MAX_BATCH = 200


@dataclass
class Ingress:
    pool: asyncpg.Pool
    broker: Broker
    topology: Topology
    box: SecretBox
    relay: OutboxRelay
    keys: KeyCache = field(init=False)
    limiter: RateLimiter = field(default_factory=RateLimiter)
    rate_checks: Batcher[uuid.UUID, RateLimitDecision] = field(init=False)
    stores: Batcher[EventRecord, StoreOutcome] = field(init=False)

    def __post_init__(self) -> None:
        self.keys = KeyCache(self.pool, self.box)
        self.rate_checks = Batcher(
            self._check_rates,
            concurrency=RATE_LIMIT_CONCURRENCY,
            max_batch=MAX_BATCH,
        )
        self.stores = Batcher(
            self._store,
            concurrency=STORE_CONCURRENCY,
            max_batch=MAX_BATCH,
            isolate=STORE_ISOLATE,
        )

    async def _check_rates(self, key_ids: list[uuid.UUID]) -> list[RateLimitDecision]:
        return await self.limiter.hit_many(self.pool, key_ids)

    async def _store(self, records: list[EventRecord]) -> list[StoreOutcome]:
        outcomes = await store_events(self.pool, self.topology.webhooks, records)
        if StoreOutcome.STORED in outcomes:
            self.relay.notify()
        return outcomes


INGRESS_KEY = web.AppKey("ingress", Ingress)


def error_response(error: CoggoError) -> web.Response:
    return web.json_response(error.body(), status=error.status, headers=error.headers)


@web.middleware
async def errors_middleware(
    request: web.Request, handler: Handler
) -> web.StreamResponse:
    route = request.match_info.route.resource
    route_name = route.canonical if route is not None else "unmatched"
    started = time.perf_counter()
    try:
        response = await handler(request)
    except CoggoError as exc:
        response = error_response(exc)
    except web.HTTPException as exc:
        response = web.json_response(
            {
                "error": exc.reason.lower().replace(" ", "_"),
                "detail": _route_detail(request, exc),
            },
            status=exc.status,
            headers={k: v for k, v in exc.headers.items() if k.lower() == "allow"},
        )
    except ConnectionResetError:
        # The client closed the connection first, so no response can be sent.
        raise
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        log.error("request.storage_unavailable", route=route_name, error=repr(exc))
        response = error_response(
            ServiceUnavailable("storage is unavailable; retry with the same event id")
        )
    metrics.HTTP_REQUESTS.labels(route_name, str(response.status)).inc()
    metrics.HTTP_LATENCY.labels(route_name).observe(time.perf_counter() - started)
    return response


ROUTES = f"GET {PREFIX}/ping and POST {PREFIX}/webhooks"


def _route_detail(request: web.Request, exc: web.HTTPException) -> str:
    path = request.path[:200]
    if exc.status == 404:
        return f"no route {request.method} {path}: the Partner API serves {ROUTES}"
    if exc.status == 405:
        allowed = exc.headers.get("Allow", "")
        return f"method {request.method} is not allowed on {path}: use {allowed}"
    return exc.text or exc.reason


async def _caller(request: web.Request) -> Caller:
    ingress = request.app[INGRESS_KEY]
    return await authenticate(ingress.keys, request.headers.get("Authorization"))


async def _check_rate(ingress: Ingress, caller: Caller) -> None:
    decision = await ingress.rate_checks.submit(caller.key.key_id)
    if not decision.allowed:
        raise RateLimited(
            f"more than {ingress.limiter.requests} requests a minute for this API key; "
            f"retry after {decision.retry_after} seconds",
            headers={"Retry-After": str(decision.retry_after)},
        )


async def ping(request: web.Request) -> web.Response:
    ingress = request.app[INGRESS_KEY]
    caller = await _caller(request)
    if not caller.key.plan_enabled:
        require_webhook_access(caller)
    await _check_rate(ingress, caller)
    return web.json_response(
        {
            "ok": True,
            "clinicId": caller.key.clinic_id,
            "provider": caller.key.provider,
            "scopes": list(caller.key.scopes),
            "status": caller.key.status,
        }
    )


def _check_content_type(request: web.Request) -> None:
    raw = request.headers.get("Content-Type")
    if raw is None:
        return
    mime = raw.split(";", 1)[0].strip().lower()
    if mime != "application/json" and not mime.endswith("+json"):
        raise UnsupportedMediaType(
            f"Content-Type {mime[:100]!r} is not supported: send application/json"
        )


async def _read_body(request: web.Request) -> bytes:
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise PayloadTooLarge(
            f"body is {request.content_length} bytes; the limit is {MAX_BODY_BYTES} bytes"
        )
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(
            f"body exceeds the limit of {MAX_BODY_BYTES} bytes"
        ) from None


async def receive_webhook(request: web.Request) -> web.Response:
    ingress = request.app[INGRESS_KEY]

    caller = await _caller(request)
    require_webhook_access(caller)
    await _check_rate(ingress, caller)

    body = await _read_body(request)
    _check_content_type(request)
    payload = decode_body(body)

    verify_request(SignatureHeaders.from_mapping(request.headers), body, caller.secrets)

    event = validate_event(payload, body)
    record = prepare_record(caller.key.clinic_id, payload, event)
    duplicate = accepted(record, await ingress.stores.submit(record))

    metrics.EVENTS_ACCEPTED.labels(event.type.value, str(duplicate).lower()).inc()
    log.info(
        "webhook.accepted",
        clinic_id=caller.key.clinic_id,
        event_id=event.id,
        event_type=event.type.value,
        duplicate=duplicate,
    )
    return web.Response(
        body=_DUPLICATE_BODY if duplicate else _RECEIVED_BODY,
        content_type="application/json",
        charset="utf-8",
    )


def build_app(ingress: Ingress) -> web.Application:
    # aiohttp rejects bodies over client_max_size with 413 on read, and the
    # middleware turns that into the JSON error body.
    app = web.Application(
        middlewares=[errors_middleware], client_max_size=MAX_BODY_BYTES
    )
    app[INGRESS_KEY] = ingress
    app.router.add_get(f"{PREFIX}/ping", ping)
    app.router.add_post(f"{PREFIX}/webhooks", receive_webhook)

    async def readiness() -> dict[str, bool]:
        return {
            "database": await check_database(ingress.pool),
            "broker": ingress.broker.connected,
        }

    add_ops_routes(app, readiness)
    return app
