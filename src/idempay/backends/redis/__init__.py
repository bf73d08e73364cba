"""Redis backends: a fenced lock provider and an idempotency-record store, sync and async.

Install with ``pip install "idempay[redis]"``. Build them from a URL (``from_url``, which owns
and closes its client) or around a client of your own (``redis.Redis`` for the sync classes,
``redis.asyncio.Redis`` for the async ones). Keys carry Redis Cluster hash tags, so each lock
and its fence counter, and each record, live in one slot.
"""

from __future__ import annotations

from idempay.backends.redis._async import AsyncRedisIdempotencyStore, AsyncRedisLockProvider
from idempay.backends.redis._sync import RedisIdempotencyStore, RedisLockProvider

__all__ = [
    "AsyncRedisIdempotencyStore",
    "AsyncRedisLockProvider",
    "RedisIdempotencyStore",
    "RedisLockProvider",
]
