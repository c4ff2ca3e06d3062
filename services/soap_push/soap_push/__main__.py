"""Run the SOAP-push dispatcher: `coggo-soap-push` or `python -m soap_push`."""

from __future__ import annotations

import argparse
import asyncio

import asyncpg
import structlog
from coggo.consumer import Consumer
from coggo.credentials import SecretBox
from coggo.outbound import OutboundClient
from coggo.runtime import WorkerRuntime
from coggo.service import run_service
from coggo.settings import Settings
from coggo.topology import SOAP_PUSH_QUEUE

from soap_push.delivery import TargetCache
from soap_push.dispatcher import Dispatcher
from soap_push.intake import PushIntake
from soap_push.options import PushOptions
from soap_push.retry import RetryPolicy
from soap_push.store import PushStore

log = structlog.get_logger(__name__)


async def _keep_session(_connection: asyncpg.Connection) -> None:
    """Skip asyncpg's reset query when a connection returns to the pool.

    This process sets no session state (no SET, LISTEN, cursors or session
    advisory locks), so the reset query, one more round trip on every release,
    would change nothing. asyncpg still rolls back a transaction left open.
    """


async def serve(
    settings: Settings,
    stop: asyncio.Event,
    *,
    options: PushOptions | None = None,
    policy: RetryPolicy | None = None,
) -> None:
    """Consume soap.push commands and deliver the pushes until `stop` is set.

    `options` defaults to the COGGO_SOAP_PUSH_* environment variables and
    `policy` to the backoff those options describe.
    """
    options = options if options is not None else PushOptions()
    policy = policy if policy is not None else options.retry_policy()
    box = SecretBox.from_settings(settings)
    runtime = await WorkerRuntime.start(
        settings, "coggo-soap-push", reset=_keep_session
    )
    pool, broker, relay, topology = (
        runtime.pool,
        runtime.broker,
        runtime.relay,
        runtime.topology,
    )
    client = OutboundClient(
        allow_private=settings.allow_private_targets,
        timeout=options.timeout_seconds,
        limit_per_host=options.clinic_max_in_flight,
    )

    store = PushStore(pool, topology.events)
    dispatcher = Dispatcher(
        store=store,
        targets=TargetCache(pool, box),
        client=client,
        broker=broker,
        relay=relay,
        options=options,
        policy=policy,
    )
    dispatching = asyncio.create_task(dispatcher.run())
    consumer = Consumer(
        broker,
        topology.name(SOAP_PUSH_QUEUE),
        PushIntake(store, dispatcher, relay),
        prefetch=settings.prefetch,
    )
    await consumer.start()

    await runtime.serve_ops()

    await stop.wait()
    log.info("soap_push.stopping", in_flight=dispatcher.in_flight)
    # Take no new commands, then let the attempts in flight finish and record
    # their outcome; the relay publishes their events before it stops.
    await consumer.stop()
    await dispatcher.stop(timeout=options.timeout_seconds + 5.0)
    await dispatching
    await runtime.close()
    await client.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="coggo-soap-push",
        description=(
            "Consume soap.push commands from the coggo.soap-push queue and POST "
            "each note, signed, to its clinic's PIMS push endpoint, retrying with "
            "exponential backoff (5 attempts) and publishing push.sent, "
            "push.failed and push.superseded on coggo.events. Configured by "
            "COGGO_* environment variables; COGGO_SOAP_PUSH_TIMEOUT_SECONDS, "
            "_BACKOFF_SECONDS, _BACKOFF_MULTIPLIER, _MAX_BACKOFF_SECONDS, "
            "_MAX_IN_FLIGHT, _CLINIC_MAX_IN_FLIGHT, _POLL_SECONDS, _GATHER_SECONDS "
            "and _LEASE_MARGIN_SECONDS tune the attempts. "
            "COGGO_METRICS_PORT serves /healthz, /readyz and /metrics on a side port."
        ),
    )
    parser.parse_args(argv)
    run_service("coggo-soap-push", serve)


if __name__ == "__main__":
    main()
