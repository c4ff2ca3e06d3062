"""The rows one transaction of the pipeline works on, read and written in bulk.

A batch of events first locks every client, patient and appointment it names
with one statement per table (creating empty rows for new ids), then applies
the events to these rows in memory, and finally writes the changed rows back
with one pipelined statement per table. That keeps the round trips to
PostgreSQL per batch, not per event. Rows are locked in a sorted order per
table, so batches that share records wait for each other instead of
deadlocking in the common case; a deadlock that still happens is retried by
the consumer.
"""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg

Key = tuple[str, str]
Row = dict[str, Any]

# Columns each table's rows write back, besides `versions`.
COLUMNS: dict[str, tuple[str, ...]] = {
    "clients": (
        "first_name",
        "last_name",
        "email",
        "phone",
        "address_line1",
        "address_line2",
        "city",
        "state_region",
        "postal_code",
    ),
    "patients": (
        "client_id",
        "external_client_id",
        "name",
        "species_key",
        "species_raw",
        "species",
        "species_resolved",
        "breed",
        "color",
        "sex",
        "reproductive_status",
        "date_of_birth",
        "date_of_birth_estimated",
        "weight_kg",
        "merged_into_id",
    ),
    "appointments": (
        "patient_id",
        "starts_at_local",
        "timezone",
        "starts_at",
        "duration_minutes",
        "reason",
        "external_staff_id",
        "status",
    ),
}
VISIT_COLUMNS = ("patient_id", "status", "scheduled_at")


def _lock_sql(table: str) -> str:
    assert table in COLUMNS
    return f"""
        INSERT INTO {table} AS t (id, clinic_id, external_id)
        SELECT id, clinic_id, external_id
        FROM unnest($1::uuid[], $2::text[], $3::text[]) AS k (id, clinic_id, external_id)
        ORDER BY clinic_id, external_id
        ON CONFLICT (clinic_id, external_id) DO UPDATE SET clinic_id = t.clinic_id
        RETURNING *, (xmax = 0) AS inserted
    """


def _update_sql(table: str) -> str:
    columns = COLUMNS[table]
    assignments = ", ".join(
        f"{column} = ${index + 3}" for index, column in enumerate(columns)
    )
    return f"UPDATE {table} SET versions = $2, {assignments}, updated_at = now() WHERE id = $1"


class Store:
    """Rows of one transaction, keyed by table and (clinic_id, external_id)."""

    def __init__(self, connection: asyncpg.Connection) -> None:
        self.connection = connection
        self._rows: dict[str, dict[Key, Row]] = {table: {} for table in COLUMNS}
        self._new: dict[str, set[Key]] = {table: set() for table in COLUMNS}
        self._dirty: dict[str, set[Key]] = {table: set() for table in COLUMNS}
        self._patients_by_id: dict[uuid.UUID, Row] = {}
        self._visits: dict[uuid.UUID, Row] = {}
        self._visits_loaded: set[uuid.UUID] = set()
        self._new_visits: set[uuid.UUID] = set()
        self._dirty_visits: set[uuid.UUID] = set()
        self._species: dict[Key, str | None] = {}
        self._breeds: set[tuple[str, str, str, str]] = set()
        self._colors: set[tuple[str, str, str]] = set()

    def _keep(self, table: str, record: asyncpg.Record) -> Row:
        row = dict(record)
        inserted = bool(row.pop("inserted", False))
        key = (row["clinic_id"], row["external_id"])
        self._rows[table][key] = row
        if inserted:
            self._new[table].add(key)
        if table == "patients":
            self._patients_by_id[row["id"]] = row
        return row

    async def preload(
        self, keys: dict[str, set[Key]], species_keys: set[Key] | None = None
    ) -> None:
        """Lock or create every named row, visits of the appointments and species."""
        for table in ("clients", "patients", "appointments"):
            wanted = sorted(keys.get(table, set()) - set(self._rows[table]))
            if not wanted:
                continue
            records = await self.connection.fetch(
                _lock_sql(table),
                [uuid.uuid4() for _ in wanted],
                [clinic for clinic, _ in wanted],
                [external for _, external in wanted],
            )
            for record in records:
                self._keep(table, record)

        appointment_ids = [row["id"] for row in self._rows["appointments"].values()]
        pending = [item for item in appointment_ids if item not in self._visits_loaded]
        if pending:
            for record in await self.connection.fetch(
                "SELECT * FROM visits WHERE appointment_id = ANY($1::uuid[]) FOR UPDATE",
                pending,
            ):
                self._visits[record["appointment_id"]] = dict(record)
            self._visits_loaded.update(pending)

        wanted_species = sorted((species_keys or set()) - set(self._species))
        if wanted_species:
            for clinic, key in wanted_species:
                self._species[(clinic, key)] = None
            for record in await self.connection.fetch(
                """
                SELECT m.clinic_id, m.pims_key, m.species
                FROM species_map m
                JOIN unnest($1::text[], $2::text[]) AS k (clinic_id, pims_key)
                  ON k.clinic_id = m.clinic_id AND k.pims_key = m.pims_key
                """,
                [clinic for clinic, _ in wanted_species],
                [key for _, key in wanted_species],
            ):
                self._species[(record["clinic_id"], record["pims_key"])] = record[
                    "species"
                ]

    async def lock(
        self, table: str, clinic_id: str, external_id: str
    ) -> tuple[Row, bool]:
        """Return the locked row and whether this call is the first to see it created."""
        key = (clinic_id, external_id)
        row = self._rows[table].get(key)
        if row is None:
            await self.preload({table: {key}})
            row = self._rows[table][key]
        if key in self._new[table]:
            self._new[table].discard(key)
            return row, True
        return row, False

    def save(
        self, table: str, row: Row, changed: dict[str, Any], versions: dict[str, str]
    ) -> None:
        """Record new values of a locked row, written back by `flush`."""
        row.update(changed)
        row["versions"] = versions
        self._dirty[table].add((row["clinic_id"], row["external_id"]))

    async def patient_by_id(self, patient_id: uuid.UUID) -> Row | None:
        row = self._patients_by_id.get(patient_id)
        if row is not None:
            return row
        record = await self.connection.fetchrow(
            "SELECT *, false AS inserted FROM patients WHERE id = $1 FOR UPDATE",
            patient_id,
        )
        return None if record is None else self._keep("patients", record)

    async def visit_of(self, appointment: Row) -> Row | None:
        if appointment["id"] not in self._visits_loaded:
            record = await self.connection.fetchrow(
                "SELECT * FROM visits WHERE appointment_id = $1 FOR UPDATE",
                appointment["id"],
            )
            self._visits_loaded.add(appointment["id"])
            if record is not None:
                self._visits[appointment["id"]] = dict(record)
        return self._visits.get(appointment["id"])

    def add_visit(self, visit: Row) -> None:
        self._visits[visit["appointment_id"]] = visit
        self._new_visits.add(visit["appointment_id"])

    def save_visit(self, visit: Row, changed: dict[str, Any]) -> None:
        visit.update(changed)
        if visit["appointment_id"] not in self._new_visits:
            self._dirty_visits.add(visit["appointment_id"])

    async def species_for(self, clinic_id: str, key: str) -> str | None:
        if (clinic_id, key) not in self._species:
            await self.preload({}, {(clinic_id, key)})
        return self._species[(clinic_id, key)]

    def remember_breed(
        self, clinic_id: str, species: str, name: str, folded: str
    ) -> None:
        self._breeds.add((clinic_id, species, name, folded))

    def remember_color(self, clinic_id: str, name: str, folded: str) -> None:
        self._colors.add((clinic_id, name, folded))

    async def move_patient_references(
        self, merged_id: uuid.UUID, survivor_id: uuid.UUID
    ) -> int:
        """Point appointments, visits and earlier merges at the survivor; return appointments moved."""
        # Written straight to the database: flush first, then mirror the change here.
        await self.flush()
        await self.connection.execute(
            "UPDATE patients SET merged_into_id = $2 WHERE merged_into_id = $1 AND id <> $2",
            merged_id,
            survivor_id,
        )
        moved = await self.connection.fetch(
            "UPDATE appointments SET patient_id = $2, updated_at = now() "
            "WHERE patient_id = $1 RETURNING id",
            merged_id,
            survivor_id,
        )
        await self.connection.execute(
            "UPDATE visits SET patient_id = $2, updated_at = now() WHERE patient_id = $1",
            merged_id,
            survivor_id,
        )
        for patient in self._rows["patients"].values():
            if patient["merged_into_id"] == merged_id and patient["id"] != survivor_id:
                patient["merged_into_id"] = survivor_id
        for row in (*self._rows["appointments"].values(), *self._visits.values()):
            if row["patient_id"] == merged_id:
                row["patient_id"] = survivor_id
        return len(moved)

    async def flush(self) -> None:
        """Write every changed row back, one pipelined statement per table."""
        for table, keys in self._dirty.items():
            if not keys:
                continue
            rows = [self._rows[table][key] for key in sorted(keys)]
            await self.connection.executemany(
                _update_sql(table),
                [
                    (
                        row["id"],
                        row["versions"],
                        *(row[column] for column in COLUMNS[table]),
                    )
                    for row in rows
                ],
            )
            keys.clear()
        if self._new_visits:
            await self.connection.executemany(
                """
                INSERT INTO visits (id, clinic_id, appointment_id, patient_id, status, scheduled_at)
                VALUES ($1, $2, $3, $4, $5, $6)
                """,
                [
                    (
                        v["id"],
                        v["clinic_id"],
                        v["appointment_id"],
                        v["patient_id"],
                        v["status"],
                        v["scheduled_at"],
                    )
                    for v in (self._visits[item] for item in sorted(self._new_visits))
                ],
            )
            self._new_visits.clear()
        if self._dirty_visits:
            await self.connection.executemany(
                """
                UPDATE visits SET patient_id = $2, status = $3, scheduled_at = $4,
                    updated_at = now()
                WHERE id = $1
                """,
                [
                    (v["id"], v["patient_id"], v["status"], v["scheduled_at"])
                    for v in (self._visits[item] for item in sorted(self._dirty_visits))
                ],
            )
            self._dirty_visits.clear()
        if self._breeds:
            await self.connection.executemany(
                """
                INSERT INTO breeds (clinic_id, species, name, folded) VALUES ($1, $2, $3, $4)
                ON CONFLICT DO NOTHING
                """,
                sorted(self._breeds),
            )
            self._breeds.clear()
        if self._colors:
            await self.connection.executemany(
                """
                INSERT INTO colors (clinic_id, name, folded) VALUES ($1, $2, $3)
                ON CONFLICT DO NOTHING
                """,
                sorted(self._colors),
            )
            self._colors.clear()
