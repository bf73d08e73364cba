"""The Flask extension over HTTP (Flask's test client): an app factory, a blueprint, sync and
async checkout handlers, one extension shared by two apps, with localstripe as Stripe."""

from __future__ import annotations

import io
import json
import secrets
import threading
import time
from collections.abc import Iterator
from typing import Any, NamedTuple

import pytest
from flask import Blueprint, Flask
from flask.testing import FlaskClient

from idempay.adapters.flask import EXTENSION_KEY, Idempay
from idempay.core.signature import sign_payload
from idempay.core.strictjson import JSONLimits
from idempay.engine import AsyncGuard, CheckoutRequest, Guard, GuardConfig, OrderSpec
from idempay.errors import ConfigurationError
from idempay.gateway import StripeGateway
from idempay.memory import (
    AsyncMemoryIdempotencyStore,
    AsyncMemoryPaymentStore,
    MemoryIdempotencyStore,
    MemoryPaymentStore,
)

SECRET = "whsec_flask"
LIMIT = 4096


def _config() -> GuardConfig:
    return GuardConfig(
        webhook_secrets=(SECRET,), livemode=False, json_limits=JSONLimits(max_bytes=LIMIT)
    )


def _guard(gateway: StripeGateway) -> Guard:
    return Guard(
        payments=MemoryPaymentStore(),
        records=MemoryIdempotencyStore(),
        gateway=gateway,
        config=_config(),
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


# One extension for every app of this module, and handlers decorated before any app exists:
# each request finds its guard in its own app.
idem = Idempay(scope=_scope)


@idem.checkout()
def checkout(request: CheckoutRequest) -> OrderSpec:
    return _spec(request)


@idem.checkout()
async def async_checkout(request: CheckoutRequest) -> OrderSpec:
    return _spec(request)


def create_app(config: dict[str, Any], *, handler: str = "sync", mount: str = "app") -> Flask:
    """The application factory: settings in, a ready app out."""
    app = Flask(__name__)
    app.config.update(TESTING=True, **config)
    idem.init_app(app)
    view = checkout if handler == "sync" else async_checkout
    if mount == "app":
        app.post("/checkout")(view)
    else:
        shop = Blueprint("shop", __name__, url_prefix="/shop")
        shop.post("/checkout")(view)
        app.register_blueprint(shop)
    return app


class Shop(NamedTuple):
    client: FlaskClient
    checkout: str  # the checkout URL


@pytest.fixture(
    params=[("sync", "app"), ("async", "app"), ("sync", "blueprint"), ("async", "blueprint")],
    ids="-".join,
)
def shop(request: pytest.FixtureRequest, localstripe_url: str) -> Iterator[Shop]:
    handler, mount = request.param
    gateway = StripeGateway.from_settings("sk_test_adapter", api_base=localstripe_url)
    app = create_app({"IDEMPAY_GUARD": _guard(gateway)}, handler=handler, mount=mount)
    try:
        yield Shop(app.test_client(), "/checkout" if mount == "app" else "/shop/checkout")
    finally:
        gateway.close()


@pytest.fixture
def gateway(localstripe_url: str) -> Iterator[StripeGateway]:
    gateway = StripeGateway.from_settings("sk_test_adapter", api_base=localstripe_url)
    yield gateway
    gateway.close()


def _order() -> dict[str, Any]:
    return {"order_id": f"o-{secrets.token_hex(5)}", "amount": 2500, "currency": "eur"}


def _post(shop: Shop, body: Any, key: str | None = "k", **headers: str) -> Any:
    sent = {"Content-Type": "application/json", **headers}
    if key is not None:
        sent["Idempotency-Key"] = key
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return shop.client.post(shop.checkout, data=content, headers=sent)


def test_checkout_then_replay_then_mismatch(shop: Shop) -> None:
    order = _order()
    key = f"key-{order['order_id']}"
    first = _post(shop, order, key)
    assert first.status_code == 201, first.text
    assert first.headers.get("idempotent-replayed") is None
    body = first.json
    assert body["order_id"] == order["order_id"]
    assert body["payment_intent_id"].startswith("pi_")
    assert body["client_secret"]

    again = _post(shop, order, key)
    assert (again.status_code, again.headers["idempotent-replayed"]) == (201, "true")
    assert again.json == body

    other = _post(shop, {**order, "amount": 1}, key)
    assert other.status_code == 422
    assert other.headers["content-type"] == "application/problem+json"
    assert other.json["code"] == "idempotency_key_reused"

    # Another user's same key is another key: never this user's response.
    theirs = _post(shop, {**order, "amount": 1}, key, **{"X-User-Id": "u2"})
    assert theirs.headers.get("idempotent-replayed") is None
    assert (
        theirs.status_code != 201 or theirs.json["payment_intent_id"] == body["payment_intent_id"]
    )
    # ... which runs that user's own checkout (shared, it would be a 422 mismatch here).
    own = _order()
    theirs_own = _post(shop, own, key, **{"X-User-Id": "u3"})
    assert theirs_own.status_code == 201, theirs_own.text
    assert theirs_own.json["order_id"] == own["order_id"]
    assert theirs_own.headers.get("idempotent-replayed") is None


def test_the_order_view(shop: Shop) -> None:
    order = _order()
    created = _post(shop, {**order, "payment_method": "pm_card_visa"}, f"v-{order['order_id']}")
    assert created.status_code == 201
    view = shop.client.get(f"/orders/{order['order_id']}")
    assert view.status_code == 200
    doc = view.json
    assert (doc["order_id"], doc["status"]) == (order["order_id"], "paid")
    assert doc["payment_intent_id"] == created.json["payment_intent_id"]
    steps = [entry["step"] for entry in doc["audit"]]
    assert steps[0] == "started"
    assert "succeeded" in steps
    assert doc["audit_verified"] is True
    missing = shop.client.get("/orders/no-such-order")
    assert missing.status_code == 404
    assert missing.headers["content-type"] == "application/problem+json"
    assert missing.json["instance"] == "/orders/no-such-order"


@pytest.mark.parametrize(
    ("key", "code"),
    [(None, "missing_idempotency_key"), ("", None), ("k" * 256, "invalid_idempotency_key")],
)
def test_bad_keys_are_400(shop: Shop, key: str | None, code: str | None) -> None:
    response = _post(shop, _order(), key)
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/problem+json"
    if code is not None:
        assert response.json["code"] == code


def test_bad_bodies_are_4xx(shop: Shop) -> None:
    assert _post(shop, b"{not json", "b1").status_code == 400
    assert _post(shop, {"order_id": "x", "amount": "12", "currency": "eur"}, "b2").status_code in (
        400,
        422,
    )
    wrong_type = shop.client.post(
        shop.checkout,
        data=b"order_id=1",
        headers={"Content-Type": "text/plain", "Idempotency-Key": "b3"},
    )
    assert wrong_type.status_code == 415
    assert wrong_type.headers["content-type"] == "application/problem+json"


class CountingStream(io.BytesIO):
    """A request body that counts how many bytes the application read from it."""

    consumed = 0

    def read(self, size: int | None = -1, /) -> bytes:
        chunk = super().read(size)
        self.consumed += len(chunk)
        return chunk

    def readinto(self, buffer: Any, /) -> int:
        count = super().readinto(buffer)
        self.consumed += count
        return count


def _streamed(shop: Shop, url: str, body: bytes, **headers: str) -> tuple[Any, CountingStream]:
    """POST ``body`` chunked, without a usable Content-Length, as a WSGI server passes it."""
    stream = CountingStream(body)
    response = shop.client.post(
        url,
        input_stream=stream,
        headers={"Transfer-Encoding": "chunked", **headers},
        environ_overrides={"wsgi.input_terminated": True},
    )
    return response, stream


def test_an_oversized_body_is_413_declared_or_not(shop: Shop) -> None:
    big = json.dumps({**_order(), "pad": "x" * (LIMIT + 10)}).encode()
    declared = _post(shop, big, "big-1")
    assert declared.status_code == 413
    assert declared.headers["content-type"] == "application/problem+json"
    assert declared.json["code"] == "payload_too_large"

    sent = {"Content-Type": "application/json", "Idempotency-Key": "big-2"}
    small, _ = _streamed(shop, shop.checkout, json.dumps(_order()).encode(), **sent)
    assert small.status_code == 201, small.text  # a chunked body under the limit is read whole

    huge = b"x" * (1024 * 1024)
    streamed, stream = _streamed(shop, shop.checkout, huge, **{**sent, "Idempotency-Key": "big-3"})
    assert streamed.status_code == 413
    assert streamed.json["limit"] == LIMIT
    # Refused as soon as it passed the limit: at most one read past it, never the megabyte.
    assert stream.consumed <= LIMIT + 64 * 1024


def test_a_declared_oversize_is_refused_before_reading(shop: Shop) -> None:
    stream = CountingStream(b"x" * (LIMIT + 1))
    response = shop.client.post(
        shop.checkout,
        input_stream=stream,
        headers={"Content-Type": "application/json", "Idempotency-Key": "big-4"},
    )
    assert response.status_code == 413
    assert stream.consumed == 0


def test_max_content_length_below_the_guard_limit_is_a_problem_413(
    gateway: StripeGateway,
) -> None:
    app = create_app({"IDEMPAY_GUARD": _guard(gateway), "MAX_CONTENT_LENGTH": 1000})
    shop = Shop(app.test_client(), "/checkout")
    body = json.dumps({**_order(), "pad": "x" * 1500}).encode()
    declared = _post(shop, body, "m-1")
    streamed, _ = _streamed(
        shop,
        "/stripe/webhook",
        body,
        **{"Content-Type": "application/json", "Stripe-Signature": "t=1,v1=00"},
    )
    for response in (declared, streamed):
        assert response.status_code == 413
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json["limit"] == 1000
    assert _post(shop, _order(), "m-2").status_code == 201


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


def test_webhooks(shop: Shop) -> None:
    client = shop.client
    body = _event(f"evt_{secrets.token_hex(5)}")
    signed = {
        "Content-Type": "application/json",
        "Stripe-Signature": sign_payload(body, SECRET, timestamp=int(time.time())),
    }
    first = client.post("/stripe/webhook", data=body, headers=signed)
    assert (first.status_code, first.json["outcome"]) == (200, "ignored")
    again = client.post("/stripe/webhook", data=body, headers=signed)
    assert (again.status_code, again.json["outcome"]) == (200, "duplicate")

    forged = client.post(
        "/stripe/webhook", data=body, headers={**signed, "Stripe-Signature": "t=1,v1=00"}
    )
    assert forged.status_code == 400
    assert forged.headers["content-type"] == "application/problem+json"
    wrong_method = client.get("/stripe/webhook")
    assert wrong_method.status_code == 405
    assert wrong_method.headers["content-type"] == "application/problem+json"
    assert wrong_method.headers["allow"] == "POST"
    assert (
        client.post("/stripe/webhook", data=b"x" * (LIMIT + 1), headers=signed).status_code == 413
    )
    wrong_type = client.post(
        "/stripe/webhook", data=body, headers={**signed, "Content-Type": "a/b"}
    )
    assert wrong_type.status_code == 415


def test_a_checkout_in_flight_is_409_with_retry_after(gateway: StripeGateway) -> None:
    entered, release = threading.Event(), threading.Event()
    app = Flask(__name__)
    app.config["TESTING"] = True
    Idempay(app, guard=_guard(gateway), orders_path=None)

    @app.post("/checkout")
    @Idempay().checkout()  # another extension object: the view uses the app's guard
    def slow_checkout(request: CheckoutRequest) -> OrderSpec:
        entered.set()
        release.wait(timeout=30)
        return _spec(request)

    shop = Shop(app.test_client(), "/checkout")
    order = _order()
    first: list[Any] = []
    worker = threading.Thread(target=lambda: first.append(_post(shop, order, "slow")))
    worker.start()
    try:
        assert entered.wait(timeout=30)
        busy = _post(shop, order, "slow")
    finally:
        release.set()
        worker.join(timeout=30)
    assert busy.status_code == 409
    assert busy.headers["content-type"] == "application/problem+json"
    assert int(busy.headers["retry-after"]) >= 1
    assert first[0].status_code == 201
    assert _post(shop, order, "slow").headers["idempotent-replayed"] == "true"


def test_the_route_template_and_path_variables(gateway: StripeGateway) -> None:
    seen: list[tuple[str, Any]] = []
    app = Flask(__name__)
    app.config["TESTING"] = True
    idempay = Idempay(guard=_guard(gateway), webhook_path="/hooks/stripe", orders_path=None)
    idempay.init_app(app)

    @app.post("/carts/<cart_id>/checkout")
    @idempay.checkout()
    def cart_checkout(request: CheckoutRequest) -> OrderSpec:
        from flask import request as flask_request

        seen.append((request.request.route, flask_request.view_args))
        return _spec(request)

    client = app.test_client()
    headers = {"Content-Type": "application/json", "Idempotency-Key": "t-1"}
    response = client.post("/carts/c7/checkout", data=json.dumps(_order()), headers=headers)
    assert response.status_code == 201, response.text
    assert seen == [("/carts/<cart_id>/checkout", {"cart_id": "c7"})]
    assert "idempay_order" not in app.view_functions
    assert client.get("/hooks/stripe").status_code == 405
    assert client.get("/stripe/webhook").status_code == 404


def test_one_extension_serves_two_apps(localstripe_url: str) -> None:
    gateways = [
        StripeGateway.from_settings("sk_test_adapter", api_base=localstripe_url) for _ in "ab"
    ]
    try:
        guard_a, guard_b = _guard(gateways[0]), _guard(gateways[1])
        app_a = create_app({"IDEMPAY_GUARD": guard_a})
        app_b = create_app({"IDEMPAY_GUARD": lambda: guard_b})  # a factory, called by init_app
        assert app_a.extensions[EXTENSION_KEY].guard is guard_a
        assert app_b.extensions[EXTENSION_KEY].guard is guard_b
        shop_a = Shop(app_a.test_client(), "/checkout")
        shop_b = Shop(app_b.test_client(), "/checkout")

        order = _order()
        assert _post(shop_a, order, "shared").status_code == 201
        assert shop_a.client.get(f"/orders/{order['order_id']}").status_code == 200
        assert shop_b.client.get(f"/orders/{order['order_id']}").status_code == 404
        # The same key on the other app is a first request there, not a replay of app a's.
        in_b = _post(shop_b, order, "shared")
        assert in_b.status_code == 201
        assert in_b.headers.get("idempotent-replayed") is None
        assert shop_b.client.get(f"/orders/{order['order_id']}").status_code == 200
    finally:
        for gateway in gateways:
            gateway.close()


def test_misconfiguration_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="IDEMPAY_GUARD"):
        Idempay(Flask(__name__))
    async_guard = AsyncGuard(
        payments=AsyncMemoryPaymentStore(),
        records=AsyncMemoryIdempotencyStore(),
        config=_config(),
    )
    with pytest.raises(ConfigurationError, match="sync"):
        create_app({"IDEMPAY_GUARD": async_guard})

    bare = Flask(__name__)
    bare.config["TESTING"] = True
    bare.post("/checkout")(checkout)
    with pytest.raises(ConfigurationError, match="init_app"):
        bare.test_client().post("/checkout", data=b"{}", content_type="application/json")
