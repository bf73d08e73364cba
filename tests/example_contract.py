"""The example shops' HTTP contract (docs/http-contract.md), run for real: an example's
``serve.sh`` with two workers, on PostgreSQL + Redis and on SQLite alone, against localstripe and
against idempay's Stripe simulator.

Each example's tests import everything from here and name their example with an
``example_name`` fixture: the same contract, the same assertions, for every framework.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from tests.example_server import ExampleServer, list_all

from idempay.core.signature import sign_payload

SECRET = "whsec_example_tests"
TIMEOUT = 30


@pytest.fixture(scope="module", params=["localstripe", "simulator"])
def stripe_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """The Stripe the shop talks to: localstripe (written by others), or idempay's simulator."""
    if request.param == "localstripe":
        yield request.getfixturevalue("localstripe_url")
        return
    from idempay.testing.simulator import StripeSimulator

    with StripeSimulator() as simulator:
        yield simulator.url


@pytest.fixture(
    scope="module",
    params=[
        pytest.param("postgres+redis", marks=[pytest.mark.postgres, pytest.mark.redis]),
        "sqlite",
    ],
)
def shop(
    request: pytest.FixtureRequest,
    example_name: str,
    stripe_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ExampleServer]:
    if request.param == "sqlite":
        database = f"sqlite:///{tmp_path_factory.mktemp('shop') / 'shop.db'}"
        locks = "memory://"
        prefix = ""
    else:
        database = request.getfixturevalue("postgres_url")
        locks = request.getfixturevalue("redis_url")
        # Under the run's own prefix, which the run deletes at its end.
        prefix = request.getfixturevalue("redis_prefix") + example_name
    env = {
        "IDEMPAY_DATABASE_URL": database,
        "IDEMPAY_LOCK_URL": locks,
        "STRIPE_API_KEY": "sk_test_example",
        "STRIPE_API_BASE": stripe_url,
        "STRIPE_WEBHOOK_SECRET": f"whsec_old,{SECRET}",
        "IDEMPAY_REDIS_PREFIX": prefix or "idempay-example",
    }
    with ExampleServer(example_name, env, workers=2) as server:
        yield server


@pytest.fixture(scope="module")
def stripe(stripe_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stripe_url, auth=("sk_test_example", ""), timeout=TIMEOUT) as client:
        yield client


def _order(**extra: Any) -> dict[str, Any]:
    return {"order_id": f"ex-{secrets.token_hex(6)}", "amount": 2500, "currency": "eur", **extra}


def _checkout(shop: ExampleServer, body: Any, key: str | None, **headers: str) -> httpx.Response:
    sent = {"Content-Type": "application/json", **headers}
    if key is not None:
        sent["Idempotency-Key"] = key
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(shop.url + "/checkout", content=content, headers=sent, timeout=TIMEOUT)


def _intents(stripe: httpx.Client, order_id: str) -> list[dict[str, Any]]:
    # localstripe has no search: page through every PaymentIntent of the run.
    found = list_all(stripe, "/v1/payment_intents")
    return [pi for pi in found if pi.get("metadata", {}).get("order_id") == order_id]


def _webhook(shop: ExampleServer, event: dict[str, Any], secret: str = SECRET) -> httpx.Response:
    body = json.dumps(event).encode()
    return httpx.post(
        shop.url + "/stripe/webhook",
        content=body,
        headers={
            "Content-Type": "application/json",
            "Stripe-Signature": sign_payload(body, secret, timestamp=int(time.time())),
        },
        timeout=TIMEOUT,
    )


def _succeeded(intent: str, order_id: str, event_id: str) -> dict[str, Any]:
    return {
        "id": event_id,
        "object": "event",
        "type": "payment_intent.succeeded",
        "created": int(time.time()),
        "livemode": False,
        "data": {
            "object": {
                "id": intent,
                "object": "payment_intent",
                "status": "succeeded",
                "amount": 2500,
                "amount_received": 2500,
                "currency": "eur",
                "livemode": False,
                "metadata": {"order_id": order_id},
            }
        },
    }


def _order_view(shop: ExampleServer, order_id: str) -> httpx.Response:
    return httpx.get(f"{shop.url}/orders/{order_id}", timeout=TIMEOUT)


def _wait_for(shop: ExampleServer, order_id: str, done: Any) -> dict[str, Any]:
    """The order view once ``done(view)`` holds: effects and other workers' journal entries
    are written by each worker's dispatcher, a fraction of a second later."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        view = _order_view(shop, order_id).json()
        if done(view) or time.monotonic() > deadline:
            return view  # type: ignore[no-any-return]
        time.sleep(0.1)  # polling the server's own progress, bounded; orders nothing


def test_first_call_replay_and_mismatch(shop: ExampleServer, stripe: httpx.Client) -> None:
    order = _order()
    key = f"k-{order['order_id']}"
    first = _checkout(shop, order, key)
    assert first.status_code == 201, first.text
    body = first.json()
    assert {"order_id", "payment_intent_id", "client_secret", "status"} <= body.keys()
    assert body["order_id"] == order["order_id"]
    assert "idempotent-replayed" not in first.headers

    again = _checkout(shop, order, key)
    assert (again.status_code, again.headers["idempotent-replayed"]) == (201, "true")
    assert again.json() == body

    other = _checkout(shop, {**order, "amount": 1}, key)
    assert other.status_code == 422
    assert other.headers["content-type"] == "application/problem+json"
    assert len(_intents(stripe, order["order_id"])) == 1


def test_another_key_for_the_same_order_names_its_payment_intent(
    shop: ExampleServer, stripe: httpx.Client
) -> None:
    order = _order()
    first = _checkout(shop, order, "key-a-" + order["order_id"]).json()
    second = _checkout(shop, order, "key-b-" + order["order_id"])
    assert second.status_code == 201
    assert second.json()["payment_intent_id"] == first["payment_intent_id"]
    assert len(_intents(stripe, order["order_id"])) == 1


@pytest.mark.parametrize("key", [None, "", "k" * 256, "bad\x01key"])
def test_bad_keys_are_400_and_write_nothing(shop: ExampleServer, key: str | None) -> None:
    order = _order()
    headers = {}
    if key is not None and not key.isprintable():
        # httpx refuses control characters in a header value; send them raw.
        response = httpx.post(
            shop.url + "/checkout",
            content=json.dumps(order).encode(),
            headers=[(b"Content-Type", b"application/json"), (b"Idempotency-Key", key.encode())],
            timeout=TIMEOUT,
        )
    else:
        response = _checkout(shop, order, key, **headers)
    assert response.status_code == 400
    assert _order_view(shop, order["order_id"]).status_code == 404


@pytest.mark.parametrize(
    "body",
    [
        b'{"order_id": "x", "amount": 1',
        b'{"order_id": "x", "amount": 1, "amount": 2, "currency": "eur"}',
        {"order_id": "x", "amount": "25", "currency": "eur"},
        {"order_id": "x", "amount": -5, "currency": "eur"},
        {"order_id": "x", "amount": 2500, "currency": "EURO"},
        {"amount": 2500, "currency": "eur"},
    ],
)
def test_bad_bodies_are_4xx_and_reach_nothing(
    shop: ExampleServer, stripe: httpx.Client, body: Any
) -> None:
    response = _checkout(shop, body, f"bad-{secrets.token_hex(4)}")
    assert response.status_code in (400, 422), response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert _order_view(shop, "x").status_code == 404
    assert _intents(stripe, "x") == []


def test_a_paid_order_through_the_webhook(shop: ExampleServer) -> None:
    order = _order()
    created = _checkout(shop, order, f"k-{order['order_id']}").json()
    event = _succeeded(
        created["payment_intent_id"], order["order_id"], f"evt_{secrets.token_hex(8)}"
    )
    assert _webhook(shop, event).status_code == 200
    assert _webhook(shop, event).status_code == 200  # a duplicate
    assert _webhook(shop, event, secret="whsec_old").status_code == 200  # the rotated secret
    view = _wait_for(
        shop,
        order["order_id"],
        lambda v: v["effects"] and [a["step"] for a in v["audit"]].count("duplicate") == 2,
    )
    assert view["status"] == "paid"
    steps = [entry["step"] for entry in view["audit"]]
    assert steps[:3] == ["started", "pending", "succeeded"]
    assert steps.count("duplicate") == 2
    assert [effect["kind"] for effect in view["effects"]] == ["receipt_email"]


def test_forged_webhooks_are_4xx(shop: ExampleServer) -> None:
    order = _order()
    created = _checkout(shop, order, f"k-{order['order_id']}").json()
    event = _succeeded(created["payment_intent_id"], order["order_id"], "evt_forged")
    assert _webhook(shop, event, secret="whsec_wrong").status_code == 400
    no_signature = httpx.post(
        shop.url + "/stripe/webhook",
        content=json.dumps(event).encode(),
        headers={"Content-Type": "application/json"},
        timeout=TIMEOUT,
    )
    assert no_signature.status_code == 400
    assert _order_view(shop, order["order_id"]).json()["status"] == "awaiting_payment"


def test_pay_clicked_ten_times_at_once_is_one_charge(
    shop: ExampleServer, stripe: httpx.Client
) -> None:
    order = _order(payment_method="pm_card_visa")
    key = f"k-{order['order_id']}"
    with ThreadPoolExecutor(10) as pool:
        responses = list(pool.map(lambda _: _checkout(shop, order, key), range(10)))
    assert {r.status_code for r in responses} <= {201, 409}, [r.text for r in responses]
    intents = _intents(stripe, order["order_id"])
    assert len(intents) == 1
    assert intents[0]["status"] == "succeeded"
    view = _order_view(shop, order["order_id"]).json()
    assert view["status"] == "paid"


def test_a_declined_card_fails_the_order(shop: ExampleServer) -> None:
    order = _order(payment_method="pm_card_chargeCustomerFail")
    response = _checkout(shop, order, f"k-{order['order_id']}")
    assert response.status_code == 201, response.text
    view = _order_view(shop, order["order_id"]).json()
    assert view["status"] == "payment_failed"
    assert "failed" in [entry["step"] for entry in view["audit"]]


def test_an_unknown_order_is_404(shop: ExampleServer) -> None:
    assert _order_view(shop, "no-such-order").status_code == 404
