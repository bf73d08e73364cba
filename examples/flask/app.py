"""The smallest Flask shop guarded by idempay: an app factory, a checkout, the webhook.

Run it with ``flask --app app:create_app run`` from this directory (one process; for several,
any WSGI server: every process builds its guard on the same database). Configuration comes from
the same environment variables as the other examples (see examples/fastapi/README.md).
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta
from typing import Any

from flask import Flask

from idempay.adapters.flask import Idempay
from idempay.backends import (
    idempotency_store_from_url,
    lock_provider_from_url,
    payment_store_from_url,
)
from idempay.engine import CheckoutRequest, EffectContext, Guard, GuardConfig, OrderSpec
from idempay.gateway import StripeGateway

log = logging.getLogger("shop")


def user_scope(req: Any) -> tuple[str, str]:
    """Idempotency keys are scoped per user (a real shop takes it from its session)."""
    return "", req.headers.get("X-User-Id") or "anonymous"


idem = Idempay(scope=user_scope)


@idem.checkout()
def checkout(order: CheckoutRequest) -> OrderSpec:
    fields = order.fields
    return OrderSpec(
        order_id=fields.identifier("order_id"),
        amount=fields.integer("amount", minimum=1, maximum=99_999_999),
        currency=fields.currency("currency"),
        payment_method=fields.optional_identifier("payment_method"),
    )


def send_receipt(effect: EffectContext) -> None:
    # Hand effect.dedup_key to the e-mail provider as its idempotency key.
    log.info("receipt for order %s (%s)", effect.order_id, effect.dedup_key)


def make_guard() -> Guard:
    database = os.environ.get("IDEMPAY_DATABASE_URL", "sqlite:///./idempay-example.db")
    secrets = os.environ.get("STRIPE_WEBHOOK_SECRET", "")
    guard = Guard(
        payments=payment_store_from_url(database),
        records=idempotency_store_from_url(database),
        locks=lock_provider_from_url(os.environ.get("IDEMPAY_LOCK_URL", "memory://")),
        gateway=StripeGateway.from_settings(
            os.environ.get("STRIPE_API_KEY", "sk_test_idempay_example"),
            api_base=os.environ.get("STRIPE_API_BASE") or None,
        ),
        config=GuardConfig(
            webhook_secrets=tuple(s.strip() for s in secrets.split(",") if s.strip()),
            lease=timedelta(seconds=float(os.environ.get("IDEMPAY_LEASE_SECONDS", "30"))),
        ),
    )
    guard.effect("receipt_email", on="paid")(send_receipt)
    return guard


def create_app() -> Flask:
    app = Flask(__name__)
    app.config["IDEMPAY_GUARD"] = make_guard  # a Guard, or a factory init_app calls once
    idem.init_app(app)  # POST /stripe/webhook and GET /orders/<order_id>
    app.add_url_rule("/checkout", view_func=checkout, methods=["POST"])

    @app.post("/effects/run")
    def run_effects() -> dict[str, int]:
        # The outbox dispatcher, for this small example: a real shop runs it in a worker
        # (`while True: guard.dispatch_effects()`), in every process that commits payments.
        guard: Guard = app.extensions["idempay"].guard
        return {"done": guard.dispatch_effects().done}

    return app
