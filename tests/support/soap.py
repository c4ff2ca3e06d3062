"""SOAP-push test helpers: the reference PIMS in-process, notes, commands, push rows."""

from __future__ import annotations

import copy
import functools
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import orjson
from aiohttp import web
from coggo.topology import Topology
from pims_sim.app import build_app
from pims_sim.faults import FaultSpec
from pims_sim.state import SimConfig, SimState
from soap_push.options import PushOptions

from tests.support.stack import Env, RunningService, start_service

# A note with the hard cases: markup in values and labels, non-ASCII text,
# checkbox arrays, numbers with units, fields and a whole section with nothing
# captured, and a vitals node that holds only a confidence.
HARD_NOTE: dict[str, Any] = {
    "schemaVersion": "1.0",
    "subjective": {
        "title": "Subjective",
        "fields": [
            {
                "name": "chief_complaint",
                "label": "Chief complaint",
                "type": "free_text",
                "ui_control": "textarea",
                "value": "<script>alert('x')</script> limping & \"sore\"",
            },
            {
                "name": "history",
                "label": "History",
                "type": "free_text",
                "ui_control": "textarea",
                "value": "Not mentioned",
            },
            {
                "name": "owner_notes",
                "label": "Owner's notes",
                "type": "free_text",
                "value": "Mange moins: mangé 50 % 🐕 食欲不振\nsecond line",
            },
        ],
    },
    "objective": {
        "title": "Objective / Physical Exam",
        "fields": [
            {
                "name": "temperature",
                "label": "Temperature (Rectal)",
                "type": "number_with_unit",
                "ui_control": "number_input",
                "unit": "°C",
                "value": 36.89,
            },
            {
                "name": "weight",
                "label": "Weight",
                "type": "number_with_unit",
                "unit": "kg",
                "value": 11,
            },
            {
                "name": "symptoms",
                "label": "Symptoms <b>seen</b>",
                "type": "checkbox_text",
                "ui_control": "checkbox_group",
                "options": ["Vomiting", "Lethargy & weakness", "Cough"],
                "value": ["Vomiting", "Lethargy & weakness"],
            },
            {
                "name": "mucous_membranes",
                "label": "Mucous membranes",
                "type": "checkbox_text",
                "ui_control": "checkbox_group",
                "value": "",
            },
            {
                "name": "heart_rate",
                "label": "Heart rate",
                "type": "number_with_unit",
                "unit": "bpm",
                "value": "",
            },
            {
                "name": "findings",
                "label": "Findings",
                "type": "checkbox_text",
                "value": [],
            },
        ],
    },
    "assessment": {
        "title": "Assessment",
        "fields": [
            {
                "name": "diagnosis",
                "label": "Diagnosis",
                "type": "select",
                "ui_control": "dropdown",
                "value": "Not mentioned",
            }
        ],
    },
    "plan": {
        "title": "Plan",
        "fields": [
            {
                "name": "follow_up",
                "label": "Follow-up",
                "type": "select",
                "ui_control": "dropdown",
                "value": "Recheck in 2 weeks",
            }
        ],
    },
    "vitals": {
        "weight": "",
        "heartRate": "",
        "temperature": {},
        "confidence": "high",
    },
}


def hard_note() -> dict[str, Any]:
    return copy.deepcopy(HARD_NOTE)


def simple_note(complaint: str = "Limping on the left hind leg") -> dict[str, Any]:
    return {
        "schemaVersion": "1.0",
        "subjective": {
            "title": "Subjective",
            "fields": [
                {
                    "name": "chief_complaint",
                    "label": "Chief complaint",
                    "type": "free_text",
                    "value": complaint,
                }
            ],
        },
    }


def push_command(
    clinic_id: str,
    note_id: str = "note-1",
    version: int = 1,
    *,
    note: dict[str, Any] | None = None,
    command_id: str | None = None,
    **data: Any,
) -> dict[str, Any]:
    """Build a soap.push command as the Coggo backend publishes it."""
    return {
        "id": command_id or str(uuid.uuid4()),
        "type": "soap.push",
        "occurredAt": "2026-06-12T15:00:00Z",
        "clinicId": clinic_id,
        "data": {
            "noteId": note_id,
            "version": version,
            "externalPatientId": "pat_771",
            "signedAt": "2026-06-12T14:55:00Z",
            "note": note if note is not None else simple_note(),
            **data,
        },
    }


async def publish_command(
    channel: aio_pika.abc.AbstractChannel,
    topology: Topology,
    command: dict[str, Any],
    *,
    headers: dict[str, Any] | None = None,
) -> bytes:
    """Publish a command on coggo.commands with routing key soap.push; return its body."""
    body = orjson.dumps(command)
    exchange = await channel.get_exchange(topology.commands)
    await exchange.publish(
        aio_pika.Message(
            body,
            message_id=command["id"],
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            headers=headers or {},
        ),
        routing_key="soap.push",
    )
    return body


async def push_row(
    env: Env, clinic_id: str, note_id: str = "note-1", version: int = 1
) -> dict[str, Any] | None:
    row = await env.pool.fetchrow(
        """
        SELECT id, state, attempts, last_status, last_error, next_attempt_at,
               leased_until, command IS NOT NULL AS has_command, superseded_by
        FROM pushes WHERE clinic_id = $1 AND note_id = $2 AND version = $3
        """,
        clinic_id,
        note_id,
        version,
    )
    return dict(row) if row is not None else None


def state_is(
    env: Env, state: str, clinic_id: str, note_id: str = "note-1", version: int = 1
) -> Callable[[], Awaitable[dict[str, Any] | None]]:
    """Build a check for `wait_until`: the push row once it is in `state`."""

    async def check() -> dict[str, Any] | None:
        row = await push_row(env, clinic_id, note_id, version)
        return row if row is not None and row["state"] == state else None

    return check


@dataclass(frozen=True)
class RecordedRequest:
    """One request the PIMS received on its push route, before any fault applied."""

    monotonic: float
    # Unix time, to compare with timestamps stored in PostgreSQL.
    unix_time: float
    message_id: str | None
    timestamp: str | None
    signature: str | None


@dataclass
class Pims:
    """The reference PIMS on 127.0.0.1, with the requests it received recorded."""

    state: SimState
    runner: web.AppRunner
    base_url: str
    requests: list[RecordedRequest] = field(default_factory=list)

    @property
    def push_url(self) -> str:
        return f"{self.base_url}/push"

    @property
    def port(self) -> int:
        return int(self.base_url.rsplit(":", 1)[1])

    @property
    def push_calls(self) -> int:
        return self.state.calls["push"]

    def stored(self, note_id: str | None = None) -> list[dict[str, Any]]:
        return [push.wire() for push in self.state.pushes.list(note_id)]

    def set_fault(self, **fields: Any) -> None:
        self.state.faults.set(FaultSpec(endpoint="push", **fields))

    async def close(self) -> None:
        """Stop the server; requests held open by a timeout fault end at once."""
        if self.runner.server is not None:
            await self.runner.cleanup()


async def start_pims(secret: str) -> Pims:
    """Start the reference PIMS with `secret` on a free loopback port."""
    state = SimState.create(SimConfig(secret=secret, appointments=0, clients=0))
    app = build_app(state)
    pims: Pims | None = None

    @web.middleware
    async def record(
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        if request.path.endswith("/push") and pims is not None:
            pims.requests.append(
                RecordedRequest(
                    time.monotonic(),
                    time.time(),
                    request.headers.get("X-Coggo-Id"),
                    request.headers.get("X-Coggo-Timestamp"),
                    request.headers.get("X-Coggo-Signature"),
                )
            )
        return await handler(request)

    app.middlewares.append(record)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    pims = Pims(state, runner, f"http://127.0.0.1:{runner.addresses[0][1]}")
    return pims


def fast_options(**overrides: Any) -> PushOptions:
    """Options with backoff in tenths of a second, so five attempts take about 1 s."""
    values: dict[str, Any] = {
        "timeout_seconds": 2.0,
        "backoff_seconds": 0.05,
        "backoff_multiplier": 2.0,
        "max_backoff_seconds": 1.0,
        "poll_seconds": 0.2,
    }
    values.update(overrides)
    return PushOptions(**values)


async def start_dispatcher(
    env: Env, options: PushOptions | None = None, **settings: Any
) -> RunningService:
    """Run the real dispatcher in this process; private targets allowed unless overridden."""
    from soap_push.__main__ import serve

    settings.setdefault("allow_private_targets", True)
    main = functools.partial(serve, options=options or fast_options())
    return await start_service(main, env.service_settings(**settings))
