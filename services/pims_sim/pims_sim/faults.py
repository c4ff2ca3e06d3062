"""Faults injected into the PIMS-hosted endpoints, set at start or at run time.

A fault applies to the next `times` calls of one endpoint (every call when
`times` is absent) and is then removed. Its effects apply in this order:
`delay` first. Then `timeout` keeps the request open until the client
disconnects. Otherwise `malformed` lets the endpoint do its work and breaks the
response body, and `status` alone returns that status with a JSON error body.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    model_validator,
)

ENDPOINTS = ("species", "patients", "appointments", "push")
Endpoint = Literal["species", "patients", "appointments", "push"]
MAX_DELAY_SECONDS = 3600.0
MAX_RETRY_AFTER_SECONDS = 86_400


class FaultSpec(BaseModel):
    """One fault for one endpoint, as sent to POST /_sim/faults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    endpoint: Endpoint
    status: Annotated[StrictInt, Field(ge=200, le=599)] | None = None
    times: Annotated[StrictInt, Field(ge=1)] | None = None
    delay: Annotated[float, Field(ge=0, le=MAX_DELAY_SECONDS)] | None = None
    timeout: StrictBool = False
    # true or "json": the body is cut short, so it is not valid JSON.
    # "shape": the body is valid JSON of the wrong shape.
    malformed: StrictBool | Literal["json", "shape"] = False
    retry_after: (
        Annotated[StrictInt, Field(ge=0, le=MAX_RETRY_AFTER_SECONDS)] | None
    ) = None
    location: Annotated[str, Field(min_length=1, max_length=2000)] | None = None

    @model_validator(mode="after")
    def _check_effects(self) -> FaultSpec:
        if self.delay is not None and not math.isfinite(self.delay):
            raise ValueError("delay must be a finite number of seconds")
        has_effect = (
            self.status is not None
            or self.delay is not None
            or self.timeout
            or self.malformed is not False
            or self.retry_after is not None
        )
        if not has_effect:
            raise ValueError(
                "a fault needs at least one of status, delay, timeout, malformed "
                "or retry_after"
            )
        if self.timeout and (self.status is not None or self.malformed is not False):
            raise ValueError(
                "timeout never sends a response, so it cannot be combined with "
                "status or malformed"
            )
        if self.location is not None and not (
            self.status is not None and 300 <= self.status < 400
        ):
            raise ValueError("location is only sent with a 3xx status")
        return self

    @property
    def malformed_kind(self) -> Literal["json", "shape"] | None:
        """The kind of broken body to send, or None for a correct body."""
        if self.malformed is True:
            return "json"
        if self.malformed is False:
            return None
        return self.malformed

    @property
    def response_status(self) -> int | None:
        """The status to send instead of the endpoint's own, if any.

        A `retry_after` without `status` means 429 Too Many Requests.
        """
        if self.status is None and self.retry_after is not None:
            return 429
        return self.status

    def wire(self) -> dict[str, Any]:
        """Dump the settings that differ from no fault at all."""
        return self.model_dump(exclude_defaults=True)


@dataclass
class ActiveFault:
    spec: FaultSpec
    remaining: int | None


class FaultTable:
    """The current fault of each endpoint; a new fault replaces the old one."""

    def __init__(self) -> None:
        self._faults: dict[str, ActiveFault] = {}

    def set(self, spec: FaultSpec) -> None:
        self._faults[spec.endpoint] = ActiveFault(spec, spec.times)

    def clear(self, endpoint: str | None = None) -> None:
        if endpoint is None:
            self._faults.clear()
        else:
            self._faults.pop(endpoint, None)

    def take(self, endpoint: str) -> FaultSpec | None:
        """Return the fault for one call of `endpoint`, counting the call against it."""
        active = self._faults.get(endpoint)
        if active is None:
            return None
        if active.remaining is not None:
            active.remaining -= 1
            if active.remaining <= 0:
                del self._faults[endpoint]
        return active.spec

    def describe(self) -> list[dict[str, Any]]:
        return [
            {**active.spec.wire(), "remaining": active.remaining}
            for active in self._faults.values()
        ]


def parse_fault_option(text: str) -> FaultSpec:
    """Parse the `--fault` option, e.g. "push:status=429,retry_after=2,times=3".

    Raises ValueError, or pydantic's ValidationError, naming what is invalid.
    """
    endpoint, separator, settings = text.partition(":")
    if not separator or not settings.strip():
        raise ValueError(
            f"fault {text!r} must have the form ENDPOINT:KEY=VALUE[,KEY=VALUE...], "
            "e.g. push:status=500,times=2"
        )
    fields: dict[str, Any] = {"endpoint": endpoint.strip()}
    for item in settings.split(","):
        key, equals, value = item.partition("=")
        if not equals or not key.strip():
            raise ValueError(f"fault setting {item!r} in {text!r} must be KEY=VALUE")
        fields[key.strip()] = _parse_value(value.strip())
    return FaultSpec.model_validate(fields)


def _parse_value(value: str) -> Any:
    lowered = value.lower()
    if lowered in {"true", "false"}:
        return lowered == "true"
    try:
        return int(value)
    except ValueError:
        pass
    try:
        return float(value)
    except ValueError:
        return value
