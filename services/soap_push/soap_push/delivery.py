"""One push attempt: where to send it, the signed POST, and what came back."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass

import aiohttp
import asyncpg
from coggo.credentials import SecretBox
from coggo.integrations import active_signing_secrets
from coggo.outbound import OutboundBlocked, OutboundClient
from coggo.signing import sign_headers

from soap_push.retry import parse_retry_after

# Only the status matters; the rest of a PIMS's response body is not read.
MAX_RESPONSE_BYTES = 64 * 1024
# How long a clinic's push URL and signing secret are reused before they are
# read again, so a change made with coggo-admin applies within this time.
TARGET_TTL_SECONDS = 5.0


@dataclass(frozen=True)
class PushTarget:
    """Destination and signing secret of one clinic's pushes."""

    push_url: str | None
    external_clinic_id: str | None
    # The current signing secret, None when the integration has none.
    secret: str | None


@dataclass(frozen=True)
class AttemptResult:
    """The outcome of one attempt: the HTTP status, or None when no response came."""

    status: int | None
    error: str | None = None
    retry_after: float | None = None

    @property
    def delivered(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


class TargetCache:
    """Reads each clinic's push URL and current signing secret, reused for a few seconds."""

    def __init__(
        self, pool: asyncpg.Pool, box: SecretBox, ttl: float = TARGET_TTL_SECONDS
    ) -> None:
        self.pool = pool
        self.box = box
        self.ttl = ttl
        self._entries: dict[str, tuple[float, PushTarget | None]] = {}
        self._loading: dict[str, asyncio.Lock] = {}

    async def get(self, clinic_id: str) -> PushTarget | None:
        """Return the clinic's target, or None when the clinic has no integration."""
        target = self._fresh(clinic_id)
        if target is not None:
            return target[0]
        # One read per clinic at a time: attempts that start together share it.
        lock = self._loading.setdefault(clinic_id, asyncio.Lock())
        async with lock:
            target = self._fresh(clinic_id)
            if target is not None:
                return target[0]
            loaded = await self._load(clinic_id)
            self._entries[clinic_id] = (time.monotonic() + self.ttl, loaded)
            return loaded

    def _fresh(self, clinic_id: str) -> tuple[PushTarget | None] | None:
        cached = self._entries.get(clinic_id)
        if cached is None or cached[0] <= time.monotonic():
            return None
        return (cached[1],)

    async def _load(self, clinic_id: str) -> PushTarget | None:
        # NOTE: the integration's status and plan flag are not read, so a paused
        # integration still receives pushes; whether a pause should hold them
        # is not decided.
        row = await self.pool.fetchrow(
            """
            SELECT id, push_url, external_clinic_id FROM integrations
            WHERE clinic_id = $1
            """,
            clinic_id,
        )
        if row is None:
            return None
        integration_id: uuid.UUID = row["id"]
        secrets = await active_signing_secrets(self.pool, self.box, integration_id)
        return PushTarget(
            push_url=row["push_url"],
            external_clinic_id=row["external_clinic_id"],
            secret=secrets[0] if secrets else None,
        )


def describe_missing_target(clinic_id: str, target: PushTarget | None) -> str:
    """Explain why pushes for this clinic cannot be sent, and how to fix it."""
    if target is None:
        return f"clinic {clinic_id!r} has no integration: create one with coggo-admin"
    if not target.push_url:
        return (
            f"clinic {clinic_id!r} has no push URL registered: set it with coggo-admin"
        )
    return (
        f"clinic {clinic_id!r} has no current signing secret: "
        "rotate it with coggo-admin"
    )


async def post_envelope(
    client: OutboundClient, url: str, secret: str, envelope_id: str, body: bytes
) -> AttemptResult:
    """POST one signed envelope and classify the outcome.

    A refused URL, a timeout and a connection error are returned as a failed
    result, not raised.
    The timestamp and signature are made now, so every attempt is signed afresh
    while the envelope id stays the same.
    """
    headers = {"Content-Type": "application/json"}
    headers.update(sign_headers(secret, envelope_id, body))
    try:
        response = await client.request(
            "POST",
            url,
            data=body,
            headers=headers,
            max_response_bytes=MAX_RESPONSE_BYTES,
            truncate=True,
        )
    except OutboundBlocked as exc:
        return AttemptResult(None, f"push URL refused: {exc}")
    except TimeoutError:
        return AttemptResult(None, f"timed out after {client.timeout:g} s")
    except aiohttp.ClientError as exc:
        return AttemptResult(None, f"request failed: {type(exc).__name__}: {exc}")
    except OSError as exc:
        return AttemptResult(None, f"request failed: {type(exc).__name__}: {exc}")

    if 200 <= response.status < 300:
        return AttemptResult(response.status)
    return AttemptResult(
        response.status,
        f"PIMS responded with HTTP {response.status}",
        parse_retry_after(response.headers.get("Retry-After")),
    )
