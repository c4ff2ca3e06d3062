"""The simulator's configuration and in-memory state: records, pushes, faults, calls."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pims_sim.clinic import Clinic, generate_clinic
from pims_sim.faults import FaultSpec, FaultTable


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class SimConfig:
    """Settings of one simulated PIMS; the defaults match `coggo-pims-sim serve`."""

    secret: str = field(repr=False)
    seed: int = 1
    appointments: int = 20
    clients: int = 30
    timezone: str = "America/New_York"
    # Prefix of the PIMS-hosted routes, e.g. "/pims"; "" serves them at the root.
    base_path: str = ""
    # When set, GET /species, /patients and /appointments require
    # `Authorization: Bearer <token>`. The push is authenticated by its signature.
    token: str | None = field(default=None, repr=False)

    def normalized_base_path(self) -> str:
        stripped = self.base_path.strip().strip("/")
        return f"/{stripped}" if stripped else ""


@dataclass
class StoredPush:
    """One SOAP push as first received, with the count of deliveries of its key."""

    note_id: str
    version: int
    envelope_id: str
    received_at: datetime
    envelope: dict[str, Any]
    deliveries: int = 1

    def wire(self) -> dict[str, Any]:
        return {
            "noteId": self.note_id,
            "version": self.version,
            "envelopeId": self.envelope_id,
            "receivedAt": self.received_at.isoformat().replace("+00:00", "Z"),
            "deliveries": self.deliveries,
            "envelope": self.envelope,
        }


class PushStore:
    """Received pushes keyed by (noteId, version), the Partner API's idempotency key."""

    def __init__(self) -> None:
        self._pushes: dict[tuple[str, int], StoredPush] = {}

    def add(
        self, note_id: str, version: int, envelope_id: str, envelope: dict[str, Any]
    ) -> tuple[StoredPush, bool]:
        """Store a push unless its key is stored already.

        Returns the stored push and whether this delivery was a repeat of its key.
        """
        key = (note_id, version)
        existing = self._pushes.get(key)
        if existing is not None:
            existing.deliveries += 1
            return existing, True
        stored = StoredPush(note_id, version, envelope_id, utc_now(), envelope)
        self._pushes[key] = stored
        return stored, False

    def list(self, note_id: str | None = None) -> list[StoredPush]:
        return [
            push
            for push in self._pushes.values()
            if note_id is None or push.note_id == note_id
        ]

    def clear(self) -> int:
        count = len(self._pushes)
        self._pushes.clear()
        return count

    def __len__(self) -> int:
        return len(self._pushes)


@dataclass
class SimState:
    config: SimConfig
    clinic: Clinic
    pushes: PushStore = field(default_factory=PushStore)
    faults: FaultTable = field(default_factory=FaultTable)
    calls: Counter[str] = field(default_factory=Counter)
    clock: Callable[[], datetime] = utc_now
    # Set when the server shuts down, so requests held open by a timeout fault end.
    stopping: asyncio.Event = field(default_factory=asyncio.Event)

    @classmethod
    def create(
        cls,
        config: SimConfig,
        *,
        faults: Iterable[FaultSpec] = (),
        now: datetime | None = None,
    ) -> SimState:
        """Generate the clinic's records for `config` and apply the start-up faults."""
        clinic = generate_clinic(
            config.seed,
            appointments=config.appointments,
            clients=config.clients,
            timezone=config.timezone,
            now=now,
        )
        state = cls(config=config, clinic=clinic)
        for spec in faults:
            state.faults.set(spec)
        return state
