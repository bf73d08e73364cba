"""Backends behind URLs: pick a store or a lock provider by configuration.

=====================================  ==================  =============  ==============
URL                                    idempotency store   payment store  lock provider
=====================================  ==================  =============  ==============
``memory://``                          yes                 yes            yes
``sqlite:///path`` (``sqlite+aiosqlite``)  yes             yes            no
``postgresql+psycopg://...``           yes                 yes            yes (advisory)
``mysql+pymysql://...`` (``+aiomysql``)  yes               yes            no
``redis://...``, ``rediss://...``      yes                 no             yes
``none://``                            no                  no             yes (locking off)
=====================================  ==================  =============  ==============

Each factory has an async twin (``async_...``) that builds the ``Async`` class of the same
backend; an SQL URL with a sync driver is mapped to its async driver. Drivers are imported only
when their URL is used: a missing one raises MissingDependencyError naming the extra. Every
backend also accepts a ready client or engine: use its class directly for that.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from idempay.clock import Clock
from idempay.errors import ConfigurationError
from idempay.protocols import (
    AsyncIdempotencyStore,
    AsyncLockProvider,
    AsyncPaymentStore,
    IdempotencyStore,
    LockProvider,
    PaymentStore,
)

__all__ = [
    "async_idempotency_store_from_url",
    "async_lock_provider_from_url",
    "async_payment_store_from_url",
    "idempotency_store_from_url",
    "lock_provider_from_url",
    "payment_store_from_url",
]

_SQL = ("sqlite", "postgresql", "postgres", "mysql", "mariadb")
_REDIS = ("redis", "rediss")


def _family(url: str) -> str:
    scheme = urlsplit(url).scheme.lower()
    if not scheme:
        raise ConfigurationError("a backend URL needs a scheme, such as memory:// or redis://")
    family = scheme.split("+", 1)[0]
    return "postgresql" if family == "postgres" else family


def _unsupported(url: str, what: str) -> ConfigurationError:
    return ConfigurationError(f"no {what} for URLs of scheme {_family(url)!r}")


def idempotency_store_from_url(
    url: str, *, clock: Clock | None = None, **options: Any
) -> IdempotencyStore:
    """Build the idempotency store a URL names (see the module's table)."""
    family = _family(url)
    if family == "memory":
        from idempay.memory import MemoryIdempotencyStore

        return MemoryIdempotencyStore(clock=clock)
    if family in _SQL:
        from idempay.backends.sql import SQLIdempotencyStore, sync_url

        return SQLIdempotencyStore.from_url(sync_url(url), clock=clock, **options)
    if family in _REDIS:
        from idempay.backends.redis import RedisIdempotencyStore

        return RedisIdempotencyStore.from_url(url, clock=clock, **options)
    raise _unsupported(url, "idempotency store")


def async_idempotency_store_from_url(
    url: str, *, clock: Clock | None = None, **options: Any
) -> AsyncIdempotencyStore:
    """Async twin of :func:`idempotency_store_from_url`."""
    family = _family(url)
    if family == "memory":
        from idempay.memory import AsyncMemoryIdempotencyStore

        return AsyncMemoryIdempotencyStore(clock=clock)
    if family in _SQL:
        from idempay.backends.sql import AsyncSQLIdempotencyStore, async_url

        return AsyncSQLIdempotencyStore.from_url(async_url(url), clock=clock, **options)
    if family in _REDIS:
        from idempay.backends.redis import AsyncRedisIdempotencyStore

        return AsyncRedisIdempotencyStore.from_url(url, clock=clock, **options)
    raise _unsupported(url, "idempotency store")


def payment_store_from_url(url: str, *, clock: Clock | None = None, **options: Any) -> PaymentStore:
    """Build the payment store (orders, inbox, audit, outbox) a URL names."""
    family = _family(url)
    if family == "memory":
        from idempay.memory import MemoryPaymentStore

        return MemoryPaymentStore(clock=clock)
    if family in _SQL:
        from idempay.backends.sql import SQLPaymentStore, sync_url

        return SQLPaymentStore.from_url(sync_url(url), clock=clock, **options)
    raise _unsupported(url, "payment store")


def async_payment_store_from_url(
    url: str, *, clock: Clock | None = None, **options: Any
) -> AsyncPaymentStore:
    """Async twin of :func:`payment_store_from_url`."""
    family = _family(url)
    if family == "memory":
        from idempay.memory import AsyncMemoryPaymentStore

        return AsyncMemoryPaymentStore(clock=clock)
    if family in _SQL:
        from idempay.backends.sql import AsyncSQLPaymentStore, async_url

        return AsyncSQLPaymentStore.from_url(async_url(url), clock=clock, **options)
    raise _unsupported(url, "payment store")


def lock_provider_from_url(url: str, **options: Any) -> LockProvider:
    """Build the lock provider a URL names; ``none://`` switches locking off."""
    family = _family(url)
    if family == "none":
        from idempay.memory import NoLockProvider

        return NoLockProvider()
    if family == "memory":
        from idempay.memory import MemoryLockProvider

        return MemoryLockProvider()
    if family in _REDIS:
        from idempay.backends.redis import RedisLockProvider

        return RedisLockProvider.from_url(url, **options)
    if family == "postgresql":
        from idempay.backends.sql import PostgresAdvisoryLockProvider, sync_url

        return PostgresAdvisoryLockProvider.from_url(sync_url(url), **options)
    raise _unsupported(url, "lock provider")


def async_lock_provider_from_url(url: str, **options: Any) -> AsyncLockProvider:
    """Async twin of :func:`lock_provider_from_url`."""
    family = _family(url)
    if family == "none":
        from idempay.memory import AsyncNoLockProvider

        return AsyncNoLockProvider()
    if family == "memory":
        from idempay.memory import AsyncMemoryLockProvider

        return AsyncMemoryLockProvider()
    if family in _REDIS:
        from idempay.backends.redis import AsyncRedisLockProvider

        return AsyncRedisLockProvider.from_url(url, **options)
    if family == "postgresql":
        from idempay.backends.sql import AsyncPostgresAdvisoryLockProvider, async_url

        return AsyncPostgresAdvisoryLockProvider.from_url(async_url(url), **options)
    raise _unsupported(url, "lock provider")
