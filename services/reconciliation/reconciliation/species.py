"""`species.refresh`: store a clinic's PIMS species catalog and map it to Coggo species.

A catalog entry is mapped automatically when its label (or, without a label,
its key) is a Coggo species name or synonym, compared case-insensitively. A
mapping an operator set (`manual = true`) is never changed; only its label
follows the catalog. Keys that left the catalog keep their row, because
stored patients may still carry them. After the catalog is stored, patients
whose key gained a mapping are resolved.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import asyncpg
import structlog
from coggo.pipeline.species import species_by_name
from coggo.pipeline.upsert import resolve_pending_species
from coggo.schemas.partner import SpeciesItem
from pydantic import ValidationError

from reconciliation.errors import CommandError
from reconciliation.integration import PimsTarget
from reconciliation.pims import RetryPolicy
from reconciliation.runs import RunReport
from reconciliation.validation import describe_validation_error
from reconciliation.worker import Command, Worker, execute_run

log = structlog.get_logger(__name__)

MAX_RESPONSE_BYTES = 1024 * 1024
FETCH_TIMEOUT_SECONDS = 10.0
FETCH_RETRY = RetryPolicy(attempts=4, initial_wait=0.5, max_wait=8.0, jitter=0.5)
# Unmapped keys listed in the event; all of them are counted.
MAX_LISTED_UNMAPPED = 200

UPSERT_SQL = """
INSERT INTO species_map (clinic_id, pims_key, label, species, manual, updated_at)
VALUES ($1, $2, $3, $4, false, now())
ON CONFLICT (clinic_id, pims_key) DO UPDATE SET
    label = EXCLUDED.label,
    species = CASE WHEN species_map.manual THEN species_map.species
                   ELSE EXCLUDED.species END,
    updated_at = now()
"""


@dataclass
class SpeciesReport(RunReport):
    mapped: int = 0
    manual: int = 0
    unmapped_keys: list[str] = field(default_factory=list)
    patients_resolved: int = 0

    def kind_data(self) -> dict[str, Any]:
        return {
            "mapped": self.mapped,
            "manual": self.manual,
            "unmapped": len(self.unmapped_keys),
            "unmappedKeys": self.unmapped_keys[:MAX_LISTED_UNMAPPED],
            "patientsResolved": self.patients_resolved,
        }


async def handle_refresh(worker: Worker, command: Command) -> None:
    report = SpeciesReport(
        kind="species", command_id=command.id, clinic_id=command.clinic_id
    )

    async def work(connection: asyncpg.Connection, target: PimsTarget) -> None:
        await refresh(worker, connection, target, report)

    await execute_run(worker, report, work)


def automatic_species(key: str, label: str | None) -> str | None:
    """Return the Coggo species a catalog entry names, or None."""
    if label and label.strip():
        return species_by_name(label)
    return species_by_name(key)


def parse_catalog(body: Any, report: RunReport) -> dict[str, str | None]:
    """Return the valid entries of a GET /species body as key -> label."""
    if not isinstance(body, dict) or not isinstance(body.get("species"), list):
        raise CommandError(
            "invalid_response",
            "the PIMS response to GET /species has no `species` array",
        )
    items: list[Any] = body["species"]
    report.fetched = len(items)
    catalog: dict[str, str | None] = {}
    for index, raw in enumerate(items):
        raw_key = raw.get("key") if isinstance(raw, dict) else None
        shown_key = raw_key if isinstance(raw_key, str) else None
        try:
            item = SpeciesItem.model_validate(raw)
        except ValidationError as exc:
            report.skip(
                index, shown_key, "invalid_item", describe_validation_error(exc)
            )
            continue
        if item.key in catalog:
            report.skip(
                index,
                item.key,
                "duplicate_key",
                "the catalog lists this key more than once; the first entry was used",
            )
            continue
        label = item.label.strip() if item.label else None
        catalog[item.key] = label or None
    return catalog


async def refresh(
    worker: Worker,
    connection: asyncpg.Connection,
    target: PimsTarget,
    report: SpeciesReport,
) -> None:
    """Fetch the catalog, store it with its mappings and resolve waiting patients."""
    body = await worker.pims.get_json(
        target,
        "/species",
        timeout=FETCH_TIMEOUT_SECONDS,
        max_response_bytes=MAX_RESPONSE_BYTES,
        retry=FETCH_RETRY,
    )
    catalog = parse_catalog(body, report)

    async with connection.transaction():
        await connection.executemany(
            UPSERT_SQL,
            [
                (target.clinic_id, key, label, automatic_species(key, label))
                for key, label in catalog.items()
            ],
        )
        rows = await connection.fetch(
            """
            SELECT pims_key, species, manual FROM species_map
            WHERE clinic_id = $1 AND pims_key = ANY($2::text[])
            ORDER BY pims_key
            """,
            target.clinic_id,
            list(catalog),
        )
        report.patients_resolved = await resolve_pending_species(
            connection, target.clinic_id, worker.topology.events
        )

    report.processed = len(catalog)
    report.manual = sum(1 for row in rows if row["manual"])
    report.mapped = sum(1 for row in rows if row["species"] is not None)
    report.unmapped_keys = [row["pims_key"] for row in rows if row["species"] is None]
