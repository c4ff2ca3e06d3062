"""Applying events straight to the pipeline, and reading back what it stored."""

from __future__ import annotations

from typing import Any

import asyncpg
from coggo.pipeline.upsert import EventContext, apply_event
from coggo.schemas.bus import DomainEvent
from coggo.schemas.partner import EventType, WebhookEvent, parse_event_data

CLINIC = "clinic-1"


async def apply(
    pool: asyncpg.Pool,
    event: dict[str, Any],
    *,
    timezone: str = "UTC",
    clinic: str = CLINIC,
) -> list[DomainEvent]:
    """Validate one webhook event as the ingress does and apply it in one transaction."""
    parsed = WebhookEvent.model_validate(event)
    data = parse_event_data(EventType(parsed.type), parsed.data)
    async with pool.acquire() as connection, connection.transaction():
        context = EventContext(clinic, parsed.id, parsed.occurred_at, timezone)
        return await apply_event(connection, context, EventType(parsed.type), data)


async def snapshot(pool: asyncpg.Pool) -> dict[str, Any]:
    """The whole stored state, with Coggo's random ids replaced by external ids."""
    clients = {
        row["external_id"]: {
            k: v for k, v in row.items() if k not in ("id", "created_at", "updated_at")
        }
        for row in await pool.fetch("SELECT * FROM clients")
    }
    patient_ids = {
        row["id"]: row["external_id"]
        for row in await pool.fetch("SELECT id, external_id FROM patients")
    }
    client_ids = {
        row["id"]: row["external_id"]
        for row in await pool.fetch("SELECT id, external_id FROM clients")
    }
    patients = {}
    for row in await pool.fetch("SELECT * FROM patients"):
        values = {
            k: v for k, v in row.items() if k not in ("id", "created_at", "updated_at")
        }
        values["client_id"] = client_ids.get(row["client_id"])
        values["merged_into_id"] = patient_ids.get(row["merged_into_id"])
        patients[row["external_id"]] = values
    appointments = {}
    for row in await pool.fetch("SELECT * FROM appointments"):
        values = {
            k: v for k, v in row.items() if k not in ("id", "created_at", "updated_at")
        }
        values["patient_id"] = patient_ids.get(row["patient_id"])
        appointments[row["external_id"]] = values
    visits = {}
    for row in await pool.fetch(
        "SELECT v.*, a.external_id AS appointment FROM visits v JOIN appointments a ON a.id = v.appointment_id"
    ):
        visits[row["appointment"]] = {
            "status": row["status"],
            "scheduled_at": row["scheduled_at"],
            "patient": patient_ids.get(row["patient_id"]),
        }
    breeds = sorted(
        tuple(row)
        for row in await pool.fetch("SELECT clinic_id, species, folded FROM breeds")
    )
    colors = sorted(
        tuple(row) for row in await pool.fetch("SELECT clinic_id, folded FROM colors")
    )
    return {
        "clients": clients,
        "patients": patients,
        "appointments": appointments,
        "visits": visits,
        "breeds": breeds,
        "colors": colors,
    }


async def row(pool: asyncpg.Pool, table: str, external_id: str) -> asyncpg.Record:
    assert table in ("clients", "patients", "appointments")
    found = await pool.fetchrow(
        f"SELECT * FROM {table} WHERE external_id = $1", external_id
    )
    assert found is not None, f"no {table} row for {external_id}"
    return found


async def visit(pool: asyncpg.Pool, appointment: str) -> asyncpg.Record | None:
    return await pool.fetchrow(
        """
        SELECT v.*, p.external_id AS patient FROM visits v
        JOIN appointments a ON a.id = v.appointment_id
        LEFT JOIN patients p ON p.id = v.patient_id
        WHERE a.external_id = $1
        """,
        appointment,
    )


def types(events: list[DomainEvent]) -> list[str]:
    return [event.type for event in events]
