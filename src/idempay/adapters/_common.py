"""What every adapter shares: the body size limit and the scope of idempotency keys."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from idempay.engine._sync import Guard
from idempay.errors import PayloadTooLargeError

__all__ = ["BodyCollector", "ScopeFunction", "anonymous", "body_limit", "check_declared_length"]

ScopeFunction = Callable[[Any], tuple[str, str]]
"""Given the framework's request, return the ``(tenant, user)`` that scopes its idempotency key.

The application derives them from its own authentication; a key is never shared across scopes.
"""

ANONYMOUS: Final = ("", "anonymous")


def anonymous(_request: Any) -> tuple[str, str]:
    """The default scope: one tenant, one anonymous user."""
    return ANONYMOUS


def body_limit(guard: Any) -> int:
    """The largest body the guard accepts (its JSON limits), in bytes."""
    limit: int = guard.config.json_limits.max_bytes
    return limit


def check_declared_length(value: str | None, limit: int) -> None:
    """Refuse a request whose declared ``Content-Length`` is over ``limit``, before reading it.

    An unparseable or negative value is left to the server (it is not a size to trust);
    the limit is then enforced while reading.
    """
    if value is None:
        return
    try:
        declared = int(value.strip())
    except ValueError:
        return
    if declared > limit:
        raise PayloadTooLargeError(limit=limit)


class BodyCollector:
    """Collects a body chunk by chunk and stops at the limit: never more than ``limit`` bytes
    are held, however much the client sends."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._parts: list[bytes] = []
        self._size = 0

    def add(self, chunk: bytes) -> None:
        """Append ``chunk``; raise :class:`PayloadTooLargeError` once past the limit."""
        self._size += len(chunk)
        if self._size > self.limit:
            self._parts.clear()
            raise PayloadTooLargeError(limit=self.limit)
        if chunk:
            self._parts.append(chunk)

    def body(self) -> bytes:
        """The whole body collected so far."""
        return b"".join(self._parts)


def is_sync(guard: Any) -> bool:
    """True for a :class:`~idempay.engine.Guard`, False for an ``AsyncGuard``."""
    return isinstance(guard, Guard)
