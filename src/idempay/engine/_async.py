"""The guard engine (async source; the sync twin ``_sync.py`` is generated from it).

:class:`AsyncGuard` composes the pure core and the stores into the webhook flow and the outbox
dispatcher. Every decision is taken by the pure core; every guarantee is carried by the stores
(inbox uniqueness, compare-and-set order updates, audit and outbox rows in the same atomic step);
the lock provider, when there is one, only cuts contention.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar, cast

from idempay.clock import Clock, SystemClock
from idempay.core.audit import AuditDraft, AuditSource, AuditStep
from idempay.core.events import StripeEvent, parse_event
from idempay.core.models import (
    EventCommit,
    EventReception,
    InboxEvent,
    InboxStatus,
    NewEffect,
    OrderRecord,
    OutboxEntry,
)
from idempay.core.observe import observation_from_event
from idempay.core.orders import EffectTrigger, OrderState, Outcome, Transition, apply
from idempay.core.signature import verify_signature
from idempay.engine._auditlog import log_decision, log_draft
from idempay.engine._config import GuardConfig, LockFailurePolicy
from idempay.engine._faults import FaultPoint, FaultPoints
from idempay.engine._http import GuardRequest, GuardResponse, json_response, problem_response
from idempay.engine._results import DispatchReport, EffectContext, WebhookOutcome
from idempay.errors import (
    ConcurrentUpdateError,
    ConfigurationError,
    LeaseLostError,
    LockError,
    MethodNotAllowedError,
    RequestError,
    ServiceUnavailableError,
    TransientStoreError,
    UnsupportedMediaTypeError,
)
from idempay.protocols import AsyncLockProvider, AsyncOutboxStore, AsyncPaymentStore

__all__ = ["AsyncGuard"]

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])
EffectFunction = Callable[[EffectContext], Awaitable[None]]  # unasync: remove
# EffectFunction = Callable[[EffectContext], None]  # unasync: sync-only


@dataclass(frozen=True, slots=True)
class _Registered:
    name: str
    trigger: EffectTrigger
    run: EffectFunction


class AsyncGuard:
    """Guards Stripe webhooks and runs their effects, in an asyncio application.

    Args:
        payments: the store of orders, inbox, audit and outbox (it must also be the outbox
            store the dispatcher drains, as every shipped payment store is).
        config: the guard's options (webhook secrets among them).
        locks: an optional lock provider that spares duplicate work; correctness never
            depends on it.
        clock: where the engine reads the time (the stores keep their own).
        faults: fault points for tests; a fresh, unarmed set by default.

    Guarantees of :meth:`handle_webhook`:
        - an event changes its order at most once, whatever the number, order and concurrency
          of its deliveries (inbox uniqueness, compare-and-set, the state machine);
        - the order's new state, its audit entries, the effects the change justifies and the
          event's inbox status are written in one atomic step, or not at all;
        - an event for an order that does not exist yet is kept (``orphan``) and applied when
          the order appears; a webhook never creates an order;
        - a duplicate or concurrent delivery never gets a 5xx: lost races are retried.
    """

    def __init__(
        self,
        *,
        payments: AsyncPaymentStore,
        config: GuardConfig,
        locks: AsyncLockProvider | None = None,
        clock: Clock | None = None,
        faults: FaultPoints | None = None,
    ) -> None:
        self.payments = payments
        self.config = config
        self.locks = locks
        self.clock = clock or SystemClock()
        self.faults = faults or FaultPoints()
        self._effects: dict[str, _Registered] = {}

    # --- effects --------------------------------------------------------------------------

    def effect(self, name: str, *, on: EffectTrigger | str) -> Callable[[F], F]:
        """Register ``fn`` as the effect ``name``, run once per order each time ``on`` fires.

        The function receives an :class:`EffectContext`; its ``dedup_key`` is stable for the
        effect's whole life, so hand it to your e-mail or fulfilment provider as their
        idempotency key: the dispatcher delivers at least once, and with that key exactly once
        from the customer's point of view. Raise to have it retried with backoff.
        """
        trigger = EffectTrigger(on)
        if not name or len(name) > 64 or not name.isascii() or not name.isprintable():
            raise ConfigurationError("an effect name is 1 to 64 printable ASCII characters")
        if name in self._effects:
            raise ConfigurationError("an effect with this name is registered already")

        def register(fn: F) -> F:
            self._effects[name] = _Registered(name, trigger, cast("EffectFunction", fn))
            return fn

        return register

    def _effects_for(self, order: OrderRecord, transition: Transition) -> tuple[NewEffect, ...]:
        payload = json.dumps(
            {
                "status": transition.after.status.value,
                "amount": transition.after.amount,
                "currency": transition.after.currency,
                "amount_refunded": transition.after.amount_refunded,
                "payment_intent_id": transition.after.payment_intent_id,
            },
            separators=(",", ":"),
        )
        return tuple(
            NewEffect(order.tenant, order.order_id, reg.name, effect.discriminator, payload)
            for effect in transition.effects
            for reg in self._effects.values()
            if reg.trigger is effect.trigger
        )

    # --- webhooks -------------------------------------------------------------------------

    async def handle_webhook(self, request: GuardRequest) -> GuardResponse:
        """Verify, record and apply one webhook delivery; return what to answer Stripe.

        2xx for every delivery that was taken care of (applied, duplicate, stale, ignored,
        orphaned); 4xx with a problem document for a request that is refused (bad signature,
        malformed body, wrong method or media type), after which nothing was written.
        """
        try:
            outcome = await self._receive(request)
        except RequestError as error:
            log_decision(AuditStep.REJECTED, source=AuditSource.WEBHOOK, reason=error.code)
            return problem_response(error, instance=request.route)
        return json_response(200, {"received": True, "outcome": outcome.value})

    async def _receive(self, request: GuardRequest) -> WebhookOutcome:
        if request.method.upper() != "POST":
            raise MethodNotAllowedError("webhooks are POSTed", allowed=("POST",))
        content_type = (request.header("content-type") or "").split(";")[0].strip().lower()
        if content_type != "application/json":
            raise UnsupportedMediaTypeError("webhooks are application/json")
        if not self.config.webhook_secrets:
            raise ConfigurationError("GuardConfig.webhook_secrets is needed to receive webhooks")
        verify_signature(
            request.body,
            request.header("stripe-signature"),
            self.config.webhook_secrets,
            now=self.clock.now().timestamp(),
            tolerance=self.config.signature_tolerance,
        )
        event = parse_event(
            request.body, limits=self.config.json_limits, livemode=self.config.livemode
        )
        return await self.process_event(event, request.body)

    async def process_event(self, event: StripeEvent, raw: bytes) -> WebhookOutcome:
        """Record and apply an event whose signature was verified (or that came from Stripe's
        API, as the reconciler's do); safe to call any number of times for one event."""
        inbox = InboxEvent(
            account=event.account or "",
            event_id=event.id,
            type=event.type,
            created=event.created,
            payload=raw,
            received_at=self.clock.now(),
            object_id=event.object_id,
            payment_intent_id=event.payment_intent_id,
            order_id=event.order_id,
        )
        tenant = self._tenant_of(event)
        lease = await self._lock(f"pi:{event.payment_intent_id or event.id}")
        try:
            for _attempt in range(self.config.commit_attempts):
                try:
                    return await self._apply_once(event, inbox, tenant)
                except (ConcurrentUpdateError, TransientStoreError):
                    await self._pause(_attempt)
            raise ServiceUnavailableError("the order is too busy; retry", retry_after=1)
        finally:
            await self._unlock(f"pi:{event.payment_intent_id or event.id}", lease)

    def _tenant_of(self, event: StripeEvent) -> str | None:
        obj = event.object
        metadata = getattr(obj, "metadata", None)
        if metadata is None:
            return None
        tenant = metadata.get(self.config.tenant_metadata_key)
        return tenant if tenant is not None else ""

    async def _apply_once(
        self, event: StripeEvent, inbox: InboxEvent, tenant: str | None
    ) -> WebhookOutcome:
        got = await self.payments.receive_event(inbox, tenant=tenant, order_id=event.order_id)
        stored = got.event
        if not got.inserted and stored.status in (InboxStatus.PROCESSED, InboxStatus.IGNORED):
            log_decision(
                AuditStep.DUPLICATE,
                source=AuditSource.WEBHOOK,
                tenant=tenant or "",
                order_id=stored.order_id,
                event_id=event.id,
            )
            return WebhookOutcome.DUPLICATE
        if got.order is None:
            return await self._orphan(event, got, tenant)
        return await self._decide(event, got, got.order)

    async def _orphan(
        self, event: StripeEvent, got: EventReception, tenant: str | None
    ) -> WebhookOutcome:
        observation = observation_from_event(event)
        status = InboxStatus.IGNORED if observation is None else InboxStatus.ORPHAN
        if got.event.status is not status:
            await self.payments.commit_event(
                EventCommit(event=got.event, status=status, audit_head=got.audit_head)
            )
        step = AuditStep.IGNORED if observation is None else AuditStep.ORPHANED
        log_decision(
            step,
            source=AuditSource.WEBHOOK,
            tenant=tenant or "",
            order_id=event.order_id,
            event_id=event.id,
            reason="no order yet" if observation is not None else "not a payment event",
        )
        return WebhookOutcome.IGNORED if observation is None else WebhookOutcome.ORPHANED

    async def _decide(
        self, event: StripeEvent, got: EventReception, order: OrderRecord
    ) -> WebhookOutcome:
        observation = observation_from_event(event)
        now = self.clock.now()
        if observation is None:
            draft = self._draft(order, AuditStep.IGNORED, event, now, reason=event.type)
            await self._commit(
                got, order, new_state=None, drafts=(draft,), effects=(), status=InboxStatus.IGNORED
            )
            return WebhookOutcome.IGNORED
        transition = apply(order.state, observation)
        # The transition names its own steps: ignored_stale and rejected included.
        drafts = tuple(
            self._draft(order, step, event, now, transition=transition) for step in transition.steps
        )
        new_state = transition.after if transition.changed else None
        effects = self._effects_for(order, transition)
        self.faults.reach(FaultPoint.WEBHOOK_BEFORE_COMMIT)
        await self._commit(
            got,
            order,
            new_state=new_state,
            drafts=drafts,
            effects=effects,
            status=InboxStatus.PROCESSED,
        )
        self.faults.reach(FaultPoint.WEBHOOK_AFTER_COMMIT)
        match transition.outcome:
            case Outcome.APPLIED:
                return WebhookOutcome.APPLIED
            case Outcome.UNCHANGED:
                return WebhookOutcome.UNCHANGED
            case _:
                return WebhookOutcome.STALE

    async def _commit(
        self,
        got: EventReception,
        order: OrderRecord,
        *,
        new_state: OrderState | None,
        drafts: tuple[AuditDraft, ...],
        effects: tuple[NewEffect, ...],
        status: InboxStatus,
    ) -> None:
        await self.payments.commit_event(
            EventCommit(
                event=got.event,
                status=status,
                audit_head=got.audit_head,
                order=order,
                new_state=new_state,
                audit=drafts,
                effects=effects,
                order_id=order.order_id,
            )
        )
        for draft in drafts:
            log_draft(draft)

    @staticmethod
    def _draft(
        order: OrderRecord,
        step: AuditStep,
        event: StripeEvent,
        at: datetime,
        *,
        transition: Transition | None = None,
        reason: str | None = None,
    ) -> AuditDraft:
        details = {"event_type": event.type}
        if transition is not None:
            details["reason"] = transition.reason
            details["outcome"] = transition.outcome.value
        if reason is not None:
            details["reason"] = reason
        return AuditDraft(
            tenant=order.tenant,
            order_id=order.order_id,
            step=step,
            source=AuditSource.WEBHOOK,
            at=at,
            from_status=order.state.status.value,
            to_status=(transition.after if transition else order.state).status.value,
            event_id=event.id,
            details=details,
        )

    async def apply_orphans(self, order: OrderRecord) -> int:
        """Apply the events kept for ``order`` before it existed; return how many.

        The checkout flow calls this once the order has its PaymentIntent; the reconciler does
        too. Each orphan goes through :meth:`process_event` again, so it is applied once.
        """
        async with self.payments.transaction() as tx:
            orphans = list(
                await tx.orphans_for(
                    payment_intent_id=order.state.payment_intent_id, order_id=order.order_id
                )
            )
        for orphan in orphans:
            event = parse_event(orphan.payload, limits=self.config.json_limits)
            await self.process_event(event, orphan.payload)
        return len(orphans)

    # --- locks ----------------------------------------------------------------------------

    async def _lock(self, name: str) -> Any:
        if self.locks is None:
            return None
        try:
            return await self.locks.acquire(name, ttl=self.config.lock_ttl)
        except LockError:
            if self.config.lock_failure is LockFailurePolicy.FAIL_CLOSED:
                raise ServiceUnavailableError(
                    "the lock service is unavailable", retry_after=1
                ) from None
            logger.warning("lock provider failed; continuing with the database guards alone")
            return None

    async def _unlock(self, name: str, lease: Any) -> None:
        if self.locks is None or lease is None:
            return
        try:
            await self.locks.release(name, lease)
        except LockError:
            logger.warning("lock release failed; the lock expires by itself")

    @staticmethod
    async def _pause(attempt: int) -> None:
        await asyncio.sleep(random.uniform(0, min(0.2, 0.002 * 2**attempt)))  # noqa: S311

    # --- outbox ---------------------------------------------------------------------------

    async def dispatch_effects(self, *, limit: int = 100) -> DispatchReport:
        """Run up to ``limit`` due effects; safe with any number of dispatchers at once.

        Each effect runs at least once; a failing one is retried with exponential backoff
        and dead-lettered after ``GuardConfig.effect_max_attempts`` attempts (kept, never
        dropped). An effect whose dispatcher died is handed to another once its lease ran out.
        """
        outbox = cast("AsyncOutboxStore", self.payments)
        entries = await outbox.claim_due_effects(limit=limit, lease_for=self.config.lease)
        report = DispatchReport()
        for entry in entries:
            await self._run_effect(outbox, entry, report)
        return report

    async def _run_effect(
        self, outbox: AsyncOutboxStore, entry: OutboxEntry, report: DispatchReport
    ) -> None:
        registered = self._effects.get(entry.effect)
        try:
            if registered is None:
                await outbox.fail_effect(entry, error="no effect of this name", retry_at=None)
                report.dead += 1
                return
            context = EffectContext(
                tenant=entry.tenant,
                order_id=entry.order_id,
                effect=entry.effect,
                discriminator=entry.discriminator,
                dedup_key=entry.dedup_key,
                attempt=entry.attempts,
                payload=json.loads(entry.payload),
            )
            self.faults.reach(FaultPoint.OUTBOX_BEFORE_EFFECT)
            try:
                await registered.run(context)
            except Exception as exc:  # noqa: BLE001 - any failure of user code is retried
                await self._effect_failed(outbox, entry, exc, report)
                return
            self.faults.reach(FaultPoint.OUTBOX_AFTER_EFFECT)
            await outbox.finish_effect(entry)
            report.done += 1
        except LeaseLostError:
            # Another dispatcher took the entry over after our lease ran out; it finishes it.
            report.lost += 1

    async def _effect_failed(
        self, outbox: AsyncOutboxStore, entry: OutboxEntry, exc: Exception, report: DispatchReport
    ) -> None:
        error = type(exc).__name__
        if entry.attempts >= self.config.effect_max_attempts:
            await outbox.fail_effect(entry, error=error, retry_at=None)
            report.dead += 1
            logger.error("effect dead-lettered after %d attempts: %s", entry.attempts, error)
            return
        await outbox.fail_effect(entry, error=error, retry_at=self._retry_at(entry.attempts))
        report.retried += 1

    def _retry_at(self, attempts: int) -> datetime:
        base = self.config.effect_backoff.total_seconds() * 2 ** max(attempts - 1, 0)
        delay = min(self.config.effect_backoff_cap.total_seconds(), base)
        jittered = random.uniform(delay / 2, delay)  # noqa: S311 - spreading retries
        return self.clock.now() + timedelta(seconds=jittered)
