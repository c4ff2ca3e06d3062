"""Per-key rate limit shared by every ingress replica, kept in PostgreSQL.

The limiter is the generic cell rate algorithm (GCRA): each key has a
theoretical arrival time (TAT). A request is allowed when pushing the TAT one
emission interval later keeps it within one period of the database clock, so
a key may spend its whole allowance in a burst and then one request per
interval. One statement both checks and updates, so replicas never race, and
one statement serves the hits of many keys, so a busy replica makes few round
trips. The table is UNLOGGED (migration 0006): a crash of PostgreSQL empties
it, which gives every key its full allowance again.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import cast

import asyncpg

# One row per distinct key in $1. Rows are locked in key order, so statements
# of several replicas that share keys wait for each other but never deadlock.
# The outer SELECT reads the state before this statement, which for a
# rejected hit is the state that rejected it.
_CHECK = """
WITH hits AS (
    SELECT key_id FROM unnest($1::uuid[]) AS key_id
),
allowed AS (
    INSERT INTO rate_limits AS r (key_id, tat)
    SELECT key_id, clock_timestamp() + $2::interval FROM hits ORDER BY key_id
    ON CONFLICT (key_id) DO UPDATE
        SET tat = greatest(r.tat, clock_timestamp()) + $2::interval
        WHERE greatest(r.tat, clock_timestamp()) + $2::interval
              <= clock_timestamp() + $3::interval
    RETURNING key_id
)
SELECT
    h.key_id,
    a.key_id IS NOT NULL AS allowed,
    extract(epoch FROM (
        greatest(r.tat, clock_timestamp()) + $2::interval
        - (clock_timestamp() + $3::interval)
    )) AS wait_seconds
FROM hits h
LEFT JOIN allowed a ON a.key_id = h.key_id
LEFT JOIN rate_limits r ON r.key_id = h.key_id
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
        [decision] = await self.hit_many(connection, [key_id])
        return decision

    async def hit_many(
        self,
        connection: asyncpg.Connection | asyncpg.Pool,
        key_ids: Sequence[uuid.UUID],
    ) -> list[RateLimitDecision]:
        """Count one request per entry of `key_ids`, in order, and decide each.

        A key that appears n times takes n statements, one per occurrence,
        because one statement can update a row only once. Distinct keys share
        a statement.
        """
        decisions: list[RateLimitDecision | None] = [None] * len(key_ids)
        remaining = list(range(len(key_ids)))
        while remaining:
            first: dict[uuid.UUID, int] = {}
            later = []
            for position in remaining:
                if key_ids[position] in first:
                    later.append(position)
                else:
                    first[key_ids[position]] = position
            rows = await connection.fetch(
                _CHECK, sorted(first), self.interval, self.period
            )
            for row in rows:
                decisions[first[row["key_id"]]] = self._decide(row)
            remaining = later
        assert all(decision is not None for decision in decisions)
        return cast(list[RateLimitDecision], decisions)

    @staticmethod
    def _decide(row: asyncpg.Record) -> RateLimitDecision:
        if row["allowed"]:
            return RateLimitDecision(True, 0)
        wait = float(row["wait_seconds"] or 0)
        return RateLimitDecision(False, max(1, math.ceil(wait)))
