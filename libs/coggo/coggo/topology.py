"""The RabbitMQ topology: exchanges, queues, bindings and dead-lettering.

Every service declares the whole topology when it connects. Declarations are
idempotent, so any replica may start first and no publish finds a missing queue.

Work queues are quorum queues with a delivery limit and at-least-once
dead-lettering (RabbitMQ 3.10 and later): a message that exceeds the limit, or
that a consumer dead-letters as permanently invalid, reaches `<queue>.dlq`
through `coggo.dead-letter` with the queue name as routing key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel

WEBHOOKS_EXCHANGE = "coggo.webhooks"
COMMANDS_EXCHANGE = "coggo.commands"
EVENTS_EXCHANGE = "coggo.events"
DEAD_LETTER_EXCHANGE = "coggo.dead-letter"

PATIENT_UPSERT_QUEUE = "coggo.patient-upsert"
RECONCILIATION_QUEUE = "coggo.reconciliation"
SOAP_PUSH_QUEUE = "coggo.soap-push"

# Redeliveries before the broker dead-letters a message. Consumers retry
# transient faults in process first, so reaching this means something is wrong.
DELIVERY_LIMIT = 10
DEAD_LETTER_DELIVERY_LIMIT = 1_000_000

# Headers of our own: the broker rewrites x-death, so we keep our counts here.
REASON_HEADER = "x-coggo-reason"
ERROR_HEADER = "x-coggo-error"
ORIGINAL_EXCHANGE_HEADER = "x-coggo-original-exchange"
ORIGINAL_ROUTING_KEY_HEADER = "x-coggo-original-routing-key"
REPLAY_COUNT_HEADER = "x-coggo-replay-count"


def dead_letter_queue_arguments() -> dict[str, Any]:
    # RabbitMQ 4.0 to 4.2 give quorum queues a default delivery limit of 20,
    # and reading a dead letter without acknowledging it (coggo-dlq list and
    # show) counts as a delivery there. A limit this high keeps dead letters
    # where they are instead of dropping them.
    return {"x-queue-type": "quorum", "x-delivery-limit": DEAD_LETTER_DELIVERY_LIMIT}


@dataclass(frozen=True)
class QueueSpec:
    name: str
    exchange: str
    routing_keys: tuple[str, ...]
    arguments: dict[str, Any] = field(default_factory=dict)

    @property
    def dead_letter_queue(self) -> str:
        return f"{self.name}.dlq"


def work_queue_arguments(name: str, dead_letter_exchange: str) -> dict[str, Any]:
    return {
        "x-queue-type": "quorum",
        "x-delivery-limit": DELIVERY_LIMIT,
        "x-dead-letter-exchange": dead_letter_exchange,
        "x-dead-letter-routing-key": name,
        "x-dead-letter-strategy": "at-least-once",
        # At-least-once dead-lettering requires reject-publish overflow.
        "x-overflow": "reject-publish",
    }


@dataclass(frozen=True)
class Topology:
    """The names of every exchange and queue, under an optional prefix.

    The prefix is empty in production. Tests give each case its own prefix so
    that cases sharing one broker never see each other's messages.
    """

    prefix: str = ""

    def name(self, base: str) -> str:
        return f"{self.prefix}{base}"

    @property
    def webhooks(self) -> str:
        return self.name(WEBHOOKS_EXCHANGE)

    @property
    def commands(self) -> str:
        return self.name(COMMANDS_EXCHANGE)

    @property
    def events(self) -> str:
        return self.name(EVENTS_EXCHANGE)

    @property
    def dead_letter(self) -> str:
        return self.name(DEAD_LETTER_EXCHANGE)

    @property
    def exchanges(self) -> dict[str, aio_pika.ExchangeType]:
        return {
            self.webhooks: aio_pika.ExchangeType.TOPIC,
            self.commands: aio_pika.ExchangeType.DIRECT,
            self.events: aio_pika.ExchangeType.TOPIC,
            self.dead_letter: aio_pika.ExchangeType.DIRECT,
        }

    @property
    def queues(self) -> tuple[QueueSpec, ...]:
        return tuple(
            QueueSpec(
                self.name(queue),
                self.name(exchange),
                keys,
                work_queue_arguments(self.name(queue), self.dead_letter),
            )
            for queue, exchange, keys in _WORK_QUEUES
        )

    def queue(self, base: str) -> QueueSpec:
        for spec in self.queues:
            if spec.name == self.name(base):
                return spec
        raise KeyError(f"no work queue named {base!r}")

    async def declare(self, channel: AbstractChannel) -> None:
        """Declare every exchange, queue and binding; safe to run on every start."""
        exchanges = {}
        for name, kind in self.exchanges.items():
            exchanges[name] = await channel.declare_exchange(name, kind, durable=True)

        for spec in self.queues:
            queue = await channel.declare_queue(
                spec.name, durable=True, arguments=spec.arguments
            )
            for key in spec.routing_keys:
                await queue.bind(exchanges[spec.exchange], routing_key=key)

            dead_letters = await channel.declare_queue(
                spec.dead_letter_queue,
                durable=True,
                arguments=dead_letter_queue_arguments(),
            )
            await dead_letters.bind(exchanges[self.dead_letter], routing_key=spec.name)

    async def delete(self, channel: AbstractChannel) -> None:
        """Remove everything `declare` made; used by tests to clean up."""
        for spec in self.queues:
            await channel.queue_delete(spec.name)
            await channel.queue_delete(spec.dead_letter_queue)
        for name in self.exchanges:
            await channel.exchange_delete(name)


WEBHOOK_EVENT_TYPES = (
    "appointment.created",
    "appointment.updated",
    "appointment.cancelled",
    "client.updated",
    "patient.updated",
    "patient.merged",
)

_WORK_QUEUES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    (PATIENT_UPSERT_QUEUE, WEBHOOKS_EXCHANGE, WEBHOOK_EVENT_TYPES),
    (
        RECONCILIATION_QUEUE,
        COMMANDS_EXCHANGE,
        (
            "reconcile.appointments",
            "species.refresh",
            "patients.search",
            "patients.import",
        ),
    ),
    (SOAP_PUSH_QUEUE, COMMANDS_EXCHANGE, ("soap.push",)),
)
