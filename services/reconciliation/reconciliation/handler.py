"""Dispatch of the commands on the coggo.reconciliation queue to their use cases."""

from __future__ import annotations

from typing import Any

import structlog
from aio_pika.abc import AbstractIncomingMessage
from coggo.errors import PermanentMessageError
from pydantic import ValidationError

from reconciliation.appointments import handle_reconcile
from reconciliation.importing import handle_import
from reconciliation.search import handle_search
from reconciliation.species import handle_refresh
from reconciliation.validation import describe_validation_error
from reconciliation.worker import Command, Worker

log = structlog.get_logger(__name__)

COMMAND_TYPES = (
    "reconcile.appointments",
    "species.refresh",
    "patients.search",
    "patients.import",
)


class CommandHandler:
    """The consumer's handler: one call per command message."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    async def __call__(
        self, body: dict[str, Any], message: AbstractIncomingMessage
    ) -> None:
        command_type = body.get("type") or message.routing_key
        if command_type not in COMMAND_TYPES:
            raise PermanentMessageError(
                "unknown_command",
                f"type {str(command_type)[:60]!r} is not one of {', '.join(COMMAND_TYPES)}",
            )

        # A search always gets a reply, even to an invalid envelope.
        if command_type == "patients.search":
            await handle_search(self.worker, body, message)
        else:
            command = _parse(body, message)
            if command_type == "reconcile.appointments":
                await handle_reconcile(self.worker, command)
            elif command_type == "species.refresh":
                await handle_refresh(self.worker, command)
            else:
                await handle_import(self.worker, command, message)


def _parse(body: dict[str, Any], message: AbstractIncomingMessage) -> Command:
    # Without a valid clinicId there is no clinic to send an event to, so the
    # command goes to the dead-letter queue where an operator sees it.
    try:
        return Command.from_message(body, message)
    except ValidationError as exc:
        raise PermanentMessageError(
            "invalid_command", describe_validation_error(exc)
        ) from None
