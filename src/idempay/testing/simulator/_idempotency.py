"""Stripe's idempotency layer: one saved response per (API key, Idempotency-Key).

The rules, as Stripe documents them for API v1:

- a key is scoped to the API key that sent it; it is at most 255 characters;
- the first request with a key claims it; once its endpoint has begun executing, its status
  and body are saved, success or error alike (a decline, a 500), and every later request with
  the same key, the same endpoint and the same parameters gets that saved response back with
  ``Idempotent-Replayed: true``;
- a request refused by parameter validation saves nothing: the key stays free;
- the same key with another endpoint or other parameters is refused with 400
  ``idempotency_error``;
- a request whose key's first request is still executing is refused with 409
  ``idempotency_key_in_use`` and saves nothing;
- saved keys expire 24 hours after their first request, after which the key is new again.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Final

from idempay.testing.simulator._errors import StripeAPIError

__all__ = [
    "KEY_LIFETIME",
    "Claimed",
    "IdempotencyStore",
    "InFlight",
    "Mismatch",
    "Outcome",
    "Replay",
    "SavedResponse",
    "check_key",
]

KEY_LIFETIME: Final = 24 * 3600.0
"""Seconds a key stays bound to its first request."""

_MAX_KEY_LENGTH: Final = 255
_PRUNE_EVERY: Final = 1024


@dataclass(frozen=True, slots=True)
class SavedResponse:
    """A response as first sent: replayed byte for byte."""

    status: int
    body: bytes
    request_id: str


@dataclass(slots=True)
class _Entry:
    endpoint: str
    fingerprint: str
    expires_at: float
    response: SavedResponse | None = None


@dataclass(frozen=True, slots=True)
class Claimed:
    """The key is this request's: execute, then :meth:`IdempotencyStore.save` or ``release``."""


@dataclass(frozen=True, slots=True)
class Replay:
    """The same request was answered before: send ``response`` again."""

    response: SavedResponse


@dataclass(frozen=True, slots=True)
class InFlight:
    """The key's first request is still executing."""


@dataclass(frozen=True, slots=True)
class Mismatch:
    """The key was first used for another endpoint, or with other parameters."""

    other_endpoint: str | None


Outcome = Claimed | Replay | InFlight | Mismatch


def check_key(key: str) -> None:
    """Refuse a key Stripe would refuse (400): empty, or longer than 255 characters."""
    if not key or len(key) > _MAX_KEY_LENGTH:
        raise StripeAPIError(
            400,
            f"Idempotency-Key must be 1 to {_MAX_KEY_LENGTH} characters long.",
            stored=False,
        )


class IdempotencyStore:
    """Keys and their saved responses; thread-safe, every decision under one lock."""

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str], _Entry] = {}
        self._lock = threading.Lock()
        self._claims = 0

    def claim(
        self, api_key: str, key: str, *, endpoint: str, fingerprint: str, now: float
    ) -> Outcome:
        """Claim ``key`` for a request, or say why not, in one step."""
        with self._lock:
            self._claims += 1
            if self._claims % _PRUNE_EVERY == 0:
                self._prune(now)
            entry = self._entries.get((api_key, key))
            if entry is None or entry.expires_at <= now:
                self._entries[(api_key, key)] = _Entry(endpoint, fingerprint, now + KEY_LIFETIME)
                return Claimed()
            if entry.endpoint != endpoint:
                return Mismatch(entry.endpoint)
            if entry.fingerprint != fingerprint:
                return Mismatch(None)
            if entry.response is None:
                return InFlight()
            return Replay(entry.response)

    def save(self, api_key: str, key: str, response: SavedResponse) -> None:
        """Bind the claimed key to the response of its first request."""
        with self._lock:
            entry = self._entries.get((api_key, key))
            if entry is not None and entry.response is None:
                entry.response = response

    def release(self, api_key: str, key: str) -> None:
        """Free a claimed key whose request saved nothing (refused by validation, or lost)."""
        with self._lock:
            entry = self._entries.get((api_key, key))
            if entry is not None and entry.response is None:
                del self._entries[(api_key, key)]

    def clear(self) -> None:
        """Forget every key."""
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def _prune(self, now: float) -> None:
        expired = [
            ident
            for ident, entry in self._entries.items()
            if entry.expires_at <= now and entry.response is not None
        ]
        for ident in expired:
            del self._entries[ident]
