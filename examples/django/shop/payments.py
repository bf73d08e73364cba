"""The shop's payments: idempay's guard, the scope of idempotency keys, the receipt effect.

``settings.IDEMPAY`` points idempay's Django adapter at :func:`guard` and :func:`user_scope`.
The shop runs sync views with a sync :class:`~idempay.engine.Guard`: under uvicorn, Django runs
each sync view in a thread per request, and the guard is thread-safe.
"""

from __future__ import annotations

import functools
import logging
import threading
from datetime import timedelta
from typing import Any

from django.conf import settings  # type: ignore[import-untyped]

from idempay.backends import (
    idempotency_store_from_url,
    lock_provider_from_url,
    payment_store_from_url,
)
from idempay.engine import EffectContext, Guard, GuardConfig
from idempay.gateway import StripeGateway
from shop.dispatcher import EffectDispatcher

log = logging.getLogger(__name__)

_building = threading.Lock()


def guard() -> Guard:
    """The guard of this process, built from the settings on the first call and the same on
    every later one: the adapter's views and the effect dispatcher share it (one pool per
    store, one HTTP client to Stripe)."""
    with _building:
        return _build()


def dispatcher() -> EffectDispatcher:
    """The effect dispatcher of this process, on :func:`guard` (started by the app config)."""
    with _building:
        return _dispatcher()


@functools.cache
def _dispatcher() -> EffectDispatcher:
    return EffectDispatcher(_build())


@functools.cache
def _build() -> Guard:
    lock_url = str(settings.IDEMPAY_LOCK_URL)
    redis = lock_url.startswith("redis")
    options = {"prefix": str(settings.IDEMPAY_REDIS_PREFIX)} if redis else {}
    built = Guard(
        payments=payment_store_from_url(settings.IDEMPAY_DATABASE_URL),
        records=idempotency_store_from_url(settings.IDEMPAY_DATABASE_URL),
        locks=lock_provider_from_url(lock_url, **options),
        gateway=StripeGateway.from_settings(
            settings.STRIPE_API_KEY, api_base=settings.STRIPE_API_BASE
        ),
        config=GuardConfig(
            webhook_secrets=tuple(settings.STRIPE_WEBHOOK_SECRETS),
            lease=timedelta(seconds=settings.IDEMPAY_LEASE_SECONDS),
        ),
    )
    # Registered in every process (web workers run the dispatcher too): whichever process
    # commits the "paid" transition writes the outbox row from its own registry.
    built.effect("receipt_email", on="paid")(send_receipt)
    return built


def send_receipt(effect: EffectContext) -> None:
    """Send the receipt of a paid order: run once the transition to ``paid`` committed."""
    # A real shop hands effect.dedup_key to its e-mail provider as the idempotency key, so
    # that a retried effect never sends a second e-mail.
    log.info("receipt for order %s (%s)", effect.order_id, effect.dedup_key)


def user_scope(request: Any) -> tuple[str, str]:
    """Idempotency keys are scoped per user; this example trusts an ``X-User-Id`` header (a
    real shop takes the user from its session or token: ``request.user``)."""
    return "", request.headers.get("X-User-Id") or "anonymous"
