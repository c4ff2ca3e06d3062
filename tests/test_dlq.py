"""coggo-dlq against the real broker: listing, showing, replaying and purging dead letters."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
from typing import Any

import aio_pika
import orjson
import pytest
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage
from coggo.topology import PATIENT_UPSERT_QUEUE, REPLAY_COUNT_HEADER
from coggo_dlq.__main__ import build_parser

from tests.support.admin import dlq, script, settings_environment
from tests.support.stack import Env, RunningService, wait_until

QUEUE = PATIENT_UPSERT_QUEUE


def _names(env: Env) -> tuple[str, str]:
    spec = env.topology.queue(QUEUE)
    return spec.name, spec.dead_letter_queue


async def _count(channel: AbstractChannel, name: str) -> int:
    # A robust channel returns a repeated declare_queue from its cache, so the
    # declaration goes through the underlying channel.
    underlay = await channel.get_underlay_channel()
    declared = await underlay.queue_declare(name, passive=True)
    return declared.message_count or 0


async def _wait_count(
    channel: AbstractChannel, name: str, expected: int, timeout: float = 15.0
) -> None:
    async def reached() -> bool:
        return await _count(channel, name) == expected

    await wait_until(reached, timeout=timeout)


async def _take_all(
    channel: AbstractChannel, name: str
) -> list[AbstractIncomingMessage]:
    """Remove and return every message of a queue."""
    queue = await channel.get_queue(name)
    taken: list[AbstractIncomingMessage] = []
    while (message := await queue.get(no_ack=True, fail=False)) is not None:
        taken.append(message)
    return taken


def _body(index: int, *, event_type: str, clinic: str) -> bytes:
    return orjson.dumps(
        {
            "id": f"m{index}",
            "type": event_type,
            "occurredAt": "2026-06-12T09:30:00Z",
            "clinicId": clinic,
            "data": {"note": "invalid on purpose"},
        }
    )


async def _seed(
    env: Env,
    channel: AbstractChannel,
    count: int,
    *,
    start: int = 0,
    routing_key: str | None = None,
    exchange: str | None = None,
) -> list[str]:
    """Put consumer-style dead letters straight into the dead-letter queue."""
    dead_letter = await channel.get_exchange(env.topology.dead_letter)
    work, _ = _names(env)
    ids = []
    for index in range(start, start + count):
        event_type = "appointment.created" if index % 2 else "patient.updated"
        clinic = f"clinic-{index % 3}"
        message_id = f"m{index}"
        await dead_letter.publish(
            aio_pika.Message(
                _body(index, event_type=event_type, clinic=clinic),
                message_id=message_id,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                content_type="application/json",
                headers={
                    "x-coggo-reason": "invalid_message",
                    "x-coggo-error": "data.appointment: field required",
                    "x-coggo-original-exchange": exchange or env.topology.webhooks,
                    "x-coggo-original-routing-key": routing_key or event_type,
                    "x-coggo-death-count": 1,
                    "x-coggo-first-death-at": 1_780_000_000,
                    "x-trace-id": f"trace-{index}",
                },
            ),
            routing_key=work,
        )
        ids.append(message_id)
    return ids


async def _broker_dead_letter(
    env: Env, channel: AbstractChannel, message_id: str, reason: str
) -> None:
    """Make the broker dead-letter a message: rejected, or over the delivery limit."""
    work, dead = _names(env)
    before = await _count(channel, dead)
    exchange = await channel.get_exchange(env.topology.webhooks)
    await exchange.publish(
        aio_pika.Message(
            _body(0, event_type="client.updated", clinic="clinic-b"),
            message_id=message_id,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            headers={"x-trace-id": "broker"},
        ),
        routing_key="client.updated",
    )
    queue = await channel.get_queue(work)
    while True:
        message = await queue.get(no_ack=False, fail=False)
        if message is None:
            if await _count(channel, dead) > before:
                return
            await asyncio.sleep(0.02)
            continue
        assert message.message_id == message_id
        await message.reject(requeue=reason != "rejected")


async def _list(env: Env) -> dict[str, Any]:
    result = await dlq(env, "list", "--queue", QUEUE, "--json")
    data: dict[str, Any] = result.json()
    return data


# Command line


def test_every_command_has_help_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    commands = next(
        action
        for action in build_parser()._actions
        if isinstance(action, argparse._SubParsersAction)
    )
    assert sorted(commands.choices) == ["list", "purge", "replay", "show"]
    for name in commands.choices:
        with pytest.raises(SystemExit) as exit_info:
            build_parser().parse_args([name, "--help"])
        assert exit_info.value.code == 0
        text = capsys.readouterr().out
        assert "--json" in text, name
        assert "--queue" in text, name
        if name in ("replay", "purge"):
            assert "--dry-run" in text, name


async def test_unknown_queue_is_an_error(env: Env) -> None:
    result = await dlq(env, "list", "--queue", "coggo.nothing")
    assert result.code == 2
    assert "coggo.patient-upsert" in result.stderr


async def test_missing_queue_names_the_prefix(env: Env) -> None:
    result = await dlq(
        env,
        "list",
        "--queue",
        QUEUE,
        extra_env={"COGGO_TOPOLOGY_PREFIX": "no-such-prefix."},
    )
    assert result.code == 2
    assert "no-such-prefix.coggo.patient-upsert.dlq does not exist" in result.stderr
    assert "COGGO_TOPOLOGY_PREFIX" in result.stderr


async def test_replay_without_selection_is_an_error(env: Env) -> None:
    for command in ("replay", "purge"):
        result = await dlq(env, command, "--queue", QUEUE)
        assert result.code == 2
        assert "--all" in result.stderr


# list and show


async def test_list_reports_consumer_and_broker_reasons(
    env: Env, upsert: RunningService, amqp: AbstractConnection
) -> None:
    channel = await amqp.channel()
    _, dead = _names(env)
    exchange = await channel.get_exchange(env.topology.webhooks)
    await exchange.publish(
        aio_pika.Message(
            _body(1, event_type="appointment.created", clinic="clinic-a"),
            message_id="invalid-1",
        ),
        routing_key="appointment.created",
    )
    await exchange.publish(
        aio_pika.Message(b"\x00 not json", message_id="malformed-1"),
        routing_key="patient.updated",
    )
    await _wait_count(channel, dead, 2)
    # The broker's own dead-lettering needs the work queue to itself.
    await upsert.shutdown()
    await _broker_dead_letter(env, channel, "rejected-1", "rejected")
    await _broker_dead_letter(env, channel, "limit-1", "delivery_limit")

    listed = await _list(env)
    assert listed["count"] == 4
    by_id = {item["messageId"]: item for item in listed["messages"]}
    assert set(by_id) == {"invalid-1", "malformed-1", "rejected-1", "limit-1"}

    invalid = by_id["invalid-1"]
    assert invalid["reason"] == "invalid_message"
    assert invalid["type"] == "appointment.created"
    assert invalid["clinicId"] == "clinic-a"
    assert invalid["deathCount"] == 1
    assert invalid["firstDeathAt"] is not None
    assert invalid["exchange"] == env.topology.webhooks
    assert invalid["routingKey"] == "appointment.created"

    assert by_id["malformed-1"]["reason"] == "malformed"
    assert by_id["malformed-1"]["type"] is None

    for message_id, reason in (
        ("rejected-1", "rejected"),
        ("limit-1", "delivery_limit"),
    ):
        item = by_id[message_id]
        assert item["reason"] == reason
        assert item["deathCount"] == 1
        assert item["firstDeathAt"] is not None
        assert item["exchange"] == env.topology.webhooks
        assert item["routingKey"] == "client.updated"
        assert item["clinicId"] == "clinic-b"

    text = await dlq(env, "list", "--queue", QUEUE)
    assert text.code == 0
    assert "delivery_limit" in text.stdout
    assert "4 messages" in text.stdout


async def test_list_and_show_leave_queue_as_it_was(
    env: Env, amqp: AbstractConnection
) -> None:
    channel = await amqp.channel()
    _, dead = _names(env)
    ids = await _seed(env, channel, 20)

    first = [item["messageId"] for item in (await _list(env))["messages"]]
    assert first == ids
    found = await dlq(env, "show", "--queue", QUEUE, "m7", "--json")
    data = found.json()
    assert data["messageId"] == "m7"
    assert data["headers"]["x-trace-id"] == "trace-7"
    assert data["body"]["type"] == "appointment.created"
    assert data["reason"] == "invalid_message"
    by_flag = await dlq(env, "show", "--queue", QUEUE, "--message-id", "m19")
    assert by_flag.code == 0
    assert "trace-19" in by_flag.stdout

    second = [item["messageId"] for item in (await _list(env))["messages"]]
    assert second == ids
    assert await _count(channel, dead) == 20
    taken = await _take_all(channel, dead)
    assert [message.message_id for message in taken] == ids


async def test_list_limit(env: Env, amqp: AbstractConnection) -> None:
    channel = await amqp.channel()
    await _seed(env, channel, 5)
    result = await dlq(env, "list", "--queue", QUEUE, "--limit", "2")
    assert result.code == 0
    assert "5 messages" in result.stdout
    assert "first 2 shown" in result.stdout
    limited = (
        await dlq(env, "list", "--queue", QUEUE, "--limit", "2", "--json")
    ).json()
    assert limited["count"] == 5
    assert len(limited["messages"]) == 2


async def test_show_unknown_id_exits_2(env: Env, amqp: AbstractConnection) -> None:
    channel = await amqp.channel()
    _, dead = _names(env)
    await _seed(env, channel, 3)
    result = await dlq(env, "show", "--queue", QUEUE, "m99")
    assert result.code == 2
    assert "coggo-dlq: error: no message with id 'm99'" in result.stderr
    assert f"--queue {QUEUE}`" in result.stderr
    assert await _count(channel, dead) == 3


# replay


async def test_replay_one_keeps_id_and_headers(
    env: Env, amqp: AbstractConnection
) -> None:
    channel = await amqp.channel()
    work, dead = _names(env)
    await _seed(env, channel, 5)

    result = await dlq(env, "replay", "--queue", QUEUE, "--message-id", "m3", "--json")
    data = result.json()
    assert data["replayed"] == 1
    assert data["failed"] == []

    assert await _count(channel, dead) == 4
    replayed = await _take_all(channel, work)
    assert len(replayed) == 1
    copy = replayed[0]
    assert copy.message_id == "m3"
    assert copy.body == _body(3, event_type="appointment.created", clinic="clinic-0")
    assert copy.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert copy.content_type == "application/json"
    headers = copy.headers
    assert headers["x-trace-id"] == "trace-3"
    assert headers["x-coggo-reason"] == "invalid_message"
    assert headers["x-coggo-original-routing-key"] == "appointment.created"
    assert headers[REPLAY_COUNT_HEADER] == 1
    remaining = [item["messageId"] for item in (await _list(env))["messages"]]
    assert remaining == ["m0", "m1", "m2", "m4"]


async def test_replay_count_grows_with_each_replay(
    env: Env, upsert: RunningService, amqp: AbstractConnection
) -> None:
    channel = await amqp.channel()
    _, dead = _names(env)
    exchange = await channel.get_exchange(env.topology.webhooks)
    await exchange.publish(
        aio_pika.Message(
            _body(1, event_type="appointment.created", clinic="clinic-a"),
            message_id="again-1",
        ),
        routing_key="appointment.created",
    )
    await _wait_count(channel, dead, 1)

    for replays in (1, 2):
        result = await dlq(env, "replay", "--queue", QUEUE, "--all")
        assert result.code == 0, result.stderr
        # The consumer dead-letters the copy again: it is still invalid.
        await _wait_count(channel, dead, 1)
        item = (await _list(env))["messages"][0]
        assert item["messageId"] == "again-1"
        assert item["replayCount"] == replays
        assert item["deathCount"] == replays + 1
        assert item["reason"] == "invalid_message"


async def test_reason_follows_the_newest_death(
    env: Env, upsert: RunningService, amqp: AbstractConnection
) -> None:
    channel = await amqp.channel()
    work, dead = _names(env)
    exchange = await channel.get_exchange(env.topology.webhooks)
    await exchange.publish(
        aio_pika.Message(
            _body(1, event_type="appointment.created", clinic="clinic-a"),
            message_id="twice-1",
        ),
        routing_key="appointment.created",
    )
    await _wait_count(channel, dead, 1)
    assert (await _list(env))["messages"][0]["reason"] == "invalid_message"
    await upsert.shutdown()

    # Replayed, then rejected by another consumer: the broker's reason is current.
    result = await dlq(env, "replay", "--queue", QUEUE, "--all")
    assert result.code == 0, result.stderr
    queue = await channel.get_queue(work)
    message = await wait_until(lambda: queue.get(no_ack=False, fail=False))
    await message.reject(requeue=False)
    await _wait_count(channel, dead, 1)
    item = (await _list(env))["messages"][0]
    assert item["reason"] == "rejected"
    assert item["replayCount"] == 1
    assert item["deathCount"] == 2


async def test_broker_dead_letters_return_to_their_exchange(
    env: Env, amqp: AbstractConnection
) -> None:
    channel = await amqp.channel()
    work, dead = _names(env)
    await _broker_dead_letter(env, channel, "rejected-1", "rejected")
    await _broker_dead_letter(env, channel, "limit-1", "delivery_limit")
    # Reads of the dead-letter queue count deliveries there; the copy must not
    # carry that count into the work queue.
    await _list(env)
    await _list(env)

    result = await dlq(
        env, "replay", "--queue", QUEUE, "--reason", "delivery_limit", "--json"
    )
    assert result.json()["replayed"] == 1
    copies = await _take_all(channel, work)
    assert [copy.message_id for copy in copies] == ["limit-1"]
    assert copies[0].headers[REPLAY_COUNT_HEADER] == 1
    assert copies[0].headers["x-trace-id"] == "broker"
    assert copies[0].headers.get("x-delivery-count", 0) == 0
    assert [item["messageId"] for item in (await _list(env))["messages"]] == [
        "rejected-1"
    ]
    assert await _count(channel, dead) == 1


async def test_replay_filters_by_type_and_clinic(
    env: Env, amqp: AbstractConnection
) -> None:
    channel = await amqp.channel()
    work, _ = _names(env)
    await _seed(env, channel, 12)

    result = await dlq(
        env,
        "replay",
        "--queue",
        QUEUE,
        "--type",
        "appointment.created",
        "--clinic-id",
        "clinic-1",
        "--json",
    )
    data = result.json()
    # Odd indexes are appointment.created; index % 3 == 1 is clinic-1.
    assert sorted(item["messageId"] for item in data["messages"]) == ["m1", "m7"]
    assert data["replayed"] == 2
    assert sorted(str(copy.message_id) for copy in await _take_all(channel, work)) == [
        "m1",
        "m7",
    ]
    remaining = [item["messageId"] for item in (await _list(env))["messages"]]
    assert remaining == [f"m{i}" for i in range(12) if i not in (1, 7)]

    limited = await dlq(
        env, "replay", "--queue", QUEUE, "--all", "--limit", "3", "--json"
    )
    assert limited.json()["replayed"] == 3
    assert len(await _take_all(channel, work)) == 3


async def test_dry_run_changes_nothing(env: Env, amqp: AbstractConnection) -> None:
    channel = await amqp.channel()
    work, dead = _names(env)
    ids = await _seed(env, channel, 6)

    replay = await dlq(env, "replay", "--queue", QUEUE, "--all", "--dry-run", "--json")
    assert replay.json()["selected"] == 6
    assert replay.json()["replayed"] == 0
    assert replay.json()["dryRun"] is True
    purge = await dlq(
        env, "purge", "--queue", QUEUE, "--reason", "invalid_message", "--dry-run"
    )
    assert purge.code == 0
    assert "would be purged" in purge.stdout

    assert await _count(channel, work) == 0
    assert [item["messageId"] for item in (await _list(env))["messages"]] == ids
    assert await _count(channel, dead) == 6


async def test_purge_filtered_then_all(env: Env, amqp: AbstractConnection) -> None:
    channel = await amqp.channel()
    work, dead = _names(env)
    await _seed(env, channel, 6)

    result = await dlq(
        env, "purge", "--queue", QUEUE, "--type", "patient.updated", "--json"
    )
    assert result.json()["purged"] == 3
    assert [item["messageId"] for item in (await _list(env))["messages"]] == [
        "m1",
        "m3",
        "m5",
    ]
    everything = await dlq(env, "purge", "--queue", QUEUE, "--all", "--json")
    assert everything.json()["purged"] == 3
    assert await _count(channel, dead) == 0
    assert await _count(channel, work) == 0


async def test_unroutable_replay_stays_in_queue(
    env: Env, amqp: AbstractConnection
) -> None:
    channel = await amqp.channel()
    work, dead = _names(env)
    await _seed(env, channel, 1, routing_key="no.queue.bound")
    await _seed(env, channel, 1, start=1, exchange="test-missing.coggo.webhooks")
    await _seed(env, channel, 1, start=2)

    result = await dlq(env, "replay", "--queue", QUEUE, "--all", "--json")
    data = result.json(code=1)
    assert data["replayed"] == 1
    errors = {item["messageId"]: item["error"] for item in data["failed"]}
    assert "unroutable" in errors["m0"]
    assert "does not exist" in errors["m1"]
    assert [copy.message_id for copy in await _take_all(channel, work)] == ["m2"]
    assert [item["messageId"] for item in (await _list(env))["messages"]] == [
        "m0",
        "m1",
    ]
    assert await _count(channel, dead) == 2


async def test_kill_during_replay_loses_nothing(
    env: Env, amqp: AbstractConnection
) -> None:
    channel = await amqp.channel(publisher_confirms=False)
    work, dead = _names(env)
    total = 3000
    ids: list[str] = []
    for start in range(0, total, 500):
        ids += await _seed(env, channel, 500, start=start)
    await _wait_count(channel, dead, total)

    process = subprocess.Popen(  # noqa: S603, ASYNC220
        [script("coggo-dlq"), "replay", "--queue", QUEUE, "--all", "--rate", "1500"],
        env=settings_environment(env.settings),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        async def replay_under_way() -> bool:
            return await _count(channel, work) >= 300

        await wait_until(replay_under_way, timeout=30, interval=0.01)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait(10)
    assert process.returncode == -signal.SIGKILL

    # The broker returns the killed client's unacknowledged messages on its own.
    async def settled() -> bool:
        counts = (await _count(channel, work), await _count(channel, dead))
        await asyncio.sleep(0.3)
        return counts == (await _count(channel, work), await _count(channel, dead))

    await wait_until(settled, timeout=15)
    in_work = {message.message_id for message in await _take_all(channel, work)}
    in_dead = {message.message_id for message in await _take_all(channel, dead)}

    assert in_work, "the replay was killed before it moved anything"
    assert in_dead, "the replay finished before it was killed"
    lost = set(ids) - in_work - in_dead
    assert lost == set()
