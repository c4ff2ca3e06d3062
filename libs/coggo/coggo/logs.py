"""structlog set-up: one event per line, JSON when not on a terminal.

Log ids and counts only. Keys, secrets, signatures and client contact details
never belong in an event. Two processors guard against one slipping into a
call: `redact_secrets` masks fields whose name says they carry one, at any
depth of nested dicts and lists, and `mask_credentials` masks API keys, signing
secrets and bearer tokens found inside any string, such as an error message.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

REDACTED = "[redacted]"

# Field names compared after lower-casing and removing "_" and "-", so that
# first_name, firstName and first-name are one name.
_SENSITIVE = frozenset(
    {
        "authorization",
        "apikey",
        "key",
        "secret",
        "signingsecret",
        "signature",
        "xcoggosignature",
        "password",
        "token",
        "credentials",
        "pimscredentials",
        "email",
        "phone",
        "firstname",
        "lastname",
        "address",
        "addressline1",
        "addressline2",
        "postalcode",
        "owner",
        "client",
    }
)
# Deeper structures are replaced whole: nothing that nested belongs in a log.
_MAX_DEPTH = 4

_CREDENTIAL = re.compile(
    r"(?P<prefix>cgk_live_|cgs_)[A-Za-z0-9_\-]{8,}|(?P<bearer>[Bb]earer\s+)\S+"
)


def _is_sensitive(name: object) -> bool:
    if not isinstance(name, str):
        return False
    return name.lower().replace("_", "").replace("-", "") in _SENSITIVE


def _redact(value: Any, depth: int) -> Any:
    if isinstance(value, dict):
        if depth >= _MAX_DEPTH:
            return REDACTED
        return {
            key: REDACTED if _is_sensitive(key) else _redact(item, depth + 1)
            for key, item in value.items()
        }
    if isinstance(value, list | tuple):
        if depth >= _MAX_DEPTH:
            return REDACTED
        return [_redact(item, depth + 1) for item in value]
    return value


def redact_secrets(
    _logger: Any, _method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Mask every field, at any depth, whose name marks it as a secret or contact detail."""
    for name in list(event):
        if _is_sensitive(name):
            event[name] = REDACTED
        elif isinstance(event[name], dict | list | tuple):
            event[name] = _redact(event[name], 1)
    return event


def _mask(text: str) -> str:
    def replace(match: re.Match[str]) -> str:
        return (match["prefix"] or match["bearer"]) + REDACTED

    return _CREDENTIAL.sub(replace, text)


def mask_credentials(
    _logger: Any, _method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Mask API keys, signing secrets and bearer tokens inside string values."""
    for name, value in event.items():
        if isinstance(value, str) and (
            "cgk_live_" in value or "cgs_" in value or "earer" in value
        ):
            event[name] = _mask(value)
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
            mask_credentials,
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
    # aiohttp's server logs a malformed request with the offending line, which
    # may hold an API key or a client's contact details, and a traceback. The
    # client already got a 400, so these records are dropped.
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)
