"""Stripe's Idempotency-Key semantics, as the simulator implements them."""

from __future__ import annotations

import http.client
import json
import multiprocessing
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import stripe

from idempay.testing.simulator import KEY_LIFETIME, StripeSimulator

from .conftest import Clients

PARAMS: dict[str, Any] = {"amount": 1999, "currency": "eur", "metadata": {"order_id": "o-1"}}


def create(client: stripe.StripeClient, key: str, **params: Any) -> stripe.PaymentIntent:
    return client.v1.payment_intents.create(
        params={**PARAMS, **params},  # type: ignore[typeddict-item]
        options={"idempotency_key": key},
    )


def test_the_same_request_again_is_replayed(
    sim: StripeSimulator, client: stripe.StripeClient
) -> None:
    first = create(client, "replay-1")
    again = create(client, "replay-1")
    assert again.to_dict() == first.to_dict()
    assert len(sim.payment_intents()) == 1
    headers = again.last_response.headers
    assert headers["Idempotent-Replayed"] == "true"
    assert headers["Original-Request"] == first.last_response.request_id
    assert headers["Request-Id"] != first.last_response.request_id
    assert "Idempotent-Replayed" not in first.last_response.headers
    assert sim.stats()["api"]["replayed"] == 1


def test_other_parameters_or_another_endpoint_are_refused(
    sim: StripeSimulator, client: stripe.StripeClient
) -> None:
    first = create(client, "mismatch-1")
    with pytest.raises(stripe.IdempotencyError) as other_params:
        create(client, "mismatch-1", amount=2999)
    assert other_params.value.http_status == 400
    assert other_params.value.json_body["error"]["type"] == "idempotency_error"
    with pytest.raises(stripe.IdempotencyError) as other_endpoint:
        client.v1.payment_intents.confirm(
            first.id,
            params={"payment_method": "pm_card_visa"},
            options={"idempotency_key": "mismatch-1"},
        )
    assert "same endpoint" in str(other_endpoint.value)
    # Nothing ran: one PaymentIntent, unconfirmed; and the key still replays the original.
    assert [pi["status"] for pi in sim.payment_intents()] == ["requires_payment_method"]
    assert create(client, "mismatch-1").id == first.id


def test_a_request_still_executing_makes_the_same_key_409(
    sim: StripeSimulator, client: stripe.StripeClient
) -> None:
    gate = sim.pause_next("/v1/payment_intents")
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(create, client, "in-flight-1")
        assert gate.wait_reached(10), "the first request never reached the gate"
        with pytest.raises(stripe.APIError) as conflict:
            create(client, "in-flight-1")
        gate.release()
        original = first.result(10)
    assert conflict.value.http_status == 409
    assert conflict.value.json_body["error"]["code"] == "idempotency_key_in_use"
    retried = create(client, "in-flight-1")  # the conflict saved nothing: now a replay
    assert retried.id == original.id
    assert retried.last_response.headers["Idempotent-Replayed"] == "true"
    assert len(sim.payment_intents()) == 1
    assert sim.stats()["api"]["in_flight_conflicts"] == 1


def test_keys_are_scoped_to_the_api_key(sim: StripeSimulator, clients: Clients) -> None:
    one = create(clients("sk_test_account_a"), "shared-key")
    two = create(clients("sk_test_account_b"), "shared-key")
    assert one.id != two.id
    assert len(sim.payment_intents()) == 2


def test_errors_after_execution_are_saved_but_validation_errors_are_not(
    sim: StripeSimulator, client: stripe.StripeClient
) -> None:
    intent = create(client, "decline-create", payment_method="pm_card_chargeDeclined")
    confirm = {"options": {"idempotency_key": "decline-confirm"}}
    with pytest.raises(stripe.CardError) as first:
        client.v1.payment_intents.confirm(intent.id, **confirm)  # type: ignore[arg-type]
    with pytest.raises(stripe.CardError) as replayed:
        client.v1.payment_intents.confirm(intent.id, **confirm)  # type: ignore[arg-type]
    assert replayed.value.json_body == first.value.json_body
    assert replayed.value.headers["Idempotent-Replayed"] == "true"
    assert len(sim.charges()) == 1  # the replay charged nothing

    with pytest.raises(stripe.InvalidRequestError):
        client.v1.payment_intents.create(
            params={"currency": "eur"},  # type: ignore[typeddict-item]
            options={"idempotency_key": "validation-1"},
        )
    # The refused request did not bind the key: a corrected request with it executes.
    assert create(client, "validation-1").status == "requires_payment_method"


def test_keys_expire_after_24_hours(sim: StripeSimulator, client: stripe.StripeClient) -> None:
    first = create(client, "expiring")
    sim.advance_clock(KEY_LIFETIME - 1)
    assert create(client, "expiring").id == first.id
    sim.advance_clock(2)
    fresh = create(client, "expiring", amount=500)  # another request, now allowed
    assert fresh.id != first.id
    assert fresh.amount == 500


def test_concurrent_clients_with_one_key_create_one_intent(
    sim: StripeSimulator, clients: Clients
) -> None:
    n = 16
    barrier = threading.Barrier(n)
    per_thread = [clients() for _ in range(n)]

    def call(index: int) -> str:
        barrier.wait()
        try:
            return create(per_thread[index], "stampede").id
        except stripe.APIError as error:
            return str(error.http_status)

    with ThreadPoolExecutor(n) as pool:
        answers = list(pool.map(call, range(n)))
    ids = {answer for answer in answers if not answer.isdigit()}
    assert set(answers) - ids <= {"409"}
    assert len(ids) == 1
    assert len(sim.payment_intents()) == 1
    stats = sim.stats()["api"]
    assert stats["in_flight_conflicts"] + stats["replayed"] == n - 1


def _hammer(port: int, worker: int, count: int, shared_key: str, out: Any) -> None:
    """A client process: ``count`` creates with keys of its own, then one with the shared key."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {
        "Authorization": "Bearer sk_test_processes",
        "Content-Type": "application/x-www-form-urlencoded",
    }
    ids = []
    keys = [f"w{worker}-{n}" for n in range(count)] + [shared_key]
    for key in keys:
        connection.request(
            "POST",
            "/v1/payment_intents",
            body="amount=1000&currency=eur&payment_method=pm_card_visa&confirm=true",
            headers={**headers, "Idempotency-Key": key},
        )
        response = connection.getresponse()
        body = json.loads(response.read())
        ids.append(body["id"] if response.status == 200 else str(response.status))
    connection.close()
    out.put(ids)


def test_client_processes_hammering_the_server_each_key_once(sim: StripeSimulator) -> None:
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    workers, count = 4, 40
    procs = [
        ctx.Process(target=_hammer, args=(sim.port, w, count, "shared-across-processes", out))
        for w in range(workers)
    ]
    for proc in procs:
        proc.start()
    results = [out.get(timeout=60) for _ in procs]
    for proc in procs:
        proc.join(30)
        assert proc.exitcode == 0
    own = [answer for ids in results for answer in ids[:-1]]
    shared = {ids[-1] for ids in results} - {"409"}
    assert len(set(own)) == workers * count  # every own key: one new, distinct intent
    assert len(shared) == 1  # the shared key: one intent, whoever came first
    intents = sim.payment_intents()
    assert len(intents) == workers * count + 1
    assert all(pi["status"] == "succeeded" for pi in intents)
    assert len(sim.charges()) == len(intents)
