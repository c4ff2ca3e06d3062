"""Units, dates and times from PIMS payloads, normalized for storage."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

from coggo.schemas.partner import Age, AgeUnit, Weight, WeightUnit

KG_PER_LB = 0.45359237


def weight_in_kg(weight: Weight | None, weight_kg: float | None) -> float | None:
    """`weight` wins over legacy `weightKg`; pounds become kilograms."""
    if weight is not None:
        value = (
            weight.value * KG_PER_LB if weight.unit == WeightUnit.LB else weight.value
        )
    elif weight_kg is not None:
        value = weight_kg
    else:
        return None
    if not math.isfinite(value) or value <= 0:
        raise ValueError("weight must be a positive, finite number")
    return round(value, 4)


def birth_date_from_age(age: Age, reference: datetime) -> date:
    """Estimate a birth date from an age stated at `reference` (the event's time)."""
    on = reference.astimezone(UTC).date()
    if age.unit == AgeUnit.WEEKS:
        return on - timedelta(days=round(age.value * 7))
    months = round(age.value * 12) if age.unit == AgeUnit.YEARS else round(age.value)
    year = on.year - months // 12
    month = on.month - months % 12
    if month < 1:
        year -= 1
        month += 12
    # Clamp the day for shorter months, e.g. 31 March minus one month.
    for day in (on.day, 30, 29, 28):
        try:
            return date(year, month, day)
        except ValueError:
            continue
    raise ValueError("age does not give a valid birth date")


@dataclass(frozen=True)
class AppointmentTime:
    local: datetime
    timezone: str
    instant: datetime


def parse_starts_at(raw: str) -> datetime:
    """Parse ISO 8601 local time; an offset, if present, is kept."""
    text = raw.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    return datetime.fromisoformat(text)


def appointment_time(starts_at: str, timezone: str) -> AppointmentTime:
    """Pair a local start time with its IANA zone and compute the UTC instant.

    DST rule, the one Python's zoneinfo applies to fold=0: a local time that
    occurs twice (clocks going back) is the first occurrence, and a local time
    that does not exist (clocks going forward) is read with the offset before
    the jump, which lands it as many minutes after the jump as it was after
    the missing hour started (02:30 becomes 03:30 in America/New_York).
    A startsAt that carries an offset names the instant itself; its local
    time is then that instant in `timezone`.
    """
    zone = ZoneInfo(timezone)
    parsed = parse_starts_at(starts_at)
    if parsed.tzinfo is not None:
        instant = parsed.astimezone(UTC)
        local = instant.astimezone(zone).replace(tzinfo=None)
        return AppointmentTime(local, timezone, instant)
    local = parsed.replace(fold=0)
    instant = local.replace(tzinfo=zone).astimezone(UTC)
    return AppointmentTime(local, timezone, instant)
