"""coggo-dlq: list, show, replay and purge dead-lettered messages.

Run as `coggo-dlq` or `python -m coggo_dlq`. Reads COGGO_AMQP_URL and
COGGO_TOPOLOGY_PREFIX. Exit status: 0 done, 1 some messages failed or the
message was not found, 2 invalid command line or unreachable broker.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable
from typing import Any

import aio_pika
from coggo.logs import configure_logging
from coggo.settings import get_settings
from coggo.topology import QueueSpec, Topology

from coggo_dlq.letters import DeadLetter, describe_body, plain_headers
from coggo_dlq.queue import DeadLetterQueue, DeadLetterQueueMissing, Outcome

WORK_QUEUES = ("coggo.patient-upsert", "coggo.reconciliation", "coggo.soap-push")


class CliError(Exception):
    """An operator error, printed as one line without a traceback."""


def emit(args: argparse.Namespace, data: dict[str, Any], lines: list[str]) -> None:
    if args.json:
        print(json.dumps(data, ensure_ascii=False, default=str))
    else:
        print("\n".join(lines))


def queue_spec(args: argparse.Namespace, topology: Topology) -> QueueSpec:
    base = args.queue.removesuffix(".dlq")
    if base not in WORK_QUEUES:
        raise CliError(
            f"unknown queue {args.queue!r}: choose one of {', '.join(WORK_QUEUES)} "
            "(the dead letters are in <queue>.dlq)"
        )
    return topology.queue(base)


def selector(args: argparse.Namespace) -> Callable[[DeadLetter], bool]:
    filters = {
        "message_id": getattr(args, "message_id", None),
        "event_type": getattr(args, "type", None),
        "clinic_id": getattr(args, "clinic_id", None),
        "reason": getattr(args, "reason", None),
    }
    if not getattr(args, "all", False) and all(v is None for v in filters.values()):
        raise CliError(
            "choose the messages: --message-id ID, any of --type, --clinic-id and "
            "--reason, or --all"
        )

    def select(letter: DeadLetter) -> bool:
        return letter.matches(**filters)

    return select


def _row(letter: dict[str, Any]) -> str:
    return (
        f"{letter['messageId'] or '-':<38} {letter['type'] or '-':<22} "
        f"{letter['clinicId'] or '-':<16} {letter['reason']:<16} "
        f"{letter['deathCount']:>6} {letter['firstDeathAt'] or '-':<26} "
        f"{letter['replayCount']:>7}"
    )


HEADER_ROW = (
    f"{'MESSAGE ID':<38} {'TYPE':<22} {'CLINIC':<16} {'REASON':<16} "
    f"{'DEATHS':>6} {'FIRST DEATH':<26} {'REPLAYS':>7}"
)


async def run_list(args: argparse.Namespace, dlq: DeadLetterQueue) -> int:
    total = await dlq.count()
    letters: list[dict[str, Any]] = []
    async with dlq.reading(limit=args.limit) as reading:
        async for letter in reading:
            letters.append(letter.summary())
    lines = [f"{dlq.name}: {total} messages", HEADER_ROW, *map(_row, letters)]
    if len(letters) < total:
        lines.append(f"(first {len(letters)} shown; raise --limit to see more)")
    emit(
        args,
        {
            "queue": dlq.spec.name,
            "deadLetterQueue": dlq.name,
            "count": total,
            "messages": letters,
        },
        lines if total else [f"{dlq.name}: no messages"],
    )
    return 0


async def run_show(args: argparse.Namespace, dlq: DeadLetterQueue) -> int:
    message_id = args.message_id or args.id
    if not message_id:
        raise CliError("give the message id: coggo-dlq show --queue QUEUE ID")
    letter = await dlq.find(message_id)
    if letter is None:
        raise CliError(
            f"no message with id {message_id!r} in {dlq.name}: list the ids with "
            f"`coggo-dlq list --queue {args.queue}`"
        )
    message = letter.message
    data = {
        **letter.summary(),
        "properties": {
            "contentType": message.content_type,
            "correlationId": message.correlation_id,
            "replyTo": message.reply_to,
            "timestamp": None
            if message.timestamp is None
            else message.timestamp.isoformat(),
            "deliveryMode": int(message.delivery_mode),
        },
        "headers": plain_headers(dict(message.headers or {})),
        "body": describe_body(message.body),
    }
    lines = [
        f"{name + ':':<14} {'-' if value is None else value}"
        for name, value in letter.summary().items()
    ]
    lines += ["headers:"] + [
        f"  {name}: {value}" for name, value in data["headers"].items()
    ]
    lines += ["body:", json.dumps(data["body"], indent=2, ensure_ascii=False)]
    emit(args, data, lines)
    return 0


def _report(
    args: argparse.Namespace, dlq: DeadLetterQueue, outcome: Outcome, verb: str
) -> int:
    done_ids = {id(letter) for letter in outcome.done}
    data = {
        "queue": dlq.spec.name,
        "deadLetterQueue": dlq.name,
        "dryRun": args.dry_run,
        "scanned": outcome.scanned,
        "selected": len(outcome.selected),
        verb: len(outcome.done),
        "failed": [
            {"messageId": letter.message_id, "error": error}
            for letter, error in outcome.failed
        ],
        "messages": [
            {
                **letter.summary(),
                "done": id(letter) in done_ids,
            }
            for letter in outcome.selected
        ],
    }
    if args.dry_run:
        lines = [
            f"dry run: {len(outcome.selected)} of {outcome.scanned} messages in "
            f"{dlq.name} would be {verb}; nothing changed"
        ]
        lines += [
            f"  {letter.message_id}  {letter.reason}  -> "
            f"{letter.exchange} {letter.routing_key}"
            for letter in outcome.selected
        ]
    else:
        lines = [f"{len(outcome.done)} of {len(outcome.selected)} messages {verb}"]
        lines += [
            f"  failed {letter.message_id}: {error}" for letter, error in outcome.failed
        ]
        if outcome.failed:
            lines.append("Failed messages stay in the dead-letter queue.")
    emit(args, data, lines)
    return 1 if outcome.failed else 0


async def run_replay(args: argparse.Namespace, dlq: DeadLetterQueue) -> int:
    outcome = await dlq.replay(
        selector(args), dry_run=args.dry_run, limit=args.limit, rate=args.rate
    )
    return _report(args, dlq, outcome, "replayed")


async def run_purge(args: argparse.Namespace, dlq: DeadLetterQueue) -> int:
    outcome = await dlq.purge(selector(args), dry_run=args.dry_run, limit=args.limit)
    return _report(args, dlq, outcome, "purged")


async def run(args: argparse.Namespace) -> int:
    settings = get_settings()
    topology = Topology(settings.topology_prefix)
    spec = queue_spec(args, topology)
    if args.command in ("replay", "purge"):
        selector(args)
    try:
        connection = await aio_pika.connect(
            settings.amqp_url, client_properties={"connection_name": "coggo-dlq"}
        )
    except (OSError, aio_pika.exceptions.AMQPError) as exc:
        raise CliError(
            f"cannot connect to RabbitMQ ({type(exc).__name__}): check "
            "COGGO_AMQP_URL and that the broker is running"
        ) from None
    try:
        dlq = DeadLetterQueue(connection, spec)
        handler = COMMANDS[args.command]
        return await handler(args, dlq)
    except DeadLetterQueueMissing as exc:
        raise CliError(str(exc)) from None
    finally:
        await connection.close()


COMMANDS = {
    "list": run_list,
    "show": run_show,
    "replay": run_replay,
    "purge": run_purge,
}


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, not {text}")
    return value


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--queue",
        required=True,
        metavar="QUEUE",
        help=f"work queue whose dead letters to act on: {', '.join(WORK_QUEUES)}",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS,
        help="print the result as one JSON object",
    )


def _filters(parser: argparse.ArgumentParser, verb: str, participle: str) -> None:
    parser.add_argument("--message-id", help=f"{verb} the message with this id")
    parser.add_argument(
        "--type", help=f"{verb} messages of this type, e.g. appointment.created"
    )
    parser.add_argument(
        "--clinic-id",
        "--clinic",
        dest="clinic_id",
        help=f"{verb} messages of this clinic",
    )
    parser.add_argument(
        "--reason",
        help=f"{verb} messages dead-lettered for this reason, e.g. invalid_message, "
        "delivery_limit, rejected",
    )
    parser.add_argument("--all", action="store_true", help=f"{verb} every message")
    parser.add_argument(
        "--limit", type=_positive_int, help=f"{verb} at most this many messages"
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help=f"print what would be {participle} and change nothing",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="coggo-dlq",
        description=(
            "List, show, replay and purge the dead letters of a work queue "
            "(they are kept in <queue>.dlq). Reads COGGO_AMQP_URL and "
            "COGGO_TOPOLOGY_PREFIX. A message is removed from the dead-letter "
            "queue only after the broker confirmed its replayed copy."
        ),
    )
    parser.add_argument(
        "--json", action="store_true", help="print results as one JSON object"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    listing = commands.add_parser(
        "list",
        help="list dead letters with type, clinic, reason, death count and first death",
        description="List dead letters. Messages are read without acknowledgement "
        "and returned in their order, so listing changes nothing.",
    )
    listing.add_argument(
        "--limit",
        type=_positive_int,
        default=1000,
        help="list at most this many messages (default: 1000)",
    )

    show = commands.add_parser(
        "show",
        help="show one dead letter with its headers and body",
        description="Show one dead letter, found by message id, with its "
        "properties, headers and body. The message stays in the queue.",
    )
    show.add_argument("id", nargs="?", help="the message id")
    show.add_argument("--message-id", help="the message id (same as ID)")

    replay = commands.add_parser(
        "replay",
        help="publish dead letters back to the exchange and routing key they came from",
        description="Replay chosen dead letters to the exchange and routing key "
        "each came from, with its message id and headers and "
        "x-coggo-replay-count one higher. Each is acknowledged out of the "
        "dead-letter queue only after the broker confirmed its copy.",
    )
    _filters(replay, "replay", "replayed")
    replay.add_argument(
        "--rate",
        type=_positive_float,
        help="replay at most this many messages per second (default: no limit)",
    )

    purge = commands.add_parser(
        "purge",
        help="delete dead letters",
        description="Delete chosen dead letters for good.",
    )
    _filters(purge, "purge", "purged")

    for command in (listing, show, replay, purge):
        _common(command)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    configure_logging("coggo-dlq", level="warning")
    try:
        code = asyncio.run(run(args))
    except CliError as exc:
        print(f"coggo-dlq: error: {exc}", file=sys.stderr)
        code = 2
    sys.exit(code)


if __name__ == "__main__":
    main()
