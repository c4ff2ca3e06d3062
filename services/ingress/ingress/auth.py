"""API key lookup with a short cache, so revocations reach every replica quickly."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import asyncpg
import structlog
from coggo.credentials import SecretBox, hash_api_key
from coggo.errors import InsufficientScope, IntegrationPaused, Unauthorized
from coggo.integrations import KeyInfo

from ingress.batching import Batcher

log = structlog.get_logger(__name__)

# A revoked key, a paused integration or a rotated secret is seen by every
# replica within this many seconds: no cached entry read earlier is used.
CACHE_SECONDS = 2.0
# The refresher reads every key in use again this often, all in one query, so
# that requests find fresh entries instead of waiting for a lookup.
REFRESH_SECONDS = 1.0
# A key unused for this long is no longer refreshed and leaves the cache.
IDLE_SECONDS = 60.0
MAX_CACHE_ENTRIES = 100_000
# Keys per refresh query; a larger set takes several queries.
REFRESH_CHUNK = 5_000
BEARER = "bearer "

# The lookups of coggo.integrations.find_key and active_signing_secrets, for
# many keys in one round trip: the current secret first, then any previous
# one still in its grace period.
_FIND_KEYS = """
SELECT k.key_hash, k.id, k.integration_id, k.scopes,
       k.revoked_at IS NOT NULL AS revoked,
       i.clinic_id, i.provider, i.status, i.plan_enabled,
       ARRAY(
           SELECT s.secret FROM signing_secrets s
           WHERE s.integration_id = k.integration_id
             AND (s.expires_at IS NULL OR s.expires_at > now())
           ORDER BY s.expires_at IS NOT NULL, s.created_at DESC
       ) AS secrets
FROM api_keys k JOIN integrations i ON i.id = k.integration_id
WHERE k.key_hash = ANY($1::bytea[])
"""


@dataclass(frozen=True)
class Caller:
    key: KeyInfo
    secrets: tuple[str, ...]


@dataclass
class _Entry:
    caller: Caller | None
    # time.monotonic() when the query that read this entry started.
    read_at: float
    used_at: float


class KeyCache:
    """Callers by key hash; an unknown key is cached as None like any other."""

    def __init__(self, pool: asyncpg.Pool, box: SecretBox) -> None:
        self.pool = pool
        self.box = box
        self._entries: dict[bytes, _Entry] = {}
        self._plaintexts: dict[bytes, str] = {}
        # Lookups that miss the cache at the same moment share one query.
        self._misses: Batcher[bytes, _Entry] = Batcher(
            self._read, concurrency=2, max_batch=500
        )

    async def lookup(self, key: str) -> Caller | None:
        digest = hash_api_key(key)
        now = time.monotonic()
        entry = self._entries.get(digest)
        if entry is None or now - entry.read_at > CACHE_SECONDS:
            entry = await self._misses.submit(digest)
        entry.used_at = now
        return entry.caller

    async def run(self) -> None:
        """Refresh the keys in use every REFRESH_SECONDS; run this as a task."""
        failures = 0
        while True:
            await asyncio.sleep(REFRESH_SECONDS)
            try:
                await self.refresh()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                # Requests still work: an entry past CACHE_SECONDS is read again.
                failures += 1
                if failures == 1 or failures % 60 == 0:
                    log.warning(
                        "keys.refresh_failed", attempts=failures, error=repr(exc)
                    )
                continue
            if failures:
                log.info("keys.refresh_recovered", attempts=failures)
                failures = 0

    async def refresh(self) -> None:
        """Read every known key used within IDLE_SECONDS again; forget the others."""
        now = time.monotonic()
        for digest, entry in list(self._entries.items()):
            if now - entry.used_at > IDLE_SECONDS:
                del self._entries[digest]
        # Unknown keys are not refreshed, so random keys cannot inflate the query.
        known = [
            digest
            for digest, entry in self._entries.items()
            if entry.caller is not None
        ]
        for offset in range(0, len(known), REFRESH_CHUNK):
            await self._read(known[offset : offset + REFRESH_CHUNK])

    async def _read(self, digests: list[bytes]) -> list[_Entry]:
        started = time.monotonic()
        rows = await self.pool.fetch(_FIND_KEYS, digests)
        found = {bytes(row["key_hash"]): row for row in rows}
        if len(self._entries) + len(digests) > MAX_CACHE_ENTRIES:
            self._entries.clear()
            self._plaintexts.clear()
        entries = []
        for digest in digests:
            row = found.get(digest)
            entry = _Entry(self._caller(row) if row else None, started, started)
            current = self._entries.get(digest)
            if current is not None and current.read_at > started:
                # A lookup that started later has stored a newer reading.
                entry = current
            elif current is not None:
                entry.used_at = current.used_at
            self._entries[digest] = entry
            entries.append(entry)
        return entries

    def _caller(self, row: asyncpg.Record) -> Caller:
        info = KeyInfo(
            key_id=row["id"],
            integration_id=row["integration_id"],
            clinic_id=row["clinic_id"],
            provider=row["provider"],
            scopes=tuple(row["scopes"]),
            status=row["status"],
            plan_enabled=row["plan_enabled"],
            revoked=row["revoked"],
        )
        return Caller(info, tuple(self._decrypt(token) for token in row["secrets"]))

    def _decrypt(self, token: bytes) -> str:
        # Decrypting every secret on every refresh would cost more than the query.
        plaintext = self._plaintexts.get(token)
        if plaintext is None:
            plaintext = self.box.decrypt(token)
            self._plaintexts[token] = plaintext
        return plaintext


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
