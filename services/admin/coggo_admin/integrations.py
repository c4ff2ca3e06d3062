"""coggo-admin integration: clinic integrations and what Coggo needs to call the PIMS."""

from __future__ import annotations

import argparse
import getpass
import sys
from typing import Any
from urllib.parse import urlsplit

import asyncpg
from coggo.credentials import MissingSecretKey, SecretBox
from coggo.integrations import (
    CREDENTIAL_SCHEMES,
    SCOPES,
    PimsCredentials,
    check_timezone,
    create_integration,
    store_pims_credentials,
)
from coggo.settings import get_settings

from coggo_admin.common import (
    AdminError,
    add_clinic_argument,
    add_json_flag,
    connect,
    database,
    emit,
    find_integration,
    secret_box,
    timestamp,
)

# The ingress caches what a key authorizes for 2 s, so a change made here is
# seen by every replica within that time.
PROPAGATION_NOTE = "every ingress replica applies it within 5 s"


async def integration_create(args: argparse.Namespace) -> int:
    try:
        box = SecretBox.from_settings(get_settings())
        check_timezone(args.timezone)
        for url in (args.pims_base_url, args.push_url):
            if url is not None:
                check_url(url)
    except (MissingSecretKey, ValueError) as exc:
        raise AdminError(str(exc)) from None
    connection = await connect()
    try:
        created = await create_integration(
            connection,
            box,
            clinic_id=args.clinic_id,
            provider=args.provider,
            external_clinic_id=args.external_clinic_id,
            default_timezone=args.timezone,
            pims_base_url=args.pims_base_url,
            push_url=args.push_url,
            scopes=args.scope or list(SCOPES),
        )
    except asyncpg.UniqueViolationError:
        raise AdminError(
            f"clinic {args.clinic_id!r} already has an integration: use another "
            "--clinic-id, or create a new key for the existing one"
        ) from None
    except asyncpg.UndefinedTableError:
        raise AdminError(
            "the database has no schema yet: run `coggo-admin db upgrade`"
        ) from None
    finally:
        await connection.close()
    emit(
        args,
        {
            "integrationId": str(created.integration_id),
            "clinicId": created.clinic_id,
            "apiKey": created.api_key,
            "signingSecret": created.signing_secret,
        },
        [
            f"integration {created.integration_id} for clinic {created.clinic_id}",
            f"API key:        {created.api_key}",
            f"signing secret: {created.signing_secret}",
            "Both are shown only once: store them in the PIMS now.",
        ],
    )
    return 0


def check_url(url: str) -> str:
    """Accept an absolute http(s) URL with a host, without credentials or fragment."""
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValueError(
            f"URL {url!r} is not an absolute http(s) URL: give one such as "
            "https://pims.example.com/coggo"
        )
    if parts.username is not None or parts.password is not None:
        raise ValueError(
            "URLs must not carry credentials: store them with "
            "`coggo-admin integration credentials`"
        )
    if parts.fragment:
        raise ValueError(f"URL {url!r} has a fragment: remove the part after '#'")
    return url


def _summary(row: asyncpg.Record) -> dict[str, Any]:
    return {
        "integrationId": str(row["id"]),
        "clinicId": row["clinic_id"],
        "provider": row["provider"],
        "externalClinicId": row["external_clinic_id"],
        "status": row["status"],
        "planEnabled": row["plan_enabled"],
        "defaultTimezone": row["default_timezone"],
        "pimsBaseUrl": row["pims_base_url"],
        "pushUrl": row["push_url"],
        "credentialsSet": row["pims_credentials"] is not None,
        "createdAt": timestamp(row["created_at"]),
        "updatedAt": timestamp(row["updated_at"]),
    }


async def integration_list(args: argparse.Namespace) -> int:
    async with database() as connection:
        rows = await connection.fetch("SELECT * FROM integrations ORDER BY clinic_id")
    integrations = [_summary(row) for row in rows]
    lines = [
        f"{item['clinicId']:<24} {item['provider']:<16} {item['status']:<7} "
        f"plan {'on' if item['planEnabled'] else 'off'}"
        for item in integrations
    ]
    emit(
        args,
        {"integrations": integrations},
        lines or ["no integrations: create one with `coggo-admin integration create`"],
    )
    return 0


async def integration_show(args: argparse.Namespace) -> int:
    async with database() as connection:
        row = await find_integration(connection, args.clinic_id)
        keys = await connection.fetchrow(
            """
            SELECT count(*) FILTER (WHERE revoked_at IS NULL) AS active,
                   count(*) FILTER (WHERE revoked_at IS NOT NULL) AS revoked
            FROM api_keys WHERE integration_id = $1
            """,
            row["id"],
        )
        grace_ends = await connection.fetchval(
            """
            SELECT max(expires_at) FROM signing_secrets
            WHERE integration_id = $1 AND expires_at > now()
            """,
            row["id"],
        )
    data = _summary(row)
    data["activeKeys"] = keys["active"]
    data["revokedKeys"] = keys["revoked"]
    data["previousSecretValidUntil"] = timestamp(grace_ends)
    lines = [
        f"integration {data['integrationId']} for clinic {data['clinicId']}",
        f"provider:            {data['provider']}",
        f"external clinic id:  {data['externalClinicId'] or '-'}",
        f"status:              {data['status']}",
        f"plan:                {'on' if data['planEnabled'] else 'off'}",
        f"default timezone:    {data['defaultTimezone']}",
        f"PIMS base URL:       {data['pimsBaseUrl'] or '-'}",
        f"push URL:            {data['pushUrl'] or '-'}",
        f"PIMS credentials:    {'set' if data['credentialsSet'] else 'not set'}",
        f"API keys:            {data['activeKeys']} active, {data['revokedKeys']} revoked",
        "previous secret:     "
        + (
            f"verifies until {data['previousSecretValidUntil']}"
            if grace_ends is not None
            else "none in its grace period"
        ),
    ]
    emit(args, data, lines)
    return 0


async def _set_status(args: argparse.Namespace, status: str) -> int:
    async with database() as connection:
        row = await find_integration(connection, args.clinic_id)
        await connection.execute(
            "UPDATE integrations SET status = $2, updated_at = now() WHERE id = $1",
            row["id"],
            status,
        )
    changed = row["status"] != status
    verb = "paused" if status == "paused" else "resumed"
    emit(
        args,
        {"clinicId": args.clinic_id, "status": status, "changed": changed},
        [
            f"integration for clinic {args.clinic_id} {verb}; {PROPAGATION_NOTE}"
            if changed
            else f"integration for clinic {args.clinic_id} was already {status}"
        ],
    )
    return 0


async def integration_pause(args: argparse.Namespace) -> int:
    return await _set_status(args, "paused")


async def integration_resume(args: argparse.Namespace) -> int:
    return await _set_status(args, "active")


async def integration_plan(args: argparse.Namespace) -> int:
    enabled = args.state == "on"
    async with database() as connection:
        row = await find_integration(connection, args.clinic_id)
        await connection.execute(
            """
            UPDATE integrations SET plan_enabled = $2, updated_at = now()
            WHERE id = $1
            """,
            row["id"],
            enabled,
        )
    effect = (
        "the Partner API is available to the clinic"
        if enabled
        else "/ping and /webhooks return 402"
    )
    emit(
        args,
        {
            "clinicId": args.clinic_id,
            "planEnabled": enabled,
            "changed": row["plan_enabled"] != enabled,
        },
        [
            f"plan {args.state} for clinic {args.clinic_id}: {effect}; {PROPAGATION_NOTE}"
        ],
    )
    return 0


# Option name -> column; an empty value clears the column.
_SETTABLE = {
    "pims_base_url": "pims_base_url",
    "push_url": "push_url",
    "timezone": "default_timezone",
    "external_clinic_id": "external_clinic_id",
}


def _updates(args: argparse.Namespace) -> dict[str, str | None]:
    updates: dict[str, str | None] = {}
    for option, column in _SETTABLE.items():
        value = getattr(args, option)
        if value is None:
            continue
        if option == "timezone":
            updates[column] = check_timezone(value)
        elif option in ("pims_base_url", "push_url"):
            updates[column] = check_url(value) if value else None
        else:
            updates[column] = value or None
    return updates


async def integration_set(args: argparse.Namespace) -> int:
    try:
        updates = _updates(args)
    except ValueError as exc:
        raise AdminError(str(exc)) from None
    if not updates:
        raise AdminError(
            "nothing to set: give --pims-base-url, --push-url, --timezone or "
            "--external-clinic-id"
        )
    async with database() as connection:
        row = await find_integration(connection, args.clinic_id)
        assignments = ", ".join(
            f"{column} = ${index}" for index, column in enumerate(updates, start=2)
        )
        # Column names come from _SETTABLE, never from the command line.
        await connection.execute(
            f"UPDATE integrations SET {assignments}, updated_at = now() WHERE id = $1",
            row["id"],
            *updates.values(),
        )
        updated = await find_integration(connection, args.clinic_id)
    for column in ("pims_base_url", "push_url"):
        url = updates.get(column)
        if url is not None and url.startswith("http:"):
            print(
                f"coggo-admin: warning: {url} is plain HTTP; calls to it are "
                "refused unless COGGO_ALLOW_PRIVATE_TARGETS is on",
                file=sys.stderr,
            )
    data = _summary(updated)
    emit(
        args,
        data,
        [f"{column} = {updates[column] or '(cleared)'}" for column in updates],
    )
    return 0


def _read_secret(prompt: str) -> str:
    """Read one secret line from stdin, or prompt without echo on a terminal."""
    if sys.stdin.isatty():
        return getpass.getpass(prompt)
    return sys.stdin.readline().rstrip("\r\n")


async def integration_credentials(args: argparse.Namespace) -> int:
    if args.clear:
        credentials = None
    else:
        if args.scheme is None:
            raise AdminError(
                "give --scheme bearer|basic|header (the secret is read from "
                "stdin), or --clear to remove the stored credentials"
            )
        secret = _read_secret(f"{args.scheme} secret for clinic {args.clinic_id}: ")
        if not secret:
            raise AdminError(
                "no secret on stdin: pipe it in, e.g. "
                '`printf %s "$TOKEN" | coggo-admin integration credentials ...`'
            )
        try:
            credentials = PimsCredentials(
                scheme=args.scheme,
                secret=secret,
                username=args.username,
                header=args.header,
            )
        except ValueError as exc:
            raise AdminError(str(exc)) from None
    box = secret_box()
    async with database() as connection:
        row = await find_integration(connection, args.clinic_id)
        await store_pims_credentials(connection, box, row["id"], credentials)
    scheme = None if credentials is None else credentials.scheme
    emit(
        args,
        {
            "clinicId": args.clinic_id,
            "credentialsSet": credentials is not None,
            "scheme": scheme,
        },
        [
            f"PIMS credentials for clinic {args.clinic_id} removed"
            if credentials is None
            else f"PIMS credentials for clinic {args.clinic_id} stored encrypted "
            f"({scheme})"
        ],
    )
    return 0


def register(groups: Any) -> None:
    integration = groups.add_parser(
        "integration",
        help="clinic integrations",
        description="Create, inspect and change clinic integrations.",
    )
    verbs = integration.add_subparsers(dest="verb", required=True, metavar="VERB")
    _register_create(verbs)

    listing = verbs.add_parser("list", help="list every integration")
    listing.set_defaults(run=integration_list)

    show = verbs.add_parser(
        "show", help="show one integration; secrets and credentials are never printed"
    )
    show.set_defaults(run=integration_show)

    pause = verbs.add_parser(
        "pause",
        help="pause: /webhooks returns 402 and /ping reports status paused",
    )
    pause.set_defaults(run=integration_pause)

    resume = verbs.add_parser("resume", help="resume a paused integration")
    resume.set_defaults(run=integration_resume)

    plan = verbs.add_parser(
        "plan",
        help="turn the clinic's Partner API plan flag on or off "
        "(off: /ping and /webhooks return 402)",
    )
    plan.add_argument("state", choices=("on", "off"), help="the new plan flag")
    plan.set_defaults(run=integration_plan)

    settable = verbs.add_parser(
        "set",
        help="set the PIMS base URL, push URL, default timezone or external clinic id",
        description="Change one or more settings; an empty value clears a URL or "
        "the external clinic id.",
    )
    settable.add_argument(
        "--pims-base-url", help="base URL of the PIMS-hosted endpoints (/species, ...)"
    )
    settable.add_argument("--push-url", help="URL the PIMS receives SOAP pushes at")
    settable.add_argument(
        "--timezone", help="IANA zone for appointments sent without one"
    )
    settable.add_argument(
        "--external-clinic-id", help="the PIMS's own id of the clinic"
    )
    settable.set_defaults(run=integration_set)

    credentials = verbs.add_parser(
        "credentials",
        help="store the credentials Coggo sends to the PIMS, encrypted; "
        "the secret is read from stdin",
        description="Store how Coggo authenticates to the clinic's PIMS. The "
        "secret (token or password) is read from stdin, or prompted for on a "
        "terminal, so it never appears in the shell history or the process "
        "list. It is stored encrypted with COGGO_SECRET_KEY.",
    )
    credentials.add_argument(
        "--scheme",
        choices=CREDENTIAL_SCHEMES,
        help="bearer: Authorization: Bearer SECRET; basic: HTTP Basic with "
        "--username; header: the header named by --header",
    )
    credentials.add_argument("--username", help="user name for --scheme basic")
    credentials.add_argument("--header", help="header name for --scheme header")
    credentials.add_argument(
        "--clear", action="store_true", help="remove the stored credentials"
    )
    credentials.set_defaults(run=integration_credentials)

    for verb in (show, pause, resume, plan, settable, credentials):
        add_clinic_argument(verb)
    for verb in (listing, show, pause, resume, plan, settable, credentials):
        add_json_flag(verb)


def _register_create(verbs: Any) -> None:
    create = verbs.add_parser(
        "create",
        help="create an integration; prints its API key and signing secret once",
    )
    create.add_argument("--clinic-id", required=True, help="Coggo's id of the clinic")
    create.add_argument(
        "--provider", required=True, help="name of the PIMS, e.g. vetsim"
    )
    create.add_argument(
        "--external-clinic-id",
        help="the PIMS's own id of the clinic, sent back in pushes",
    )
    create.add_argument(
        "--timezone",
        default="UTC",
        help="IANA zone for appointments sent without one (default: UTC)",
    )
    create.add_argument("--pims-base-url", help="base URL of the PIMS-hosted endpoints")
    create.add_argument("--push-url", help="URL the PIMS receives SOAP pushes at")
    create.add_argument(
        "--scope",
        action="append",
        choices=SCOPES,
        help="scope of the first API key; repeat for several (default: all)",
    )
    create.set_defaults(run=integration_create)
    add_json_flag(create)
