"""Prometheus metrics of the SOAP-push dispatcher.

Attempts by result are counted in coggo.metrics.PUSH_ATTEMPTS, shared with the
other services. These add the dispatcher's own figures.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

PUSH_ATTEMPT_SECONDS = Histogram(
    "coggo_push_attempt_seconds",
    "Time from the start of a push attempt to the PIMS's response or the error",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
PUSHES_FINISHED = Counter(
    "coggo_pushes_finished_total",
    "SOAP pushes that reached a final state (sent, failed or superseded)",
    ["state"],
)
PUSH_ATTEMPTS_IN_FLIGHT = Gauge(
    "coggo_push_attempts_in_flight", "SOAP push attempts running in this process"
)
