"""coggo-admin key: API keys of a clinic's integration.

A key is printed once, when it is created. Afterwards only its prefix (the
first characters, stored beside the hash) identifies it; neither the key nor
its hash is ever printed.
"""

from __future__ import annotations

import argparse
import uuid
from typing import Any

import asyncpg
from coggo.credentials import API_KEY_PREFIX, hash_api_key, key_prefix
from coggo.integrations import (
    SCOPES,
    ApiKeyRecord,
    check_scopes,
    create_api_key,
    list_api_keys,
    revoke_api_keys,
)

from coggo_admin.common import (
    AdminError,
    add_clinic_argument,
    add_json_flag,
    database,
    emit,
    find_integration,
    timestamp,
)


def _describe(key: ApiKeyRecord) -> dict[str, Any]:
    return {
        "keyId": str(key.key_id),
        "prefix": key.prefix,
        "scopes": list(key.scopes),
        "createdAt": timestamp(key.created_at),
        "revokedAt": timestamp(key.revoked_at),
        "active": key.revoked_at is None,
    }


async def key_create(args: argparse.Namespace) -> int:
    try:
        scopes = check_scopes(args.scope or list(SCOPES))
    except ValueError as exc:
        raise AdminError(str(exc)) from None
    async with database() as connection:
        row = await find_integration(connection, args.clinic_id)
        key = await create_api_key(connection, row["id"], scopes)
    emit(
        args,
        {
            "clinicId": args.clinic_id,
            "apiKey": key,
            "prefix": key_prefix(key),
            "scopes": scopes,
        },
        [
            f"API key for clinic {args.clinic_id} ({', '.join(scopes)}):",
            key,
            "It is shown only once: store it in the PIMS now.",
        ],
    )
    return 0


async def key_list(args: argparse.Namespace) -> int:
    async with database() as connection:
        row = await find_integration(connection, args.clinic_id)
        keys = await list_api_keys(connection, row["id"])
    described = [_describe(key) for key in keys]
    lines = [
        f"{item['prefix']}…  {'active ' if item['active'] else 'revoked'}  "
        f"{','.join(item['scopes']):<32} created {item['createdAt']}"
        for item in described
    ]
    emit(
        args,
        {"clinicId": args.clinic_id, "keys": described},
        lines or [f"clinic {args.clinic_id} has no API keys"],
    )
    return 0


async def _select_keys(
    connection: asyncpg.Connection, integration_id: uuid.UUID, args: argparse.Namespace
) -> list[ApiKeyRecord]:
    keys = await list_api_keys(connection, integration_id)
    if args.key_id is not None:
        return [key for key in keys if str(key.key_id) == args.key_id]
    prefix: str = args.prefix.removesuffix("…")
    if len(prefix) > len(key_prefix(prefix)):
        # A whole key was given: match it exactly by its hash.
        key_id = await connection.fetchval(
            "SELECT id FROM api_keys WHERE integration_id = $1 AND key_hash = $2",
            integration_id,
            hash_api_key(prefix),
        )
        return [key for key in keys if key.key_id == key_id]
    return [key for key in keys if key.prefix == prefix]


async def key_revoke(args: argparse.Namespace) -> int:
    if (args.prefix is None) == (args.key_id is None):
        raise AdminError(
            "give either --prefix (as shown by `coggo-admin key list`) or --key-id"
        )
    if args.prefix is not None and not args.prefix.startswith(API_KEY_PREFIX):
        raise AdminError(
            f"--prefix must start with {API_KEY_PREFIX}: copy it from "
            "`coggo-admin key list`"
        )
    async with database() as connection:
        row = await find_integration(connection, args.clinic_id)
        matches = await _select_keys(connection, row["id"], args)
        if not matches:
            raise AdminError(
                f"no API key of clinic {args.clinic_id} matches: list them with "
                f"`coggo-admin key list --clinic-id {args.clinic_id}`"
            )
        if len(matches) > 1:
            raise AdminError(
                f"{len(matches)} keys share prefix {args.prefix}: revoke one with "
                "--key-id, taken from `coggo-admin key list --json`"
            )
        revoked = await revoke_api_keys(connection, row["id"], [matches[0].key_id])
    key = matches[0]
    emit(
        args,
        {
            "clinicId": args.clinic_id,
            "keyId": str(key.key_id),
            "prefix": key.prefix,
            "revoked": True,
            "changed": revoked == 1,
        },
        [
            f"API key {key.prefix}… revoked; every ingress replica rejects it "
            "within 5 s"
            if revoked
            else f"API key {key.prefix}… was already revoked"
        ],
    )
    return 0


def register(groups: Any) -> None:
    key = groups.add_parser(
        "key",
        aliases=["keys"],
        help="API keys",
        description="Create, list and revoke the API keys a PIMS sends as "
        "Authorization: Bearer cgk_live_…",
    )
    verbs = key.add_subparsers(dest="verb", required=True, metavar="VERB")

    create = verbs.add_parser("create", help="create a key; prints it once")
    create.add_argument(
        "--scope",
        action="append",
        choices=SCOPES,
        help="scope of the key; repeat for several (default: all)",
    )
    create.set_defaults(run=key_create)

    listing = verbs.add_parser(
        "list", help="list the clinic's keys by prefix, with scopes and state"
    )
    listing.set_defaults(run=key_list)

    revoke = verbs.add_parser(
        "revoke",
        help="revoke a key; every ingress replica rejects it within 5 s",
    )
    revoke.add_argument(
        "--prefix", help="the key's prefix as shown by `key list` (or the whole key)"
    )
    revoke.add_argument("--key-id", help="the key's id from `key list --json`")
    revoke.set_defaults(run=key_revoke)

    for verb in (create, listing, revoke):
        add_clinic_argument(verb)
        add_json_flag(verb)
