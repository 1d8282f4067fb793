"""Bearer API keys. A session belongs to the key that created it; the store keeps only a fingerprint."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from rxt.serve.errors import APIError

ANONYMOUS = ""  # the owner of every session when auth is off


def fingerprint(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:32]


class ApiKeys:
    """No keys: auth is off and every request is ANONYMOUS. Otherwise ``Authorization: Bearer KEY``."""

    def __init__(self, keys: Iterable[str] = ()):
        keys = [k for k in keys if k]
        self._fingerprints = [fingerprint(k) for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._fingerprints)

    def owner(self, authorization: str | None) -> str:
        """The owner fingerprint of a request, or 401."""
        if not self.enabled:
            return ANONYMOUS
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise APIError(401, "missing API key: send the header 'Authorization: Bearer KEY'", "missing_api_key")
        given = fingerprint(key.strip())
        matched = False
        for known in self._fingerprints:  # compare with every key, in constant time
            matched |= hmac.compare_digest(given, known)
        if not matched:
            raise APIError(401, "invalid API key", "invalid_api_key")
        return given


def same_owner(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())
