"""When the next attempt of a push is due: exponential backoff and Retry-After."""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

# The Partner API: "anything else is retried with exponential backoff (5 attempts)".
ATTEMPTS = 5
# A Retry-After above this is cut to it, so that one header cannot hold a push
# for months. Values up to it are honoured in full.
MAX_RETRY_AFTER_SECONDS = 24 * 3600.0


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff between the attempts of one push.

    The delay after attempt n (from 1) is `first_delay * multiplier ** (n - 1)`,
    at most `max_delay`, spread by ±`jitter` so that pushes failing together
    do not retry together. With the defaults the retries come about 30 s, 2 min,
    8 min and 32 min apart, so a PIMS may be down for about 40 minutes before
    a push fails.
    """

    attempts: int = ATTEMPTS
    first_delay: float = 30.0
    multiplier: float = 4.0
    max_delay: float = 3600.0
    jitter: float = 0.2

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"attempts must be at least 1, got {self.attempts}")
        if self.first_delay < 0 or self.max_delay < 0:
            raise ValueError("first_delay and max_delay must not be negative")
        if self.multiplier < 1:
            raise ValueError(f"multiplier must be at least 1, got {self.multiplier}")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"jitter must be from 0 to below 1, got {self.jitter}")

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Return the seconds to wait after failed attempt `attempt` (from 1).

        A Retry-After sent by the PIMS is the minimum wait.
        """
        backoff = min(
            self.first_delay * self.multiplier ** (attempt - 1), self.max_delay
        )
        spread = backoff * random.uniform(1 - self.jitter, 1 + self.jitter)
        return max(spread, retry_after or 0.0)


def parse_retry_after(
    value: str | None, *, now: datetime | None = None
) -> float | None:
    """Parse a Retry-After header into seconds from now (RFC 9110, section 10.2.3).

    The value is either a number of seconds or an HTTP date. Returns None for
    a missing or invalid value, 0 for a date in the past, and at most
    MAX_RETRY_AFTER_SECONDS.
    """
    if value is None:
        return None
    text = value.strip()
    if text.isascii() and text.isdigit():
        return min(float(text), MAX_RETRY_AFTER_SECONDS)

    try:
        moment = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if moment.tzinfo is None:
        # RFC 9110 dates are in GMT; a date without a zone is read as UTC.
        moment = moment.replace(tzinfo=UTC)
    current = now if now is not None else datetime.now(UTC)
    seconds = (moment - current).total_seconds()
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_SECONDS)
