"""Decoding of JSON request bodies and error details that name the invalid field."""

from __future__ import annotations

from typing import Any

import orjson
from coggo.errors import BadRequest
from pydantic import ValidationError


def decode_json_object(body: bytes) -> dict[str, Any]:
    """Decode a request body that must be one JSON object."""
    if not body.strip():
        raise BadRequest("body is empty: send a JSON object")
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"body is not valid UTF-8 JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise BadRequest(
            f"body must be a JSON object, not a JSON {type(parsed).__name__}"
        )
    return parsed


def describe_validation_error(exc: ValidationError) -> str:
    """Name the first invalid field and what is wrong with it, without its value."""
    errors = exc.errors(include_url=False, include_input=False)
    first = errors[0]
    path = ""
    for part in first["loc"]:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    message = "field required" if first["type"] == "missing" else first["msg"]
    more = f" ({len(errors) - 1} more errors)" if len(errors) > 1 else ""
    return f"{path or 'body'}: {message}{more}"
