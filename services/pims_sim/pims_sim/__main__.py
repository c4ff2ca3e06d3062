"""Command line of the reference PIMS: `coggo-pims-sim` or `python -m pims_sim`."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable, Sequence
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import structlog
from aiohttp import web
from coggo.logs import configure_logging
from coggo.service import run_service
from coggo.settings import Settings
from coggo.validation import describe_validation_error
from pydantic import ValidationError

from pims_sim.app import build_app
from pims_sim.clinic import EXAMPLE_EVENT_ID
from pims_sim.faults import FaultSpec, parse_fault_option
from pims_sim.sender import DEFAULT_TIMEOUT_SECONDS, build_events, send_events
from pims_sim.state import SimConfig, SimState

log = structlog.get_logger(__name__)

PROG = "coggo-pims-sim"
SECRET_ENV = "COGGO_PIMS_SIM_SECRET"  # noqa: S105 (a variable name)
API_KEY_ENV = "COGGO_PIMS_SIM_API_KEY"
MAX_APPOINTMENTS = 1000
MAX_CLIENTS = 10_000
# Requests still running at shutdown get this long to finish.
SHUTDOWN_TIMEOUT_SECONDS = 5.0


async def serve(state: SimState, host: str, port: int, stop: asyncio.Event) -> None:
    runner = web.AppRunner(
        build_app(state), access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_SECONDS
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound_port = runner.addresses[0][1] if runner.addresses else port
    log.info(
        "pims_sim.listening",
        host=host,
        port=bound_port,
        base_path=state.config.normalized_base_path() or "/",
        seed=state.config.seed,
        appointments=len(state.clinic.appointments),
        patients=len(state.clinic.patients),
    )

    await stop.wait()
    log.info("pims_sim.stopping")
    await runner.cleanup()


def _count(maximum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not 0 <= value <= maximum:
            raise argparse.ArgumentTypeError(
                f"must be from 0 to {maximum}, got {value}"
            )
        return value

    return parse


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be from 0 to 65535, got {value}")
    return value


def _timezone(text: str) -> str:
    try:
        ZoneInfo(text)
    except (ZoneInfoNotFoundError, ValueError):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an IANA timezone, e.g. America/New_York"
        ) from None
    return text


def _fault(text: str) -> FaultSpec:
    try:
        return parse_fault_option(text)
    except ValidationError as exc:
        raise argparse.ArgumentTypeError(
            f"invalid fault {text!r}: {describe_validation_error(exc)}"
        ) from None
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number of seconds"
        ) from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"must be from 0 to 3600 seconds, got {text}")
    return value


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--seed",
        type=int,
        default=1,
        help="seed of the generated clinic records; one seed always gives the same "
        "records for one start date (integer, default: 1)",
    )
    parser.add_argument(
        "--clients",
        type=_count(MAX_CLIENTS),
        default=30,
        help="number of generated clients (owners), each with 1 to 4 patients, "
        "besides the fixed example records (count, default: 30)",
    )
    parser.add_argument(
        "--timezone",
        type=_timezone,
        default="America/New_York",
        help="IANA timezone of the clinic, used for appointment times "
        "(default: America/New_York)",
    )


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Reference PIMS for the Coggo Partner API: serves the PIMS-hosted "
        "endpoints and sends signed webhook events to the Coggo ingress.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve_parser = commands.add_parser(
        "serve",
        help="serve GET /species, /patients, /appointments and POST /push",
        description="Serve the PIMS-hosted endpoints of the Partner API, plus "
        "inspection and fault control under /_sim (health, data, pushes, faults, "
        "calls). Log level and format come from COGGO_LOG_LEVEL and COGGO_LOG_FORMAT.",
    )
    serve_parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)"
    )
    serve_parser.add_argument(
        "--port",
        type=_port,
        default=8090,
        help="TCP port to listen on; 0 picks a free port (default: 8090)",
    )
    serve_parser.add_argument(
        "--secret",
        default=os.environ.get(SECRET_ENV),
        help="shared signing secret that verifies X-Coggo-Signature on POST /push, "
        f"as UTF-8 text (default: the {SECRET_ENV} environment variable)",
    )
    serve_parser.add_argument(
        "--appointments",
        type=_count(MAX_APPOINTMENTS),
        default=20,
        help="number of appointments, spread over the next 30 days in the clinic's "
        "timezone (count, default: 20)",
    )
    _add_data_options(serve_parser)
    serve_parser.add_argument(
        "--base-path",
        default="",
        help="URL path prefix of the PIMS-hosted endpoints, e.g. /pims; /_sim stays "
        "at the root (default: none, so the endpoints are at the root)",
    )
    serve_parser.add_argument(
        "--token",
        default=None,
        help="when set, GET /species, /patients and /appointments require "
        "Authorization: Bearer TOKEN (default: no credentials required)",
    )
    serve_parser.add_argument(
        "--fault",
        type=_fault,
        action="append",
        default=[],
        metavar="ENDPOINT:KEY=VALUE[,KEY=VALUE...]",
        help="fault to inject from the start, repeatable. ENDPOINT is species, "
        "patients, appointments or push. Keys: status (HTTP status), times (count of "
        "calls, default: every call), delay (seconds), timeout (true: hold the request "
        "open until the client disconnects), malformed (true, json or shape), "
        "retry_after (seconds, sent as Retry-After), location (URL, with a 3xx "
        "status). Example: push:status=429,retry_after=2,times=3",
    )

    send_parser = commands.add_parser(
        "send",
        help="send signed appointment.created events to the Coggo ingress",
        description="POST signed appointment.created events to "
        "{ingress-url}/v1/partner/webhooks and print one line per event: event id, "
        "HTTP status and response body. Exits with status 1 when any event was "
        "not accepted with a 2xx response.",
    )
    send_parser.add_argument(
        "--ingress-url",
        required=True,
        help="base URL of the Coggo ingress, e.g. http://127.0.0.1:8080",
    )
    send_parser.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV),
        help="API key sent as Authorization: Bearer KEY "
        f"(default: the {API_KEY_ENV} environment variable)",
    )
    send_parser.add_argument(
        "--secret",
        default=os.environ.get(SECRET_ENV),
        help="signing secret of the integration, as UTF-8 text "
        f"(default: the {SECRET_ENV} environment variable)",
    )
    which = send_parser.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--example",
        action="store_true",
        help="send the Partner API's example event (Sky, apt_1029), with occurredAt "
        "set to the current time",
    )
    which.add_argument(
        "--appointments",
        type=_count(MAX_APPOINTMENTS),
        metavar="N",
        help="send one event for each of N generated appointments, with new "
        "event ids on every run (count)",
    )
    send_parser.add_argument(
        "--event-id",
        default=EXAMPLE_EVENT_ID,
        help=f"event id of the --example event (default: {EXAMPLE_EVENT_ID}). "
        "Each run sends a new occurredAt, so the ingress rejects a second run with "
        "the same id as a reused event id; pass a new id to send the example again",
    )
    _add_data_options(send_parser)
    send_parser.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=DEFAULT_TIMEOUT_SECONDS,
        help="time limit of each request, in seconds "
        f"(default: {DEFAULT_TIMEOUT_SECONDS:g})",
    )
    return parser


def _run_serve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if not args.secret:
        parser.error(f"serve needs --secret or the {SECRET_ENV} environment variable")
    config = SimConfig(
        secret=args.secret,
        seed=args.seed,
        appointments=args.appointments,
        clients=args.clients,
        timezone=args.timezone,
        base_path=args.base_path,
        token=args.token,
    )

    async def main(_settings: Settings, stop: asyncio.Event) -> None:
        # The state is made inside the event loop that serves it.
        state = SimState.create(config, faults=args.fault)
        await serve(state, args.host, args.port, stop)

    # The simulator stores no Coggo secrets, so it runs without COGGO_SECRET_KEY.
    run_service(PROG, main, requires_secret_key=False)


def _run_send(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if not args.api_key:
        parser.error(f"send needs --api-key or the {API_KEY_ENV} environment variable")
    if not args.secret:
        parser.error(f"send needs --secret or the {SECRET_ENV} environment variable")
    configure_logging(PROG, level="warning")

    events = build_events(
        example=args.example,
        appointments=args.appointments,
        seed=args.seed,
        clients=args.clients,
        timezone=args.timezone,
        event_id=args.event_id,
    )

    sending = send_events(
        args.ingress_url,
        args.api_key,
        args.secret,
        events,
        timeout_seconds=args.timeout,
    )
    results = asyncio.run(sending)
    for result in results:
        print(result.line(), flush=True)
    return 0 if all(result.accepted for result in results) else 1


def main(argv: Sequence[str] | None = None) -> None:
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        _run_serve(args, parser)
        return
    sys.exit(_run_send(args, parser))


if __name__ == "__main__":
    main()
