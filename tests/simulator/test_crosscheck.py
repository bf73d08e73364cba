"""The same calls against the simulator and against localstripe, a Stripe fake no one here wrote.

Both run behind the official stripe library; each step is reduced to its shape (statuses, id
prefixes, amounts, error classes, HTTP statuses and codes) and the two lists must match. Where
localstripe departs from Stripe's documented behaviour, the simulator follows Stripe, and the
step's comparison leaves that field out, saying why:

- error ``type`` of a decline: Stripe sends ``card_error``; localstripe ``invalid_request_error``
  (both are 402s, so the library raises ``CardError`` for both);
- error ``code`` of a refused cancel: Stripe sends ``payment_intent_unexpected_state``;
  localstripe none;
- ``latest_charge``: Stripe sends the Charge's id unless expanded; localstripe always the
  expanded Charge (the id is compared);
- ``payment_method``: Stripe turns a test id (``pm_card_visa``) into a new ``pm_...``;
  localstripe keeps the test id (only its presence is compared); after a decline Stripe
  detaches it from the PaymentIntent, localstripe does not (not compared there);
- ``amount_received``: localstripe leaves it out;
- lists: Stripe's are newest first, localstripe's oldest first (only the page's size and
  ``has_more`` are compared);
- webhooks: localstripe sends only ``payment_intent.succeeded`` and ``payment_failed``, once,
  about a second late, without ``request`` or ``pending_webhooks``; the succeeded event is
  compared;
- ``Idempotency-Key``: localstripe ignores it (a second create with the same key makes a new
  object), so no idempotency step is compared here: test_idempotency.py covers Stripe's rules.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import stripe

from idempay.core.events import PaymentIntentSnapshot, StripeEvent, parse_event
from idempay.testing.simulator import StripeSimulator, WebhookEndpoint

from .conftest import SECRET, Receiver

Step = tuple[Any, ...]


def _charge_id(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return str(value["id"])


def _prefix(value: str | None) -> str | None:
    return None if value is None else value.split("_", 1)[0] + "_"


def intent_shape(intent: Any, *, with_method: bool = True) -> Step:
    data = intent.to_dict()
    return (
        "payment_intent",
        _prefix(data["id"]),
        data["object"],
        data["status"],
        data["amount"],
        data["currency"],
        data["livemode"],
        dict(data["metadata"]),
        data["client_secret"].startswith(f"{data['id']}_secret_"),
        _prefix(_charge_id(data.get("latest_charge"))),
        data.get("payment_method") is not None if with_method else "-",
        isinstance(data["created"], int),
        (data.get("last_payment_error") or {}).get("code"),
    )


def error_shape(error: stripe.StripeError, *, with_code: bool = True) -> Step:
    return (
        "error",
        type(error).__name__,
        error.http_status,
        error.code if with_code else "-",
    )


def attempt(call: Any, *, with_code: bool = True) -> Step:
    try:
        return intent_shape(call())
    except stripe.StripeError as error:
        return error_shape(error, with_code=with_code)


def sequence(client: stripe.StripeClient) -> list[Step]:
    """The calls both servers implement, each reduced to its shape."""
    steps: list[Step] = []
    intents = client.v1.payment_intents
    card = intents.create(
        params={
            "amount": 1999,
            "currency": "eur",
            "metadata": {"order_id": "o-cross"},
            "payment_method": "pm_card_visa",
        }
    )
    steps.append(intent_shape(card))
    paid = intents.confirm(card.id)
    steps.append(intent_shape(paid))
    steps.append(intent_shape(intents.retrieve(card.id)))
    charge_id = _charge_id(paid.to_dict()["latest_charge"])

    refund = client.v1.refunds.create(params={"payment_intent": card.id, "amount": 500})
    steps.append(
        (
            "refund",
            _prefix(refund.id),
            refund.object,
            refund.amount,
            refund.currency,
            refund.status,
            refund.charge == charge_id,
            refund.payment_intent == card.id,
        )
    )
    charge = client.v1.charges.retrieve(str(charge_id))
    steps.append(("charge", _prefix(charge.id), charge.status, charge.paid, charge.amount))

    # Refused cancel: localstripe sends no code (Stripe: payment_intent_unexpected_state).
    steps.append(attempt(lambda: intents.cancel(card.id), with_code=False))
    fresh = intents.create(params={"amount": 500, "currency": "eur"})
    steps.append(intent_shape(fresh))
    steps.append(intent_shape(intents.cancel(fresh.id)))

    declining = intents.create(
        params={"amount": 700, "currency": "eur", "payment_method": "pm_card_chargeCustomerFail"}
    )
    steps.append(attempt(lambda: intents.confirm(declining.id)))
    # After a decline Stripe detaches the payment method (it moves to last_payment_error);
    # localstripe keeps it on the PaymentIntent.
    steps.append(intent_shape(intents.retrieve(declining.id), with_method=False))
    steps.append(
        attempt(
            lambda: intents.create(
                params={
                    "amount": 700,
                    "currency": "eur",
                    "payment_method": "pm_card_chargeCustomerFail",
                    "confirm": True,
                }
            )
        )
    )

    steps.append(attempt(lambda: intents.retrieve("pi_doesnotexist"), with_code=False))
    steps.append(
        attempt(
            lambda: intents.create(params={"currency": "eur"}),  # type: ignore[typeddict-item]
            with_code=False,
        )
    )
    page = intents.list(params={"limit": 2})
    steps.append(("list", page.object, len(page.data), page.has_more))
    return steps


@pytest.fixture
def simulator_url() -> Iterator[str]:
    with StripeSimulator() as sim:
        yield sim.url


def run(url: str) -> list[Step]:
    http = stripe.HTTPXClient(timeout=10, allow_sync_methods=True)
    try:
        client = stripe.StripeClient(
            "sk_test_crosscheck",
            base_addresses={"api": url},
            max_network_retries=0,
            http_client=http,
        )
        return sequence(client)
    finally:
        http.close()


def test_the_simulator_has_the_shape_of_localstripe_where_both_implement_a_call(
    simulator_url: str, localstripe_url: str
) -> None:
    ours = run(simulator_url)
    theirs = run(localstripe_url)
    assert len(ours) == len(theirs)
    for index, (mine, other) in enumerate(zip(ours, theirs, strict=True)):
        assert mine == other, f"step {index} differs"
    # The steps say what they should: not two servers agreeing on nonsense.
    statuses = [step[3] for step in ours if step[0] == "payment_intent"]
    assert statuses == [
        "requires_confirmation",
        "succeeded",
        "succeeded",
        "requires_payment_method",
        "canceled",
        "requires_payment_method",
    ]
    errors = [step for step in ours if step[0] == "error"]
    assert errors == [
        ("error", "InvalidRequestError", 400, "-"),
        ("error", "CardError", 402, "card_declined"),
        ("error", "CardError", 402, "card_declined"),
        ("error", "InvalidRequestError", 404, "-"),
        ("error", "InvalidRequestError", 400, "-"),
    ]


def _paid_event(
    url: str, receiver: Receiver, *, flush: Callable[[], object] | None = None
) -> StripeEvent:
    """Pay with pm_card_visa on the server at ``url``; the payment_intent.succeeded delivery
    its webhook sender signed, verified by the receiver and parsed strictly."""
    arrived = threading.Event()
    order_id = f"o-{secrets.token_hex(4)}"

    def answer(body: bytes, _seen: int) -> int:
        event = json.loads(body)
        is_ours = event["data"]["object"].get("metadata", {}).get("order_id") == order_id
        if is_ours and event["type"] == "payment_intent.succeeded":
            arrived.set()
        return 200

    receiver.answer = answer
    http = stripe.HTTPXClient(timeout=10, allow_sync_methods=True)
    try:
        client = stripe.StripeClient(
            "sk_test_crosscheck",
            base_addresses={"api": url},
            max_network_retries=0,
            http_client=http,
        )
        client.v1.payment_intents.create(
            params={
                "amount": 1999,
                "currency": "eur",
                "metadata": {"order_id": order_id},
                "payment_method": "pm_card_visa",
                "confirm": True,
            }
        )
    finally:
        http.close()
    if flush is not None:
        flush()
    # localstripe sends its webhooks about a second later, from its own loop.
    assert arrived.wait(15), "no payment_intent.succeeded delivery"
    assert receiver.bad_signatures == 0
    body = next(
        d.body
        for d in receiver.accepted()
        if json.loads(d.body)["type"] == "payment_intent.succeeded"
        and json.loads(d.body)["data"]["object"]["metadata"].get("order_id") == order_id
    )
    return parse_event(body, livemode=False)


def test_webhooks_are_signed_and_shaped_like_localstripes(
    localstripe_url: str, receiver: Receiver, second_receiver: Receiver
) -> None:
    hook = f"idempay-sim-crosscheck-{secrets.token_hex(3)}"
    register = f"{localstripe_url}/_config/webhooks/{hook}"
    receiver.now = time.time
    with urllib.request.urlopen(
        urllib.request.Request(
            register,
            data=json.dumps({"url": receiver.url, "secret": SECRET}).encode(),
            headers={"Content-Type": "application/json"},
        ),
        timeout=10,
    ):
        pass
    try:
        theirs = _paid_event(localstripe_url, receiver)
    finally:
        # localstripe's webhooks are shared by the session: make this one receive nothing.
        unregister = {"url": receiver.url, "secret": SECRET, "events": ["none.none"]}
        with urllib.request.urlopen(
            urllib.request.Request(
                register,
                data=json.dumps(unregister).encode(),
                headers={"Content-Type": "application/json"},
            ),
            timeout=10,
        ):
            pass
    endpoint = WebhookEndpoint(second_receiver.url, SECRET)
    with StripeSimulator(webhook_endpoints=[endpoint]) as sim:
        second_receiver.now = sim.now
        ours = _paid_event(sim.url, second_receiver, flush=sim.flush_webhooks)

    def shape(event: StripeEvent) -> Step:
        intent = event.object
        assert isinstance(intent, PaymentIntentSnapshot)
        return (
            event.type,
            event.livemode,
            event.object_type,
            intent.status,
            intent.amount,
            intent.currency,
            sorted(intent.metadata),
        )

    assert shape(ours) == shape(theirs)
    # What localstripe leaves out and Stripe sends, the simulator sends.
    assert ours.request_id is not None
    assert ours.api_version is not None
