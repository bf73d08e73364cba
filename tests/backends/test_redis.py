"""The Redis lock provider and idempotency store, sync and async, against a real Redis.

They pass the contract suites, and the Redis-specific cases: an unreachable or hung Redis fails
fast with the library's errors, keys carry hash tags, a lock key lost behind the provider's back
(eviction, restart) and a lease that ran out during a slow handler (scenario L1).
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from functools import partial
from time import monotonic

import pytest
import redis
import redis.asyncio
from redis.crc import key_slot
from redis.typing import EncodableT, FieldT

from idempay.backends.redis import (
    AsyncRedisIdempotencyStore,
    AsyncRedisLockProvider,
    RedisIdempotencyStore,
    RedisLockProvider,
)
from idempay.backends.redis._lua import (
    FENCE_RETENTION_MS,
    PHYSICAL_MARGIN_MS,
    lock_keys,
    record_key,
)
from idempay.clock import Clock, FrozenClock
from idempay.core.records import Claimed, Existing, Lease, RecordState, StoredResponse
from idempay.errors import ConfigurationError, LeaseLostError, LockError, StoreError
from idempay.protocols import (
    AsyncIdempotencyStore,
    AsyncLockProvider,
    IdempotencyStore,
    LockProvider,
)
from idempay.testing import (
    AsyncIdempotencyStoreContract,
    AsyncLockProviderContract,
    IdempotencyStoreContract,
    LockProviderContract,
)

LEASE = timedelta(seconds=30)
RETAIN = timedelta(hours=1)
BINARY = StoredResponse(status=200, body=b"\x00\xff\xfe{}", headers=(("X-A", "\u00e9"),))


@pytest.fixture
def prefix(redis_prefix: str) -> str:
    """A key prefix of this test alone, under the run's prefix (cleaned up by conftest)."""
    return f"{redis_prefix}{secrets.token_hex(6)}"


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url)
    yield c
    c.close()


@pytest.fixture
async def aclient(redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    c = redis.asyncio.Redis.from_url(redis_url)
    yield c
    await c.aclose()


@pytest.fixture
def dead_url() -> str:
    """The URL of a loopback port where nothing listens (bound, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"redis://127.0.0.1:{port}/0"


@pytest.fixture
def hung_url() -> Iterator[str]:
    """A loopback port that accepts connections and never answers (a hung Redis)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield f"redis://127.0.0.1:{sock.getsockname()[1]}/0"


class PrivateRedis:
    """A redis-server of this test alone, on a free loopback port, that can be restarted empty."""

    def __init__(self, binary: str) -> None:
        self._binary = binary
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        args = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        proc = subprocess.Popen(
            [self._binary, *args],
            stdout=subprocess.PIPE,
            text=True,
        )
        self._proc = proc
        assert proc.stdout is not None
        # Ready when it says so: no polling, no sleeping.
        for line in proc.stdout:
            if "Ready to accept connections" in line:
                return
        self.stop()
        pytest.fail("the private redis-server did not start")

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=30)
            if self._proc.stdout is not None:
                self._proc.stdout.close()
            self._proc = None

    def restart_empty(self) -> None:
        self.stop()
        self.start()


@pytest.fixture
def private_redis(redis_url: str) -> Iterator[PrivateRedis]:
    """A private Redis (needs ``redis-server`` on PATH; the shared one is never restarted)."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not on PATH: cannot restart a private Redis")
    server = PrivateRedis(binary)
    server.start()
    try:
        yield server
    finally:
        server.stop()


# --- contract suites -------------------------------------------------------------------------


class TestRedisIdempotencyStore(IdempotencyStoreContract):
    @pytest.fixture
    def make_store(
        self, client: redis.Redis, prefix: str
    ) -> Callable[[Clock | None], RedisIdempotencyStore]:
        return lambda clock: RedisIdempotencyStore(client, prefix=prefix, clock=clock)

    @pytest.fixture
    def process_factory(self, redis_url: str, prefix: str) -> Callable[[], RedisIdempotencyStore]:
        return partial(RedisIdempotencyStore.from_url, redis_url, prefix=prefix)


class TestAsyncRedisIdempotencyStore(AsyncIdempotencyStoreContract):
    @pytest.fixture
    def make_store(
        self, aclient: redis.asyncio.Redis, prefix: str
    ) -> Callable[[Clock | None], AsyncRedisIdempotencyStore]:
        return lambda clock: AsyncRedisIdempotencyStore(aclient, prefix=prefix, clock=clock)

    @pytest.fixture
    def process_factory(self, redis_url: str, prefix: str) -> Callable[[], RedisIdempotencyStore]:
        return partial(RedisIdempotencyStore.from_url, redis_url, prefix=prefix)


class TestRedisLockProvider(LockProviderContract):
    @pytest.fixture
    def make_provider(self, client: redis.Redis, prefix: str) -> Callable[[], RedisLockProvider]:
        return lambda: RedisLockProvider(client, prefix=prefix)

    @pytest.fixture
    def process_factory(self, redis_url: str, prefix: str) -> Callable[[], RedisLockProvider]:
        return partial(RedisLockProvider.from_url, redis_url, prefix=prefix)


class TestAsyncRedisLockProvider(AsyncLockProviderContract):
    @pytest.fixture
    def make_provider(
        self, aclient: redis.asyncio.Redis, prefix: str
    ) -> Callable[[], AsyncRedisLockProvider]:
        return lambda: AsyncRedisLockProvider(aclient, prefix=prefix)

    @pytest.fixture
    def process_factory(self, redis_url: str, prefix: str) -> Callable[[], RedisLockProvider]:
        return partial(RedisLockProvider.from_url, redis_url, prefix=prefix)


# --- Redis-specific --------------------------------------------------------------------------


def test_backends_satisfy_the_protocols(client: redis.Redis, prefix: str) -> None:
    assert isinstance(RedisLockProvider(client, prefix=prefix), LockProvider)
    assert isinstance(RedisIdempotencyStore(client, prefix=prefix), IdempotencyStore)


@pytest.mark.anyio
async def test_async_backends_satisfy_the_protocols(
    aclient: redis.asyncio.Redis, prefix: str
) -> None:
    assert isinstance(AsyncRedisLockProvider(aclient, prefix=prefix), AsyncLockProvider)
    assert isinstance(AsyncRedisIdempotencyStore(aclient, prefix=prefix), AsyncIdempotencyStore)


def test_unreachable_redis_fails_fast_with_library_errors(dead_url: str) -> None:
    with RedisLockProvider.from_url(dead_url) as locks:
        started = monotonic()
        with pytest.raises(LockError) as lock_error:
            locks.acquire("order:1", ttl=LEASE)
        assert monotonic() - started < 1.5
    assert isinstance(lock_error.value.__cause__, redis.ConnectionError)
    with RedisIdempotencyStore.from_url(dead_url) as store:
        with pytest.raises(StoreError) as store_error:
            store.claim("scope", "secret-key", "fp", lease_for=LEASE, retain_for=RETAIN)
        with pytest.raises(StoreError):
            store.get("scope", "secret-key")
        with pytest.raises(StoreError):
            store.purge_expired()
    assert "secret-key" not in str(store_error.value)


@pytest.mark.anyio
async def test_unreachable_redis_fails_fast_async(dead_url: str) -> None:
    async with AsyncRedisLockProvider.from_url(dead_url) as locks:
        started = monotonic()
        with pytest.raises(LockError):
            await locks.acquire("order:1", ttl=LEASE, wait=timedelta(seconds=5))
        assert monotonic() - started < 1.5
    async with AsyncRedisIdempotencyStore.from_url(dead_url) as store:
        with pytest.raises(StoreError):
            await store.claim("scope", "k", "fp", lease_for=LEASE, retain_for=RETAIN)


def test_a_hung_redis_times_out_into_library_errors(hung_url: str) -> None:
    with RedisLockProvider.from_url(hung_url, socket_timeout=0.2) as locks:
        started = monotonic()
        with pytest.raises(LockError):
            locks.acquire("order:1", ttl=LEASE)
        assert monotonic() - started < 2.0
    with (
        RedisIdempotencyStore.from_url(hung_url, socket_timeout=0.2) as store,
        pytest.raises(StoreError),
    ):
        store.claim("scope", "k", "fp", lease_for=LEASE, retain_for=RETAIN)


@pytest.mark.anyio
async def test_a_hung_redis_times_out_async(hung_url: str) -> None:
    async with AsyncRedisLockProvider.from_url(hung_url, socket_timeout=0.2) as locks:
        started = monotonic()
        with pytest.raises(LockError):
            await locks.release("order:1", _lease_for_nobody())
        assert monotonic() - started < 2.0


def _lease_for_nobody() -> Lease:
    return Lease(token="nobody", fence=1, expires_at=datetime.now(UTC))


def test_a_redis_error_reply_becomes_a_library_error(client: redis.Redis, prefix: str) -> None:
    locks = RedisLockProvider(client, prefix=prefix)
    lock, _ = lock_keys(prefix, "order:1")
    client.hset(lock, "not", "a string")  # WRONGTYPE for GET
    with pytest.raises(LockError) as error:
        locks.release("order:1", _lease_for_nobody())
    assert isinstance(error.value.__cause__, redis.ResponseError)


def test_a_malformed_record_is_a_store_error(client: redis.Redis, prefix: str) -> None:
    store = RedisIdempotencyStore(client, prefix=prefix)
    client.hset(record_key(prefix, "scope", "k"), mapping={"expires": str(2**52), "x": "y"})
    with pytest.raises(StoreError):
        store.get("scope", "k")
    whole: dict[FieldT, EncodableT] = {
        "fp": "fp",
        "state": "completed",
        "fence": "1",
        "created": "0",
    }
    bad_fields: list[dict[FieldT, EncodableT]] = [
        {"expires": str(2**52), "fp": b"\xff"},  # not UTF-8
        {"expires": str(10**20)},  # past datetime's range
        {"expires": str(2**52), "state": "lost"},
        {"expires": str(2**52), "status": "200", "body": "not base64!"},
    ]
    for bad in bad_fields:
        client.delete(record_key(prefix, "scope", "k"))
        client.hset(record_key(prefix, "scope", "k"), mapping={**whole, **bad})
        with pytest.raises(StoreError):
            store.get("scope", "k")
        with pytest.raises(StoreError):
            store.claim("scope", "k", "fp", lease_for=LEASE, retain_for=RETAIN)


def test_keys_carry_hash_tags_that_keep_a_lock_with_its_fence(
    client: redis.Redis, prefix: str
) -> None:
    locks = RedisLockProvider(client, prefix=prefix)
    names = ["order:1", "with {braces}", "}{", "", "x" * 300, "caf\u00e9"]
    for name in names:
        assert locks.acquire(name, ttl=LEASE) is not None
    store = RedisIdempotencyStore(client, prefix=prefix)
    assert isinstance(
        store.claim("scope", "{k}", "fp", lease_for=LEASE, retain_for=RETAIN), Claimed
    )

    found = sorted(k.decode() for k in client.scan_iter(match=f"{prefix}:*"))
    locks_found = [k for k in found if k.startswith(f"{prefix}:lock:")]
    fences_found = [k for k in found if k.startswith(f"{prefix}:fence:")]
    records_found = [k for k in found if k.startswith(f"{prefix}:idem:")]
    assert (len(locks_found), len(fences_found), len(records_found)) == (len(names), len(names), 1)
    for name in names:
        lock, fence = lock_keys(prefix, name)
        assert lock in locks_found
        assert fence in fences_found
        # A well-formed hash tag: a non-empty {...} right after the prefix part.
        tag = lock[len(f"{prefix}:lock:") :].split("}", 1)[0]
        assert tag.startswith("{")
        assert len(tag) > 1
        assert key_slot(lock.encode()) == key_slot(fence.encode())
    assert records_found[0].endswith("}")
    # Distinct names never share a key, even one that looks like another's digest.
    assert len({lock_keys(prefix, n)[0] for n in names}) == len(names)


def test_bad_options_are_configuration_errors(client: redis.Redis, prefix: str) -> None:
    with pytest.raises(ConfigurationError):
        RedisLockProvider(client, prefix="with{brace")
    with pytest.raises(ConfigurationError):
        RedisIdempotencyStore(client, prefix="")
    with pytest.raises(ConfigurationError):
        RedisLockProvider.from_url("http://not-redis/")
    with pytest.raises(ConfigurationError):
        RedisLockProvider.from_url("redis://127.0.0.1:6379/0", socket_timeout=0)
    locks = RedisLockProvider(client, prefix=prefix)
    with pytest.raises(ConfigurationError):
        locks.acquire("n", ttl=timedelta(0))
    held = locks.acquire("n", ttl=LEASE)
    assert held is not None
    with pytest.raises(ConfigurationError):
        locks.extend("n", held, ttl=timedelta(seconds=-1))


def test_a_lock_and_its_fence_always_have_an_expiry(client: redis.Redis, prefix: str) -> None:
    locks = RedisLockProvider(client, prefix=prefix)
    held = locks.acquire("order:1", ttl=timedelta(microseconds=1))
    assert held is not None
    lock, fence = lock_keys(prefix, "order:1")
    assert client.pttl(lock) in (-2, 0, 1)  # one millisecond at most, or already gone
    # The fence counter outlives the lock by a week, then goes: no key is kept for ever.
    assert 0 < client.pttl(fence) <= FENCE_RETENTION_MS


def test_a_lock_lost_behind_the_providers_back_gets_a_higher_fence_while_the_counter_lives(
    client: redis.Redis, prefix: str
) -> None:
    locks = RedisLockProvider(client, prefix=prefix)
    lock, fence = lock_keys(prefix, "order:1")
    first = locks.acquire("order:1", ttl=LEASE)
    assert first is not None
    client.delete(lock)  # evicted, or expired, behind the provider's back
    second = locks.acquire("order:1", ttl=LEASE)
    assert second is not None
    assert second.fence > first.fence
    assert locks.release("order:1", first) is False
    assert locks.extend("order:1", first, ttl=LEASE) is None
    # Redis restarted empty (or evicted the counter too): fences start again from 1. A write
    # fenced by a lock alone could then be confused with an older one; this is why the stores
    # fence their own writes and correctness never rests on the lock.
    client.delete(lock, fence)
    third = locks.acquire("order:1", ttl=LEASE)
    assert third is not None
    assert third.fence == 1
    assert locks.release("order:1", second) is False
    assert locks.release("order:1", third)


def test_a_lease_that_ran_out_during_a_slow_handler_is_released_late_without_error(
    client: redis.Redis, prefix: str
) -> None:
    """Scenario L1: the slow handler's lease expires, a duplicate takes the lock; the slow
    handler's late release and extend are refused (False / None), never raised."""
    locks = RedisLockProvider(client, prefix=prefix)
    slow = locks.acquire("checkout:k", ttl=timedelta(milliseconds=50))
    assert slow is not None
    duplicate = locks.acquire("checkout:k", ttl=LEASE, wait=timedelta(seconds=10))
    assert duplicate is not None
    assert duplicate.fence > slow.fence
    assert locks.extend("checkout:k", slow, ttl=LEASE) is None
    assert locks.release("checkout:k", slow) is False
    assert locks.acquire("checkout:k", ttl=LEASE) is None  # the duplicate still holds it
    assert locks.release("checkout:k", duplicate)


def test_waiting_for_a_busy_lock_stops_at_the_deadline(client: redis.Redis, prefix: str) -> None:
    locks = RedisLockProvider(client, prefix=prefix)
    assert locks.acquire("busy", ttl=LEASE) is not None
    started = monotonic()
    assert locks.acquire("busy", ttl=LEASE, wait=timedelta(milliseconds=150)) is None
    assert 0.15 <= monotonic() - started < 2.0


@pytest.mark.anyio
async def test_waiting_for_a_lock_leaves_the_event_loop_free(
    aclient: redis.asyncio.Redis, prefix: str
) -> None:
    locks = AsyncRedisLockProvider(aclient, prefix=prefix)
    held = await locks.acquire("busy", ttl=timedelta(minutes=5))
    assert held is not None
    started = monotonic()
    waiter = asyncio.create_task(locks.acquire("busy", ttl=LEASE, wait=timedelta(seconds=20)))
    # The release below can only run while the waiter waits if waiting never blocks the loop.
    assert await aclient.ping()
    assert not waiter.done()
    assert await locks.release("busy", held)
    successor = await waiter
    assert successor is not None
    assert successor.fence > held.fence
    assert monotonic() - started < 10


def test_lease_times_come_from_the_redis_server(client: redis.Redis, prefix: str) -> None:
    locks = RedisLockProvider(client, prefix=prefix)
    store = RedisIdempotencyStore(client, prefix=prefix)
    seconds, micros = client.time()
    server_now = seconds + micros / 1e6
    held = locks.acquire("order:1", ttl=LEASE)
    claimed = store.claim("scope", "k", "fp", lease_for=LEASE, retain_for=RETAIN)
    assert held is not None
    assert isinstance(claimed, Claimed)
    for expiry in (held.expires_at, claimed.lease.expires_at):
        assert abs(expiry.timestamp() - (server_now + LEASE.total_seconds())) < 5


def test_a_record_key_outlives_its_logical_expiry_by_the_margin(
    client: redis.Redis, prefix: str
) -> None:
    store = RedisIdempotencyStore(client, prefix=prefix)
    claimed = store.claim("scope", "k", "fp", lease_for=LEASE, retain_for=RETAIN)
    assert isinstance(claimed, Claimed)
    ttl_ms = client.pttl(record_key(prefix, "scope", "k"))
    full = RETAIN // timedelta(milliseconds=1) + PHYSICAL_MARGIN_MS
    assert full - 5_000 < ttl_ms <= full


def test_a_client_that_decodes_responses_works_too(redis_url: str, prefix: str) -> None:
    with redis.Redis.from_url(redis_url, decode_responses=True) as decoding:
        store = RedisIdempotencyStore(decoding, prefix=prefix, clock=FrozenClock())
        claimed = store.claim("scope", "k", "fp", lease_for=LEASE, retain_for=RETAIN)
        assert isinstance(claimed, Claimed)
        store.checkpoint("scope", "k", claimed.lease, recovery_point="rp", resource_id="o-\u00e9")
        done = store.complete("scope", "k", claimed.lease, BINARY)
        assert done.response == BINARY
        again = store.claim("scope", "k", "fp", lease_for=LEASE, retain_for=RETAIN)
        assert isinstance(again, Existing)
        assert again.record.response == BINARY
        assert again.record.resource_id == "o-\u00e9"
        locks = RedisLockProvider(decoding, prefix=prefix)
        held = locks.acquire("order:1", ttl=LEASE)
        assert held is not None
        assert locks.release("order:1", held)


@pytest.mark.parametrize("decode", [False, True], ids=["bytes", "decoding"])
@pytest.mark.parametrize("frozen", [False, True], ids=["redis-clock", "frozen-clock"])
def test_records_built_from_short_replies_are_exactly_what_get_reads(
    redis_url: str, prefix: str, decode: bool, frozen: bool
) -> None:
    """claim and complete build their records from what they sent and a short reply (the
    scripts never send a whole record back); each must equal what a later get reads."""
    clock = FrozenClock() if frozen else None
    scope, key, fp = "tenant/caf\u00e9 {x}", "K-1 {y}", "fp-\u00e9\n"
    with redis.Redis.from_url(redis_url, decode_responses=decode) as c:
        store = RedisIdempotencyStore(c, prefix=prefix, clock=clock)
        fresh = store.claim(scope, key, fp, lease_for=LEASE, retain_for=RETAIN)
        assert isinstance(fresh, Claimed)
        assert fresh.record == store.get(scope, key)
        assert fresh.record.lease == fresh.lease
        assert fresh.record.expires_at == fresh.record.created_at + RETAIN
        assert fresh.lease.expires_at == fresh.record.created_at + LEASE

        store.checkpoint(scope, key, fresh.lease, recovery_point="charged", resource_id="o-1")
        extended = store.extend(scope, key, fresh.lease, lease_for=RETAIN * 2)  # moves expiry
        store.release(scope, key, extended)
        resumed = store.claim(scope, key, fp, lease_for=LEASE, retain_for=RETAIN)
        assert isinstance(resumed, Claimed)
        assert resumed.resumed
        assert resumed.lease.fence == fresh.lease.fence + 1
        assert resumed.record == store.get(scope, key)
        assert (resumed.record.recovery_point, resumed.record.resource_id) == ("charged", "o-1")

        done = store.complete(scope, key, resumed.lease, BINARY, failed=True)
        assert done == store.get(scope, key)
        assert done.expires_at > fresh.record.expires_at  # the extension is kept
        existing = store.claim(scope, key, fp, lease_for=LEASE, retain_for=RETAIN)
        assert isinstance(existing, Existing)
        assert existing.record == done


def test_an_expired_record_is_replaced_whole_with_a_higher_fence(
    client: redis.Redis, prefix: str
) -> None:
    clock = FrozenClock()
    store = RedisIdempotencyStore(client, prefix=prefix, clock=clock)
    first = store.claim("scope", "k", "fp", lease_for=LEASE, retain_for=RETAIN)
    assert isinstance(first, Claimed)
    store.checkpoint("scope", "k", first.lease, recovery_point="rp", resource_id="o-1")
    store.complete("scope", "k", first.lease, BINARY)
    clock.advance(RETAIN)
    again = store.claim("scope", "k", "other", lease_for=LEASE, retain_for=RETAIN)
    assert isinstance(again, Claimed)
    assert not again.resumed
    assert again.lease.fence == first.lease.fence + 1
    assert again.record == store.get("scope", "k")
    assert (again.record.recovery_point, again.record.resource_id) == (None, None)
    assert again.record.response is None
    assert again.record.fingerprint == "other"


@pytest.mark.anyio
async def test_async_records_built_from_short_replies_are_exactly_what_get_reads(
    aclient: redis.asyncio.Redis, prefix: str
) -> None:
    store = AsyncRedisIdempotencyStore(aclient, prefix=prefix)
    fresh = await store.claim("scope", "k", "fp", lease_for=LEASE, retain_for=RETAIN)
    assert isinstance(fresh, Claimed)
    assert fresh.record == await store.get("scope", "k")
    await store.checkpoint("scope", "k", fresh.lease, recovery_point="rp")
    done = await store.complete("scope", "k", fresh.lease, BINARY)
    assert done == await store.get("scope", "k")
    assert done.recovery_point == "rp"
    existing = await store.claim("scope", "k", "fp", lease_for=LEASE, retain_for=RETAIN)
    assert isinstance(existing, Existing)
    assert existing.record == done


def test_a_script_cache_flushed_behind_the_stores_back_is_reloaded(
    private_redis: PrivateRedis,
) -> None:
    """The store calls its scripts by SHA1; Redis forgetting them (SCRIPT FLUSH, a failover to
    a replica that never saw them) costs a reload, not an error."""
    with (
        RedisIdempotencyStore.from_url(private_redis.url, prefix="p") as store,
        redis.Redis.from_url(private_redis.url) as raw,
    ):
        claimed = store.claim("scope", "k", "fp", lease_for=LEASE, retain_for=RETAIN)
        assert isinstance(claimed, Claimed)
        raw.script_flush()
        done = store.complete("scope", "k", claimed.lease, BINARY)
        assert done == store.get("scope", "k")


def test_a_checkpoint_without_a_resource_id_keeps_the_previous_one(
    client: redis.Redis, prefix: str
) -> None:
    store = RedisIdempotencyStore(client, prefix=prefix)
    claimed = store.claim("scope", "k", "fp", lease_for=LEASE, retain_for=RETAIN)
    assert isinstance(claimed, Claimed)
    store.checkpoint("scope", "k", claimed.lease, recovery_point="a", resource_id="o-1")
    store.checkpoint("scope", "k", claimed.lease, recovery_point="b")
    record = store.get("scope", "k")
    assert record is not None
    assert (record.recovery_point, record.resource_id) == ("b", "o-1")
    assert record.state is RecordState.IN_PROGRESS


def test_a_record_deleted_behind_the_stores_back_fences_out_its_owner(
    client: redis.Redis, prefix: str
) -> None:
    store = RedisIdempotencyStore(client, prefix=prefix)
    first = store.claim("scope", "k", "fp", lease_for=LEASE, retain_for=RETAIN)
    assert isinstance(first, Claimed)
    client.delete(record_key(prefix, "scope", "k"))  # evicted, or Redis restarted empty
    second = store.claim("scope", "k", "fp", lease_for=LEASE, retain_for=RETAIN)
    assert isinstance(second, Claimed)
    assert not second.resumed
    with pytest.raises(LeaseLostError):
        store.complete("scope", "k", first.lease, BINARY)
    store.complete("scope", "k", second.lease, BINARY)


def test_purge_only_touches_its_own_prefix(client: redis.Redis, prefix: str) -> None:
    clock = FrozenClock()
    mine = RedisIdempotencyStore(client, prefix=f"{prefix}:a*", clock=clock)
    other = RedisIdempotencyStore(client, prefix=f"{prefix}:ab", clock=clock)
    for store in (mine, other):
        for key in ("k1", "k2", "k3"):
            assert isinstance(
                store.claim("s", key, "fp", lease_for=LEASE, retain_for=RETAIN), Claimed
            )
    clock.advance(RETAIN)
    assert mine.purge_expired(limit=2) == 2
    assert mine.purge_expired(limit=0) == 0
    assert mine.purge_expired() == 1
    assert mine.purge_expired() == 0
    assert other.get("s", "k1") is None  # expired, but still there to purge
    assert other.purge_expired() == 3


def test_close_leaves_a_client_passed_in_open(client: redis.Redis, prefix: str) -> None:
    RedisLockProvider(client, prefix=prefix).close()
    RedisIdempotencyStore(client, prefix=prefix).close()
    assert client.ping()


@pytest.mark.anyio
async def test_aclose_leaves_a_client_passed_in_open(
    aclient: redis.asyncio.Redis, prefix: str
) -> None:
    await AsyncRedisLockProvider(aclient, prefix=prefix).aclose()
    await AsyncRedisIdempotencyStore(aclient, prefix=prefix).aclose()
    assert await aclient.ping()


def test_redis_down_then_restarted_empty(private_redis: PrivateRedis) -> None:
    """Scenario L3: Redis down fails closed; once back (empty) the same objects carry on, the
    lock's fences start again from 1, and the records are gone: a repeat is claimed afresh, and
    only the database guards stop it from running twice. An old lease stays fenced out."""
    with (
        RedisLockProvider.from_url(private_redis.url, prefix="p") as locks,
        RedisIdempotencyStore.from_url(private_redis.url, prefix="p") as store,
    ):
        before = locks.acquire("order:1", ttl=LEASE)
        assert before is not None
        assert locks.release("order:1", before)
        held = locks.acquire("order:1", ttl=LEASE)
        assert held is not None
        assert held.fence == 2
        claimed = store.claim("scope", "k", "fp", lease_for=LEASE, retain_for=RETAIN)
        assert isinstance(claimed, Claimed)

        private_redis.stop()
        with pytest.raises(LockError):
            locks.acquire("order:1", ttl=LEASE)
        with pytest.raises(StoreError):
            store.get("scope", "k")

        private_redis.start()
        after = locks.acquire("order:1", ttl=LEASE)
        assert after is not None
        assert after.fence == 1  # the counter was lost with everything else
        assert locks.release("order:1", held) is False
        again = store.claim("scope", "k", "fp", lease_for=LEASE, retain_for=RETAIN)
        assert isinstance(again, Claimed)
        assert not again.resumed
        with pytest.raises(LeaseLostError):
            store.complete("scope", "k", claimed.lease, BINARY)


@pytest.mark.anyio
async def test_a_restarted_redis_costs_the_async_client_no_error(
    private_redis: PrivateRedis,
) -> None:
    async with (
        AsyncRedisLockProvider.from_url(private_redis.url, prefix="p") as locks,
        AsyncRedisIdempotencyStore.from_url(private_redis.url, prefix="p") as store,
    ):
        assert await locks.acquire("order:1", ttl=LEASE) is not None
        assert isinstance(
            await store.claim("scope", "k", "fp", lease_for=LEASE, retain_for=RETAIN), Claimed
        )
        private_redis.restart_empty()
        # The pooled connections are dead; one immediate reconnect hides that.
        after = await locks.acquire("order:1", ttl=LEASE)
        assert after is not None
        assert after.fence == 1
        assert await store.get("scope", "k") is None
