"""The webhook storm's events, the orders they pay, and the operations timed on each side.

Every delivery is a signed ``payment_intent.succeeded`` event for its own order. A contender
gets fresh first deliveries from a :class:`Supply`, whose orders are made before the timed
batches (and topped up between repetitions, outside the timing); duplicates come from a
:class:`Replays` pool of events the contender has already processed, delivered again in turn.
Both sides are given the same events (the same ids, bodies and PaymentIntents), each in its
own tables.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import sqlalchemy as sa

from idempay.backends import lock_provider_from_url, payment_store_from_url
from idempay.backends.sql import create_all
from idempay.core.orders import OrderState, OrderStatus
from idempay.core.signature import sign_payload
from idempay.engine import EffectContext, Guard, GuardConfig, GuardRequest

__all__ = [
    "SECRET",
    "Delivery",
    "Replays",
    "Supply",
    "brief_op",
    "idempay_guard",
    "idempay_op",
    "idempay_order_maker",
    "idempay_paid",
]

SECRET: Final = "whsec_webhook_storm"  # noqa: S105 - a test secret, signed and checked here
AMOUNT: Final = 1999
CHUNK: Final = 500

OrderMaker = Callable[[Sequence[tuple[str, str]]], None]
"""Create orders, given (order id, PaymentIntent id) pairs."""


@dataclass(frozen=True, slots=True)
class Delivery:
    """One webhook as Stripe sends it: the raw body and its ``Stripe-Signature`` header."""

    order_id: str
    intent: str
    body: bytes
    signature: str

    def resigned(self) -> Delivery:
        """The same event signed now (Stripe signs each delivery attempt afresh)."""
        header = sign_payload(self.body, SECRET, timestamp=int(time.time()))
        return Delivery(self.order_id, self.intent, self.body, header)


def event_body(*, order_id: str, intent: str, tenant: str) -> bytes:
    """A realistic ``payment_intent.succeeded`` event (about 500 bytes)."""
    return json.dumps(
        {
            "id": f"evt_{intent}",
            "object": "event",
            "api_version": "2024-06-20",
            "type": "payment_intent.succeeded",
            "created": 1_767_225_600,
            "livemode": False,
            "pending_webhooks": 1,
            "data": {
                "object": {
                    "id": intent,
                    "object": "payment_intent",
                    "status": "succeeded",
                    "amount": AMOUNT,
                    "amount_received": AMOUNT,
                    "currency": "eur",
                    "livemode": False,
                    "metadata": {"order_id": order_id, "idempay_tenant": tenant},
                }
            },
        }
    ).encode()


class Supply:
    """Fresh first deliveries for one contender, each for an order made ahead of time.

    ``tag`` names the events: two supplies with the same tag hand out the same events, in the
    same order. :meth:`top_up` runs outside the timed batches. Should a batch outrun the supply,
    :meth:`take` makes the order then and there, and counts it in :attr:`made_while_timed`.
    """

    def __init__(self, tag: str, tenant: str, make_orders: OrderMaker) -> None:
        self._tag = tag
        self._tenant = tenant
        self._make = make_orders
        self._fresh: deque[Delivery] = deque()
        self._lock = threading.Lock()
        self._made = 0
        self.processed: list[Delivery] = []
        self.made_while_timed = 0
        self._taken = 0
        self._taken_at_mark = 0
        self.most_per_batch = 0

    @property
    def intent_prefix(self) -> str:
        """What the PaymentIntent ids of this supply's orders, and theirs only, start with."""
        return f"pi_{self._tag}_"

    def _new(self, count: int) -> list[Delivery]:
        with self._lock:
            first, self._made = self._made, self._made + count
        pairs = [
            (f"o-{self._tag}-{n}", f"{self.intent_prefix}{n}") for n in range(first, first + count)
        ]
        for start in range(0, len(pairs), CHUNK):
            self._make(pairs[start : start + CHUNK])
        now = int(time.time())
        out = []
        for order_id, intent in pairs:
            body = event_body(order_id=order_id, intent=intent, tenant=self._tenant)
            out.append(Delivery(order_id, intent, body, sign_payload(body, SECRET, timestamp=now)))
        return out

    def top_up(self, count: int) -> None:
        """Have at least ``count`` fresh deliveries ready."""
        missing = count - len(self._fresh)
        if missing > 0:
            self._fresh.extend(self._new(missing))

    def mark(self, *, count: bool = True) -> None:
        """Between two batches: remember the most one batch has taken (``count``), and start
        counting the next one."""
        taken = self._taken
        if count:
            self.most_per_batch = max(self.most_per_batch, taken - self._taken_at_mark)
        self._taken_at_mark = taken

    def take(self, _worker: int = 0) -> Delivery:
        while True:
            try:
                delivery = self._fresh.popleft()
                break
            except IndexError:
                # Ran short inside a timed batch: a chunk at once, counted (and reported).
                with self._lock:
                    self.made_while_timed += CHUNK
                self._fresh.extend(self._new(CHUNK))
        with self._lock:
            self._taken += 1
        return delivery


class Replays:
    """Deliveries processed before, handed out again in turn (re-signed once, untimed).

    Each worker replays its own share of them (worker ``w`` the ones at ``w`` modulo
    ``shares``), so that no two workers deliver the same event at the same time: the brief's
    lock would turn such a pair into a refusal rather than a duplicate.
    """

    def __init__(self, processed: Sequence[Delivery], *, shares: int = 1) -> None:
        if len(processed) < shares:
            raise ValueError("fewer processed deliveries than shares to replay them in")
        pool = [d.resigned() for d in processed]
        self._shares = [pool[k::shares] for k in range(shares)]
        self._turns = [itertools.count() for _ in range(shares)]

    def take(self, worker: int) -> Delivery:
        share = worker % len(self._shares)
        mine = self._shares[share]
        return mine[next(self._turns[share]) % len(mine)]


SyncOp = Callable[[int], Callable[[int], object]]


def idempay_op(
    guard: Guard,
    take: Callable[[int], Delivery],
    *,
    expect: str,
    processed: list[Delivery] | None = None,
) -> SyncOp:
    """Deliver one webhook to ``guard.handle_webhook`` per call; check its outcome."""
    wanted = f'"outcome":"{expect}"'.encode()

    def factory(worker: int) -> Callable[[int], object]:
        def op(_i: int) -> None:
            delivery = take(worker)
            response = guard.handle_webhook(
                GuardRequest(
                    method="POST",
                    route="/stripe/webhook",
                    body=delivery.body,
                    headers={
                        "Content-Type": "application/json",
                        "Stripe-Signature": delivery.signature,
                    },
                )
            )
            if response.status != 200 or wanted not in response.body:
                raise AssertionError(f"idempay answered {response.status} {response.body!r}")
            if processed is not None:
                processed.append(delivery)

        return op

    return factory


def brief_op(
    handle: Callable[[bytes, str, int], str],
    take: Callable[[int], Delivery],
    *,
    expect: str,
    processed: list[Delivery] | None = None,
) -> SyncOp:
    """Deliver one webhook to the brief's handler per call; check its outcome."""

    def factory(worker: int) -> Callable[[int], object]:
        def op(_i: int) -> None:
            delivery = take(worker)
            outcome = handle(delivery.body, delivery.signature, worker)
            if outcome != expect:
                raise AssertionError(f"the brief's handler answered {outcome!r}")
            if processed is not None:
                processed.append(delivery)

        return op

    return factory


# --- idempay, built as an application builds it --------------------------------------------


def idempay_guard(db_url: str, lock_url: str, **lock_options: Any) -> Guard:
    """A sync Guard from URLs, the tables created, one effect registered on ``paid`` (so each
    payment also writes an outbox row; the benchmark never dispatches it)."""
    payments = payment_store_from_url(db_url)
    create_all(payments.engine)  # type: ignore[attr-defined]
    guard = Guard(
        payments=payments,
        locks=lock_provider_from_url(lock_url, **lock_options),
        config=GuardConfig(webhook_secrets=(SECRET,), livemode=False),
    )

    @guard.effect("receipt", on="paid")
    def receipt(ctx: EffectContext) -> None:  # pragma: no cover - never dispatched here
        raise AssertionError(f"not dispatched in the benchmark: {ctx.dedup_key}")

    return guard


def close_guard(guard: Guard) -> None:
    for part in (guard.payments, guard.locks):
        close = getattr(part, "close", None)
        if close is not None:
            close()


def idempay_order_maker(guard: Guard, tenant: str) -> OrderMaker:
    """Orders awaiting payment, with their PaymentIntent recorded, one transaction per call."""

    def make(pairs: Sequence[tuple[str, str]]) -> None:
        with guard.payments.transaction() as tx:
            for order_id, intent in pairs:
                state = OrderState(
                    OrderStatus.AWAITING_PAYMENT, AMOUNT, "eur", payment_intent_id=intent
                )
                tx.insert_order(tenant, order_id, state)

    return make


def idempay_paid(guard: Guard, tenant: str) -> dict[str, int]:
    """What idempay's tables hold for ``tenant``: paid orders, audit entries, outbox rows."""
    engine: sa.Engine = guard.payments.engine  # type: ignore[attr-defined]
    queries = {
        "paid": "SELECT count(*) FROM idempay_orders WHERE tenant = :t AND status = 'paid'",
        "audit": "SELECT count(*) FROM idempay_audit WHERE tenant = :t",
        "outbox": "SELECT count(*) FROM idempay_outbox WHERE tenant = :t",
    }
    with engine.connect() as conn:
        return {
            name: int(conn.execute(sa.text(query), {"t": tenant}).scalar_one())
            for name, query in queries.items()
        }
