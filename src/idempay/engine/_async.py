"""The guard engine (async source; the sync twin ``_sync.py`` is generated from it).

:class:`AsyncGuard` composes the pure core and the stores into the webhook flow and the outbox
dispatcher. Every decision is taken by the pure core; every guarantee is carried by the stores
(inbox uniqueness, compare-and-set order updates, audit and outbox rows in the same atomic step);
the lock provider, when there is one, only cuts contention.
"""

from __future__ import annotations

import asyncio  # unasync: remove
import json
import logging
import random
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final, TypeVar, cast

from idempay._retry import RETRIABLE, retry_async  # unasync: remove

# from idempay._retry import RETRIABLE, retry  # unasync: sync-only
from idempay.clock import Clock, SystemClock
from idempay.core.audit import AuditDraft, AuditSource, AuditStep, verify_trail
from idempay.core.events import PaymentIntentSnapshot, StripeEvent, parse_event
from idempay.core.keys import Scope, key_digest, parse_key_header, request_fingerprint
from idempay.core.models import (
    EventCommit,
    EventReception,
    InboxEvent,
    InboxStatus,
    JournalEntry,
    NewEffect,
    OrderRecord,
    OutboxEntry,
)
from idempay.core.observe import observation_from_event, observation_from_intent
from idempay.core.orders import (
    CancelRequested,
    EffectTrigger,
    Observation,
    OrderState,
    OrderStatus,
    Outcome,
    ReviewResolved,
    Transition,
    apply,
    moved,
    new_order,
    resolved_statuses,
)
from idempay.core.records import (
    Decision,
    Execute,
    Existing,
    InFlight,
    Lease,
    Mismatch,
    RecordState,
    Replay,
    decide,
)
from idempay.core.signature import verify_signature
from idempay.core.strictjson import ObjectReader, loads_object
from idempay.engine._auditlog import log_decision, log_draft
from idempay.engine._checkout import (
    CheckoutRequest,
    OrderSpec,
    RecoveryPoint,
    order_of_stripe_key,
    stripe_idempotency_key,
)
from idempay.engine._config import GuardConfig, LockFailurePolicy
from idempay.engine._faults import FaultPoint, FaultPoints
from idempay.engine._http import GuardRequest, GuardResponse, json_response, problem_response
from idempay.engine._results import DispatchReport, EffectContext, OrderView, WebhookOutcome
from idempay.errors import (
    ConcurrentUpdateError,
    ConfigurationError,
    FingerprintMismatchError,
    IdempayError,
    LeaseLostError,
    LockError,
    MethodNotAllowedError,
    OrderNotFoundError,
    OrderStateConflictError,
    PaymentOutcomeUnknownError,
    PaymentProviderError,
    RequestError,
    RequestInFlightError,
    ServiceUnavailableError,
    StoreError,
    UnsupportedMediaTypeError,
)
from idempay.gateway._async import AsyncStripeGateway
from idempay.observability import operation as observed
from idempay.protocols import (
    AsyncIdempotencyStore,
    AsyncJournalStore,
    AsyncLockProvider,
    AsyncOutboxStore,
    AsyncPaymentStore,
    AsyncPaymentTransaction,
)

__all__ = ["AsyncGuard"]

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])
EffectFunction = Callable[[EffectContext], Awaitable[None]]  # unasync: remove
# EffectFunction = Callable[[EffectContext], None]  # unasync: sync-only
CheckoutHandler = Callable[[CheckoutRequest], Awaitable[OrderSpec]]  # unasync: remove
# CheckoutHandler = Callable[[CheckoutRequest], OrderSpec]  # unasync: sync-only
CheckoutEndpoint = Callable[[GuardRequest], Awaitable[GuardResponse]]  # unasync: remove
# CheckoutEndpoint = Callable[[GuardRequest], GuardResponse]  # unasync: sync-only


@dataclass(frozen=True, slots=True)
class _Registered:
    name: str
    trigger: EffectTrigger
    run: EffectFunction


class AsyncGuard:
    """The guard: checkouts, Stripe webhooks and their effects (``AsyncGuard`` for asyncio
    applications; ``Guard`` is its sync twin, generated from the same source).

    Args:
        payments: the store of orders, inbox, audit and outbox (it must also be the outbox
            store the dispatcher drains, as every shipped payment store is).
        records: the idempotency-record store of checkouts (needed for :meth:`checkout`).
        gateway: the Stripe gateway of checkouts (needed for :meth:`checkout`).
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
        records: AsyncIdempotencyStore | None = None,
        gateway: AsyncStripeGateway | None = None,
        locks: AsyncLockProvider | None = None,
        clock: Clock | None = None,
        faults: FaultPoints | None = None,
    ) -> None:
        self.payments = payments
        self.records = records
        self.gateway = gateway
        self.config = config
        self.locks = locks
        self.clock = clock or SystemClock()
        self.faults = faults or FaultPoints()
        self._effects: dict[str, _Registered] = {}
        self._journal_store = payments if isinstance(payments, AsyncJournalStore) else None
        self._pending: list[JournalEntry] = []
        self._pending_lock = threading.Lock()
        self._journal_dropped = 0

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

    # --- checkout -------------------------------------------------------------------------

    def checkout(
        self, *, operation: str = "checkout", ignore: tuple[str, ...] = ()
    ) -> Callable[[CheckoutHandler], CheckoutEndpoint]:
        """Turn a checkout handler into an idempotent endpoint ``(GuardRequest) -> GuardResponse``.

        The handler receives a :class:`CheckoutRequest` and returns the :class:`OrderSpec` to
        charge; idempay does the rest. Guarantees:

        - one order per ``order_id`` and one PaymentIntent per order, whatever the number of
          clicks, keys, processes, retries or crashes; the Stripe call carries an idempotency
          key derived from the order, never a random one, and ``metadata.order_id``;
        - the same key again gets the stored response with ``Idempotent-Replayed: true``; while
          the first is in flight, 409 with ``Retry-After``; with a different body, 422;
        - a timeout, reset or 5xx from Stripe is an unknown outcome (503, ``Retry-After``), never
          a failure: the retry resumes with the same Stripe key; a crash at any step is
          resumed the same way once the lease runs out;
        - a declined card leaves the order ``payment_failed`` (audited ``failed``), payable
          later.

        ``ignore`` names top-level body fields left out of the request fingerprint (fields a
        client may vary harmlessly, such as a timestamp).
        """
        if self.records is None or self.gateway is None:
            raise ConfigurationError("checkout needs the guard's records store and gateway")

        def decorate(handler: CheckoutHandler) -> CheckoutEndpoint:
            async def endpoint(request: GuardRequest) -> GuardResponse:
                with observed("checkout") as op:
                    response = await self._answer_checkout(handler, operation, ignore, request)
                    op.outcome = str(response.status)
                return response

            endpoint.__name__ = getattr(handler, "__name__", "checkout")
            endpoint.__doc__ = handler.__doc__
            return endpoint

        return decorate

    async def _answer_checkout(
        self,
        handler: CheckoutHandler,
        operation: str,
        ignore: tuple[str, ...],
        request: GuardRequest,
    ) -> GuardResponse:
        try:
            return await self._checkout(handler, operation, ignore, request)
        except RequestError as error:
            return problem_response(error, instance=request.route)
        except StoreError as error:
            return problem_response(_store_unavailable(error), instance=request.route)

    async def _checkout(
        self,
        handler: CheckoutHandler,
        operation: str,
        ignore: tuple[str, ...],
        request: GuardRequest,
    ) -> GuardResponse:
        records = cast("AsyncIdempotencyStore", self.records)
        if request.method.upper() != "POST":
            raise MethodNotAllowedError("checkouts are POSTed", allowed=("POST",))
        content_type = (request.header("content-type") or "").split(";")[0].strip().lower()
        if content_type != "application/json":
            raise UnsupportedMediaTypeError("checkouts are application/json")
        key = parse_key_header(request.header("idempotency-key"))
        scope = Scope(operation=operation, tenant=request.tenant, user=request.user)
        body = loads_object(request.body, limits=self.config.json_limits)
        fingerprint = request_fingerprint(request.method, request.route, body, ignore=ignore)
        digest = key_digest(scope, key)
        lease = await self._lock(f"idem:{digest}")
        try:
            claim = await records.claim(
                scope.encode(),
                key,
                fingerprint,
                lease_for=self.config.lease,
                retain_for=self.config.retain,
            )
            decision = decide(claim, fingerprint, self.clock.now())
            order_id = claim.record.resource_id
            if isinstance(decision, InFlight) and self.config.in_flight_wait > timedelta(0):
                decision, order_id = await self._wait_in_flight(
                    scope.encode(), key, fingerprint, decision, order_id
                )
            match decision:
                case Execute():
                    context = CheckoutRequest(
                        body=body,
                        fields=ObjectReader(body),
                        tenant=request.tenant,
                        user=request.user,
                        request=request,
                    )
                    return await self._execute(
                        handler, context, scope=scope, key=key, digest=digest, decision=decision
                    )
                case Replay(response=stored):
                    await self._note_checkout(AuditStep.REPLAYED, request, digest, order_id)
                    return GuardResponse.replay(stored)
                case InFlight(retry_after=retry_after):
                    await self._note_checkout(AuditStep.CONFLICT, request, digest, order_id)
                    raise RequestInFlightError(
                        "a checkout with this idempotency key is in progress",
                        retry_after=retry_after,
                    )
                case Mismatch():
                    await self._note_checkout(AuditStep.MISMATCH, request, digest, order_id)
                    raise FingerprintMismatchError(
                        "this idempotency key was used with a different checkout"
                    )
        finally:
            await self._unlock(f"idem:{digest}", lease)

    async def _wait_in_flight(
        self, scope_text: str, key: str, fingerprint: str, decision: Decision, order_id: str | None
    ) -> tuple[Decision, str | None]:
        """Poll the record while its first request runs, for up to ``in_flight_wait``.

        Reads only, with growing pauses; once the record is finished (or its owner's lease
        ran out) the key is claimed again and decided as usual: a replay, or a takeover.
        """
        records = cast("AsyncIdempotencyStore", self.records)
        deadline = time.monotonic() + self.config.in_flight_wait.total_seconds()
        pause = 0.01
        while isinstance(decision, InFlight):
            left = deadline - time.monotonic()
            if left <= 0:
                return decision, order_id
            await asyncio.sleep(min(pause, left))
            pause = min(pause * 2, 0.25)
            record = await records.get(scope_text, key)
            now = self.clock.now()
            if record is not None:
                order_id = record.resource_id or order_id
            if record is not None and (
                record.state is RecordState.IN_PROGRESS and not record.lease_expired(now)
            ):
                decision = decide(Existing(record), fingerprint, now)
                continue
            claim = await records.claim(
                scope_text,
                key,
                fingerprint,
                lease_for=self.config.lease,
                retain_for=self.config.retain,
            )
            decision = decide(claim, fingerprint, self.clock.now())
            order_id = claim.record.resource_id or order_id
        return decision, order_id

    async def _note_checkout(
        self, step: AuditStep, request: GuardRequest, digest: str, order_id: str | None
    ) -> None:
        await self._note(
            step,
            AuditSource.CHECKOUT,
            tenant=request.tenant,
            order_id=order_id,
            key_digest=digest,
        )

    async def _execute(
        self,
        handler: CheckoutHandler,
        context: CheckoutRequest,
        *,
        scope: Scope,
        key: str,
        digest: str,
        decision: Execute,
    ) -> GuardResponse:
        records = cast("AsyncIdempotencyStore", self.records)
        scope_text, lease = scope.encode(), decision.lease
        try:
            spec = await handler(context)
        except RequestError as refused:
            # A deterministic refusal by the application is stored and replayed, like Stripe.
            stored = problem_response(refused).to_stored()
            await records.complete(scope_text, key, lease, stored, failed=True)
            raise
        except BaseException:
            await records.release(scope_text, key, lease, discard=decision.recovery_point is None)
            raise
        order_id = decision.resource_id or spec.order_id
        try:
            order = await self._create_order(spec, order_id, context.tenant, digest, decision)
            await records.checkpoint(
                scope_text,
                key,
                lease,
                recovery_point=RecoveryPoint.ORDER_CREATED,
                resource_id=order_id,
            )
            self.faults.reach(FaultPoint.CHECKOUT_AFTER_ORDER)
            # Fenced (and renewed) before every step with an outside effect: a worker that
            # was paused past its lease, and taken over, stops here instead of calling Stripe.
            lease = await records.extend(scope_text, key, lease, lease_for=self.config.lease)
            intent = await self._ensure_intent(order, spec, resumed=decision.resumed)
            self.faults.reach(FaultPoint.CHECKOUT_AFTER_STRIPE)
            await records.checkpoint(
                scope_text, key, lease, recovery_point=RecoveryPoint.INTENT_CREATED
            )
            order = await self._apply_intent(order, intent)
            if spec.payment_method is not None and intent.status == "requires_confirmation":
                lease = await records.extend(scope_text, key, lease, lease_for=self.config.lease)
                gateway = cast("AsyncStripeGateway", self.gateway)
                intent = await gateway.confirm_payment_intent(
                    intent.id,
                    idempotency_key=stripe_idempotency_key(order.tenant, order.order_id, "confirm"),
                )
                order = await self._apply_intent(order, intent)
            await self.apply_orphans(order)
            response = json_response(
                201,
                {
                    "order_id": order.order_id,
                    "status": order.state.status.value,
                    "amount": order.state.amount,
                    "currency": order.state.currency,
                    "payment_intent_id": intent.id,
                    "client_secret": intent.client_secret,
                },
            )
            self.faults.reach(FaultPoint.CHECKOUT_BEFORE_COMPLETE)
            await records.complete(scope_text, key, lease, response.to_stored())
        except PaymentOutcomeUnknownError:
            await self._audit_unknown(order_id, context.tenant, digest)
            await records.release(scope_text, key, lease)
            raise
        except LeaseLostError:
            await self._note(
                AuditStep.LEASE_LOST,
                AuditSource.CHECKOUT,
                tenant=context.tenant,
                order_id=order_id,
                key_digest=digest,
            )
            raise RequestInFlightError(
                "another worker took this checkout over; retry", retry_after=1
            ) from None
        except BaseException:
            await self._release_quietly(scope_text, key, lease)
            raise
        return response

    async def _release_quietly(self, scope_text: str, key: str, lease: Lease) -> None:
        records = cast("AsyncIdempotencyStore", self.records)
        # Another owner may have it already: then there is nothing of ours to give back. A lost
        # connection is replaced for a second attempt (the pool drops dead connections); if the
        # store still fails, the lease runs out by itself: the original error matters more.
        for _ in range(2):
            try:
                await records.release(scope_text, key, lease)
            except LeaseLostError:
                return
            except StoreError:
                continue
            return

    async def _create_order(
        self, spec: OrderSpec, order_id: str, tenant: str, digest: str, decision: Execute
    ) -> OrderRecord:
        state = new_order(amount=spec.amount, currency=spec.currency).after
        written: list[AuditDraft] = []

        async def work(tx: AsyncPaymentTransaction) -> OrderRecord:
            written.clear()  # a retried attempt starts over
            record, inserted = await tx.insert_order(tenant, order_id, state)
            step = (
                AuditStep.STARTED if inserted else AuditStep.RECOVERED if decision.resumed else None
            )
            if step is not None:
                draft = AuditDraft(
                    tenant,
                    order_id,
                    step,
                    AuditSource.CHECKOUT,
                    tx.now(),
                    to_status=record.state.status.value,
                    key_digest=digest,
                )
                await tx.append_audit(draft)
                written.append(draft)
            self.faults.reach(FaultPoint.CHECKOUT_IN_ORDER_TRANSACTION)
            return record

        order = await self.payments.run_transaction(work, attempts=self.config.commit_attempts)
        _log_committed(written)
        if (order.state.amount, order.state.currency) != (spec.amount, spec.currency):
            raise FingerprintMismatchError("this order exists with another amount or currency")
        return order

    async def _ensure_intent(
        self, order: OrderRecord, spec: OrderSpec, *, resumed: bool
    ) -> PaymentIntentSnapshot:
        gateway = cast("AsyncStripeGateway", self.gateway)
        if order.state.payment_intent_id is not None:
            return await gateway.retrieve_payment_intent(order.state.payment_intent_id)
        if resumed:
            # A predecessor may have created it and died before recording it: find it by its
            # metadata rather than trust the provider's 24-hour idempotency window alone.
            found = await self._find_intent(order)
            if found is not None and found.status != "canceled":
                return found
        metadata = {
            **spec.metadata,
            self.config.order_metadata_key: order.order_id,
            self.config.tenant_metadata_key: order.tenant,
        }
        return await gateway.create_payment_intent(
            amount=order.state.amount,
            currency=order.state.currency,
            metadata=metadata,
            idempotency_key=stripe_idempotency_key(order.tenant, order.order_id, "create"),
            payment_method=spec.payment_method,
            capture_method=spec.capture_method,
        )

    async def _find_intent(self, order: OrderRecord) -> PaymentIntentSnapshot | None:
        """The order's PaymentIntent found at Stripe by its metadata, or None; should there be
        several, the one furthest along (a success first, a canceled one last)."""
        gateway = cast("AsyncStripeGateway", self.gateway)
        found = await gateway.find_payment_intents(
            order_id=order.order_id, metadata_key=self.config.order_metadata_key
        )
        mine = [
            pi
            for pi in found
            if pi.metadata.get(self.config.tenant_metadata_key, "") == order.tenant
        ]
        if len(mine) > 1:
            logger.warning("several PaymentIntents name one order; the furthest along is used")
        return min(mine, key=_intent_preference, default=None)

    # --- reconciliation -------------------------------------------------------------------

    async def refresh_order(
        self, order_id: str, *, tenant: str = "", source: AuditSource = AuditSource.RECONCILER
    ) -> OrderRecord:
        """Bring an order up to date with its PaymentIntent as Stripe has it now; return it.

        The PaymentIntent is retrieved by its recorded id, or found by ``metadata.order_id``
        when the id was never recorded (a checkout that died after calling Stripe, or whose
        call had no clear answer). What Stripe says goes through the state machine like an
        event (audited with ``source``), so a missed webhook is made up for and an older
        answer never undoes a newer one; the events kept for the order before it had its
        PaymentIntent are applied after. Nothing is ever created, confirmed or canceled at
        Stripe: a bank debit still processing stays processing. An order without any
        PaymentIntent at Stripe (its checkout never got that far) is returned unchanged. A
        check that changes nothing is journaled (``checked``).

        Raises:
            OrderNotFoundError: no such order.
            PaymentOutcomeUnknownError: Stripe did not answer clearly; call again later.
            PaymentProviderError: Stripe refused (the PaymentIntent does not exist there).
            ConfigurationError: the guard has no gateway.
        """
        if self.gateway is None:
            raise ConfigurationError("refreshing an order needs the guard's gateway")
        order = await self._order(tenant, order_id)
        recorded = order.state.payment_intent_id
        intent = (
            await self.gateway.retrieve_payment_intent(recorded)
            if recorded is not None
            else await self._find_intent(order)
        )
        updated = order
        if intent is not None and not _same_failure(order, intent):
            updated = await self._apply_intent(order, intent, source=source)
        if not moved(order.state, updated.state):
            await self._note(
                AuditStep.CHECKED,
                source,
                tenant=tenant,
                order_id=order_id,
                reason="no payment intent at stripe"
                if intent is None
                else f"payment intent {intent.status}",
            )
        if intent is not None:
            await self.apply_orphans(updated)
        return updated

    async def _apply_intent(
        self,
        order: OrderRecord,
        intent: PaymentIntentSnapshot,
        *,
        source: AuditSource = AuditSource.CHECKOUT,
    ) -> OrderRecord:
        """Apply what Stripe answered to the order, with its audit steps and effects."""
        observation = observation_from_intent(intent, observed_at=int(self.clock.now().timestamp()))
        return await self._observe(order, observation, source)

    async def _observe(
        self, order: OrderRecord, observation: Observation, source: AuditSource
    ) -> OrderRecord:
        """Apply one observation to the order's current state in one transaction."""
        written: list[AuditDraft] = []

        async def work(tx: AsyncPaymentTransaction) -> OrderRecord:
            written.clear()  # a retried attempt starts over
            current = await tx.get_order(order.tenant, order.order_id)
            if current is None:  # pragma: no cover - orders are never deleted
                raise ConcurrentUpdateError("the order disappeared")
            transition = apply(current.state, observation)
            updated = current
            if transition.changed:
                updated = await tx.update_order(current, transition.after)
            for step in transition.steps:
                draft = AuditDraft(
                    current.tenant,
                    current.order_id,
                    step,
                    source,
                    tx.now(),
                    from_status=current.state.status.value,
                    to_status=transition.after.status.value,
                    details={"reason": transition.reason, "outcome": transition.outcome.value},
                )
                await tx.append_audit(draft)
                written.append(draft)
            for effect in self._effects_for(current, transition):
                await tx.enqueue_effect(effect)
            return updated

        updated = await self.payments.run_transaction(work, attempts=self.config.commit_attempts)
        _log_committed(written)
        return updated

    # --- cancel ---------------------------------------------------------------------------

    async def cancel_order(
        self, order_id: str, *, tenant: str = "", at_stripe: bool = True
    ) -> OrderRecord:
        """Cancel an order that has not been paid; return it as it now stands.

        With ``at_stripe`` (and a gateway), the order's PaymentIntent is canceled at Stripe
        first, so that it can no longer be paid, and what Stripe answers is applied. Stripe
        refuses when the payment succeeded or a bank debit is processing: the order then
        takes that state and the local cancel is refused (audited ``rejected``), never forced.
        A local cancel only (``at_stripe=False``, or no PaymentIntent yet) leaves any later
        success of the PaymentIntent to ``needs_review``: money is never silently kept.

        Raises:
            OrderNotFoundError: no such order.
            PaymentOutcomeUnknownError: Stripe did not answer clearly; call again.
        """
        order = await self._order(tenant, order_id)
        intent_id = order.state.payment_intent_id
        if at_stripe and self.gateway is not None and intent_id is not None:
            key = stripe_idempotency_key(tenant, order_id, "cancel")
            try:
                intent = await self.gateway.cancel_payment_intent(intent_id, idempotency_key=key)
            except PaymentProviderError:
                # Stripe's refusal means the intent moved on (paid, processing): learn where.
                intent = await self.gateway.retrieve_payment_intent(intent_id)
            order = await self._apply_intent(order, intent, source=AuditSource.OPERATOR)
        return await self._observe(order, CancelRequested(), AuditSource.OPERATOR)

    async def resolve_review(self, order_id: str, *, tenant: str = "", keep: bool) -> OrderRecord:
        """Close the review of an order in ``needs_review`` with an operator's decision.

        ``keep``: the payment is kept and the order honoured (``paid``, with its fulfilment
        effects). Otherwise the customer was refunded in full at Stripe first, and the order
        becomes ``refunded``. The decision is audited with source ``operator``; repeating it
        changes nothing. See docs/operations.md for the runbook.

        Raises:
            OrderNotFoundError: no such order.
            OrderStateConflictError: the order is not under review, or its refunds do not fit
                the decision (a refund not recorded in full yet, or nothing left to keep);
                the refusal is audited, nothing else is changed.
        """
        order = await self._order(tenant, order_id)
        updated = await self._observe(order, ReviewResolved(keep=keep), AuditSource.OPERATOR)
        if updated.state.status not in resolved_statuses(keep=keep):
            raise OrderStateConflictError("the order's review cannot be resolved this way")
        return updated

    # --- inspection -----------------------------------------------------------------------

    async def inspect_order(self, order_id: str, *, tenant: str = "") -> OrderView:
        """Return the order, its audit trail with its hash chain verified, its effects and its
        journal (decisions that changed nothing: duplicates, replays).

        Raises:
            OrderNotFoundError: no such order.
        """
        await self.flush_journal()
        async with self.payments.transaction() as tx:
            order = await tx.get_order(tenant, order_id)
            if order is None:
                raise OrderNotFoundError("no order with this id")
            trail = tuple(await tx.audit_trail(tenant, order_id))
        outbox = cast("AsyncOutboxStore", self.payments)
        effects = tuple(await outbox.effects_for(tenant, order_id))
        decisions: tuple[JournalEntry, ...] = ()
        if self._journal_store is not None:
            decisions = tuple(await self._journal_store.journal_for(tenant, order_id))
        return OrderView(
            order=order,
            audit=trail,
            trail_check=verify_trail(trail),
            effects=effects,
            decisions=decisions,
        )

    async def _order(self, tenant: str, order_id: str) -> OrderRecord:
        async with self.payments.transaction() as tx:
            order = await tx.get_order(tenant, order_id)
        if order is None:
            raise OrderNotFoundError("no order with this id")
        return order

    async def _audit_unknown(self, order_id: str, tenant: str, digest: str) -> None:
        written: list[AuditDraft] = []

        async def work(tx: AsyncPaymentTransaction) -> None:
            written.clear()
            if await tx.get_order(tenant, order_id) is None:
                return
            draft = AuditDraft(
                tenant,
                order_id,
                AuditStep.OUTCOME_UNKNOWN,
                AuditSource.CHECKOUT,
                tx.now(),
                key_digest=digest,
                details={"reason": "payment provider call without a clear answer"},
            )
            await tx.append_audit(draft)
            written.append(draft)

        await self.payments.run_transaction(work, attempts=self.config.commit_attempts)
        _log_committed(written)

    # --- webhooks -------------------------------------------------------------------------

    async def handle_webhook(self, request: GuardRequest) -> GuardResponse:
        """Verify, record and apply one webhook delivery; return what to answer Stripe.

        2xx for every delivery that was taken care of (applied, duplicate, stale, ignored,
        orphaned); 4xx with a problem document for a request that is refused (bad signature,
        malformed body, wrong method or media type), after which nothing was written.
        """
        with observed("webhook") as op:
            try:
                outcome = await self._receive(request)
            except ServiceUnavailableError as error:
                # Not a refusal: the delivery could not be handled now; Stripe delivers it again.
                op.outcome = "503"
                return problem_response(error, instance=request.route)
            except RequestError as error:
                op.outcome = str(error.status)
                await self._note(AuditStep.REJECTED, AuditSource.WEBHOOK, reason=error.code)
                return problem_response(error, instance=request.route)
            except StoreError as error:
                op.outcome = "503"
                return problem_response(_store_unavailable(error), instance=request.route)
            op.outcome = outcome.value
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

    async def process_event(
        self, event: StripeEvent, raw: bytes, *, source: AuditSource = AuditSource.WEBHOOK
    ) -> WebhookOutcome:
        """Record and apply an event whose signature was verified (or that came from Stripe's
        API, as the reconciler's do: ``source`` is then ``reconciler``); safe to call any
        number of times for one event."""
        tenant, order_id = self._correlate(event)
        inbox = InboxEvent(
            account=event.account or "",
            event_id=event.id,
            type=event.type,
            created=event.created,
            payload=raw,
            received_at=self.clock.now(),
            object_id=event.object_id,
            payment_intent_id=event.payment_intent_id,
            order_id=order_id,
        )
        # A duplicate is answered from one read, before any lock: it costs nothing else.
        first = await self._read(inbox, tenant)
        if await self._already_done(first, event, tenant, source):
            return WebhookOutcome.DUPLICATE
        if first.order is None and first.stored_status is InboxStatus.ORPHAN:
            # Kept already, and its order still does not exist: nothing to write or lock.
            log_decision(
                AuditStep.ORPHANED,
                source=source,
                tenant=tenant or "",
                order_id=order_id,
                event_id=event.id,
                reason="no order yet",
            )
            return WebhookOutcome.ORPHANED
        name = f"pi:{event.payment_intent_id or event.id}"
        lease, busy = await self._lock_once(name)
        pending = [first]
        if busy and self.config.lock_wait > timedelta(0):
            # Another delivery for this PaymentIntent holds the lock: wait for it, then read
            # again, since the read above predates whatever it committed.
            lease = await self._lock(name, wait=self.config.lock_wait)
            pending.clear()

        async def attempt() -> WebhookOutcome:
            # The first attempt decides on the read above when the lock was free at once:
            # should another delivery have committed meanwhile, the compare-and-set refuses and
            # the next attempt reads again.
            got = pending.pop() if pending else await self._read(inbox, tenant)
            return await self._apply_once(event, inbox, tenant, got, source)

        try:
            return await retry_async(attempt, attempts=self.config.commit_attempts)
        except RETRIABLE:
            raise ServiceUnavailableError("the order is too busy; retry", retry_after=1) from None
        finally:
            await self._unlock(name, lease)

    def _correlate(self, event: StripeEvent) -> tuple[str | None, str | None]:
        """The (tenant, order_id) an event names, for finding its order when the PaymentIntent
        id is not recorded yet: the object's metadata, else the Stripe idempotency key of the
        request that caused the event (when idempay derived it). None where nothing says."""
        metadata = getattr(event.object, "metadata", None)
        if metadata is not None and self.config.order_metadata_key in metadata:
            tenant = metadata.get(self.config.tenant_metadata_key)
            return (tenant if tenant is not None else ""), metadata[self.config.order_metadata_key]
        named = order_of_stripe_key(event.request_idempotency_key)
        if named is not None:
            return named
        if metadata is None:
            return None, None
        tenant = metadata.get(self.config.tenant_metadata_key)
        return (tenant if tenant is not None else ""), None

    async def _read(self, inbox: InboxEvent, tenant: str | None) -> EventReception:
        return await self.payments.receive_event(inbox, tenant=tenant, order_id=inbox.order_id)

    async def _already_done(
        self, got: EventReception, event: StripeEvent, tenant: str | None, source: AuditSource
    ) -> bool:
        stored = got.event
        if stored is None or stored.status not in (InboxStatus.PROCESSED, InboxStatus.IGNORED):
            return False
        order = got.order
        await self._note(
            AuditStep.DUPLICATE,
            source,
            tenant=order.tenant if order is not None else tenant or "",
            order_id=order.order_id if order is not None else stored.order_id,
            event_id=event.id,
        )
        return True

    async def _apply_once(
        self,
        event: StripeEvent,
        inbox: InboxEvent,
        tenant: str | None,
        got: EventReception,
        source: AuditSource,
    ) -> WebhookOutcome:
        if await self._already_done(got, event, tenant, source):
            # Another delivery of this event committed while this one was deciding.
            return WebhookOutcome.DUPLICATE
        if got.order is None:
            return await self._orphan(event, inbox, got, tenant, source)
        return await self._decide(event, inbox, got, got.order, source)

    async def _orphan(
        self,
        event: StripeEvent,
        inbox: InboxEvent,
        got: EventReception,
        tenant: str | None,
        source: AuditSource,
    ) -> WebhookOutcome:
        observation = observation_from_event(event)
        status = InboxStatus.IGNORED if observation is None else InboxStatus.ORPHAN
        if got.stored_status is not status:
            # Stored now (a first delivery), or its status changed: kept for when the order
            # appears. A concurrent delivery that stored it first makes this commit refuse.
            await self.payments.commit_event(
                EventCommit(
                    event=inbox,
                    status=status,
                    expected_status=got.stored_status,
                    audit_head=got.audit_head,
                )
            )
        step = AuditStep.IGNORED if observation is None else AuditStep.ORPHANED
        log_decision(
            step,
            source=source,
            tenant=tenant or "",
            order_id=inbox.order_id,
            event_id=event.id,
            reason="no order yet" if observation is not None else "not a payment event",
        )
        return WebhookOutcome.IGNORED if observation is None else WebhookOutcome.ORPHANED

    async def _decide(
        self,
        event: StripeEvent,
        inbox: InboxEvent,
        got: EventReception,
        order: OrderRecord,
        source: AuditSource,
    ) -> WebhookOutcome:
        observation = observation_from_event(event)
        now = self.clock.now()
        if observation is None:
            draft = self._draft(order, AuditStep.IGNORED, event, now, source, reason=event.type)
            await self._commit(
                inbox,
                got,
                order,
                new_state=None,
                drafts=(draft,),
                effects=(),
                status=InboxStatus.IGNORED,
            )
            return WebhookOutcome.IGNORED
        transition = apply(order.state, observation)
        # The transition names its own steps: ignored_stale and rejected included.
        drafts = tuple(
            self._draft(order, step, event, now, source, transition=transition)
            for step in transition.steps
        )
        new_state = transition.after if transition.changed else None
        effects = self._effects_for(order, transition)
        self.faults.reach(FaultPoint.WEBHOOK_BEFORE_COMMIT)
        await self._commit(
            inbox,
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
        inbox: InboxEvent,
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
                event=inbox,
                status=status,
                expected_status=got.stored_status,
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
        source: AuditSource,
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
            source=source,
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

    # --- journal --------------------------------------------------------------------------

    async def _note(
        self,
        step: AuditStep,
        source: AuditSource,
        *,
        tenant: str = "",
        order_id: str | None = None,
        event_id: str | None = None,
        key_digest: str | None = None,
        reason: str | None = None,
    ) -> None:
        """Log a decision that changed nothing and queue it for the journal.

        The journal is written in batches (``journal_batch`` entries, or ``journal_interval``
        after the oldest): one request in a batch pays for one write, the others for none.
        Never raises for the journal's sake.
        """
        log_decision(
            step,
            source=source,
            tenant=tenant,
            order_id=order_id,
            event_id=event_id,
            key_digest=key_digest,
            reason=reason,
        )
        if self._journal_store is None:
            return
        now = self.clock.now()
        entry = JournalEntry(tenant, order_id, step, source, now, event_id, key_digest, reason)
        with self._pending_lock:
            if len(self._pending) >= self.config.journal_capacity:
                self._journal_dropped += 1
                return
            self._pending.append(entry)
            due = (
                len(self._pending) >= self.config.journal_batch
                or now - self._pending[0].at >= self.config.journal_interval
            )
        if due:
            await self.flush_journal()

    async def flush_journal(self) -> int:
        """Write the decisions queued by this guard to the journal now; return how many.

        :meth:`dispatch_effects` and :meth:`inspect_order` call it; call it at shutdown too.
        A failed write keeps the entries for the next flush (up to ``journal_capacity``).
        """
        if self._journal_store is None:
            return 0
        with self._pending_lock:
            batch, self._pending = self._pending, []
            dropped, self._journal_dropped = self._journal_dropped, 0
        if dropped:
            logger.warning("journal full: %d decisions were logged but not journaled", dropped)
        if not batch:
            return 0
        try:
            await self._journal_store.append_journal(batch)
        except IdempayError as error:
            logger.warning("the journal could not be written (%s); kept for later", error)
            with self._pending_lock:
                room = max(0, self.config.journal_capacity - len(self._pending))
                self._pending[:0] = batch[-room:] if room else []
            return 0
        return len(batch)

    # --- locks ----------------------------------------------------------------------------

    async def _lock_once(self, name: str) -> tuple[Any, bool]:
        """Try the lock without waiting: ``(lease, False)``, or ``(None, True)`` when another
        holds it; ``(None, False)`` without a lock provider, or when it failed."""
        lease, failed = await self._acquire(name, timedelta(0))
        return lease, lease is None and not failed and self.locks is not None

    async def _lock(self, name: str, *, wait: timedelta = timedelta(0)) -> Any:
        lease, _ = await self._acquire(name, wait)
        return lease

    async def _acquire(self, name: str, wait: timedelta) -> tuple[Any, bool]:
        """``(lease or None, whether the provider failed)``; None when it stays busy for
        ``wait``: carry on, the database guards suffice."""
        if self.locks is None:
            return None, False
        try:
            return await self.locks.acquire(name, ttl=self.config.lock_ttl, wait=wait), False
        except LockError:
            if self.config.lock_failure is LockFailurePolicy.FAIL_CLOSED:
                raise ServiceUnavailableError(
                    "the lock service is unavailable", retry_after=1
                ) from None
            logger.warning("lock provider failed; continuing with the database guards alone")
            return None, True

    async def _unlock(self, name: str, lease: Any) -> None:
        if self.locks is None or lease is None:
            return
        try:
            released = await self.locks.release(name, lease)
        except LockError:
            logger.warning("lock release failed; the lock expires by itself")
            return
        if not released:
            # The lock ran out while the work went on. Harmless: the database carried the
            # guarantees; a long handler only means more contention for its duplicates.
            logger.info("lock expired before its release; lock_ttl may be too short")

    # --- outbox ---------------------------------------------------------------------------

    async def dispatch_effects(self, *, limit: int = 100) -> DispatchReport:
        """Run up to ``limit`` due effects; safe with any number of dispatchers at once.

        Each effect runs at least once; a failing one is retried with exponential backoff
        and dead-lettered after ``GuardConfig.effect_max_attempts`` attempts (kept, never
        dropped). An effect whose dispatcher died is handed to another once its lease ran out.
        The decisions this guard queued for the journal are written first.
        """
        await self.flush_journal()
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
            with observed("effect", effect=entry.effect) as op:
                try:
                    await registered.run(context)
                except Exception as exc:  # noqa: BLE001 - any failure of user code is retried
                    op.outcome = "error"
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


_INTENT_PREFERENCE: Final = (
    "succeeded",
    "processing",
    "requires_capture",
    "requires_action",
    "requires_confirmation",
    "requires_payment_method",
)


def _log_committed(drafts: list[AuditDraft]) -> None:
    """Mirror audit entries to the log (and the observers) once their transaction committed:
    an attempt rolled back and retried is neither logged nor counted twice."""
    for draft in drafts:
        log_draft(draft)


def _same_failure(order: OrderRecord, intent: PaymentIntentSnapshot) -> bool:
    """Whether a polled PaymentIntent only shows the failure the order recorded already.

    A snapshot carries no time of its own: applied, it would count as one more failed attempt
    at every poll (and send its effect again). A new attempt that failed comes as an event, or
    as the answer of the confirmation that made it.
    """
    return (
        order.state.status is OrderStatus.PAYMENT_FAILED
        and intent.status == "requires_payment_method"
        and intent.last_payment_error_code is not None
    )


def _intent_preference(intent: PaymentIntentSnapshot) -> int:
    """Rank a PaymentIntent by how far along it is (lower first); canceled ones last."""
    status = intent.status
    return (
        _INTENT_PREFERENCE.index(status)
        if status in _INTENT_PREFERENCE
        else len(_INTENT_PREFERENCE)
    )


def _store_unavailable(error: StoreError) -> ServiceUnavailableError:
    """A store failure (a lost connection, a lost commit acknowledgement) as a 503: the client
    retries with the same key, or Stripe delivers again, and finds what was committed."""
    logger.warning("a store failed (%s); answered 503 for a retry", type(error).__name__)
    return ServiceUnavailableError("the payment store is unavailable; retry", retry_after=1)
