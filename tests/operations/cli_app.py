"""A shop's guard as ``idempay ... --app cli_app:build`` loads it in the CLI's tests.

It comes from the same environment as the commands (``IDEMPAY_DATABASE_URL``,
``STRIPE_API_KEY``, ``STRIPE_API_BASE``, ``STRIPE_WEBHOOK_SECRET``) and registers two effects,
``receipt`` on ``paid``, which appends its dedup key to the file named by
``IDEMPAY_TEST_EFFECT_LOG``, and ``refund_notice`` on ``refunded``, which does the same: one
line per run, so that a test counts the runs of each effect across processes.
"""

from __future__ import annotations

import os

from idempay.backends import idempotency_store_from_url, payment_store_from_url
from idempay.engine import EffectContext, Guard, GuardConfig
from idempay.gateway import StripeGateway

EFFECT_LOG = "IDEMPAY_TEST_EFFECT_LOG"
RECEIPT = "receipt"
REFUND_NOTICE = "refund_notice"


def build() -> Guard:
    """The guard, with its ``receipt`` effect registered."""
    url = os.environ["IDEMPAY_DATABASE_URL"]
    secrets = tuple(s for s in os.environ.get("STRIPE_WEBHOOK_SECRET", "").split(",") if s)
    guard = Guard(
        payments=payment_store_from_url(url),
        records=idempotency_store_from_url(url),
        gateway=StripeGateway.from_settings(
            os.environ["STRIPE_API_KEY"], api_base=os.environ.get("STRIPE_API_BASE") or None
        ),
        config=GuardConfig(webhook_secrets=secrets),
    )
    guard.effect(RECEIPT, on="paid")(record_run)
    guard.effect(REFUND_NOTICE, on="refunded")(record_run)
    return guard


def record_run(effect: EffectContext) -> None:
    """Append the effect's dedup key to the log, in one write (O_APPEND: whole lines even with
    several processes appending)."""
    fd = os.open(os.environ[EFFECT_LOG], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, f"{effect.dedup_key}\n".encode())
    finally:
        os.close(fd)
