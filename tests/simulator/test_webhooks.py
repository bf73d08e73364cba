"""The webhook sender: Stripe's signatures, and each delivery policy, against a real endpoint."""

from __future__ import annotations

import json
import socket
from collections import Counter
from collections.abc import Callable

import pytest
import stripe

from idempay.core.events import parse_event
from idempay.errors import ConfigurationError
from idempay.testing.simulator import DeliveryPolicy, StripeSimulator, WebhookEndpoint

from .conftest import SECRET, Receiver

MakeSim = Callable[..., StripeSimulator]


def pay(sim: StripeSimulator, count: int) -> None:
    """``count`` card payments: three events each (created, charge, succeeded)."""
    client = stripe.StripeClient(sim.api_key, base_addresses={"api": sim.url})
    for n in range(count):
        client.v1.payment_intents.create(
            params={
                "amount": 1000 + n,
                "currency": "eur",
                "metadata": {"order_id": f"o{n}"},
                "payment_method": "pm_card_visa",
                "confirm": True,
            }
        )


def event_ids(receiver: Receiver) -> list[str]:
    return [json.loads(d.body)["id"] for d in receiver.accepted()]


def test_deliveries_are_signed_like_stripe_and_parse_strictly(
    make_sim: MakeSim, receiver: Receiver
) -> None:
    sim = make_sim()
    pay(sim, 2)
    stats = sim.flush_webhooks()
    created = [e["id"] for e in sim.events()]
    assert len(created) == 6
    assert receiver.bad_signatures == 0
    assert sorted(event_ids(receiver)) == sorted(created)
    for delivery in receiver.accepted():
        assert delivery.headers["content-type"].startswith("application/json")
        assert delivery.headers["stripe-signature"].startswith("t=")
        event = parse_event(delivery.body, livemode=False)  # idempay's strict parser
        assert event.request_id is not None
        assert event.request_id.startswith("req_")
    assert (stats.events, stats.planned, stats.attempted, stats.delivered) == (6, 6, 6, 6)
    assert stats.status_codes == Counter({"200": 6})
    # Every endpoint acknowledged every event: nothing pending, as the events API shows.
    assert all(e["pending_webhooks"] == 0 for e in sim.events())
    client = stripe.StripeClient(sim.api_key, base_addresses={"api": sim.url})
    assert client.v1.events.list(params={"delivery_success": False}).data == []
    assert len(client.v1.events.list(params={"delivery_success": True}).data) == 6


def test_a_wrong_secret_is_caught_by_the_receiver(
    receiver: Receiver,
) -> None:
    with StripeSimulator(webhook_endpoints=[WebhookEndpoint(receiver.url, "whsec_other")]) as sim:
        receiver.now = sim.now
        pay(sim, 1)
        stats = sim.flush_webhooks()
    assert receiver.bad_signatures == stats.attempted == 9  # 3 events x 3 attempts
    assert stats.failed == 3
    assert stats.status_codes == Counter({"400": 9})


def test_endpoints_receive_the_event_types_they_enabled(
    make_sim: MakeSim, receiver: Receiver, second_receiver: Receiver
) -> None:
    sim = make_sim()
    second_receiver.now = sim.now
    sim.add_webhook_endpoint(second_receiver.url, SECRET, enabled_events=("charge.*",))
    pay(sim, 1)
    sim.flush_webhooks()
    assert len(receiver.accepted()) == 3
    assert [json.loads(d.body)["type"] for d in second_receiver.accepted()] == ["charge.succeeded"]
    # pending_webhooks counts the endpoints that want the event.
    bodies = {json.loads(d.body)["type"]: json.loads(d.body) for d in receiver.accepted()}
    assert bodies["charge.succeeded"]["pending_webhooks"] == 2
    assert bodies["payment_intent.succeeded"]["pending_webhooks"] == 1


def test_duplicates(make_sim: MakeSim, receiver: Receiver) -> None:
    sim = make_sim(DeliveryPolicy(duplicate_probability=1.0, duplicate_copies=2), seed=1)
    pay(sim, 2)
    stats = sim.flush_webhooks()
    copies = Counter(event_ids(receiver))
    assert set(copies.values()) == {3}
    assert len(copies) == 6
    assert (stats.duplicated, stats.planned, stats.delivered) == (12, 18, 18)


def test_drops_leave_events_pending_for_a_reconciler(make_sim: MakeSim, receiver: Receiver) -> None:
    sim = make_sim(DeliveryPolicy(drop_probability=0.5), seed=7)
    pay(sim, 6)
    stats = sim.flush_webhooks()
    received = set(event_ids(receiver))
    created = {e["id"] for e in sim.events()}
    assert 0 < stats.dropped < len(created)
    assert len(received) + stats.dropped == len(created)
    client = stripe.StripeClient(sim.api_key, base_addresses={"api": sim.url})
    pending = client.v1.events.list(params={"delivery_success": False, "limit": 100})
    assert {e.id for e in pending.data} == created - received


def test_retries_on_errors_until_the_endpoint_answers_2xx(
    make_sim: MakeSim, receiver: Receiver
) -> None:
    receiver.answer = lambda _body, seen: 200 if seen >= 2 else 500
    sim = make_sim(DeliveryPolicy(max_attempts=3, retry_backoff_ms=1))
    pay(sim, 2)
    stats = sim.flush_webhooks()
    assert len(event_ids(receiver)) == 6
    assert (stats.attempted, stats.retried, stats.delivered, stats.failed) == (18, 12, 6, 0)
    assert stats.status_codes == Counter({"500": 12, "200": 6})
    assert all(e["pending_webhooks"] == 0 for e in sim.events())


def test_retries_give_up_after_max_attempts(make_sim: MakeSim, receiver: Receiver) -> None:
    receiver.answer = lambda _body, _seen: 503
    sim = make_sim(DeliveryPolicy(max_attempts=2, retry_backoff_ms=1))
    pay(sim, 1)
    stats = sim.flush_webhooks()
    assert (stats.attempted, stats.retried, stats.failed, stats.delivered) == (6, 3, 3, 0)
    assert all(e["pending_webhooks"] == 1 for e in sim.events())


def test_connection_errors_are_retried_too() -> None:
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    endpoint = WebhookEndpoint(f"http://127.0.0.1:{port}/hook", SECRET)
    policy = DeliveryPolicy(max_attempts=2, retry_backoff_ms=1)
    with StripeSimulator(webhook_endpoints=[endpoint], delivery=policy) as sim:
        pay(sim, 1)
        stats = sim.flush_webhooks()
    assert stats.status_codes == Counter({"connection_error": 6})
    assert (stats.failed, stats.retried) == (3, 3)


def arrival_order(make_sim: MakeSim, receiver: Receiver, seed: int) -> list[tuple[str, str]]:
    receiver.deliveries.clear()
    policy = DeliveryPolicy(reorder_window=20, reorder_linger_ms=None, concurrency=1)
    sim = make_sim(policy, seed=seed)
    pay(sim, 4)
    assert sim.wait_webhooks_idle(0.05) is False  # the window is held until flushed
    sim.flush_webhooks()
    created = [(e["type"], e["data"]["object"]["amount"]) for e in sim.events()]
    received = [
        (event["type"], event["data"]["object"]["amount"])
        for event in (json.loads(d.body) for d in receiver.accepted())
    ]
    assert sorted(received) == sorted(created)
    assert received != created
    return received


def test_reordering_is_reproducible_with_a_seed(make_sim: MakeSim, receiver: Receiver) -> None:
    first = arrival_order(make_sim, receiver, seed=3)
    again = arrival_order(make_sim, receiver, seed=3)
    other = arrival_order(make_sim, receiver, seed=4)
    assert first == again
    assert other != first


def test_delays_still_deliver_everything(make_sim: MakeSim, receiver: Receiver) -> None:
    sim = make_sim(DeliveryPolicy(max_delay_ms=40), seed=2)
    pay(sim, 2)
    assert sim.wait_webhooks_idle(10)
    assert len(event_ids(receiver)) == 6


def test_a_policy_out_of_range_is_refused() -> None:
    with pytest.raises(ConfigurationError):
        DeliveryPolicy(drop_probability=1.5)
    with pytest.raises(ConfigurationError):
        DeliveryPolicy(max_attempts=0)
    with pytest.raises(ConfigurationError):
        WebhookEndpoint("ftp://example.com", SECRET)
