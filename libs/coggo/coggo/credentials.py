"""Secrets at rest, API keys and signing secrets.

Signing secrets and PIMS credentials are stored encrypted with Fernet under a
key derived from COGGO_SECRET_KEY. API keys are stored as SHA-256 digests:
they carry 256 random bits, so a slow password hash would add nothing.
"""

from __future__ import annotations

import base64
import hashlib
import secrets as _random

from cryptography.fernet import Fernet, InvalidToken

from coggo.settings import Settings

API_KEY_PREFIX = "cgk_live_"
SIGNING_SECRET_PREFIX = "cgs_"
# Used only when COGGO_DEV_MODE is on and no COGGO_SECRET_KEY is set.
_DEVELOPMENT_KEY = "coggo-development-only-key"


class MissingSecretKey(RuntimeError):
    pass


class SecretBox:
    """Encrypts and decrypts secrets stored in PostgreSQL."""

    def __init__(self, key: str) -> None:
        digest = hashlib.sha256(key.encode()).digest()
        self._fernet = Fernet(base64.urlsafe_b64encode(digest))

    @classmethod
    def from_settings(cls, settings: Settings) -> SecretBox:
        if settings.secret_key is not None and settings.secret_key.get_secret_value():
            return cls(settings.secret_key.get_secret_value())
        if settings.dev_mode:
            return cls(_DEVELOPMENT_KEY)
        raise MissingSecretKey(
            "COGGO_SECRET_KEY is not set: set it to a long random string, or set "
            "COGGO_DEV_MODE=1 to run with a fixed development key"
        )

    def encrypt(self, plain: str) -> bytes:
        return self._fernet.encrypt(plain.encode())

    def decrypt(self, token: bytes) -> str:
        try:
            return self._fernet.decrypt(token).decode()
        except InvalidToken as exc:
            raise MissingSecretKey(
                "a stored secret does not decrypt: COGGO_SECRET_KEY differs from "
                "the key it was encrypted with"
            ) from exc


def new_api_key() -> str:
    return API_KEY_PREFIX + _random.token_urlsafe(32)


def new_signing_secret() -> str:
    return SIGNING_SECRET_PREFIX + _random.token_urlsafe(32)


def hash_api_key(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


def key_prefix(key: str) -> str:
    """Return the part of a key that is safe to show and to search by."""
    return key[: len(API_KEY_PREFIX) + 6]
