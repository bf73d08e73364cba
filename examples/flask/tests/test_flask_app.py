"""The Flask example: checkout, replay, a signed webhook, the receipt once, the order view."""

from __future__ import annotations

import importlib.util
import json
import secrets
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from idempay.backends.sql import upgrade
from idempay.core.signature import sign_payload

SECRET = "whsec_flask_example"


def _load_app_module() -> Any:
    path = Path(__file__).resolve().parents[1] / "app.py"
    spec = importlib.util.spec_from_file_location("flask_example_app", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["flask_example_app"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def client(monkeypatch: pytest.MonkeyPatch, sqlite_url: str, localstripe_url: str) -> Iterator[Any]:
    upgrade(sqlite_url)
    for name, value in {
        "IDEMPAY_DATABASE_URL": sqlite_url,
        "STRIPE_API_BASE": localstripe_url,
        "STRIPE_WEBHOOK_SECRET": SECRET,
    }.items():
        monkeypatch.setenv(name, value)
    app = _load_app_module().create_app()
    with app.test_client() as test_client:
        yield test_client
    guard = app.extensions["idempay"].guard
    guard.gateway.close()
    guard.payments.close()


def test_the_flask_example_pays_once_and_sends_one_receipt(client: Any) -> None:
    order = {"order_id": f"fl-{secrets.token_hex(5)}", "amount": 900, "currency": "eur"}
    headers = {"Content-Type": "application/json", "Idempotency-Key": f"k-{order['order_id']}"}
    first = client.post("/checkout", data=json.dumps(order), headers=headers)
    assert first.status_code == 201, first.get_data(as_text=True)
    again = client.post("/checkout", data=json.dumps(order), headers=headers)
    assert (again.status_code, again.headers["Idempotent-Replayed"]) == (201, "true")

    intent = first.get_json()["payment_intent_id"]
    event = json.dumps(
        {
            "id": f"evt_{secrets.token_hex(6)}",
            "object": "event",
            "type": "payment_intent.succeeded",
            "created": int(time.time()),
            "livemode": False,
            "data": {
                "object": {
                    "id": intent,
                    "object": "payment_intent",
                    "status": "succeeded",
                    "amount": 900,
                    "currency": "eur",
                    "livemode": False,
                    "metadata": {"order_id": order["order_id"]},
                }
            },
        }
    ).encode()
    signed = {
        "Content-Type": "application/json",
        "Stripe-Signature": sign_payload(event, SECRET, timestamp=int(time.time())),
    }
    assert client.post("/stripe/webhook", data=event, headers=signed).status_code == 200
    assert client.post("/stripe/webhook", data=event, headers=signed).status_code == 200
    assert client.post("/effects/run").get_json() == {"done": 1}
    assert client.post("/effects/run").get_json() == {"done": 0}

    view = client.get(f"/orders/{order['order_id']}").get_json()
    assert view["status"] == "paid"
    assert [e["kind"] for e in view["effects"]] == ["receipt_email"]
    assert [a["step"] for a in view["audit"]].count("duplicate") == 1
