"""The shop's views: the checkout page and the checkout itself (idempay routes the rest)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from django.http import HttpResponse, HttpResponseNotAllowed  # type: ignore[import-untyped]
from django.views.decorators.csrf import csrf_exempt  # type: ignore[import-untyped]

from idempay.adapters.django import idempay_checkout
from idempay.engine import CheckoutRequest, OrderSpec

PAGE = (Path(__file__).parent / "checkout.html").read_text(encoding="utf-8")


def page(request: Any) -> Any:
    """``GET /``: a checkout page whose Pay button stays enabled after a click."""
    if request.method not in ("GET", "HEAD"):
        return HttpResponseNotAllowed(["GET", "HEAD"])
    return HttpResponse(PAGE, content_type="text/html; charset=utf-8")


@idempay_checkout()
def checkout(request: CheckoutRequest) -> OrderSpec:
    """Say what to charge; idempay makes it one PaymentIntent per order, whatever the clicks."""
    fields = request.fields
    return OrderSpec(
        order_id=fields.identifier("order_id"),
        amount=fields.integer("amount", minimum=1, maximum=99_999_999),
        currency=fields.currency("currency"),
        payment_method=fields.optional_identifier("payment_method"),
    )


# CSRF: exempted explicitly, for this example only. The checkout is called by the page's fetch
# and by API clients, and this shop has no cookie session that a forged cross-site request could
# ride on. A real shop keeps CSRF protection for cookie-authenticated callers (its pages send the
# csrftoken cookie back as X-CSRFToken) and authenticates API clients by token, which a
# cross-site request cannot carry. The webhook is exempted by idempay's adapter: Stripe signs it.
checkout_view = csrf_exempt(checkout)
