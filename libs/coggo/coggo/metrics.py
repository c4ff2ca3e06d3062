"""Prometheus metrics shared by the services.

Every process exposes the default registry on /metrics: the ingress on its own
port, workers on COGGO_METRICS_PORT. Label values come from small fixed sets
(routes, queue names, reasons, results) and never from payloads, so the number
of series stays bounded.
"""

from __future__ import annotations

import time

import asyncpg
from prometheus_client import Counter, Gauge, Histogram

HTTP_REQUESTS = Counter(
    "coggo_http_requests_total",
    "HTTP requests handled, by route template and status code",
    ["route", "status"],
)
HTTP_LATENCY = Histogram(
    "coggo_http_request_seconds",
    "Time to handle an HTTP request",
    ["route"],
    buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
EVENTS_ACCEPTED = Counter(
    "coggo_events_accepted_total",
    "Webhook events accepted by the ingress, by event type and duplicate flag",
    ["type", "duplicate"],
)

# Consumers: one outcome per delivery, counted by coggo.consumer.Consumer.
MESSAGES_PROCESSED = Counter(
    "coggo_messages_processed_total",
    "Bus messages processed and acknowledged",
    ["queue"],
)
MESSAGES_FAILED = Counter(
    "coggo_messages_failed_total",
    "Bus messages returned to their queue after a failure",
    ["queue"],
)
MESSAGES_DEAD_LETTERED = Counter(
    "coggo_messages_dead_lettered_total",
    "Bus messages dead-lettered by a consumer, by reason",
    ["queue", "reason"],
)
MESSAGES_IN_FLIGHT = Gauge(
    "coggo_messages_in_flight",
    "Bus messages received and not yet settled",
    ["queue"],
)

OUTBOX_PUBLISHED = Counter(
    "coggo_outbox_published_total", "Outbox rows published and confirmed"
)
OUTBOX_BACKLOG = Gauge(
    "coggo_outbox_backlog",
    "Outbox rows waiting to be published, sampled by the relay of this process",
)

# SOAP pushes. `result` is one of: sent (the PIMS returned 2xx), retry (the
# attempt failed and another is scheduled), failed (the last attempt failed).
PUSH_ATTEMPTS = Counter(
    "coggo_push_attempts_total",
    "SOAP push attempts to a PIMS, by result",
    ["result"],
)

# Reconciliations (reconcile.appointments). `result` is completed or failed.
RECONCILE_SECONDS = Histogram(
    "coggo_reconcile_seconds",
    "Duration of one appointment reconciliation with a PIMS",
    ["result"],
    buckets=(0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0),
)

# Series for every known result exist from the start, at zero, so that a rate
# over them is defined before the first push or reconciliation.
for _result in ("sent", "retry", "failed"):
    PUSH_ATTEMPTS.labels(_result)
for _result in ("completed", "failed"):
    RECONCILE_SECONDS.labels(_result)

# The relay samples the backlog at most this often, so that a large backlog
# does not add a full count(*) to every batch it publishes.
OUTBOX_BACKLOG_SAMPLE_SECONDS = 1.0
_backlog_sampled_at = float("-inf")


async def sample_outbox_backlog(connection: asyncpg.Pool | asyncpg.Connection) -> None:
    """Set OUTBOX_BACKLOG from the outbox table, at most once a second."""
    global _backlog_sampled_at
    now = time.monotonic()
    if now - _backlog_sampled_at < OUTBOX_BACKLOG_SAMPLE_SECONDS:
        return
    _backlog_sampled_at = now
    backlog = await connection.fetchval("SELECT count(*) FROM outbox")
    OUTBOX_BACKLOG.set(backlog)
