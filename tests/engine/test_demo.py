"""``idempay demo``: the example shop under a storm, over HTTP, checked from the running system."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import pytest

from idempay import _demo
from idempay.cli import main


def test_the_demo_holds_every_invariant(capsys: pytest.CaptureFixture[str]) -> None:
    # A quarter of the webhooks never arrive: every order still ends as Stripe has it (one of
    # the invariants checked), which only the reconciler run by the demo can bring about.
    assert main(["demo", "--orders", "24", "--workers", "2", "--seed", "3", "--lose", "25"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    table = {
        line.rsplit(None, 1)[0].strip(): int(line.rsplit(None, 1)[1])
        for line in lines
        if line.startswith("  ") and line.rsplit(None, 1)[-1].isdigit()
    }
    assert table["orders"] == 24
    assert table["PaymentIntents"] == 24
    assert table["invariant violations"] == 0
    assert table["workers killed and restarted"] == 1
    assert table["duplicate clicks absorbed"] == table["checkout clicks"] - 24
    assert table["duplicate deliveries absorbed"] > 0
    assert table["charges"] == table["orders paid"] == table["effects sent"]
    assert table["webhooks never delivered"] > 0
    assert "orders healed by the reconciler" in table
    summary = dict(pair.split("=") for pair in lines[-1].split())
    assert lines[-1].startswith("violations=0 orders=24 ")
    assert int(summary["audit_steps"]) == table["audit steps"] > 0


def _view(status: str, receipts: int, *, verified: bool = True, intent: str = "pi_1") -> dict:
    return {
        "status": status,
        "payment_intent_id": intent,
        "effects": [{"kind": "receipt_email"}] * receipts,
        "audit": [],
        "audit_verified": verified,
    }


@pytest.mark.parametrize(
    ("view", "intents", "charges", "problem"),
    [
        (_view("paid", 1), [{"id": "pi_1", "status": "succeeded"}], 1, None),
        (_view("paid", 2), [{"id": "pi_1", "status": "succeeded"}], 1, "2 receipts"),
        (_view("paid", 1), [{"id": "pi_1", "status": "succeeded"}], 2, "2 charges"),
        (_view("paid", 1), [{"id": "pi_1", "status": "succeeded"}] * 2, 1, "2 PaymentIntents"),
        (_view("processing", 0), [{"id": "pi_1", "status": "succeeded"}], 1, "Stripe says"),
        (_view("paid", 1, verified=False), [{"id": "pi_1", "status": "succeeded"}], 1, "audit"),
        (_view("paid", 1, intent="pi_2"), [{"id": "pi_1", "status": "succeeded"}], 1, "another"),
        ({}, [], 0, "missing"),
    ],
)
def test_the_checks_see_a_broken_invariant(
    view: dict, intents: list, charges: int, problem: str | None
) -> None:
    order = _demo._Order("o1", "k", "pm_card_visa", 1, statuses=[201])
    found = _demo._check_order(order, view, intents, Counter({"pi_1": charges}))
    if problem is None:
        assert found == []
    else:
        assert any(problem in p for p in found), found


def test_a_5xx_is_a_violation() -> None:
    order = _demo._Order("o1", "k", "pm_card_visa", 2, statuses=[201, 502])
    found = _demo._check_order(
        order, _view("paid", 1), [{"id": "pi_1", "status": "succeeded"}], Counter({"pi_1": 1})
    )
    assert any("5xx" in p for p in found)


def test_cli_refuses_bad_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--orders", "0"])
    assert exit_.value.code == 2
    assert "must be at least 1" in capsys.readouterr().err


def test_python_m_idempay_has_help_and_version() -> None:
    help_ = subprocess.run(
        [sys.executable, "-m", "idempay", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "demo" in help_
    version = subprocess.run(
        [sys.executable, "-m", "idempay", "--version"], capture_output=True, text=True, check=True
    ).stdout
    assert version.startswith("idempay ")
