"""Decoding of JSON request bodies."""

from __future__ import annotations

from typing import Any

import orjson
from coggo.errors import BadRequest


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
