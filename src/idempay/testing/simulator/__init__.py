"""A Stripe API simulator for tests and demos: standard library only, thread-safe.

It speaks the part of Stripe's v1 API that payment integrations use (PaymentIntents, Charges,
Refunds, Events), with Stripe's idempotency semantics, test payment methods for success,
declines, 3-D Secure and bank debits, and a webhook sender that signs events as Stripe does and
can duplicate, delay, reorder, drop and retry them. Point the official ``stripe`` library at
it::

    from idempay.testing.simulator import StripeSimulator, WebhookEndpoint

    with StripeSimulator(webhook_endpoints=[WebhookEndpoint(url, "whsec_test")]) as sim:
        client = stripe.StripeClient(sim.api_key, base_addresses={"api": sim.url})
        ...
        sim.flush_webhooks()

Run it on its own with ``python -m idempay.testing.simulator --port 12111``. See
docs/simulator.md.
"""

from __future__ import annotations

from idempay.testing.simulator._errors import StripeAPIError
from idempay.testing.simulator._faults import Fault, Gate
from idempay.testing.simulator._idempotency import KEY_LIFETIME
from idempay.testing.simulator._methods import TEST_METHODS, Behaviour, MethodSpec
from idempay.testing.simulator._simulator import (
    DEFAULT_API_KEY,
    DEFAULT_API_VERSION,
    StripeSimulator,
)
from idempay.testing.simulator._webhooks import DeliveryPolicy, DeliveryStats, WebhookEndpoint

__all__ = [
    "DEFAULT_API_KEY",
    "DEFAULT_API_VERSION",
    "KEY_LIFETIME",
    "TEST_METHODS",
    "Behaviour",
    "DeliveryPolicy",
    "DeliveryStats",
    "Fault",
    "Gate",
    "MethodSpec",
    "StripeAPIError",
    "StripeSimulator",
    "WebhookEndpoint",
]
