"""Clients (animal owners) mirrored from the PIMS."""

from __future__ import annotations

import asyncpg

from coggo.pipeline.context import EventContext, cleared
from coggo.pipeline.records import lock_record, merge_fields, write_record
from coggo.schemas.partner import Client

CLIENT_FIELDS = (
    "first_name",
    "last_name",
    "email",
    "phone",
    "address_line1",
    "address_line2",
    "city",
    "state_region",
    "postal_code",
)


async def upsert_client(
    connection: asyncpg.Connection, context: EventContext, client: Client
) -> asyncpg.Record:
    row, created = await lock_record(
        connection, "clients", context.clinic_id, client.external_id
    )
    updates = {
        name: {name: cleared(getattr(client, name))}
        for name in CLIENT_FIELDS
        if name in client.model_fields_set
    }
    changed, versions = merge_fields(row, updates, context.stamp)
    if versions != row["versions"]:
        await write_record(connection, "clients", row["id"], changed, versions)
    if created or changed:
        context.emit(
            "client.upserted",
            {"clientId": str(row["id"]), "externalClientId": client.external_id},
        )
    return row
