"""Exception hierarchy: each class carries the HTTP status and error code it maps to."""

from __future__ import annotations


class CoggoError(Exception):
    """Base of every error the services raise on purpose."""

    status = 500
    code = "internal_error"

    def __init__(self, detail: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = headers or {}

    def body(self) -> dict[str, str]:
        return {"error": self.code, "detail": self.detail}


class Unauthorized(CoggoError):
    status = 401
    code = "unauthorized"


class InvalidSignature(CoggoError):
    status = 401
    code = "invalid_signature"


class TimestampOutOfWindow(CoggoError):
    status = 401
    code = "timestamp_out_of_window"


class IntegrationPaused(CoggoError):
    status = 402
    code = "integration_paused"


class InsufficientScope(CoggoError):
    status = 403
    code = "insufficient_scope"


class BadRequest(CoggoError):
    status = 400
    code = "bad_request"


class ValidationFailed(BadRequest):
    code = "validation_failed"


class PatientRequired(BadRequest):
    code = "patient_required"

    def body(self) -> dict[str, str]:
        # The spec documents the key as `code`; DESIGN keeps `error` as well.
        return {"error": self.code, "code": self.code, "detail": self.detail}


class NotFound(CoggoError):
    status = 404
    code = "not_found"


class EventIdReused(CoggoError):
    status = 409
    code = "event_id_reused"


class PayloadTooLarge(CoggoError):
    status = 413
    code = "payload_too_large"


class UnsupportedMediaType(CoggoError):
    status = 415
    code = "unsupported_media_type"


class RateLimited(CoggoError):
    status = 429
    code = "rate_limited"


class ServiceUnavailable(CoggoError):
    status = 503
    code = "service_unavailable"


class PermanentMessageError(Exception):
    """A bus message that can never be processed; it is dead-lettered with this reason."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
