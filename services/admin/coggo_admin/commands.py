"""coggo-admin reconcile and species refresh: commands for the reconciliation worker.

Each verb publishes its command to `coggo.commands`, persistent, mandatory and
with publisher confirms, so a command that returns without error is queued.
With `--wait`, a temporary exclusive queue is bound to `coggo.events` before
the command is published, and the verb prints the `reconcile.completed` or
`species.refreshed` event whose `commandId` is the command's id.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

import aio_pika
import aiormq
from coggo.schemas.bus import (
    BusMessage,
    ReconcileAppointments,
    ReconcileAppointmentsData,
    SpeciesRefresh,
)
from coggo.settings import get_settings
from coggo.topology import Topology

from coggo_admin.common import (
    AdminError,
    add_clinic_argument,
    add_json_flag,
    database,
    emit,
    find_integration,
)

DEFAULT_TIMEOUT_SECONDS = 120.0
CONNECT_TIMEOUT_SECONDS = 10.0
PUBLISH_TIMEOUT_SECONDS = 10.0
MIN_DAYS = 1
MAX_DAYS = 30


def _days(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not MIN_DAYS <= value <= MAX_DAYS:
        raise argparse.ArgumentTypeError(
            f"must be from {MIN_DAYS} to {MAX_DAYS} days, got {value}"
        )
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(
            f"must be more than 0 and at most 3600 seconds, got {text}"
        )
    return value


async def check_integration(clinic_id: str) -> None:
    """Raise AdminError unless the clinic has an active integration with a base URL."""
    async with database() as connection:
        row = await find_integration(connection, clinic_id)
    if row["status"] == "paused":
        raise AdminError(
            f"the integration of clinic {clinic_id!r} is paused: resume it with "
            "`coggo-admin integration resume` first"
        )
    if not row["plan_enabled"]:
        raise AdminError(
            f"the plan of clinic {clinic_id!r} excludes the Partner API: enable "
            "it with `coggo-admin integration plan` first"
        )
    if not (row["pims_base_url"] or "").strip():
        raise AdminError(
            f"the integration of clinic {clinic_id!r} has no PIMS base URL: set "
            "it with `coggo-admin integration set --pims-base-url`, then send "
            "the command again"
        )


async def send_command(
    command: BusMessage, *, result_type: str | None, timeout: float
) -> dict[str, Any] | None:
    """Publish `command`; with `result_type`, wait for its result event and return it."""
    settings = get_settings()
    topology = Topology(settings.topology_prefix)
    try:
        connection = await aio_pika.connect(
            settings.amqp_url, timeout=CONNECT_TIMEOUT_SECONDS
        )
    except (OSError, aio_pika.exceptions.AMQPError, TimeoutError) as exc:
        raise AdminError(
            f"cannot connect to RabbitMQ ({type(exc).__name__}): check "
            "COGGO_AMQP_URL and that the server is running"
        ) from None

    async with connection:
        channel = await connection.channel(
            publisher_confirms=True, on_return_raises=True
        )
        results = None
        if result_type is not None:
            results = await _bind_results(channel, topology, result_type)
        await _publish(channel, topology, command)
        if results is None:
            return None
        return await _wait_for_result(results, command.id, timeout)


async def _bind_results(
    channel: aio_pika.abc.AbstractChannel, topology: Topology, result_type: str
) -> aio_pika.abc.AbstractQueue:
    # Bound before the command is published, so the result cannot be missed.
    queue = await channel.declare_queue(exclusive=True, auto_delete=True)
    try:
        await queue.bind(topology.events, routing_key=result_type)
    except aiormq.exceptions.ChannelNotFoundEntity:
        raise AdminError(
            f"exchange {topology.events} does not exist: start "
            "coggo-reconciliation once so that it declares the topology"
        ) from None
    return queue


async def _publish(
    channel: aio_pika.abc.AbstractChannel, topology: Topology, command: BusMessage
) -> None:
    exchange = await channel.get_exchange(topology.commands, ensure=False)
    message = aio_pika.Message(
        command.to_bytes(),
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=command.id,
    )
    try:
        await exchange.publish(
            message,
            routing_key=command.type,
            mandatory=True,
            timeout=PUBLISH_TIMEOUT_SECONDS,
        )
    except aio_pika.exceptions.DeliveryError:
        raise AdminError(
            f"no queue receives {command.type} on {topology.commands}: start "
            "coggo-reconciliation once so that it declares its queue, then send "
            "the command again"
        ) from None
    except aiormq.exceptions.ChannelNotFoundEntity:
        raise AdminError(
            f"exchange {topology.commands} does not exist: start "
            "coggo-reconciliation once so that it declares the topology"
        ) from None
    except TimeoutError:
        raise AdminError(
            f"RabbitMQ did not confirm the command within {PUBLISH_TIMEOUT_SECONDS} "
            "s: check the broker's health, then send the command again"
        ) from None


async def _wait_for_result(
    queue: aio_pika.abc.AbstractQueue, command_id: str, timeout: float
) -> dict[str, Any]:
    try:
        async with asyncio.timeout(timeout):
            async with queue.iterator() as messages:
                async for message in messages:
                    await message.ack()
                    event = _decode(message.body)
                    if event is not None and _is_result_of(event, command_id):
                        return event
    except TimeoutError:
        pass
    raise AdminError(
        f"no result for command {command_id} within {timeout:g} s; it stays "
        "queued: check that coggo-reconciliation is running, or wait longer "
        "with --timeout"
    )


def _is_result_of(event: dict[str, Any], command_id: str) -> bool:
    data = event.get("data")
    return isinstance(data, dict) and data.get("commandId") == command_id


def _decode(body: bytes) -> dict[str, Any] | None:
    try:
        decoded = json.loads(body)
    except ValueError:
        return None
    return decoded if isinstance(decoded, dict) else None


def _result_lines(kind: str, event: dict[str, Any]) -> list[str]:
    data = event["data"]
    seconds = (data.get("durationMs") or 0) / 1000
    lines = [
        f"{kind} {data.get('runId')} for clinic {event.get('clinicId')}: "
        f"{data.get('status')} in {seconds:.1f} s"
    ]
    if data.get("error"):
        lines.append(f"error: {data['error']}: {data.get('detail')}")
    if data.get("status") in ("rejected", "skipped"):
        return lines

    if kind == "reconciliation":
        lines.append(
            f"fetched {data.get('fetched')}, processed {data.get('processed')}, "
            f"skipped {data.get('skipped')}, truncated {data.get('truncated')} "
            f"(next {data.get('days')} days)"
        )
    else:
        lines.append(
            f"fetched {data.get('fetched')}, mapped {data.get('mapped')} "
            f"({data.get('manual')} by hand), unmapped {data.get('unmapped')}, "
            f"patients resolved {data.get('patientsResolved')}"
        )
        if data.get("unmappedKeys"):
            keys = ", ".join(str(key) for key in data["unmappedKeys"])
            lines.append(f"unmapped keys: {keys}")
    for item in data.get("skippedItems") or []:
        lines.append(
            f"skipped item {item.get('index')} ({item.get('externalId')}): "
            f"{item.get('reason')}: {item.get('detail')}"
        )
    return lines


def _exit_code(event: dict[str, Any]) -> int:
    """Return 0 when the run succeeded or another run was already active, else 1."""
    return 0 if event["data"].get("status") in ("succeeded", "skipped") else 1


async def _send_and_report(
    args: argparse.Namespace, command: BusMessage, kind: str, result_type: str
) -> int:
    await check_integration(command.clinic_id)
    event = await send_command(
        command, result_type=result_type if args.wait else None, timeout=args.timeout
    )
    if event is None:
        emit(
            args,
            {
                "commandId": command.id,
                "type": command.type,
                "clinicId": command.clinic_id,
            },
            [
                f"sent {command.type} {command.id} for clinic {command.clinic_id}",
                f"its result is the {result_type} event with this commandId; "
                "use --wait to print it",
            ],
        )
        return 0
    emit(args, event, _result_lines(kind, event))
    return _exit_code(event)


async def reconcile(args: argparse.Namespace) -> int:
    command = ReconcileAppointments(
        clinic_id=args.clinic_id, data=ReconcileAppointmentsData(days=args.days)
    )
    return await _send_and_report(
        args, command, "reconciliation", "reconcile.completed"
    )


async def species_refresh(args: argparse.Namespace) -> int:
    command = SpeciesRefresh(clinic_id=args.clinic_id)
    return await _send_and_report(args, command, "species refresh", "species.refreshed")


def _add_wait_options(parser: argparse.ArgumentParser, result_type: str) -> None:
    add_clinic_argument(parser)
    parser.add_argument(
        "--wait",
        action="store_true",
        help=f"wait for the {result_type} event and print it; exit 1 if the run "
        "failed or was rejected",
    )
    parser.add_argument(
        "--timeout",
        type=_seconds,
        default=DEFAULT_TIMEOUT_SECONDS,
        metavar="SECONDS",
        help=f"with --wait, seconds to wait for the result (default: "
        f"{DEFAULT_TIMEOUT_SECONDS:g})",
    )
    add_json_flag(parser)


def _subcommands(parser: argparse.ArgumentParser) -> Any:
    """Return the sub-command action of a group that another module registered."""
    # argparse has no public way to reach it; _actions is stable since 3.2.
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    raise RuntimeError("the species group has no verbs to add refresh to")


def register(groups: Any) -> None:
    reconcile_parser = groups.add_parser(
        "reconcile",
        help="fetch a clinic's upcoming appointments from its PIMS and apply them",
        description=(
            "Send reconcile.appointments to the reconciliation worker: it fetches "
            "the appointments of the next DAYS days from the clinic's PIMS and "
            "applies up to 100 of them, nearest first, through the upsert pipeline."
        ),
    )
    reconcile_parser.add_argument(
        "--days",
        type=_days,
        default=7,
        help=f"days ahead to reconcile, {MIN_DAYS} to {MAX_DAYS} (default: 7)",
    )
    _add_wait_options(reconcile_parser, "reconcile.completed")
    reconcile_parser.set_defaults(run=reconcile)

    # Another module may own the species group (list, map); refresh joins it.
    species = groups.choices.get("species")
    if species is None:
        species = groups.add_parser("species", help="the clinic's PIMS species map")
        verbs = species.add_subparsers(dest="verb", required=True, metavar="VERB")
    else:
        verbs = _subcommands(species)
    refresh = verbs.add_parser(
        "refresh",
        help="fetch the clinic's species catalog from its PIMS and map it",
        description=(
            "Send species.refresh to the reconciliation worker: it fetches the "
            "clinic's species catalog, maps labels that name a Coggo species, "
            "keeps manual mappings and resolves patients waiting on a mapping."
        ),
    )
    _add_wait_options(refresh, "species.refreshed")
    refresh.set_defaults(run=species_refresh)
