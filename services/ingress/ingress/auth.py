"""API key lookup with a short cache, so revocations reach every replica quickly."""

from __future__ import annotations

import time
from dataclasses import dataclass

import asyncpg
from coggo.credentials import SecretBox, hash_api_key
from coggo.errors import InsufficientScope, IntegrationPaused, Unauthorized
from coggo.integrations import KeyInfo, active_signing_secrets, find_key

# A revoked key, a paused integration or a rotated secret is seen by every
# replica within this many seconds.
CACHE_SECONDS = 2.0
MAX_CACHE_ENTRIES = 100_000
BEARER = "bearer "


@dataclass(frozen=True)
class Caller:
    key: KeyInfo
    secrets: tuple[str, ...]


class KeyCache:
    def __init__(self, pool: asyncpg.Pool, box: SecretBox) -> None:
        self.pool = pool
        self.box = box
        self._entries: dict[bytes, tuple[float, Caller | None]] = {}

    async def lookup(self, key: str) -> Caller | None:
        digest = hash_api_key(key)
        now = time.monotonic()
        cached = self._entries.get(digest)
        if cached is not None and cached[0] > now:
            return cached[1]

        info = await find_key(self.pool, key)
        caller = None
        if info is not None:
            secrets = await active_signing_secrets(
                self.pool, self.box, info.integration_id
            )
            caller = Caller(info, tuple(secrets))
        if len(self._entries) >= MAX_CACHE_ENTRIES:
            self._entries.clear()
        self._entries[digest] = (now + CACHE_SECONDS, caller)
        return caller


def bearer_key(header: str | None) -> str:
    """Extract the key from an Authorization header value."""
    if header is None or not header.strip():
        raise Unauthorized(
            "Authorization header is missing: send Authorization: Bearer cgk_live_…"
        )
    if len(header) > 512 or not header[: len(BEARER)].lower() == BEARER:
        raise Unauthorized("Authorization header must have the form Bearer cgk_live_…")
    key = header[len(BEARER) :].strip()
    if not key:
        raise Unauthorized("Authorization header carries no API key after Bearer")
    return key


async def authenticate(cache: KeyCache, header: str | None) -> Caller:
    caller = await cache.lookup(bearer_key(header))
    if caller is None:
        raise Unauthorized(
            "API key is unknown: check the key shown when it was created"
        )
    if caller.key.revoked:
        raise Unauthorized("API key has been revoked: create a new key in Coggo")
    return caller


def require_webhook_access(caller: Caller) -> None:
    """Apply the pause and scope checks of POST /webhooks, in that order."""
    if not caller.key.plan_enabled:
        raise IntegrationPaused("the clinic's plan no longer includes the Partner API")
    if caller.key.status == "paused":
        raise IntegrationPaused(
            "the integration is paused: resume it in Coggo to send events again"
        )
    if "webhooks:write" not in caller.key.scopes:
        raise InsufficientScope(
            "API key lacks the webhooks:write scope: create a key with that scope"
        )
