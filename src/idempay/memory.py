"""In-memory backends: every protocol of :mod:`idempay.protocols`, for development and tests.

They keep the same guarantees as the database backends within one process: claims, fenced
writes and compare-and-set updates are atomic against other threads and asyncio tasks, and a
transaction that raises leaves nothing behind. They keep nothing across restarts and share
nothing between processes: use a database store for that.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Final, TypeVar
from weakref import WeakKeyDictionary

from idempay import _fused
from idempay._retry import DEFAULT_ATTEMPTS, retry, retry_async
from idempay.clock import Clock, SystemClock
from idempay.core.audit import GENESIS_HASH, AuditDraft, AuditEntry, seal
from idempay.core.keys import validate_key
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
    OutboxStatus,
)
from idempay.core.orders import OrderState, OrderStatus
from idempay.core.records import (
    Claimed,
    ClaimResult,
    Existing,
    IdempotencyRecord,
    Lease,
    RecordState,
    StoredResponse,
)
from idempay.errors import ConcurrentUpdateError, ConfigurationError, LeaseLostError, StoreError
from idempay.protocols import AsyncPaymentTransaction, PaymentTransaction

__all__ = [
    "AsyncMemoryIdempotencyStore",
    "AsyncMemoryLockProvider",
    "AsyncMemoryPaymentStore",
    "AsyncNoLockProvider",
    "MemoryIdempotencyStore",
    "MemoryLockProvider",
    "MemoryPaymentStore",
    "NoLockProvider",
]

_NO_WAIT: Final = timedelta(0)
T = TypeVar("T")
_K = TypeVar("_K")
_V = TypeVar("_V")


def _new_token() -> str:
    return secrets.token_hex(16)


def _positive(value: timedelta, name: str) -> None:
    if value <= timedelta(0):
        raise ConfigurationError(f"{name} must be positive")


def _not_negative(value: timedelta, name: str) -> None:
    if value < timedelta(0):
        raise ConfigurationError(f"{name} must not be negative")


class _TaskThreadLock:
    """Mutual exclusion across asyncio tasks and threads, without blocking an event loop.

    Tasks of one loop queue on an asyncio lock, so at most one of them per loop waits for the
    thread lock, and does so in a worker thread.
    """

    def __init__(self) -> None:
        self._thread_lock = threading.Lock()
        self._loop_locks: WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
            WeakKeyDictionary()
        )
        self._guard = threading.Lock()

    @asynccontextmanager
    async def hold(self) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        with self._guard:
            loop_lock = self._loop_locks.setdefault(loop, asyncio.Lock())
        async with loop_lock:
            if not self._thread_lock.acquire(blocking=False):
                waiter = asyncio.ensure_future(asyncio.to_thread(self._thread_lock.acquire))
                try:
                    await asyncio.shield(waiter)
                except asyncio.CancelledError:
                    # The worker thread still gets the lock: give it back as soon as it does.
                    waiter.add_done_callback(lambda _: self._thread_lock.release())
                    raise
            try:
                yield
            finally:
                self._thread_lock.release()


# --- locks -----------------------------------------------------------------------------------


class MemoryLockProvider:
    """Fenced, expiring locks within one process; thread-safe."""

    def __init__(self, *, clock: Clock | None = None) -> None:
        self._clock = clock or SystemClock()
        self._held: dict[str, Lease] = {}
        self._fences: dict[str, int] = {}
        self._changed = threading.Condition()

    def acquire(self, name: str, *, ttl: timedelta, wait: timedelta = _NO_WAIT) -> Lease | None:
        _positive(ttl, "ttl")
        deadline = time.monotonic() + max(wait, _NO_WAIT).total_seconds()
        with self._changed:
            while True:
                now = self._clock.now()
                current = self._held.get(name)
                if current is None or current.expires_at <= now:
                    fence = self._fences.get(name, 0) + 1
                    self._fences[name] = fence
                    lease = Lease(token=_new_token(), fence=fence, expires_at=now + ttl)
                    self._held[name] = lease
                    return lease
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                # Wake on a release, or when the holder's lease should have run out.
                expiry = (current.expires_at - now).total_seconds()
                self._changed.wait(min(remaining, max(expiry, 0.001)))

    def release(self, name: str, lease: Lease) -> bool:
        with self._changed:
            current = self._held.get(name)
            if current is None or current.token != lease.token:
                return False
            del self._held[name]
            self._changed.notify_all()
            return current.expires_at > self._clock.now()

    def extend(self, name: str, lease: Lease, *, ttl: timedelta) -> Lease | None:
        _positive(ttl, "ttl")
        with self._changed:
            now = self._clock.now()
            current = self._held.get(name)
            if current is None or current.token != lease.token or current.expires_at <= now:
                return None
            extended = replace(current, expires_at=now + ttl)
            self._held[name] = extended
            return extended


class AsyncMemoryLockProvider:
    """Async twin of :class:`MemoryLockProvider`; waiting never blocks the event loop."""

    def __init__(self, *, clock: Clock | None = None) -> None:
        self._sync = MemoryLockProvider(clock=clock)

    async def acquire(
        self, name: str, *, ttl: timedelta, wait: timedelta = _NO_WAIT
    ) -> Lease | None:
        if wait <= _NO_WAIT:
            return self._sync.acquire(name, ttl=ttl)
        return await asyncio.to_thread(self._sync.acquire, name, ttl=ttl, wait=wait)

    async def release(self, name: str, lease: Lease) -> bool:
        return self._sync.release(name, lease)

    async def extend(self, name: str, lease: Lease, *, ttl: timedelta) -> Lease | None:
        return self._sync.extend(name, lease, ttl=ttl)


class NoLockProvider:
    """The lock provider switched off: every acquire succeeds at once.

    idempay's guarantees do not depend on the lock, so this is always safe; it only means more
    contention on the database when duplicates arrive together.
    """

    def __init__(self, *, clock: Clock | None = None) -> None:
        self._clock = clock or SystemClock()

    def acquire(self, name: str, *, ttl: timedelta, wait: timedelta = _NO_WAIT) -> Lease | None:
        _positive(ttl, "ttl")
        return Lease(token=_new_token(), fence=0, expires_at=self._clock.now() + ttl)

    def release(self, name: str, lease: Lease) -> bool:
        return True

    def extend(self, name: str, lease: Lease, *, ttl: timedelta) -> Lease | None:
        _positive(ttl, "ttl")
        return replace(lease, expires_at=self._clock.now() + ttl)


class AsyncNoLockProvider:
    """Async twin of :class:`NoLockProvider`."""

    def __init__(self, *, clock: Clock | None = None) -> None:
        self._sync = NoLockProvider(clock=clock)

    async def acquire(
        self, name: str, *, ttl: timedelta, wait: timedelta = _NO_WAIT
    ) -> Lease | None:
        return self._sync.acquire(name, ttl=ttl, wait=wait)

    async def release(self, name: str, lease: Lease) -> bool:
        return self._sync.release(name, lease)

    async def extend(self, name: str, lease: Lease, *, ttl: timedelta) -> Lease | None:
        return self._sync.extend(name, lease, ttl=ttl)


# --- idempotency records ---------------------------------------------------------------------


class MemoryIdempotencyStore:
    """Idempotency records in a dict; every method is one locked section. Thread-safe."""

    def __init__(self, *, clock: Clock | None = None) -> None:
        self._clock = clock or SystemClock()
        self._records: dict[tuple[str, str], IdempotencyRecord] = {}
        self._lock = threading.Lock()

    def claim(
        self,
        scope: str,
        key: str,
        fingerprint: str,
        *,
        lease_for: timedelta,
        retain_for: timedelta,
    ) -> ClaimResult:
        validate_key(key)
        _positive(lease_for, "lease_for")
        _positive(retain_for, "retain_for")
        with self._lock:
            now = self._clock.now()
            record = self._records.get((scope, key))
            if record is None or record.expires_at <= now:
                lease = Lease(_new_token(), (record.fence if record else 0) + 1, now + lease_for)
                fresh = IdempotencyRecord(
                    scope=scope,
                    key=key,
                    fingerprint=fingerprint,
                    state=RecordState.IN_PROGRESS,
                    fence=lease.fence,
                    created_at=now,
                    expires_at=now + max(retain_for, lease_for),
                    lease=lease,
                )
                self._records[(scope, key)] = fresh
                return Claimed(record=fresh, lease=lease)
            takeover = record.state is RecordState.UNKNOWN or record.lease_expired(now)
            if record.fingerprint == fingerprint and takeover:
                lease = Lease(_new_token(), record.fence + 1, now + lease_for)
                taken = replace(
                    record,
                    state=RecordState.IN_PROGRESS,
                    fence=lease.fence,
                    lease=lease,
                    expires_at=max(record.expires_at, now + lease_for),
                )
                self._records[(scope, key)] = taken
                return Claimed(record=taken, lease=lease, resumed=True)
            return Existing(record=record)

    def _owned(self, scope: str, key: str, lease: Lease) -> IdempotencyRecord:
        record = self._records.get((scope, key))
        if (
            record is None
            or record.state is not RecordState.IN_PROGRESS
            or record.lease is None
            or record.lease.token != lease.token
            or record.fence != lease.fence
        ):
            raise LeaseLostError("the idempotency record is no longer held by this lease")
        return record

    def checkpoint(
        self,
        scope: str,
        key: str,
        lease: Lease,
        *,
        recovery_point: str,
        resource_id: str | None = None,
    ) -> None:
        with self._lock:
            record = self._owned(scope, key, lease)
            self._records[(scope, key)] = replace(
                record,
                recovery_point=recovery_point,
                resource_id=resource_id if resource_id is not None else record.resource_id,
            )

    def extend(self, scope: str, key: str, lease: Lease, *, lease_for: timedelta) -> Lease:
        _positive(lease_for, "lease_for")
        with self._lock:
            record = self._owned(scope, key, lease)
            now = self._clock.now()
            extended = replace(lease, expires_at=now + lease_for)
            self._records[(scope, key)] = replace(
                record, lease=extended, expires_at=max(record.expires_at, now + lease_for)
            )
            return extended

    def complete(
        self,
        scope: str,
        key: str,
        lease: Lease,
        response: StoredResponse,
        *,
        failed: bool = False,
    ) -> IdempotencyRecord:
        with self._lock:
            record = self._owned(scope, key, lease)
            done = replace(
                record,
                state=RecordState.FAILED if failed else RecordState.COMPLETED,
                lease=None,
                response=response,
            )
            self._records[(scope, key)] = done
            return done

    def release(self, scope: str, key: str, lease: Lease, *, discard: bool = False) -> None:
        with self._lock:
            record = self._owned(scope, key, lease)
            if discard:
                del self._records[(scope, key)]
            else:
                self._records[(scope, key)] = replace(record, state=RecordState.UNKNOWN, lease=None)

    def get(self, scope: str, key: str) -> IdempotencyRecord | None:
        with self._lock:
            record = self._records.get((scope, key))
            if record is None or record.expires_at <= self._clock.now():
                return None
            return record

    def purge_expired(self, *, limit: int = 1000) -> int:
        with self._lock:
            now = self._clock.now()
            expired = [k for k, r in self._records.items() if r.expires_at <= now][:limit]
            for k in expired:
                del self._records[k]
            return len(expired)


class AsyncMemoryIdempotencyStore:
    """Async twin of :class:`MemoryIdempotencyStore` (its sections never await)."""

    def __init__(self, *, clock: Clock | None = None) -> None:
        self._sync = MemoryIdempotencyStore(clock=clock)

    async def claim(
        self,
        scope: str,
        key: str,
        fingerprint: str,
        *,
        lease_for: timedelta,
        retain_for: timedelta,
    ) -> ClaimResult:
        return self._sync.claim(scope, key, fingerprint, lease_for=lease_for, retain_for=retain_for)

    async def checkpoint(
        self,
        scope: str,
        key: str,
        lease: Lease,
        *,
        recovery_point: str,
        resource_id: str | None = None,
    ) -> None:
        self._sync.checkpoint(
            scope, key, lease, recovery_point=recovery_point, resource_id=resource_id
        )

    async def extend(self, scope: str, key: str, lease: Lease, *, lease_for: timedelta) -> Lease:
        return self._sync.extend(scope, key, lease, lease_for=lease_for)

    async def complete(
        self,
        scope: str,
        key: str,
        lease: Lease,
        response: StoredResponse,
        *,
        failed: bool = False,
    ) -> IdempotencyRecord:
        return self._sync.complete(scope, key, lease, response, failed=failed)

    async def release(self, scope: str, key: str, lease: Lease, *, discard: bool = False) -> None:
        self._sync.release(scope, key, lease, discard=discard)

    async def get(self, scope: str, key: str) -> IdempotencyRecord | None:
        return self._sync.get(scope, key)

    async def purge_expired(self, *, limit: int = 1000) -> int:
        return self._sync.purge_expired(limit=limit)


# --- orders, inbox, audit, outbox ------------------------------------------------------------


class _Tables:
    """The rows of a memory payment store. Guarded by the owning store's lock."""

    def __init__(self) -> None:
        self.orders: dict[tuple[str, str], OrderRecord] = {}
        self.by_intent: dict[str, tuple[str, str]] = {}
        self.inbox: dict[tuple[str, str], InboxEvent] = {}
        self.audit: dict[tuple[str, str], tuple[AuditEntry, ...]] = {}
        self.outbox: dict[tuple[str, str, str, str], OutboxEntry] = {}
        self.journal: dict[tuple[str, str | None], list[JournalEntry]] = {}
        # The reconciler's next check of an order, of an inbox event (absent: never checked).
        self.order_checks: dict[tuple[str, str], datetime] = {}
        self.event_checks: dict[tuple[str, str], datetime] = {}

    def append_journal(self, entries: Sequence[JournalEntry]) -> None:
        for entry in entries:
            self.journal.setdefault((entry.tenant, entry.order_id), []).append(entry)

    def journal_for(self, tenant: str, order_id: str, limit: int) -> list[JournalEntry]:
        return list(self.journal.get((tenant, order_id), [])[:limit])


_MISSING: Final = object()


class _MemoryTransaction:
    """Writes straight into the tables and keeps an undo log for rollback."""

    def __init__(self, tables: _Tables, clock: Clock) -> None:
        self._t = tables
        self._clock = clock
        self._undo: list[Callable[[], None]] = []

    def _put(self, mapping: dict[_K, _V], key: _K, value: _V) -> None:
        old = mapping.get(key, _MISSING)

        def undo() -> None:
            if old is _MISSING:
                mapping.pop(key, None)
            else:
                mapping[key] = old  # type: ignore[assignment]  # old is a _V here

        self._undo.append(undo)
        mapping[key] = value

    def _drop(self, mapping: dict[_K, _V], key: _K) -> None:
        if key in mapping:
            old = mapping[key]
            self._undo.append(lambda: mapping.__setitem__(key, old))
            del mapping[key]

    def rollback(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()

    def now(self) -> datetime:
        return self._clock.now()

    def _check_intent(self, state: OrderState, owner: tuple[str, str]) -> None:
        intent = state.payment_intent_id
        if intent is not None and self._t.by_intent.get(intent, owner) != owner:
            raise ConcurrentUpdateError("this PaymentIntent already belongs to another order")

    def _index_intent(
        self, old: OrderState | None, new: OrderState, owner: tuple[str, str]
    ) -> None:
        if old is not None and old.payment_intent_id not in (None, new.payment_intent_id):
            self._drop(self._t.by_intent, old.payment_intent_id)
        if new.payment_intent_id is not None:
            self._put(self._t.by_intent, new.payment_intent_id, owner)

    def insert_order(
        self, tenant: str, order_id: str, state: OrderState
    ) -> tuple[OrderRecord, bool]:
        existing = self._t.orders.get((tenant, order_id))
        if existing is not None:
            return existing, False
        self._check_intent(state, (tenant, order_id))
        now = self.now()
        record = OrderRecord(tenant, order_id, state, version=1, created_at=now, updated_at=now)
        self._put(self._t.orders, (tenant, order_id), record)
        self._index_intent(None, state, (tenant, order_id))
        return record, True

    def get_order(self, tenant: str, order_id: str) -> OrderRecord | None:
        return self._t.orders.get((tenant, order_id))

    def find_order_by_payment_intent(self, payment_intent_id: str) -> OrderRecord | None:
        owner = self._t.by_intent.get(payment_intent_id)
        return None if owner is None else self._t.orders.get(owner)

    def update_order(self, record: OrderRecord, state: OrderState) -> OrderRecord:
        owner = (record.tenant, record.order_id)
        current = self._t.orders.get(owner)
        if current is None or current.version != record.version:
            raise ConcurrentUpdateError("the order changed since it was read")
        self._check_intent(state, owner)
        updated = replace(current, state=state, version=current.version + 1, updated_at=self.now())
        self._put(self._t.orders, owner, updated)
        self._index_intent(current.state, state, owner)
        return updated

    def insert_event(self, event: InboxEvent) -> tuple[InboxEvent, bool]:
        key = (event.account, event.event_id)
        existing = self._t.inbox.get(key)
        if existing is not None:
            return existing, False
        self._put(self._t.inbox, key, event)
        return event, True

    def get_event(self, account: str, event_id: str) -> InboxEvent | None:
        return self._t.inbox.get((account, event_id))

    def set_event_status(
        self,
        account: str,
        event_id: str,
        status: InboxStatus,
        *,
        error: str | None = None,
        order_id: str | None = None,
    ) -> InboxEvent:
        current = self._t.inbox.get((account, event_id))
        if current is None:
            raise StoreError("no such inbox event")
        finished = status in (InboxStatus.PROCESSED, InboxStatus.IGNORED)
        updated = replace(
            current,
            status=status,
            attempts=current.attempts + 1,
            error=error,
            order_id=order_id if order_id is not None else current.order_id,
            processed_at=self.now() if finished else current.processed_at,
        )
        self._put(self._t.inbox, (account, event_id), updated)
        return updated

    def orphans_for(
        self, *, payment_intent_id: str | None, order_id: str | None, limit: int = 100
    ) -> Sequence[InboxEvent]:
        def matches(e: InboxEvent) -> bool:
            return e.status is InboxStatus.ORPHAN and (
                (payment_intent_id is not None and e.payment_intent_id == payment_intent_id)
                or (order_id is not None and e.order_id == order_id)
            )

        found = sorted(
            (e for e in self._t.inbox.values() if matches(e)),
            key=lambda e: (e.created, e.received_at, e.event_id),
        )
        return found[:limit]

    def append_audit(self, draft: AuditDraft) -> AuditEntry:
        key = (draft.tenant, draft.order_id)
        trail = self._t.audit.get(key, ())
        prev_hash = trail[-1].hash if trail else GENESIS_HASH
        entry = seal(draft, seq=len(trail) + 1, prev_hash=prev_hash)
        self._put(self._t.audit, key, (*trail, entry))
        return entry

    def audit_trail(self, tenant: str, order_id: str) -> Sequence[AuditEntry]:
        return self._t.audit.get((tenant, order_id), ())

    def enqueue_effect(self, effect: NewEffect) -> bool:
        key = (effect.tenant, effect.order_id, effect.effect, effect.discriminator)
        if key in self._t.outbox:
            return False
        now = self.now()
        entry = OutboxEntry(
            tenant=effect.tenant,
            order_id=effect.order_id,
            effect=effect.effect,
            discriminator=effect.discriminator,
            payload=effect.payload,
            status=OutboxStatus.PENDING,
            attempts=0,
            created_at=now,
            next_attempt_at=now,
        )
        self._put(self._t.outbox, key, entry)
        return True


def _outbox_key(entry: OutboxEntry) -> tuple[str, str, str, str]:
    return (entry.tenant, entry.order_id, entry.effect, entry.discriminator)


class _MemoryOutbox:
    """The dispatcher's operations, shared by the sync and async stores."""

    def __init__(self, tables: _Tables, clock: Clock) -> None:
        self._t = tables
        self._clock = clock

    def claim_due(self, *, limit: int, lease_for: timedelta) -> list[OutboxEntry]:
        _positive(lease_for, "lease_for")
        now = self._clock.now()
        due = sorted(
            (
                e
                for e in self._t.outbox.values()
                if e.status is OutboxStatus.PENDING
                and e.next_attempt_at <= now
                and (e.lease is None or e.lease.expires_at <= now)
            ),
            key=lambda e: (e.next_attempt_at, e.created_at),
        )[: max(limit, 0)]
        claimed = []
        for entry in due:
            fence = (entry.lease.fence if entry.lease else 0) + 1
            leased = replace(
                entry,
                attempts=entry.attempts + 1,
                lease=Lease(token=_new_token(), fence=fence, expires_at=now + lease_for),
            )
            self._t.outbox[_outbox_key(entry)] = leased
            claimed.append(leased)
        return claimed

    def _owned(self, entry: OutboxEntry) -> OutboxEntry:
        current = self._t.outbox.get(_outbox_key(entry))
        if (
            current is None
            or current.lease is None
            or entry.lease is None
            or current.lease.token != entry.lease.token
        ):
            raise LeaseLostError("the outbox entry is no longer held by this dispatcher")
        return current

    def finish(self, entry: OutboxEntry) -> None:
        current = self._owned(entry)
        self._t.outbox[_outbox_key(entry)] = replace(
            current, status=OutboxStatus.DONE, lease=None, last_error=None
        )

    def fail(self, entry: OutboxEntry, *, error: str, retry_at: datetime | None) -> None:
        current = self._owned(entry)
        self._t.outbox[_outbox_key(entry)] = replace(
            current,
            status=OutboxStatus.DEAD if retry_at is None else OutboxStatus.PENDING,
            next_attempt_at=retry_at or current.next_attempt_at,
            lease=None,
            last_error=error,
        )

    def effects_for(self, tenant: str, order_id: str) -> list[OutboxEntry]:
        found = [e for e in self._t.outbox.values() if (e.tenant, e.order_id) == (tenant, order_id)]
        return sorted(found, key=lambda e: (e.created_at, e.effect, e.discriminator))


_SETTLED_EVENTS: Final = (InboxStatus.PROCESSED, InboxStatus.IGNORED, InboxStatus.ORPHAN)
_Row = TypeVar("_Row", OrderRecord, InboxEvent)


class _MemoryMaintenance:
    """The maintenance operations (reconciler claims, monitoring, purges), shared by the sync
    and async stores; each runs under the owning store's lock."""

    def __init__(self, tables: _Tables, clock: Clock) -> None:
        self._t = tables
        self._clock = clock

    def claim_orders(
        self,
        statuses: Sequence[OrderStatus],
        untouched_for: timedelta,
        limit: int,
        lease_for: timedelta,
    ) -> list[OrderRecord]:
        return self._claim(
            self._t.orders,
            self._t.order_checks,
            lambda o: o.state.status in statuses,
            lambda o: o.updated_at,
            untouched_for=untouched_for,
            limit=limit,
            lease_for=lease_for,
        )

    def claim_events(
        self,
        statuses: Sequence[InboxStatus],
        untouched_for: timedelta,
        limit: int,
        lease_for: timedelta,
    ) -> list[InboxEvent]:
        return self._claim(
            self._t.inbox,
            self._t.event_checks,
            lambda e: e.status in statuses,
            lambda e: e.received_at,
            untouched_for=untouched_for,
            limit=limit,
            lease_for=lease_for,
        )

    def _claim(
        self,
        rows: dict[tuple[str, str], _Row],
        checks: dict[tuple[str, str], datetime],
        wanted: Callable[[_Row], bool],
        changed: Callable[[_Row], datetime],
        *,
        untouched_for: timedelta,
        limit: int,
        lease_for: timedelta,
    ) -> list[_Row]:
        _positive(lease_for, "lease_for")
        _not_negative(untouched_for, "untouched_for")
        now = self._clock.now()
        due = []
        for key, row in rows.items():
            check = checks.get(key)
            if (
                wanted(row)
                and changed(row) <= now - untouched_for
                and (check is None or check <= now)
            ):
                # Never-checked rows first (False sorts first), then by check, then by change.
                due.append((check is not None, check or changed(row), changed(row), key))
        chosen = [key for *_, key in sorted(due)[: max(limit, 0)]]
        for key in chosen:
            checks[key] = now + lease_for
        return [rows[key] for key in chosen]

    def schedule_order(self, key: tuple[str, str], after: timedelta) -> None:
        _not_negative(after, "after")
        if key in self._t.orders:
            self._t.order_checks[key] = self._clock.now() + after

    def schedule_event(self, key: tuple[str, str], after: timedelta) -> None:
        _not_negative(after, "after")
        if key in self._t.inbox:
            self._t.event_checks[key] = self._clock.now() + after

    def order_counts(self) -> dict[OrderStatus, int]:
        counts: dict[OrderStatus, int] = {}
        for order in self._t.orders.values():
            counts[order.state.status] = counts.get(order.state.status, 0) + 1
        return counts

    def backlog(self) -> OutboxBacklog:
        now = self._clock.now()
        pending = [e for e in self._t.outbox.values() if e.status is OutboxStatus.PENDING]
        due = [e.next_attempt_at for e in pending if e.next_attempt_at <= now]
        dead = sum(e.status is OutboxStatus.DEAD for e in self._t.outbox.values())
        return OutboxBacklog(
            pending=len(pending), due=len(due), dead=dead, oldest_due_at=min(due, default=None)
        )

    def requeue_dead(self, limit: int) -> int:
        now = self._clock.now()
        dead = sorted(
            (e for e in self._t.outbox.values() if e.status is OutboxStatus.DEAD),
            key=lambda e: (e.next_attempt_at, e.created_at),
        )[: max(limit, 0)]
        for entry in dead:
            self._t.outbox[_outbox_key(entry)] = replace(
                entry, status=OutboxStatus.PENDING, attempts=0, next_attempt_at=now, lease=None
            )
        return len(dead)

    def purge_events(self, older_than: timedelta, limit: int) -> int:
        _not_negative(older_than, "older_than")
        cutoff = self._clock.now() - older_than
        doomed = [
            key
            for key, e in self._t.inbox.items()
            if e.status in _SETTLED_EVENTS and e.received_at <= cutoff
        ][: max(limit, 0)]
        for key in doomed:
            del self._t.inbox[key]
            self._t.event_checks.pop(key, None)
        return len(doomed)

    def purge_effects(self, older_than: timedelta, limit: int) -> int:
        _not_negative(older_than, "older_than")
        cutoff = self._clock.now() - older_than
        doomed = [
            key
            for key, e in self._t.outbox.items()
            if e.status is OutboxStatus.DONE and e.created_at <= cutoff
        ][: max(limit, 0)]
        for key in doomed:
            del self._t.outbox[key]
        return len(doomed)

    def purge_journal(self, older_than: timedelta, limit: int) -> int:
        _not_negative(older_than, "older_than")
        cutoff = self._clock.now() - older_than
        found = [
            (entry.at, key, i)
            for key, entries in self._t.journal.items()
            for i, entry in enumerate(entries)
            if entry.at <= cutoff
        ]
        found.sort(key=lambda item: item[0])  # oldest first, as the SQL store
        doomed: dict[tuple[str, str | None], set[int]] = {}
        for _, key, i in found[: max(limit, 0)]:
            doomed.setdefault(key, set()).add(i)
        for key, gone in doomed.items():
            kept = [e for i, e in enumerate(self._t.journal[key]) if i not in gone]
            if kept:
                self._t.journal[key] = kept
            else:
                del self._t.journal[key]
        return sum(len(gone) for gone in doomed.values())


class MemoryPaymentStore:
    """Orders, inbox, audit, outbox and journal in memory, with their maintenance (see
    :class:`~idempay.protocols.MaintenanceStore`). Thread-safe.

    Transactions are serialised (one at a time), which is the strictest isolation there is; a
    transaction whose block raises is rolled back entirely.
    """

    def __init__(self, *, clock: Clock | None = None) -> None:
        self._clock = clock or SystemClock()
        self._tables = _Tables()
        self._outbox = _MemoryOutbox(self._tables, self._clock)
        self._maintenance = _MemoryMaintenance(self._tables, self._clock)
        self._lock = threading.Lock()

    @contextmanager
    def transaction(self) -> Iterator[_MemoryTransaction]:
        with self._lock:
            tx = _MemoryTransaction(self._tables, self._clock)
            try:
                yield tx
            except BaseException:
                tx.rollback()
                raise

    def receive_event(
        self, event: InboxEvent, *, tenant: str | None = None, order_id: str | None = None
    ) -> EventReception:
        with self.transaction() as tx:
            return _fused.receive_event(tx, event, tenant=tenant, order_id=order_id)

    def commit_event(self, commit: EventCommit) -> OrderRecord | None:
        with self.transaction() as tx:
            return _fused.commit_event(tx, commit)

    def run_transaction(
        self, work: Callable[[PaymentTransaction], T], *, attempts: int = DEFAULT_ATTEMPTS
    ) -> T:
        def once() -> T:
            with self.transaction() as tx:
                return work(tx)

        return retry(once, attempts=attempts)

    def claim_due_effects(self, *, limit: int, lease_for: timedelta) -> Sequence[OutboxEntry]:
        with self._lock:
            return self._outbox.claim_due(limit=limit, lease_for=lease_for)

    def finish_effect(self, entry: OutboxEntry) -> None:
        with self._lock:
            self._outbox.finish(entry)

    def fail_effect(self, entry: OutboxEntry, *, error: str, retry_at: datetime | None) -> None:
        with self._lock:
            self._outbox.fail(entry, error=error, retry_at=retry_at)

    def effects_for(self, tenant: str, order_id: str) -> Sequence[OutboxEntry]:
        with self._lock:
            return self._outbox.effects_for(tenant, order_id)

    def append_journal(self, entries: Sequence[JournalEntry]) -> None:
        with self._lock:
            self._tables.append_journal(entries)

    def journal_for(
        self, tenant: str, order_id: str, *, limit: int = 1000
    ) -> Sequence[JournalEntry]:
        with self._lock:
            return self._tables.journal_for(tenant, order_id, limit)

    def claim_orders_to_check(
        self,
        *,
        statuses: Sequence[OrderStatus],
        untouched_for: timedelta,
        limit: int,
        lease_for: timedelta,
    ) -> Sequence[OrderRecord]:
        with self._lock:
            return self._maintenance.claim_orders(statuses, untouched_for, limit, lease_for)

    def schedule_order_check(self, tenant: str, order_id: str, *, after: timedelta) -> None:
        with self._lock:
            self._maintenance.schedule_order((tenant, order_id), after)

    def claim_events_to_check(
        self,
        *,
        statuses: Sequence[InboxStatus],
        untouched_for: timedelta,
        limit: int,
        lease_for: timedelta,
    ) -> Sequence[InboxEvent]:
        with self._lock:
            return self._maintenance.claim_events(statuses, untouched_for, limit, lease_for)

    def schedule_event_check(self, account: str, event_id: str, *, after: timedelta) -> None:
        with self._lock:
            self._maintenance.schedule_event((account, event_id), after)

    def order_counts(self) -> Mapping[OrderStatus, int]:
        with self._lock:
            return self._maintenance.order_counts()

    def outbox_backlog(self) -> OutboxBacklog:
        with self._lock:
            return self._maintenance.backlog()

    def requeue_dead_effects(self, *, limit: int) -> int:
        with self._lock:
            return self._maintenance.requeue_dead(limit)

    def purge_events(self, *, older_than: timedelta, limit: int) -> int:
        with self._lock:
            return self._maintenance.purge_events(older_than, limit)

    def purge_effects(self, *, older_than: timedelta, limit: int) -> int:
        with self._lock:
            return self._maintenance.purge_effects(older_than, limit)

    def purge_journal(self, *, older_than: timedelta, limit: int) -> int:
        with self._lock:
            return self._maintenance.purge_journal(older_than, limit)


class _AsyncMemoryTransaction:
    """Async face of a :class:`_MemoryTransaction` (its operations never await)."""

    def __init__(self, tx: _MemoryTransaction) -> None:
        self._tx = tx

    def now(self) -> datetime:
        return self._tx.now()

    async def insert_order(
        self, tenant: str, order_id: str, state: OrderState
    ) -> tuple[OrderRecord, bool]:
        return self._tx.insert_order(tenant, order_id, state)

    async def get_order(self, tenant: str, order_id: str) -> OrderRecord | None:
        return self._tx.get_order(tenant, order_id)

    async def find_order_by_payment_intent(self, payment_intent_id: str) -> OrderRecord | None:
        return self._tx.find_order_by_payment_intent(payment_intent_id)

    async def update_order(self, record: OrderRecord, state: OrderState) -> OrderRecord:
        return self._tx.update_order(record, state)

    async def insert_event(self, event: InboxEvent) -> tuple[InboxEvent, bool]:
        return self._tx.insert_event(event)

    async def get_event(self, account: str, event_id: str) -> InboxEvent | None:
        return self._tx.get_event(account, event_id)

    async def set_event_status(
        self,
        account: str,
        event_id: str,
        status: InboxStatus,
        *,
        error: str | None = None,
        order_id: str | None = None,
    ) -> InboxEvent:
        return self._tx.set_event_status(account, event_id, status, error=error, order_id=order_id)

    async def orphans_for(
        self, *, payment_intent_id: str | None, order_id: str | None, limit: int = 100
    ) -> Sequence[InboxEvent]:
        return self._tx.orphans_for(
            payment_intent_id=payment_intent_id, order_id=order_id, limit=limit
        )

    async def append_audit(self, draft: AuditDraft) -> AuditEntry:
        return self._tx.append_audit(draft)

    async def audit_trail(self, tenant: str, order_id: str) -> Sequence[AuditEntry]:
        return self._tx.audit_trail(tenant, order_id)

    async def enqueue_effect(self, effect: NewEffect) -> bool:
        return self._tx.enqueue_effect(effect)


class AsyncMemoryPaymentStore:
    """Async twin of :class:`MemoryPaymentStore`; safe across tasks and threads."""

    def __init__(self, *, clock: Clock | None = None) -> None:
        self._clock = clock or SystemClock()
        self._tables = _Tables()
        self._outbox = _MemoryOutbox(self._tables, self._clock)
        self._maintenance = _MemoryMaintenance(self._tables, self._clock)
        self._lock = _TaskThreadLock()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[_AsyncMemoryTransaction]:
        async with self._lock.hold():
            tx = _MemoryTransaction(self._tables, self._clock)
            try:
                yield _AsyncMemoryTransaction(tx)
            except BaseException:
                tx.rollback()
                raise

    async def receive_event(
        self, event: InboxEvent, *, tenant: str | None = None, order_id: str | None = None
    ) -> EventReception:
        async with self._lock.hold():
            tx = _MemoryTransaction(self._tables, self._clock)
            try:
                return _fused.receive_event(tx, event, tenant=tenant, order_id=order_id)
            except BaseException:
                tx.rollback()
                raise

    async def commit_event(self, commit: EventCommit) -> OrderRecord | None:
        async with self._lock.hold():
            tx = _MemoryTransaction(self._tables, self._clock)
            try:
                return _fused.commit_event(tx, commit)
            except BaseException:
                tx.rollback()
                raise

    async def run_transaction(
        self,
        work: Callable[[AsyncPaymentTransaction], Awaitable[T]],
        *,
        attempts: int = DEFAULT_ATTEMPTS,
    ) -> T:
        async def once() -> T:
            async with self.transaction() as tx:
                return await work(tx)

        return await retry_async(once, attempts=attempts)

    async def claim_due_effects(self, *, limit: int, lease_for: timedelta) -> Sequence[OutboxEntry]:
        async with self._lock.hold():
            return self._outbox.claim_due(limit=limit, lease_for=lease_for)

    async def finish_effect(self, entry: OutboxEntry) -> None:
        async with self._lock.hold():
            self._outbox.finish(entry)

    async def fail_effect(
        self, entry: OutboxEntry, *, error: str, retry_at: datetime | None
    ) -> None:
        async with self._lock.hold():
            self._outbox.fail(entry, error=error, retry_at=retry_at)

    async def effects_for(self, tenant: str, order_id: str) -> Sequence[OutboxEntry]:
        async with self._lock.hold():
            return self._outbox.effects_for(tenant, order_id)

    async def append_journal(self, entries: Sequence[JournalEntry]) -> None:
        async with self._lock.hold():
            self._tables.append_journal(entries)

    async def journal_for(
        self, tenant: str, order_id: str, *, limit: int = 1000
    ) -> Sequence[JournalEntry]:
        async with self._lock.hold():
            return self._tables.journal_for(tenant, order_id, limit)

    async def claim_orders_to_check(
        self,
        *,
        statuses: Sequence[OrderStatus],
        untouched_for: timedelta,
        limit: int,
        lease_for: timedelta,
    ) -> Sequence[OrderRecord]:
        async with self._lock.hold():
            return self._maintenance.claim_orders(statuses, untouched_for, limit, lease_for)

    async def schedule_order_check(self, tenant: str, order_id: str, *, after: timedelta) -> None:
        async with self._lock.hold():
            self._maintenance.schedule_order((tenant, order_id), after)

    async def claim_events_to_check(
        self,
        *,
        statuses: Sequence[InboxStatus],
        untouched_for: timedelta,
        limit: int,
        lease_for: timedelta,
    ) -> Sequence[InboxEvent]:
        async with self._lock.hold():
            return self._maintenance.claim_events(statuses, untouched_for, limit, lease_for)

    async def schedule_event_check(self, account: str, event_id: str, *, after: timedelta) -> None:
        async with self._lock.hold():
            self._maintenance.schedule_event((account, event_id), after)

    async def order_counts(self) -> Mapping[OrderStatus, int]:
        async with self._lock.hold():
            return self._maintenance.order_counts()

    async def outbox_backlog(self) -> OutboxBacklog:
        async with self._lock.hold():
            return self._maintenance.backlog()

    async def requeue_dead_effects(self, *, limit: int) -> int:
        async with self._lock.hold():
            return self._maintenance.requeue_dead(limit)

    async def purge_events(self, *, older_than: timedelta, limit: int) -> int:
        async with self._lock.hold():
            return self._maintenance.purge_events(older_than, limit)

    async def purge_effects(self, *, older_than: timedelta, limit: int) -> int:
        async with self._lock.hold():
            return self._maintenance.purge_effects(older_than, limit)

    async def purge_journal(self, *, older_than: timedelta, limit: int) -> int:
        async with self._lock.hold():
            return self._maintenance.purge_journal(older_than, limit)
