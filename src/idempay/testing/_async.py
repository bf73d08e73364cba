"""Contract suites every backend must pass (async source; the sync twin is generated).

Subclass a suite in a test module and provide its fixtures; every test then runs against your
backend. The suites need pytest, and anyio's pytest plugin for the async ones.

``make_store(clock)`` / ``make_provider()`` build the backend under test; ``clock`` is a
:class:`~idempay.clock.FrozenClock` when a test needs to move time, or ``None`` for the backend's
own clock. ``process_factory`` is a picklable zero-argument callable returning a *sync* store or
provider on the same backing service, used by the multi-process tests; leave it ``None`` for a
backend that shares nothing between processes. Tests use fresh random keys and ids, so backends
may share one database between tests.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import replace
from datetime import timedelta
from typing import Any, Protocol

import pytest

from idempay.clock import Clock, FrozenClock
from idempay.core.audit import AuditDraft, AuditSource, AuditStep, verify_trail
from idempay.core.models import (
    AuditHead,
    EventCommit,
    EventReception,
    InboxEvent,
    InboxStatus,
    JournalEntry,
    NewEffect,
    OrderRecord,
    OutboxBacklog,
    OutboxEntry,
    OutboxStatus,
)
from idempay.core.orders import DisputeStatus, OrderState, OrderStatus, ReviewReason
from idempay.core.records import Claimed, Existing, RecordState, StoredResponse
from idempay.errors import (
    ConcurrentUpdateError,
    ConfigurationError,
    IdempotencyKeyError,
    LeaseLostError,
)
from idempay.protocols import (
    AsyncIdempotencyStore,
    AsyncJournalStore,
    AsyncLockProvider,
    AsyncMaintenanceStore,
    AsyncOutboxStore,
    AsyncPaymentStore,
    AsyncPaymentTransaction,
)
from idempay.testing._support import (
    async_concurrently,
    async_in_processes,
    async_shut,
    claim_checks_in_child,
    claim_in_child,
    dispatch_in_child,
    flatten,
    kill_child_holding_a_transaction,
    lock_in_child,
)

__all__ = [
    "AsyncIdempotencyStoreContract",
    "AsyncLockProviderContract",
    "AsyncMaintenanceStoreContract",
    "AsyncPaymentStoreContract",
]

LEASE = timedelta(seconds=30)
RETAIN = timedelta(hours=24)
OK = StoredResponse(
    status=201,
    body=b'{"order":"o1","bytes":"\\u00e9"}\x00\xff',
    content_type="application/json; charset=utf-8",
    headers=(("Location", "/orders/o1"), ("X-Request-Id", "r-1")),
)
THREADS = 16


def _uid() -> str:
    return secrets.token_hex(8)


class _AsyncFixtures:
    """Fixtures every suite shares; a backend overrides ``process_factory`` to share state."""

    pytestmark = pytest.mark.anyio  # unasync: remove

    @pytest.fixture
    def anyio_backend(self) -> str:
        return "asyncio"

    @pytest.fixture
    def process_factory(self) -> Callable[[], Any] | None:
        return None

    @pytest.fixture
    def clock(self) -> FrozenClock:
        return FrozenClock()


class AsyncIdempotencyStoreContract(_AsyncFixtures):
    """What every idempotency store must do; see :class:`idempay.protocols.IdempotencyStore`."""

    @pytest.fixture
    async def store(
        self, make_store: Callable[[Clock | None], AsyncIdempotencyStore], clock: FrozenClock
    ) -> AsyncIterator[AsyncIdempotencyStore]:
        store = make_store(clock)
        yield store
        await async_shut(store)

    async def _claim(
        self, store: AsyncIdempotencyStore, scope: str, key: str, fp: str = "fp"
    ) -> Claimed | Existing:
        return await store.claim(scope, key, fp, lease_for=LEASE, retain_for=RETAIN)

    async def test_first_claim_wins_and_the_next_sees_it(
        self, store: AsyncIdempotencyStore
    ) -> None:
        scope = _uid()
        first = await self._claim(store, scope, "k")
        assert isinstance(first, Claimed)
        assert not first.resumed
        assert first.record.state is RecordState.IN_PROGRESS
        assert first.record.fingerprint == "fp"
        second = await self._claim(store, scope, "k")
        assert isinstance(second, Existing)
        assert second.record.lease is not None
        assert second.record.lease.token == first.lease.token
        assert second.record.fence == first.lease.fence

    async def test_concurrent_claims_have_exactly_one_winner(
        self, store: AsyncIdempotencyStore
    ) -> None:
        scope = _uid()

        async def contend(_: int) -> bool:
            return isinstance(await self._claim(store, scope, "hot"), Claimed)

        assert (await async_concurrently(THREADS, contend)).count(True) == 1

    async def test_claims_from_several_processes_have_exactly_one_winner(
        self, process_factory: Callable[[], Any] | None
    ) -> None:
        if process_factory is None:
            pytest.skip("this backend shares no state between processes")
        wins = await async_in_processes(claim_in_child, 4, process_factory, _uid(), "hot")
        assert wins.count(True) == 1

    async def test_keys_are_byte_exact(self, store: AsyncIdempotencyStore) -> None:
        scope = _uid()
        odd = "Key with 'quotes', \"double\", back\\slash, 100% _under_ ~!@#$^&*()[]{}|;:,.<>?/`="
        for key in ("Key", "key", "KEY", odd, "x" * 255):
            assert isinstance(await self._claim(store, scope, key), Claimed), key
            record = await store.get(scope, key)
            assert record is not None
            assert (record.scope, record.key) == (scope, key)

    async def test_an_over_long_or_invalid_key_is_refused_not_truncated(
        self, store: AsyncIdempotencyStore
    ) -> None:
        scope = _uid()
        for bad in ("x" * 256, "a\x00b", "tab\tkey", ""):
            with pytest.raises(IdempotencyKeyError):
                await self._claim(store, scope, bad)
        assert await store.get(scope, "x" * 255) is None

    async def test_scopes_keep_the_same_key_apart(self, store: AsyncIdempotencyStore) -> None:
        key = _uid()
        assert isinstance(await self._claim(store, _uid(), key), Claimed)
        assert isinstance(await self._claim(store, _uid(), key), Claimed)

    async def test_complete_then_every_repeat_sees_the_stored_response(
        self, store: AsyncIdempotencyStore
    ) -> None:
        scope = _uid()
        first = await self._claim(store, scope, "k")
        assert isinstance(first, Claimed)
        done = await store.complete(scope, "k", first.lease, OK)
        assert done.state is RecordState.COMPLETED
        assert done.response == OK
        again = await self._claim(store, scope, "k")
        assert isinstance(again, Existing)
        assert again.record.response == OK
        assert again.record.state is RecordState.COMPLETED

    async def test_a_failed_outcome_is_stored_as_failed(self, store: AsyncIdempotencyStore) -> None:
        scope = _uid()
        first = await self._claim(store, scope, "k")
        assert isinstance(first, Claimed)
        error = StoredResponse(status=402, body=b'{"error":"card_declined"}')
        done = await store.complete(scope, "k", first.lease, error, failed=True)
        assert done.state is RecordState.FAILED
        record = await store.get(scope, "k")
        assert record is not None
        assert record.response == error

    async def test_an_expired_lease_is_taken_over_and_the_old_owner_fenced_out(
        self, store: AsyncIdempotencyStore, clock: FrozenClock
    ) -> None:
        scope = _uid()
        first = await self._claim(store, scope, "k")
        assert isinstance(first, Claimed)
        await store.checkpoint(
            scope, "k", first.lease, recovery_point="order_created", resource_id="o-1"
        )
        assert isinstance(await self._claim(store, scope, "k"), Existing)
        clock.advance(LEASE)
        second = await self._claim(store, scope, "k")
        assert isinstance(second, Claimed)
        assert second.resumed
        assert second.lease.fence == first.lease.fence + 1
        assert second.record.recovery_point == "order_created"
        assert second.record.resource_id == "o-1"
        with pytest.raises(LeaseLostError):
            await store.complete(scope, "k", first.lease, OK)
        with pytest.raises(LeaseLostError):
            await store.checkpoint(scope, "k", first.lease, recovery_point="intent_created")
        with pytest.raises(LeaseLostError):
            await store.extend(scope, "k", first.lease, lease_for=LEASE)
        with pytest.raises(LeaseLostError):
            await store.release(scope, "k", first.lease)
        record = await store.get(scope, "k")
        assert record is not None
        assert record.recovery_point == "order_created"
        assert (await store.complete(scope, "k", second.lease, OK)).response == OK

    async def test_takeover_needs_the_same_fingerprint(
        self, store: AsyncIdempotencyStore, clock: FrozenClock
    ) -> None:
        scope = _uid()
        assert isinstance(await self._claim(store, scope, "k", "a"), Claimed)
        clock.advance(LEASE * 2)
        other = await self._claim(store, scope, "k", "b")
        assert isinstance(other, Existing)
        assert other.record.fingerprint == "a"

    async def test_complete_after_expiry_succeeds_while_nobody_took_over(
        self, store: AsyncIdempotencyStore, clock: FrozenClock
    ) -> None:
        scope = _uid()
        first = await self._claim(store, scope, "k")
        assert isinstance(first, Claimed)
        clock.advance(LEASE * 2)
        assert (await store.complete(scope, "k", first.lease, OK)).state is RecordState.COMPLETED

    async def test_release_makes_the_record_resumable_and_discard_forgets_it(
        self, store: AsyncIdempotencyStore
    ) -> None:
        scope = _uid()
        first = await self._claim(store, scope, "k")
        assert isinstance(first, Claimed)
        await store.checkpoint(scope, "k", first.lease, recovery_point="intent_created")
        await store.release(scope, "k", first.lease)
        record = await store.get(scope, "k")
        assert record is not None
        assert record.state is RecordState.UNKNOWN
        resumed = await self._claim(store, scope, "k")
        assert isinstance(resumed, Claimed)
        assert resumed.resumed
        assert resumed.record.recovery_point == "intent_created"
        assert resumed.lease.fence == first.lease.fence + 1
        await store.release(scope, "k", resumed.lease, discard=True)
        assert await store.get(scope, "k") is None
        fresh = await self._claim(store, scope, "k")
        assert isinstance(fresh, Claimed)
        assert not fresh.resumed
        assert fresh.record.recovery_point is None

    async def test_extend_keeps_the_lease(
        self, store: AsyncIdempotencyStore, clock: FrozenClock
    ) -> None:
        scope = _uid()
        first = await self._claim(store, scope, "k")
        assert isinstance(first, Claimed)
        clock.advance(LEASE / 2)
        extended = await store.extend(scope, "k", first.lease, lease_for=LEASE)
        assert extended.token == first.lease.token
        assert extended.expires_at > first.lease.expires_at
        clock.advance(LEASE * 0.9)
        assert isinstance(await self._claim(store, scope, "k"), Existing)
        await store.complete(scope, "k", extended, OK)

    async def test_records_expire_and_are_purged(
        self, store: AsyncIdempotencyStore, clock: FrozenClock
    ) -> None:
        scope = _uid()
        for key in ("a", "b", "c"):
            claimed = await self._claim(store, scope, key)
            assert isinstance(claimed, Claimed)
            await store.complete(scope, key, claimed.lease, OK)
        clock.advance(RETAIN)
        assert await store.get(scope, "a") is None
        renewed = await self._claim(store, scope, "a")
        assert isinstance(renewed, Claimed)
        assert not renewed.resumed
        purged = 0
        while batch := await store.purge_expired(limit=1):
            purged += batch
            assert batch == 1
        assert purged >= 2
        assert await store.get(scope, "a") is not None

    async def test_durations_must_be_positive(self, store: AsyncIdempotencyStore) -> None:
        with pytest.raises(ConfigurationError):
            await store.claim(_uid(), "k", "fp", lease_for=timedelta(0), retain_for=RETAIN)

    async def test_the_backends_own_clock_expires_leases(
        self, make_store: Callable[[Clock | None], AsyncIdempotencyStore]
    ) -> None:
        store = make_store(None)
        try:
            await self._expire_on_own_clock(store)
        finally:
            await async_shut(store)

    async def _expire_on_own_clock(self, store: AsyncIdempotencyStore) -> None:
        scope = _uid()
        first = await store.claim(
            scope, "k", "fp", lease_for=timedelta(milliseconds=1), retain_for=RETAIN
        )
        assert isinstance(first, Claimed)
        assert first.lease.expires_at.tzinfo is not None
        # The lease is a millisecond long: the owner's clock runs out within a few tries.
        for _ in range(10_000):
            again = await store.claim(
                scope, "k", "fp", lease_for=timedelta(minutes=1), retain_for=RETAIN
            )
            if isinstance(again, Claimed):
                assert again.resumed
                break
        else:
            pytest.fail("the lease never expired on the backend's clock")


class AsyncLockProviderContract(_AsyncFixtures):
    """What every lock provider must do; see :class:`idempay.protocols.LockProvider`."""

    @pytest.fixture
    async def locks(
        self, make_provider: Callable[[], AsyncLockProvider]
    ) -> AsyncIterator[AsyncLockProvider]:
        provider = make_provider()
        yield provider
        await async_shut(provider)

    async def test_a_lock_is_exclusive_and_fenced(self, locks: AsyncLockProvider) -> None:
        name = f"order:{_uid()}"
        first = await locks.acquire(name, ttl=LEASE)
        assert first is not None
        assert await locks.acquire(name, ttl=LEASE) is None
        assert await locks.acquire(f"{name}:other", ttl=LEASE) is not None
        assert await locks.release(name, first)
        second = await locks.acquire(name, ttl=LEASE)
        assert second is not None
        assert second.fence > first.fence
        assert second.token != first.token
        assert await locks.release(name, second)

    async def test_only_the_owner_releases_or_extends(self, locks: AsyncLockProvider) -> None:
        name = f"order:{_uid()}"
        held = await locks.acquire(name, ttl=LEASE)
        assert held is not None
        impostor = type(held)(token="not-the-owner", fence=held.fence, expires_at=held.expires_at)
        assert await locks.release(name, impostor) is False
        assert await locks.extend(name, impostor, ttl=LEASE) is None
        assert await locks.acquire(name, ttl=LEASE) is None
        assert await locks.release(name, held)
        assert await locks.release(name, held) is False

    async def test_an_expired_lock_goes_to_the_next_and_its_late_release_is_refused(
        self, locks: AsyncLockProvider
    ) -> None:
        name = f"order:{_uid()}"
        short = await locks.acquire(name, ttl=timedelta(milliseconds=50))
        assert short is not None
        successor = await locks.acquire(name, ttl=LEASE, wait=timedelta(seconds=10))
        assert successor is not None
        assert successor.fence > short.fence
        assert await locks.release(name, short) is False
        assert await locks.extend(name, short, ttl=LEASE) is None
        assert await locks.release(name, successor)

    async def test_extend_keeps_the_lock(self, locks: AsyncLockProvider) -> None:
        name = f"order:{_uid()}"
        held = await locks.acquire(name, ttl=timedelta(milliseconds=300))
        assert held is not None
        extended = await locks.extend(name, held, ttl=timedelta(seconds=30))
        assert extended is not None
        assert extended.expires_at > held.expires_at
        assert await locks.acquire(name, ttl=LEASE, wait=timedelta(milliseconds=600)) is None
        assert await locks.release(name, extended)

    async def test_concurrent_acquires_have_exactly_one_holder(
        self, locks: AsyncLockProvider
    ) -> None:
        name = f"hot:{_uid()}"

        async def contend(_: int) -> bool:
            return await locks.acquire(name, ttl=timedelta(minutes=5)) is not None

        assert (await async_concurrently(THREADS, contend)).count(True) == 1

    async def test_acquires_from_several_processes_have_exactly_one_holder(
        self, process_factory: Callable[[], Any] | None
    ) -> None:
        if process_factory is None:
            pytest.skip("this provider shares no state between processes")
        got = await async_in_processes(lock_in_child, 4, process_factory, f"hot:{_uid()}")
        assert got.count(True) == 1

    async def test_ttl_must_be_positive(self, locks: AsyncLockProvider) -> None:
        with pytest.raises(ConfigurationError):
            await locks.acquire(_uid(), ttl=timedelta(0))


def _state(status: OrderStatus = OrderStatus.CREATED, intent: str | None = None) -> OrderState:
    return OrderState(status=status, amount=1999, currency="eur", payment_intent_id=intent)


def _event(event_id: str, tx_now: Any, **fields: Any) -> InboxEvent:
    base: dict[str, Any] = {
        "account": "",
        "event_id": event_id,
        "type": "payment_intent.succeeded",
        "created": 1_767_225_600,
        "payload": b'{"id":"' + event_id.encode() + b'"}\x00\xff',
        "received_at": tx_now,
    }
    return InboxEvent(**(base | fields))


class AsyncPaymentStoreContract(_AsyncFixtures):
    """What every payment store must do; see :class:`idempay.protocols.PaymentStore`."""

    @pytest.fixture
    async def store(
        self, make_store: Callable[[Clock | None], Any], clock: FrozenClock
    ) -> AsyncIterator[AsyncPaymentStore]:
        store: AsyncPaymentStore = make_store(clock)
        yield store
        await async_shut(store)

    @pytest.fixture
    def outbox(self, store: Any) -> AsyncOutboxStore:
        return store  # type: ignore[no-any-return]

    async def test_insert_order_is_insert_or_fetch(self, store: AsyncPaymentStore) -> None:
        tenant = _uid()
        async with store.transaction() as tx:
            created, inserted = await tx.insert_order(tenant, "o1", _state())
            assert inserted
            assert created.version == 1
            assert created.state == _state()
            again, inserted_again = await tx.insert_order(tenant, "o1", _state(OrderStatus.PAID))
            assert not inserted_again
            assert again == created
        async with store.transaction() as tx:
            assert await tx.get_order(tenant, "o1") == created
            assert await tx.get_order(_uid(), "o1") is None
            assert await tx.get_order(tenant, "O1") is None

    async def test_every_state_field_round_trips(self, store: AsyncPaymentStore) -> None:
        tenant = _uid()
        full = OrderState(
            status=OrderStatus.NEEDS_REVIEW,
            amount=123_456_789_012,
            currency="jpy",
            payment_intent_id=f"pi_{_uid()}",
            amount_refunded=5,
            dispute=DisputeStatus.OPEN,
            review_reason=ReviewReason.AMOUNT_MISMATCH,
            observed_at=1_767_225_600,
            failures=3,
        )
        async with store.transaction() as tx:
            await tx.insert_order(tenant, "o1", full)
        async with store.transaction() as tx:
            got = await tx.get_order(tenant, "o1")
            assert got is not None
            assert got.state == full
            assert got.created_at.tzinfo is not None

    async def test_a_raising_transaction_leaves_nothing(
        self, store: AsyncPaymentStore, outbox: AsyncOutboxStore
    ) -> None:
        tenant, intent = _uid(), f"pi_{_uid()}"
        async with store.transaction() as tx:
            base, _ = await tx.insert_order(tenant, "o0", _state())

        class BoomError(Exception):
            pass

        with pytest.raises(BoomError):
            async with store.transaction() as tx:
                await tx.insert_order(tenant, "o1", _state(intent=f"{intent}x"))
                await tx.update_order(base, _state(OrderStatus.AWAITING_PAYMENT, intent))
                await tx.insert_event(_event(f"evt_{tenant}", tx.now()))
                await tx.append_audit(
                    AuditDraft(tenant, "o1", AuditStep.STARTED, AuditSource.CHECKOUT, tx.now())
                )
                await tx.enqueue_effect(NewEffect(tenant, "o1", "receipt", "paid"))
                raise BoomError
        async with store.transaction() as tx:
            assert await tx.get_order(tenant, "o1") is None
            assert await tx.get_order(tenant, "o0") == base
            assert await tx.find_order_by_payment_intent(intent) is None
            assert await tx.get_event("", f"evt_{tenant}") is None
            assert list(await tx.audit_trail(tenant, "o1")) == []
        assert list(await outbox.effects_for(tenant, "o1")) == []

    async def test_a_killed_process_leaves_no_trace(
        self, store: AsyncPaymentStore, process_factory: Callable[[], Any] | None
    ) -> None:
        if process_factory is None:
            pytest.skip("this backend shares no state between processes")
        tenant = _uid()
        kill_child_holding_a_transaction(process_factory, tenant, "o1")
        async with store.transaction() as tx:
            assert await tx.get_order(tenant, "o1") is None
            # ...and nothing it held blocks a new writer.
            _, inserted = await tx.insert_order(tenant, "o1", _state())
            assert inserted

    async def test_update_is_compare_and_set(self, store: AsyncPaymentStore) -> None:
        tenant, intent = _uid(), f"pi_{_uid()}"
        async with store.transaction() as tx:
            v1, _ = await tx.insert_order(tenant, "o1", _state())
            v2 = await tx.update_order(v1, _state(OrderStatus.AWAITING_PAYMENT, intent))
            assert v2.version == 2
            assert v2.state.payment_intent_id == intent
            with pytest.raises(ConcurrentUpdateError):
                await tx.update_order(v1, _state(OrderStatus.CANCELED))
        async with store.transaction() as tx:
            found = await tx.find_order_by_payment_intent(intent)
            assert found is not None
            assert (found.order_id, found.version) == ("o1", 2)

    async def test_one_payment_intent_belongs_to_one_order(self, store: AsyncPaymentStore) -> None:
        tenant, intent = _uid(), f"pi_{_uid()}"
        async with store.transaction() as tx:
            await tx.insert_order(tenant, "a", _state(intent=intent))
            b, _ = await tx.insert_order(tenant, "b", _state())
        with pytest.raises(ConcurrentUpdateError):
            async with store.transaction() as tx:
                await tx.update_order(b, _state(OrderStatus.AWAITING_PAYMENT, intent))
        with pytest.raises(ConcurrentUpdateError):
            async with store.transaction() as tx:
                await tx.insert_order(tenant, "c", _state(intent=intent))
        async with store.transaction() as tx:
            owner = await tx.find_order_by_payment_intent(intent)
            assert owner is not None
            assert owner.order_id == "a"

    async def test_concurrent_compare_and_set_has_one_winner(
        self, store: AsyncPaymentStore
    ) -> None:
        tenant = _uid()
        async with store.transaction() as tx:
            base, _ = await tx.insert_order(tenant, "o1", _state())

        async def contend(i: int) -> bool:
            try:
                async with store.transaction() as tx:
                    await tx.update_order(
                        base, _state(OrderStatus.AWAITING_PAYMENT, f"pi_{tenant}_{i}")
                    )
            except ConcurrentUpdateError:
                return False
            return True

        assert (await async_concurrently(THREADS, contend)).count(True) == 1
        async with store.transaction() as tx:
            final = await tx.get_order(tenant, "o1")
            assert final is not None
            assert final.version == 2

    async def test_conflicting_transitions_are_retried_until_each_applies(
        self, store: AsyncPaymentStore
    ) -> None:
        tenant = _uid()
        async with store.transaction() as tx:
            await tx.insert_order(tenant, "o1", _state())

        async def bump(tx: AsyncPaymentTransaction) -> int:
            current = await tx.get_order(tenant, "o1")
            assert current is not None
            failures = current.state.failures + 1
            updated = await tx.update_order(
                current,
                OrderState(OrderStatus.CREATED, 1999, "eur", failures=failures),
            )
            return updated.version

        async def contend(_: int) -> int:
            return await store.run_transaction(bump, attempts=200)

        versions = await async_concurrently(THREADS, contend)
        assert sorted(versions) == list(range(2, THREADS + 2))
        async with store.transaction() as tx:
            final = await tx.get_order(tenant, "o1")
            assert final is not None
            assert final.state.failures == THREADS

    async def test_inbox_insert_is_deduplicated_even_concurrently(
        self, store: AsyncPaymentStore
    ) -> None:
        event_id = f"evt_{_uid()}"

        async def deliver(_i: int) -> bool:
            async with store.transaction() as tx:
                _, inserted = await tx.insert_event(_event(event_id, tx.now()))
                return inserted

        assert (await async_concurrently(THREADS, deliver)).count(True) == 1
        async with store.transaction() as tx:
            stored = await tx.get_event("", event_id)
            assert stored is not None
            assert stored.payload == _event(event_id, tx.now()).payload
            assert stored.status is InboxStatus.RECEIVED
            _, other_account = await tx.insert_event(
                _event(event_id, tx.now(), account=f"acct_{_uid()}")
            )
            assert other_account

    async def test_inbox_status_and_orphans(self, store: AsyncPaymentStore) -> None:
        tag, intent = _uid(), f"pi_{_uid()}"
        async with store.transaction() as tx:
            await tx.insert_event(
                _event(f"evt_b{tag}", tx.now(), payment_intent_id=intent, created=20)
            )
            await tx.insert_event(_event(f"evt_a{tag}", tx.now(), order_id=f"o{tag}", created=10))
            await tx.insert_event(_event(f"evt_c{tag}", tx.now(), payment_intent_id=intent))
            for event_id in (f"evt_a{tag}", f"evt_b{tag}"):
                orphan = await tx.set_event_status("", event_id, InboxStatus.ORPHAN)
                assert orphan.attempts == 1
                assert orphan.processed_at is None
        async with store.transaction() as tx:
            found = await tx.orphans_for(payment_intent_id=intent, order_id=f"o{tag}")
            assert [e.event_id for e in found] == [f"evt_a{tag}", f"evt_b{tag}"]
            assert len(await tx.orphans_for(payment_intent_id=intent, order_id=None)) == 1
            done = await tx.set_event_status(
                "", f"evt_b{tag}", InboxStatus.PROCESSED, order_id=f"o{tag}", error=None
            )
            assert done.status is InboxStatus.PROCESSED
            assert done.order_id == f"o{tag}"
            assert done.attempts == 2
            assert done.processed_at is not None
            failed = await tx.set_event_status(
                "", f"evt_c{tag}", InboxStatus.FAILED, error="boom: order locked"
            )
            assert failed.error == "boom: order locked"

    async def test_audit_trails_are_chained_and_sequenced(self, store: AsyncPaymentStore) -> None:
        tenant = _uid()
        steps = (AuditStep.STARTED, AuditStep.PENDING, AuditStep.SUCCEEDED)
        async with store.transaction() as tx:
            for step in steps:
                await tx.append_audit(
                    AuditDraft(
                        tenant,
                        "o1",
                        step,
                        AuditSource.WEBHOOK,
                        tx.now(),
                        from_status="created",
                        to_status="paid",
                        event_id="evt_1",
                        key_digest="ab" * 32,
                        details={"reason": "test", "note": "é"},
                    )
                )
        async with store.transaction() as tx:
            trail = list(await tx.audit_trail(tenant, "o1"))
        assert [e.step for e in trail] == list(steps)
        assert [e.seq for e in trail] == [1, 2, 3]
        assert verify_trail(trail).ok
        assert trail[0].details == (("note", "é"), ("reason", "test"))

    async def test_concurrent_appends_keep_one_chain(self, store: AsyncPaymentStore) -> None:
        tenant = _uid()

        async def append(tx: AsyncPaymentTransaction) -> None:
            await tx.append_audit(
                AuditDraft(tenant, "o1", AuditStep.DUPLICATE, AuditSource.WEBHOOK, tx.now())
            )

        async def contend(_: int) -> None:
            await store.run_transaction(append, attempts=200)

        await async_concurrently(THREADS, contend)
        async with store.transaction() as tx:
            trail = list(await tx.audit_trail(tenant, "o1"))
        assert [e.seq for e in trail] == list(range(1, THREADS + 1))
        assert verify_trail(trail).ok

    async def test_outbox_effects_are_unique_and_leased(
        self, store: AsyncPaymentStore, outbox: AsyncOutboxStore, clock: FrozenClock
    ) -> None:
        tenant = _uid()
        async with store.transaction() as tx:
            assert await tx.enqueue_effect(
                NewEffect(tenant, "o1", "receipt", "paid", '{"amount":1999}')
            )
            assert not await tx.enqueue_effect(NewEffect(tenant, "o1", "receipt", "paid"))
            assert await tx.enqueue_effect(NewEffect(tenant, "o1", "fulfil", "paid"))
        mine = [
            e
            for e in await outbox.claim_due_effects(limit=1000, lease_for=LEASE)
            if e.tenant == tenant
        ]
        assert sorted(e.effect for e in mine) == ["fulfil", "receipt"]
        assert all(e.attempts == 1 and e.lease is not None for e in mine)
        receipt = next(e for e in mine if e.effect == "receipt")
        assert receipt.payload == '{"amount":1999}'
        assert receipt.dedup_key == NewEffect(tenant, "o1", "receipt", "paid").dedup_key
        again = await outbox.claim_due_effects(limit=1000, lease_for=LEASE)
        assert not [e for e in again if e.tenant == tenant]
        await outbox.finish_effect(receipt)
        fulfil = next(e for e in mine if e.effect == "fulfil")
        await outbox.fail_effect(fulfil, error="timeout", retry_at=clock.now() + LEASE)
        clock.advance(LEASE)
        retry = [
            e
            for e in await outbox.claim_due_effects(limit=1000, lease_for=LEASE)
            if e.tenant == tenant
        ]
        assert [(e.effect, e.attempts, e.last_error) for e in retry] == [("fulfil", 2, "timeout")]
        await outbox.fail_effect(retry[0], error="still failing", retry_at=None)
        statuses = {e.effect: e.status for e in await outbox.effects_for(tenant, "o1")}
        assert statuses == {"receipt": OutboxStatus.DONE, "fulfil": OutboxStatus.DEAD}

    async def test_a_dead_dispatchers_effect_returns_and_its_late_finish_is_refused(
        self, store: AsyncPaymentStore, outbox: AsyncOutboxStore, clock: FrozenClock
    ) -> None:
        tenant = _uid()
        async with store.transaction() as tx:
            await tx.enqueue_effect(NewEffect(tenant, "o1", "receipt", "paid"))

        async def mine() -> list[Any]:
            batch = await outbox.claim_due_effects(limit=1000, lease_for=LEASE)
            return [e for e in batch if e.tenant == tenant]

        (stale,) = await mine()
        clock.advance(LEASE)
        (fresh,) = await mine()
        assert fresh.lease is not None
        assert stale.lease is not None
        assert fresh.lease.fence > stale.lease.fence
        with pytest.raises(LeaseLostError):
            await outbox.finish_effect(stale)
        with pytest.raises(LeaseLostError):
            await outbox.fail_effect(stale, error="late", retry_at=None)
        await outbox.finish_effect(fresh)

    async def test_concurrent_dispatchers_never_share_an_entry(
        self, store: AsyncPaymentStore, outbox: AsyncOutboxStore
    ) -> None:
        tenant = _uid()
        async with store.transaction() as tx:
            for i in range(40):
                await tx.enqueue_effect(NewEffect(tenant, f"o{i}", "receipt", "paid"))

        async def dispatch(_: int) -> list[str]:
            batch = await outbox.claim_due_effects(limit=10, lease_for=LEASE)
            return [e.order_id for e in batch if e.tenant == tenant]

        handed_out = flatten(await async_concurrently(8, dispatch))
        assert len(handed_out) == len(set(handed_out))
        leftovers = await dispatch(0)
        assert sorted(handed_out + leftovers) == sorted(f"o{i}" for i in range(40))

    async def test_dispatchers_in_several_processes_never_share_an_entry(
        self, store: AsyncPaymentStore, process_factory: Callable[[], Any] | None
    ) -> None:
        if process_factory is None:
            pytest.skip("this backend shares no state between processes")
        tenant = _uid()
        async with store.transaction() as tx:
            for i in range(20):
                await tx.enqueue_effect(NewEffect(tenant, f"o{i}", "receipt", "paid"))
        batches = await async_in_processes(dispatch_in_child, 4, process_factory, 1000)
        mine = [order for t, order in flatten(batches) if t == tenant]
        assert sorted(mine) == sorted(f"o{i}" for i in range(20))

    async def _receive(
        self, store: AsyncPaymentStore, event_id: str, intent: str | None, **hint: str
    ) -> tuple[InboxEvent, EventReception]:
        async with store.transaction() as tx:
            now = tx.now()
        event = _event(event_id, now, payment_intent_id=intent)
        return event, await store.receive_event(event, **hint)

    async def test_receive_event_writes_nothing_and_finds_the_order(
        self, store: AsyncPaymentStore
    ) -> None:
        tenant, intent = _uid(), f"pi_{_uid()}"
        async with store.transaction() as tx:
            order, _ = await tx.insert_order(tenant, "o1", _state(intent=intent))
            await tx.append_audit(
                AuditDraft(tenant, "o1", AuditStep.STARTED, AuditSource.CHECKOUT, tx.now())
            )
        event, first = await self._receive(store, f"evt_{tenant}", intent)
        assert (first.event, first.stored_status) == (None, None)
        assert first.order == order
        assert first.audit_head.seq == 1
        _, again = await self._receive(store, f"evt_{tenant}", intent)
        assert again.event is None  # receiving stored nothing
        await store.commit_event(
            EventCommit(
                event=event,
                status=InboxStatus.ORPHAN,
                expected_status=None,
                audit_head=first.audit_head,
            )
        )
        _, stored = await self._receive(store, f"evt_{tenant}", intent)
        assert stored.event is not None
        assert stored.stored_status is InboxStatus.ORPHAN
        assert (stored.event.payload, stored.event.attempts) == (event.payload, 1)
        assert stored.order == order
        _, by_metadata = await self._receive(
            store, f"evt_{tenant}_2", f"pi_{_uid()}", tenant=tenant, order_id="o1"
        )
        assert by_metadata.order == order
        _, orphan = await self._receive(store, f"evt_{tenant}_3", f"pi_{_uid()}")
        assert orphan.order is None
        assert orphan.audit_head == AuditHead()

    async def test_commit_event_writes_everything_or_nothing(
        self, store: AsyncPaymentStore, outbox: AsyncOutboxStore
    ) -> None:
        tenant, intent = _uid(), f"pi_{_uid()}"
        async with store.transaction() as tx:
            await tx.insert_order(tenant, "o1", _state(intent=intent))
        event, got = await self._receive(store, f"evt_{tenant}", intent)
        assert got.order is not None
        paid = _state(OrderStatus.PAID, intent)

        def commit(reception: EventReception) -> EventCommit:
            assert reception.order is not None
            return EventCommit(
                event=event,
                status=InboxStatus.PROCESSED,
                expected_status=reception.stored_status,
                audit_head=reception.audit_head,
                order=reception.order,
                new_state=paid,
                audit=(
                    AuditDraft(
                        tenant, "o1", AuditStep.SUCCEEDED, AuditSource.WEBHOOK, event.received_at
                    ),
                ),
                effects=(NewEffect(tenant, "o1", "receipt", "paid"),),
                order_id="o1",
            )

        written = await store.commit_event(commit(got))
        assert written is not None
        assert (written.state, written.version) == (paid, 2)
        # The same decision taken on the old read is refused, and writes nothing more.
        with pytest.raises(ConcurrentUpdateError):
            await store.commit_event(commit(got))
        async with store.transaction() as tx:
            assert [e.seq for e in await tx.audit_trail(tenant, "o1")] == [1]
            stored = await tx.get_event("", f"evt_{tenant}")
            assert stored is not None
            assert (stored.status, stored.order_id, stored.attempts) == (
                InboxStatus.PROCESSED,
                "o1",
                1,
            )
            assert stored.processed_at is not None
        assert len(await outbox.effects_for(tenant, "o1")) == 1

    async def test_commit_event_updates_a_stored_event_only_from_the_status_read(
        self, store: AsyncPaymentStore
    ) -> None:
        tenant, intent = _uid(), f"pi_{_uid()}"
        event, got = await self._receive(store, f"evt_{tenant}", intent)
        orphaned = EventCommit(
            event=event, status=InboxStatus.ORPHAN, expected_status=None, audit_head=AuditHead()
        )
        assert await store.commit_event(orphaned) is None
        with pytest.raises(ConcurrentUpdateError):  # it is no longer absent
            await store.commit_event(orphaned)
        async with store.transaction() as tx:
            order, _ = await tx.insert_order(tenant, "o1", _state(intent=intent))
        _, got = await self._receive(store, f"evt_{tenant}", intent)
        assert (got.stored_status, got.order) == (InboxStatus.ORPHAN, order)
        applied = EventCommit(
            event=event,
            status=InboxStatus.PROCESSED,
            expected_status=InboxStatus.ORPHAN,
            audit_head=got.audit_head,
            order=order,
            new_state=_state(OrderStatus.PAID, intent),
            order_id="o1",
        )
        # Expecting another status than the stored one is refused, and writes nothing.
        with pytest.raises(ConcurrentUpdateError):
            await store.commit_event(replace(applied, expected_status=InboxStatus.FAILED))
        written = await store.commit_event(applied)
        assert written is not None
        assert written.version == 2
        with pytest.raises(ConcurrentUpdateError):  # the order moved, and so did the row
            await store.commit_event(replace(applied, order=written))
        async with store.transaction() as tx:
            stored = await tx.get_event("", f"evt_{tenant}")
            assert await tx.get_order(tenant, "o1") == written
        assert stored is not None
        assert (stored.status, stored.attempts, stored.order_id) == (InboxStatus.PROCESSED, 2, "o1")

    async def test_commit_event_without_a_change_still_guards_the_trail(
        self, store: AsyncPaymentStore
    ) -> None:
        tenant, intent = _uid(), f"pi_{_uid()}"
        async with store.transaction() as tx:
            await tx.insert_order(tenant, "o1", _state(intent=intent))
        a_event, a = await self._receive(store, f"evt_a{tenant}", intent)
        b_event, b = await self._receive(store, f"evt_b{tenant}", intent)

        def stale(event: InboxEvent, reception: EventReception) -> EventCommit:
            return EventCommit(
                event=event,
                status=InboxStatus.PROCESSED,
                expected_status=reception.stored_status,
                audit_head=reception.audit_head,
                order=reception.order,
                audit=(
                    AuditDraft(
                        tenant,
                        "o1",
                        AuditStep.IGNORED_STALE,
                        AuditSource.WEBHOOK,
                        event.received_at,
                    ),
                ),
            )

        assert await store.commit_event(stale(a_event, a)) == a.order
        with pytest.raises(ConcurrentUpdateError):
            await store.commit_event(stale(b_event, b))
        async with store.transaction() as tx:  # the refused commit stored nothing
            assert await tx.get_event("", f"evt_b{tenant}") is None

    async def test_concurrent_deliveries_of_one_event_commit_it_once(
        self, store: AsyncPaymentStore, outbox: AsyncOutboxStore
    ) -> None:
        tenant, intent = _uid(), f"pi_{_uid()}"
        async with store.transaction() as tx:
            await tx.insert_order(tenant, "o1", _state(intent=intent))
        # Without an order change too: the inbox row alone must decide (a second event id).
        orphan_id = f"evt_orphan_{tenant}"

        async def deliver(i: int) -> int:
            event_id, bare = (f"evt_{tenant}", False) if i % 2 else (orphan_id, True)
            for _attempt in range(500):
                event, got = await self._receive(store, event_id, None if bare else intent)
                if got.stored_status is not None:
                    return 0  # a duplicate: another delivery committed it
                order = None if bare else got.order
                commit = EventCommit(
                    event=event,
                    status=InboxStatus.ORPHAN if bare else InboxStatus.PROCESSED,
                    expected_status=None,
                    audit_head=got.audit_head,
                    order=order,
                    new_state=None if bare else _state(OrderStatus.PAID, intent),
                    audit=()
                    if bare
                    else (
                        AuditDraft(
                            tenant,
                            "o1",
                            AuditStep.SUCCEEDED,
                            AuditSource.WEBHOOK,
                            event.received_at,
                        ),
                    ),
                    effects=() if bare else (NewEffect(tenant, "o1", "receipt", "paid"),),
                )
                try:
                    await store.commit_event(commit)
                except ConcurrentUpdateError:
                    continue
                return 1
            pytest.fail("a delivery never settled")

        committed = await async_concurrently(THREADS, deliver)
        assert sum(committed) == 2
        async with store.transaction() as tx:
            final = await tx.get_order(tenant, "o1")
            trail = list(await tx.audit_trail(tenant, "o1"))
            stored = await tx.get_event("", f"evt_{tenant}")
            orphan = await tx.get_event("", orphan_id)
        assert final is not None
        assert final.version == 2
        assert [e.seq for e in trail] == [1]
        assert len(await outbox.effects_for(tenant, "o1")) == 1
        assert stored is not None
        assert orphan is not None
        assert (stored.attempts, orphan.attempts) == (1, 1)

    async def test_concurrent_events_on_one_order_all_apply_in_one_chain(
        self, store: AsyncPaymentStore
    ) -> None:
        tenant, intent = _uid(), f"pi_{_uid()}"
        async with store.transaction() as tx:
            await tx.insert_order(tenant, "o1", _state(intent=intent))

        async def deliver(i: int) -> None:
            for _attempt in range(500):
                event, got = await self._receive(store, f"evt_{i}_{tenant}", intent)
                assert got.order is not None
                bumped = OrderState(
                    OrderStatus.CREATED,
                    1999,
                    "eur",
                    payment_intent_id=intent,
                    failures=got.order.state.failures + 1,
                )
                draft = AuditDraft(
                    tenant, "o1", AuditStep.FAILED, AuditSource.WEBHOOK, event.received_at
                )
                try:
                    await store.commit_event(
                        EventCommit(
                            event=event,
                            status=InboxStatus.PROCESSED,
                            expected_status=got.stored_status,
                            audit_head=got.audit_head,
                            order=got.order,
                            new_state=bumped,
                            audit=(draft,),
                        )
                    )
                except ConcurrentUpdateError:
                    continue
                return
            pytest.fail("an event never got through")

        await async_concurrently(THREADS, deliver)
        async with store.transaction() as tx:
            final = await tx.get_order(tenant, "o1")
            trail = list(await tx.audit_trail(tenant, "o1"))
        assert final is not None
        assert (final.state.failures, final.version) == (THREADS, THREADS + 1)
        assert [e.seq for e in trail] == list(range(1, THREADS + 1))
        assert verify_trail(trail).ok

    async def test_the_journal_keeps_each_orders_decisions_in_order(
        self, store: AsyncPaymentStore, clock: FrozenClock
    ) -> None:
        if not isinstance(store, AsyncJournalStore):
            pytest.skip("this payment store keeps no journal (it is optional)")
        tenant = _uid()

        def entry(order_id: str | None, step: AuditStep, n: int) -> JournalEntry:
            return JournalEntry(
                tenant,
                order_id,
                step,
                AuditSource.WEBHOOK,
                clock.now(),
                event_id=f"evt_{n}",
                reason="café ☕" if n == 0 else None,
            )

        batch = [
            entry("o1", AuditStep.DUPLICATE, 0),
            entry("o2", AuditStep.DUPLICATE, 1),
            entry(None, AuditStep.REJECTED, 2),
            entry("o1", AuditStep.REPLAYED, 3),
        ]
        await store.append_journal(batch)
        await store.append_journal([])
        await store.append_journal([entry("o1", AuditStep.CONFLICT, 4)])
        got = list(await store.journal_for(tenant, "o1"))
        assert got == [batch[0], batch[3], entry("o1", AuditStep.CONFLICT, 4)]
        assert list(await store.journal_for(tenant, "o2")) == [batch[1]]
        assert list(await store.journal_for(tenant, "o1", limit=1)) == [batch[0]]
        assert list(await store.journal_for(_uid(), "o1")) == []


# --- maintenance: the reconciler, purges and monitoring ---------------------------------------

WAITING = OrderStatus.AWAITING_PAYMENT
MINUTE = timedelta(minutes=1)
DAY = timedelta(days=1)


class AsyncMaintainedStore(AsyncPaymentStore, AsyncOutboxStore, AsyncMaintenanceStore, Protocol):
    """A payment store with its outbox and its maintenance: what the maintenance suite uses."""


async def _orders(
    store: AsyncPaymentStore, tenant: str, **statuses: OrderStatus
) -> dict[str, OrderRecord]:
    """Insert one order per keyword (its id) in the given status, in one transaction."""
    async with store.transaction() as tx:
        made = {}
        for order_id, status in statuses.items():
            made[order_id], _ = await tx.insert_order(tenant, order_id, _state(status))
        return made


async def _events(store: AsyncPaymentStore, tag: str, **statuses: InboxStatus) -> list[InboxEvent]:
    """Insert one inbox event per keyword (``evt_<keyword>_<tag>``), received now."""
    async with store.transaction() as tx:
        made = []
        for name, status in statuses.items():
            event, _ = await tx.insert_event(_event(f"evt_{name}_{tag}", tx.now(), status=status))
            made.append(event)
        return made


async def _enqueue(store: AsyncPaymentStore, tenant: str, *order_ids: str) -> None:
    async with store.transaction() as tx:
        for order_id in order_ids:
            await tx.enqueue_effect(NewEffect(tenant, order_id, "receipt", "paid"))


async def _claim_all(store: AsyncOutboxStore) -> dict[str, OutboxEntry]:
    """Lease every due effect (the store holds the test's only), by order id."""
    return {e.order_id: e for e in await store.claim_due_effects(limit=1000, lease_for=LEASE)}


def _order_ids(records: Sequence[OrderRecord]) -> list[str]:
    return [record.order_id for record in records]


class AsyncMaintenanceStoreContract(_AsyncFixtures):
    """What every maintenance store must do; see :class:`idempay.protocols.AsyncMaintenanceStore`.

    Maintenance spans the whole store, so ``make_store(clock)`` must return a store that holds
    no orders, inbox events, outbox effects or journal entries when the test begins (a fresh
    database, or idempay's tables emptied before each test). The store is also a payment store
    and an outbox store: the suite writes its rows through them (and through the journal, when
    the store keeps one). ``process_factory``, as for the payment store's suite, gives a sync
    store on the same data.
    """

    @pytest.fixture
    async def store(
        self, make_store: Callable[[Clock | None], Any], clock: FrozenClock
    ) -> AsyncIterator[AsyncMaintainedStore]:
        store: AsyncMaintainedStore = make_store(clock)
        yield store
        await async_shut(store)

    async def _claim(
        self,
        store: AsyncMaintainedStore,
        *statuses: OrderStatus,
        untouched_for: timedelta = timedelta(0),
        limit: int = 100,
    ) -> list[str]:
        claimed = await store.claim_orders_to_check(
            statuses=statuses or (WAITING,),
            untouched_for=untouched_for,
            limit=limit,
            lease_for=MINUTE,
        )
        return _order_ids(claimed)

    async def _claim_events(
        self,
        store: AsyncMaintainedStore,
        *,
        untouched_for: timedelta = timedelta(0),
        limit: int = 100,
    ) -> list[InboxEvent]:
        return list(
            await store.claim_events_to_check(
                statuses=(InboxStatus.RECEIVED, InboxStatus.FAILED),
                untouched_for=untouched_for,
                limit=limit,
                lease_for=MINUTE,
            )
        )

    async def test_the_store_is_a_maintenance_store(self, store: AsyncMaintainedStore) -> None:
        assert isinstance(store, AsyncMaintenanceStore)

    async def test_order_claims_take_the_statuses_asked_once_untouched_long_enough(
        self, store: AsyncMaintainedStore, clock: FrozenClock
    ) -> None:
        tenant = _uid()
        made = await _orders(store, tenant, a=WAITING, paid=OrderStatus.PAID)
        clock.advance(timedelta(seconds=1))
        made |= await _orders(store, tenant, b=OrderStatus.PROCESSING)
        clock.advance(10 * MINUTE)
        made |= await _orders(store, tenant, young=WAITING)
        asked = (WAITING, OrderStatus.PROCESSING)
        claimed = await store.claim_orders_to_check(
            statuses=asked, untouched_for=5 * MINUTE, limit=10, lease_for=MINUTE
        )
        # Both never checked: the oldest change first. The records are the orders as stored.
        assert list(claimed) == [made["a"], made["b"]]
        # Leased now; the young order is too recent for five minutes, and fine for zero.
        assert await self._claim(store, *asked, untouched_for=5 * MINUTE) == []
        assert await self._claim(store, *asked) == ["young"]
        assert await self._claim(store, OrderStatus.PAID) == ["paid"]
        assert await self._claim(store, *asked) == []
        assert (
            list(
                await store.claim_orders_to_check(
                    statuses=[], untouched_for=timedelta(0), limit=10, lease_for=MINUTE
                )
            )
            == []
        )

    async def test_a_claimed_order_waits_for_its_lease_or_its_scheduled_check(
        self, store: AsyncMaintainedStore, clock: FrozenClock
    ) -> None:
        tenant = _uid()
        await _orders(store, tenant, a=WAITING, b=WAITING)
        assert sorted(await self._claim(store)) == ["a", "b"]
        assert await self._claim(store) == []
        await store.schedule_order_check(tenant, "a", after=timedelta(0))
        assert await self._claim(store) == ["a"]
        await store.schedule_order_check(tenant, "b", after=timedelta(hours=2))
        clock.advance(MINUTE)
        assert await self._claim(store) == ["a"]
        clock.advance(timedelta(hours=2))
        await _orders(store, tenant, c=WAITING)
        # Never checked first, then the longest unchecked (a was due a minute after its
        # last claim, b two hours after the first).
        assert await self._claim(store) == ["c", "a", "b"]

    async def test_event_claims_take_the_statuses_asked_once_untouched_long_enough(
        self, store: AsyncMaintainedStore, clock: FrozenClock
    ) -> None:
        tag = _uid()
        first, done = await _events(
            store, tag, first=InboxStatus.RECEIVED, done=InboxStatus.PROCESSED
        )
        clock.advance(timedelta(seconds=1))
        (failed,) = await _events(store, tag, failed=InboxStatus.FAILED)
        clock.advance(10 * MINUTE)
        (young,) = await _events(store, tag, young=InboxStatus.RECEIVED)
        # The events as stored, oldest first.
        assert await self._claim_events(store, untouched_for=5 * MINUTE) == [first, failed]
        assert await self._claim_events(store, untouched_for=5 * MINUTE) == []
        assert await self._claim_events(store) == [young]
        await store.schedule_event_check("", first.event_id, after=timedelta(0))
        assert await self._claim_events(store, untouched_for=5 * MINUTE) == [first]
        clock.advance(MINUTE)
        # Every lease ran out at the same time: the oldest received first.
        assert await self._claim_events(store) == [first, failed, young]
        async with store.transaction() as tx:
            assert await tx.get_event("", done.event_id) == done

    async def test_claims_hand_out_at_most_limit_rows_and_the_rest_next(
        self, store: AsyncMaintainedStore
    ) -> None:
        tenant = _uid()
        await _orders(store, tenant, **{f"o{i}": WAITING for i in range(5)})
        await _events(store, tenant, e=InboxStatus.RECEIVED)
        assert await self._claim(store, limit=0) == []
        assert await self._claim_events(store, limit=0) == []
        batches = [await self._claim(store, limit=2) for _ in range(4)]
        assert [len(batch) for batch in batches] == [2, 2, 1, 0]
        assert sorted(flatten(batches)) == [f"o{i}" for i in range(5)]
        assert len(await self._claim_events(store, limit=5)) == 1

    async def test_concurrent_claims_never_share_a_row(self, store: AsyncMaintainedStore) -> None:
        tenant = _uid()
        await _orders(store, tenant, **{f"o{i}": WAITING for i in range(40)})

        async def claim(_: int) -> list[str]:
            return await self._claim(store, limit=10)

        handed_out = flatten(await async_concurrently(8, claim))
        assert len(handed_out) == len(set(handed_out))
        # A claim may skip rows another one had locked, never wait for them: take what is
        # left until nothing is.
        while batch := await claim(0):
            handed_out += batch
        assert sorted(handed_out) == sorted(f"o{i}" for i in range(40))

    async def test_claims_from_several_processes_never_share_a_row(
        self,
        make_store: Callable[[Clock | None], Any],
        process_factory: Callable[[], Any] | None,
    ) -> None:
        if process_factory is None:
            pytest.skip("this backend shares no state between processes")
        # The store's own clock, as the children's: the orders are old enough for them.
        store: AsyncMaintainedStore = make_store(None)
        try:
            tenant = _uid()
            await _orders(store, tenant, **{f"o{i}": WAITING for i in range(20)})
        finally:
            await async_shut(store)
        batches = await async_in_processes(claim_checks_in_child, 4, process_factory, 1000)
        mine = [order for t, order in flatten(batches) if t == tenant]
        assert sorted(mine) == sorted(f"o{i}" for i in range(20))

    async def test_order_counts_follow_the_orders(self, store: AsyncMaintainedStore) -> None:
        def nonzero(counts: Any) -> dict[OrderStatus, int]:
            return {status: n for status, n in counts.items() if n}

        assert nonzero(await store.order_counts()) == {}
        tenant = _uid()
        made = await _orders(store, tenant, a=WAITING, b=WAITING, c=OrderStatus.PAID)
        assert nonzero(await store.order_counts()) == {WAITING: 2, OrderStatus.PAID: 1}
        async with store.transaction() as tx:
            await tx.update_order(made["a"], _state(OrderStatus.PAID))
        assert nonzero(await store.order_counts()) == {WAITING: 1, OrderStatus.PAID: 2}

    async def test_the_outbox_backlog_counts_pending_due_and_dead(
        self, store: AsyncMaintainedStore, clock: FrozenClock
    ) -> None:
        assert await store.outbox_backlog() == OutboxBacklog(0, 0, 0, None)
        tenant, enqueued = _uid(), clock.now()
        await _enqueue(store, tenant, "later", "dead", "due", "done")
        clock.advance(MINUTE)
        assert await store.outbox_backlog() == OutboxBacklog(4, 4, 0, enqueued)
        leased = await _claim_all(store)
        await store.fail_effect(leased["later"], error="503", retry_at=clock.now() + DAY)
        await store.fail_effect(leased["dead"], error="400", retry_at=None)
        retry = enqueued + timedelta(seconds=30)
        await store.fail_effect(leased["due"], error="timeout", retry_at=retry)
        await store.finish_effect(leased["done"])
        assert await store.outbox_backlog() == OutboxBacklog(
            pending=2, due=1, dead=1, oldest_due_at=retry
        )

    async def test_requeued_dead_effects_start_a_new_round(
        self, store: AsyncMaintainedStore, clock: FrozenClock
    ) -> None:
        tenant = _uid()
        dead = ["d0", "d1", "d2"]
        await _enqueue(store, tenant, *dead, "waiting")
        leased = await _claim_all(store)
        for order_id in dead:
            await store.fail_effect(leased[order_id], error="boom", retry_at=None)
        await store.fail_effect(leased["waiting"], error="503", retry_at=clock.now() + DAY)
        clock.advance(MINUTE)
        assert await store.requeue_dead_effects(limit=0) == 0
        assert [await store.requeue_dead_effects(limit=2) for _ in range(3)] == [2, 1, 0]
        for order_id in dead:
            (entry,) = await store.effects_for(tenant, order_id)
            assert entry.dedup_key == leased[order_id].dedup_key
            assert (entry.status, entry.attempts, entry.next_attempt_at) == (
                OutboxStatus.PENDING,
                0,
                clock.now(),
            )
            assert (entry.last_error, entry.lease) == ("boom", None)
        again = await _claim_all(store)
        assert sorted(again) == dead  # the waiting one is not due
        assert {e.attempts for e in again.values()} == {1}
        assert (await store.outbox_backlog()).dead == 0

    async def test_purge_events_keeps_recent_and_unsettled_events(
        self, store: AsyncMaintainedStore, clock: FrozenClock
    ) -> None:
        tag = _uid()
        old = await _events(
            store,
            tag,
            processed=InboxStatus.PROCESSED,
            ignored=InboxStatus.IGNORED,
            orphan=InboxStatus.ORPHAN,
            received=InboxStatus.RECEIVED,
            failed=InboxStatus.FAILED,
        )
        clock.advance(2 * DAY)
        (recent,) = await _events(store, tag, recent=InboxStatus.PROCESSED)
        assert await store.purge_events(older_than=DAY, limit=0) == 0
        counts = [await store.purge_events(older_than=DAY, limit=2) for _ in range(3)]
        assert counts == [2, 1, 0]
        async with store.transaction() as tx:
            kept = [e.event_id for e in (*old, recent) if await tx.get_event("", e.event_id)]
        assert kept == [old[3].event_id, old[4].event_id, recent.event_id]
        # A zero window purges up to now; received and failed events stay whatever their age.
        assert await store.purge_events(older_than=timedelta(0), limit=10) == 1
        async with store.transaction() as tx:
            assert await tx.get_event("", old[3].event_id) == old[3]
            assert await tx.get_event("", old[4].event_id) == old[4]

    async def test_purge_effects_keeps_recent_and_undelivered_effects(
        self, store: AsyncMaintainedStore, clock: FrozenClock
    ) -> None:
        tenant = _uid()
        done = ["done0", "done1", "done2"]
        await _enqueue(store, tenant, *done, "pending", "dead")
        leased = await _claim_all(store)
        for order_id in done:
            await store.finish_effect(leased[order_id])
        await store.fail_effect(leased["pending"], error="503", retry_at=clock.now() + 9 * DAY)
        await store.fail_effect(leased["dead"], error="400", retry_at=None)
        clock.advance(2 * DAY)
        await _enqueue(store, tenant, "recent")
        await store.finish_effect((await _claim_all(store))["recent"])
        assert await store.purge_effects(older_than=DAY, limit=0) == 0
        counts = [await store.purge_effects(older_than=DAY, limit=2) for _ in range(3)]
        assert counts == [2, 1, 0]
        left = {
            order_id: [e.status for e in await store.effects_for(tenant, order_id)]
            for order_id in (*done, "pending", "dead", "recent")
        }
        assert left == {
            "done0": [],
            "done1": [],
            "done2": [],
            "pending": [OutboxStatus.PENDING],
            "dead": [OutboxStatus.DEAD],
            "recent": [OutboxStatus.DONE],
        }

    async def test_purge_journal_keeps_recent_entries(
        self, store: AsyncMaintainedStore, clock: FrozenClock
    ) -> None:
        if not isinstance(store, AsyncJournalStore):
            pytest.skip("this payment store keeps no journal (it is optional)")
        tenant = _uid()

        def entry(order_id: str | None, n: int) -> JournalEntry:
            return JournalEntry(
                tenant,
                order_id,
                AuditStep.DUPLICATE,
                AuditSource.WEBHOOK,
                clock.now(),
                event_id=f"evt_{n}",
            )

        await store.append_journal([entry("o1", 0), entry("o1", 1), entry(None, 2)])
        clock.advance(2 * DAY)
        recent = entry("o1", 3)
        await store.append_journal([recent])
        assert await store.purge_journal(older_than=DAY, limit=0) == 0
        counts = [await store.purge_journal(older_than=DAY, limit=2) for _ in range(3)]
        assert counts == [2, 1, 0]
        assert list(await store.journal_for(tenant, "o1")) == [recent]

    async def test_durations_are_checked(self, store: AsyncMaintainedStore) -> None:
        negative = timedelta(seconds=-1)
        with pytest.raises(ConfigurationError):
            await store.claim_orders_to_check(
                statuses=[WAITING], untouched_for=negative, limit=1, lease_for=MINUTE
            )
        with pytest.raises(ConfigurationError):
            await store.claim_orders_to_check(
                statuses=[WAITING], untouched_for=MINUTE, limit=1, lease_for=timedelta(0)
            )
        with pytest.raises(ConfigurationError):
            await store.claim_events_to_check(
                statuses=[InboxStatus.FAILED], untouched_for=negative, limit=1, lease_for=MINUTE
            )
        with pytest.raises(ConfigurationError):
            await store.schedule_order_check(_uid(), "o1", after=negative)
        with pytest.raises(ConfigurationError):
            await store.schedule_event_check("", _uid(), after=negative)
        with pytest.raises(ConfigurationError):
            await store.purge_events(older_than=negative, limit=1)
        with pytest.raises(ConfigurationError):
            await store.purge_effects(older_than=negative, limit=1)
        with pytest.raises(ConfigurationError):
            await store.purge_journal(older_than=negative, limit=1)
