"""The rows idempay keeps besides idempotency records: orders, inbox events and outbox effects.

These are plain values exchanged with the stores (see :mod:`idempay.protocols`); every backend
stores and returns them unchanged.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from idempay.core.audit import GENESIS_HASH, AuditDraft, AuditSource, AuditStep
from idempay.core.orders import OrderState
from idempay.core.records import Lease

__all__ = [
    "AuditHead",
    "EventCommit",
    "EventReception",
    "InboxEvent",
    "InboxStatus",
    "JournalEntry",
    "NewEffect",
    "OrderRecord",
    "OutboxBacklog",
    "OutboxEntry",
    "OutboxStatus",
    "effect_dedup_key",
]


@dataclass(frozen=True, slots=True)
class OrderRecord:
    """An order as stored: its state machine state and the version used for compare-and-set.

    ``(tenant, order_id)`` is unique, and so is ``state.payment_intent_id`` when set: one order,
    one PaymentIntent.
    """

    tenant: str
    order_id: str
    state: OrderState
    version: int
    created_at: datetime
    updated_at: datetime


class InboxStatus(StrEnum):
    """What became of a received webhook event."""

    RECEIVED = "received"
    """Stored, not yet applied (being applied, or its worker died: reprocess it)."""
    PROCESSED = "processed"
    """Applied to its order (possibly as a no-op: stale, unchanged)."""
    IGNORED = "ignored"
    """A type idempay does not act upon; acknowledged."""
    ORPHAN = "orphan"
    """Its order does not exist (yet); kept and applied when the order appears."""
    FAILED = "failed"
    """Applying it raised; retried by the reconciler."""


@dataclass(frozen=True, slots=True)
class InboxEvent:
    """A webhook event as received, unique by ``(account, event_id)``.

    ``account`` is the Connect account id, or ``""`` for the platform's own events.
    ``payment_intent_id`` and ``order_id`` are the correlation hints read from the event.
    ``payload`` is the raw body exactly as signed.
    """

    account: str
    event_id: str
    type: str
    created: int
    payload: bytes
    received_at: datetime
    status: InboxStatus = InboxStatus.RECEIVED
    object_id: str | None = None
    payment_intent_id: str | None = None
    order_id: str | None = None
    attempts: int = 0
    processed_at: datetime | None = None
    error: str | None = None


class OutboxStatus(StrEnum):
    """Where an effect is in its delivery."""

    PENDING = "pending"
    DONE = "done"
    DEAD = "dead"
    """Failed more often than allowed; needs an operator (it is kept, never dropped)."""


def effect_dedup_key(tenant: str, order_id: str, effect: str, discriminator: str) -> str:
    """Return the stable key that identifies one effect for its whole life.

    The same effect of the same order always gets the same key, so an effect function can hand
    it to an e-mail provider or a fulfilment API as *their* idempotency key.
    """
    parts = (tenant, order_id, effect, discriminator)
    encoded = "\x1f".join(f"{len(p)}:{p}" for p in parts).encode()
    return "idempay-" + hashlib.sha256(encoded).hexdigest()[:40]


@dataclass(frozen=True, slots=True)
class NewEffect:
    """An effect to enqueue in the same transaction as the transition that justifies it.

    ``(tenant, order_id, effect, discriminator)`` is unique: enqueueing it again is a no-op.
    ``payload`` is JSON text with what the effect needs (no secrets, no card data).
    """

    tenant: str
    order_id: str
    effect: str
    discriminator: str
    payload: str = "{}"

    @property
    def dedup_key(self) -> str:
        """See :func:`effect_dedup_key`."""
        return effect_dedup_key(self.tenant, self.order_id, self.effect, self.discriminator)


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    """An enqueued effect. ``lease`` is set on entries handed to a dispatcher."""

    tenant: str
    order_id: str
    effect: str
    discriminator: str
    payload: str
    status: OutboxStatus
    attempts: int
    created_at: datetime
    next_attempt_at: datetime
    last_error: str | None = None
    lease: Lease | None = None

    @property
    def dedup_key(self) -> str:
        """See :func:`effect_dedup_key`."""
        return effect_dedup_key(self.tenant, self.order_id, self.effect, self.discriminator)


@dataclass(frozen=True, slots=True)
class AuditHead:
    """Where an order's audit trail ends: the last ``seq`` (0 for none) and its hash."""

    seq: int = 0
    hash: str = GENESIS_HASH


@dataclass(frozen=True, slots=True)
class EventReception:
    """What :meth:`~idempay.protocols.PaymentStore.receive_event` read, in one snapshot.

    ``event`` is the stored inbox row, or None when the event was never stored (a first
    delivery); ``order`` the order the event concerns, if it exists; ``audit_head`` the end of
    that order's trail. Receiving writes nothing: the inbox row is written by the commit.
    """

    event: InboxEvent | None
    order: OrderRecord | None
    audit_head: AuditHead

    @property
    def stored_status(self) -> InboxStatus | None:
        """The stored row's status, None if there is no row: a commit's ``expected_status``."""
        return None if self.event is None else self.event.status


@dataclass(frozen=True, slots=True)
class EventCommit:
    """Everything one webhook event changes, written by one atomic step.

    ``event`` is the event as received. Its inbox row is inserted, with ``status``, ``error``
    and ``order_id`` (one attempt), when ``expected_status`` is None and no row exists; when
    ``expected_status`` is a status, the existing row is updated (one more attempt) only if its
    status is still that one. Anything else means a concurrent delivery got there first: the
    commit is refused, writing nothing. ``order`` is the record read by ``receive_event`` and
    ``new_state`` its state after the transition (None: the order is not touched); ``audit``
    is appended after ``audit_head``; ``effects`` are enqueued (existing ones are left alone).
    """

    event: InboxEvent
    status: InboxStatus
    expected_status: InboxStatus | None
    audit_head: AuditHead
    order: OrderRecord | None = None
    new_state: OrderState | None = None
    audit: tuple[AuditDraft, ...] = ()
    effects: tuple[NewEffect, ...] = ()
    error: str | None = None
    order_id: str | None = None


@dataclass(frozen=True, slots=True)
class JournalEntry:
    """A decision of the guard that changed nothing: a duplicate delivery, a replayed checkout,
    a request in flight, a reused key, a refused webhook.

    Such decisions are not part of an order's hash-chained trail (they are not written in a
    transaction of their own on the request path); the engine journals them in batches, so
    that an order's history still shows every duplicate and replay. ``order_id`` is None for
    a decision about no known order (a forged webhook).
    """

    tenant: str
    order_id: str | None
    step: AuditStep
    source: AuditSource
    at: datetime
    event_id: str | None = None
    key_digest: str | None = None
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class OutboxBacklog:
    """How the outbox stands, for monitoring: ``pending`` effects (``due`` of them now, the
    oldest due since ``oldest_due_at``) and ``dead`` ones waiting for an operator."""

    pending: int
    due: int
    dead: int
    oldest_due_at: datetime | None
