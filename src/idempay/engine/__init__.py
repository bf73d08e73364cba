"""The guard engine: the checkout and webhook flows, and the outbox dispatcher.

Configure one :class:`Guard` (sync) or :class:`AsyncGuard` (asyncio) with your stores and
options, register effects on it, and call it from your handlers (the web adapters do that for
you).
"""

from __future__ import annotations

from idempay.engine._async import AsyncGuard
from idempay.engine._checkout import CheckoutRequest, OrderSpec, stripe_idempotency_key
from idempay.engine._config import GuardConfig, LockFailurePolicy
from idempay.engine._faults import FaultPoint, FaultPoints, kill_process
from idempay.engine._http import GuardRequest, GuardResponse, json_response, problem_response
from idempay.engine._results import DispatchReport, EffectContext, OrderView, WebhookOutcome
from idempay.engine._sync import Guard

__all__ = [
    "AsyncGuard",
    "CheckoutRequest",
    "DispatchReport",
    "EffectContext",
    "FaultPoint",
    "FaultPoints",
    "Guard",
    "GuardConfig",
    "GuardRequest",
    "GuardResponse",
    "LockFailurePolicy",
    "OrderSpec",
    "OrderView",
    "WebhookOutcome",
    "json_response",
    "kill_process",
    "problem_response",
    "stripe_idempotency_key",
]
