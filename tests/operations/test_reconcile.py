"""The reconciler against the Stripe simulator and real databases: webhooks that never arrive
(W13), bank debits processing for days, checkouts that died after their Stripe call, and
reconcilers and dispatchers racing in several processes.

Every webhook is dropped by the simulator (its ``drop_probability`` is 1): whatever an order
learns, it learns from the reconciler. Charges are counted on the simulator's side.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import secrets
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from storefront import Storefront

from idempay import parse_event
from idempay.backends import (
    async_payment_store_from_url,
    payment_store_from_url,
)
from idempay.clock import FrozenClock
from idempay.core.audit import AuditSource, AuditStep
from idempay.core.orders import OrderStatus
from idempay.core.signature import sign_payload
from idempay.engine import (
    AsyncGuard,
    EffectContext,
    FaultPoint,
    Guard,
    GuardConfig,
    GuardRequest,
)
from idempay.gateway import AsyncStripeGateway, StripeGateway
from idempay.operations import AsyncReconciler, Checked, ReconcileConfig, Reconciler
from idempay.testing.simulator import DeliveryPolicy, StripeSimulator, WebhookEndpoint

TENANT = "recon"
SECRET = "whsec_reconcile"
NOW = ReconcileConfig(
    older_than=timedelta(0), recheck_min=timedelta(0), recheck_max=timedelta(0), backfill=False
)
"""Check every unsettled order at every run (the tests' clock does not wait for backoffs),
from the PaymentIntents alone (the backfill has its own test)."""


class CrashError(Exception):
    """Stands for a process that died at a fault point."""


class Shop(Storefront):
    """The storefront on the simulator, with a receipt effect that counts its runs per order."""

    def __init__(self, url: str, sim: StripeSimulator) -> None:
        super().__init__(
            url,
            api_key=sim.api_key,
            api_base=sim.url,
            tenant=TENANT,
            config=GuardConfig(webhook_secrets=(SECRET,)),
        )
        self.sim = sim
        self.receipts: Counter[str] = Counter()
        self.tag = secrets.token_hex(3)

        @self.guard.effect("receipt", on="paid")
        def receipt(effect: EffectContext) -> None:
            self.receipts[effect.order_id] += 1

    def oid(self, name: str) -> str:
        """An order id of this test's own (a database may be shared by several tests)."""
        return f"{name}-{self.tag}"

    def reconcile(self, config: ReconcileConfig = NOW) -> Any:
        return Reconciler(self.guard, config=config).run_once()

    def dispatch(self) -> None:
        while self.guard.dispatch_effects(limit=100).done:
            pass

    def charges(self, intent_id: str) -> list[dict[str, Any]]:
        return [c for c in self.sim.charges() if c["payment_intent"] == intent_id]


@pytest.fixture
def sim() -> Iterator[StripeSimulator]:
    dropped = DeliveryPolicy(drop_probability=1.0)
    endpoint = WebhookEndpoint("http://127.0.0.1:9/stripe/webhook", SECRET)
    with StripeSimulator(webhook_endpoints=[endpoint], delivery=dropped, seed=3) as simulator:
        yield simulator


@pytest.fixture(params=["sqlite", "postgres", "mysql"])
def shop(request: pytest.FixtureRequest, sim: StripeSimulator, tmp_path: Path) -> Iterator[Shop]:
    url = (
        f"sqlite:///{tmp_path / 'reconcile.db'}"
        if request.param == "sqlite"
        else request.getfixturevalue(f"own_{request.param}_url")
    )
    shop = Shop(url, sim)
    yield shop
    shop.close()


def test_w13_a_webhook_that_never_arrives_is_made_up_for_once(shop: Shop) -> None:
    o = shop.oid("w13")
    intent = shop.awaiting(o)
    shop.pay_in_browser(intent)
    assert shop.status(o) is OrderStatus.AWAITING_PAYMENT  # the webhook was dropped

    first = shop.reconcile()
    assert [(c.order_id, c.result, c.after) for c in first.checks] == [
        (o, Checked.CHANGED, OrderStatus.PAID)
    ]
    again = shop.reconcile()
    assert [(c.order_id, c.result) for c in again.checks] == []  # paid: settled, not checked
    shop.dispatch()

    assert shop.status(o) is OrderStatus.PAID
    assert shop.receipts == Counter({o: 1})
    assert len(shop.charges(intent)) == 1
    assert (AuditStep.SUCCEEDED, AuditSource.RECONCILER) in shop.trail(o)

    # The lost webhook finally arrives (replayed from Stripe): a no-op.
    late = [e for e in shop.sim.events() if e["type"] == "payment_intent.succeeded"]
    assert len(late) == 1
    raw = json.dumps(late[0]).encode()

    outcome = shop.guard.process_event(parse_event(raw), raw)
    assert outcome.value in {"unchanged", "stale"}
    shop.dispatch()
    assert shop.receipts == Counter({o: 1})


def test_w13_the_backfill_applies_undelivered_events(shop: Shop) -> None:
    o = shop.oid("bf")
    intent = shop.awaiting(o)
    shop.pay_in_browser(intent)
    only_backfill = ReconcileConfig(older_than=timedelta(0), max_orders=0, max_events=0)

    report = shop.reconcile(only_backfill)
    assert report.checks == []
    assert report.backfill["applied"] >= 1
    assert shop.status(o) is OrderStatus.PAID
    assert (AuditStep.SUCCEEDED, AuditSource.RECONCILER) in shop.trail(o)

    again = shop.reconcile(only_backfill)
    assert set(again.backfill) <= {"duplicate", "unchanged", "stale"}
    shop.dispatch()
    assert shop.receipts == Counter({o: 1})
    assert len(shop.charges(intent)) == 1


@pytest.mark.parametrize("succeed", [True, False], ids=["clears", "bounces"])
def test_a_bank_debit_processing_for_days_is_never_canceled(shop: Shop, succeed: bool) -> None:
    o = shop.oid("debit")
    intent = shop.awaiting(o)
    shop.pay_in_browser(intent, "pm_sepa_debit")

    for _day in range(7):
        report = shop.reconcile()
        assert [c.after for c in report.checks] == [OrderStatus.PROCESSING]
        shop.sim.advance_clock(86400)
    assert shop.status(o) is OrderStatus.PROCESSING
    assert [pi["status"] for pi in shop.sim.payment_intents() if pi["id"] == intent] == [
        "processing"
    ]
    shop.dispatch()
    assert shop.receipts == Counter()

    shop.sim.release_debit(intent, succeed=succeed)
    report = shop.reconcile()
    final = OrderStatus.PAID if succeed else OrderStatus.PAYMENT_FAILED
    assert [(c.result, c.after) for c in report.checks] == [(Checked.CHANGED, final)]
    shop.dispatch()
    assert shop.receipts == (Counter({o: 1}) if succeed else Counter())
    steps = [step for step, source in shop.trail(o) if source is AuditSource.RECONCILER]
    assert steps == [AuditStep.PROCESSING, AuditStep.SUCCEEDED if succeed else AuditStep.FAILED]


def test_a_charge_whose_answer_was_lost_is_finished_by_the_reconciler(shop: Shop) -> None:
    o = shop.oid("lost")
    # Stripe charges the card, and the connection drops before the answer: unknown outcome.
    shop.sim.reset_next("/v1/payment_intents/*/confirm")
    lost = shop.checkout(o, payment_method="pm_card_visa")
    assert lost.status == 503, lost.body
    assert shop.status(o) is OrderStatus.AWAITING_PAYMENT

    report = shop.reconcile()
    assert [(c.result, c.after) for c in report.checks] == [(Checked.CHANGED, OrderStatus.PAID)]
    (intent,) = [pi["id"] for pi in shop.sim.payment_intents()]
    assert len(shop.charges(intent)) == 1

    # The customer's retry finds the order paid: the same answer, no second charge.
    retry = shop.checkout(o, payment_method="pm_card_visa")
    assert retry.status == 201, retry.body
    assert retry.json()["status"] == "paid"
    assert len(shop.charges(intent)) == 1
    shop.dispatch()
    assert shop.receipts == Counter({o: 1})
    trail = shop.trail(o)
    assert (AuditStep.OUTCOME_UNKNOWN, AuditSource.CHECKOUT) in trail
    assert (AuditStep.SUCCEEDED, AuditSource.RECONCILER) in trail


def test_a_checkout_that_died_before_recording_its_intent_is_found_by_metadata(
    shop: Shop,
) -> None:
    o = shop.oid("crash")

    def crash() -> None:
        raise CrashError

    shop.guard.faults.arm(FaultPoint.CHECKOUT_AFTER_STRIPE, crash)
    with pytest.raises(CrashError):
        shop.checkout(o, payment_method="pm_card_visa")
    assert shop.status(o) is OrderStatus.CREATED  # the PaymentIntent was never recorded

    report = shop.reconcile()
    assert [(c.result, c.after) for c in report.checks] == [
        (Checked.CHANGED, OrderStatus.AWAITING_PAYMENT)
    ]
    # Never confirmed by the reconciler: that is the customer's call. Their retry pays once.
    retry = shop.checkout(o, payment_method="pm_card_visa")
    assert retry.status == 201, retry.body
    assert retry.json()["status"] == "paid"
    (intent,) = [pi["id"] for pi in shop.sim.payment_intents()]
    assert len(shop.charges(intent)) == 1


def test_a_kept_event_naming_no_order_is_applied_through_its_payment_intent(
    shop: Shop,
) -> None:
    o = shop.oid("kept")

    def crash() -> None:
        raise CrashError

    shop.guard.faults.arm(FaultPoint.CHECKOUT_AFTER_STRIPE, crash)
    with pytest.raises(CrashError):
        shop.checkout(o, payment_method="pm_card_visa")
    (intent,) = shop.gateway.find_payment_intents(order_id=o)
    shop.stripe.v1.payment_intents.confirm(intent.id)

    # Its success arrives without the metadata that would name the order, whose PaymentIntent
    # was never recorded: nothing to apply it to, so it is kept.
    (event,) = [e for e in shop.sim.events() if e["type"] == "payment_intent.succeeded"]
    event["data"]["object"]["metadata"] = {}
    body = json.dumps(event).encode()
    now = int(time.time())
    kept = shop.guard.handle_webhook(
        GuardRequest(
            method="POST",
            route="/stripe/webhook",
            body=body,
            headers={
                "Content-Type": "application/json",
                "Stripe-Signature": sign_payload(body, SECRET, timestamp=now),
            },
        )
    )
    assert kept.json()["outcome"] == "orphaned", kept.body

    # The kept events alone (no order checks, no backfill): Stripe names the order.
    only_events = replace(NOW, max_orders=0)
    report = shop.reconcile(only_events)
    assert (report.checks, dict(report.events)) == ([], {"applied": 1})
    assert shop.status(o) is OrderStatus.PAID
    assert shop.reconcile(only_events).events == {}  # applied: no longer kept
    shop.dispatch()
    assert shop.receipts == Counter({o: 1})


def test_an_order_whose_checkout_never_reached_stripe_is_left_alone(shop: Shop) -> None:
    o = shop.oid("early")

    def crash() -> None:
        raise CrashError

    shop.guard.faults.arm(FaultPoint.CHECKOUT_AFTER_ORDER, crash)
    with pytest.raises(CrashError):
        shop.checkout(o)
    report = shop.reconcile()
    assert [(c.result, c.after) for c in report.checks] == [
        (Checked.NO_PAYMENT, OrderStatus.CREATED)
    ]
    assert shop.sim.payment_intents() == []


def test_orders_younger_than_the_threshold_wait(shop: Shop) -> None:
    o = shop.oid("young")
    intent = shop.awaiting(o)
    shop.pay_in_browser(intent)
    patient = ReconcileConfig(older_than=timedelta(hours=1), backfill=False)
    assert shop.reconcile(patient).checks == []
    assert shop.status(o) is OrderStatus.AWAITING_PAYMENT


def test_a_checked_order_waits_for_its_next_check(shop: Shop) -> None:
    o = shop.oid("wait")
    shop.awaiting(o)
    backoff = ReconcileConfig(older_than=timedelta(0), backfill=False)
    assert [c.result for c in shop.reconcile(backoff).checks] == [Checked.UNCHANGED]
    assert shop.reconcile(backoff).checks == []  # rechecked after recheck_min, not at once


def test_a_failed_payment_polled_again_is_not_another_failure(shop: Shop) -> None:
    o = shop.oid("declined")
    declined = shop.checkout(o, payment_method="pm_card_chargeDeclined")
    assert declined.json()["status"] == "payment_failed", declined.body
    for _ in range(3):
        assert [c.result for c in shop.reconcile().checks] == [Checked.UNCHANGED]
    with shop.payments.transaction() as tx:
        order = tx.get_order(TENANT, o)
    assert order is not None
    assert order.state.failures == 1
    assert [step for step, _ in shop.trail(o)].count(AuditStep.FAILED) == 1

    # The customer pays with another card later, and its webhook is lost: found by a poll.
    shop.pay_in_browser(str(declined.json()["payment_intent_id"]))
    assert [(c.result, c.after) for c in shop.reconcile().checks] == [
        (Checked.CHANGED, OrderStatus.PAID)
    ]


def test_an_order_abandoned_by_its_customer_is_parked_but_a_debit_never(shop: Shop) -> None:
    gone, debit = shop.oid("gone"), shop.oid("slow-debit")
    shop.awaiting(gone)
    shop.pay_in_browser(shop.awaiting(debit), "pm_sepa_debit")
    shop.guard.clock = FrozenClock(datetime.now(UTC) + timedelta(days=31))

    report = shop.reconcile()
    assert sorted((c.order_id, c.result, c.after) for c in report.checks) == sorted(
        [
            (gone, Checked.ABANDONED, OrderStatus.AWAITING_PAYMENT),
            (debit, Checked.CHANGED, OrderStatus.PROCESSING),
        ]
    )
    # Parked for good, even with every recheck due at once; the debit stays watched.
    assert [(c.order_id, c.result) for c in shop.reconcile().checks] == [(debit, Checked.UNCHANGED)]


# --- several processes --------------------------------------------------------------------


def _reconcile_in_child(url: str, api_key: str, api_base: str, barrier: Any, out: Any) -> None:
    payments = payment_store_from_url(url)
    gateway = StripeGateway.from_settings(api_key, api_base=api_base)
    guard = Guard(payments=payments, gateway=gateway, config=GuardConfig())
    guard.effect("receipt", on="paid")(lambda _ctx: None)
    # Without the backfill, whose events would pay the orders one of them has not claimed.
    config = ReconcileConfig(older_than=timedelta(0), batch=5, backfill=False)
    reconciler = Reconciler(guard, config=config)
    barrier.wait()
    checked: list[str] = []
    while report := reconciler.run_once().checks:  # until this one finds nothing left
        checked += [c.order_id for c in report]
    out.put(checked)
    gateway.close()


def _dispatch_in_child(url: str, log: str, barrier: Any, out: Any) -> None:
    guard = Guard(payments=payment_store_from_url(url), config=GuardConfig())

    def receipt(effect: EffectContext) -> None:
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            os.write(fd, f"{effect.dedup_key}\n".encode())
        finally:
            os.close(fd)

    guard.effect("receipt", on="paid")(receipt)
    barrier.wait()
    done = 0
    while (report := guard.dispatch_effects(limit=3)).done or report.retried:
        done += report.done
    out.put(done)


@pytest.mark.parametrize("backend", ["postgres", "mysql"])
def test_two_reconcilers_and_two_dispatchers_each_handle_a_row_once(
    backend: str, request: pytest.FixtureRequest, sim: StripeSimulator, tmp_path: Path
) -> None:
    url = request.getfixturevalue(f"own_{backend}_url")
    shop = Shop(url, sim)
    orders = [f"race-{i}" for i in range(24)]
    try:
        for order_id in orders:
            shop.pay_in_browser(shop.awaiting(order_id))
    finally:
        shop.close()

    ctx = multiprocessing.get_context("spawn")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    children = [
        ctx.Process(target=_reconcile_in_child, args=(url, sim.api_key, sim.url, barrier, out))
        for _ in range(2)
    ]
    for child in children:
        child.start()
    checked = [out.get(timeout=120) for _ in children]
    for child in children:
        child.join(60)
        assert child.exitcode == 0
    assert sorted(checked[0] + checked[1]) == sorted(orders)  # every order, each once

    log = str(tmp_path / "receipts.log")
    barrier = ctx.Barrier(2)
    children = [
        ctx.Process(target=_dispatch_in_child, args=(url, log, barrier, out)) for _ in range(2)
    ]
    for child in children:
        child.start()
    done = [out.get(timeout=120) for _ in children]
    for child in children:
        child.join(60)
        assert child.exitcode == 0
    sent = Path(log).read_text().split()
    assert sum(done) == len(orders) == len(sent) == len(set(sent))

    verify = Shop(url, sim)
    try:
        assert {verify.status(o) for o in orders} == {OrderStatus.PAID}
        assert all(len(verify.trail(o)) >= 3 for o in orders)
    finally:
        verify.close()


# --- asyncio ------------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_the_async_reconciler_runs_as_a_worker_until_stopped(
    backend: str, request: pytest.FixtureRequest, sim: StripeSimulator, tmp_path: Path
) -> None:
    url = (
        f"sqlite:///{tmp_path / 'async.db'}"
        if backend == "sqlite"
        else request.getfixturevalue("own_postgres_url")
    )
    shop = Shop(url, sim)  # the sync shop takes the order; the async guard reconciles it
    try:
        o = shop.oid("async")
        shop.pay_in_browser(shop.awaiting(o))
    finally:
        shop.close()

    payments = async_payment_store_from_url(url)
    gateway = AsyncStripeGateway.from_settings(sim.api_key, api_base=sim.url)
    guard = AsyncGuard(payments=payments, gateway=gateway, config=GuardConfig())
    receipts: list[str] = []

    @guard.effect("receipt", on="paid")
    async def receipt(effect: EffectContext) -> None:
        receipts.append(effect.order_id)

    stop = asyncio.Event()

    def progress(stage: str, _done: int, _total: int | None) -> None:
        if stage == "events":  # the orders of the first run are done: stop after this run
            stop.set()

    reconciler = AsyncReconciler(guard, config=NOW)
    try:
        await reconciler.run_forever(stop, interval=timedelta(hours=1), progress=progress)
        while (await guard.dispatch_effects()).done:
            pass
        async with payments.transaction() as tx:
            order = await tx.get_order(TENANT, o)
    finally:
        await gateway.aclose()
        await payments.aclose()  # type: ignore[attr-defined]
    assert order is not None
    assert order.state.status is OrderStatus.PAID
    assert receipts == [o]


# --- localstripe --------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_w13_against_localstripe_a_checkout_that_died_is_paid_once(
    backend: str, request: pytest.FixtureRequest, localstripe_url: str, tmp_path: Path
) -> None:
    """localstripe as Stripe: it sends no webhook here, has no events list (no backfill) and
    ignores idempotency keys, so whatever pays the order once is idempay's own doing."""
    url = (
        f"sqlite:///{tmp_path / 'ls.db'}"
        if backend == "sqlite"
        else request.getfixturevalue("own_postgres_url")
    )
    server = SimpleNamespace(api_key="sk_test_idempay_reconcile", url=localstripe_url)
    shop = Shop(url, server)  # type: ignore[arg-type]
    try:
        o = shop.oid("ls")

        def crash() -> None:
            raise CrashError

        # The checkout dies after creating the PaymentIntent, before recording it...
        shop.guard.faults.arm(FaultPoint.CHECKOUT_AFTER_STRIPE, crash)
        with pytest.raises(CrashError):
            shop.checkout(o, payment_method="pm_card_visa")
        (intent,) = shop.gateway.find_payment_intents(order_id=o)
        # ... and the customer's browser confirms it: only a webhook would tell.
        shop.stripe.v1.payment_intents.confirm(intent.id)
        assert shop.status(o) is OrderStatus.CREATED

        config = replace(NOW, backfill=False)
        report = shop.reconcile(config)
        assert [(c.result, c.after) for c in report.checks] == [(Checked.CHANGED, OrderStatus.PAID)]
        assert shop.reconcile(config).checks == []
        shop.dispatch()
        assert shop.receipts == Counter({o: 1})
        assert [pi.id for pi in shop.gateway.find_payment_intents(order_id=o)] == [intent.id]
        retry = shop.checkout(o, payment_method="pm_card_visa")
        assert (retry.status, retry.json()["status"]) == (201, "paid")
        assert [pi.id for pi in shop.gateway.find_payment_intents(order_id=o)] == [intent.id]
    finally:
        shop.close()
