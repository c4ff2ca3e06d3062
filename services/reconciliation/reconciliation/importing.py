"""`patients.import`: store a patient found by a PIMS search, with its owner.

The patient goes through the webhook pipeline as a `patient.updated` event
with the owner as its client, id `import:<command id>` and the command's
occurredAt. The pipeline upserts the owner first, then the patient, and
`client.upserted` and `patient.upserted` are written to the outbox in the same
transaction. A command is applied once, however often it is delivered.

With `reply_to` set, a `patients.import.result` reply carries the stored ids
or the error. Without it, a command that cannot be applied (invalid patient,
unknown or paused integration) is dead-lettered with the error code as reason.
"""

from __future__ import annotations

from typing import Any

import asyncpg
import structlog
from aio_pika.abc import AbstractIncomingMessage
from coggo.errors import PermanentMessageError
from coggo.outbox import enqueue_events
from coggo.pipeline.upsert import EventContext, apply_event
from coggo.schemas.bus import PatientsImportData
from coggo.schemas.partner import EventType, parse_event_data
from pydantic import ValidationError

from reconciliation import metrics
from reconciliation.errors import CommandError
from reconciliation.integration import load_active
from reconciliation.replies import error_data, send_reply
from reconciliation.validation import describe_validation_error
from reconciliation.worker import Command, Worker

log = structlog.get_logger(__name__)

REPLY_TYPE = "patients.import.result"
# The name under which this worker records the commands it applied.
CONSUMER_NAME = "reconciliation"


async def handle_import(
    worker: Worker, command: Command, message: AbstractIncomingMessage
) -> None:
    bound = log.bind(clinic_id=command.clinic_id, command_id=command.id)
    try:
        data = await import_patient(worker, command)
    except CommandError as exc:
        metrics.IMPORTS.labels(exc.code).inc()
        bound.warning("import.failed", error=exc.code, detail=exc.detail)
        if not message.reply_to:
            raise PermanentMessageError(exc.code, exc.detail) from None
        data = error_data(command.id, exc)
    else:
        metrics.IMPORTS.labels("ok").inc()
        bound.info("import.applied", patient_id=data["patientId"])

    if message.reply_to:
        await send_reply(
            worker.broker,
            message,
            reply_type=REPLY_TYPE,
            clinic_id=command.clinic_id,
            data=data,
        )


async def import_patient(worker: Worker, command: Command) -> dict[str, Any]:
    """Apply the import; return the reply data with the stored ids."""
    try:
        patient = PatientsImportData.model_validate(command.data).patient
        # The owner is authoritative for a PatientWithOwner.
        patient = patient.model_copy(
            update={"external_client_id": patient.owner.external_id}
        )
        data = parse_event_data(
            EventType.PATIENT_UPDATED,
            {
                "patient": patient.wire(exclude={"owner"}),
                "client": patient.owner.wire(),
            },
        )
    except ValidationError as exc:
        raise CommandError(
            "invalid_patient",
            f"data.{describe_validation_error(exc)}; send a PatientWithOwner "
            "as data.patient",
        ) from None

    async with worker.pool.acquire() as connection:
        integration = await load_active(connection, command.clinic_id)
        async with connection.transaction():
            first = await connection.fetchval(
                """
                INSERT INTO processed_messages (consumer, message_id) VALUES ($1, $2)
                ON CONFLICT DO NOTHING RETURNING true
                """,
                CONSUMER_NAME,
                command.id,
            )
            if first:
                context = EventContext(
                    clinic_id=command.clinic_id,
                    event_id=f"import:{command.id}",
                    occurred_at=command.occurred_at,
                    default_timezone=integration["default_timezone"] or "UTC",
                )
                try:
                    events = await apply_event(
                        connection, context, EventType.PATIENT_UPDATED, data
                    )
                except PermanentMessageError as exc:
                    raise CommandError(exc.reason, exc.detail) from None
                await enqueue_events(connection, worker.topology.events, events)
        if first:
            worker.relay.notify()
        return await _stored_ids(connection, command, patient.external_id)


async def _stored_ids(
    connection: asyncpg.Connection, command: Command, external_id: str
) -> dict[str, Any]:
    row = await connection.fetchrow(
        """
        SELECT id, client_id, external_client_id, merged_into_id FROM patients
        WHERE clinic_id = $1 AND external_id = $2
        """,
        command.clinic_id,
        external_id,
    )
    if row is None:
        raise CommandError(
            "not_stored",
            "the patient of this import is not stored; send the import again",
        )
    return {
        "ok": True,
        "commandId": command.id,
        "patientId": str(row["merged_into_id"] or row["id"]),
        "externalPatientId": external_id,
        "clientId": str(row["client_id"]) if row["client_id"] else None,
        "externalClientId": row["external_client_id"],
    }
