"""The application the operations tests run against: a guard on a real database, paying
through a Stripe-compatible server (the simulator, or localstripe), whose customers pay "in the
browser" so that only a webhook, dropped by the server, would tell the shop."""

from __future__ import annotations

import json
from typing import Any

import stripe

from idempay.backends import idempotency_store_from_url, payment_store_from_url
from idempay.backends.sql import upgrade
from idempay.core.audit import AuditSource, AuditStep, verify_trail
from idempay.core.orders import OrderStatus
from idempay.engine import (
    CheckoutRequest,
    Guard,
    GuardConfig,
    GuardRequest,
    GuardResponse,
    OrderSpec,
)
from idempay.gateway import StripeGateway

AMOUNT = 2500


class Storefront:
    """Checkouts of ``AMOUNT`` eur through the guard's checkout endpoint, for ``tenant``."""

    def __init__(
        self,
        url: str,
        *,
        api_key: str,
        api_base: str,
        tenant: str,
        config: GuardConfig,
    ) -> None:
        upgrade(url)
        self.url = url
        self.tenant = tenant
        self.payments = payment_store_from_url(url)
        self.records = idempotency_store_from_url(url)
        self.gateway = StripeGateway.from_settings(api_key, api_base=api_base)
        self.stripe = stripe.StripeClient(
            api_key, base_addresses={"api": api_base}, max_network_retries=0
        )
        self.guard = Guard(
            payments=self.payments, records=self.records, gateway=self.gateway, config=config
        )

        @self.guard.checkout()
        def checkout(request: CheckoutRequest) -> OrderSpec:
            return OrderSpec(
                order_id=request.fields.identifier("order_id"),
                amount=AMOUNT,
                currency="eur",
                payment_method=request.fields.optional_identifier("payment_method"),
            )

        self.endpoint = checkout

    def close(self) -> None:
        self.gateway.close()
        self.payments.close()  # type: ignore[attr-defined]
        self.records.close()  # type: ignore[attr-defined]

    def checkout(
        self, order_id: str, *, key: str | None = None, payment_method: str | None = None
    ) -> GuardResponse:
        """POST /checkout for ``order_id``, with the idempotency key ``k-ORDER`` by default."""
        body: dict[str, Any] = {"order_id": order_id}
        if payment_method is not None:
            body["payment_method"] = payment_method
        return self.endpoint(
            GuardRequest(
                method="POST",
                route="/checkout",
                body=json.dumps(body).encode(),
                headers={
                    "Content-Type": "application/json",
                    "Idempotency-Key": key or f"k-{order_id}",
                },
                tenant=self.tenant,
                user="u1",
            )
        )

    def awaiting(self, order_id: str) -> str:
        """Check ``order_id`` out without paying; return its PaymentIntent."""
        response = self.checkout(order_id)
        assert response.status == 201, response.body
        assert response.json()["status"] == "awaiting_payment"
        return str(response.json()["payment_intent_id"])

    def pay_in_browser(self, intent_id: str, method: str = "pm_card_visa") -> None:
        """What Stripe.js does: the customer confirms the PaymentIntent."""
        self.stripe.v1.payment_intents.confirm(intent_id, params={"payment_method": method})

    def status(self, order_id: str) -> OrderStatus:
        with self.payments.transaction() as tx:
            order = tx.get_order(self.tenant, order_id)
        assert order is not None
        return order.state.status

    def trail(self, order_id: str) -> list[tuple[AuditStep, AuditSource]]:
        """The order's audit trail, its hash chain verified."""
        with self.payments.transaction() as tx:
            entries = tx.audit_trail(self.tenant, order_id)
        assert verify_trail(entries).ok
        return [(e.step, e.source) for e in entries]
