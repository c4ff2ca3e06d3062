"""structlog set-up: one event per line, JSON when not on a terminal.

Log ids and counts only. Keys, secrets, signatures and client contact details
never belong in an event; `redact_secrets` masks the fields most likely to
carry them should one slip into a call.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

_SENSITIVE = frozenset(
    {
        "authorization",
        "api_key",
        "key",
        "secret",
        "signature",
        "password",
        "email",
        "phone",
        "first_name",
        "last_name",
        "address",
    }
)


def redact_secrets(
    _logger: Any, _method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for name in _SENSITIVE.intersection(event):
        event[name] = "[redacted]"
    return event


def configure_logging(service: str, *, level: str = "info", fmt: str = "auto") -> None:
    """Configure structlog and the standard library's logging for one process."""
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    numeric_level = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact_secrets,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(service=service)

    # Libraries log through the standard library; keep their warnings only.
    logging.basicConfig(
        level=logging.WARNING,
        stream=sys.stderr,
        format="%(name)s %(levelname)s %(message)s",
    )
