"""Stripe's form encoding read back, and the list and search filters built on it."""

from __future__ import annotations

import pytest
import stripe

from idempay.testing.simulator import StripeAPIError, StripeSimulator
from idempay.testing.simulator._forms import parse_form


def test_brackets_nest_and_index_lists() -> None:
    parsed = parse_form(
        "amount=5&metadata[order_id]=o1&metadata[0]=zero&expand[0]=a&expand[1]=b"
        "&types[]=x&types[]=y&payment_method_data[billing_details][name]=Ada"
        "&created[gte]=10"
    )
    assert parsed == {
        "amount": "5",
        "metadata": {"order_id": "o1", "0": "zero"},  # a metadata key, never a list index
        "expand": ["a", "b"],
        "types": ["x", "y"],
        "payment_method_data": {"billing_details": {"name": "Ada"}},
        "created": {"gte": "10"},
    }


@pytest.mark.parametrize("body", ["a=1&a[b]=2", "a[b]=2&a=1", "a=1&a=2", "[x]=1"])
def test_ambiguous_forms_are_refused(body: str) -> None:
    with pytest.raises(StripeAPIError) as refused:
        parse_form(body)
    assert refused.value.status == 400
    assert refused.value.stored is False


def test_created_filters_types_and_negated_or_search(
    sim: StripeSimulator, client: stripe.StripeClient
) -> None:
    early = client.v1.payment_intents.create(params={"amount": 100, "currency": "eur"})
    sim.advance_clock(100)
    late = client.v1.payment_intents.create(
        params={"amount": 5000, "currency": "usd", "payment_method": "pm_card_visa"}
    )
    cutoff = early.created + 50
    after = client.v1.payment_intents.list(params={"created": {"gte": cutoff}})
    assert [pi.id for pi in after.data] == [late.id]
    before = client.v1.payment_intents.list(params={"created": {"lt": cutoff}})
    assert [pi.id for pi in before.data] == [early.id]

    either = client.v1.payment_intents.search(params={"query": "amount>1000 OR currency:'eur'"})
    assert {pi.id for pi in either.data} == {early.id, late.id}
    negated = client.v1.payment_intents.search(params={"query": "-currency:'eur'"})
    assert [pi.id for pi in negated.data] == [late.id]
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.payment_intents.search(params={"query": "amount>1 AND status:'x' OR a:'b'"})

    kinds = client.v1.events.list(params={"types": ["payment_intent.created"]})
    assert [e.data.object["id"] for e in kinds.data] == [late.id, early.id]
    assert client.v1.events.list(params={"type": "charge.*"}).data == []
