"""The checkout flow through the engine, against localstripe (a Stripe fake no one here wrote).

localstripe ignores Stripe idempotency keys (every create makes a new PaymentIntent), so any
"one PaymentIntent per order" seen here is idempay's own doing.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from idempay.core.audit import AuditStep, verify_trail
from idempay.core.orders import OrderStatus
from idempay.core.records import RecordState
from idempay.engine import FaultPoint, Guard, GuardConfig, GuardRequest, GuardResponse
from idempay.engine._checkout import CheckoutRequest, OrderSpec
from idempay.errors import InvalidFieldError
from idempay.gateway import StripeGateway
from idempay.memory import MemoryIdempotencyStore, MemoryPaymentStore, NoLockProvider

TENANT = "shop"


class Shop:
    def __init__(self, stripe_url: str) -> None:
        self.payments = MemoryPaymentStore()
        self.records = MemoryIdempotencyStore()
        self.gateway = StripeGateway.from_settings("sk_test_idempay", api_base=stripe_url)
        self.guard = Guard(
            payments=self.payments,
            records=self.records,
            gateway=self.gateway,
            locks=NoLockProvider(),
            config=GuardConfig(webhook_secrets=("whsec_x",)),
        )
        self.handled = 0
        self._count = threading.Lock()

        @self.guard.checkout(ignore=("sent_at",))
        def checkout(request: CheckoutRequest) -> OrderSpec:
            with self._count:
                self.handled += 1
            fields = request.fields
            if fields.optional_string("cart") == "empty":
                raise InvalidFieldError("/cart", "is empty")
            return OrderSpec(
                order_id=fields.identifier("order_id"),
                amount=fields.integer("amount", minimum=1),
                currency="eur",
                payment_method=fields.optional_string("payment_method"),
            )

        self.checkout = checkout

    def post(self, body: dict[str, Any], key: str | None = "k1", **kw: Any) -> GuardResponse:
        headers = {"Content-Type": "application/json"}
        if key is not None:
            headers["Idempotency-Key"] = key
        request = GuardRequest(
            method="POST",
            route="/checkout",
            body=json.dumps(body).encode(),
            headers=headers,
            tenant=kw.get("tenant", TENANT),
            user=kw.get("user", "u1"),
        )
        return self.checkout(request)

    def intents(self, order_id: str) -> list[str]:
        return [pi.id for pi in self.gateway.find_payment_intents(order_id=order_id)]

    def order(self, order_id: str, tenant: str = TENANT) -> Any:
        with self.payments.transaction() as tx:
            return tx.get_order(tenant, order_id)

    def trail(self, order_id: str) -> list[AuditStep]:
        with self.payments.transaction() as tx:
            entries = tx.audit_trail(TENANT, order_id)
        assert verify_trail(entries).ok
        return [e.step for e in entries]


@pytest.fixture
def shop(localstripe_url: str) -> Iterator[Shop]:
    shop = Shop(localstripe_url)
    yield shop
    shop.gateway.close()


def uid() -> str:
    import secrets

    return secrets.token_hex(6)


def test_c1_double_click_makes_one_payment_intent(shop: Shop) -> None:
    order_id = f"o-{uid()}"
    body = {"order_id": order_id, "amount": 1999, "payment_method": "pm_card_visa"}
    n = 8
    barrier = threading.Barrier(n)

    def click(_: int) -> GuardResponse:
        barrier.wait()
        return shop.post(body, key=f"click-{order_id}")

    with ThreadPoolExecutor(n) as pool:
        responses = list(pool.map(click, range(n)))
    statuses = sorted(r.status for r in responses)
    assert set(statuses) <= {201, 409}
    assert statuses.count(201) >= 1
    assert shop.handled == 1
    assert len(shop.intents(order_id)) == 1
    again = shop.post(body, key=f"click-{order_id}")
    assert (again.status, again.header("Idempotent-Replayed")) == (201, "true")
    first = next(r for r in responses if r.status == 201)
    assert again.body == first.body
    assert shop.order(order_id).state.status is OrderStatus.PAID
    assert shop.trail(order_id) == [AuditStep.STARTED, AuditStep.PENDING, AuditStep.SUCCEEDED]


def test_c2_two_keys_for_one_order_share_its_payment_intent(shop: Shop) -> None:
    order_id = f"o-{uid()}"
    a = shop.post({"order_id": order_id, "amount": 500}, key="key-a")
    b = shop.post({"order_id": order_id, "amount": 500}, key="key-b")
    assert (a.status, b.status) == (201, 201)
    assert a.json()["payment_intent_id"] == b.json()["payment_intent_id"]
    assert len(shop.intents(order_id)) == 1
    assert a.json()["client_secret"]


def test_c3_same_key_other_amount_is_422_and_runs_nothing(shop: Shop) -> None:
    order_id = f"o-{uid()}"
    assert shop.post({"order_id": order_id, "amount": 500}).status == 201
    other = shop.post({"order_id": order_id, "amount": 900})
    assert other.status == 422
    assert other.json()["code"] == "idempotency_key_reused"
    assert shop.handled == 1
    # A field named in ``ignore`` does not count.
    assert shop.post({"order_id": order_id, "amount": 500, "sent_at": "now"}).status == 201


def test_c4_same_key_in_another_scope_is_another_key(shop: Shop) -> None:
    mine = shop.post({"order_id": f"o-{uid()}", "amount": 500}, user="alice")
    theirs = shop.post({"order_id": f"o-{uid()}", "amount": 700}, user="bob")
    assert (mine.status, theirs.status) == (201, 201)
    assert mine.json()["order_id"] != theirs.json()["order_id"]


def test_c5_an_unknown_outcome_is_resumed_with_one_payment_intent(
    shop: Shop, localstripe_url: str
) -> None:
    order_id = f"o-{uid()}"
    body = {"order_id": order_id, "amount": 700}
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        dead_port = closed.getsockname()[1]
    working = shop.guard.gateway
    dead = StripeGateway.from_settings(
        "sk_test_idempay", api_base=f"http://127.0.0.1:{dead_port}", timeout=2
    )
    shop.guard.gateway = dead
    unknown = shop.post(body)
    dead.close()
    assert unknown.status == 503
    assert unknown.json()["code"] == "payment_outcome_unknown"
    assert unknown.header("Retry-After")
    record = shop.records.get(next(iter(shop.records._records))[0], "k1")
    assert record is not None
    assert record.state is RecordState.UNKNOWN
    shop.guard.gateway = working
    retried = shop.post(body)
    assert retried.status == 201
    assert len(shop.intents(order_id)) == 1
    assert shop.trail(order_id)[:3] == [
        AuditStep.STARTED,
        AuditStep.OUTCOME_UNKNOWN,
        AuditStep.RECOVERED,
    ]


def test_c6_a_crash_after_the_stripe_call_is_finished_by_the_retry(shop: Shop) -> None:
    order_id = f"o-{uid()}"
    body = {"order_id": order_id, "amount": 800, "payment_method": "pm_card_visa"}

    def crash() -> None:
        raise KeyboardInterrupt

    shop.guard.faults.arm(FaultPoint.CHECKOUT_AFTER_STRIPE, crash)
    with pytest.raises(KeyboardInterrupt):
        shop.post(body)
    resumed = shop.post(body)
    assert resumed.status == 201
    assert shop.order(order_id).state.status is OrderStatus.PAID
    assert len(shop.intents(order_id)) == 1
    assert AuditStep.RECOVERED in shop.trail(order_id)


def test_c7_a_declined_card_leaves_the_order_payment_failed(shop: Shop) -> None:
    order_id = f"o-{uid()}"
    response = shop.post(
        {"order_id": order_id, "amount": 900, "payment_method": "pm_card_chargeCustomerFail"}
    )
    assert response.status == 201
    assert response.json()["status"] == "payment_failed"
    assert shop.trail(order_id) == [AuditStep.STARTED, AuditStep.PENDING, AuditStep.FAILED]


@pytest.mark.parametrize("key", [None, "", "x" * 256, "a\tb", "caf\u00e9"])
def test_c8_bad_keys_are_400_and_write_nothing(shop: Shop, key: str | None) -> None:
    order_id = f"o-{uid()}"
    response = shop.post({"order_id": order_id, "amount": 500}, key=key)
    assert response.status == 400
    assert response.content_type == "application/problem+json"
    assert shop.order(order_id) is None
    assert shop.handled == 0


def test_an_application_refusal_is_stored_and_replayed(shop: Shop) -> None:
    refused = shop.post({"order_id": f"o-{uid()}", "amount": 5, "cart": "empty"})
    assert refused.status == 400
    again = shop.post(
        {"order_id": refused.json().get("x", "ignored"), "amount": 5, "cart": "empty"}
    )
    assert again.status == 422  # another body under the same key
    replay = shop.post({"order_id": f"o-{uid()}", "amount": 5, "cart": "empty"}, key="k2")
    assert replay.status == 400


def test_wrong_method_and_media_type(shop: Shop) -> None:
    request = GuardRequest(method="GET", route="/checkout", headers={"Idempotency-Key": "k"})
    assert shop.checkout(request).status == 405
    request = GuardRequest(
        method="POST", route="/checkout", body=b"a=1", headers={"Idempotency-Key": "k"}
    )
    assert shop.checkout(request).status == 415


def test_a_retried_transaction_is_logged_and_counted_once(
    shop: Shop, caplog: pytest.LogCaptureFixture
) -> None:
    from idempay.errors import ConcurrentUpdateError

    order_id = f"o-{uid()}"

    def lose_a_race() -> None:
        raise ConcurrentUpdateError("another writer got there first")

    # The order's first transaction loses a race and is retried whole: its audit entry is
    # written once, and so it must be logged (and counted by the observers) once.
    shop.guard.faults.arm(FaultPoint.CHECKOUT_IN_ORDER_TRANSACTION, lose_a_race)
    with caplog.at_level(logging.INFO, logger="idempay.audit"):
        response = shop.post(
            {"order_id": order_id, "amount": 700, "payment_method": "pm_card_visa"}
        )
    assert response.status == 201, response.body
    assert shop.trail(order_id).count(AuditStep.STARTED) == 1
    logged = [r.idempay["step"] for r in caplog.records if r.name == "idempay.audit"]  # type: ignore[attr-defined]
    assert logged.count("started") == 1
    assert logged.count("succeeded") == 1
