"""The command line (``python -m idempay.testing.simulator``) and the HTTP control API."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import stripe

from .conftest import SECRET, Receiver


def control(base: str, method: str, path: str, payload: dict[str, Any] | None = None) -> Any:
    request = urllib.request.Request(
        f"{base}/_sim/{path}",
        method=method,
        data=None if payload is None else json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture
def served(receiver: Receiver) -> Iterator[str]:
    """The simulator run from its command line, webhooks to ``receiver``; stopped by PID."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "idempay.testing.simulator",
            "--port",
            "0",
            "--webhook",
            receiver.url,
            "--secret",
            SECRET,
            "--seed",
            "5",
            "--max-attempts",
            "2",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("LISTENING http://127.0.0.1:"), line
        yield line.split()[1]
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0  # SIGTERM is a clean stop
        if proc.stdout is not None:
            proc.stdout.close()


def test_the_command_line_and_the_control_api(served: str, receiver: Receiver) -> None:
    receiver.now = time.time  # the process runs on the machine's clock
    http = stripe.HTTPXClient(timeout=10, allow_sync_methods=True)
    client = stripe.StripeClient(
        "sk_test_cli", base_addresses={"api": served}, max_network_retries=0, http_client=http
    )
    try:
        assert control(served, "GET", "health")["ok"] is True
        debit = client.v1.payment_intents.create(
            params={
                "amount": 2500,
                "currency": "eur",
                "payment_method": "pm_sepa_debit",
                "confirm": True,
            }
        )
        assert debit.status == "processing"
        released = control(served, "POST", f"payment_intents/{debit.id}/release")
        assert released["status"] == "succeeded"

        secure = client.v1.payment_intents.create(
            params={
                "amount": 900,
                "currency": "eur",
                "payment_method": "pm_card_threeDSecure2Required",
                "confirm": True,
            }
        )
        failed = control(
            served, "POST", f"payment_intents/{secure.id}/authenticate", {"outcome": "failed"}
        )
        assert failed["status"] == "requires_payment_method"

        control(served, "POST", "faults", {"kind": "error", "status": 503, "path": "/v1/refunds"})
        with pytest.raises(stripe.APIError) as injected:
            client.v1.refunds.create(params={"payment_intent": debit.id})
        assert injected.value.http_status == 503
        assert client.v1.refunds.create(params={"payment_intent": debit.id}).amount == 2500

        stats = control(served, "POST", "webhooks/flush", {"timeout": 30})
        assert stats["delivered"] == stats["planned"] == len(receiver.accepted()) > 0
        assert stats["failed"] == 0
        counters = control(served, "GET", "stats")
        assert counters["api"]["faults"] == {"error": 1}
        assert counters["objects"]["payment_intents"] == 2
        assert counters["webhooks"]["delivered"] == stats["delivered"]

        before = control(served, "POST", "clock/advance", {"seconds": 0})["now"]
        after = control(served, "POST", "clock/advance", {"seconds": 3600})["now"]
        assert after - before >= 3600

        with pytest.raises(urllib.error.HTTPError) as unknown:
            control(served, "POST", "nothing")
        unknown.value.close()
        assert unknown.value.code == 404
        with pytest.raises(urllib.error.HTTPError) as bad:
            control(served, "POST", "payment_intents/pi_nope/release")
        bad.value.close()
        assert bad.value.code == 404

        assert control(served, "POST", "reset")["ok"] is True
        assert control(served, "GET", "stats")["objects"]["payment_intents"] == 0
    finally:
        http.close()
