"""Per-key rate limit shared by every ingress replica, kept in PostgreSQL.

The limiter is the generic cell rate algorithm (GCRA): each key has a
theoretical arrival time (TAT). A request is allowed when pushing the TAT one
emission interval later keeps it within one period of the database clock, so
a key may spend its whole allowance in a burst and then one request per
interval. One statement both checks and updates, so replicas never race.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from datetime import timedelta

import asyncpg

_CHECK = """
WITH allowed AS (
    INSERT INTO rate_limits AS r (key_id, tat)
    VALUES ($1, clock_timestamp() + $2::interval)
    ON CONFLICT (key_id) DO UPDATE
        SET tat = greatest(r.tat, clock_timestamp()) + $2::interval
        WHERE greatest(r.tat, clock_timestamp()) + $2::interval
              <= clock_timestamp() + $3::interval
    RETURNING tat
)
SELECT
    EXISTS (SELECT 1 FROM allowed) AS allowed,
    extract(epoch FROM (
        greatest(r.tat, clock_timestamp()) + $2::interval
        - (clock_timestamp() + $3::interval)
    )) AS wait_seconds
FROM (SELECT 1) AS one LEFT JOIN rate_limits r ON r.key_id = $1
"""


@dataclass(frozen=True)
class RateLimitDecision:
    allowed: bool
    retry_after: int


class RateLimiter:
    def __init__(self, requests: int = 120, period: timedelta = timedelta(minutes=1)):
        self.requests = requests
        self.period = period
        self.interval = period / requests

    async def hit(
        self, connection: asyncpg.Connection | asyncpg.Pool, key_id: uuid.UUID
    ) -> RateLimitDecision:
        """Count one request of `key_id` and decide whether it may proceed."""
        row = await connection.fetchrow(_CHECK, key_id, self.interval, self.period)
        assert row is not None
        if row["allowed"]:
            return RateLimitDecision(True, 0)
        wait = float(row["wait_seconds"] or 0)
        return RateLimitDecision(False, max(1, math.ceil(wait)))
