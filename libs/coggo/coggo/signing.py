"""Request signatures shared by webhooks (PIMS to Coggo) and SOAP pushes (Coggo to PIMS).

signature = base64(HMAC-SHA256(secret, "{id}.{timestamp}.{raw body}")), where the
secret is used as its UTF-8 bytes and the timestamp is in unix seconds.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from coggo.errors import InvalidSignature, TimestampOutOfWindow

ID_HEADER = "X-Coggo-Id"
TIMESTAMP_HEADER = "X-Coggo-Timestamp"
SIGNATURE_HEADER = "X-Coggo-Signature"
WINDOW_SECONDS = 300
# Longer than any real id or signature; bounds the work done on hostile headers.
MAX_HEADER_LENGTH = 512


def compute_signature(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """Return the base64 HMAC-SHA256 signature of one request."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret.encode(), signed, hashlib.sha256).digest()
    return base64.b64encode(digest).decode("ascii")


def sign_headers(
    secret: str, message_id: str, body: bytes, *, now: float | None = None
) -> dict[str, str]:
    """Build the three signature headers for a request sent now."""
    timestamp = int(time.time() if now is None else now)
    return {
        ID_HEADER: message_id,
        TIMESTAMP_HEADER: str(timestamp),
        SIGNATURE_HEADER: compute_signature(secret, message_id, timestamp, body),
    }


@dataclass(frozen=True)
class SignatureHeaders:
    message_id: str | None
    timestamp: str | None
    signature: str | None

    @classmethod
    def from_mapping(cls, headers: Mapping[str, str]) -> SignatureHeaders:
        return cls(
            headers.get(ID_HEADER),
            headers.get(TIMESTAMP_HEADER),
            headers.get(SIGNATURE_HEADER),
        )


def parse_timestamp(raw: str) -> int:
    """Parse a unix-seconds header value, rejecting every other shape."""
    value = raw.strip()
    if not value or len(value) > 12 or not value.isascii() or not value.isdigit():
        raise TimestampOutOfWindow(
            f"{TIMESTAMP_HEADER} must be an integer of unix seconds, "
            "within 300 seconds of the current time"
        )
    return int(value)


def check_timestamp(raw: str, *, now: float | None = None) -> int:
    """Parse the timestamp header and check that it lies within the replay window."""
    timestamp = parse_timestamp(raw)
    current = time.time() if now is None else now
    skew = current - timestamp
    if abs(skew) > WINDOW_SECONDS:
        direction = "behind" if skew > 0 else "ahead of"
        raise TimestampOutOfWindow(
            f"{TIMESTAMP_HEADER} is {math.ceil(abs(skew))} seconds {direction} the "
            f"current time; it must be within {WINDOW_SECONDS} seconds, so check "
            "the sender's clock and sign each attempt afresh"
        )
    return timestamp


def verify_request(
    headers: SignatureHeaders,
    body: bytes,
    secrets: Iterable[str],
    *,
    now: float | None = None,
) -> bool:
    """Check the optional signature and the replay window of one request.

    Returns True when a signature was present and matched one of the secrets,
    False when no signature was sent. Raises InvalidSignature or
    TimestampOutOfWindow otherwise.
    """
    if headers.signature is None:
        if headers.timestamp is not None:
            check_timestamp(headers.timestamp, now=now)
        return False

    if headers.message_id is None or headers.timestamp is None:
        missing = ID_HEADER if headers.message_id is None else TIMESTAMP_HEADER
        raise InvalidSignature(f"{missing} is required when {SIGNATURE_HEADER} is sent")
    if len(headers.message_id) > MAX_HEADER_LENGTH or not headers.message_id:
        raise InvalidSignature(
            f"{ID_HEADER} must be 1 to {MAX_HEADER_LENGTH} characters"
        )
    if len(headers.signature) > MAX_HEADER_LENGTH:
        raise InvalidSignature(f"{SIGNATURE_HEADER} is longer than any valid signature")
    timestamp = check_timestamp(headers.timestamp, now=now)

    received = headers.signature.strip().encode("utf-8", "surrogateescape")
    for secret in secrets:
        expected = compute_signature(secret, headers.message_id, timestamp, body)
        if hmac.compare_digest(expected.encode("ascii"), received):
            return True
    raise InvalidSignature(
        f"{SIGNATURE_HEADER} does not match base64(HMAC-SHA256(secret, "
        '"{id}.{timestamp}.{raw body}")) for the signing secret of this integration'
    )
