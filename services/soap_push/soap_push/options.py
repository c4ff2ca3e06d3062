"""Settings of the SOAP-push dispatcher, read from COGGO_SOAP_PUSH_* variables."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from soap_push.retry import RetryPolicy


class PushOptions(BaseSettings):
    """Timing and concurrency of push attempts; the defaults suit production."""

    model_config = SettingsConfigDict(env_prefix="COGGO_SOAP_PUSH_", extra="ignore")

    timeout_seconds: float = Field(
        default=10.0,
        gt=0,
        le=120,
        description="Time limit of one HTTP attempt, connection included, in seconds.",
    )
    backoff_seconds: float = Field(
        default=30.0,
        ge=0,
        description="Delay before the second attempt, in seconds.",
    )
    backoff_multiplier: float = Field(
        default=4.0,
        ge=1,
        description="Factor by which each later delay grows.",
    )
    max_backoff_seconds: float = Field(
        default=3600.0,
        ge=0,
        description="Upper bound of the backoff delay, in seconds (a Retry-After may exceed it).",
    )
    max_in_flight: int = Field(
        default=128,
        ge=1,
        le=10_000,
        description="Attempts this process runs at once, over all clinics.",
    )
    clinic_max_in_flight: int = Field(
        default=8,
        ge=1,
        le=1000,
        description=(
            "Attempts this process runs at once for one clinic, so a PIMS that "
            "hangs holds at most this many of the max_in_flight slots."
        ),
    )
    poll_seconds: float = Field(
        default=1.0,
        gt=0,
        le=60,
        description=(
            "Longest wait between two looks for due attempts, which finds pushes "
            "that other replicas took in or whose lease ran out."
        ),
    )

    gather_seconds: float = Field(
        default=0.005,
        ge=0,
        le=1,
        description=(
            "Pause after a new push wakes the dispatcher, in seconds, so that "
            "pushes arriving together are claimed with one query."
        ),
    )

    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(
            first_delay=self.backoff_seconds,
            multiplier=self.backoff_multiplier,
            max_delay=self.max_backoff_seconds,
        )

    lease_margin_seconds: float = Field(
        default=30.0,
        gt=0,
        le=600,
        description=(
            "Time beyond timeout_seconds that a claimed attempt stays reserved, "
            "for the writes after it; a push whose dispatcher died mid-attempt "
            "is due again once both have passed."
        ),
    )

    @property
    def lease_seconds(self) -> float:
        """How long a claimed attempt is reserved before another dispatcher may retry it."""
        return self.timeout_seconds + self.lease_margin_seconds
