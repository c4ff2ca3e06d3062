"""Prometheus metrics of the reconciliation worker."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

RUNS = Counter(
    "coggo_reconciliation_runs_total",
    "Appointment reconciliations and species refreshes, by outcome",
    ["kind", "status"],
)
ITEMS = Counter(
    "coggo_reconciliation_items_total",
    "Appointments from a PIMS list, by what a reconciliation did with them",
    ["outcome"],
)
SEARCHES = Counter(
    "coggo_patient_searches_total",
    "Patient search replies, by result (ok or the error code)",
    ["result"],
)
SEARCH_SECONDS = Histogram(
    "coggo_patient_search_seconds",
    "Time from receiving a patient search to publishing its reply",
    buckets=(0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0),
)
IMPORTS = Counter(
    "coggo_patient_imports_total", "Patient imports, by result", ["result"]
)
