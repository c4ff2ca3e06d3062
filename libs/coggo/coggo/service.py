"""Process lifecycle: settings, logging, the event loop and graceful stop on SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Awaitable, Callable

import structlog
import uvloop
from pydantic import ValidationError

from coggo.credentials import MissingSecretKey, SecretBox
from coggo.logs import configure_logging
from coggo.settings import Settings, get_settings

log = structlog.get_logger(__name__)

ServiceMain = Callable[[Settings, asyncio.Event], Awaitable[None]]

# sysexits.h EX_CONFIG: the process stopped because it is misconfigured.
EXIT_CONFIG_ERROR = 78


def run_service(
    name: str, main: ServiceMain, *, requires_secret_key: bool = True
) -> None:
    """Run `main` until it returns; SIGTERM or SIGINT sets the stop event it gets.

    A service that stores or reads secrets at rest refuses to start without
    COGGO_SECRET_KEY unless COGGO_DEV_MODE is set: it logs one error line and
    exits with status 78, as it does for an invalid COGGO_* variable. `requires_secret_key=False` is for processes
    that hold no Coggo secrets, such as the reference PIMS.
    """
    try:
        settings = get_settings()
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        field = str(first["loc"][0]) if first["loc"] else "settings"
        print(
            f"{name}: error: invalid COGGO_{field.upper()}: {first['msg']}; "
            "fix the environment variable and start again",
            file=sys.stderr,
        )
        sys.exit(EXIT_CONFIG_ERROR)
    configure_logging(name, level=settings.log_level, fmt=settings.log_format)

    if requires_secret_key:
        try:
            SecretBox.from_settings(settings)
        except MissingSecretKey as exc:
            log.error("service.start_refused", error=str(exc))
            sys.exit(EXIT_CONFIG_ERROR)
        if settings.secret_key is None or not settings.secret_key.get_secret_value():
            log.warning(
                "service.development_key",
                detail="COGGO_DEV_MODE is set and COGGO_SECRET_KEY is not: secrets "
                "at rest use a fixed development key",
            )

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        log.info("service.starting")
        await main(settings, stop)
        log.info("service.stopped")

    uvloop.run(runner())
