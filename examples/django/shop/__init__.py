"""A small shop on Django, guarded by idempay: checkout, Stripe webhooks, order history.

Run it with ``serve.sh HOST PORT [WORKERS]`` (uvicorn on :mod:`shop.asgi`); configuration comes
from the environment, read in :mod:`shop.settings` (see README.md). The shop's own payment code
is :func:`shop.views.checkout` and :func:`shop.payments.send_receipt`; idempay does the rest
(idempotency keys, one PaymentIntent per order, webhooks applied once and in order, the receipt
sent once per paid order, an audit trail).
"""

from __future__ import annotations
