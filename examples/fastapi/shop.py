"""A small shop on FastAPI, guarded by idempay: checkout, Stripe webhooks, order history.

Run it with ``serve.sh HOST PORT [WORKERS]`` (``uvicorn --factory shop:create_app``);
configuration comes from the environment (see README.md). The shop's own payment code is
:func:`checkout` and :func:`send_receipt`; idempay does the rest (idempotency keys, one
PaymentIntent per order, webhooks applied once and in order, the receipt sent once per paid
order, an audit trail).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse

from idempay.adapters.starlette import StarletteIdempay
from idempay.backends import (
    async_idempotency_store_from_url,
    async_lock_provider_from_url,
    async_payment_store_from_url,
)
from idempay.engine import AsyncGuard, CheckoutRequest, EffectContext, GuardConfig, OrderSpec
from idempay.gateway import AsyncStripeGateway

log = logging.getLogger("shop")

PAGE = (Path(__file__).parent / "checkout.html").read_text(encoding="utf-8")


@dataclass(frozen=True)
class Settings:
    """The example's configuration: the same variables for every example and for the CLI."""

    database_url: str
    lock_url: str
    stripe_api_key: str
    stripe_api_base: str | None
    webhook_secrets: tuple[str, ...]
    lease_seconds: float = 30.0
    redis_prefix: str = "idempay-example"

    @classmethod
    def from_env(cls) -> Settings:
        secrets = os.environ.get("STRIPE_WEBHOOK_SECRET", "")
        return cls(
            database_url=os.environ.get("IDEMPAY_DATABASE_URL", "sqlite:///./idempay-example.db"),
            lock_url=os.environ.get("IDEMPAY_LOCK_URL", "memory://"),
            stripe_api_key=os.environ.get("STRIPE_API_KEY", "sk_test_idempay_example"),
            stripe_api_base=os.environ.get("STRIPE_API_BASE") or None,
            webhook_secrets=tuple(s.strip() for s in secrets.split(",") if s.strip()),
            lease_seconds=float(os.environ.get("IDEMPAY_LEASE_SECONDS", "30")),
            redis_prefix=os.environ.get("IDEMPAY_REDIS_PREFIX", "idempay-example"),
        )


def user_scope(request: Request) -> tuple[str, str]:
    """Idempotency keys are scoped per user; this example trusts an ``X-User-Id`` header (a
    real shop takes the user from its session or token)."""
    return "", request.headers.get("x-user-id") or "anonymous"


def build_guard(settings: Settings | None = None) -> AsyncGuard:
    """The shop's guard, with its receipt effect: the web app uses it, and so do idempay's
    commands (``idempay reconcile --app shop:build_guard``), so that an order they pay gets
    its receipt too."""
    settings = settings or Settings.from_env()
    redis = settings.lock_url.startswith("redis")
    options = {"prefix": settings.redis_prefix} if redis else {}
    guard = AsyncGuard(
        payments=async_payment_store_from_url(settings.database_url),
        records=async_idempotency_store_from_url(settings.database_url),
        locks=async_lock_provider_from_url(settings.lock_url, **options),
        gateway=AsyncStripeGateway.from_settings(
            settings.stripe_api_key, api_base=settings.stripe_api_base
        ),
        config=GuardConfig(
            webhook_secrets=settings.webhook_secrets,
            lease=timedelta(seconds=settings.lease_seconds),
        ),
    )

    @guard.effect("receipt_email", on="paid")
    async def send_receipt(effect: EffectContext) -> None:
        # A real shop hands effect.dedup_key to its e-mail provider as the idempotency key,
        # so that a retried effect never sends a second e-mail.
        log.info("receipt for order %s (%s)", effect.order_id, effect.dedup_key)

    return guard


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the shop. Every worker process builds its own guard on the shared stores."""
    guard = build_guard(settings)
    idem = StarletteIdempay(guard, scope=user_scope)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        dispatcher = asyncio.create_task(_dispatch_forever(guard))
        try:
            yield
        finally:
            dispatcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await dispatcher
            await guard.flush_journal()
            await guard.gateway.aclose()  # type: ignore[union-attr]

    app = FastAPI(title="idempay example shop", lifespan=lifespan)

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return PAGE

    @app.post("/checkout")
    @idem.checkout()
    async def checkout(request: CheckoutRequest) -> OrderSpec:
        fields = request.fields
        return OrderSpec(
            order_id=fields.identifier("order_id"),
            amount=fields.integer("amount", minimum=1, maximum=99_999_999),
            currency=fields.currency("currency"),
            payment_method=fields.optional_identifier("payment_method"),
        )

    app.router.routes.extend(idem.routes())
    return app


async def _dispatch_forever(guard: AsyncGuard) -> None:
    """Run the effects (the receipt) after their transition committed, in every worker: the
    outbox hands each effect to one dispatcher at a time."""
    while True:
        try:
            report = await guard.dispatch_effects(limit=50)
        except Exception:  # a database hiccup: try again on the next round
            log.exception("effect dispatch failed")
            report = None
        if report is None or not (report.done or report.retried):
            await asyncio.sleep(0.2)
