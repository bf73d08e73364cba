"""``idempay inspect``: an order, its trail with the hash chain verified, its journal, effects."""

from __future__ import annotations

import json
import time

import pytest
import sqlalchemy as sa

from idempay.backends import payment_store_from_url
from idempay.backends.sql import upgrade
from idempay.cli import EXIT_BROKEN_TRAIL, EXIT_NOT_FOUND, main
from idempay.core.orders import OrderState, OrderStatus
from idempay.core.signature import sign_payload
from idempay.engine import Guard, GuardConfig, GuardRequest

SECRET = "whsec_inspect"


@pytest.fixture
def paid_order(sqlite_url: str) -> str:
    upgrade(sqlite_url)
    payments = payment_store_from_url(sqlite_url)
    guard = Guard(payments=payments, config=GuardConfig(webhook_secrets=(SECRET,), journal_batch=1))
    guard.effect("receipt", on="paid")(lambda ctx: None)
    with payments.transaction() as tx:
        tx.insert_order("", "o-1", OrderState(OrderStatus.AWAITING_PAYMENT, 700, "eur", "pi_1"))
    body = json.dumps(
        {
            "id": "evt_1",
            "object": "event",
            "type": "payment_intent.succeeded",
            "created": int(time.time()),
            "livemode": False,
            "data": {
                "object": {
                    "id": "pi_1",
                    "object": "payment_intent",
                    "status": "succeeded",
                    "amount": 700,
                    "currency": "eur",
                    "livemode": False,
                    "metadata": {"order_id": "o-1"},
                }
            },
        }
    ).encode()
    request = GuardRequest(
        method="POST",
        route="/stripe/webhook",
        body=body,
        headers={
            "Content-Type": "application/json",
            "Stripe-Signature": sign_payload(body, SECRET, timestamp=int(time.time())),
        },
    )
    assert guard.handle_webhook(request).status == 200
    assert guard.handle_webhook(request).json()["outcome"] == "duplicate"
    guard.dispatch_effects()
    payments.close()  # type: ignore[attr-defined]
    return sqlite_url


def test_inspect_shows_the_order_its_trail_and_its_effects(
    paid_order: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["inspect", "o-1", "--database-url", paid_order]) == 0
    out = capsys.readouterr().out
    assert "status     paid" in out
    assert "succeeded" in out
    assert "*" in out  # the duplicate, from the journal
    assert "hash chain intact" in out
    assert "receipt" in out


def test_inspect_json_and_the_environment(
    paid_order: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IDEMPAY_DATABASE_URL", paid_order)
    assert main(["inspect", "o-1", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["status"] == "paid"
    assert [a["step"] for a in document["audit"]] == ["succeeded", "duplicate"]
    assert document["audit_check"] == {"ok": True, "broken_at": None, "problem": None}
    assert [e["kind"] for e in document["effects"]] == ["receipt"]


def test_inspect_exit_codes(
    paid_order: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert main(["inspect", "nope", "--database-url", paid_order]) == EXIT_NOT_FOUND
    assert "no order" in capsys.readouterr().err
    monkeypatch.delenv("IDEMPAY_DATABASE_URL", raising=False)
    assert main(["inspect", "o-1"]) == 2
    # Edited behind idempay's back: the chain says so, and the exit code too.
    engine = sa.create_engine(paid_order)
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE idempay_audit SET step = 'failed' WHERE order_id = 'o-1'")
    engine.dispose()
    assert main(["inspect", "o-1", "--database-url", paid_order]) == EXIT_BROKEN_TRAIL
    assert "BROKEN at seq 1" in capsys.readouterr().out
