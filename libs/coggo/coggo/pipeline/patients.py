"""Patients mirrored from the PIMS: demographics, species, owners and merges.

Merges keep delivery order irrelevant for a patient merged once: the record a
PIMS id names always takes the data addressed to it, and data newer than the
merge also reach the survivor, whether they arrive before the merge (then the
merge copies them over) or after it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import asyncpg

from coggo.errors import PermanentMessageError
from coggo.outbox import enqueue_events
from coggo.pipeline.context import EventContext, cleared
from coggo.pipeline.normalize import birth_date_from_age, weight_in_kg
from coggo.pipeline.records import merge_fields
from coggo.pipeline.species import fold, resolve_species
from coggo.pipeline.store import Row, Store
from coggo.schemas.partner import Patient

# Maximum length of a chain of merges followed. A longer one means a cycle or corrupt data.
MAX_MERGE_CHAIN = 32

# Logical fields of a patient, each versioned as one, and the columns they set.
PATIENT_FIELDS: dict[str, tuple[str, ...]] = {
    "name": ("name",),
    "breed": ("breed",),
    "color": ("color",),
    "sex": ("sex",),
    "reproductive_status": ("reproductive_status",),
    "species": ("species_key", "species_raw"),
    "weight": ("weight_kg",),
    "date_of_birth": ("date_of_birth", "date_of_birth_estimated"),
    "owner": ("client_id", "external_client_id"),
}

Updates = dict[str, dict[str, Any]]


async def follow_merges(store: Store, row: Row) -> Row:
    """Return the surviving patient at the end of a chain of merges, locked."""
    seen = {row["id"]}
    while row["merged_into_id"] is not None:
        survivor = await store.patient_by_id(row["merged_into_id"])
        if survivor is None or survivor["id"] in seen or len(seen) > MAX_MERGE_CHAIN:
            raise PermanentMessageError(
                "merge_cycle", "the chain of patient merges loops or is too long"
            )
        seen.add(survivor["id"])
        row = survivor
    return row


async def _species_of(
    store: Store, clinic_id: str, key: str | None, raw: str | None
) -> str | None:
    mapping: dict[str, str | None] = {}
    if key:
        mapping[key] = await store.species_for(clinic_id, key)
    return resolve_species(key, raw, mapping)


def _patient_updates(
    patient: Patient, context: EventContext, owner: Row | None
) -> Updates:
    present = patient.model_fields_set
    updates: Updates = {"name": {"name": patient.name.strip()}}
    for name in ("breed", "color"):
        if name in present:
            value = cleared(getattr(patient, name))
            updates[name] = {name: " ".join(value.split()) if value else None}
    for name in ("sex", "reproductive_status"):
        if name in present:
            value = getattr(patient, name)
            updates[name] = {name: value.value if value is not None else None}
    if present & {"species_key", "species"}:
        updates["species"] = {
            "species_key": cleared(patient.species_key),
            "species_raw": cleared(patient.species),
        }
    if present & {"weight", "weight_kg"}:
        try:
            kilograms = weight_in_kg(patient.weight, patient.weight_kg)
        except ValueError as exc:
            raise PermanentMessageError("invalid_weight", str(exc)) from None
        updates["weight"] = {"weight_kg": kilograms}
    if present & {"date_of_birth", "age"}:
        if patient.date_of_birth is not None:
            born, estimated = patient.date_of_birth, False
        elif patient.age is not None:
            born, estimated = (
                birth_date_from_age(patient.age, context.occurred_at),
                True,
            )
        else:
            born, estimated = None, False
        updates["date_of_birth"] = {
            "date_of_birth": born,
            "date_of_birth_estimated": estimated,
        }
    if owner is not None:
        updates["owner"] = {
            "client_id": owner["id"],
            "external_client_id": owner["external_id"],
        }
    elif "external_client_id" in present and patient.external_client_id is None:
        updates["owner"] = {"client_id": None, "external_client_id": None}
    return updates


async def _apply_updates(
    store: Store,
    context: EventContext,
    target: Row,
    stamped: list[tuple[str, Updates]],
    *,
    created: bool,
) -> dict[str, Any]:
    """Merge stamped updates into one patient row; return the columns that changed."""
    versions = dict(target["versions"] or {})
    changed: dict[str, Any] = {}
    for stamp, updates in stamped:
        view = {**dict(target), **changed, "versions": versions}
        more, versions = merge_fields(view, updates, stamp)
        changed.update(more)
    if created or "species_key" in changed or "species_raw" in changed:
        key = changed.get("species_key", target["species_key"])
        raw = changed.get("species_raw", target["species_raw"])
        species = await _species_of(store, context.clinic_id, key, raw)
        for column, value in (
            ("species", species),
            ("species_resolved", species is not None),
        ):
            if target[column] != value:
                changed[column] = value
    changed = {
        column: value for column, value in changed.items() if target[column] != value
    }
    if versions != target["versions"]:
        store.save("patients", target, changed, versions)
    return changed


def _emit_patient(context: EventContext, row: Row) -> None:
    merged = row
    context.emit(
        "patient.upserted",
        {
            "patientId": str(row["id"]),
            "externalPatientId": row["external_id"],
            "clientId": str(merged["client_id"]) if merged["client_id"] else None,
            "externalClientId": merged["external_client_id"],
            "species": merged["species"],
            "speciesResolved": merged["species_resolved"],
        },
    )


async def upsert_patient(
    store: Store, context: EventContext, patient: Patient, owner: Row | None
) -> Row:
    """Upsert a patient; return the row appointments link to.

    That row is the patient itself, or the survivor when it was merged away.
    """
    if patient.external_client_id and (
        owner is None or owner["external_id"] != patient.external_client_id
    ):
        owner, _ = await store.lock(
            "clients", context.clinic_id, patient.external_client_id
        )
    row, created = await store.lock("patients", context.clinic_id, patient.external_id)
    updates = _patient_updates(patient, context, owner)
    merge_stamp = (row["versions"] or {}).get("merged_into", "")

    changed = await _apply_updates(
        store, context, row, [(context.stamp, updates)], created=created
    )
    linked = row
    if row["merged_into_id"] is not None:
        linked = await follow_merges(store, row)
        if context.stamp > merge_stamp:
            survivor_changed = await _apply_updates(
                store, context, linked, [(context.stamp, updates)], created=False
            )
            if survivor_changed:
                _emit_patient(context, linked)
    elif changed or created:
        _emit_patient(context, row)

    # Every breed and color a PIMS sends joins the clinic's lists, whether or
    # not this event is the newest for the patient, so the lists do not depend
    # on the order of delivery. Breeds are listed under the species the same
    # payload names.
    breed = (updates.get("breed") or {}).get("breed")
    if breed:
        species = None
        if "species" in updates:
            names = updates["species"]
            species = await _species_of(
                store, context.clinic_id, names["species_key"], names["species_raw"]
            )
        store.remember_breed(context.clinic_id, species or "", breed, fold(breed))
    color = (updates.get("color") or {}).get("color")
    if color:
        store.remember_color(context.clinic_id, color, fold(color))
    return linked


async def merge_patients(
    store: Store,
    context: EventContext,
    merged_external_id: str,
    survivor_external_id: str,
) -> None:
    """Merge one patient into another; appointments, visits and later data follow."""
    merged, _ = await store.lock("patients", context.clinic_id, merged_external_id)
    named, _ = await store.lock("patients", context.clinic_id, survivor_external_id)
    survivor = await follow_merges(store, named)
    if survivor["id"] == merged["id"]:
        raise PermanentMessageError(
            "merge_cycle",
            "the survivor of this merge was itself merged into the merged-away patient",
        )

    changed, versions = merge_fields(
        merged, {"merged_into": {"merged_into_id": survivor["id"]}}, context.stamp
    )
    if versions != merged["versions"]:
        store.save("patients", merged, changed, versions)
    if not changed:
        return

    # Data the merged-away record received after the merge belong to the survivor.
    newer = [
        (stamp, {field: {column: merged[column] for column in PATIENT_FIELDS[field]}})
        for field, stamp in sorted(versions.items(), key=lambda item: item[1])
        if field in PATIENT_FIELDS and stamp > context.stamp
    ]
    if newer and await _apply_updates(store, context, survivor, newer, created=False):
        _emit_patient(context, survivor)

    moved = await store.move_patient_references(merged["id"], survivor["id"])
    context.emit(
        "patient.merged",
        {
            "patientId": str(merged["id"]),
            "externalPatientId": merged_external_id,
            "mergedIntoPatientId": str(survivor["id"]),
            "mergedIntoExternalPatientId": survivor["external_id"],
            "appointmentsMoved": moved,
        },
    )


async def resolve_pending_species(
    connection: asyncpg.Connection, clinic_id: str, events_exchange: str | None = None
) -> int:
    """Resolve patients whose species key has gained a mapping; return how many changed.

    With `events_exchange`, a `patient.upserted` event for each resolved patient
    goes to the outbox in the caller's transaction.
    """
    rows = await connection.fetch(
        """
        UPDATE patients p SET species = m.species, species_resolved = true, updated_at = now()
        FROM species_map m
        WHERE p.clinic_id = $1 AND m.clinic_id = p.clinic_id AND m.pims_key = p.species_key
          AND m.species IS NOT NULL AND p.species IS DISTINCT FROM m.species
        RETURNING p.*
        """,
        clinic_id,
    )
    if events_exchange is not None and rows:
        context = EventContext(clinic_id, "species-mapping", datetime.now(UTC), "UTC")
        for row in rows:
            _emit_patient(context, dict(row))
        await enqueue_events(connection, events_exchange, context.events)
    return len(rows)


async def surviving_external_id(
    connection: asyncpg.Connection | asyncpg.Pool, clinic_id: str, external_id: str
) -> str:
    """Return the external id of the patient `external_id` was merged into, at the end
    of any chain of merges; the id itself when it was never merged or is unknown."""
    survivor = await connection.fetchval(
        """
        WITH RECURSIVE chain (id, external_id, merged_into_id, depth) AS (
            SELECT id, external_id, merged_into_id, 0 FROM patients
            WHERE clinic_id = $1 AND external_id = $2
            UNION ALL
            SELECT p.id, p.external_id, p.merged_into_id, chain.depth + 1
            FROM patients p JOIN chain ON p.id = chain.merged_into_id
            WHERE chain.depth < $3
        )
        SELECT external_id FROM chain WHERE merged_into_id IS NULL LIMIT 1
        """,
        clinic_id,
        external_id,
        MAX_MERGE_CHAIN,
    )
    return str(survivor) if survivor is not None else external_id
