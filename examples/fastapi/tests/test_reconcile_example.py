"""The FastAPI shop healed by ``idempay reconcile``: a customer pays, every webhook is lost, and
the command run from the shop's directory with the shop's own guard (``--app
shop:build_guard``) brings the order to ``paid``, its receipt sent by the shop's dispatcher."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import stripe
from tests.example_server import ExampleServer

from idempay.testing.simulator import DeliveryPolicy, StripeSimulator

SECRET = "whsec_reconcile_example"
TIMEOUT = 30


@pytest.fixture
def sim() -> Iterator[StripeSimulator]:
    with StripeSimulator(delivery=DeliveryPolicy(drop_probability=1.0), seed=11) as simulator:
        yield simulator


@pytest.fixture
def shop(sim: StripeSimulator, tmp_path: Path) -> Iterator[ExampleServer]:
    env = {
        "IDEMPAY_DATABASE_URL": f"sqlite:///{tmp_path / 'shop.db'}",
        "IDEMPAY_LOCK_URL": "memory://",
        "STRIPE_API_KEY": sim.api_key,
        "STRIPE_API_BASE": sim.url,
        "STRIPE_WEBHOOK_SECRET": SECRET,
    }
    server = ExampleServer("fastapi", env)
    # Stripe knows the shop's endpoint; every delivery to it is lost on the way.
    sim.add_webhook_endpoint(f"{server.url}/stripe/webhook", SECRET)
    with server:
        yield server


def _view(shop: ExampleServer, order_id: str) -> dict[str, Any]:
    response = httpx.get(f"{shop.url}/orders/{order_id}", timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


@pytest.mark.sqlite
def test_reconcile_heals_an_order_whose_webhooks_were_all_lost(
    shop: ExampleServer, sim: StripeSimulator
) -> None:
    order_id = "healed-1"
    checkout = httpx.post(
        f"{shop.url}/checkout",
        json={"order_id": order_id, "amount": 2500, "currency": "eur"},
        headers={"Idempotency-Key": f"k-{order_id}"},
        timeout=TIMEOUT,
    )
    assert checkout.status_code == 201, checkout.text
    intent = checkout.json()["payment_intent_id"]

    # The customer pays in the browser (Stripe.js confirms the PaymentIntent).
    client = stripe.StripeClient(sim.api_key, base_addresses={"api": sim.url})
    client.v1.payment_intents.confirm(intent, params={"payment_method": "pm_card_visa"})
    stats = sim.flush_webhooks(timeout=TIMEOUT)
    assert stats.dropped >= 1
    assert stats.delivered == 0
    assert _view(shop, order_id)["status"] == "awaiting_payment"

    command = ["reconcile", "--older-than", "0", "--app", "shop:build_guard"]
    healed = subprocess.run(
        [sys.executable, "-m", "idempay", *command],
        env=shop.env,
        cwd=shop.script.parent,
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 2,
        check=False,
    )
    assert healed.returncode == 0, healed.stdout + healed.stderr
    (row,) = [line.split() for line in healed.stdout.splitlines() if order_id in line.split()]
    assert row[1:] == [order_id, "awaiting_payment", "paid", "changed"]

    view = _view(shop, order_id)
    assert view["status"] == "paid"
    assert ("succeeded", "reconciler") in [(a["step"], a["source"]) for a in view["audit"]]
    # Paid with the shop's own guard, the order got its receipt: the shop's dispatcher sends it.
    deadline = time.monotonic() + TIMEOUT
    while not view["effects"] and time.monotonic() < deadline:
        time.sleep(0.1)  # polling the server's dispatcher, bounded; orders nothing
        view = _view(shop, order_id)
    assert [(e["kind"], e["status"]) for e in view["effects"]] == [("receipt_email", "done")]
    assert sum(1 for c in sim.charges() if c["payment_intent"] == intent) == 1
