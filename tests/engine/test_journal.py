"""The journal: decisions that changed nothing (duplicates, replays, refusals) written in
batches, off the hash-chained trail, and shown in an order's history."""

from __future__ import annotations

import json
from datetime import timedelta

import sqlalchemy as sa
from tests.engine.test_webhook_flow import SECRET, TENANT, Shop, event

from idempay.backends import payment_store_from_url
from idempay.backends.sql import upgrade
from idempay.clock import FrozenClock
from idempay.core.audit import AuditStep
from idempay.core.orders import OrderState, OrderStatus
from idempay.core.signature import sign_payload
from idempay.engine import Guard, GuardConfig, GuardRequest


def test_duplicates_are_journaled_in_batches() -> None:
    shop = Shop()
    shop.guard = Guard(
        payments=shop.payments,
        config=GuardConfig(webhook_secrets=(SECRET,), livemode=False, journal_batch=3),
        clock=shop.clock,
    )
    shop.order()
    body = event("evt_1", "payment_intent.succeeded")
    shop.deliver(body)
    shop.deliver(body)
    shop.deliver(body)
    # Two duplicates queued: nothing written yet, nothing read from the store by them.
    assert list(shop.payments.journal_for(TENANT, "o1")) == []
    shop.deliver(body)
    written = list(shop.payments.journal_for(TENANT, "o1"))
    assert [e.step for e in written] == [AuditStep.DUPLICATE] * 3
    assert {e.event_id for e in written} == {"evt_1"}


def test_a_queued_decision_waits_at_most_the_interval() -> None:
    shop = Shop()
    shop.guard = Guard(
        payments=shop.payments,
        config=GuardConfig(
            webhook_secrets=(SECRET,), livemode=False, journal_interval=timedelta(seconds=1)
        ),
        clock=shop.clock,
    )
    shop.order()
    body = event("evt_1", "payment_intent.succeeded")
    shop.deliver(body)
    shop.deliver(body)
    assert list(shop.payments.journal_for(TENANT, "o1")) == []
    shop.clock.advance(2)
    shop.deliver(body)
    assert len(shop.payments.journal_for(TENANT, "o1")) == 2
    shop.deliver(body)
    assert len(shop.payments.journal_for(TENANT, "o1")) == 2
    # The dispatcher flushes what is left.
    shop.guard.dispatch_effects()
    assert len(shop.payments.journal_for(TENANT, "o1")) == 3


def test_the_order_document_merges_trail_and_journal_in_time_order() -> None:
    shop = Shop()
    shop.order()
    shop.deliver(event("evt_1", "payment_intent.processing", status="processing", created=10))
    shop.clock.advance(1)
    shop.deliver(event("evt_1", "payment_intent.processing", status="processing", created=10))
    shop.clock.advance(1)
    shop.deliver(event("evt_2", "payment_intent.succeeded", created=20))
    document = shop.guard.inspect_order("o1", tenant=TENANT).to_document()
    assert [(a["step"], a["durable"]) for a in document["audit"]] == [
        ("processing", True),
        ("duplicate", False),
        ("succeeded", True),
    ]
    assert document["status"] == "paid"
    assert document["audit_verified"] is True


def _deliver(guard: Guard, body: bytes, clock: FrozenClock, signature: str | None = None) -> int:
    request = GuardRequest(
        method="POST",
        route="/stripe/webhook",
        body=body,
        headers={
            "Content-Type": "application/json",
            "Stripe-Signature": signature
            or sign_payload(body, SECRET, timestamp=int(clock.now().timestamp())),
        },
    )
    return guard.handle_webhook(request).status


def test_a_journal_that_cannot_be_written_never_fails_a_request(sqlite_url: str) -> None:
    upgrade(sqlite_url)
    clock = FrozenClock()
    payments = payment_store_from_url(sqlite_url, clock=clock)
    guard = Guard(
        payments=payments,
        config=GuardConfig(webhook_secrets=(SECRET,), livemode=False, journal_batch=1),
        clock=clock,
    )
    with payments.transaction() as tx:
        tx.insert_order(TENANT, "o1", OrderState(OrderStatus.AWAITING_PAYMENT, 1999, "eur", "pi_1"))
    body = event("evt_1", "payment_intent.succeeded")
    assert _deliver(guard, body, clock) == 200
    engine = sa.create_engine(sqlite_url)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("ALTER TABLE idempay_journal RENAME TO journal_away")
        # A duplicate and a forged delivery: both answered as usual, their entries kept.
        assert _deliver(guard, body, clock) == 200
        assert _deliver(guard, body, clock, signature="t=1,v1=00") == 400
        with engine.begin() as conn:
            conn.exec_driver_sql("ALTER TABLE journal_away RENAME TO idempay_journal")
        assert guard.flush_journal() == 2
        with engine.connect() as conn:
            rows = conn.exec_driver_sql(
                "SELECT step, order_id, reason FROM idempay_journal ORDER BY id"
            ).all()
    finally:
        engine.dispose()
        payments.close()  # type: ignore[attr-defined]
    assert [tuple(r) for r in rows] == [
        ("duplicate", "o1", None),
        ("rejected", None, "invalid_signature"),
    ]


def test_a_store_without_a_journal_logs_only() -> None:
    class Bare:
        """A payment store with no journal methods: the journal is optional."""

        def __init__(self, inner: object) -> None:
            self._inner = inner

        def __getattr__(self, name: str) -> object:
            if name in ("append_journal", "journal_for"):
                raise AttributeError(name)
            return getattr(self._inner, name)

    shop = Shop()
    shop.guard = Guard(
        payments=Bare(shop.payments),  # type: ignore[arg-type]
        config=GuardConfig(webhook_secrets=(SECRET,), livemode=False, journal_batch=1),
        clock=shop.clock,
    )
    shop.order()
    body = json.loads(event("evt_1", "payment_intent.succeeded"))
    raw = json.dumps(body).encode()
    shop.deliver(raw)
    assert shop.deliver(raw).json()["outcome"] == "duplicate"
    assert shop.guard.flush_journal() == 0
    view = shop.guard.inspect_order("o1", tenant=TENANT)
    assert view.decisions == ()


def test_checkout_replays_and_mismatches_are_journaled_on_their_order(
    localstripe_url: str,
) -> None:
    from tests.engine.test_checkout_flow import Shop as CheckoutShop
    from tests.engine.test_checkout_flow import uid

    shop = CheckoutShop(localstripe_url)
    try:
        order_id = f"o-{uid()}"
        body = {"order_id": order_id, "amount": 1200}
        assert shop.post(body, key=f"k-{order_id}").status == 201
        assert shop.post(body, key=f"k-{order_id}").status == 201
        assert shop.post({**body, "amount": 1}, key=f"k-{order_id}").status == 422
        view = shop.guard.inspect_order(order_id, tenant="shop")
    finally:
        shop.gateway.close()
    assert [d.step for d in view.decisions] == [AuditStep.REPLAYED, AuditStep.MISMATCH]
    digests = {d.key_digest for d in view.decisions}
    assert len(digests) == 1
    assert None not in digests
    assert f"k-{order_id}" not in json.dumps(view.to_document())
