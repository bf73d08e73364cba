"""``idempay demo``: a storm of double clicks and duplicated, reordered webhooks, in memory.

Checkouts are clicked one to three times at once; every Stripe event of every order is signed,
delivered one to four times, shuffled across orders and handed to several worker threads; then
the outbox is drained. At the end the invariants are measured from the stores: one order per
checkout, each order in the state its history leads to whatever the delivery order, each effect
once, every audit trail intact.

It runs the pure core and the in-memory backends only (no network, no database); the full
demo, over HTTP with the web adapters and the Stripe simulator, builds on it.
"""

from __future__ import annotations

import json
import random
import threading
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TextIO

from idempay.clock import FrozenClock
from idempay.core.audit import AuditDraft, AuditSource, AuditStep, verify_trail
from idempay.core.events import parse_event
from idempay.core.keys import Scope, key_digest, request_fingerprint
from idempay.core.models import InboxEvent, InboxStatus, NewEffect
from idempay.core.observe import observation_from_event
from idempay.core.orders import (
    PAID_STATUSES,
    OrderState,
    Outcome,
    PaymentObserved,
    PaymentPhase,
    apply,
    new_order,
)
from idempay.core.records import Execute, Replay, StoredResponse, decide
from idempay.core.signature import sign_payload, verify_signature
from idempay.core.strictjson import JSONValue
from idempay.memory import MemoryIdempotencyStore, MemoryPaymentStore
from idempay.protocols import PaymentTransaction

__all__ = ["DemoReport", "run_demo"]

_SECRETS = ("whsec_demo_current", "whsec_demo_previous")
_TENANT = "demo"
_START = 1_767_225_600  # 2026-01-01T00:00:00Z, where FrozenClock starts
_DAY = 86_400
_LEASE = timedelta(seconds=30)
_RETAIN = timedelta(hours=24)

# Stripe histories the demo draws from: (event type, PaymentIntent status) in time order.
_SUCCEEDED = ("payment_intent.succeeded", "succeeded")
_FAILED = ("payment_intent.payment_failed", "requires_payment_method")
_PROCESSING = ("payment_intent.processing", "processing")
_HISTORIES: tuple[tuple[tuple[str, str], ...], ...] = (
    (_SUCCEEDED,),  # a card
    (("payment_intent.requires_action", "requires_action"), _SUCCEEDED),  # 3-D Secure
    (_FAILED, _SUCCEEDED),  # declined, then paid with another card
    (_PROCESSING, _SUCCEEDED),  # a bank debit that clears
    (_PROCESSING, _FAILED),  # a bank debit that bounces
    (_FAILED,),  # declined, abandoned
    (_SUCCEEDED, ("charge.refunded", "partial"), ("charge.refunded", "full")),
)


@dataclass
class DemoReport:
    """What the demo measured. ``violations`` lists every broken invariant."""

    orders: int = 0
    clicks: int = 0
    clicks_absorbed: int = 0
    deliveries: int = 0
    duplicates_absorbed: int = 0
    stale_ignored: int = 0
    effects_sent: int = 0
    audit_steps: int = 0
    paid: int = 0
    violations: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """The last line of the demo, ``key=value`` pairs starting with ``violations=``."""
        return (
            f"violations={len(self.violations)} orders={self.orders} clicks={self.clicks} "
            f"clicks_absorbed={self.clicks_absorbed} deliveries={self.deliveries} "
            f"duplicates_absorbed={self.duplicates_absorbed} stale_ignored={self.stale_ignored} "
            f"paid={self.paid} effects_sent={self.effects_sent} audit_steps={self.audit_steps}"
        )


@dataclass(frozen=True)
class _Order:
    order_id: str
    amount: int
    intent_id: str
    events: tuple[bytes, ...]


def _event_body(order: _Order, seq: int, event_type: str, status: str, at: int) -> bytes:
    if event_type == "charge.refunded":
        refunded = order.amount if status == "full" else order.amount // 3
        obj: dict[str, object] = {
            "id": f"ch_{order.order_id}",
            "object": "charge",
            "payment_intent": order.intent_id,
            "amount": order.amount,
            "amount_refunded": refunded,
            "currency": "eur",
            "refunded": status == "full",
            "status": "succeeded",
        }
    else:
        obj = {
            "id": order.intent_id,
            "object": "payment_intent",
            "status": status,
            "amount": order.amount,
            "amount_received": order.amount if status == "succeeded" else 0,
            "currency": "eur",
            "livemode": False,
            "metadata": {"order_id": order.order_id},
        }
    body = {
        "id": f"evt_{order.order_id}_{seq}",
        "object": "event",
        "type": event_type,
        "created": at,
        "livemode": False,
        "data": {"object": obj},
    }
    return json.dumps(body).encode()


def _make_orders(count: int, rng: random.Random) -> list[_Order]:
    orders = []
    for i in range(count):
        order_id = f"ord_{i:05d}"
        amount = rng.randrange(500, 50_000)
        history = rng.choice(_HISTORIES)
        draft = _Order(order_id, amount, f"pi_{order_id}", ())
        at = _START + i
        bodies = []
        for seq, (event_type, status) in enumerate(history):
            # Bank debits take days; cards take seconds.
            at += rng.choice((1, 30, 3 * _DAY))
            bodies.append(_event_body(draft, seq, event_type, status, at))
        orders.append(_Order(order_id, amount, draft.intent_id, tuple(bodies)))
    return orders


class _Shop:
    """A minimal checkout and webhook path over the core and the memory stores."""

    def __init__(self, clock: FrozenClock) -> None:
        self.clock = clock
        self.records = MemoryIdempotencyStore(clock=clock)
        self.store = MemoryPaymentStore(clock=clock)
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def _count(self, name: str) -> None:
        with self._lock:
            self.counts[name] += 1

    @staticmethod
    def _audit(
        tx: PaymentTransaction,
        order_id: str,
        step: AuditStep,
        *,
        source: AuditSource = AuditSource.WEBHOOK,
        event_id: str | None = None,
        digest: str | None = None,
    ) -> None:
        draft = AuditDraft(
            _TENANT, order_id, step, source, at=tx.now(), event_id=event_id, key_digest=digest
        )
        tx.append_audit(draft)

    def checkout(self, order: _Order) -> None:
        scope = Scope(operation="checkout", tenant=_TENANT)
        key = f"key-{order.order_id}"
        body: JSONValue = {"order_id": order.order_id, "amount": order.amount, "currency": "eur"}
        fingerprint = request_fingerprint("POST", "/checkout", body)
        claim = self.records.claim(
            scope.encode(), key, fingerprint, lease_for=_LEASE, retain_for=_RETAIN
        )
        decision = decide(claim, fingerprint, self.clock.now())
        if not isinstance(decision, Execute):
            self._count("replayed" if isinstance(decision, Replay) else "in_flight")
            return
        with self.store.transaction() as tx:
            created = new_order(amount=order.amount, currency="eur")
            record, inserted = tx.insert_order(_TENANT, order.order_id, created.after)
            if inserted:
                digest = key_digest(scope, key)
                self._audit(
                    tx,
                    order.order_id,
                    AuditStep.STARTED,
                    source=AuditSource.CHECKOUT,
                    digest=digest,
                )
                pending = apply(
                    record.state,
                    PaymentObserved(PaymentPhase.AWAITING_PAYMENT, _START, order.intent_id),
                )
                tx.update_order(record, pending.after)
                for step in pending.steps:
                    self._audit(tx, order.order_id, step, source=AuditSource.CHECKOUT)
        response = StoredResponse(201, json.dumps({"order_id": order.order_id}).encode())
        self.records.complete(scope.encode(), key, decision.lease, response)

    def deliver(self, raw: bytes, header: str) -> None:
        verify_signature(raw, header, _SECRETS, now=self.clock.now().timestamp(), tolerance=300)
        event = parse_event(raw, livemode=False)
        with self.store.transaction() as tx:
            received = InboxEvent(
                "",
                event.id,
                event.type,
                event.created,
                raw,
                tx.now(),
                payment_intent_id=event.payment_intent_id,
                order_id=event.order_id,
            )
            _, inserted = tx.insert_event(received)
            if not inserted:
                self._count("duplicate")
                return
            order = tx.find_order_by_payment_intent(event.payment_intent_id or "")
            observation = observation_from_event(event)
            if order is None or observation is None:
                tx.set_event_status("", event.id, InboxStatus.IGNORED)
                return
            transition = apply(order.state, observation)
            if transition.changed:
                tx.update_order(order, transition.after)
            for step in transition.steps:
                self._audit(tx, order.order_id, step, event_id=event.id)
            if transition.outcome is Outcome.STALE:
                self._count("stale")
                self._audit(tx, order.order_id, AuditStep.IGNORED_STALE, event_id=event.id)
            for effect in transition.effects:
                tx.enqueue_effect(
                    NewEffect(_TENANT, order.order_id, effect.trigger.value, effect.discriminator)
                )
            tx.set_event_status("", event.id, InboxStatus.PROCESSED, order_id=order.order_id)

    def dispatch(self) -> Counter[str]:
        sent: Counter[str] = Counter()
        while batch := self.store.claim_due_effects(limit=100, lease_for=_LEASE):
            for entry in batch:
                sent[entry.dedup_key] += 1
                self.store.finish_effect(entry)
        return sent


def _expected_final(order: _Order) -> OrderState:
    state = new_order(amount=order.amount, currency="eur").after
    created = PaymentObserved(PaymentPhase.AWAITING_PAYMENT, _START, order.intent_id)
    state = apply(state, created).after
    for raw in order.events:
        observation = observation_from_event(parse_event(raw))
        assert observation is not None  # every demo event is one idempay acts on
        state = apply(state, observation).after
    return state


def run_demo(
    *, orders: int = 200, workers: int = 4, seed: int = 7, out: TextIO | None = None
) -> DemoReport:
    """Run the storm and return what was measured; print progress to ``out`` if given."""
    rng = random.Random(seed)  # noqa: S311 - a reproducible simulation, not cryptography
    clock = FrozenClock()
    shop = _Shop(clock)
    plan = _make_orders(orders, rng)
    report = DemoReport(orders=orders)

    clicks = [o for o in plan for _ in range(rng.randint(1, 3))]
    rng.shuffle(clicks)
    report.clicks = len(clicks)
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(shop.checkout, clicks))
    _progress(out, "checkout", len(clicks))

    deliveries = [raw for o in plan for raw in o.events for _ in range(rng.randint(1, 4))]
    rng.shuffle(deliveries)
    # Each delivery is signed when it is sent, as Stripe signs every retry afresh.
    now = int(clock.now().timestamp())
    signed = [(raw, sign_payload(raw, _SECRETS, timestamp=now)) for raw in deliveries]
    report.deliveries = len(signed)
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda d: shop.deliver(*d), signed))
    _progress(out, "webhooks", len(signed))

    sent = shop.dispatch()
    report.effects_sent = sum(sent.values())
    report.clicks_absorbed = shop.counts["replayed"] + shop.counts["in_flight"]
    report.duplicates_absorbed = shop.counts["duplicate"]
    report.stale_ignored = shop.counts["stale"]
    _check(shop, plan, sent, report)
    return report


def _check(shop: _Shop, plan: Sequence[_Order], sent: Counter[str], report: DemoReport) -> None:
    with shop.store.transaction() as tx:
        for order in plan:
            record = tx.get_order(_TENANT, order.order_id)
            if record is None:
                report.violations.append(f"{order.order_id}: order lost")
                continue
            expected = _expected_final(order)
            if (record.state.status, record.state.amount_refunded) != (
                expected.status,
                expected.amount_refunded,
            ):
                report.violations.append(f"{order.order_id}: ended {record.state.status}")
            if record.state.status in PAID_STATUSES:
                report.paid += 1
            trail = tx.audit_trail(_TENANT, order.order_id)
            report.audit_steps += len(trail)
            if not verify_trail(trail).ok:
                report.violations.append(f"{order.order_id}: audit trail broken")
            if sum(1 for e in trail if e.step is AuditStep.STARTED) != 1:
                report.violations.append(f"{order.order_id}: not exactly one checkout")
    for key, times in sent.items():
        if times != 1:
            report.violations.append(f"effect {key} sent {times} times")


def _progress(out: TextIO | None, stage: str, n: int) -> None:
    if out is not None:
        out.write(f"  {stage:<10} {n:>6} done\n")
        out.flush()
