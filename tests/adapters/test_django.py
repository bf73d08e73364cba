"""The Django adapter over HTTP with Django's own test clients: sync views under WSGI (Client),
async views under ASGI (AsyncClient), sync and async guards, with localstripe as Stripe."""

from __future__ import annotations

import asyncio
import inspect
import json
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from typing import Any

import django
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from django.conf import settings
from django.test import AsyncClient, AsyncRequestFactory, Client, RequestFactory, override_settings
from django.urls import path
from django.utils.asyncio import async_unsafe

from idempay.adapters._common import anonymous
from idempay.adapters.django import DjangoIdempay, idempay_checkout, urls
from idempay.core.signature import sign_payload
from idempay.core.strictjson import JSONLimits
from idempay.engine import (
    AsyncGuard,
    CheckoutRequest,
    Guard,
    GuardConfig,
    GuardRequest,
    GuardResponse,
    OrderSpec,
)
from idempay.errors import ConfigurationError
from idempay.gateway import AsyncStripeGateway, StripeGateway
from idempay.memory import (
    AsyncMemoryIdempotencyStore,
    AsyncMemoryPaymentStore,
    MemoryIdempotencyStore,
    MemoryPaymentStore,
)

SECRET = "whsec_django"
LIMIT = 4096

# The minimum to run Django in-process; each test overrides what it relies on (the urlconf is
# this module, the settings name its guard factory and scope function).
if not settings.configured:
    settings.configure(SECRET_KEY="idempay-tests-only", ALLOWED_HOSTS=["testserver"], USE_TZ=True)
django.setup()

_CURRENT: dict[str, Guard | AsyncGuard] = {}


def current_guard() -> Guard | AsyncGuard:
    """The guard factory named by settings.IDEMPAY["GUARD"] in these tests."""
    return _CURRENT["guard"]


# Django's own marker for ORM-like code: it raises if called on a thread running an event
# loop, so async views that called it there (blocking the loop) fail.
@async_unsafe("the scope function runs off the event loop")
def scope(request: Any) -> tuple[str, str]:
    """The scope function named by settings.IDEMPAY["SCOPE"]."""
    return "", request.headers.get("x-user-id", "anonymous")


SETTINGS: dict[str, Any] = {
    "ROOT_URLCONF": __name__,
    "MIDDLEWARE": ["django.middleware.csrf.CsrfViewMiddleware"],
    "IDEMPAY": {"GUARD": f"{__name__}.current_guard", "SCOPE": f"{__name__}.scope"},
}


def _spec(request: CheckoutRequest) -> OrderSpec:
    fields = request.fields
    return OrderSpec(
        order_id=fields.identifier("order_id"),
        amount=fields.integer("amount", minimum=1),
        currency=fields.string("currency"),
        payment_method=fields.optional_string("payment_method"),
    )


@idempay_checkout()
def checkout(request: CheckoutRequest) -> OrderSpec:
    return _spec(request)


@idempay_checkout()
async def async_checkout(request: CheckoutRequest) -> OrderSpec:
    return _spec(request)


urlpatterns = [
    path("checkout", checkout),
    path("carts/<str:cart>/checkout", checkout),
    path("async/checkout", async_checkout),
    path("async/carts/<str:cart>/checkout", async_checkout),
    *urls(),
    *urls("async/", asynchronous=True),
]


def _config() -> GuardConfig:
    return GuardConfig(
        webhook_secrets=(SECRET,), livemode=False, json_limits=JSONLimits(max_bytes=LIMIT)
    )


def _sync_guard(stripe_url: str, stack: ExitStack, cls: type[Guard] = Guard) -> Guard:
    gateway = StripeGateway.from_settings("sk_test_adapter", api_base=stripe_url)
    stack.callback(gateway.close)
    return cls(
        payments=MemoryPaymentStore(),
        records=MemoryIdempotencyStore(),
        gateway=gateway,
        config=_config(),
    )


def _async_guard(stripe_url: str, stack: ExitStack, portal: BlockingPortal) -> AsyncGuard:
    gateway = AsyncStripeGateway.from_settings("sk_test_adapter", api_base=stripe_url)
    stack.callback(portal.call, gateway.aclose)
    return AsyncGuard(
        payments=AsyncMemoryPaymentStore(),
        records=AsyncMemoryIdempotencyStore(),
        gateway=gateway,
        config=_config(),
    )


@dataclass
class Site:
    """One Django site under test: its client, and where its views are routed."""

    kind: str
    portal: BlockingPortal | None  # set for ASGI: the AsyncClient runs in the portal's loop
    prefix: str  # "" for the sync webhook and order views, "/async" for the async ones
    checkout_prefix: str

    def client(self, **options: Any) -> Any:
        return Client(**options) if self.portal is None else AsyncClient(**options)

    def call(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self.portal is None or not inspect.iscoroutinefunction(method):
            return method(*args, **kwargs)
        return self.portal.call(partial(method, *args, **kwargs))

    def factory(self) -> Any:
        return RequestFactory() if self.portal is None else AsyncRequestFactory()

    @property
    def checkout(self) -> str:
        return f"{self.checkout_prefix}/checkout"

    @property
    def checkout_view(self) -> Any:
        return async_checkout if self.checkout_prefix else checkout


class Http:
    """A test client that answers synchronously, whichever Django handler is underneath."""

    def __init__(self, site: Site, **options: Any) -> None:
        self.site = site
        self.raw = site.client(**options)

    def post(self, url: str, body: bytes, content_type: str = "application/json", **h: str) -> Any:
        return self.site.call(self.raw.post, url, body, content_type=content_type, headers=h)

    def get(self, url: str) -> Any:
        return self.site.call(self.raw.get, url)


KINDS = {
    # kind: (guard, handler of the client, prefix of the webhook and order views, of checkout)
    "wsgi-sync-guard": ("sync", "wsgi", "", ""),
    "asgi-async-guard": ("async", "asgi", "/async", "/async"),
    # A sync guard behind async views (the engine runs in a worker thread) and a sync checkout
    # view (Django runs it in its sync thread).
    "asgi-sync-guard": ("sync", "asgi", "/async", ""),
}


@pytest.fixture(params=list(KINDS))
def site(request: pytest.FixtureRequest, localstripe_url: str) -> Iterator[Site]:
    guard_kind, handler, prefix, checkout_prefix = KINDS[request.param]
    with ExitStack() as stack:
        portal = stack.enter_context(start_blocking_portal()) if handler == "asgi" else None
        if guard_kind == "sync":
            guard: Guard | AsyncGuard = _sync_guard(localstripe_url, stack)
        else:
            assert portal is not None
            guard = _async_guard(localstripe_url, stack, portal)
        _CURRENT["guard"] = guard
        stack.callback(_CURRENT.clear)
        stack.enter_context(override_settings(**SETTINGS))
        yield Site(request.param, portal, prefix, checkout_prefix)


@pytest.fixture
def http(site: Site) -> Http:
    return Http(site)


def _order() -> dict[str, Any]:
    return {"order_id": f"o-{secrets.token_hex(5)}", "amount": 2500, "currency": "eur"}


def _post(
    http: Http, body: Any, key: str | None = "k", url: str | None = None, **headers: str
) -> Any:
    if key is not None:
        headers["Idempotency-Key"] = key
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return http.post(url or http.site.checkout, content, **headers)


def test_checkout_then_replay_then_mismatch(http: Http) -> None:
    order = _order()
    key = f"key-{order['order_id']}"
    first = _post(http, order, key)
    assert first.status_code == 201, first.content
    assert first.headers.get("Idempotent-Replayed") is None
    body = first.json()
    assert body["order_id"] == order["order_id"]
    assert body["payment_intent_id"].startswith("pi_")
    assert body["client_secret"]

    again = _post(http, order, key)
    assert (again.status_code, again.headers["Idempotent-Replayed"]) == (201, "true")
    assert again.json() == body

    other = _post(http, {**order, "amount": 1}, key)
    assert other.status_code == 422
    assert other.headers["Content-Type"] == "application/problem+json"
    assert other.json()["code"] == "idempotency_key_reused"

    # Another user's same key is another key: the same request is executed for them, not
    # replayed from this user's record (and the order keeps its one PaymentIntent).
    theirs = _post(http, order, key, **{"X-User-Id": "u2"})
    assert theirs.status_code == 201, theirs.content
    assert theirs.headers.get("Idempotent-Replayed") is None
    assert theirs.json()["payment_intent_id"] == body["payment_intent_id"]


def test_fingerprints_use_the_route_template(http: Http) -> None:
    # Two concrete paths of one route are one route: the same key and body replay.
    order = _order()
    base = http.site.checkout_prefix
    first = _post(http, order, f"t-{order['order_id']}", url=f"{base}/carts/a/checkout")
    second = _post(http, order, f"t-{order['order_id']}", url=f"{base}/carts/b/checkout")
    assert (first.status_code, second.status_code) == (201, 201)
    assert second.headers["Idempotent-Replayed"] == "true"
    mismatch = _post(
        http, {**order, "amount": 7}, f"t-{order['order_id']}", url=f"{base}/carts/c/checkout"
    )
    assert mismatch.json()["instance"] == f"{base}/carts/<str:cart>/checkout"


def test_the_order_view(http: Http) -> None:
    order = _order()
    created = _post(http, {**order, "payment_method": "pm_card_visa"}, f"v-{order['order_id']}")
    assert created.status_code == 201
    orders = f"{http.site.prefix}/orders"
    view = http.get(f"{orders}/{order['order_id']}")
    assert view.status_code == 200
    doc = view.json()
    assert (doc["order_id"], doc["status"]) == (order["order_id"], "paid")
    assert doc["payment_intent_id"] == created.json()["payment_intent_id"]
    steps = [entry["step"] for entry in doc["audit"]]
    assert steps[0] == "started"
    assert "succeeded" in steps
    assert doc["audit_verified"] is True
    missing = http.get(f"{orders}/no-such-order")
    assert missing.status_code == 404
    assert missing.headers["Content-Type"] == "application/problem+json"
    posted = http.post(f"{orders}/{order['order_id']}", b"{}")
    assert (posted.status_code, posted.headers["Allow"]) == (405, "GET, HEAD")
    assert posted.headers["Content-Type"] == "application/problem+json"


@pytest.mark.parametrize(
    ("key", "code"),
    [(None, "missing_idempotency_key"), ("", None), ("k" * 256, "invalid_idempotency_key")],
)
def test_bad_keys_are_400(http: Http, key: str | None, code: str | None) -> None:
    response = _post(http, _order(), key)
    assert response.status_code == 400
    assert response.headers["Content-Type"] == "application/problem+json"
    if code is not None:
        assert response.json()["code"] == code


def test_bad_bodies_are_4xx(http: Http) -> None:
    assert _post(http, b"{not json", "b1").status_code == 400
    wrong = _post(http, {"order_id": "x", "amount": "12", "currency": "eur"}, "b2")
    assert wrong.status_code in (400, 422)
    assert wrong.headers["Content-Type"] == "application/problem+json"
    wrong_type = http.post(
        http.site.checkout, b"order_id=1", "text/plain", **{"Idempotency-Key": "b3"}
    )
    assert wrong_type.status_code == 415
    assert http.get(http.site.checkout).status_code == 405


def test_an_oversized_body_is_413_declared_or_not(http: Http) -> None:
    big = json.dumps({**_order(), "pad": "x" * (4 * LIMIT)}).encode()
    declared = _post(http, big, "big-1")
    assert declared.status_code == 413
    assert declared.json()["code"] == "payload_too_large"
    received = getattr(declared, "wsgi_request", None) or declared.asgi_request
    assert received.read() == big, "refused before reading"

    # Without a Content-Length (a chunked body passed on by the server), the limit holds while
    # reading: refused before the body was read to its end.
    site = http.site
    request = site.factory().post(
        site.checkout, big, content_type="application/json", headers={"Idempotency-Key": "big-2"}
    )
    del request.META["CONTENT_LENGTH"]
    streamed = site.call(site.checkout_view, request)
    assert streamed.status_code == 413
    assert json.loads(streamed.content)["code"] == "payload_too_large"
    assert request.read(), "the whole body was read"


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


def _signed(body: bytes) -> dict[str, str]:
    return {"Stripe-Signature": sign_payload(body, SECRET, timestamp=int(time.time()))}


def test_webhooks(http: Http) -> None:
    hook = f"{http.site.prefix}/stripe/webhook"
    body = _event(f"evt_{secrets.token_hex(5)}")
    signed = _signed(body)
    first = http.post(hook, body, **signed)
    assert (first.status_code, first.json()["outcome"]) == (200, "ignored")
    again = http.post(hook, body, **signed)
    assert (again.status_code, again.json()["outcome"]) == (200, "duplicate")

    forged = http.post(hook, body, **{"Stripe-Signature": "t=1,v1=00"})
    assert forged.status_code == 400
    assert forged.headers["Content-Type"] == "application/problem+json"
    assert http.get(hook).status_code == 405
    assert http.post(hook, body, "text/plain", **signed).status_code == 415
    assert http.post(hook, b"x" * (LIMIT + 1), **signed).status_code == 413


def test_csrf_guards_checkout_but_not_the_signed_webhook(site: Site) -> None:
    strict = Http(site, enforce_csrf_checks=True)
    order = _order()
    refused = _post(strict, order, f"c-{order['order_id']}")
    assert refused.status_code == 403  # Django's CSRF refusal: the view never ran

    token = secrets.token_hex(16)  # a 32-character CSRF secret, as the site's page would set
    strict.raw.cookies["csrftoken"] = token
    accepted = _post(strict, order, f"c-{order['order_id']}", **{"X-CSRFToken": token})
    assert accepted.status_code == 201

    # The webhook is exempt, which is safe because its signature is checked on every request.
    hook = f"{site.prefix}/stripe/webhook"
    body = _event(f"evt_{secrets.token_hex(5)}")
    without_token = Http(site, enforce_csrf_checks=True)
    assert without_token.post(hook, body, **_signed(body)).status_code == 200
    forged = without_token.post(hook, body, **{"Stripe-Signature": "t=1,v1=00"})
    assert forged.status_code == 400
    assert forged.json()["code"] == "invalid_signature"


# --- configuration ----------------------------------------------------------------------------


def test_settings_are_resolved_once_and_again_when_they_change(localstripe_url: str) -> None:
    with ExitStack() as stack:
        guards = [_sync_guard(localstripe_url, stack) for _ in range(3)]
        made: list[Guard] = []

        def factory() -> Guard:
            made.append(guards[len(made)])
            return made[-1]

        idem = DjangoIdempay()
        with override_settings(**{**SETTINGS, "IDEMPAY": {"GUARD": factory}}):
            assert idem.bound()[0] is guards[0]
            assert idem.bound()[0] is guards[0]
            assert len(made) == 1, "resolved once, not per request"
            with override_settings(IDEMPAY={"GUARD": f"{__name__}.current_guard"}):
                _CURRENT["guard"] = guards[2]
                stack.callback(_CURRENT.clear)
                assert idem.bound() == (guards[2], anonymous)
            assert idem.bound()[0] is guards[1], "the settings changed back: resolved again"
        assert len(made) == 2


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (None, 'IDEMPAY["GUARD"] is not set'),
        ({"SCOPE": f"{__name__}.scope"}, 'IDEMPAY["GUARD"] is not set'),
        ({"GUARD": "no_such_module.guard"}, "cannot be imported"),
        ({"GUARD": f"{__name__}.SECRET"}, "neither a Guard"),
        ({"GUARD": f"{__name__}.current_guard", "SCOPES": "x"}, "unknown keys: SCOPES"),
    ],
)
def test_bad_settings_are_configuration_errors(value: Any, message: str) -> None:
    with ExitStack() as stack:
        stack.enter_context(override_settings(**SETTINGS))
        if value is None:
            del settings.IDEMPAY
        else:
            stack.enter_context(override_settings(IDEMPAY=value))
        with pytest.raises(ConfigurationError, match=re.escape(message)):
            Client().post("/stripe/webhook", b"{}", content_type="application/json")


def test_a_view_refuses_a_guard_of_the_other_kind(localstripe_url: str) -> None:
    with start_blocking_portal() as portal, ExitStack() as stack:
        _CURRENT["guard"] = _async_guard(localstripe_url, stack, portal)
        stack.callback(_CURRENT.clear)
        stack.enter_context(override_settings(**SETTINGS))
        for url, view in [
            ("/checkout", "a plain def checkout"),
            ("/stripe/webhook", "webhook_view"),
            ("/orders/o-1", "order_view"),
        ]:
            with pytest.raises(ConfigurationError, match=rf"^{view}.* need a sync Guard"):
                Client().get(url)
        _CURRENT["guard"] = _sync_guard(localstripe_url, stack)
        stack.enter_context(override_settings(IDEMPAY=SETTINGS["IDEMPAY"]))
        with pytest.raises(ConfigurationError, match=r"^an async def checkout.* an AsyncGuard"):
            portal.call(AsyncClient().get, "/async/checkout")


def test_an_explicit_guard_needs_no_settings(localstripe_url: str) -> None:
    with ExitStack() as stack:
        idem = DjangoIdempay(_sync_guard(localstripe_url, stack), scope=scope)

        @idem.checkout()
        def explicit(request: CheckoutRequest) -> OrderSpec:
            return _spec(request)

        stack.enter_context(override_settings(**SETTINGS))
        del settings.IDEMPAY
        factory = RequestFactory()
        order = _order()
        request = factory.post(
            "/checkout",
            json.dumps(order),
            content_type="application/json",
            headers={"Idempotency-Key": "e-1"},
        )
        assert explicit(request).status_code == 201
        view = idem.order_view(factory.get(f"/orders/{order['order_id']}"), order["order_id"])
        assert json.loads(view.content)["order_id"] == order["order_id"]
        body = _event(f"evt_{secrets.token_hex(5)}")
        hook = factory.post("/hook", body, content_type="application/json", headers=_signed(body))
        assert idem.webhook_view(hook).status_code == 200


class _HeldGuard(Guard):
    """A sync guard whose webhook, once entered, waits until the event loop releases it."""

    entered = threading.Event()
    released = threading.Event()

    def handle_webhook(self, request: GuardRequest) -> GuardResponse:
        self.entered.set()
        if not self.released.wait(timeout=10):
            return GuardResponse(599)  # never released: the loop was blocked
        return super().handle_webhook(request)


def test_an_async_view_runs_a_sync_guard_without_blocking_the_loop(localstripe_url: str) -> None:
    # The loop releases the engine only after the engine started: if the view ran the engine on
    # the loop, the loop could not run the release and the engine would give up with 599.
    with start_blocking_portal() as portal, ExitStack() as stack:
        guard = _sync_guard(localstripe_url, stack, cls=_HeldGuard)
        _HeldGuard.entered.clear()
        _HeldGuard.released.clear()
        view = DjangoIdempay(guard).async_webhook_view
        body = _event(f"evt_{secrets.token_hex(5)}")
        request = AsyncRequestFactory().post(
            "/hook", body, content_type="application/json", headers=_signed(body)
        )

        async def deliver() -> int:
            delivery = asyncio.ensure_future(view(request))
            assert await asyncio.to_thread(_HeldGuard.entered.wait, 10)
            _HeldGuard.released.set()
            response = await delivery
            return int(response.status_code)

        assert portal.call(deliver) == 200
