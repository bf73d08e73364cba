"""The reconciler and the purge (async source; the sync twin is generated).

Webhooks arrive at least once, but sometimes never: an outage longer than Stripe's three days
of retries, an endpoint disabled, a checkout that died between its Stripe call and its commit.
The reconciler makes up for all of them from Stripe's own records, through the same state
machine as the webhooks, so that no order is ever lost and none is changed twice.
"""

from __future__ import annotations

import asyncio  # unasync: remove
import contextlib
import logging
from collections.abc import (
    Awaitable,  # unasync: remove
    Callable,
    Sequence,
)

# import threading  # unasync: sync-only
from datetime import datetime, timedelta
from typing import Final, Protocol, TypeVar

from idempay.core.audit import AuditSource
from idempay.core.events import parse_event
from idempay.core.models import InboxEvent, OrderRecord
from idempay.core.orders import moved
from idempay.engine import AsyncGuard, WebhookOutcome
from idempay.errors import (
    ConfigurationError,
    IdempayError,
    OrderNotFoundError,
    PaymentOutcomeUnknownError,
    PaymentProviderError,
    StoreError,
)
from idempay.gateway import AsyncStripeGateway
from idempay.observability import notify_orders, notify_outbox, notify_reconciled, operation
from idempay.operations._config import (
    BACKFILL_EVENT_TYPES,
    UNRESOLVED_EVENTS,
    WAITING_STATUSES,
    ReconcileConfig,
    Retention,
)
from idempay.operations._report import Checked, OrderCheck, Progress, PurgeReport, ReconcileReport
from idempay.protocols import AsyncIdempotencyStore, AsyncMaintenanceStore

__all__ = ["AsyncReconciler", "async_purge"]

logger = logging.getLogger(__name__)

R = TypeVar("R", OrderRecord, InboxEvent)

_PARKED: Final = timedelta(days=36500)
"""The next check of an abandoned order: never, in practice."""


def _quiet(_stage: str, _done: int, _total: int | None) -> None:
    return None


class AsyncReconciler:
    """Checks unsettled orders and unresolved events against Stripe, and applies what it finds.

    Args:
        guard: the application's guard, with its gateway and *its effects registered*: an
            order the reconciler pays gets the same effects (receipt, fulfilment) as one paid
            by a webhook, enqueued in the same transaction.
        config: what to check and how much per run.

    Guarantees of :meth:`run_once`:
        - every change goes through the order's state machine with source ``reconciler``,
          compare-and-set, audited, with its effects: a missed webhook is made up for once,
          and a webhook arriving meanwhile cannot make it happen twice;
        - nothing is created, confirmed, captured or canceled at Stripe: a bank debit still
          processing stays processing, however old;
        - several reconcilers may run at once: a claimed order or event is leased to one of
          them (``config.lease``), and even a row checked twice changes nothing twice;
        - the work is bounded (``max_orders``, ``max_events``, ``backfill_pages``) and each
          row is checked again only after a wait that grows with its age;
        - a failure on one row (Stripe or the store) is counted and the run goes on; the row
          is checked again at a later run.
    """

    def __init__(self, guard: AsyncGuard, *, config: ReconcileConfig | None = None) -> None:
        if guard.gateway is None:
            raise ConfigurationError("the reconciler needs the guard's Stripe gateway")
        if not isinstance(guard.payments, AsyncMaintenanceStore):
            raise ConfigurationError("the guard's payment store cannot be reconciled")
        self.guard = guard
        self.gateway: AsyncStripeGateway = guard.gateway
        self.store: AsyncMaintenanceStore = guard.payments
        self.config = config or ReconcileConfig()

    async def run_once(self, *, progress: Progress | None = None) -> ReconcileReport:
        """Check what is due, apply what Stripe says, and report; see the class's guarantees."""
        report = ReconcileReport()
        tick = progress or _quiet
        with operation("reconcile") as op:
            await self._orders(report, tick)
            await self._events(report, tick)
            if self.config.backfill and self.config.backfill_pages:
                await self._backfill(report, tick)
            await self.guard.flush_journal()
            report.orders = dict(await self.store.order_counts())
            report.outbox = await self.store.outbox_backlog()
            op.outcome = "error" if report.errors else "ok"
        notify_orders(report.orders)
        notify_outbox(report.outbox)
        return report

    async def run_forever(
        self,
        stop: asyncio.Event,  # unasync: remove
        # stop: threading.Event,  # unasync: sync-only
        *,
        interval: timedelta = timedelta(minutes=1),
        progress: Progress | None = None,
    ) -> None:
        """Run :meth:`run_once` every ``interval`` until ``stop`` is set.

        A failed run (the database or Stripe unreachable) is logged and the loop goes on.
        """
        while not stop.is_set():
            try:
                report = await self.run_once(progress=progress)
            except IdempayError:
                logger.exception("a reconciliation run failed; trying again at the next one")
            else:
                logger.info(
                    "reconciled: %d orders checked, %d changed, %d errors",
                    len(report.checks),
                    report.count(Checked.CHANGED),
                    report.errors,
                )
            await _wait(stop, interval.total_seconds())

    # --- orders ---------------------------------------------------------------------------

    async def _orders(self, report: ReconcileReport, tick: Progress) -> None:
        cfg = self.config

        async def claim(limit: int) -> Sequence[OrderRecord]:
            return await self.store.claim_orders_to_check(
                statuses=cfg.statuses,
                untouched_for=cfg.older_than,
                limit=limit,
                lease_for=cfg.lease,
            )

        async def check(order: OrderRecord) -> None:
            report.checks.append(await self.check_order(order))

        async def wait(order: OrderRecord) -> None:
            await self._schedule_order(order, self._recheck(order.created_at))

        def key(order: OrderRecord) -> tuple[str, str]:
            return order.tenant, order.order_id

        await _sweep(
            "orders", cfg.max_orders, cfg.batch, tick, claim=claim, key=key, visit=check, wait=wait
        )

    async def check_order(self, order: OrderRecord) -> OrderCheck:
        """Check one order against Stripe, apply what it says, and schedule its next check."""
        before = order.state.status
        with operation("reconcile_order") as op:
            try:
                updated = await self.guard.refresh_order(
                    order.order_id, tenant=order.tenant, source=AuditSource.RECONCILER
                )
            except (
                PaymentProviderError,
                PaymentOutcomeUnknownError,
                StoreError,
                OrderNotFoundError,
            ) as error:
                # One order's failure (unknown outcome included) must not stop the run.
                logger.warning("an order could not be reconciled: %s", type(error).__name__)
                op.outcome = Checked.ERROR.value
                check = OrderCheck(
                    order.tenant,
                    order.order_id,
                    before,
                    before,
                    Checked.ERROR,
                    type(error).__name__,
                )
                await self._schedule_order(order, self.config.recheck_min)
                notify_reconciled(check.result.value, 1)
                return check
            if moved(order.state, updated.state):
                result = Checked.CHANGED
            elif updated.state.payment_intent_id is None:
                result = Checked.NO_PAYMENT
            else:
                result = Checked.UNCHANGED
            op.outcome = result.value
        if result is Checked.CHANGED:
            logger.warning(
                "reconciled an order that webhooks had not updated: %s -> %s",
                before.value,
                updated.state.status.value,
            )
        after = self._recheck(order.created_at)
        if (
            updated.state.status in WAITING_STATUSES
            and self.guard.clock.now() - order.created_at > self.config.abandoned_after
        ):
            # Still waiting for its customer at Stripe too, after all this time: parked. Its
            # next check is put out of reach rather than its row touched otherwise.
            after = _PARKED
            if result is not Checked.CHANGED:
                result = Checked.ABANDONED
        await self._schedule_order(order, after)
        notify_reconciled(result.value, 1)
        return OrderCheck(order.tenant, order.order_id, before, updated.state.status, result)

    def _recheck(self, since: datetime) -> timedelta:
        """The wait before the next check of a row that exists ``since``."""
        return self.config.recheck_after(self.guard.clock.now() - since)

    async def _schedule_order(self, order: OrderRecord, after: timedelta) -> None:
        with contextlib.suppress(StoreError):
            # Best effort: should it fail, the claim's lease already keeps the order a while.
            await self.store.schedule_order_check(order.tenant, order.order_id, after=after)

    # --- inbox events ---------------------------------------------------------------------

    async def _events(self, report: ReconcileReport, tick: Progress) -> None:
        cfg = self.config

        async def claim(limit: int) -> Sequence[InboxEvent]:
            return await self.store.claim_events_to_check(
                statuses=UNRESOLVED_EVENTS,
                untouched_for=cfg.older_than,
                limit=limit,
                lease_for=cfg.lease,
            )

        async def resolve(inbox: InboxEvent) -> None:
            outcome = await self._resolve(inbox)
            report.events[outcome] += 1
            notify_reconciled(f"event_{outcome}", 1)

        async def wait(inbox: InboxEvent) -> None:
            await self._schedule_event(inbox, self._recheck(inbox.received_at))

        def key(inbox: InboxEvent) -> tuple[str, str]:
            return inbox.account, inbox.event_id

        await _sweep(
            "events",
            cfg.max_events,
            cfg.batch,
            tick,
            claim=claim,
            key=key,
            visit=resolve,
            wait=wait,
        )

    async def _resolve(self, inbox: InboxEvent) -> str:
        """Apply a kept event again; if its order is still unknown, ask Stripe which order its
        PaymentIntent belongs to (a checkout that died before recording it) and bring that
        order up to date, which applies the event too."""
        guard = self.guard
        try:
            event = parse_event(inbox.payload, limits=guard.config.json_limits)
            outcome = await guard.process_event(event, inbox.payload, source=AuditSource.RECONCILER)
            if outcome is WebhookOutcome.ORPHANED and inbox.payment_intent_id is not None:
                intent = await self.gateway.retrieve_payment_intent(inbox.payment_intent_id)
                order_id = intent.metadata.get(guard.config.order_metadata_key)
                tenant = intent.metadata.get(guard.config.tenant_metadata_key, "")
                if order_id is not None:
                    with contextlib.suppress(OrderNotFoundError):
                        await guard.refresh_order(order_id, tenant=tenant)
                        outcome = WebhookOutcome.APPLIED
        except IdempayError as error:
            logger.warning("a kept event could not be applied: %s", type(error).__name__)
            await self._schedule_event(inbox, self.config.recheck_min)
            return "error"
        if outcome is WebhookOutcome.ORPHANED:
            await self._schedule_event(inbox, self._recheck(inbox.received_at))
        return outcome.value

    async def _schedule_event(self, inbox: InboxEvent, after: timedelta) -> None:
        with contextlib.suppress(StoreError):
            await self.store.schedule_event_check(inbox.account, inbox.event_id, after=after)

    # --- backfill -------------------------------------------------------------------------

    async def _backfill(self, report: ReconcileReport, tick: Progress) -> None:
        """Apply the events Stripe has not delivered to every endpoint yet: those of an
        outage longer than its retries, or of an endpoint that was disabled."""
        guard = self.guard
        since = guard.clock.now() - self.config.backfill_window
        tick("backfill", 0, None)
        try:
            bodies = await self.gateway.list_undelivered_events(
                types=BACKFILL_EVENT_TYPES,
                created_after=int(since.timestamp()),
                max_pages=self.config.backfill_pages,
            )
        except (PaymentProviderError, PaymentOutcomeUnknownError) as error:
            logger.warning("the backfill could not list events: %s", type(error).__name__)
            report.backfill["error"] += 1
            return
        for done, raw in enumerate(bodies, start=1):
            try:
                event = parse_event(
                    raw, limits=guard.config.json_limits, livemode=guard.config.livemode
                )
                applied = await guard.process_event(event, raw, source=AuditSource.RECONCILER)
                outcome = applied.value
            except IdempayError as error:
                logger.warning("an event could not be backfilled: %s", type(error).__name__)
                outcome = "error"
            report.backfill[outcome] += 1
            if outcome != WebhookOutcome.DUPLICATE.value:
                notify_reconciled(f"backfill_{outcome}", 1)
            tick("backfill", done, len(bodies))


async def _sweep(
    stage: str,
    maximum: int,
    batch: int,
    tick: Progress,
    *,
    claim: Callable[[int], Awaitable[Sequence[R]]],  # unasync: remove
    # claim: Callable[[int], Sequence[R]],  # unasync: sync-only
    key: Callable[[R], tuple[str, str]],
    visit: Callable[[R], Awaitable[None]],  # unasync: remove
    # visit: Callable[[R], None],  # unasync: sync-only
    wait: Callable[[R], Awaitable[None]],  # unasync: remove
    # wait: Callable[[R], None],  # unasync: sync-only
) -> None:
    """Claim rows ``batch`` at a time and ``visit`` each once, up to ``maximum`` in all.

    A row claimed again in the same run (due again at once: a zero ``recheck_min``) is given
    back to ``wait`` for the next run. The sweep stops on a short claim too: it may also mean
    that another reconciler's claim held some rows for an instant (SKIP LOCKED), which that
    reconciler checks, or the next run.
    """
    done = 0
    seen: set[tuple[str, str]] = set()
    tick(stage, done, None)
    while done < maximum:
        claimed = await claim(min(batch, maximum - done))
        fresh = [row for row in claimed if key(row) not in seen]
        for row in claimed:
            if key(row) in seen:
                await wait(row)
        for row in fresh:
            seen.add(key(row))
            await visit(row)
            done += 1
            tick(stage, done, None)
        if len(claimed) < batch or not fresh:
            return


async def async_purge(
    payments: AsyncMaintenanceStore,
    *,
    records: AsyncIdempotencyStore | None = None,
    retention: Retention | None = None,
    progress: Progress | None = None,
) -> PurgeReport:
    """Delete what has outlived its retention, in short batches; return the counts.

    Idempotency records go once their own expiry has passed (``GuardConfig.retain``, at least
    24 hours); inbox events processed, ignored or orphaned, done effects and journal entries
    once older than ``retention`` says (events at least three days). Orders, audit trails,
    pending and dead effects and unresolved events are never deleted. Safe to run anywhere,
    any number of times, alongside the application.
    """
    keep = retention or Retention()
    tick = progress or _quiet
    report = PurgeReport()
    if records is not None:
        report.records = await _drain("records", tick, keep.batch, records.purge_expired)

    async def events(*, limit: int) -> int:
        return await payments.purge_events(older_than=keep.events, limit=limit)

    async def effects(*, limit: int) -> int:
        return await payments.purge_effects(older_than=keep.effects, limit=limit)

    async def journal(*, limit: int) -> int:
        return await payments.purge_journal(older_than=keep.journal, limit=limit)

    report.events = await _drain("events", tick, keep.batch, events)
    report.effects = await _drain("effects", tick, keep.batch, effects)
    report.journal = await _drain("journal", tick, keep.batch, journal)
    return report


class _Delete(Protocol):
    async def __call__(self, *, limit: int) -> int: ...


async def _drain(stage: str, tick: Progress, batch: int, delete: _Delete) -> int:
    """Call ``delete(limit=batch)`` until a call deletes fewer than ``batch`` rows."""
    total = 0
    tick(stage, total, None)
    while True:
        deleted = await delete(limit=batch)
        total += deleted
        tick(stage, total, None)
        if deleted < batch:
            return total


async def _wait(stop: asyncio.Event, seconds: float) -> None:  # unasync: remove
    with contextlib.suppress(TimeoutError):  # unasync: remove
        await asyncio.wait_for(stop.wait(), seconds)  # unasync: remove


# def _wait(stop: threading.Event, seconds: float) -> None:  # unasync: sync-only
#     stop.wait(seconds)  # unasync: sync-only
