"""The event being applied, and the RFC 7396 rule for cleared fields."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from coggo.pipeline.records import make_stamp
from coggo.schemas.bus import DomainEvent


def cleared(value: Any) -> Any:
    """RFC 7396: null clears a field; so does an empty or blank string here."""
    if isinstance(value, str):
        value = value.strip()
        return value or None
    return value


@dataclass
class EventContext:
    """One event being applied: who sent it, its version stamp, what it caused."""

    clinic_id: str
    event_id: str
    occurred_at: datetime
    default_timezone: str
    events: list[DomainEvent] = field(default_factory=list)

    @property
    def stamp(self) -> str:
        return make_stamp(self.occurred_at, self.event_id)

    def ranked_stamp(self, rank: int) -> str:
        """Return the stamp for a write that wins ties with equal `occurredAt` by rank."""
        return make_stamp(self.occurred_at, self.event_id, rank)

    def emit(self, event_type: str, data: dict[str, Any]) -> None:
        self.events.append(
            DomainEvent(type=event_type, clinic_id=self.clinic_id, data=data)
        )
