"""The clinic's integration as the worker needs it: PIMS base URL and credentials.

PIMS credentials are the `PimsCredentials` of coggo.integrations, stored
encrypted in `integrations.pims_credentials` (`coggo-admin integration
credentials` sets them). Their headers go with every call to the PIMS:
`Authorization: Bearer`, HTTP Basic, or a header of the PIMS's choosing. A NULL
column sends no credentials.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import asyncpg
from coggo.credentials import MissingSecretKey, SecretBox
from coggo.integrations import PimsCredentials

from reconciliation.errors import CommandError


@dataclass(frozen=True)
class PimsTarget:
    """Base URL, default timezone and credential headers of one clinic's PIMS."""

    clinic_id: str
    base_url: str
    default_timezone: str
    # repr=False keeps the credentials out of logged or printed targets.
    credential_headers: dict[str, str] = field(default_factory=dict, repr=False)

    def url(self, path: str) -> str:
        return self.base_url.rstrip("/") + path


def _credential_headers(box: SecretBox, token: bytes | None) -> dict[str, str]:
    if token is None:
        return {}
    try:
        return PimsCredentials.from_json(box.decrypt(bytes(token))).headers()
    except MissingSecretKey as exc:
        raise CommandError("credentials_unreadable", str(exc)) from None
    except (ValueError, KeyError, TypeError):
        raise CommandError(
            "credentials_unreadable",
            "the stored PIMS credentials are not in the expected format: store "
            "them again with `coggo-admin integration credentials`",
        ) from None


async def load_active(
    connection: asyncpg.Connection | asyncpg.Pool, clinic_id: str
) -> asyncpg.Record:
    """Read a clinic's integration; raise CommandError unless it exists and is active."""
    row = await connection.fetchrow(
        """
        SELECT status, plan_enabled, pims_base_url, pims_credentials, default_timezone
        FROM integrations WHERE clinic_id = $1
        """,
        clinic_id,
    )
    if row is None:
        raise CommandError(
            "integration_not_found",
            f"clinic {clinic_id!r} has no integration: create one with "
            "`coggo-admin integration create`",
        )
    if row["status"] == "paused":
        raise CommandError(
            "integration_paused",
            f"the integration of clinic {clinic_id!r} is paused: resume it "
            "with `coggo-admin integration resume`",
        )
    if not row["plan_enabled"]:
        # The Partner API returns 402 integration_paused in this case too.
        raise CommandError(
            "integration_paused",
            f"the plan of clinic {clinic_id!r} no longer includes the Partner API",
        )
    return row


async def load_target(
    connection: asyncpg.Connection | asyncpg.Pool, box: SecretBox, clinic_id: str
) -> PimsTarget:
    """Read a clinic's integration; raise CommandError if its PIMS may not be called."""
    row = await load_active(connection, clinic_id)
    base_url = (row["pims_base_url"] or "").strip()
    if not base_url:
        raise CommandError(
            "no_base_url",
            f"the integration of clinic {clinic_id!r} has no PIMS base URL: set "
            "it with `coggo-admin integration set --pims-base-url`",
        )

    return PimsTarget(
        clinic_id=clinic_id,
        base_url=base_url,
        default_timezone=row["default_timezone"] or "UTC",
        credential_headers=_credential_headers(box, row["pims_credentials"]),
    )
