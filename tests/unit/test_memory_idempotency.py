"""The in-memory idempotency store and lock providers, sync and async, under contention."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest

from idempay.clock import FrozenClock
from idempay.core.records import Claimed, Existing, RecordState, StoredResponse
from idempay.errors import (
    ConfigurationError,
    IdempotencyKeyError,
    LeaseLostError,
    MissingIdempotencyKeyError,
)
from idempay.memory import (
    AsyncMemoryIdempotencyStore,
    AsyncMemoryLockProvider,
    AsyncNoLockProvider,
    MemoryIdempotencyStore,
    MemoryLockProvider,
    NoLockProvider,
)
from idempay.protocols import (
    AsyncIdempotencyStore,
    AsyncLockProvider,
    IdempotencyStore,
    LockProvider,
)

LEASE = timedelta(seconds=30)
RETAIN = timedelta(hours=24)
OK = StoredResponse(status=200, body=b"{}")


@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock()


@pytest.fixture
def store(clock: FrozenClock) -> MemoryIdempotencyStore:
    return MemoryIdempotencyStore(clock=clock)


def claim(store: MemoryIdempotencyStore, key: str = "k1", fp: str = "fp") -> Claimed | Existing:
    return store.claim("scope", key, fp, lease_for=LEASE, retain_for=RETAIN)


def test_backends_satisfy_the_protocols() -> None:
    assert isinstance(MemoryIdempotencyStore(), IdempotencyStore)
    assert isinstance(AsyncMemoryIdempotencyStore(), AsyncIdempotencyStore)
    for lock in (MemoryLockProvider(), NoLockProvider()):
        assert isinstance(lock, LockProvider)
    for alock in (AsyncMemoryLockProvider(), AsyncNoLockProvider()):
        assert isinstance(alock, AsyncLockProvider)


def test_first_claim_wins_and_the_second_sees_it(store: MemoryIdempotencyStore) -> None:
    first = claim(store)
    assert isinstance(first, Claimed)
    assert not first.resumed
    assert first.record.state is RecordState.IN_PROGRESS
    second = claim(store)
    assert isinstance(second, Existing)
    assert second.record.lease == first.lease


def test_many_threads_one_winner(store: MemoryIdempotencyStore) -> None:
    n = 32
    barrier = threading.Barrier(n)

    def contend(_: int) -> bool:
        barrier.wait()
        return isinstance(claim(store), Claimed)

    with ThreadPoolExecutor(n) as pool:
        wins = list(pool.map(contend, range(n)))
    assert wins.count(True) == 1


@pytest.mark.anyio
async def test_many_tasks_one_winner(clock: FrozenClock) -> None:
    astore = AsyncMemoryIdempotencyStore(clock=clock)
    start = asyncio.Event()

    async def contend() -> bool:
        await start.wait()
        result = await astore.claim("scope", "k", "fp", lease_for=LEASE, retain_for=RETAIN)
        return isinstance(result, Claimed)

    tasks = [asyncio.create_task(contend()) for _ in range(50)]
    start.set()
    wins = await asyncio.gather(*tasks)
    assert wins.count(True) == 1


def test_keys_are_byte_exact_and_never_truncated(store: MemoryIdempotencyStore) -> None:
    assert isinstance(claim(store, "Key"), Claimed)
    assert isinstance(claim(store, "key"), Claimed)
    assert isinstance(claim(store, "x" * 255), Claimed)
    with pytest.raises(IdempotencyKeyError):
        claim(store, "x" * 256)
    assert store.get("scope", "x" * 255) is not None
    with pytest.raises(IdempotencyKeyError):
        claim(store, "a\x00b")
    with pytest.raises(MissingIdempotencyKeyError):
        store.claim("scope", None, "fp", lease_for=LEASE, retain_for=RETAIN)  # type: ignore[arg-type]


def test_scopes_separate_the_same_key(store: MemoryIdempotencyStore) -> None:
    a = store.claim("tenant-a", "k", "fp", lease_for=LEASE, retain_for=RETAIN)
    b = store.claim("tenant-b", "k", "fp", lease_for=LEASE, retain_for=RETAIN)
    assert isinstance(a, Claimed)
    assert isinstance(b, Claimed)


def test_expired_lease_is_taken_over_and_the_stale_owner_is_fenced_out(
    store: MemoryIdempotencyStore, clock: FrozenClock
) -> None:
    first = claim(store)
    assert isinstance(first, Claimed)
    store.checkpoint("scope", "k1", first.lease, recovery_point="order_created", resource_id="o1")
    clock.advance(LEASE)
    second = claim(store)
    assert isinstance(second, Claimed)
    assert second.resumed
    assert second.lease.fence == first.lease.fence + 1
    assert second.record.recovery_point == "order_created"
    assert second.record.resource_id == "o1"
    for stale_write in (
        lambda: store.complete("scope", "k1", first.lease, OK),
        lambda: store.checkpoint("scope", "k1", first.lease, recovery_point="x"),
        lambda: store.release("scope", "k1", first.lease),
        lambda: store.extend("scope", "k1", first.lease, lease_for=LEASE),
    ):
        with pytest.raises(LeaseLostError):
            stale_write()
    done = store.complete("scope", "k1", second.lease, OK)
    assert done.state is RecordState.COMPLETED
    assert done.response == OK


def test_takeover_requires_the_same_fingerprint(
    store: MemoryIdempotencyStore, clock: FrozenClock
) -> None:
    assert isinstance(claim(store, fp="a"), Claimed)
    clock.advance(LEASE * 2)
    result = claim(store, fp="b")
    assert isinstance(result, Existing)
    assert result.record.fingerprint == "a"


def test_complete_after_expiry_is_allowed_while_nobody_took_over(
    store: MemoryIdempotencyStore, clock: FrozenClock
) -> None:
    first = claim(store)
    assert isinstance(first, Claimed)
    clock.advance(LEASE * 2)
    assert store.complete("scope", "k1", first.lease, OK, failed=True).state is RecordState.FAILED
    assert isinstance(claim(store), Existing)


def test_release_makes_the_record_recoverable_or_forgets_it(
    store: MemoryIdempotencyStore,
) -> None:
    first = claim(store)
    assert isinstance(first, Claimed)
    store.release("scope", "k1", first.lease)
    record = store.get("scope", "k1")
    assert record is not None
    assert record.state is RecordState.UNKNOWN
    again = claim(store)
    assert isinstance(again, Claimed)
    assert again.resumed
    store.release("scope", "k1", again.lease, discard=True)
    assert store.get("scope", "k1") is None
    fresh = claim(store)
    assert isinstance(fresh, Claimed)
    assert not fresh.resumed


def test_extend_keeps_the_lease_alive(store: MemoryIdempotencyStore, clock: FrozenClock) -> None:
    first = claim(store)
    assert isinstance(first, Claimed)
    clock.advance(LEASE / 2)
    extended = store.extend("scope", "k1", first.lease, lease_for=LEASE)
    clock.advance(LEASE * 0.9)
    assert isinstance(claim(store), Existing)
    assert extended.fence == first.lease.fence


def test_records_expire_and_are_purged(store: MemoryIdempotencyStore, clock: FrozenClock) -> None:
    first = claim(store)
    assert isinstance(first, Claimed)
    store.complete("scope", "k1", first.lease, OK)
    claim(store, "k2")
    clock.advance(RETAIN)
    assert store.get("scope", "k1") is None
    assert store.purge_expired(limit=1) == 1
    assert store.purge_expired() == 1
    assert store.purge_expired() == 0
    renewed = claim(store)
    assert isinstance(renewed, Claimed)
    assert not renewed.resumed
    # Purged records leave no fence behind; the token alone still fences the old owner out.
    with pytest.raises(LeaseLostError):
        store.complete("scope", "k1", first.lease, OK)


def test_durations_must_be_positive(store: MemoryIdempotencyStore) -> None:
    with pytest.raises(ConfigurationError):
        store.claim("s", "k", "fp", lease_for=timedelta(0), retain_for=RETAIN)
    with pytest.raises(ConfigurationError):
        store.claim("s", "k", "fp", lease_for=LEASE, retain_for=-RETAIN)


@pytest.mark.anyio
async def test_async_store_has_the_same_lifecycle(clock: FrozenClock) -> None:
    astore = AsyncMemoryIdempotencyStore(clock=clock)
    first = await astore.claim("s", "k", "fp", lease_for=LEASE, retain_for=RETAIN)
    assert isinstance(first, Claimed)
    await astore.checkpoint("s", "k", first.lease, recovery_point="intent_created")
    lease = await astore.extend("s", "k", first.lease, lease_for=LEASE)
    await astore.release("s", "k", lease)
    second = await astore.claim("s", "k", "fp", lease_for=LEASE, retain_for=RETAIN)
    assert isinstance(second, Claimed)
    assert second.record.recovery_point == "intent_created"
    done = await astore.complete("s", "k", second.lease, OK)
    assert done.state is RecordState.COMPLETED
    got = await astore.get("s", "k")
    assert got is not None
    assert got.response == OK
    clock.advance(RETAIN)
    assert await astore.purge_expired() == 1
    with pytest.raises(LeaseLostError):
        await astore.release("s", "k", second.lease, discard=True)


# --- locks -----------------------------------------------------------------------------------


def test_lock_is_exclusive_fenced_and_expires(clock: FrozenClock) -> None:
    locks = MemoryLockProvider(clock=clock)
    first = locks.acquire("order:1", ttl=LEASE)
    assert first is not None
    assert locks.acquire("order:1", ttl=LEASE) is None
    assert locks.acquire("order:2", ttl=LEASE) is not None
    clock.advance(LEASE)
    second = locks.acquire("order:1", ttl=LEASE)
    assert second is not None
    assert second.fence == first.fence + 1
    # The expired owner can neither release nor extend the new owner's lock.
    assert locks.release("order:1", first) is False
    assert locks.extend("order:1", first, ttl=LEASE) is None
    extended = locks.extend("order:1", second, ttl=LEASE * 2)
    assert extended is not None
    assert extended.expires_at > second.expires_at
    assert locks.release("order:1", second) is True
    third = locks.acquire("order:1", ttl=LEASE)
    assert third is not None
    assert third.fence == second.fence + 1


def test_release_after_expiry_reports_the_lease_was_lost(clock: FrozenClock) -> None:
    locks = MemoryLockProvider(clock=clock)
    lease = locks.acquire("x", ttl=LEASE)
    assert lease is not None
    clock.advance(LEASE * 2)
    assert locks.release("x", lease) is False


def test_waiting_acquire_gets_the_lock_when_it_is_released() -> None:
    locks = MemoryLockProvider()
    held = locks.acquire("x", ttl=timedelta(minutes=5))
    assert held is not None
    waiting = threading.Event()
    got: list[object] = []

    def waiter() -> None:
        waiting.set()
        got.append(locks.acquire("x", ttl=LEASE, wait=timedelta(seconds=30)))

    thread = threading.Thread(target=waiter)
    thread.start()
    waiting.wait()
    assert locks.release("x", held)
    thread.join(timeout=30)
    assert got
    assert got[0] is not None


def test_waiting_acquire_gives_up_after_its_wait() -> None:
    locks = MemoryLockProvider()
    assert locks.acquire("x", ttl=timedelta(minutes=5)) is not None
    assert locks.acquire("x", ttl=LEASE, wait=timedelta(milliseconds=20)) is None


def test_many_threads_one_lock_holder() -> None:
    locks = MemoryLockProvider()
    n = 24
    barrier = threading.Barrier(n)

    def contend(_: int) -> bool:
        barrier.wait()
        return locks.acquire("hot", ttl=timedelta(minutes=1)) is not None

    with ThreadPoolExecutor(n) as pool:
        assert list(pool.map(contend, range(n))).count(True) == 1


def test_lock_ttl_must_be_positive() -> None:
    for provider in (MemoryLockProvider(), NoLockProvider()):
        with pytest.raises(ConfigurationError):
            provider.acquire("x", ttl=timedelta(0))


def test_no_lock_provider_always_grants(clock: FrozenClock) -> None:
    locks = NoLockProvider(clock=clock)
    a = locks.acquire("x", ttl=LEASE)
    b = locks.acquire("x", ttl=LEASE)
    assert a is not None
    assert b is not None
    assert a.token != b.token
    assert locks.release("x", a)
    extended = locks.extend("x", a, ttl=LEASE * 2)
    assert extended is not None
    assert extended.expires_at == clock.now() + LEASE * 2


@pytest.mark.anyio
async def test_async_locks(clock: FrozenClock) -> None:
    locks = AsyncMemoryLockProvider(clock=clock)
    held = await locks.acquire("x", ttl=LEASE)
    assert held is not None
    assert await locks.acquire("x", ttl=LEASE) is None
    assert await locks.acquire("x", ttl=LEASE, wait=timedelta(milliseconds=10)) is None
    extended = await locks.extend("x", held, ttl=LEASE)
    assert extended is not None
    assert await locks.release("x", held)
    assert await locks.acquire("x", ttl=LEASE, wait=timedelta(seconds=1)) is not None
    off = AsyncNoLockProvider(clock=clock)
    lease = await off.acquire("x", ttl=LEASE)
    assert lease is not None
    assert await off.extend("x", lease, ttl=LEASE) is not None
    assert await off.release("x", lease)
