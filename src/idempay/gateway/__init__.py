"""The payment provider's side: Stripe calls through the official ``stripe`` library."""

from __future__ import annotations

from idempay.gateway._async import AsyncStripeGateway
from idempay.gateway._sync import StripeGateway

__all__ = ["AsyncStripeGateway", "StripeGateway"]
