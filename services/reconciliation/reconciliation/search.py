"""`patients.search`: search a clinic's PIMS for patients and reply within 2 seconds.

The reply is a `patients.search.result` message. On success its data contains
up to 20 patients, each normalized as Coggo would store it: species through the
clinic's species map, weight in kilograms, and a birth date estimated from an
age. Each also carries its owner and the validated PIMS record, which
`patients.import` accepts as it is.
Items that are not a valid PatientWithOwner are dropped and counted. On
failure the data contains `error` (such as `pims_timeout`, `pims_unavailable`,
`integration_paused`, `no_base_url` or `invalid_query`) and `detail`.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg
import structlog
from aio_pika.abc import AbstractIncomingMessage
from coggo.errors import PermanentMessageError
from coggo.pipeline.normalize import birth_date_from_age, weight_in_kg
from coggo.pipeline.species import resolve_species
from coggo.schemas.bus import utc_now
from coggo.schemas.partner import PatientWithOwner
from pydantic import ValidationError

from reconciliation import metrics
from reconciliation.errors import CommandError
from reconciliation.integration import PimsTarget, load_target
from reconciliation.replies import error_data, send_reply
from reconciliation.worker import Command, Worker

log = structlog.get_logger(__name__)

REPLY_TYPE = "patients.search.result"
# The Partner API promises the reply within 2 s; the rest is kept for
# publishing it.
BUDGET_SECONDS = 1.7
MIN_QUERY_LENGTH = 2
MAX_QUERY_LENGTH = 200
MAX_RESULTS = 20
MAX_RESPONSE_BYTES = 1024 * 1024


class SearchClock:
    """The time left of one search's budget, and what it was doing last."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.phase = "start"

    def remaining(self) -> float:
        return BUDGET_SECONDS - (time.monotonic() - self.started)

    def elapsed_ms(self) -> int:
        return round((time.monotonic() - self.started) * 1000)


async def handle_search(
    worker: Worker, body: dict[str, Any], message: AbstractIncomingMessage
) -> None:
    """Run one search and always send a reply, with results or an error."""
    if not message.reply_to:
        raise PermanentMessageError(
            "missing_reply_to",
            "patients.search is request/reply: set the reply_to property to "
            "the queue that receives the result",
        )
    clock = SearchClock()
    command_id = body.get("id") or message.message_id
    raw_clinic_id = body.get("clinicId")
    clinic_id = raw_clinic_id if isinstance(raw_clinic_id, str) else ""
    try:
        async with asyncio.timeout(BUDGET_SECONDS):
            command = _parse_command(body, message)
            data = await search(worker, command, clock)
    except CommandError as exc:
        data = error_data(command_id, exc)
    except TimeoutError:
        data = error_data(command_id, _budget_error(clock))
    except Exception:
        log.exception("search.failed", clinic_id=clinic_id, command_id=command_id)
        data = error_data(
            command_id,
            CommandError(
                "internal_error",
                "the search failed inside Coggo; see the reconciliation worker's log",
            ),
        )
    data["durationMs"] = clock.elapsed_ms()

    await send_reply(
        worker.broker, message, reply_type=REPLY_TYPE, clinic_id=clinic_id, data=data
    )
    result = "ok" if data["ok"] else data["error"]
    metrics.SEARCHES.labels(result).inc()
    metrics.SEARCH_SECONDS.observe(time.monotonic() - clock.started)
    # The query may be a name, e-mail address or phone number: it is never logged.
    log.info(
        "search.replied",
        clinic_id=clinic_id,
        command_id=command_id,
        result=result,
        results=len(data.get("patients", [])),
        duration_ms=data["durationMs"],
    )


def _parse_command(body: dict[str, Any], message: AbstractIncomingMessage) -> Command:
    try:
        return Command.from_message(body, message)
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        field = ".".join(str(part) for part in first["loc"])
        raise CommandError(
            "invalid_command", f"{field}: {first['msg']}; send id, clinicId and data.q"
        ) from None


def _budget_error(clock: SearchClock) -> CommandError:
    if clock.phase == "pims":
        return CommandError(
            "pims_timeout",
            f"the PIMS search timed out after {BUDGET_SECONDS} s",
        )
    return CommandError(
        "internal_error",
        f"the search did not finish within {BUDGET_SECONDS} s while reading "
        f"the {clock.phase}; try again",
    )


def parse_query(data: dict[str, Any]) -> str:
    """Return `data.q` trimmed; raise CommandError unless it has 2 to 200 characters."""
    value = data.get("q")
    if not isinstance(value, str):
        raise CommandError(
            "invalid_query",
            f"data.q must be a string of at least {MIN_QUERY_LENGTH} characters",
        )
    query = value.strip()
    if len(query) < MIN_QUERY_LENGTH:
        raise CommandError(
            "invalid_query",
            f"data.q must be at least {MIN_QUERY_LENGTH} characters after trimming "
            f"spaces; it has {len(query)}",
        )
    if len(query) > MAX_QUERY_LENGTH:
        raise CommandError(
            "invalid_query",
            f"data.q must be at most {MAX_QUERY_LENGTH} characters; it has {len(query)}",
        )
    return query


async def search(
    worker: Worker, command: Command, clock: SearchClock
) -> dict[str, Any]:
    """Search the PIMS and return the reply data; raise CommandError on failure."""
    query = parse_query(command.data)

    clock.phase = "integration"
    async with worker.pool.acquire(timeout=clock.remaining()) as connection:
        target = await load_target(connection, worker.box, command.clinic_id)
        species_rows = await connection.fetch(
            "SELECT pims_key, label, species FROM species_map WHERE clinic_id = $1",
            command.clinic_id,
        )

    clock.phase = "pims"
    body = await worker.pims.get_json(
        target,
        "/patients",
        params={"q": query},
        timeout=max(clock.remaining(), 0.05),
        max_response_bytes=MAX_RESPONSE_BYTES,
    )
    fetched_at = utc_now()
    results, dropped = normalize_results(body, species_rows, fetched_at)
    truncated = max(0, len(results) - MAX_RESULTS)
    results = results[:MAX_RESULTS]

    clock.phase = "stored patients"
    try:
        await asyncio.wait_for(
            _mark_known_patients(worker.pool, target, results),
            timeout=max(clock.remaining() - 0.05, 0.01),
        )
    except TimeoutError:
        # The results are still worth sending; only `patientId` stays null.
        log.warning("search.known_patients_timed_out", clinic_id=target.clinic_id)
    return {
        "ok": True,
        "commandId": command.id,
        "patients": results,
        "count": len(results),
        "dropped": dropped,
        "truncated": truncated,
    }


def normalize_results(
    body: Any, species_rows: list[asyncpg.Record], fetched_at: Any
) -> tuple[list[dict[str, Any]], int]:
    """Normalize the valid patients of a GET /patients body; return them and the dropped count."""
    if not isinstance(body, dict) or not isinstance(body.get("patients"), list):
        raise CommandError(
            "invalid_response",
            "the PIMS response to GET /patients has no `patients` array",
        )
    species_map = {row["pims_key"]: row["species"] for row in species_rows}
    labels = {row["pims_key"]: row["label"] for row in species_rows}
    results = []
    dropped = 0
    for raw in body["patients"]:
        try:
            patient = PatientWithOwner.model_validate(raw)
            results.append(normalize_patient(patient, species_map, labels, fetched_at))
        except (ValidationError, ValueError):
            dropped += 1
    return results, dropped


def _text(value: str | None) -> str | None:
    if value is None:
        return None
    return " ".join(value.split()) or None


def normalize_patient(
    patient: PatientWithOwner,
    species_map: dict[str, str | None],
    labels: dict[str, str | None],
    fetched_at: Any,
) -> dict[str, Any]:
    """Describe one PIMS patient as Coggo would store it; raise ValueError if invalid."""
    species_key = _text(patient.species_key)
    species_name = _text(patient.species)
    species = resolve_species(species_key, species_name, species_map)

    birth_date = patient.date_of_birth
    estimated = False
    if birth_date is None and patient.age is not None:
        birth_date = birth_date_from_age(patient.age, fetched_at)
        estimated = True

    return {
        "patientId": None,
        "externalId": patient.external_id,
        "name": patient.name,
        "species": species,
        "speciesResolved": species is not None,
        "speciesKey": species_key,
        "speciesLabel": labels.get(species_key) if species_key else None,
        "speciesName": species_name,
        "breed": _text(patient.breed),
        "color": _text(patient.color),
        "sex": patient.sex.value if patient.sex else None,
        "reproductiveStatus": patient.reproductive_status.value
        if patient.reproductive_status
        else None,
        "dateOfBirth": birth_date.isoformat() if birth_date else None,
        "dateOfBirthEstimated": estimated,
        "weightKg": weight_in_kg(patient.weight, patient.weight_kg),
        "owner": patient.owner.wire(),
        "record": patient.wire(),
    }


async def _mark_known_patients(
    pool: asyncpg.Pool,
    target: PimsTarget,
    results: list[dict[str, Any]],
) -> None:
    """Fill `patientId` for patients Coggo already stores, so they need no import."""
    if not results:
        return
    async with pool.acquire() as connection:
        rows = await connection.fetch(
            """
            SELECT external_id, id FROM patients
            WHERE clinic_id = $1 AND external_id = ANY($2::text[])
            """,
            target.clinic_id,
            [result["externalId"] for result in results],
        )
    known = {row["external_id"]: str(row["id"]) for row in rows}
    for result in results:
        result["patientId"] = known.get(result["externalId"])
