"""Descriptions of invalid PIMS data that name the field but never echo its value."""

from __future__ import annotations

from pydantic import ValidationError


def describe_validation_error(exc: ValidationError) -> str:
    """Name the first invalid field and what is wrong with it, without its value.

    Values are left out because they may be client contact details.
    """
    errors = exc.errors(include_url=False, include_input=False, include_context=False)
    first = errors[0]
    path = ""
    for part in first["loc"]:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    message = "field required" if first["type"] == "missing" else first["msg"]
    more = f" ({len(errors) - 1} more errors)" if len(errors) > 1 else ""
    return f"{path or 'item'}: {message}{more}"
