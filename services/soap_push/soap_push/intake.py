"""The consumer's handler: validate a soap.push command and record the push.

Recording is all it does, so the message is acknowledged within one database
transaction and no prefetch slot waits on a PIMS. The dispatcher makes the
attempts.
"""

from __future__ import annotations

from typing import Any

import structlog
from aio_pika.abc import AbstractIncomingMessage
from coggo.errors import PermanentMessageError
from coggo.outbox import OutboxRelay
from coggo.schemas.bus import SoapPush
from pydantic import ValidationError

from soap_push import metrics
from soap_push.dispatcher import Dispatcher
from soap_push.store import MAX_VERSION, Intake, PushStore

log = structlog.get_logger(__name__)


def parse_command(body: dict[str, Any]) -> SoapPush:
    """Validate a soap.push command; raise PermanentMessageError naming the field."""
    try:
        command = SoapPush.model_validate(body)
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        path = ".".join(str(part) for part in first["loc"])
        raise PermanentMessageError(
            "invalid_message", f"{path}: {first['msg']}"
        ) from None
    if not command.clinic_id.strip():
        raise PermanentMessageError("invalid_message", "clinicId: must not be empty")
    if command.data.version > MAX_VERSION:
        raise PermanentMessageError(
            "invalid_message", f"data.version: must be at most {MAX_VERSION}"
        )
    return command


class PushIntake:
    """Records each soap.push command as a push and wakes the dispatcher."""

    def __init__(
        self, store: PushStore, dispatcher: Dispatcher, relay: OutboxRelay
    ) -> None:
        self.store = store
        self.dispatcher = dispatcher
        self.relay = relay

    async def __call__(
        self, body: dict[str, Any], message: AbstractIncomingMessage
    ) -> None:
        command = parse_command(body)
        outcome = await self.store.take_in(command, message.body, message.headers)

        if outcome in (Intake.QUEUED, Intake.REQUEUED):
            self.dispatcher.notify()
        elif outcome is Intake.SUPERSEDED:
            self.relay.notify()
            metrics.PUSHES_FINISHED.labels("superseded").inc()

        data = command.data
        bound = log.bind(
            clinic_id=command.clinic_id,
            note_id=data.note_id,
            version=data.version,
            command_id=command.id,
        )
        if outcome is Intake.SUPERSEDED:
            bound.info("push.superseded")
        elif outcome is Intake.DUPLICATE:
            bound.info("push.duplicate")
        elif outcome is Intake.REQUEUED:
            bound.info("push.requeued")
        else:
            bound.debug("push.queued")
