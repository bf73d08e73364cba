"""idempay's StripeGateway against the simulator, including the failures localstripe cannot
produce: a call committed at Stripe whose answer is lost, a 500, a timeout."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest

from idempay.errors import PaymentOutcomeUnknownError, PaymentProviderError
from idempay.gateway import AsyncStripeGateway, StripeGateway
from idempay.testing.simulator import StripeSimulator


@pytest.fixture
def gateway(sim: StripeSimulator) -> Iterator[StripeGateway]:
    gateway = StripeGateway.from_settings(sim.api_key, api_base=sim.url, timeout=5.0)
    yield gateway
    gateway.close()


def order() -> str:
    return f"o-{secrets.token_hex(4)}"


def test_the_checkout_calls(gateway: StripeGateway) -> None:
    order_id = order()
    created = gateway.create_payment_intent(
        amount=1999,
        currency="eur",
        metadata={"order_id": order_id},
        idempotency_key=f"{order_id}:create",
        payment_method="pm_card_visa",
    )
    assert (created.status, created.amount, created.currency) == (
        "requires_confirmation",
        1999,
        "eur",
    )
    assert created.livemode is False
    assert created.client_secret is not None
    paid = gateway.confirm_payment_intent(created.id, idempotency_key=f"{order_id}:confirm")
    assert (paid.status, paid.amount_received) == ("succeeded", 1999)
    assert gateway.retrieve_payment_intent(created.id) == paid
    assert [pi.id for pi in gateway.find_payment_intents(order_id=order_id)] == [created.id]
    with pytest.raises(PaymentProviderError):
        gateway.cancel_payment_intent(created.id, idempotency_key=f"{order_id}:cancel")


def test_a_decline_is_an_outcome_and_a_processing_debit_cannot_be_canceled(
    gateway: StripeGateway,
) -> None:
    declined = gateway.create_payment_intent(
        amount=500,
        currency="eur",
        metadata={"order_id": order()},
        idempotency_key=secrets.token_hex(8),
        payment_method="pm_card_chargeDeclined",
    )
    after = gateway.confirm_payment_intent(declined.id, idempotency_key=secrets.token_hex(8))
    assert (after.status, after.last_payment_error_code) == (
        "requires_payment_method",
        "card_declined",
    )
    debit = gateway.create_payment_intent(
        amount=500,
        currency="eur",
        metadata={"order_id": order()},
        idempotency_key=secrets.token_hex(8),
        payment_method="pm_sepa_debit",
    )
    gateway.confirm_payment_intent(debit.id, idempotency_key=secrets.token_hex(8))
    with pytest.raises(PaymentProviderError):
        gateway.cancel_payment_intent(debit.id, idempotency_key=secrets.token_hex(8))
    assert gateway.retrieve_payment_intent(debit.id).status == "processing"


def test_committed_then_reset_is_an_unknown_outcome_that_the_same_key_resolves(
    sim: StripeSimulator, gateway: StripeGateway
) -> None:
    order_id = order()
    key = f"{order_id}:create"
    sim.reset_next("/v1/payment_intents")
    with pytest.raises(PaymentOutcomeUnknownError):
        gateway.create_payment_intent(
            amount=1999, currency="eur", metadata={"order_id": order_id}, idempotency_key=key
        )
    assert len(sim.payment_intents()) == 1  # it happened: only the answer was lost
    again = gateway.create_payment_intent(
        amount=1999, currency="eur", metadata={"order_id": order_id}, idempotency_key=key
    )
    assert again.id == sim.payment_intents()[0]["id"]
    assert len(sim.payment_intents()) == 1
    assert sim.stats()["api"]["faults"] == {"reset": 1}


def test_a_500_before_execution_and_a_saved_500(
    sim: StripeSimulator, gateway: StripeGateway
) -> None:
    order_id = order()
    sim.fail_next("/v1/payment_intents")
    with pytest.raises(PaymentOutcomeUnknownError):
        gateway.create_payment_intent(
            amount=1999, currency="eur", metadata={"order_id": order_id}, idempotency_key="k500"
        )
    assert sim.payment_intents() == []  # not executed, key not bound
    created = gateway.create_payment_intent(
        amount=1999,
        currency="eur",
        metadata={"order_id": order_id},
        idempotency_key="k500",
        payment_method="pm_card_visa",
    )

    # Applied, then a 500 saved under the key: every retry with that key gets the 500, as
    # from Stripe; the intent is found by its metadata instead.
    sim.fail_next(f"/v1/payment_intents/{created.id}/confirm", applied=True)
    for _ in range(2):
        with pytest.raises(PaymentOutcomeUnknownError):
            gateway.confirm_payment_intent(created.id, idempotency_key="k500-confirm")
    found = gateway.find_payment_intents(order_id=order_id)
    assert [(pi.id, pi.status) for pi in found] == [(created.id, "succeeded")]
    assert len(sim.charges()) == 1


def test_a_timeout_after_commit(sim: StripeSimulator) -> None:
    gateway = StripeGateway.from_settings(sim.api_key, api_base=sim.url, timeout=0.3)
    try:
        order_id = order()
        sim.hang_next("/v1/payment_intents", seconds=30)
        with pytest.raises(PaymentOutcomeUnknownError):
            gateway.create_payment_intent(
                amount=1999, currency="eur", metadata={"order_id": order_id}, idempotency_key="kt"
            )
        # The hung connection is still held; the retry is answered from the saved response.
        again = gateway.create_payment_intent(
            amount=1999, currency="eur", metadata={"order_id": order_id}, idempotency_key="kt"
        )
        assert [pi["id"] for pi in sim.payment_intents()] == [again.id]
    finally:
        gateway.close()


@pytest.mark.anyio
async def test_the_async_gateway(sim: StripeSimulator) -> None:
    gateway = AsyncStripeGateway.from_settings(sim.api_key, api_base=sim.url, timeout=5.0)
    try:
        order_id = order()
        created = await gateway.create_payment_intent(
            amount=700,
            currency="usd",
            metadata={"order_id": order_id},
            idempotency_key=order_id,
            payment_method="pm_card_visa",
        )
        paid = await gateway.confirm_payment_intent(created.id, idempotency_key=f"{order_id}:c")
        assert paid.status == "succeeded"
        found = await gateway.find_payment_intents(order_id=order_id)
        assert [pi.id for pi in found] == [created.id]
    finally:
        await gateway.aclose()
