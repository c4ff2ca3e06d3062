"""coggo-admin patient|visit|push show: read-only views of stored records.

The views carry ids, states and the animal's details; client contact details
are never printed.
"""

from __future__ import annotations

import argparse
from datetime import date, datetime
from typing import Any

import asyncpg

from coggo_admin.common import (
    AdminError,
    add_clinic_argument,
    add_json_flag,
    database,
    emit,
    find_integration,
    timestamp,
)

# Column types `push show` leaves out: encrypted values, bodies and envelopes.
_HIDDEN_TYPES = frozenset({"bytea", "json", "jsonb"})


def _plain(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def _lines(data: dict[str, Any], width: int = 24) -> list[str]:
    return [
        f"{name + ':':<{width}} {'-' if value is None else value}"
        for name, value in data.items()
    ]


async def patient_show(args: argparse.Namespace) -> int:
    async with database() as connection:
        await find_integration(connection, args.clinic_id)
        row = await connection.fetchrow(
            """
            SELECT p.*, c.external_id AS client_external_id,
                   s.external_id AS merged_into_external_id,
                   (SELECT count(*) FROM appointments a WHERE a.patient_id = p.id)
                       AS appointments
            FROM patients p
            LEFT JOIN clients c ON c.id = p.client_id
            LEFT JOIN patients s ON s.id = p.merged_into_id
            WHERE p.clinic_id = $1 AND p.external_id = $2
            """,
            args.clinic_id,
            args.external_id,
        )
    if row is None:
        raise AdminError(
            f"no patient with external id {args.external_id!r} in clinic "
            f"{args.clinic_id}: the id is the PIMS's own, as sent in "
            "data.patient.externalId"
        )
    data = {
        "patientId": str(row["id"]),
        "clinicId": row["clinic_id"],
        "externalId": row["external_id"],
        "externalClientId": row["client_external_id"] or row["external_client_id"],
        "name": row["name"],
        "species": row["species"],
        "speciesKey": row["species_key"],
        "speciesRaw": row["species_raw"],
        "speciesResolved": row["species_resolved"],
        "breed": row["breed"],
        "color": row["color"],
        "sex": row["sex"],
        "reproductiveStatus": row["reproductive_status"],
        "dateOfBirth": _plain(row["date_of_birth"]),
        "dateOfBirthEstimated": row["date_of_birth_estimated"],
        "weightKg": row["weight_kg"],
        "mergedIntoExternalId": row["merged_into_external_id"],
        "appointments": row["appointments"],
        "createdAt": timestamp(row["created_at"]),
        "updatedAt": timestamp(row["updated_at"]),
    }
    emit(args, data, _lines(data))
    return 0


async def visit_show(args: argparse.Namespace) -> int:
    async with database() as connection:
        await find_integration(connection, args.clinic_id)
        row = await connection.fetchrow(
            """
            SELECT a.id AS appointment_id, a.external_id, a.starts_at_local,
                   a.timezone, a.starts_at, a.duration_minutes, a.reason,
                   a.external_staff_id, a.status AS appointment_status,
                   v.id AS visit_id, v.status AS visit_status, v.scheduled_at,
                   v.updated_at AS visit_updated_at,
                   p.external_id AS patient_external_id
            FROM appointments a
            LEFT JOIN visits v ON v.appointment_id = a.id
            LEFT JOIN patients p ON p.id = coalesce(v.patient_id, a.patient_id)
            WHERE a.clinic_id = $1 AND a.external_id = $2
            """,
            args.clinic_id,
            args.external_id,
        )
    if row is None:
        raise AdminError(
            f"no appointment with external id {args.external_id!r} in clinic "
            f"{args.clinic_id}: a visit is found by its appointment's external id, "
            "as sent in data.appointment.externalId"
        )
    data = {
        "visitId": None if row["visit_id"] is None else str(row["visit_id"]),
        "status": row["visit_status"],
        "scheduledAt": timestamp(row["scheduled_at"]),
        "externalAppointmentId": row["external_id"],
        "appointmentStatus": row["appointment_status"],
        "startsAtLocal": _plain(row["starts_at_local"]),
        "timezone": row["timezone"],
        "durationMinutes": row["duration_minutes"],
        "reason": row["reason"],
        "externalStaffId": row["external_staff_id"],
        "externalPatientId": row["patient_external_id"],
        "updatedAt": timestamp(row["visit_updated_at"]),
    }
    emit(args, data, _lines(data))
    return 0


async def _push_columns(connection: asyncpg.Connection) -> dict[str, str]:
    rows = await connection.fetch(
        """
        SELECT column_name, data_type FROM information_schema.columns
        WHERE table_name = 'pushes' AND table_schema = current_schema()
        ORDER BY ordinal_position
        """
    )
    return {row["column_name"]: row["data_type"] for row in rows}


async def push_show(args: argparse.Namespace) -> int:
    async with database() as connection:
        await find_integration(connection, args.clinic_id)
        columns = await _push_columns(connection)
        if not columns:
            raise AdminError(
                "this database stores no SOAP pushes yet (it has no pushes table): "
                "run `coggo-admin db upgrade` with a release that includes the "
                "soap-push service, then try again"
            )
        if "note_id" not in columns or "clinic_id" not in columns:
            raise AdminError(
                "the pushes table has no note_id or clinic_id column: this "
                "coggo-admin does not match the database schema; upgrade both"
            )
        visible = [name for name, kind in columns.items() if kind not in _HIDDEN_TYPES]
        conditions = ["clinic_id = $1", "note_id::text = $2"]
        values: list[Any] = [args.clinic_id, args.note_id]
        if args.version is not None:
            if "version" not in columns:
                raise AdminError(
                    "the pushes table has no version column: omit --version"
                )
            conditions.append("version::text = $3")
            values.append(str(args.version))
        order = "version" if "version" in columns else "1"
        # Column names come from information_schema, quoted; values are parameters.
        select = ", ".join(f'"{name}"' for name in visible)
        rows = await connection.fetch(
            f"SELECT {select} FROM pushes WHERE {' AND '.join(conditions)} "
            f"ORDER BY {order}",
            *values,
        )
    if not rows:
        raise AdminError(
            f"no push of note {args.note_id!r} in clinic {args.clinic_id}"
            + (f" with version {args.version}" if args.version is not None else "")
            + ": check the note id Coggo sent in the soap.push command"
        )
    pushes = [{name: _plain(row[name]) for name in visible} for row in rows]
    lines: list[str] = []
    for push in pushes:
        lines += [*_lines(push), ""]
    emit(
        args,
        {"clinicId": args.clinic_id, "noteId": args.note_id, "pushes": pushes},
        lines[:-1],
    )
    return 0


def register(groups: Any) -> None:
    patient = groups.add_parser(
        "patient", help="stored patients", description="Read stored patients."
    )
    patient_verbs = patient.add_subparsers(dest="verb", required=True, metavar="VERB")
    show_patient = patient_verbs.add_parser(
        "show", help="show a patient by the PIMS's external id"
    )
    show_patient.add_argument(
        "--external-id", required=True, help="the PIMS's id of the patient"
    )
    show_patient.set_defaults(run=patient_show)

    visit = groups.add_parser(
        "visit", help="stored visits", description="Read stored visits."
    )
    visit_verbs = visit.add_subparsers(dest="verb", required=True, metavar="VERB")
    show_visit = visit_verbs.add_parser(
        "show", help="show a visit by its appointment's external id"
    )
    show_visit.add_argument(
        "--external-id", required=True, help="the PIMS's id of the appointment"
    )
    show_visit.set_defaults(run=visit_show)

    push = groups.add_parser(
        "push", help="SOAP pushes", description="Read stored SOAP pushes."
    )
    push_verbs = push.add_subparsers(dest="verb", required=True, metavar="VERB")
    show_push = push_verbs.add_parser(
        "show",
        help="show the pushes of a note, one per version; bodies are left out",
    )
    show_push.add_argument("--note-id", required=True, help="Coggo's id of the note")
    show_push.add_argument("--version", type=int, help="only this version of the note")
    show_push.set_defaults(run=push_show)

    for verb in (show_patient, show_visit, show_push):
        add_clinic_argument(verb)
        add_json_flag(verb)
