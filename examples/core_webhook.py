"""The pure core on its own: verify, parse and apply one Stripe webhook to an order's state.

This is what the guard engine does for you inside a transaction (with the inbox, the audit log
and the outbox); shown here without any storage to make the decisions visible.
"""

from __future__ import annotations

import time

from idempay import OrderState, apply, observation_from_event, parse_event, verify_signature


def on_webhook(
    raw_body: bytes, signature_header: str | None, order: OrderState, *, now: float | None = None
) -> OrderState:
    """Return the order's state after this webhook (unchanged if it says nothing new)."""
    verify_signature(
        raw_body,
        signature_header,
        ["whsec_current", "whsec_previous"],  # rotation: both accepted until one is removed
        now=time.time() if now is None else now,
    )
    event = parse_event(raw_body, livemode=False)  # strict: typed 4xx errors, never a 500
    observation = observation_from_event(event)
    if observation is None:  # an event type idempay does not act upon
        return order
    transition = apply(order, observation)  # pure: new state, audit steps, effects
    return transition.after
