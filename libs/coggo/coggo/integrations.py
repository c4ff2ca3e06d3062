"""Integrations, their API keys, signing secrets and PIMS credentials, as stored in PostgreSQL."""

from __future__ import annotations

import base64
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import asyncpg
import orjson

from coggo.credentials import (
    SecretBox,
    hash_api_key,
    key_prefix,
    new_api_key,
    new_signing_secret,
)

SCOPES = ("webhooks:write", "integration:read")


@dataclass(frozen=True)
class KeyInfo:
    """The authorization an API key carries, read at one moment."""

    key_id: uuid.UUID
    integration_id: uuid.UUID
    clinic_id: str
    provider: str
    scopes: tuple[str, ...]
    status: str
    plan_enabled: bool
    revoked: bool


@dataclass(frozen=True)
class CreatedIntegration:
    integration_id: uuid.UUID
    clinic_id: str
    api_key: str
    signing_secret: str


def check_timezone(name: str) -> str:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(
            f"unknown timezone {name!r}: use an IANA name such as America/New_York"
        ) from exc
    return name


def check_scopes(scopes: list[str]) -> list[str]:
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown:
        raise ValueError(
            f"unknown scope {unknown[0]!r}: choose from {', '.join(SCOPES)}"
        )
    return sorted(set(scopes))


async def create_integration(
    connection: asyncpg.Connection,
    box: SecretBox,
    *,
    clinic_id: str,
    provider: str,
    external_clinic_id: str | None = None,
    default_timezone: str = "UTC",
    pims_base_url: str | None = None,
    push_url: str | None = None,
    scopes: list[str] | None = None,
) -> CreatedIntegration:
    """Create an integration with one API key and one signing secret."""
    check_timezone(default_timezone)
    integration_id = uuid.uuid4()
    secret = new_signing_secret()
    async with connection.transaction():
        await connection.execute(
            """
            INSERT INTO integrations (id, clinic_id, provider, external_clinic_id,
                default_timezone, pims_base_url, push_url)
            VALUES ($1, $2, $3, $4, $5, $6, $7)
            """,
            integration_id,
            clinic_id,
            provider,
            external_clinic_id,
            default_timezone,
            pims_base_url,
            push_url,
        )
        await connection.execute(
            "INSERT INTO signing_secrets (id, integration_id, secret) VALUES ($1, $2, $3)",
            uuid.uuid4(),
            integration_id,
            box.encrypt(secret),
        )
        key = await create_api_key(connection, integration_id, scopes or list(SCOPES))
    return CreatedIntegration(integration_id, clinic_id, key, secret)


async def create_api_key(
    connection: asyncpg.Connection, integration_id: uuid.UUID, scopes: list[str]
) -> str:
    key = new_api_key()
    await connection.execute(
        """
        INSERT INTO api_keys (id, integration_id, prefix, key_hash, scopes)
        VALUES ($1, $2, $3, $4, $5)
        """,
        uuid.uuid4(),
        integration_id,
        key_prefix(key),
        hash_api_key(key),
        check_scopes(scopes),
    )
    return key


async def find_key(
    connection: asyncpg.Connection | asyncpg.Pool, key: str
) -> KeyInfo | None:
    row = await connection.fetchrow(
        """
        SELECT k.id, k.integration_id, k.scopes, k.revoked_at IS NOT NULL AS revoked,
               i.clinic_id, i.provider, i.status, i.plan_enabled
        FROM api_keys k JOIN integrations i ON i.id = k.integration_id
        WHERE k.key_hash = $1
        """,
        hash_api_key(key),
    )
    if row is None:
        return None
    return KeyInfo(
        key_id=row["id"],
        integration_id=row["integration_id"],
        clinic_id=row["clinic_id"],
        provider=row["provider"],
        scopes=tuple(row["scopes"]),
        status=row["status"],
        plan_enabled=row["plan_enabled"],
        revoked=row["revoked"],
    )


async def active_signing_secrets(
    connection: asyncpg.Connection | asyncpg.Pool,
    box: SecretBox,
    integration_id: uuid.UUID,
) -> list[str]:
    """Return the current secret first, then any previous one still in its grace period."""
    rows = await connection.fetch(
        """
        SELECT secret FROM signing_secrets
        WHERE integration_id = $1 AND (expires_at IS NULL OR expires_at > now())
        ORDER BY expires_at IS NOT NULL, created_at DESC
        """,
        integration_id,
    )
    return [box.decrypt(row["secret"]) for row in rows]


async def rotate_signing_secret(
    connection: asyncpg.Connection,
    box: SecretBox,
    integration_id: uuid.UUID,
    *,
    grace: timedelta = timedelta(hours=24),
) -> str:
    """Make a new current secret; the old one keeps verifying for `grace`."""
    secret = new_signing_secret()
    async with connection.transaction():
        await connection.execute(
            """
            UPDATE signing_secrets SET expires_at = now() + $2::interval
            WHERE integration_id = $1 AND expires_at IS NULL
            """,
            integration_id,
            grace,
        )
        await connection.execute(
            "INSERT INTO signing_secrets (id, integration_id, secret) VALUES ($1, $2, $3)",
            uuid.uuid4(),
            integration_id,
            box.encrypt(secret),
        )
    return secret


@dataclass(frozen=True)
class ApiKeyRecord:
    """An API key as an operator sees it: the prefix, never the key or its hash."""

    key_id: uuid.UUID
    prefix: str
    scopes: tuple[str, ...]
    created_at: datetime
    revoked_at: datetime | None


async def list_api_keys(
    connection: asyncpg.Connection, integration_id: uuid.UUID
) -> list[ApiKeyRecord]:
    rows = await connection.fetch(
        """
        SELECT id, prefix, scopes, created_at, revoked_at FROM api_keys
        WHERE integration_id = $1 ORDER BY created_at, prefix
        """,
        integration_id,
    )
    return [
        ApiKeyRecord(
            row["id"],
            row["prefix"],
            tuple(row["scopes"]),
            row["created_at"],
            row["revoked_at"],
        )
        for row in rows
    ]


async def revoke_api_keys(
    connection: asyncpg.Connection, integration_id: uuid.UUID, key_ids: list[uuid.UUID]
) -> int:
    """Revoke keys of one integration; return how many were active until now."""
    result = await connection.execute(
        """
        UPDATE api_keys SET revoked_at = now()
        WHERE integration_id = $1 AND id = ANY($2::uuid[]) AND revoked_at IS NULL
        """,
        integration_id,
        key_ids,
    )
    return int(result.split()[-1])


CREDENTIAL_SCHEMES = ("bearer", "basic", "header")


@dataclass(frozen=True)
class PimsCredentials:
    """How Coggo authenticates its calls to one clinic's PIMS.

    `bearer` sends `Authorization: Bearer <secret>`; `basic` sends HTTP Basic
    with `username` and the secret as password (RFC 7617); `header` sends the
    secret as the value of the header named `header`.
    """

    scheme: str
    # Left out of repr, so that logging the object cannot leak it.
    secret: str = field(repr=False)
    username: str | None = None
    header: str | None = None

    def __post_init__(self) -> None:
        if self.scheme not in CREDENTIAL_SCHEMES:
            raise ValueError(
                f"unknown credential scheme {self.scheme!r}: choose from "
                f"{', '.join(CREDENTIAL_SCHEMES)}"
            )
        if not self.secret:
            raise ValueError("the credential secret is empty")
        if self.scheme == "basic" and not self.username:
            raise ValueError("basic credentials need a username")
        if self.scheme == "basic" and ":" in (self.username or ""):
            raise ValueError("a basic username must not contain ':' (RFC 7617)")
        if self.scheme == "header" and not self.header:
            raise ValueError("header credentials need a header name")
        if any(ch in self.secret for ch in "\r\n"):
            raise ValueError("the credential secret must be a single line")

    def headers(self) -> dict[str, str]:
        """Return the request headers that carry these credentials."""
        if self.scheme == "bearer":
            return {"Authorization": f"Bearer {self.secret}"}
        if self.scheme == "basic":
            pair = f"{self.username}:{self.secret}".encode()
            return {"Authorization": "Basic " + base64.b64encode(pair).decode()}
        assert self.header is not None
        return {self.header: self.secret}

    def to_json(self) -> bytes:
        fields: dict[str, Any] = {"scheme": self.scheme, "secret": self.secret}
        if self.username is not None:
            fields["username"] = self.username
        if self.header is not None:
            fields["header"] = self.header
        return orjson.dumps(fields)

    @classmethod
    def from_json(cls, raw: bytes | str) -> PimsCredentials:
        fields = orjson.loads(raw)
        return cls(
            scheme=fields["scheme"],
            secret=fields["secret"],
            username=fields.get("username"),
            header=fields.get("header"),
        )


async def store_pims_credentials(
    connection: asyncpg.Connection,
    box: SecretBox,
    integration_id: uuid.UUID,
    credentials: PimsCredentials | None,
) -> None:
    """Store the credentials encrypted, or remove them with None."""
    token = None if credentials is None else box.encrypt(credentials.to_json().decode())
    await connection.execute(
        """
        UPDATE integrations SET pims_credentials = $2, updated_at = now()
        WHERE id = $1
        """,
        integration_id,
        token,
    )


async def load_pims_credentials(
    connection: asyncpg.Connection | asyncpg.Pool,
    box: SecretBox,
    integration_id: uuid.UUID,
) -> PimsCredentials | None:
    """Return the decrypted credentials of an integration, or None if it has none."""
    token = await connection.fetchval(
        "SELECT pims_credentials FROM integrations WHERE id = $1", integration_id
    )
    if token is None:
        return None
    return PimsCredentials.from_json(box.decrypt(bytes(token)))
