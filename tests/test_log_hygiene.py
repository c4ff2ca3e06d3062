"""No service logs a key, a secret, a signature or a client's contact details.

The services run as child processes with JSON logs at debug level, the most
they ever print. Client records come from a fixed corpus with non-ASCII names
and addresses. The JSON renderer escapes those, so every line is checked both
as printed and as decoded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import aiohttp
import orjson
import pytest
from aio_pika.abc import AbstractConnection
from coggo.logs import REDACTED, mask_credentials, redact_secrets
from coggo.settings import Settings

from tests.support.admin import (
    CliResult,
    OutputReader,
    admin,
    dlq,
    script,
    settings_environment,
)
from tests.support.events import encode, signed_headers
from tests.support.stack import (
    Env,
    HttpClient,
    free_port,
    subprocess_service,
    wait_for_http,
    wait_until,
)

WEBHOOKS = "/v1/partner/webhooks"
PING = "/v1/partner/ping"
CLINIC = "clinic-hygiene"
PIMS_TOKEN = "pims-token-Zq9rT2vX8kLm4Np7"

# Owners as a PIMS sends them: accents, apostrophes, plus addressing, and
# Japanese, Greek and Ukrainian scripts.
CORPUS: list[dict[str, str]] = [
    {
        "firstName": "Zoë",
        "lastName": "Ångström-Østergaard",
        "email": "zoe.angstrom@example.org",
        "phone": "+46 70 123 45 67",
        "addressLine1": "Storgatan 12",
        "addressLine2": "Lägenhet 1102",
        "city": "Malmö-Västra",
        "stateRegion": "Skåne län",
        "postalCode": "211 34",
    },
    {
        "firstName": "José María",
        "lastName": "Núñez Peña",
        "email": "jose.nunez+vet@correo.example",
        "phone": "+34 612 345 678",
        "addressLine1": "Calle de Alcalá 42, 3º izq.",
        "city": "Alcalá de Henares",
        "stateRegion": "Comunidad de Madrid",
        "postalCode": "28801",
    },
    {
        "firstName": "美咲",
        "lastName": "高橋",
        "email": "misaki.takahashi@example.jp",
        "phone": "+81 90-1234-5678",
        "addressLine1": "渋谷区神南1-2-3",
        "city": "東京都渋谷区",
        "postalCode": "150-0041",
    },
    {
        "firstName": "Siobhán",
        "lastName": "O'Brien-Mac Giolla",
        "email": "siobhan.obrien@example.ie",
        "phone": "(555) 010-4477",
        "addressLine1": "7 Rue de l'Église",
        "addressLine2": "Appartement B",
        "city": "Saint-Étienne-du-Rouvray",
        "postalCode": "76800",
    },
    {
        "firstName": "Αλέξανδρος",
        "lastName": "Παπαδόπουλος",
        "email": "alexandros.p@example.gr",
        "phone": "+30 694 123 4567",
        "addressLine1": "Οδός Ερμού 25",
        "city": "Θεσσαλονίκη",
        "postalCode": "546 24",
    },
    {
        "firstName": "Олена",
        "lastName": "Шевченко",
        "email": "olena.shevchenko@example.ua",
        "phone": "+380 67 123 4567",
        "addressLine1": "вулиця Хрещатик, 22",
        "city": "Київ",
        "postalCode": "01001",
    },
]

# Short or common values (postal codes) are left out: an id or a count may
# contain them by chance.
_CHECKED_FIELDS = (
    "firstName",
    "lastName",
    "email",
    "phone",
    "addressLine1",
    "addressLine2",
    "city",
    "stateRegion",
)


def corpus_values(owners: list[dict[str, Any]]) -> set[str]:
    values = set()
    for owner in owners:
        for name in _CHECKED_FIELDS:
            value = owner.get(name)
            if isinstance(value, str) and len(value) >= 4:
                values.add(value)
    return values


def _readings(line: str) -> list[str]:
    """Return the line as printed and, when it is JSON, as decoded text."""
    readings = [line]
    with contextlib.suppress(ValueError):
        readings.append(json.dumps(json.loads(line), ensure_ascii=False))
    return readings


def leaks(lines: list[str], forbidden: set[str]) -> list[tuple[str, str]]:
    """Return (value, line) for every forbidden value found in a log line."""
    found = []
    for line in lines:
        for reading in _readings(line):
            folded = reading.casefold()
            for value in forbidden:
                if value.casefold() in folded:
                    found.append((value, line))
    return found


@dataclass
class Stack:
    """Child processes of one test and everything they printed."""

    env: Env
    settings: Settings
    # The first API key, the current signing secret and the previous one.
    values: dict[str, str] = field(default_factory=dict)
    forbidden: set[str] = field(default_factory=set)
    logs: dict[str, list[str]] = field(default_factory=dict)
    readers: dict[str, OutputReader] = field(default_factory=dict)
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    async def admin(self, *args: str, stdin: str | None = None) -> CliResult:
        result = await admin(self.env, *args, stdin=stdin)
        self._record_cli("coggo-admin", result)
        return result

    async def dlq(self, *args: str) -> CliResult:
        result = await dlq(self.env, *args)
        self._record_cli("coggo-dlq", result)
        return result

    def _record_cli(self, name: str, result: CliResult) -> None:
        # stdout is the command's output to the operator; stderr is its log.
        assert result.code == 0, result.stderr
        self.logs.setdefault(name, []).extend(result.stderr.splitlines())

    def start(self, command: str, stack: contextlib.ExitStack, **env: str) -> None:
        process = stack.enter_context(
            subprocess_service(
                command,
                self.settings,
                extra_env={"COGGO_LOG_LEVEL": "debug", **env},
            )
        )
        self.processes[command] = process
        self.readers[command] = OutputReader(process).start()

    async def stop_all(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for command, process in self.processes.items():
            await asyncio.to_thread(process.wait, 30)
            self.logs[command] = self.readers[command].join()

    def assert_clean(self) -> None:
        assert self.logs, "no log was captured"
        for command, lines in self.logs.items():
            found = leaks(lines, self.forbidden)
            assert found == [], f"{command} logged {found[0][0]!r}: {found[0][1]}"


def _owner_event(index: int, owner: dict[str, str]) -> dict[str, Any]:
    return {
        "id": f"evt_hygiene_{index}",
        "type": "appointment.created",
        "occurredAt": "2026-06-12T09:30:00Z",
        "data": {
            "appointment": {
                "externalId": f"apt_h{index}",
                "startsAt": "2026-06-12T14:00:00",
                "timezone": "Europe/Stockholm",
                "reason": f"Check-up, call {owner['firstName']} on {owner['phone']}",
            },
            "client": {"externalId": f"cli_h{index}", **owner},
            "patient": {
                "externalId": f"pat_h{index}",
                "name": "Pixel",
                "species": "cat",
                "speciesKey": "99",
            },
        },
    }


@contextlib.contextmanager
def _services(stack: Stack, commands: list[str], **env: str) -> Iterator[None]:
    with contextlib.ExitStack() as exits:
        for command in commands:
            stack.start(command, exits, **env)
        yield


@pytest.fixture
async def hygiene(env: Env) -> Stack:
    """An integration made with coggo-admin, its secrets rotated and credentials set."""
    stack = Stack(env, env.service_settings(allow_private_targets=True))
    created = (
        await stack.admin(
            "integration",
            "create",
            "--clinic-id",
            CLINIC,
            "--provider",
            "vetsim",
            "--timezone",
            "Europe/Stockholm",
            "--json",
        )
    ).json()
    extra_key = (
        await stack.admin("key", "create", "--clinic-id", CLINIC, "--json")
    ).json()["apiKey"]
    rotated = (
        await stack.admin("secret", "rotate", "--clinic-id", CLINIC, "--json")
    ).json()["signingSecret"]
    await stack.admin(
        "integration",
        "credentials",
        "--clinic-id",
        CLINIC,
        "--scheme",
        "bearer",
        stdin=PIMS_TOKEN + "\n",
    )
    stack.forbidden |= {
        created["apiKey"],
        created["signingSecret"],
        extra_key,
        rotated,
        PIMS_TOKEN,
        env.settings.secret_key.get_secret_value() if env.settings.secret_key else "",
    }
    stack.forbidden |= corpus_values(CORPUS)
    stack.forbidden.discard("")
    stack.values = {
        "api_key": created["apiKey"],
        "secret": rotated,
        "old": created["signingSecret"],
    }
    return stack


async def _post(
    client: HttpClient,
    stack: Stack,
    key: str,
    secret: str | None,
    event: dict[str, Any],
    *,
    expected: int,
) -> None:
    body = encode(event)
    headers = signed_headers(key, secret, body, message_id=str(event.get("id")))
    if "X-Coggo-Signature" in headers:
        stack.forbidden.add(headers["X-Coggo-Signature"])
    response = await client.request("POST", WEBHOOKS, data=body, headers=headers)
    assert response.status == expected, response.body


async def _processed(env: Env, count: int) -> bool:
    visits = await env.pool.fetchval("SELECT count(*) FROM visits")
    return bool(visits >= count)


async def test_ingress_and_upsert_logs_clean(
    hygiene: Stack, amqp: AbstractConnection
) -> None:
    stack = hygiene
    env = stack.env
    values = stack.values
    port = free_port()
    stack.settings = env.service_settings(ingress_port=port, allow_private_targets=True)
    client = HttpClient(f"http://127.0.0.1:{port}")
    try:
        with _services(stack, ["coggo-ingress", "coggo-patient-upsert"]):
            await wait_for_http(client.base_url + "/healthz", timeout=30)
            await stack.admin(
                "species",
                "map",
                "--clinic-id",
                CLINIC,
                "--key",
                "99",
                "--species",
                "feline",
            )

            for index, owner in enumerate(CORPUS):
                # Events signed with the new secret and with the old one, in its grace period.
                secret = values["secret"] if index % 2 else values["old"]
                await _post(
                    client,
                    stack,
                    values["api_key"],
                    secret,
                    _owner_event(index, owner),
                    expected=200,
                )

            # Rejections: a bad signature, an invalid phone, a reused id, no key.
            event = _owner_event(0, CORPUS[0])
            await _post(
                client,
                stack,
                values["api_key"],
                "cgs_wrong-secret-value",
                event,
                expected=401,
            )
            invalid = _owner_event(90, CORPUS[1])
            invalid["data"]["client"]["phone"] = [
                CORPUS[1]["phone"],
                CORPUS[1]["email"],
            ]
            await _post(client, stack, values["api_key"], None, invalid, expected=400)
            reused = _owner_event(0, CORPUS[2])
            await _post(client, stack, values["api_key"], None, reused, expected=409)
            duplicate = _owner_event(1, CORPUS[1])
            await _post(
                client,
                stack,
                values["api_key"],
                values["secret"],
                duplicate,
                expected=200,
            )
            response = await client.request(
                "POST",
                WEBHOOKS,
                data=encode(event),
                headers={"Authorization": "Bearer cgk_live_unknownUnknownUnknown"},
            )
            assert response.status == 401
            stack.forbidden.add("cgk_live_unknownUnknownUnknown")
            ping = await client.request(
                "GET", PING, headers={"Authorization": f"Bearer {values['api_key']}"}
            )
            assert ping.status == 200

            # A message the consumer dead-letters, with contact details in its body.
            channel = await amqp.channel()
            exchange = await channel.get_exchange(env.topology.webhooks)
            await exchange.publish(
                aio_pika.Message(
                    orjson.dumps(
                        {
                            "id": "bad-hygiene",
                            "type": "appointment.created",
                            "clinicId": CLINIC,
                            "data": _owner_event(5, CORPUS[5])["data"],
                        }
                    ),
                    message_id="bad-hygiene",
                ),
                routing_key="appointment.created",
            )

            await wait_until(lambda: _processed(env, len(CORPUS)), timeout=30)
            dead_letters = env.topology.queue("coggo.patient-upsert").dead_letter_queue

            async def dead_lettered() -> bool:
                queue = await channel.declare_queue(dead_letters, passive=True)
                return bool(queue.declaration_result.message_count)

            await wait_until(dead_lettered)
            await stack.dlq("list", "--queue", "coggo.patient-upsert")
            await stack.dlq("show", "--queue", "coggo.patient-upsert", "bad-hygiene")
            await stack.admin(
                "patient", "show", "--clinic-id", CLINIC, "--external-id", "pat_h0"
            )
            await stack.admin(
                "visit", "show", "--clinic-id", CLINIC, "--external-id", "apt_h1"
            )
            await stack.admin("integration", "show", "--clinic-id", CLINIC)
            await stack.admin("key", "list", "--clinic-id", CLINIC)
            await stack.stop_all()
    finally:
        await client.close()

    ingress_events = [
        json.loads(line) for line in stack.logs["coggo-ingress"] if line.startswith("{")
    ]
    upsert_events = [
        json.loads(line)
        for line in stack.logs["coggo-patient-upsert"]
        if line.startswith("{")
    ]
    assert (
        sum(event.get("event") == "webhook.accepted" for event in ingress_events)
        == len(CORPUS) + 1
    )
    assert any(event.get("event") == "webhook.processed" for event in upsert_events)
    assert any(event.get("event") == "message.dead_lettered" for event in upsert_events)
    stack.assert_clean()


async def _start_pims(stack: Stack, exits: contextlib.ExitStack, secret: str) -> str:
    """Start the reference PIMS and return its base URL. Its own logs are not checked."""
    port = free_port()
    command = [
        script("coggo-pims-sim"),
        "serve",
        "--port",
        str(port),
        "--secret",
        secret,
        "--token",
        PIMS_TOKEN,
        "--appointments",
        "6",
        "--clients",
        "6",
    ]
    sim = subprocess.Popen(  # noqa: S603, ASYNC220
        command,
        env=settings_environment(stack.settings),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    exits.callback(_stop_process, sim)
    base = f"http://127.0.0.1:{port}"
    await wait_for_http(base + "/_sim/health", timeout=30)
    return base


def _stop_process(process: subprocess.Popen[bytes]) -> None:
    process.kill()
    process.wait(10)


async def _pims_owners(base: str) -> list[dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(base + "/_sim/data") as response,
    ):
        data = await response.json()
    return [patient["owner"] for patient in data["patients"] if patient.get("owner")]


async def test_reconciliation_logs_clean(
    hygiene: Stack, amqp: AbstractConnection
) -> None:
    pytest.importorskip("reconciliation.__main__")
    stack = hygiene
    env = stack.env
    values = stack.values
    with contextlib.ExitStack() as exits:
        base = await _start_pims(stack, exits, values["secret"])
        stack.forbidden |= corpus_values(await _pims_owners(base))
        await stack.admin(
            "integration", "set", "--clinic-id", CLINIC, "--pims-base-url", base
        )
        with _services(stack, ["coggo-reconciliation", "coggo-patient-upsert"]):
            await stack.admin(
                "reconcile",
                "--clinic-id",
                CLINIC,
                "--wait",
                "--timeout",
                "60",
                "--json",
            )
            await stack.admin(
                "species",
                "refresh",
                "--clinic-id",
                CLINIC,
                "--wait",
                "--timeout",
                "60",
                "--json",
            )
            reply = await _search(env, amqp, (await _pims_owners(base))[0]["lastName"])
            assert reply
            await stack.stop_all()
    stack.assert_clean()


async def _search(env: Env, amqp: AbstractConnection, query: str) -> dict[str, Any]:
    """Send patients.search and return the reply, which carries owner details."""
    channel = await amqp.channel()
    replies = await channel.declare_queue(exclusive=True)
    exchange = await channel.get_exchange(env.topology.commands)
    command_id = str(uuid.uuid4())
    await exchange.publish(
        aio_pika.Message(
            orjson.dumps(
                {
                    "id": command_id,
                    "type": "patients.search",
                    "occurredAt": "2026-06-12T09:30:00Z",
                    "clinicId": CLINIC,
                    "data": {"q": query},
                }
            ),
            message_id=command_id,
            correlation_id=command_id,
            reply_to=replies.name,
        ),
        routing_key="patients.search",
    )
    message = await wait_until(lambda: replies.get(no_ack=True, fail=False), timeout=15)
    reply: dict[str, Any] = orjson.loads(message.body)
    return reply


async def test_soap_push_logs_clean(hygiene: Stack, amqp: AbstractConnection) -> None:
    pytest.importorskip("soap_push.__main__")
    stack = hygiene
    env = stack.env
    values = stack.values
    owner = CORPUS[3]
    with contextlib.ExitStack() as exits:
        base = await _start_pims(stack, exits, values["secret"])
        await stack.admin(
            "integration", "set", "--clinic-id", CLINIC, "--push-url", base + "/push"
        )
        with _services(stack, ["coggo-soap-push"]):
            channel = await amqp.channel()
            exchange = await channel.get_exchange(env.topology.commands)
            command_id = str(uuid.uuid4())
            complaint = f"{owner['firstName']} {owner['lastName']} ({owner['phone']}, {owner['email']}) reports limping"
            await exchange.publish(
                aio_pika.Message(
                    orjson.dumps(
                        {
                            "id": command_id,
                            "type": "soap.push",
                            "occurredAt": "2026-06-12T15:00:00Z",
                            "clinicId": CLINIC,
                            "data": {
                                "noteId": "note-hygiene",
                                "version": 1,
                                "externalPatientId": "pat_h3",
                                "signedAt": "2026-06-12T14:55:00Z",
                                "narrative": complaint,
                                "note": {
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
                                },
                            },
                        }
                    ),
                    message_id=command_id,
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                ),
                routing_key="soap.push",
            )

            async def pushed() -> bool:
                async with (
                    aiohttp.ClientSession() as session,
                    session.get(base + "/_sim/pushes") as response,
                ):
                    return bool((await response.json())["pushes"])

            await wait_until(pushed, timeout=30)
            await stack.admin(
                "push", "show", "--clinic-id", CLINIC, "--note-id", "note-hygiene"
            )
            await stack.stop_all()
    assert stack.logs["coggo-soap-push"], "the dispatcher logged nothing"
    stack.assert_clean()


# The check itself and the processors behind the guarantee


def test_leak_check_reads_escaped_unicode() -> None:
    line = json.dumps({"event": "x", "detail": "Zoë Ångström"})
    assert "Zoë" not in line
    assert leaks([line], {"Zoë"}) == [("Zoë", line)]
    assert leaks(["plain ZOE@EXAMPLE.ORG"], {"zoe@example.org"}) != []
    assert leaks([line], {"Olena"}) == []


def test_redaction_masks_sensitive_fields_at_any_depth() -> None:
    event = {
        "event": "webhook.accepted",
        "email": "zoe@example.org",
        "data": {"client": {"firstName": "Zoë"}, "items": [{"phone": "+46 70"}]},
        "X-Coggo-Signature": "abc=",
        "clinic_id": "clinic-1",
    }
    redacted = redact_secrets(None, "info", dict(event))
    assert redacted["email"] == REDACTED
    assert redacted["data"]["client"] == REDACTED
    assert redacted["data"]["items"][0]["phone"] == REDACTED
    assert redacted["X-Coggo-Signature"] == REDACTED
    assert redacted["clinic_id"] == "clinic-1"


def test_credentials_masked_inside_strings() -> None:
    key = "cgk_live_" + "A1b2C3d4E5f6G7h8I9j0"
    secret = "cgs_" + "Z9y8X7w6V5u4"
    event = {
        "event": "request.failed",
        "error": f"ValueError('bad key {key} with {secret}')",
        "detail": "Authorization: Bearer sometoken123",
    }
    masked = mask_credentials(None, "error", dict(event))
    assert key not in masked["error"]
    assert secret not in masked["error"]
    assert "cgk_live_" + REDACTED in masked["error"]
    assert "sometoken123" not in masked["detail"]
