"""The in-memory payment store: transactions, compare-and-set, inbox, audit and outbox."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest

from idempay.clock import FrozenClock
from idempay.core.audit import AuditDraft, AuditSource, AuditStep, verify_trail
from idempay.core.models import InboxEvent, InboxStatus, NewEffect, OutboxStatus
from idempay.core.orders import OrderState, OrderStatus
from idempay.errors import ConcurrentUpdateError, ConfigurationError, LeaseLostError, StoreError
from idempay.memory import AsyncMemoryPaymentStore, MemoryPaymentStore
from idempay.protocols import AsyncOutboxStore, AsyncPaymentStore, OutboxStore, PaymentStore

NEW = OrderState(status=OrderStatus.CREATED, amount=1999, currency="eur")
LEASE = timedelta(seconds=30)


class BoomError(Exception):
    pass


@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock()


@pytest.fixture
def store(clock: FrozenClock) -> MemoryPaymentStore:
    return MemoryPaymentStore(clock=clock)


def event(event_id: str, clock: FrozenClock, **kw: object) -> InboxEvent:
    fields: dict[str, object] = {
        "account": "",
        "event_id": event_id,
        "type": "payment_intent.succeeded",
        "created": 1_700_000_000,
        "payload": b"{}",
        "received_at": clock.now(),
    }
    return InboxEvent(**(fields | kw))  # type: ignore[arg-type]


def draft(clock: FrozenClock, step: AuditStep, order_id: str = "o1") -> AuditDraft:
    return AuditDraft("acme", order_id, step, AuditSource.CHECKOUT, at=clock.now())


def test_backends_satisfy_the_protocols() -> None:
    assert isinstance(MemoryPaymentStore(), PaymentStore)
    assert isinstance(MemoryPaymentStore(), OutboxStore)
    assert isinstance(AsyncMemoryPaymentStore(), AsyncPaymentStore)
    assert isinstance(AsyncMemoryPaymentStore(), AsyncOutboxStore)


def test_insert_order_is_insert_or_fetch(store: MemoryPaymentStore) -> None:
    with store.transaction() as tx:
        created, inserted = tx.insert_order("acme", "o1", NEW)
        assert inserted
        assert created.version == 1
        again, inserted_again = tx.insert_order(
            "acme", "o1", OrderState(OrderStatus.PAID, 5, "usd")
        )
        assert not inserted_again
        assert again == created
    with store.transaction() as tx:
        assert tx.get_order("acme", "o1") == created
        assert tx.get_order("other-tenant", "o1") is None


def test_a_raising_transaction_leaves_nothing(
    store: MemoryPaymentStore, clock: FrozenClock
) -> None:
    with store.transaction() as tx:
        base, _ = tx.insert_order("acme", "o0", NEW)
    with pytest.raises(BoomError), store.transaction() as tx:
        tx.insert_order("acme", "o1", OrderState(OrderStatus.CREATED, 100, "eur", "pi_1"))
        tx.update_order(base, OrderState(OrderStatus.AWAITING_PAYMENT, 1999, "eur", "pi_0"))
        tx.insert_event(event("evt_1", clock))
        tx.append_audit(draft(clock, AuditStep.STARTED))
        tx.enqueue_effect(NewEffect("acme", "o1", "receipt", "paid"))
        raise BoomError
    with store.transaction() as tx:
        assert tx.get_order("acme", "o1") is None
        assert tx.get_order("acme", "o0") == base
        assert tx.find_order_by_payment_intent("pi_0") is None
        assert tx.find_order_by_payment_intent("pi_1") is None
        assert tx.get_event("", "evt_1") is None
        assert tx.audit_trail("acme", "o1") == ()
    assert store.effects_for("acme", "o1") == []


def test_update_is_compare_and_set(store: MemoryPaymentStore) -> None:
    with store.transaction() as tx:
        v1, _ = tx.insert_order("acme", "o1", NEW)
        v2 = tx.update_order(v1, OrderState(OrderStatus.AWAITING_PAYMENT, 1999, "eur", "pi_1"))
        assert v2.version == 2
        with pytest.raises(ConcurrentUpdateError):
            tx.update_order(v1, OrderState(OrderStatus.CANCELED, 1999, "eur"))
        assert tx.find_order_by_payment_intent("pi_1") == v2
        with pytest.raises(ConcurrentUpdateError):
            tx.update_order(type(v1)("acme", "missing", NEW, 1, v1.created_at, v1.updated_at), NEW)


def test_one_payment_intent_belongs_to_one_order(store: MemoryPaymentStore) -> None:
    with store.transaction() as tx:
        a, _ = tx.insert_order("acme", "a", OrderState(OrderStatus.CREATED, 1, "eur", "pi_x"))
        b, _ = tx.insert_order("acme", "b", NEW)
        with pytest.raises(ConcurrentUpdateError):
            tx.update_order(b, OrderState(OrderStatus.AWAITING_PAYMENT, 1999, "eur", "pi_x"))
        with pytest.raises(ConcurrentUpdateError):
            tx.insert_order("acme", "c", OrderState(OrderStatus.CREATED, 1, "eur", "pi_x"))
        # Moving an order to another intent frees the old one.
        tx.update_order(a, OrderState(OrderStatus.AWAITING_PAYMENT, 1, "eur", "pi_y"))
        assert tx.find_order_by_payment_intent("pi_x") is None
        tx.update_order(b, OrderState(OrderStatus.AWAITING_PAYMENT, 1999, "eur", "pi_x"))


def test_concurrent_compare_and_set_has_one_winner(store: MemoryPaymentStore) -> None:
    with store.transaction() as tx:
        base, _ = tx.insert_order("acme", "o1", NEW)
    n = 16
    barrier = threading.Barrier(n)

    def contend(i: int) -> bool:
        barrier.wait()
        try:
            with store.transaction() as tx:
                tx.update_order(
                    base, OrderState(OrderStatus.AWAITING_PAYMENT, 1999, "eur", f"pi_{i}")
                )
        except ConcurrentUpdateError:
            return False
        return True

    with ThreadPoolExecutor(n) as pool:
        assert list(pool.map(contend, range(n))).count(True) == 1
    with store.transaction() as tx:
        order = tx.get_order("acme", "o1")
        assert order is not None
        assert order.version == 2


def test_inbox_dedup_and_status(store: MemoryPaymentStore, clock: FrozenClock) -> None:
    with store.transaction() as tx:
        first, inserted = tx.insert_event(event("evt_1", clock))
        assert inserted
        again, inserted_again = tx.insert_event(event("evt_1", clock, type="charge.succeeded"))
        assert not inserted_again
        assert again == first
        # The same event id under a Connect account is another event.
        _, other_account = tx.insert_event(
            InboxEvent("acct_1", "evt_1", "x", 0, b"{}", clock.now())
        )
        assert other_account
        orphan = tx.set_event_status("", "evt_1", InboxStatus.ORPHAN)
        assert orphan.attempts == 1
        assert orphan.processed_at is None
        clock.advance(5)
        done = tx.set_event_status("", "evt_1", InboxStatus.PROCESSED, order_id="o1")
        assert done.attempts == 2
        assert done.order_id == "o1"
        assert done.processed_at == clock.now()
        with pytest.raises(StoreError):
            tx.set_event_status("", "evt_missing", InboxStatus.PROCESSED)


def test_orphans_are_found_by_intent_or_order(
    store: MemoryPaymentStore, clock: FrozenClock
) -> None:
    with store.transaction() as tx:
        tx.insert_event(event("evt_b", clock, payment_intent_id="pi_1", status=InboxStatus.ORPHAN))
        tx.insert_event(
            InboxEvent("", "evt_a", "t", 1, b"{}", clock.now(), InboxStatus.ORPHAN, order_id="o1")
        )
        tx.insert_event(event("evt_c", clock, payment_intent_id="pi_1"))  # not an orphan
        tx.insert_event(event("evt_d", clock, payment_intent_id="pi_2", status=InboxStatus.ORPHAN))
        found = tx.orphans_for(payment_intent_id="pi_1", order_id="o1")
        assert [e.event_id for e in found] == ["evt_a", "evt_b"]
        assert len(tx.orphans_for(payment_intent_id="pi_1", order_id="o1", limit=1)) == 1
        assert tx.orphans_for(payment_intent_id=None, order_id=None) == []


def test_audit_trail_is_chained_per_order(store: MemoryPaymentStore, clock: FrozenClock) -> None:
    with store.transaction() as tx:
        for step in (AuditStep.STARTED, AuditStep.PENDING, AuditStep.SUCCEEDED):
            tx.append_audit(draft(clock, step))
        tx.append_audit(draft(clock, AuditStep.STARTED, order_id="o2"))
    with store.transaction() as tx:
        trail = tx.audit_trail("acme", "o1")
        assert [e.seq for e in trail] == [1, 2, 3]
        assert [e.step for e in trail] == [
            AuditStep.STARTED,
            AuditStep.PENDING,
            AuditStep.SUCCEEDED,
        ]
        assert verify_trail(trail).ok
        assert [e.seq for e in tx.audit_trail("acme", "o2")] == [1]


def test_outbox_enqueue_is_unique_and_dispatch_is_leased(
    store: MemoryPaymentStore, clock: FrozenClock
) -> None:
    with store.transaction() as tx:
        assert tx.enqueue_effect(NewEffect("acme", "o1", "receipt", "paid", '{"amount":1999}'))
        assert not tx.enqueue_effect(NewEffect("acme", "o1", "receipt", "paid"))
        assert tx.enqueue_effect(NewEffect("acme", "o1", "fulfil", "paid"))
    first = store.claim_due_effects(limit=10, lease_for=LEASE)
    assert len(first) == 2
    assert all(e.attempts == 1 and e.lease is not None for e in first)
    assert store.claim_due_effects(limit=10, lease_for=LEASE) == []
    receipt = next(e for e in first if e.effect == "receipt")
    assert receipt.payload == '{"amount":1999}'
    assert receipt.dedup_key == NewEffect("acme", "o1", "receipt", "paid").dedup_key
    store.finish_effect(receipt)
    fulfil = next(e for e in first if e.effect == "fulfil")
    store.fail_effect(fulfil, error="timeout", retry_at=clock.now() + timedelta(minutes=1))
    assert store.claim_due_effects(limit=10, lease_for=LEASE) == []
    clock.advance(60)
    retry = store.claim_due_effects(limit=10, lease_for=LEASE)
    assert [e.effect for e in retry] == ["fulfil"]
    assert retry[0].attempts == 2
    assert retry[0].last_error == "timeout"
    store.fail_effect(retry[0], error="still failing", retry_at=None)
    statuses = {e.effect: e.status for e in store.effects_for("acme", "o1")}
    assert statuses == {"receipt": OutboxStatus.DONE, "fulfil": OutboxStatus.DEAD}


def test_a_dead_dispatchers_effect_comes_back_and_its_late_finish_is_refused(
    store: MemoryPaymentStore, clock: FrozenClock
) -> None:
    with store.transaction() as tx:
        tx.enqueue_effect(NewEffect("acme", "o1", "receipt", "paid"))
    (stale,) = store.claim_due_effects(limit=1, lease_for=LEASE)
    clock.advance(LEASE)
    (fresh,) = store.claim_due_effects(limit=1, lease_for=LEASE)
    assert fresh.lease is not None
    assert stale.lease is not None
    assert fresh.lease.fence == stale.lease.fence + 1
    with pytest.raises(LeaseLostError):
        store.finish_effect(stale)
    with pytest.raises(LeaseLostError):
        store.fail_effect(stale, error="x", retry_at=None)
    store.finish_effect(fresh)
    with pytest.raises(LeaseLostError):
        store.finish_effect(fresh)


def test_concurrent_dispatchers_never_share_an_entry(store: MemoryPaymentStore) -> None:
    with store.transaction() as tx:
        for i in range(40):
            tx.enqueue_effect(NewEffect("acme", f"o{i}", "receipt", "paid"))
    n = 8
    barrier = threading.Barrier(n)

    def dispatcher(_: int) -> list[str]:
        barrier.wait()
        return [e.order_id for e in store.claim_due_effects(limit=10, lease_for=LEASE)]

    with ThreadPoolExecutor(n) as pool:
        batches = list(pool.map(dispatcher, range(n)))
    handed_out = [order for batch in batches for order in batch]
    assert sorted(handed_out) == sorted(f"o{i}" for i in range(40))


def test_outbox_lease_must_be_positive(store: MemoryPaymentStore) -> None:
    with pytest.raises(ConfigurationError):
        store.claim_due_effects(limit=1, lease_for=timedelta(0))


@pytest.mark.anyio
async def test_async_store_transactions_and_outbox(clock: FrozenClock) -> None:
    store = AsyncMemoryPaymentStore(clock=clock)
    async with store.transaction() as tx:
        assert tx.now() == clock.now()
        order, inserted = await tx.insert_order("acme", "o1", NEW)
        assert inserted
        paid = await tx.update_order(order, OrderState(OrderStatus.PAID, 1999, "eur", "pi_1"))
        assert await tx.get_order("acme", "o1") == paid
        assert await tx.find_order_by_payment_intent("pi_1") == paid
        _, fresh = await tx.insert_event(
            event("evt_1", clock, status=InboxStatus.ORPHAN, order_id="o1")
        )
        assert fresh
        assert await tx.get_event("", "evt_1") is not None
        assert len(await tx.orphans_for(payment_intent_id=None, order_id="o1")) == 1
        await tx.set_event_status("", "evt_1", InboxStatus.PROCESSED)
        await tx.append_audit(draft(clock, AuditStep.SUCCEEDED))
        assert len(await tx.audit_trail("acme", "o1")) == 1
        assert await tx.enqueue_effect(NewEffect("acme", "o1", "receipt", "paid"))
    with pytest.raises(BoomError):
        async with store.transaction() as tx:
            await tx.insert_order("acme", "o2", NEW)
            raise BoomError
    async with store.transaction() as tx:
        assert await tx.get_order("acme", "o2") is None
    (entry,) = await store.claim_due_effects(limit=5, lease_for=LEASE)
    await store.fail_effect(entry, error="smtp down", retry_at=clock.now())
    (entry,) = await store.claim_due_effects(limit=5, lease_for=LEASE)
    await store.finish_effect(entry)
    assert [e.status for e in await store.effects_for("acme", "o1")] == [OutboxStatus.DONE]


@pytest.mark.anyio
async def test_async_transactions_are_serialised_across_tasks_and_threads(
    clock: FrozenClock,
) -> None:
    store = AsyncMemoryPaymentStore(clock=clock)
    async with store.transaction() as tx:
        base, _ = await tx.insert_order("acme", "o1", NEW)

    async def bump() -> bool:
        async with store.transaction() as tx:
            current = await tx.get_order("acme", "o1")
            assert current is not None
            await asyncio.sleep(0)  # let other tasks try to interleave
            await tx.update_order(current, current.state)
        return True

    def in_another_loop() -> list[bool]:
        async def many() -> list[bool]:
            return list(await asyncio.gather(*(bump() for _ in range(10))))

        return asyncio.run(many())

    other = asyncio.to_thread(in_another_loop)
    here = asyncio.gather(*(bump() for _ in range(10)))
    results = await asyncio.gather(other, here)
    assert sum(len(r) for r in results) == 20
    async with store.transaction() as tx:
        final = await tx.get_order("acme", "o1")
        assert final is not None
        # Every read-modify-write saw the previous one: no lost update, no conflict.
        assert final.version == base.version + 20


@pytest.mark.anyio
async def test_a_cancelled_waiter_does_not_leak_the_lock(clock: FrozenClock) -> None:
    store = AsyncMemoryPaymentStore(clock=clock)
    holder_in = asyncio.Event()
    release_holder = asyncio.Event()

    async def holder() -> None:
        async with store.transaction():
            holder_in.set()
            await release_holder.wait()

    def hold_from_thread(entered: threading.Event, leave: threading.Event) -> None:
        async def run() -> None:
            async with store.transaction():
                entered.set()
                await asyncio.to_thread(leave.wait)

        asyncio.run(run())

    # Hold the lock from another thread so that a waiter here must wait in a worker thread.
    entered, leave = threading.Event(), threading.Event()
    other = asyncio.create_task(asyncio.to_thread(hold_from_thread, entered, leave))
    await asyncio.to_thread(entered.wait)
    waiter = asyncio.create_task(holder())
    # Nothing before the waiter's wait for the thread lock suspends: a few yields get it there.
    for _ in range(3):
        await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    leave.set()
    await other
    # The lock is usable again.
    async with store.transaction() as tx:
        assert tx.now() == clock.now()
    assert not holder_in.is_set()
    release_holder.set()
