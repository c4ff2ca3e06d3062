"""Clients (animal owners) mirrored from the PIMS."""

from __future__ import annotations

from coggo.pipeline.context import EventContext, cleared
from coggo.pipeline.records import merge_fields
from coggo.pipeline.store import COLUMNS, Row, Store
from coggo.schemas.partner import Client

CLIENT_FIELDS = COLUMNS["clients"]


async def upsert_client(store: Store, context: EventContext, client: Client) -> Row:
    row, created = await store.lock("clients", context.clinic_id, client.external_id)
    updates = {
        name: {name: cleared(getattr(client, name))}
        for name in CLIENT_FIELDS
        if name in client.model_fields_set
    }
    changed, versions = merge_fields(row, updates, context.stamp)
    if versions != row["versions"]:
        store.save("clients", row, changed, versions)
    if created or changed:
        context.emit(
            "client.upserted",
            {"clientId": str(row["id"]), "externalClientId": client.external_id},
        )
    return row
