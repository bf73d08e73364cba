"""The contracts a lock provider or a store must meet, in sync and async form.

Custom backends satisfy these protocols structurally (no base class needed) and can prove it
with the contract suite in :mod:`idempay.testing`. The guarantees stated here are what the guard
engine relies on; where a method says *atomic*, a backend must implement it as one indivisible
step against concurrent callers in other threads, tasks and processes.

Correctness never rests on a :class:`LockProvider`: a lock only cuts duplicate work. Every
guarantee comes from the stores: one atomic claim per key, fenced completion, compare-and-set
order updates, unique inbox and outbox rows, and transactions that commit or roll back whole.

Async twins carry the ``Async`` prefix and the same semantics.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from datetime import datetime, timedelta
from typing import Protocol, TypeVar, runtime_checkable

from idempay.core.audit import AuditDraft, AuditEntry
from idempay.core.models import (
    EventCommit,
    EventReception,
    InboxEvent,
    InboxStatus,
    JournalEntry,
    NewEffect,
    OrderRecord,
    OutboxBacklog,
    OutboxEntry,
)
from idempay.core.orders import OrderState, OrderStatus
from idempay.core.records import ClaimResult, IdempotencyRecord, Lease, StoredResponse

T = TypeVar("T")

__all__ = [
    "AsyncIdempotencyStore",
    "AsyncJournalStore",
    "AsyncLockProvider",
    "AsyncMaintenanceStore",
    "AsyncOutboxStore",
    "AsyncPaymentStore",
    "AsyncPaymentTransaction",
    "IdempotencyStore",
    "JournalStore",
    "LockProvider",
    "MaintenanceStore",
    "OutboxStore",
    "PaymentStore",
    "PaymentTransaction",
]


@runtime_checkable
class LockProvider(Protocol):
    """Named, expiring, fenced locks.

    A lock is never held without an expiry. ``acquire`` returns ``None`` when the lock is held
    by someone else after waiting up to ``wait``; it raises :class:`~idempay.errors.LockError`
    only when the provider itself fails. Each successful acquire gets a ``fence`` greater than
    every fence handed out before for that name.
    """

    def acquire(self, name: str, *, ttl: timedelta, wait: timedelta = ...) -> Lease | None:
        """Take the lock ``name`` for ``ttl``, waiting up to ``wait`` (default: not at all)."""
        ...

    def release(self, name: str, lease: Lease) -> bool:
        """Release the lock if ``lease`` still owns it (atomic compare-and-delete).

        Returns False, and changes nothing, when the lease expired or another owner holds it.
        """
        ...

    def extend(self, name: str, lease: Lease, *, ttl: timedelta) -> Lease | None:
        """Push the expiry to now + ``ttl`` if ``lease`` still owns the lock, else return None."""
        ...


@runtime_checkable
class AsyncLockProvider(Protocol):
    """Async twin of :class:`LockProvider`."""

    async def acquire(self, name: str, *, ttl: timedelta, wait: timedelta = ...) -> Lease | None:
        """See :meth:`LockProvider.acquire`."""
        ...

    async def release(self, name: str, lease: Lease) -> bool:
        """See :meth:`LockProvider.release`."""
        ...

    async def extend(self, name: str, lease: Lease, *, ttl: timedelta) -> Lease | None:
        """See :meth:`LockProvider.extend`."""
        ...


@runtime_checkable
class IdempotencyStore(Protocol):
    """Idempotency records keyed by (scope, key), compared byte for byte.

    Times (lease expiry, record expiry) come from the store's own clock, the database's for a
    database: every process then agrees on when a lease ran out.
    """

    def claim(
        self,
        scope: str,
        key: str,
        fingerprint: str,
        *,
        lease_for: timedelta,
        retain_for: timedelta,
    ) -> ClaimResult:
        """Atomically claim (scope, key) for one request.

        Returns :class:`~idempay.core.records.Claimed` with a fresh lease when the key is
        absent or its record has expired (a new record, kept ``retain_for`` after creation), or
        when a record with the *same* fingerprint is in progress with an expired lease or was
        released without an outcome (a takeover: ``resumed=True``, fence increased by one,
        recovery point kept). Returns :class:`~idempay.core.records.Existing` in every other
        case, in the same round trip. Exactly one of any number of concurrent claims of an
        absent key wins. Never truncates or normalises ``key``.
        """
        ...

    def checkpoint(
        self,
        scope: str,
        key: str,
        lease: Lease,
        *,
        recovery_point: str,
        resource_id: str | None = None,
    ) -> None:
        """Record the last durable step reached, if ``lease`` still owns the record.

        Raises:
            LeaseLostError: the record was taken over (fence or token differ); nothing written.
        """
        ...

    def extend(self, scope: str, key: str, lease: Lease, *, lease_for: timedelta) -> Lease:
        """Extend the lease to now + ``lease_for``; raises LeaseLostError if it was lost."""
        ...

    def complete(
        self,
        scope: str,
        key: str,
        lease: Lease,
        response: StoredResponse,
        *,
        failed: bool = False,
    ) -> IdempotencyRecord:
        """Store the response and finish the record (``FAILED`` if ``failed``), fenced.

        Succeeds while ``lease`` is the record's current lease, even past its expiry if nobody
        took over (the work is still valid). Raises LeaseLostError otherwise.
        """
        ...

    def release(self, scope: str, key: str, lease: Lease, *, discard: bool = False) -> None:
        """Give the record up without an outcome, fenced.

        With ``discard`` the record is deleted (the next request starts afresh); otherwise it
        becomes ``UNKNOWN`` and the next request with the same fingerprint takes it over at
        once, from its recovery point. Raises LeaseLostError if the lease was lost.
        """
        ...

    def get(self, scope: str, key: str) -> IdempotencyRecord | None:
        """Return the record, or None if absent or expired."""
        ...

    def purge_expired(self, *, limit: int = 1000) -> int:
        """Delete up to ``limit`` expired records; return how many were deleted."""
        ...


@runtime_checkable
class AsyncIdempotencyStore(Protocol):
    """Async twin of :class:`IdempotencyStore`."""

    async def claim(
        self,
        scope: str,
        key: str,
        fingerprint: str,
        *,
        lease_for: timedelta,
        retain_for: timedelta,
    ) -> ClaimResult:
        """See :meth:`IdempotencyStore.claim`."""
        ...

    async def checkpoint(
        self,
        scope: str,
        key: str,
        lease: Lease,
        *,
        recovery_point: str,
        resource_id: str | None = None,
    ) -> None:
        """See :meth:`IdempotencyStore.checkpoint`."""
        ...

    async def extend(self, scope: str, key: str, lease: Lease, *, lease_for: timedelta) -> Lease:
        """See :meth:`IdempotencyStore.extend`."""
        ...

    async def complete(
        self,
        scope: str,
        key: str,
        lease: Lease,
        response: StoredResponse,
        *,
        failed: bool = False,
    ) -> IdempotencyRecord:
        """See :meth:`IdempotencyStore.complete`."""
        ...

    async def release(self, scope: str, key: str, lease: Lease, *, discard: bool = False) -> None:
        """See :meth:`IdempotencyStore.release`."""
        ...

    async def get(self, scope: str, key: str) -> IdempotencyRecord | None:
        """See :meth:`IdempotencyStore.get`."""
        ...

    async def purge_expired(self, *, limit: int = 1000) -> int:
        """See :meth:`IdempotencyStore.purge_expired`."""
        ...


class PaymentTransaction(Protocol):
    """Orders, inbox, audit and outbox inside one transaction.

    Everything done through one transaction object commits together when its ``with`` block
    exits normally, and none of it is visible to others, or kept, if the block raises.
    """

    def now(self) -> datetime:
        """The store's current time (the database clock), timezone-aware UTC."""
        ...

    def insert_order(
        self, tenant: str, order_id: str, state: OrderState
    ) -> tuple[OrderRecord, bool]:
        """Insert the order, or return the existing one; the bool says whether it was inserted.

        Unique by (tenant, order_id): of concurrent inserts exactly one creates the row.
        """
        ...

    def get_order(self, tenant: str, order_id: str) -> OrderRecord | None:
        """Return the order, or None."""
        ...

    def find_order_by_payment_intent(self, payment_intent_id: str) -> OrderRecord | None:
        """Return the order whose state records this PaymentIntent, or None."""
        ...

    def update_order(self, record: OrderRecord, state: OrderState) -> OrderRecord:
        """Compare-and-set: write ``state`` if the stored version is still ``record.version``.

        Returns the new record (version + 1). Raises ConcurrentUpdateError, writing nothing,
        if another writer got there first, and ConcurrentUpdateError too if the new state's
        PaymentIntent id already belongs to another order.
        """
        ...

    def insert_event(self, event: InboxEvent) -> tuple[InboxEvent, bool]:
        """Insert into the inbox unless (account, event_id) exists; return the row and whether
        this call inserted it. Of concurrent inserts exactly one returns True."""
        ...

    def get_event(self, account: str, event_id: str) -> InboxEvent | None:
        """Return the inbox row, or None."""
        ...

    def set_event_status(
        self,
        account: str,
        event_id: str,
        status: InboxStatus,
        *,
        error: str | None = None,
        order_id: str | None = None,
    ) -> InboxEvent:
        """Set the row's status (counting an attempt) and, when given, its correlated order."""
        ...

    def orphans_for(
        self, *, payment_intent_id: str | None, order_id: str | None, limit: int = 100
    ) -> Sequence[InboxEvent]:
        """Orphaned events that name this PaymentIntent or order, oldest first."""
        ...

    def append_audit(self, draft: AuditDraft) -> AuditEntry:
        """Append to the order's trail: the next ``seq``, chained to the previous entry's hash.

        Two concurrent appends to one trail never get the same ``seq``: one of them fails
        (ConcurrentUpdateError) and its transaction rolls back.
        """
        ...

    def audit_trail(self, tenant: str, order_id: str) -> Sequence[AuditEntry]:
        """The order's trail in ``seq`` order."""
        ...

    def enqueue_effect(self, effect: NewEffect) -> bool:
        """Add an effect to the outbox; False (and no change) if the same one exists already."""
        ...


class AsyncPaymentTransaction(Protocol):
    """Async twin of :class:`PaymentTransaction`."""

    def now(self) -> datetime:
        """See :meth:`PaymentTransaction.now`."""
        ...

    async def insert_order(
        self, tenant: str, order_id: str, state: OrderState
    ) -> tuple[OrderRecord, bool]:
        """See :meth:`PaymentTransaction.insert_order`."""
        ...

    async def get_order(self, tenant: str, order_id: str) -> OrderRecord | None:
        """See :meth:`PaymentTransaction.get_order`."""
        ...

    async def find_order_by_payment_intent(self, payment_intent_id: str) -> OrderRecord | None:
        """See :meth:`PaymentTransaction.find_order_by_payment_intent`."""
        ...

    async def update_order(self, record: OrderRecord, state: OrderState) -> OrderRecord:
        """See :meth:`PaymentTransaction.update_order`."""
        ...

    async def insert_event(self, event: InboxEvent) -> tuple[InboxEvent, bool]:
        """See :meth:`PaymentTransaction.insert_event`."""
        ...

    async def get_event(self, account: str, event_id: str) -> InboxEvent | None:
        """See :meth:`PaymentTransaction.get_event`."""
        ...

    async def set_event_status(
        self,
        account: str,
        event_id: str,
        status: InboxStatus,
        *,
        error: str | None = None,
        order_id: str | None = None,
    ) -> InboxEvent:
        """See :meth:`PaymentTransaction.set_event_status`."""
        ...

    async def orphans_for(
        self, *, payment_intent_id: str | None, order_id: str | None, limit: int = 100
    ) -> Sequence[InboxEvent]:
        """See :meth:`PaymentTransaction.orphans_for`."""
        ...

    async def append_audit(self, draft: AuditDraft) -> AuditEntry:
        """See :meth:`PaymentTransaction.append_audit`."""
        ...

    async def audit_trail(self, tenant: str, order_id: str) -> Sequence[AuditEntry]:
        """See :meth:`PaymentTransaction.audit_trail`."""
        ...

    async def enqueue_effect(self, effect: NewEffect) -> bool:
        """See :meth:`PaymentTransaction.enqueue_effect`."""
        ...


@runtime_checkable
class PaymentStore(Protocol):
    """Opens :class:`PaymentTransaction` units of work."""

    def transaction(self) -> AbstractContextManager[PaymentTransaction]:
        """Begin a transaction; it commits when the block exits normally, else rolls back.

        A retriable database failure inside it (deadlock, serialization failure, busy) raises
        TransientStoreError; the whole transaction has then been rolled back.
        """
        ...

    def receive_event(
        self, event: InboxEvent, *, tenant: str | None = None, order_id: str | None = None
    ) -> EventReception:
        """Read, in one consistent snapshot and without writing anything, what a webhook
        needs to decide: ``event``'s inbox row if it is stored, the order it concerns (by
        ``event.payment_intent_id``, else by ``(tenant, order_id)``) and the end of that
        order's audit trail.

        One step, so a backend can do it in a single round trip. A duplicate delivery of a
        processed event therefore costs one read and no durable write; a first delivery is
        stored by :meth:`commit_event`, together with everything it changes (an event whose
        processing fails before that is not stored, and is answered with an error so that
        Stripe delivers it again).
        """
        ...

    def commit_event(self, commit: EventCommit) -> OrderRecord | None:
        """Atomically write what one event changes (see :class:`~idempay.core.models.EventCommit`):
        the inbox row (inserted, or updated from ``commit.expected_status``), the order's
        compare-and-set, the audit entries after ``commit.audit_head`` and the outbox rows.

        All or nothing, in one step so that a backend can do it in a single round trip and one
        durable commit. Raises ConcurrentUpdateError, writing nothing, when another writer got
        there first: the inbox row exists although ``expected_status`` is None, or is absent or
        has another status although it is not; the order's version is no longer
        ``commit.order.version``; its trail no longer ends at ``commit.audit_head``; or the new
        state's PaymentIntent belongs to another order. The caller then reads again (and sees a
        duplicate, or decides again). Returns the order as written, or the order unchanged
        when ``new_state`` is None.
        """
        ...

    def run_transaction(self, work: Callable[[PaymentTransaction], T], *, attempts: int = 8) -> T:
        """Run ``work`` in a transaction and return its result, retrying when it may succeed.

        On ConcurrentUpdateError (a compare-and-set lost, a concurrent append) or
        TransientStoreError the transaction is rolled back and ``work`` runs again in a new
        one, after a jittered pause, up to ``attempts`` times in all; then the last error is
        raised. ``work`` must therefore have no effect outside the transaction.
        """
        ...


@runtime_checkable
class AsyncPaymentStore(Protocol):
    """Async twin of :class:`PaymentStore`."""

    def transaction(self) -> AbstractAsyncContextManager[AsyncPaymentTransaction]:
        """See :meth:`PaymentStore.transaction`."""
        ...

    async def receive_event(
        self, event: InboxEvent, *, tenant: str | None = None, order_id: str | None = None
    ) -> EventReception:
        """See :meth:`PaymentStore.receive_event`."""
        ...

    async def commit_event(self, commit: EventCommit) -> OrderRecord | None:
        """See :meth:`PaymentStore.commit_event`."""
        ...

    async def run_transaction(
        self, work: Callable[[AsyncPaymentTransaction], Awaitable[T]], *, attempts: int = 8
    ) -> T:
        """See :meth:`PaymentStore.run_transaction`."""
        ...


@runtime_checkable
class JournalStore(Protocol):
    """Keeps the journal of decisions that changed nothing (duplicates, replays, refusals).

    Optional: a payment store that also implements this gets its guard's journal; without
    it, those decisions go to the ``idempay.audit`` logger only.
    """

    def append_journal(self, entries: Sequence[JournalEntry]) -> None:
        """Append ``entries`` in one step. Need not wait for durability: the journal is a
        record of what happened, never what a guarantee rests on."""
        ...

    def journal_for(
        self, tenant: str, order_id: str, *, limit: int = 1000
    ) -> Sequence[JournalEntry]:
        """The first ``limit`` journal entries of one order, in the order they were appended."""
        ...


@runtime_checkable
class AsyncJournalStore(Protocol):
    """Async twin of :class:`JournalStore`."""

    async def append_journal(self, entries: Sequence[JournalEntry]) -> None:
        """See :meth:`JournalStore.append_journal`."""
        ...

    async def journal_for(
        self, tenant: str, order_id: str, *, limit: int = 1000
    ) -> Sequence[JournalEntry]:
        """See :meth:`JournalStore.journal_for`."""
        ...


@runtime_checkable
class OutboxStore(Protocol):
    """The dispatcher's side of the outbox: each method is atomic on its own."""

    def claim_due_effects(self, *, limit: int, lease_for: timedelta) -> Sequence[OutboxEntry]:
        """Lease up to ``limit`` pending effects whose ``next_attempt_at`` has come.

        Concurrent dispatchers never receive the same entry while its lease runs; an entry
        whose dispatcher died comes back once the lease expires (at least once delivery).
        """
        ...

    def finish_effect(self, entry: OutboxEntry) -> None:
        """Mark a leased entry done. Raises LeaseLostError if its lease was taken over."""
        ...

    def fail_effect(self, entry: OutboxEntry, *, error: str, retry_at: datetime | None) -> None:
        """Record a failed attempt: retry at ``retry_at``, or dead-letter it when None.

        Raises LeaseLostError if the entry's lease was taken over.
        """
        ...

    def effects_for(self, tenant: str, order_id: str) -> Sequence[OutboxEntry]:
        """All of an order's effects, whatever their status, oldest first."""
        ...


@runtime_checkable
class AsyncOutboxStore(Protocol):
    """Async twin of :class:`OutboxStore`."""

    async def claim_due_effects(self, *, limit: int, lease_for: timedelta) -> Sequence[OutboxEntry]:
        """See :meth:`OutboxStore.claim_due_effects`."""
        ...

    async def finish_effect(self, entry: OutboxEntry) -> None:
        """See :meth:`OutboxStore.finish_effect`."""
        ...

    async def fail_effect(
        self, entry: OutboxEntry, *, error: str, retry_at: datetime | None
    ) -> None:
        """See :meth:`OutboxStore.fail_effect`."""
        ...

    async def effects_for(self, tenant: str, order_id: str) -> Sequence[OutboxEntry]:
        """See :meth:`OutboxStore.effects_for`."""
        ...


@runtime_checkable
class MaintenanceStore(Protocol):
    """What the reconciler, the ``purge`` command and monitoring need from a payment store.

    Optional: a payment store that implements it can be reconciled and purged (every shipped
    one does). Times are the store's own clock. Each method is atomic on its own.

    The *claims* hand work to one of several concurrent reconcilers: a claimed row is stamped
    "not before ``now + lease_for``", so that no other caller receives it while the lease runs
    (``FOR UPDATE SKIP LOCKED`` or equivalent; a caller never waits for another's rows). A
    reconciler that dies mid-row only delays the row's next check. After checking a row, the
    reconciler sets its next check with ``schedule_*``.
    """

    def claim_orders_to_check(
        self,
        *,
        statuses: Sequence[OrderStatus],
        untouched_for: timedelta,
        limit: int,
        lease_for: timedelta,
    ) -> Sequence[OrderRecord]:
        """Lease up to ``limit`` orders whose status is one of ``statuses``, unchanged for at
        least ``untouched_for`` (``updated_at <= now - untouched_for``; zero takes every one),
        and whose next check, if any, has come; never-checked orders first, then the longest
        unchecked, then the oldest change. Each returned order's next check becomes
        ``now + lease_for``."""
        ...

    def schedule_order_check(self, tenant: str, order_id: str, *, after: timedelta) -> None:
        """Set the order's next check to ``now + after`` (zero: due at once)."""
        ...

    def claim_events_to_check(
        self,
        *,
        statuses: Sequence[InboxStatus],
        untouched_for: timedelta,
        limit: int,
        lease_for: timedelta,
    ) -> Sequence[InboxEvent]:
        """Like :meth:`claim_orders_to_check`, for inbox events by status and ``received_at``."""
        ...

    def schedule_event_check(self, account: str, event_id: str, *, after: timedelta) -> None:
        """Set the inbox event's next check to ``now + after``."""
        ...

    def order_counts(self) -> Mapping[OrderStatus, int]:
        """How many orders are in each status (statuses without orders may be left out)."""
        ...

    def outbox_backlog(self) -> OutboxBacklog:
        """Count pending, due and dead effects, and find the oldest due one."""
        ...

    def requeue_dead_effects(self, *, limit: int) -> int:
        """Give up to ``limit`` dead-lettered effects a new round of attempts: pending, due
        now, attempts back to zero (their dedup key unchanged). Return how many."""
        ...

    def purge_events(self, *, older_than: timedelta, limit: int) -> int:
        """Delete up to ``limit`` inbox events received before ``now - older_than`` whose
        status is processed, ignored or orphan (never received or failed ones). Return how
        many."""
        ...

    def purge_effects(self, *, older_than: timedelta, limit: int) -> int:
        """Delete up to ``limit`` done effects created before ``now - older_than`` (never
        pending or dead ones). Return how many."""
        ...

    def purge_journal(self, *, older_than: timedelta, limit: int) -> int:
        """Delete up to ``limit`` journal entries written before ``now - older_than``."""
        ...


@runtime_checkable
class AsyncMaintenanceStore(Protocol):
    """Async twin of :class:`MaintenanceStore`."""

    async def claim_orders_to_check(
        self,
        *,
        statuses: Sequence[OrderStatus],
        untouched_for: timedelta,
        limit: int,
        lease_for: timedelta,
    ) -> Sequence[OrderRecord]:
        """See :meth:`MaintenanceStore.claim_orders_to_check`."""
        ...

    async def schedule_order_check(self, tenant: str, order_id: str, *, after: timedelta) -> None:
        """See :meth:`MaintenanceStore.schedule_order_check`."""
        ...

    async def claim_events_to_check(
        self,
        *,
        statuses: Sequence[InboxStatus],
        untouched_for: timedelta,
        limit: int,
        lease_for: timedelta,
    ) -> Sequence[InboxEvent]:
        """See :meth:`MaintenanceStore.claim_events_to_check`."""
        ...

    async def schedule_event_check(self, account: str, event_id: str, *, after: timedelta) -> None:
        """See :meth:`MaintenanceStore.schedule_event_check`."""
        ...

    async def order_counts(self) -> Mapping[OrderStatus, int]:
        """See :meth:`MaintenanceStore.order_counts`."""
        ...

    async def outbox_backlog(self) -> OutboxBacklog:
        """See :meth:`MaintenanceStore.outbox_backlog`."""
        ...

    async def requeue_dead_effects(self, *, limit: int) -> int:
        """See :meth:`MaintenanceStore.requeue_dead_effects`."""
        ...

    async def purge_events(self, *, older_than: timedelta, limit: int) -> int:
        """See :meth:`MaintenanceStore.purge_events`."""
        ...

    async def purge_effects(self, *, older_than: timedelta, limit: int) -> int:
        """See :meth:`MaintenanceStore.purge_effects`."""
        ...

    async def purge_journal(self, *, older_than: timedelta, limit: int) -> int:
        """See :meth:`MaintenanceStore.purge_journal`."""
        ...
