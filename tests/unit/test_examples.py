"""The examples the documentation shows run as shown."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

from idempay import OrderState, OrderStatus, SignatureVerificationError, sign_payload

ROOT = Path(__file__).resolve().parents[2]


def load(relative: str) -> ModuleType:
    path = ROOT / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


def test_core_webhook_example_pays_the_order_once() -> None:
    example = load("examples/core_webhook.py")
    now = 1_767_225_600
    body = json.dumps(
        {
            "id": "evt_1",
            "object": "event",
            "type": "payment_intent.succeeded",
            "created": now,
            "livemode": False,
            "data": {
                "object": {
                    "id": "pi_1",
                    "object": "payment_intent",
                    "status": "succeeded",
                    "amount": 1999,
                    "amount_received": 1999,
                    "currency": "eur",
                    "livemode": False,
                    "metadata": {"order_id": "o1"},
                }
            },
        }
    ).encode()
    order = OrderState(OrderStatus.AWAITING_PAYMENT, 1999, "eur", payment_intent_id="pi_1")
    header = sign_payload(body, "whsec_previous", timestamp=now)
    paid = example.on_webhook(body, header, order, now=now)
    assert paid.status is OrderStatus.PAID
    # The same delivery again changes nothing.
    assert example.on_webhook(body, header, paid, now=now) == paid
    with pytest.raises(SignatureVerificationError):
        example.on_webhook(body, sign_payload(body, "whsec_revoked", timestamp=now), order, now=now)


def test_the_readme_shows_the_example_as_it_is() -> None:
    example = (ROOT / "examples" / "core_webhook.py").read_text(encoding="utf-8")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert example[example.index("import time") :] in readme
