"""Error details that name the invalid field of a pydantic validation error."""

from __future__ import annotations

from pydantic import ValidationError


def field_path(location: tuple[int | str, ...]) -> str:
    """Render a pydantic error location as a path such as data.patient.weight.value."""
    path = ""
    for part in location:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path


def describe_validation_error(exc: ValidationError, prefix: str = "") -> str:
    """Name the first invalid field and what is wrong with it; input values are left out."""
    errors = exc.errors(include_url=False, include_input=False)
    first = errors[0]
    path = field_path(tuple(first["loc"]))
    if prefix:
        path = f"{prefix}.{path}" if path else prefix
    message = "field required" if first["type"] == "missing" else first["msg"]
    more = f" ({len(errors) - 1} more errors)" if len(errors) > 1 else ""
    return f"{path or 'body'}: {message}{more}"
