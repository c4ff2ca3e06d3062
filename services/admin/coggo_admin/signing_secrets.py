"""coggo-admin secret: the signing secret of a clinic's integration.

Rotation makes a new current secret and keeps the previous one verifying for a
grace period, so the PIMS can switch without a window of refused webhooks.
Secrets are printed once, at creation; `secret list` shows only their state.
"""

from __future__ import annotations

import argparse
import re
from datetime import timedelta
from typing import Any

from coggo.integrations import rotate_signing_secret

from coggo_admin.common import (
    AdminError,
    add_clinic_argument,
    add_json_flag,
    database,
    emit,
    find_integration,
    secret_box,
    timestamp,
)

DEFAULT_GRACE = "24h"
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
# Longer than any sensible rotation; bounds typing mistakes such as 24d for 24h.
MAX_GRACE = timedelta(days=30)


def parse_grace(text: str) -> timedelta:
    """Parse a duration such as 90s, 30m, 24h or 2d; 0 ends the old secret now."""
    match = re.fullmatch(r"\s*(\d+)\s*([smhd]?)\s*", text)
    if match is None:
        raise AdminError(
            f"invalid grace period {text!r}: give a number with a unit s, m, h or "
            "d, such as 24h"
        )
    amount, unit = int(match[1]), match[2]
    if amount and not unit:
        raise AdminError(
            f"grace period {text!r} has no unit: write {amount}s, {amount}m, "
            f"{amount}h or {amount}d"
        )
    grace = timedelta(**{_UNITS[unit or "s"]: amount})
    if grace > MAX_GRACE:
        raise AdminError(
            f"grace period {text!r} is longer than the maximum of 30d: give a shorter one"
        )
    return grace


async def secret_rotate(args: argparse.Namespace) -> int:
    grace = parse_grace(args.grace)
    box = secret_box()
    async with database() as connection:
        row = await find_integration(connection, args.clinic_id)
        secret = await rotate_signing_secret(connection, box, row["id"], grace=grace)
        valid_until = await connection.fetchval(
            """
            SELECT max(expires_at) FROM signing_secrets
            WHERE integration_id = $1 AND expires_at > now()
            """,
            row["id"],
        )
    emit(
        args,
        {
            "clinicId": args.clinic_id,
            "signingSecret": secret,
            "graceSeconds": int(grace.total_seconds()),
            "previousSecretValidUntil": timestamp(valid_until),
        },
        [
            f"new signing secret for clinic {args.clinic_id}:",
            secret,
            "It is shown only once: store it in the PIMS now.",
            f"Previous secrets keep verifying until {timestamp(valid_until)}."
            if valid_until is not None
            else "No previous secret verifies any more.",
        ],
    )
    return 0


async def secret_list(args: argparse.Namespace) -> int:
    async with database() as connection:
        row = await find_integration(connection, args.clinic_id)
        rows = await connection.fetch(
            """
            SELECT created_at, expires_at,
                   CASE WHEN expires_at IS NULL THEN 'current'
                        WHEN expires_at > now() THEN 'grace'
                        ELSE 'expired' END AS state
            FROM signing_secrets WHERE integration_id = $1
            ORDER BY created_at DESC
            """,
            row["id"],
        )
    secrets = [
        {
            "state": item["state"],
            "createdAt": timestamp(item["created_at"]),
            "expiresAt": timestamp(item["expires_at"]),
        }
        for item in rows
    ]
    lines = [
        f"{item['state']:<8} created {item['createdAt']}"
        + (f", verifies until {item['expiresAt']}" if item["expiresAt"] else "")
        for item in secrets
    ]
    emit(args, {"clinicId": args.clinic_id, "secrets": secrets}, lines)
    return 0


def register(groups: Any) -> None:
    secret = groups.add_parser(
        "secret",
        aliases=["secrets"],
        help="webhook signing secrets",
        description="Rotate and inspect the secret that signs webhooks and pushes.",
    )
    verbs = secret.add_subparsers(dest="verb", required=True, metavar="VERB")

    rotate = verbs.add_parser(
        "rotate",
        help="make a new signing secret, printed once; the previous one keeps "
        "verifying for the grace period",
    )
    rotate.add_argument(
        "--grace",
        default=DEFAULT_GRACE,
        help="how long the previous secret keeps verifying: a number with unit "
        f"s, m, h or d (default: {DEFAULT_GRACE}; 0 ends it now)",
    )
    rotate.set_defaults(run=secret_rotate)

    listing = verbs.add_parser(
        "list", help="list the clinic's secrets by state, never their values"
    )
    listing.set_defaults(run=secret_list)

    for verb in (rotate, listing):
        add_clinic_argument(verb)
        add_json_flag(verb)
