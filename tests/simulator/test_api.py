"""The simulator's API through the official stripe library: objects, flows, errors."""

from __future__ import annotations

import http.client
import json
import secrets
from typing import Any

import pytest
import stripe

from idempay.testing.simulator import StripeAPIError, StripeSimulator

from .conftest import Clients


def order() -> str:
    return f"o-{secrets.token_hex(4)}"


def create(client: stripe.StripeClient, **params: Any) -> stripe.PaymentIntent:
    return client.v1.payment_intents.create(
        params={"amount": 1999, "currency": "eur", **params}  # type: ignore[typeddict-item]
    )


def event_types(sim: StripeSimulator, intent_id: str) -> list[str]:
    """The types of the events about one PaymentIntent (or its charges), oldest first."""
    types = []
    for event in sim.events():
        obj = event["data"]["object"]
        if intent_id in (obj.get("id"), obj.get("payment_intent")):
            types.append(event["type"])
    return types


def raw(sim: StripeSimulator, method: str, path: str, body: str = "", **headers: str) -> Any:
    connection = http.client.HTTPConnection("127.0.0.1", sim.port, timeout=10)
    try:
        connection.request(method, path, body=body or None, headers=headers)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def test_a_card_payment_from_create_to_succeeded(
    sim: StripeSimulator, client: stripe.StripeClient
) -> None:
    order_id = order()
    intent = create(client, metadata={"order_id": order_id}, payment_method="pm_card_visa")
    assert intent.id.startswith("pi_")
    assert intent.object == "payment_intent"
    assert intent.status == "requires_confirmation"
    assert intent.client_secret.startswith(f"{intent.id}_secret_")
    assert (intent.livemode, intent.latest_charge, intent.amount_received) == (False, None, 0)
    assert intent.metadata.to_dict() == {"order_id": order_id}
    assert intent.payment_method is not None
    assert intent.payment_method.startswith("pm_")  # a test id becomes a PaymentMethod

    confirmed = client.v1.payment_intents.confirm(intent.id, options={"idempotency_key": "c-1"})
    assert confirmed.status == "succeeded"
    assert confirmed.amount_received == 1999
    charge_id = confirmed.latest_charge
    assert isinstance(charge_id, str)
    assert charge_id.startswith("ch_")
    assert client.v1.payment_intents.retrieve(intent.id).to_dict() == confirmed.to_dict()

    charges = client.v1.charges.list(params={"payment_intent": intent.id})
    assert [c.id for c in charges.data] == [charge_id]
    charge = client.v1.charges.retrieve(charge_id)
    assert (charge.status, charge.paid, charge.captured) == ("succeeded", True, True)
    assert (charge.amount, charge.amount_captured, charge.amount_refunded) == (1999, 1999, 0)
    assert charge.payment_intent == intent.id

    assert event_types(sim, intent.id) == [
        "payment_intent.created",
        "charge.succeeded",
        "payment_intent.succeeded",
    ]
    succeeded = client.v1.events.list(params={"type": "payment_intent.succeeded", "limit": 100})
    event = next(e for e in succeeded.data if e.data.object["id"] == intent.id)
    assert event.id.startswith("evt_")
    assert event.object == "event"
    assert event.livemode is False
    assert event.request.idempotency_key == "c-1"  # the request that caused it
    assert event.request.id.startswith("req_")
    assert event.data.object["status"] == "succeeded"
    assert client.v1.events.retrieve(event.id).id == event.id


def test_expand_latest_charge(client: stripe.StripeClient) -> None:
    intent = create(client, payment_method="pm_card_visa", confirm=True)
    expanded = client.v1.payment_intents.retrieve(intent.id, params={"expand": ["latest_charge"]})
    assert expanded.latest_charge.id == intent.latest_charge
    assert expanded.latest_charge.object == "charge"


def test_lists_page_newest_first_and_search_finds_by_metadata_and_status(
    client: stripe.StripeClient,
) -> None:
    tag = order()
    made = [create(client, metadata={"order_id": f"{tag}-{n}", "batch": tag}).id for n in range(5)]
    paid = create(client, metadata={"order_id": f"{tag}-0", "batch": tag})
    client.v1.payment_intents.confirm(paid.id, params={"payment_method": "pm_card_visa"})
    newest_first = [paid.id, *reversed(made)]

    first = client.v1.payment_intents.list(params={"limit": 4})
    assert first.object == "list"
    assert first.has_more is True
    rest = client.v1.payment_intents.list(params={"limit": 4, "starting_after": first.data[-1].id})
    assert [pi.id for pi in first.data] + [pi.id for pi in rest.data] == newest_first
    assert rest.has_more is False
    before = client.v1.payment_intents.list(params={"ending_before": rest.data[0].id, "limit": 2})
    assert [pi.id for pi in before.data] == [pi.id for pi in first.data[-2:]]

    found = client.v1.payment_intents.search(params={"query": f"metadata['order_id']:'{tag}-0'"})
    assert found.object == "search_result"
    assert [pi.id for pi in found.data] == [paid.id, made[0]]
    both = client.v1.payment_intents.search(
        params={"query": f"metadata['order_id']:'{tag}-0' AND status:'succeeded'"}
    )
    assert [pi.id for pi in both.data] == [paid.id]
    paged = client.v1.payment_intents.search(
        params={"query": f"metadata['batch']:'{tag}'", "limit": 4}
    )
    assert paged.has_more is True
    more = client.v1.payment_intents.search(
        params={"query": f"metadata['batch']:'{tag}'", "page": paged.next_page}
    )
    assert [pi.id for pi in paged.data] + [pi.id for pi in more.data] == newest_first

    with pytest.raises(stripe.InvalidRequestError) as refused:
        client.v1.payment_intents.search(params={"query": "description:'x'"})
    assert refused.value.http_status == 400


def test_cancel_a_fresh_intent_but_not_a_succeeded_or_processing_one(
    client: stripe.StripeClient,
) -> None:
    fresh = create(client)
    canceled = client.v1.payment_intents.cancel(
        fresh.id, params={"cancellation_reason": "abandoned"}
    )
    assert (canceled.status, canceled.cancellation_reason) == ("canceled", "abandoned")
    assert isinstance(canceled.canceled_at, int)

    for payment_method in ("pm_card_visa", "pm_sepa_debit"):
        intent = create(client, payment_method=payment_method, confirm=True)
        assert intent.status in ("succeeded", "processing")
        with pytest.raises(stripe.InvalidRequestError) as refused:
            client.v1.payment_intents.cancel(intent.id)
        assert refused.value.http_status == 400
        assert refused.value.code == "payment_intent_unexpected_state"
        assert refused.value.json_body["error"]["payment_intent"]["id"] == intent.id
        assert client.v1.payment_intents.retrieve(intent.id).status == intent.status


def test_refunds_partial_then_full_never_over_what_remains(
    sim: StripeSimulator, client: stripe.StripeClient
) -> None:
    intent = create(client, payment_method="pm_card_visa", confirm=True)
    partial = client.v1.refunds.create(params={"payment_intent": intent.id, "amount": 500})
    assert partial.id.startswith("re_")
    assert (partial.object, partial.amount, partial.status) == ("refund", 500, "succeeded")
    assert (partial.charge, partial.payment_intent) == (intent.latest_charge, intent.id)
    assert client.v1.refunds.retrieve(partial.id).amount == 500

    with pytest.raises(stripe.InvalidRequestError) as over:
        client.v1.refunds.create(params={"payment_intent": intent.id, "amount": 1500})
    assert (over.value.http_status, over.value.code, over.value.param) == (
        400,
        "amount_too_large",
        "amount",
    )
    rest = client.v1.refunds.create(params={"charge": intent.latest_charge})
    assert rest.amount == 1499
    with pytest.raises(stripe.InvalidRequestError) as again:
        client.v1.refunds.create(params={"payment_intent": intent.id})
    assert again.value.code == "charge_already_refunded"

    charge = client.v1.charges.retrieve(intent.latest_charge)
    assert (charge.amount_refunded, charge.refunded) == (1999, True)
    refunded = [
        e["data"]["object"]["amount_refunded"]
        for e in sim.events()
        if e["type"] == "charge.refunded" and e["data"]["object"]["payment_intent"] == intent.id
    ]
    assert refunded == [500, 1999]  # cumulative, as idempay reads it
    listed = client.v1.refunds.list(params={"payment_intent": intent.id})
    assert [r.id for r in listed.data] == [rest.id, partial.id]

    unpaid = create(client)
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.refunds.create(params={"payment_intent": unpaid.id})


@pytest.mark.parametrize(
    ("payment_method", "code", "decline_code"),
    [
        ("pm_card_chargeDeclined", "card_declined", "generic_decline"),
        ("pm_card_visa_chargeDeclined", "card_declined", "generic_decline"),
        ("pm_card_chargeDeclinedInsufficientFunds", "card_declined", "insufficient_funds"),
        ("pm_card_chargeDeclinedExpiredCard", "expired_card", "expired_card"),
    ],
)
def test_a_decline_is_a_card_error_and_not_terminal(
    sim: StripeSimulator,
    client: stripe.StripeClient,
    payment_method: str,
    code: str,
    decline_code: str,
) -> None:
    intent = create(client, payment_method=payment_method)
    with pytest.raises(stripe.CardError) as declined:
        client.v1.payment_intents.confirm(intent.id)
    error = declined.value
    assert (error.http_status, error.code) == (402, code)
    body = error.json_body["error"]
    assert (body["type"], body["decline_code"]) == ("card_error", decline_code)
    assert body["payment_intent"]["status"] == "requires_payment_method"
    assert body["charge"].startswith("ch_")

    after = client.v1.payment_intents.retrieve(intent.id)
    assert after.status == "requires_payment_method"
    assert after.last_payment_error.code == code
    assert after.last_payment_error.decline_code == decline_code
    assert after.latest_charge == body["charge"]
    assert client.v1.charges.retrieve(body["charge"]).status == "failed"
    assert event_types(sim, intent.id)[-2:] == ["charge.failed", "payment_intent.payment_failed"]

    # The customer tries another card: failure was not terminal.
    paid = client.v1.payment_intents.confirm(intent.id, params={"payment_method": "pm_card_visa"})
    assert (paid.status, paid.amount_received, paid.last_payment_error) == (
        "succeeded",
        1999,
        None,
    )


def test_three_d_secure_waits_for_the_customer(
    sim: StripeSimulator, client: stripe.StripeClient
) -> None:
    passed = create(client, payment_method="pm_card_threeDSecure2Required", confirm=True)
    assert passed.status == "requires_action"
    assert passed.next_action.type == "use_stripe_sdk"
    assert sim.complete_authentication(passed.id)["status"] == "succeeded"
    done = client.v1.payment_intents.retrieve(passed.id)
    assert (done.status, done.amount_received, done.next_action) == ("succeeded", 1999, None)
    assert event_types(sim, passed.id) == [
        "payment_intent.created",
        "payment_intent.requires_action",
        "charge.succeeded",
        "payment_intent.succeeded",
    ]
    # The success events carry no API request: the customer, not the merchant, caused them.
    last = sim.events()[-1]
    assert last["request"] == {"id": None, "idempotency_key": None}

    failed = create(client, payment_method="pm_card_authenticationRequired", confirm=True)
    sim.complete_authentication(failed.id, succeed=False)
    after = client.v1.payment_intents.retrieve(failed.id)
    assert after.status == "requires_payment_method"
    assert after.last_payment_error.code == "payment_intent_authentication_failure"
    assert event_types(sim, failed.id)[-1] == "payment_intent.payment_failed"

    with pytest.raises(StripeAPIError):
        sim.complete_authentication(failed.id)  # nothing to authenticate any more


def test_three_d_secure_redirect_page(sim: StripeSimulator, client: stripe.StripeClient) -> None:
    intent = create(
        client,
        payment_method="pm_card_threeDSecure2Required",
        confirm=True,
        return_url="https://shop.example/done",
    )
    redirect = intent.next_action.redirect_to_url
    assert redirect.return_url == "https://shop.example/done"
    path = redirect.url.removeprefix(sim.url)
    status, headers, _ = raw(sim, "GET", f"{path}?outcome=succeeded")
    assert status == 302
    assert headers["Location"].startswith(
        f"https://shop.example/done?payment_intent={intent.id}&payment_intent_client_secret="
    )
    assert client.v1.payment_intents.retrieve(intent.id).status == "succeeded"


def test_an_off_session_payment_cannot_authenticate(client: stripe.StripeClient) -> None:
    with pytest.raises(stripe.CardError) as declined:
        create(
            client, payment_method="pm_card_threeDSecure2Required", confirm=True, off_session=True
        )
    assert declined.value.code == "authentication_required"


def test_a_bank_debit_stays_processing_until_released(
    sim: StripeSimulator, client: stripe.StripeClient
) -> None:
    cleared = create(client, payment_method="pm_sepa_debit", confirm=True)
    assert cleared.status == "processing"
    charge = client.v1.charges.retrieve(cleared.latest_charge)
    assert (charge.status, charge.paid) == ("pending", False)
    sim.advance_clock(7 * 86_400)  # a week later: still processing, nothing by itself
    assert client.v1.payment_intents.retrieve(cleared.id).status == "processing"
    released = sim.release_debit(cleared.id)
    assert (released["status"], released["amount_received"]) == ("succeeded", 1999)
    assert client.v1.charges.retrieve(cleared.latest_charge).paid is True
    assert event_types(sim, cleared.id) == [
        "payment_intent.created",
        "charge.pending",
        "payment_intent.processing",
        "charge.succeeded",
        "payment_intent.succeeded",
    ]
    stamps = {
        e["type"]: e["created"] for e in sim.events() if e["data"]["object"]["id"] == cleared.id
    }
    assert stamps["payment_intent.succeeded"] - stamps["payment_intent.processing"] >= 7 * 86_400

    bounced = client.v1.payment_intents.create(
        params={
            "amount": 5000,
            "currency": "usd",
            "payment_method_types": ["us_bank_account"],
            "payment_method_data": {"type": "us_bank_account"},
            "confirm": True,
        }
    )
    assert bounced.status == "processing"
    sim.release_debit(bounced.id, succeed=False, failure_code="account_closed")
    after = client.v1.payment_intents.retrieve(bounced.id)
    assert (after.status, after.last_payment_error.code) == (
        "requires_payment_method",
        "account_closed",
    )
    assert client.v1.charges.retrieve(bounced.latest_charge).failure_code == "account_closed"
    with pytest.raises(StripeAPIError):
        sim.release_debit(bounced.id)  # no longer processing


def test_manual_capture(client: stripe.StripeClient) -> None:
    intent = create(client, payment_method="pm_card_visa", confirm=True, capture_method="manual")
    assert (intent.status, intent.amount_capturable) == ("requires_capture", 1999)
    captured = client.v1.payment_intents.capture(intent.id, params={"amount_to_capture": 1500})
    assert (captured.status, captured.amount_received) == ("succeeded", 1500)
    charge = client.v1.charges.retrieve(intent.latest_charge)
    assert (charge.amount_captured, charge.amount_refunded) == (1500, 499)


def test_errors_parse_into_the_stripe_library_exceptions(
    sim: StripeSimulator, client: stripe.StripeClient, clients: Clients
) -> None:
    with pytest.raises(stripe.InvalidRequestError) as missing:
        client.v1.payment_intents.create(params={"currency": "eur"})  # type: ignore[typeddict-item]
    assert (missing.value.http_status, missing.value.code, missing.value.param) == (
        400,
        "parameter_missing",
        "amount",
    )
    with pytest.raises(stripe.InvalidRequestError) as unknown:
        create(client, colour="blue")
    assert (unknown.value.code, unknown.value.param) == ("parameter_unknown", "colour")
    with pytest.raises(stripe.InvalidRequestError) as absent:
        client.v1.payment_intents.retrieve("pi_doesnotexist")
    assert (absent.value.http_status, absent.value.code) == (404, "resource_missing")
    with pytest.raises(stripe.InvalidRequestError) as bad_method:
        create(client, payment_method="pm_card_unheard_of")
    assert bad_method.value.code == "resource_missing"
    with pytest.raises(stripe.AuthenticationError) as live:
        create(clients("sk_live_not_here"))
    assert live.value.http_status == 401
    assert "sk_live_not_here" not in str(live.value)  # keys are never echoed whole


def test_every_answer_has_a_request_id(sim: StripeSimulator) -> None:
    auth = {"Authorization": "Bearer sk_test_raw"}
    form = {**auth, "Content-Type": "application/x-www-form-urlencoded"}
    answers = [
        raw(sim, "POST", "/v1/payment_intents", "amount=100&currency=eur", **form),
        raw(sim, "GET", "/v1/payment_intents/pi_missing", **auth),
        raw(sim, "GET", "/v1/nothing_here", **auth),
        raw(sim, "GET", "/v1/payment_intents"),
    ]
    assert [status for status, _, _ in answers] == [200, 404, 404, 401]
    ids = [headers["Request-Id"] for _, headers, _ in answers]
    assert all(rid.startswith("req_") for rid in ids)
    assert len(set(ids)) == len(ids)
    for status, _, body in answers[1:]:
        error = json.loads(body)["error"]
        assert error["type"] == "invalid_request_error", status
        assert error["message"]
    basic = raw(
        sim,
        "GET",
        "/v1/payment_intents?limit=1",
        Authorization="Basic c2tfdGVzdF9iYXNpYzo=",  # "sk_test_basic:" as curl -u sends it
    )
    assert basic[0] == 200
