"""The async engine: the same flows, with asyncio tasks, async stores and the async gateway."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections import Counter

import pytest

from idempay.core.orders import OrderStatus
from idempay.core.signature import sign_payload
from idempay.engine import (
    AsyncGuard,
    CheckoutRequest,
    EffectContext,
    GuardConfig,
    GuardRequest,
    OrderSpec,
)
from idempay.gateway import AsyncStripeGateway
from idempay.memory import AsyncMemoryIdempotencyStore, AsyncMemoryPaymentStore

pytestmark = pytest.mark.anyio
SECRET = "whsec_async"


async def test_async_checkout_then_webhook_then_effect(localstripe_url: str) -> None:
    payments = AsyncMemoryPaymentStore()
    gateway = AsyncStripeGateway.from_settings("sk_test_async", api_base=localstripe_url)
    guard = AsyncGuard(
        payments=payments,
        records=AsyncMemoryIdempotencyStore(),
        gateway=gateway,
        config=GuardConfig(webhook_secrets=(SECRET,)),
    )
    sent: Counter[str] = Counter()

    @guard.effect("receipt", on="paid")
    async def receipt(ctx: EffectContext) -> None:
        sent[ctx.dedup_key] += 1

    @guard.checkout()
    async def checkout(request: CheckoutRequest) -> OrderSpec:
        return OrderSpec(
            order_id=request.fields.identifier("order_id"), amount=1999, currency="eur"
        )

    order_id = f"o-{secrets.token_hex(4)}"
    request = GuardRequest(
        method="POST",
        route="/checkout",
        body=json.dumps({"order_id": order_id}).encode(),
        headers={"Content-Type": "application/json", "Idempotency-Key": f"k-{order_id}"},
    )
    start = asyncio.Event()

    async def click() -> int:
        await start.wait()
        return (await checkout(request)).status

    tasks = [asyncio.create_task(click()) for _ in range(5)]
    await asyncio.sleep(0)
    start.set()
    statuses = await asyncio.gather(*tasks)
    assert 201 in statuses
    assert set(statuses) <= {201, 409}
    created = await checkout(request)
    assert created.header("Idempotent-Replayed") == "true"
    intent = created.json()["payment_intent_id"]
    assert [pi.id for pi in await gateway.find_payment_intents(order_id=order_id)] == [intent]

    fetched = await gateway.retrieve_payment_intent(intent)
    event = {
        "id": f"evt_{secrets.token_hex(4)}",
        "object": "event",
        "type": "payment_intent.succeeded",
        "created": 1_767_225_600,
        "livemode": False,
        "data": {
            "object": {
                "id": intent,
                "object": "payment_intent",
                "status": "succeeded",
                "amount": fetched.amount,
                "currency": "eur",
                "livemode": False,
                "metadata": dict(fetched.metadata),
            }
        },
    }
    body = json.dumps(event).encode()
    webhook = GuardRequest(
        method="POST",
        route="/stripe/webhook",
        body=body,
        headers={
            "Content-Type": "application/json",
            "Stripe-Signature": sign_payload(body, SECRET, timestamp=int(time.time())),
        },
    )
    outcomes = await asyncio.gather(*(guard.handle_webhook(webhook) for _ in range(4)))
    assert sorted(r.json()["outcome"] for r in outcomes).count("applied") == 1
    assert all(r.status == 200 for r in outcomes)
    async with payments.transaction() as tx:
        order = await tx.get_order("", order_id)
    assert order is not None
    assert order.state.status is OrderStatus.PAID
    report = await guard.dispatch_effects()
    assert report.done == 1
    assert list(sent.values()) == [1]
    await gateway.aclose()
