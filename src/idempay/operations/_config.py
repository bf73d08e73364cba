"""The reconciler's and the purge's options: frozen values, checked when built."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Final

from idempay.core.models import InboxStatus
from idempay.core.orders import OrderStatus
from idempay.errors import ConfigurationError

__all__ = [
    "BACKFILL_EVENT_TYPES",
    "MIN_EVENT_RETENTION",
    "MIN_JOURNAL_RETENTION",
    "UNRESOLVED_EVENTS",
    "UNSETTLED_STATUSES",
    "WAITING_STATUSES",
    "ReconcileConfig",
    "Retention",
]

WAITING_STATUSES: Final = (
    OrderStatus.CREATED,
    OrderStatus.AWAITING_PAYMENT,
    OrderStatus.ACTION_REQUIRED,
    OrderStatus.PAYMENT_FAILED,
)
"""The statuses of an order that waits for its customer (to pay, to authenticate, to try
again after a failure). ``created`` also covers checkouts that died, or got no clear answer,
around their Stripe call."""

UNSETTLED_STATUSES: Final = (*WAITING_STATUSES, OrderStatus.PROCESSING, OrderStatus.AUTHORIZED)
"""The statuses whose outcome is still open at Stripe: the reconciler checks these orders."""

UNRESOLVED_EVENTS: Final = (InboxStatus.ORPHAN, InboxStatus.FAILED, InboxStatus.RECEIVED)
"""Inbox events not applied to an order yet."""

BACKFILL_EVENT_TYPES: Final = (
    "payment_intent.succeeded",
    "payment_intent.payment_failed",
    "payment_intent.processing",
    "payment_intent.requires_action",
    "payment_intent.canceled",
    "payment_intent.amount_capturable_updated",
    "charge.pending",
    "charge.failed",
    "charge.refunded",
    "charge.dispute.created",
    "charge.dispute.updated",
    "charge.dispute.closed",
    "checkout.session.completed",
    "checkout.session.async_payment_succeeded",
    "checkout.session.async_payment_failed",
    "checkout.session.expired",
)
"""The event types the backfill asks Stripe for (Stripe takes up to 20): those that move an
order; the rest would only be stored and ignored."""

MIN_EVENT_RETENTION: Final = timedelta(days=3)
"""Stripe retries a webhook for up to three days: an inbox row purged sooner could let a late
retry through as new (harmless to the order, which the state machine guards, but no longer
recognised as a duplicate)."""

MIN_JOURNAL_RETENTION: Final = timedelta(days=1)


@dataclass(frozen=True, slots=True, kw_only=True)
class ReconcileConfig:
    """How a reconciler run behaves.

    Attributes:
        older_than: an order (or an inbox event) is checked once it has not changed for
            this long; zero checks every unsettled one at once.
        statuses: the order statuses to check (default :data:`UNSETTLED_STATUSES`).
        max_orders: the most orders one run checks (bounded work: Stripe rate-limits).
        max_events: the most unresolved inbox events one run looks at.
        batch: rows claimed at a time.
        lease: how long a claimed row is kept from other reconcilers while this one works.
        recheck_min: the shortest wait before an order or event is checked again.
        recheck_max: the longest; in between, the wait grows with the row's age (a quarter
            of it), so a bank debit processing for a week is asked about every few hours,
            not at every run.
        abandoned_after: an order that Stripe still shows waiting for its customer (see
            :data:`WAITING_STATUSES`) this long after its creation is checked no more: a late
            payment still reaches it by webhook or by the backfill. Orders processing or
            authorized are checked however old (a bank debit's outcome comes days later).
        backfill: also ask Stripe for the events its webhooks have not delivered yet
            (``delivery_success=false``) and apply them.
        backfill_window: how far back the backfill looks (Stripe keeps events 30 days).
        backfill_pages: the most pages of 100 events one backfill reads.
    """

    older_than: timedelta = timedelta(minutes=15)
    statuses: tuple[OrderStatus, ...] = UNSETTLED_STATUSES
    max_orders: int = 500
    max_events: int = 500
    batch: int = 50
    lease: timedelta = timedelta(minutes=5)
    recheck_min: timedelta = timedelta(minutes=5)
    recheck_max: timedelta = timedelta(hours=6)
    abandoned_after: timedelta = timedelta(days=30)
    backfill: bool = True
    backfill_window: timedelta = timedelta(days=7)
    backfill_pages: int = 10

    def __post_init__(self) -> None:
        if self.older_than < timedelta(0):
            raise ConfigurationError("older_than cannot be negative")
        if self.max_orders < 0 or self.max_events < 0 or self.backfill_pages < 0:
            raise ConfigurationError("max_orders, max_events and backfill_pages cannot be negative")
        if self.batch < 1:
            raise ConfigurationError("batch must be at least 1")
        if min(self.lease, self.backfill_window, self.abandoned_after) <= timedelta(0):
            raise ConfigurationError("lease, backfill_window and abandoned_after must be positive")
        if not timedelta(0) <= self.recheck_min <= self.recheck_max:
            raise ConfigurationError("recheck_min must be between zero and recheck_max")
        if not self.statuses or any(s not in UNSETTLED_STATUSES for s in self.statuses):
            # Settled orders (paid, refunded, needs_review...) are not the reconciler's: a
            # refund or a dispute reaches them by event or by the backfill.
            raise ConfigurationError("statuses must be among the unsettled statuses")

    def recheck_after(self, age: timedelta) -> timedelta:
        """The wait before a row of this ``age`` is checked again."""
        return min(self.recheck_max, max(self.recheck_min, age / 4))


@dataclass(frozen=True, slots=True, kw_only=True)
class Retention:
    """How long :func:`~idempay.operations.purge` keeps what it may delete.

    Idempotency records are deleted once their own expiry passed (``GuardConfig.retain``,
    at least 24 hours); orders and their audit trails are never deleted.

    Attributes:
        events: inbox events processed, ignored or orphaned longer ago than this (at least
            three days: Stripe's retry period).
        effects: effects done longer ago than this (pending and dead ones are kept).
        journal: journal entries older than this.
        batch: rows deleted per statement (short statements keep locks short).
    """

    events: timedelta = timedelta(days=30)
    effects: timedelta = timedelta(days=30)
    journal: timedelta = timedelta(days=90)
    batch: int = 1000

    def __post_init__(self) -> None:
        if self.events < MIN_EVENT_RETENTION or self.effects < MIN_EVENT_RETENTION:
            raise ConfigurationError("events and effects are kept at least 3 days")
        if self.journal < MIN_JOURNAL_RETENTION:
            raise ConfigurationError("journal entries are kept at least 1 day")
        if self.batch < 1:
            raise ConfigurationError("batch must be at least 1")
