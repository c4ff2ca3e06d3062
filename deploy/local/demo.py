"""Start the whole system on this machine and run the demo through it.

`make run` calls this: it prepares the database, starts every service as a
child process, sends the Partner API's example event through the reference
PIMS, shows the resulting scheduled visit, then keeps the system running and
prints domain events until Ctrl-C, which stops every process cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import asyncpg
import orjson
from coggo import db
from coggo.credentials import SecretBox
from coggo.integrations import CreatedIntegration, create_integration
from coggo.settings import Settings

BIN = Path(sys.executable).parent
LOGS = Path(".run")


def say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


@dataclass
class Child:
    name: str
    command: list[str]
    process: asyncio.subprocess.Process | None = None
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = LOGS / f"{self.name}.log"

    async def start(self, env: dict[str, str]) -> None:
        log = self.log_path.open("ab")
        self.process = await asyncio.create_subprocess_exec(
            *self.command, env=env, stdout=log, stderr=log, start_new_session=True
        )
        say(f"started {self.name} (pid {self.process.pid}, log {self.log_path})")

    async def stop(self) -> None:
        if self.process is None or self.process.returncode is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.process.wait(), 15)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()
        say(f"stopped {self.name} (exit {self.process.returncode})")


async def wait_ready(url: str, name: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(url) as response:
                    if response.status == 200:
                        say(f"{name} is ready ({url})")
                        return
            await asyncio.sleep(0.2)
    raise RuntimeError(f"{name} did not become ready at {url} within {timeout} s")


async def prepare_database(settings: Settings) -> None:
    if await db.ensure_database(settings.database_url):
        say("created the database")
    connection = await asyncpg.connect(settings.database_url)
    try:
        applied = await db.upgrade(connection)
        version = await db.current_version(connection)
    finally:
        await connection.close()
    say(f"database schema at version {version} ({len(applied)} migrations applied now)")


async def create_demo_integration(
    settings: Settings, box: SecretBox, pims_url: str
) -> CreatedIntegration:
    clinic_id = "demo-" + datetime.now(UTC).strftime("%Y%m%d%H%M%S")
    connection = await asyncpg.connect(settings.database_url)
    try:
        created = await create_integration(
            connection,
            box,
            clinic_id=clinic_id,
            provider="coggo-pims-sim",
            external_clinic_id="sim-clinic-1",
            default_timezone="America/New_York",
            pims_base_url=pims_url,
            push_url=f"{pims_url}/push",
        )
    finally:
        await connection.close()
    say(f"created integration for clinic {clinic_id} (API key {created.api_key[:15]}…)")
    return created


async def show_visit(
    settings: Settings, clinic_id: str, external_appointment_id: str
) -> None:
    connection = await asyncpg.connect(settings.database_url)
    try:
        row = await connection.fetchrow(
            """
            SELECT v.id AS visit_id, v.status, v.scheduled_at, a.id AS appointment_id,
                   a.starts_at_local, a.timezone, p.id AS patient_id,
                   p.external_id AS external_patient_id, p.name AS patient_name,
                   p.species, p.species_key, p.weight_kg, c.id AS client_id,
                   c.external_id AS external_client_id
            FROM visits v
            JOIN appointments a ON a.id = v.appointment_id
            LEFT JOIN patients p ON p.id = v.patient_id
            LEFT JOIN clients c ON c.id = p.client_id
            WHERE a.clinic_id = $1 AND a.external_id = $2
            """,
            clinic_id,
            external_appointment_id,
        )
    finally:
        await connection.close()
    if row is None:
        say(f"no visit stored for appointment {external_appointment_id}")
        return
    say("stored visit:")
    for name, value in row.items():
        print(f"         {name:<20} {value}", flush=True)


async def watch_events(
    settings: Settings, found: asyncio.Queue[dict[str, object]], ready: asyncio.Event
) -> None:
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(exclusive=True)
        await queue.bind(f"{settings.topology_prefix}coggo.events", routing_key="#")
        ready.set()
        async with queue.iterator(no_ack=True) as messages:
            async for message in messages:
                event = orjson.loads(message.body)
                say(f"event {event['type']} {orjson.dumps(event['data']).decode()}")
                await found.put(event)


async def send_example(ingress_url: str, created: CreatedIntegration) -> None:
    from pims_sim.sender import send_events

    results = await send_events(
        ingress_url=ingress_url,
        api_key=created.api_key,
        secret=created.signing_secret,
        example=True,
    )
    for result in results:
        say(f"sent {result.event_id}: HTTP {result.status} {result.body}")


async def admin(env: dict[str, str], *arguments: str) -> dict[str, Any]:
    """Run a coggo-admin verb with --json and return its result."""
    process = await asyncio.create_subprocess_exec(
        str(BIN / "coggo-admin"),
        "--json",
        *arguments,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    output, errors = await process.communicate()
    if process.returncode not in (0, 1):
        raise RuntimeError(
            f"coggo-admin {' '.join(arguments)} failed: {errors.decode()}"
        )
    result: dict[str, Any] = orjson.loads(output)
    return result


async def refresh_species(env: dict[str, str], clinic_id: str) -> None:
    say("refreshing the species catalog from the reference PIMS")
    result = await admin(env, "species", "refresh", "--clinic-id", clinic_id, "--wait")
    data = result.get("data", result)
    say(
        f"species.refreshed: {data.get('status')}, {data.get('mapped')} mapped, "
        f"unmapped keys {data.get('unmappedKeys')}"
    )


async def reconcile(env: dict[str, str], clinic_id: str) -> None:
    say(
        "reconciling the next 7 days of appointments with the reference PIMS; "
        "its copy of apt_1029 is dated tomorrow, so that visit moves"
    )
    result = await admin(
        env, "reconcile", "--clinic-id", clinic_id, "--days", "7", "--wait"
    )
    data = result.get("data", result)
    say(
        f"reconcile.completed: {data.get('status')}, fetched {data.get('fetched')}, "
        f"processed {data.get('processed')}, skipped {data.get('skipped')}, "
        f"truncated {data.get('truncated')}"
    )


DEMO_NOTE: dict[str, Any] = {
    "schemaVersion": "1.0",
    "subjective": {
        "title": "Subjective",
        "fields": [
            {
                "name": "chief_complaint",
                "label": "Chief complaint",
                "type": "free_text",
                "value": "Lameness re-check, left hind",
            }
        ],
    },
    "objective": {
        "title": "Objective / Physical Exam",
        "fields": [
            {
                "name": "temperature",
                "label": "Temperature (Rectal)",
                "type": "number_with_unit",
                "unit": "°C",
                "value": 38.6,
            }
        ],
    },
    "plan": {
        "title": "Plan",
        "fields": [
            {
                "name": "plan",
                "label": "Plan",
                "type": "free_text",
                "value": "Continue rest; recheck in two weeks.",
            }
        ],
    },
    "vitals": {"temperature": {"value": 38.6, "unit": "celsius"}, "confidence": "high"},
}


async def push_note(
    settings: Settings,
    clinic_id: str,
    pims_url: str,
    found: asyncio.Queue[dict[str, object]],
) -> bool:
    """Send a signed SOAP note for the example patient and show what the PIMS stored."""
    command = {
        "id": str(uuid.uuid4()),
        "type": "soap.push",
        "occurredAt": datetime.now(UTC).isoformat(),
        "clinicId": clinic_id,
        "data": {
            "noteId": "note-demo-1",
            "version": 1,
            "externalPatientId": "pat_771",
            "externalAppointmentId": "apt_1029",
            "vet": {"name": "Dr. Demo", "externalStaffId": "stf_44"},
            "signedAt": datetime.now(UTC).isoformat(),
            "language": "en",
            "note": DEMO_NOTE,
        },
    }
    say("pushing a signed SOAP note for pat_771 to the reference PIMS")
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(
            f"{settings.topology_prefix}coggo.commands"
        )
        await exchange.publish(
            aio_pika.Message(
                orjson.dumps(command),
                message_id=command["id"],
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key="soap.push",
        )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with contextlib.suppress(TimeoutError):
            event = await asyncio.wait_for(found.get(), 1)
            if event["type"] in ("push.sent", "push.failed"):
                break
    else:
        say("no push.sent event within 30 s; see the logs in .run/")
        return False
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{pims_url}/_sim/pushes") as response,
    ):
        received = await response.json()
    for push in received.get("pushes", []):
        envelope = push.get("envelope", {})
        text = envelope.get("formats", {}).get("text", {})
        say(
            f"the reference PIMS received note {push.get('noteId')} version "
            f"{push.get('version')} (envelope {envelope.get('id')}) with text sections "
            f"{sorted(text)}"
        )
    return bool(received.get("pushes"))


async def run(args: argparse.Namespace) -> int:
    settings = (
        Settings(dev_mode=True)
        if not os.environ.get("COGGO_SECRET_KEY")
        else Settings()
    )
    box = SecretBox.from_settings(settings)
    LOGS.mkdir(exist_ok=True)  # noqa: ASYNC240  # once, before anything runs
    ingress_url = f"http://127.0.0.1:{settings.ingress_port}"
    pims_url = f"http://127.0.0.1:{args.pims_port}"
    metrics_base = args.metrics_port

    await prepare_database(settings)
    created = await create_demo_integration(settings, box, pims_url)

    env = dict(os.environ)
    env.setdefault("COGGO_DEV_MODE", "1")
    env["COGGO_ALLOW_PRIVATE_TARGETS"] = "1"
    env["COGGO_LOG_FORMAT"] = "json"
    children = [
        Child("ingress", [str(BIN / "coggo-ingress")]),
        Child("patient-upsert", [str(BIN / "coggo-patient-upsert")]),
        Child("reconciliation", [str(BIN / "coggo-reconciliation")]),
        Child("soap-push", [str(BIN / "coggo-soap-push")]),
        Child(
            "pims-sim",
            [
                str(BIN / "coggo-pims-sim"),
                "serve",
                "--port",
                str(args.pims_port),
                "--secret",
                created.signing_secret,
            ],
        ),
    ]
    health = {
        "ingress": f"{ingress_url}/readyz",
        "pims-sim": f"{pims_url}/_sim/health",
    }

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)

    found: asyncio.Queue[dict[str, object]] = asyncio.Queue()
    watching_ready = asyncio.Event()
    watcher = None
    try:
        for index, child in enumerate(children):
            child_env = dict(env)
            if child.name not in health:
                child_env["COGGO_METRICS_PORT"] = str(metrics_base + index)
                health[child.name] = f"http://127.0.0.1:{metrics_base + index}/readyz"
            await child.start(child_env)
        for child in children:
            await wait_ready(health[child.name], child.name)

        watcher = asyncio.create_task(watch_events(settings, found, watching_ready))
        await asyncio.wait_for(watching_ready.wait(), 10)

        await refresh_species(env, created.clinic_id)

        say("sending the Partner API example event (appointment.created evt_8f2c41)")
        await send_example(ingress_url, created)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                event = await asyncio.wait_for(found.get(), 1)
                if event["type"] == "visit.scheduled":
                    break
        else:
            say("no visit.scheduled event within 30 s; see the logs in .run/")
            return 1
        await show_visit(settings, created.clinic_id, "apt_1029")

        await reconcile(env, created.clinic_id)
        if not await push_note(settings, created.clinic_id, pims_url, found):
            return 1

        if args.exit_after_demo:
            return 0
        say("the system is running; press Ctrl-C to stop every service")
        await stop.wait()
        return 0
    finally:
        if watcher is not None:
            watcher.cancel()
        for child in reversed(children):
            await child.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="make run",
        description="Start every Coggo service on this machine and run the demo through it.",
    )
    parser.add_argument(
        "--pims-port", type=int, default=8090, help="port of the reference PIMS"
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=9100,
        help="first side port for the workers' /readyz and /metrics",
    )
    parser.add_argument(
        "--exit-after-demo",
        action="store_true",
        help="stop everything once the demo has run instead of waiting for Ctrl-C",
    )
    sys.exit(asyncio.run(run(parser.parse_args())))


if __name__ == "__main__":
    main()
