"""Calls to the PIMS-hosted endpoints, with retries and error classification.

Every call goes through coggo.outbound.OutboundClient, so it has a timeout,
follows no redirect, reads a capped body and refuses internal addresses unless
private targets are allowed. Failures become a CommandError whose code names
the failure: `pims_timeout`, `pims_unavailable` (connection failed, 5xx or
429), `pims_unauthorized` (401 or 403), `pims_error` (any other non-2xx),
`invalid_response` (not JSON), `response_too_large` or `target_blocked`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import structlog
from coggo.outbound import OutboundBlocked, OutboundClient, ResponseTooLarge
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)

from reconciliation.errors import CommandError
from reconciliation.integration import PimsTarget

log = structlog.get_logger(__name__)

USER_AGENT = "coggo-reconciliation/0.1"


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry a call that failed in a transient way."""

    attempts: int = 4
    initial_wait: float = 0.5
    max_wait: float = 8.0
    jitter: float = 0.5


NO_RETRY = RetryPolicy(attempts=1)


class TransientPimsError(CommandError):
    """A failure worth retrying: the connection, a timeout, a 5xx or a 429."""

    def __init__(
        self, code: str, detail: str, *, retry_after: float | None = None
    ) -> None:
        super().__init__(code, detail)
        self.retry_after = retry_after


def _retry_after_seconds(value: str | None) -> float | None:
    if value is None or not value.strip().isdigit():
        return None
    return float(value.strip())


def _check_status(path: str, status: int, retry_after: str | None) -> None:
    if 200 <= status < 300:
        return
    if status >= 500 or status == 429:
        raise TransientPimsError(
            "pims_unavailable",
            f"the PIMS returned {status} for GET {path}; retry later",
            retry_after=_retry_after_seconds(retry_after),
        )
    if status in (401, 403):
        raise CommandError(
            "pims_unauthorized",
            f"the PIMS returned {status} for GET {path}: check the PIMS "
            "credentials registered for this clinic",
        )
    if 300 <= status < 400:
        raise CommandError(
            "pims_error",
            f"the PIMS returned {status} for GET {path}, and redirects are not "
            "followed, so register the final base URL",
        )
    raise CommandError(
        "pims_error",
        f"the PIMS returned {status} for GET {path}: check the PIMS base URL",
    )


class PimsClient:
    """GETs JSON from a clinic's PIMS."""

    def __init__(self, outbound: OutboundClient) -> None:
        self.outbound = outbound

    async def get_json(
        self,
        target: PimsTarget,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        timeout: float | None = None,
        max_response_bytes: int | None = None,
        retry: RetryPolicy = NO_RETRY,
    ) -> Any:
        """GET `path` under the base URL and return the decoded JSON body.

        Raises CommandError; after the last attempt of a transient failure the
        error is a TransientPimsError.
        """
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(TransientPimsError),
            stop=stop_after_attempt(retry.attempts),
            wait=_wait_strategy(retry),
            before_sleep=_log_retry(target.clinic_id, path),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                return await self._get_once(
                    target,
                    path,
                    params=params,
                    timeout=timeout,
                    max_response_bytes=max_response_bytes,
                )
        raise AssertionError("unreachable: tenacity re-raises the last error")

    async def _get_once(
        self,
        target: PimsTarget,
        path: str,
        *,
        params: dict[str, Any] | None,
        timeout: float | None,
        max_response_bytes: int | None,
    ) -> Any:
        headers = {
            "Accept": "application/json",
            "User-Agent": USER_AGENT,
            **target.credential_headers,
        }
        started = time.monotonic()
        try:
            response = await self.outbound.request(
                "GET",
                target.url(path),
                headers=headers,
                params=params,
                timeout=timeout,
                max_response_bytes=max_response_bytes,
            )
        except OutboundBlocked as exc:
            raise CommandError("target_blocked", str(exc)) from None
        except ResponseTooLarge as exc:
            raise CommandError("response_too_large", str(exc)) from None
        except TimeoutError:
            elapsed = time.monotonic() - started
            raise TransientPimsError(
                "pims_timeout",
                f"GET {path} to the PIMS timed out after {elapsed:.1f} s",
            ) from None
        except aiohttp.ClientError as exc:
            raise TransientPimsError(
                "pims_unavailable",
                f"cannot reach the PIMS for GET {path}: {type(exc).__name__}",
            ) from None

        _check_status(path, response.status, response.headers.get("Retry-After"))
        try:
            return orjson.loads(response.body)
        except orjson.JSONDecodeError:
            raise CommandError(
                "invalid_response",
                f"the PIMS response to GET {path} is not valid JSON",
            ) from None


def _wait_strategy(policy: RetryPolicy) -> Any:
    backoff = wait_exponential_jitter(
        multiplier=policy.initial_wait, max=policy.max_wait, jitter=policy.jitter
    )

    def wait(state: RetryCallState) -> float:
        # A Retry-After from the PIMS lengthens the wait, up to the maximum.
        seconds = backoff(state)
        failure = state.outcome.exception() if state.outcome else None
        if isinstance(failure, TransientPimsError) and failure.retry_after:
            seconds = max(seconds, min(failure.retry_after, policy.max_wait))
        return seconds

    return wait


def _log_retry(clinic_id: str, path: str) -> Any:
    def before_sleep(state: RetryCallState) -> None:
        failure = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0.0
        log.warning(
            "pims.call_retrying",
            clinic_id=clinic_id,
            path=path,
            attempt=state.attempt_number,
            retry_in=round(wait, 2),
            error=getattr(failure, "code", repr(failure)),
        )

    return before_sleep
