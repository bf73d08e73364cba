"""The Starlette/FastAPI adapter over HTTP (Starlette's ASGI test client), sync and async
guards, with localstripe as Stripe."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.routing import Route
from starlette.testclient import TestClient

from idempay.adapters.starlette import StarletteIdempay
from idempay.core.signature import sign_payload
from idempay.core.strictjson import JSONLimits
from idempay.engine import AsyncGuard, CheckoutRequest, Guard, GuardConfig, OrderSpec
from idempay.gateway import AsyncStripeGateway, StripeGateway
from idempay.memory import (
    AsyncMemoryIdempotencyStore,
    AsyncMemoryPaymentStore,
    MemoryIdempotencyStore,
    MemoryPaymentStore,
)

SECRET = "whsec_starlette"
LIMIT = 4096


def _config() -> GuardConfig:
    return GuardConfig(
        webhook_secrets=(SECRET,), livemode=False, json_limits=JSONLimits(max_bytes=LIMIT)
    )


def _spec(request: CheckoutRequest) -> OrderSpec:
    fields = request.fields
    return OrderSpec(
        order_id=fields.identifier("order_id"),
        amount=fields.integer("amount", minimum=1),
        currency=fields.string("currency"),
        payment_method=fields.optional_string("payment_method"),
    )


def _scope(request: Any) -> tuple[str, str]:
    return "", request.headers.get("x-user-id", "anonymous")


def _sync_app(stripe_url: str, framework: str) -> tuple[Any, Any]:
    gateway = StripeGateway.from_settings("sk_test_adapter", api_base=stripe_url)
    guard = Guard(
        payments=MemoryPaymentStore(),
        records=MemoryIdempotencyStore(),
        gateway=gateway,
        config=_config(),
    )
    idem = StarletteIdempay(guard, scope=_scope)

    @idem.checkout()
    def checkout(request: CheckoutRequest) -> OrderSpec:
        return _spec(request)

    return _app(framework, idem, checkout), gateway


def _async_app(stripe_url: str, framework: str) -> tuple[Any, Any]:
    gateway = AsyncStripeGateway.from_settings("sk_test_adapter", api_base=stripe_url)
    guard = AsyncGuard(
        payments=AsyncMemoryPaymentStore(),
        records=AsyncMemoryIdempotencyStore(),
        gateway=gateway,
        config=_config(),
    )
    idem = StarletteIdempay(guard, scope=_scope)

    @idem.checkout()
    async def checkout(request: CheckoutRequest) -> OrderSpec:
        return _spec(request)

    return _app(framework, idem, checkout), gateway


def _app(framework: str, idem: StarletteIdempay, checkout: Any) -> Any:
    if framework == "fastapi":
        app = FastAPI()
        app.post("/checkout")(checkout)
        app.router.routes.extend(idem.routes())
        return app
    return Starlette(routes=[Route("/checkout", checkout, methods=["POST"]), *idem.routes()])


@pytest.fixture(
    params=[
        ("sync", "fastapi"),
        ("async", "fastapi"),
        ("sync", "starlette"),
        ("async", "starlette"),
    ],
    ids="-".join,
)
def client(request: pytest.FixtureRequest, localstripe_url: str) -> Iterator[TestClient]:
    kind, framework = request.param
    make = _sync_app if kind == "sync" else _async_app
    app, gateway = make(localstripe_url, framework)
    with TestClient(app, raise_server_exceptions=True) as test_client:
        yield test_client
        if kind == "async":
            test_client.portal.call(gateway.aclose)  # type: ignore[union-attr]
    if kind == "sync":
        gateway.close()


def _order() -> dict[str, Any]:
    return {"order_id": f"o-{secrets.token_hex(5)}", "amount": 2500, "currency": "eur"}


def _post(client: TestClient, body: Any, key: str | None = "k", **headers: str) -> Any:
    sent = {"Content-Type": "application/json", **headers}
    if key is not None:
        sent["Idempotency-Key"] = key
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return client.post("/checkout", content=content, headers=sent)


def test_checkout_then_replay_then_mismatch(client: TestClient) -> None:
    order = _order()
    key = f"key-{order['order_id']}"
    first = _post(client, order, key)
    assert first.status_code == 201, first.text
    assert first.headers.get("idempotent-replayed") is None
    body = first.json()
    assert body["order_id"] == order["order_id"]
    assert body["payment_intent_id"].startswith("pi_")
    assert body["client_secret"]

    again = _post(client, order, key)
    assert (again.status_code, again.headers["idempotent-replayed"]) == (201, "true")
    assert again.json() == body

    other = _post(client, {**order, "amount": 1}, key)
    assert other.status_code == 422
    assert other.headers["content-type"] == "application/problem+json"
    assert other.json()["code"] == "idempotency_key_reused"

    # Another user's same key is another key: never this user's response.
    theirs = _post(client, {**order, "amount": 1}, key, **{"X-User-Id": "u2"})
    assert (
        theirs.status_code != 201 or theirs.json()["payment_intent_id"] == body["payment_intent_id"]
    )


def test_the_order_view(client: TestClient) -> None:
    order = _order()
    created = _post(client, {**order, "payment_method": "pm_card_visa"}, f"v-{order['order_id']}")
    assert created.status_code == 201
    view = client.get(f"/orders/{order['order_id']}")
    assert view.status_code == 200
    doc = view.json()
    assert (doc["order_id"], doc["status"]) == (order["order_id"], "paid")
    assert doc["payment_intent_id"] == created.json()["payment_intent_id"]
    steps = [entry["step"] for entry in doc["audit"]]
    assert steps[0] == "started"
    assert "succeeded" in steps
    assert doc["audit_verified"] is True
    missing = client.get("/orders/no-such-order")
    assert missing.status_code == 404
    assert missing.headers["content-type"] == "application/problem+json"


@pytest.mark.parametrize(
    ("key", "code"),
    [(None, "missing_idempotency_key"), ("", None), ("k" * 256, "invalid_idempotency_key")],
)
def test_bad_keys_are_400(client: TestClient, key: str | None, code: str | None) -> None:
    response = _post(client, _order(), key)
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/problem+json"
    if code is not None:
        assert response.json()["code"] == code


def test_bad_bodies_are_4xx(client: TestClient) -> None:
    assert _post(client, b"{not json", "b1").status_code == 400
    assert _post(
        client, {"order_id": "x", "amount": "12", "currency": "eur"}, "b2"
    ).status_code in (
        400,
        422,
    )
    wrong_type = client.post(
        "/checkout",
        content=b"order_id=1",
        headers={"Content-Type": "text/plain", "Idempotency-Key": "b3"},
    )
    assert wrong_type.status_code == 415


def test_an_oversized_body_is_413_declared_or_not(client: TestClient) -> None:
    big = json.dumps({**_order(), "pad": "x" * (LIMIT + 10)}).encode()
    declared = _post(client, big, "big-1")
    assert declared.status_code == 413
    assert declared.json()["code"] == "payload_too_large"

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(big), 512):
            yield big[i : i + 512]

    streamed = client.post(
        "/checkout",
        content=chunks(),
        headers={"Content-Type": "application/json", "Idempotency-Key": "big-2"},
    )
    assert streamed.status_code == 413


def _event(event_id: str) -> bytes:
    return json.dumps(
        {
            "id": event_id,
            "object": "event",
            "type": "customer.created",
            "created": int(time.time()),
            "livemode": False,
            "data": {"object": {"id": "cus_1", "object": "customer"}},
        }
    ).encode()


def test_webhooks(client: TestClient) -> None:
    body = _event(f"evt_{secrets.token_hex(5)}")
    signed = {
        "Content-Type": "application/json",
        "Stripe-Signature": sign_payload(body, SECRET, timestamp=int(time.time())),
    }
    first = client.post("/stripe/webhook", content=body, headers=signed)
    assert (first.status_code, first.json()["outcome"]) == (200, "ignored")
    again = client.post("/stripe/webhook", content=body, headers=signed)
    assert (again.status_code, again.json()["outcome"]) == (200, "duplicate")

    forged = client.post(
        "/stripe/webhook", content=body, headers={**signed, "Stripe-Signature": "t=1,v1=00"}
    )
    assert forged.status_code == 400
    assert forged.headers["content-type"] == "application/problem+json"
    assert client.get("/stripe/webhook").status_code == 405
    assert (
        client.post("/stripe/webhook", content=b"x" * (LIMIT + 1), headers=signed).status_code
        == 413
    )


def test_the_order_view_refuses_other_methods_with_a_problem(client: TestClient) -> None:
    response = client.post("/orders/anything")
    assert response.status_code == 405
    assert response.headers["content-type"] == "application/problem+json"
    assert "GET" in response.headers["allow"]
