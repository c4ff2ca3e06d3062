"""Replies to request/reply commands, sent to the queue named in `reply_to`.

A reply goes to the default exchange with the request's `reply_to` as routing
key and its `correlation_id` (or, without one, its `message_id`). It is not
mandatory and not stored in the outbox: a requester that has stopped waiting
has no use for it.
"""

from __future__ import annotations

from typing import Any

import structlog
from aio_pika.abc import AbstractIncomingMessage
from coggo.broker import Broker
from coggo.schemas.bus import BusMessage

from reconciliation.errors import CommandError

log = structlog.get_logger(__name__)

DEFAULT_EXCHANGE = ""


class Reply(BusMessage):
    data: dict[str, Any]


def error_data(command_id: str | None, error: CommandError) -> dict[str, Any]:
    return {
        "ok": False,
        "commandId": command_id,
        "error": error.code,
        "detail": error.detail,
    }


async def send_reply(
    broker: Broker,
    request: AbstractIncomingMessage,
    *,
    reply_type: str,
    clinic_id: str,
    data: dict[str, Any],
) -> None:
    """Publish the reply to `request`, which must have `reply_to`."""
    assert request.reply_to
    reply = Reply(type=reply_type, clinic_id=clinic_id, data=data)
    await broker.publish(
        DEFAULT_EXCHANGE,
        request.reply_to,
        reply.to_bytes(),
        message_id=reply.id,
        correlation_id=request.correlation_id or request.message_id,
        mandatory=False,
    )
