"""The Stripe idempotency keys idempay derives, and tracing them back to their order."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from idempay.engine._checkout import order_of_stripe_key, stripe_idempotency_key

printable = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=60)


@given(
    tenant=st.one_of(st.just(""), printable),
    order_id=printable,
    phase=st.sampled_from(["create", "confirm", "cancel"]),
)
def test_a_readable_key_names_its_order(tenant: str, order_id: str, phase: str) -> None:
    key = stripe_idempotency_key(tenant, order_id, phase)
    assert order_of_stripe_key(key) == (tenant, order_id)


def test_keys_are_stable_and_differ_per_phase_and_order() -> None:
    assert stripe_idempotency_key("t", "o1", "create") == stripe_idempotency_key(
        "t", "o1", "create"
    )
    assert stripe_idempotency_key("t", "o1", "create") != stripe_idempotency_key(
        "t", "o1", "confirm"
    )
    # The tenant's length is part of the key: ("a:b", "c") and ("a", "b:c") never collide.
    assert stripe_idempotency_key("a:b", "c", "x") != stripe_idempotency_key("a", "b:c", "x")
    assert order_of_stripe_key(stripe_idempotency_key("a", "b:c", "x")) == ("a", "b:c")


def test_a_hashed_key_names_no_order() -> None:
    key = stripe_idempotency_key("t", "o" * 255, "create")
    assert len(key) <= 255
    assert order_of_stripe_key(key) is None


@pytest.mark.parametrize(
    "key",
    [
        None,
        "",
        "other:1:t:o:create",
        "idempay:",
        "idempay:x:t:o:create",
        "idempay:01:t:o:create",
        "idempay:5:t:o:create",
        "idempay:1:t",
        "idempay:1:tXo:create",
        "idempay:1:t:create",
        "idempay:1:t::create",
        "idempay:1:t:o:",
    ],
)
def test_other_keys_name_no_order(key: str | None) -> None:
    assert order_of_stripe_key(key) is None
