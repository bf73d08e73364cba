from __future__ import annotations

import itertools
from dataclasses import replace
from typing import Any

import pytest

from idempay.core.audit import AuditStep
from idempay.core.orders import (
    EVENT_TYPE_PHASES,
    INTENT_STATUS_EVENT_TYPES,
    INTENT_STATUS_PHASES,
    LOCAL_CANCEL_OUTCOMES,
    PAID_STATUSES,
    PHASE_STATUS,
    PRE_SUCCESS_STATUSES,
    RANK,
    STEP_FOR_STATUS,
    TRANSITIONS,
    CancelRequested,
    DisputeObserved,
    DisputeStatus,
    Effect,
    EffectTrigger,
    Observation,
    OrderState,
    OrderStatus,
    Outcome,
    PaymentObserved,
    PaymentPhase,
    RefundObserved,
    ReviewReason,
    ReviewResolved,
    Transition,
    apply,
    moved,
    new_order,
    phase_for_event_type,
    phase_for_intent_status,
    transition_table_markdown,
)
from idempay.errors import ConfigurationError

S = OrderStatus
P = PaymentPhase
AMOUNT = 1000
PI = "pi_1"
OTHER_PI = "pi_2"
NOT_A_STRING: Any = 7
ATTEMPT_PHASES = (P.AWAITING_PAYMENT, P.ACTION_REQUIRED, P.PROCESSING, P.AUTHORIZED, P.FAILED)

PAID_EFFECT = Effect(EffectTrigger.PAID, "paid")
CANCELED_EFFECT = Effect(EffectTrigger.CANCELED, "canceled")
REVIEW_EFFECT = Effect(EffectTrigger.NEEDS_REVIEW, "needs_review")
OPENED_EFFECT = Effect(EffectTrigger.DISPUTE_OPENED, "dispute_opened")
CLOSED_EFFECT = Effect(EffectTrigger.DISPUTE_CLOSED, "dispute_closed")


def order(status: OrderStatus = S.CREATED, **fields: Any) -> OrderState:
    if status is S.NEEDS_REVIEW:
        fields.setdefault("review_reason", ReviewReason.AMOUNT_MISMATCH)
    return OrderState(status=status, amount=AMOUNT, currency="eur", **fields)


def seen(
    phase: PaymentPhase,
    at: int,
    intent: str | None = PI,
    *,
    amount: int | None = None,
    currency: str | None = None,
) -> PaymentObserved:
    return PaymentObserved(phase, at, intent, amount=amount, currency=currency)


def run(state: OrderState, *observations: Observation) -> tuple[OrderState, list[Transition]]:
    transitions = []
    for observation in observations:
        transition = apply(state, observation)
        assert transition.before == state
        transitions.append(transition)
        state = transition.after
    return state, transitions


def effects_of(transitions: list[Transition]) -> list[Effect]:
    return [effect for t in transitions for effect in t.effects]


def refund_effect(total: int) -> Effect:
    return Effect(EffectTrigger.REFUNDED, f"refund:{total}")


def failed_effect(n: int) -> Effect:
    return Effect(EffectTrigger.PAYMENT_FAILED, f"failed:{n}")


# --- creation and validation -----------------------------------------------------------------


def test_new_order_is_created_with_the_started_step() -> None:
    t = new_order(amount=AMOUNT, currency="eur")
    assert t.after == OrderState(status=S.CREATED, amount=AMOUNT, currency="eur")
    assert t.before == t.after
    assert t.outcome is Outcome.APPLIED
    assert t.steps == (AuditStep.STARTED,)
    assert t.effects == ()
    assert t.reason == "order created"
    assert not t.changed


@pytest.mark.parametrize("amount", [0, -987654, True, 12.5, "1000", None])
def test_new_order_refuses_a_bad_amount(amount: Any) -> None:
    with pytest.raises(ConfigurationError, match="amount") as excinfo:
        new_order(amount=amount, currency="eur")
    assert "987654" not in str(excinfo.value)


@pytest.mark.parametrize("currency", ["EUR", "eu", "euro", "", "e1r", "ëur", "eur\n", 978, None])
def test_new_order_refuses_a_bad_currency(currency: Any) -> None:
    with pytest.raises(ConfigurationError, match="currency") as excinfo:
        new_order(amount=AMOUNT, currency=currency)
    if isinstance(currency, str) and currency:
        assert repr(currency) not in str(excinfo.value)


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: order(amount_refunded=-1), "amount_refunded"),
        (lambda: order(observed_at=-1), "observed_at"),
        (lambda: order(failures=-1), "failures"),
        (lambda: order(payment_intent_id=""), "payment_intent_id"),
        (lambda: order(S.PAID, review_reason=ReviewReason.AMOUNT_MISMATCH), "review_reason"),
        (lambda: order(S.NEEDS_REVIEW, review_reason=None), "review_reason"),
        (lambda: PaymentObserved(P.PROCESSING, -1), "observed_at"),
        (lambda: PaymentObserved(P.PROCESSING, 1, ""), "payment_intent_id"),
        (lambda: PaymentObserved(P.PROCESSING, 1, NOT_A_STRING), "payment_intent_id"),
        (lambda: PaymentObserved(P.SUCCEEDED, 1, amount=-5), "amount"),
        (lambda: PaymentObserved(P.SUCCEEDED, 1, currency="USD"), "currency"),
        (lambda: RefundObserved(-1), "amount_refunded"),
        (lambda: RefundObserved(False), "amount_refunded"),
        (lambda: RefundObserved(10, currency="usdx"), "currency"),
        (lambda: DisputeObserved(DisputeStatus.NONE), "status"),
    ],
)
def test_values_refuse_fields_out_of_their_domain(build: Any, field: str) -> None:
    with pytest.raises(ConfigurationError, match=field):
        build()


def test_valid_observations_with_every_optional_field() -> None:
    observed = PaymentObserved(P.SUCCEEDED, 0, PI, amount=0, currency="usd")
    assert observed.amount == 0
    assert RefundObserved(0, currency="usd").amount_refunded == 0
    assert DisputeObserved(DisputeStatus.LOST).status is DisputeStatus.LOST


def test_transition_changed_compares_the_states() -> None:
    state = order()
    assert Transition(state, state, Outcome.UNCHANGED, (), (), "x").changed is False
    moved = replace(state, status=S.PROCESSING)
    assert Transition(state, moved, Outcome.APPLIED, (), (), "x").changed is True


# --- the tables ------------------------------------------------------------------------------


def test_rank_is_the_documented_order() -> None:
    assert dict(RANK) == {
        S.CREATED: 0,
        S.AWAITING_PAYMENT: 10,
        S.ACTION_REQUIRED: 20,
        S.PROCESSING: 30,
        S.AUTHORIZED: 40,
        S.PAYMENT_FAILED: 45,
        S.PAID: 50,
        S.PARTIALLY_REFUNDED: 60,
        S.REFUNDED: 70,
    }
    assert S.CANCELED not in RANK
    assert S.NEEDS_REVIEW not in RANK
    assert max(RANK[s] for s in PRE_SUCCESS_STATUSES) < min(RANK[s] for s in PAID_STATUSES)


def test_status_groups_partition_the_statuses() -> None:
    assert {
        S.CREATED,
        S.AWAITING_PAYMENT,
        S.ACTION_REQUIRED,
        S.PROCESSING,
        S.AUTHORIZED,
        S.PAYMENT_FAILED,
    } == PRE_SUCCESS_STATUSES
    assert {S.PAID, S.PARTIALLY_REFUNDED, S.REFUNDED} == PAID_STATUSES
    rest = set(S) - PRE_SUCCESS_STATUSES - PAID_STATUSES
    assert rest == {S.CANCELED, S.NEEDS_REVIEW}


def test_phase_status_covers_every_phase() -> None:
    assert dict(PHASE_STATUS) == {
        P.AWAITING_PAYMENT: S.AWAITING_PAYMENT,
        P.ACTION_REQUIRED: S.ACTION_REQUIRED,
        P.PROCESSING: S.PROCESSING,
        P.AUTHORIZED: S.AUTHORIZED,
        P.SUCCEEDED: S.PAID,
        P.FAILED: S.PAYMENT_FAILED,
        P.CANCELED: S.CANCELED,
    }


def test_step_for_status_covers_every_status() -> None:
    assert set(STEP_FOR_STATUS) == set(S)
    assert STEP_FOR_STATUS[S.CREATED] is AuditStep.STARTED
    assert STEP_FOR_STATUS[S.AWAITING_PAYMENT] is AuditStep.PENDING
    assert STEP_FOR_STATUS[S.PAID] is AuditStep.SUCCEEDED
    assert STEP_FOR_STATUS[S.PAYMENT_FAILED] is AuditStep.FAILED
    assert STEP_FOR_STATUS[S.NEEDS_REVIEW] is AuditStep.NEEDS_REVIEW
    assert len(set(STEP_FOR_STATUS.values())) == len(S)


def test_transitions_table_shape() -> None:
    assert set(TRANSITIONS) == set(S)
    for status, targets in TRANSITIONS.items():
        assert status not in targets
        assert S.CREATED not in targets
    for status in PAID_STATUSES:
        assert TRANSITIONS[status] <= {S.PARTIALLY_REFUNDED, S.REFUNDED}
    assert TRANSITIONS[S.CANCELED] == {S.NEEDS_REVIEW}
    assert TRANSITIONS[S.NEEDS_REVIEW] == {S.PAID, S.PARTIALLY_REFUNDED, S.REFUNDED}
    assert TRANSITIONS[S.REFUNDED] == frozenset()


def test_local_cancel_table() -> None:
    assert set(LOCAL_CANCEL_OUTCOMES) == set(S)
    applied = {s for s, o in LOCAL_CANCEL_OUTCOMES.items() if o is Outcome.APPLIED}
    assert applied == {
        S.CREATED,
        S.AWAITING_PAYMENT,
        S.ACTION_REQUIRED,
        S.PAYMENT_FAILED,
        S.AUTHORIZED,
    }
    assert LOCAL_CANCEL_OUTCOMES[S.CANCELED] is Outcome.UNCHANGED
    assert set(LOCAL_CANCEL_OUTCOMES.values()) == {
        Outcome.APPLIED,
        Outcome.UNCHANGED,
        Outcome.REFUSED,
    }


@pytest.mark.parametrize(
    "table",
    [RANK, PHASE_STATUS, STEP_FOR_STATUS, TRANSITIONS, LOCAL_CANCEL_OUTCOMES, EVENT_TYPE_PHASES],
)
def test_tables_are_read_only(table: Any) -> None:
    key = next(iter(table))
    with pytest.raises(TypeError):
        table[key] = table[key]


# --- Stripe tables ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "phase"),
    [
        ("requires_payment_method", P.AWAITING_PAYMENT),
        ("requires_confirmation", P.AWAITING_PAYMENT),
        ("requires_action", P.ACTION_REQUIRED),
        ("processing", P.PROCESSING),
        ("requires_capture", P.AUTHORIZED),
        ("succeeded", P.SUCCEEDED),
        ("canceled", P.CANCELED),
        ("requires_source", None),
        ("Succeeded", None),
        ("", None),
    ],
)
def test_phase_for_intent_status(status: str, phase: PaymentPhase | None) -> None:
    assert phase_for_intent_status(status) is phase


@pytest.mark.parametrize(
    ("event_type", "phase"),
    [
        ("payment_intent.succeeded", P.SUCCEEDED),
        ("payment_intent.payment_failed", P.FAILED),
        ("payment_intent.processing", P.PROCESSING),
        ("payment_intent.requires_action", P.ACTION_REQUIRED),
        ("payment_intent.canceled", P.CANCELED),
        ("payment_intent.amount_capturable_updated", P.AUTHORIZED),
        ("charge.failed", P.FAILED),
        ("charge.pending", P.PROCESSING),
        ("checkout.session.async_payment_succeeded", P.SUCCEEDED),
        ("checkout.session.async_payment_failed", P.FAILED),
        ("checkout.session.expired", P.CANCELED),
        # Authorisations with manual capture send it too: the type alone does not decide.
        ("charge.succeeded", None),
        # Its payment_status decides.
        ("checkout.session.completed", None),
        ("payment_intent.created", None),
        ("payment_intent.partially_funded", None),
        ("charge.refunded", None),
        ("charge.dispute.created", None),
        ("customer.created", None),
    ],
)
def test_phase_for_event_type(event_type: str, phase: PaymentPhase | None) -> None:
    assert phase_for_event_type(event_type) is phase


def test_intent_status_event_types() -> None:
    assert {
        "payment_intent.created",
        "payment_intent.partially_funded",
    } == INTENT_STATUS_EVENT_TYPES
    assert not INTENT_STATUS_EVENT_TYPES & set(EVENT_TYPE_PHASES)
    assert set(INTENT_STATUS_PHASES.values()) == set(P) - {P.FAILED}


# --- documentation ---------------------------------------------------------------------------


def test_transition_table_markdown() -> None:
    text = transition_table_markdown()
    assert text == transition_table_markdown()
    assert text.endswith("|\n")
    first, second = text.split("\n\n")
    rows = first.splitlines()
    assert rows[0] == "| status | rank | may move to | audit step on entry | local cancel |"
    assert len(rows) == 2 + len(S)
    assert rows[2].startswith("| `created` | 0 | `awaiting_payment`, `action_required`")
    assert "| `paid` | 50 | `partially_refunded`, `refunded` | `succeeded` | refused |" in rows
    assert "| `refunded` | 70 | — | `refunded` | refused |" in rows
    assert "| `canceled` | — | `needs_review` | `canceled` | unchanged |" in rows
    assert "| `processing` | 30 |" in first
    phases = second.splitlines()
    assert len(phases) == 2 + len(P)
    assert (
        "| `awaiting_payment` | `awaiting_payment` "
        "| `requires_payment_method`, `requires_confirmation` |"
    ) in phases
    assert "| `failed` | `payment_failed` | — |" in phases
    assert "| `succeeded` | `paid` | `succeeded` |" in phases


# --- payment phases before success -----------------------------------------------------------


@pytest.mark.parametrize(
    ("start", "start_at", "phase", "at", "expected"),
    [
        # Newer wins, whatever the rank.
        (S.CREATED, 0, P.AWAITING_PAYMENT, 1, (Outcome.APPLIED, S.AWAITING_PAYMENT)),
        (S.AWAITING_PAYMENT, 1, P.ACTION_REQUIRED, 2, (Outcome.APPLIED, S.ACTION_REQUIRED)),
        (S.ACTION_REQUIRED, 2, P.PROCESSING, 3, (Outcome.APPLIED, S.PROCESSING)),
        (S.PROCESSING, 3, P.FAILED, 4, (Outcome.APPLIED, S.PAYMENT_FAILED)),
        # Failure is not terminal: a newer attempt supersedes it.
        (S.PAYMENT_FAILED, 10, P.PROCESSING, 20, (Outcome.APPLIED, S.PROCESSING)),
        (S.PAYMENT_FAILED, 10, P.AWAITING_PAYMENT, 11, (Outcome.APPLIED, S.AWAITING_PAYMENT)),
        (S.AUTHORIZED, 5, P.PROCESSING, 6, (Outcome.APPLIED, S.PROCESSING)),
        # Within one second, the higher rank wins.
        (S.PROCESSING, 10, P.FAILED, 10, (Outcome.APPLIED, S.PAYMENT_FAILED)),
        (S.AWAITING_PAYMENT, 10, P.PROCESSING, 10, (Outcome.APPLIED, S.PROCESSING)),
        (S.PAYMENT_FAILED, 10, P.AWAITING_PAYMENT, 10, (Outcome.STALE, S.PAYMENT_FAILED)),
        (S.PROCESSING, 10, P.ACTION_REQUIRED, 10, (Outcome.STALE, S.PROCESSING)),
        # Older is stale, the same status is unchanged.
        (S.PROCESSING, 20, P.FAILED, 10, (Outcome.STALE, S.PROCESSING)),
        (S.PAYMENT_FAILED, 20, P.PROCESSING, 10, (Outcome.STALE, S.PAYMENT_FAILED)),
        (S.PROCESSING, 20, P.PROCESSING, 20, (Outcome.UNCHANGED, S.PROCESSING)),
        (S.PROCESSING, 20, P.PROCESSING, 10, (Outcome.UNCHANGED, S.PROCESSING)),
        (S.PAYMENT_FAILED, 20, P.FAILED, 10, (Outcome.UNCHANGED, S.PAYMENT_FAILED)),
    ],
)
def test_attempt_phases_newer_wins(
    start: OrderStatus,
    start_at: int,
    phase: PaymentPhase,
    at: int,
    expected: tuple[Outcome, OrderStatus],
) -> None:
    outcome, status = expected
    state = order(start, observed_at=start_at, payment_intent_id=PI)
    t = apply(state, seen(phase, at))
    assert t.outcome is outcome
    assert t.after.status is status
    if outcome is Outcome.APPLIED:
        assert t.after.observed_at == at
        assert t.steps == (STEP_FOR_STATUS[status],)
    elif outcome is Outcome.STALE:
        assert t.steps == (AuditStep.IGNORED_STALE,)
        assert t.reason == "older payment phase"
        assert t.after == state
    else:
        assert t.steps == ()
        assert t.after == state


def test_a_newer_poll_of_the_same_phase_records_its_time_without_an_audit_step() -> None:
    state = order(S.PROCESSING, observed_at=100, payment_intent_id=PI)
    t = apply(state, seen(P.PROCESSING, 3600))
    assert t.outcome is Outcome.APPLIED
    assert t.after == replace(state, observed_at=3600)
    assert t.steps == ()
    assert t.effects == ()
    assert t.reason == "payment phase refreshed"
    # The recorded time is what makes an older failure stale afterwards.
    assert apply(t.after, seen(P.FAILED, 3000)).outcome is Outcome.STALE


def test_each_failure_is_counted_and_numbers_its_effect() -> None:
    final, ts = run(order(), seen(P.FAILED, 10), seen(P.FAILED, 20), seen(P.FAILED, 20))
    assert final.status is S.PAYMENT_FAILED
    assert final.failures == 2
    assert effects_of(ts) == [failed_effect(1), failed_effect(2)]
    assert [t.steps for t in ts] == [(AuditStep.FAILED,), (AuditStep.FAILED,), ()]
    assert [t.reason for t in ts][:2] == ["payment attempt failed"] * 2


def test_the_first_payment_intent_seen_is_recorded() -> None:
    t = apply(order(), seen(P.AWAITING_PAYMENT, 1, PI))
    assert t.after.payment_intent_id == PI
    t2 = apply(t.after, seen(P.PROCESSING, 2, None))
    assert t2.after.payment_intent_id == PI
    t3 = apply(order(), seen(P.PROCESSING, 2, None))
    assert t3.after.payment_intent_id is None


@pytest.mark.parametrize("phase", [*ATTEMPT_PHASES, P.CANCELED])
def test_a_phase_of_another_payment_intent_is_stale(phase: PaymentPhase) -> None:
    state = order(S.AWAITING_PAYMENT, observed_at=1, payment_intent_id=PI)
    t = apply(state, seen(phase, 50, OTHER_PI))
    assert t.outcome is Outcome.STALE
    assert t.reason == "another payment intent"
    assert t.after == state


# --- success ---------------------------------------------------------------------------------


@pytest.mark.parametrize("start", sorted(PRE_SUCCESS_STATUSES))
def test_success_dominates_every_pre_success_status_whatever_its_time(
    start: OrderStatus,
) -> None:
    state = order(start, observed_at=500, failures=1)
    t = apply(state, seen(P.SUCCEEDED, 10, amount=AMOUNT, currency="eur"))
    assert t.outcome is Outcome.APPLIED
    assert t.after == replace(state, status=S.PAID, payment_intent_id=PI, observed_at=500)
    assert t.steps == (AuditStep.SUCCEEDED,)
    assert t.effects == (PAID_EFFECT,)
    assert t.reason == "payment succeeded"


def test_success_records_a_newer_time() -> None:
    t = apply(order(S.PROCESSING, observed_at=5), seen(P.SUCCEEDED, 9))
    assert t.after.observed_at == 9


@pytest.mark.parametrize(
    ("state", "observed", "reason"),
    [
        # The order of the checks: canceled, currency, amount, payment intent.
        (
            order(S.CANCELED, payment_intent_id=PI),
            seen(P.SUCCEEDED, 5, OTHER_PI, amount=1, currency="usd"),
            ReviewReason.SUCCEEDED_AFTER_CANCEL,
        ),
        (
            order(S.PROCESSING, payment_intent_id=PI),
            seen(P.SUCCEEDED, 5, OTHER_PI, amount=1, currency="usd"),
            ReviewReason.CURRENCY_MISMATCH,
        ),
        (
            order(S.PROCESSING, payment_intent_id=PI),
            seen(P.SUCCEEDED, 5, OTHER_PI, amount=1, currency="eur"),
            ReviewReason.AMOUNT_MISMATCH,
        ),
        (
            order(S.PROCESSING, payment_intent_id=PI),
            seen(P.SUCCEEDED, 5, OTHER_PI, amount=AMOUNT),
            ReviewReason.PAYMENT_INTENT_MISMATCH,
        ),
        (
            order(S.CREATED),
            seen(P.SUCCEEDED, 5, amount=AMOUNT + 1),
            ReviewReason.AMOUNT_MISMATCH,
        ),
    ],
)
def test_success_that_does_not_fit_goes_to_review(
    state: OrderState, observed: PaymentObserved, reason: ReviewReason
) -> None:
    t = apply(state, observed)
    assert t.outcome is Outcome.APPLIED
    assert t.after.status is S.NEEDS_REVIEW
    assert t.after.review_reason is reason
    assert t.steps == (AuditStep.NEEDS_REVIEW,)
    assert t.effects == (REVIEW_EFFECT,)
    assert PAID_EFFECT not in t.effects
    assert t.reason == f"needs review: {reason}"
    assert t.after.payment_intent_id == (state.payment_intent_id or observed.payment_intent_id)


def test_review_records_the_payment_intent_when_none_was_recorded() -> None:
    t = apply(order(S.CANCELED), seen(P.SUCCEEDED, 5, PI))
    assert t.after.payment_intent_id == PI
    assert t.after.observed_at == 5


@pytest.mark.parametrize("start", sorted(PAID_STATUSES))
def test_a_paid_order_ignores_every_payment_phase_but_success(start: OrderStatus) -> None:
    state = order(start, payment_intent_id=PI, observed_at=50, amount_refunded=400)
    for phase in [*ATTEMPT_PHASES, P.CANCELED]:
        for at in (10, 50, 90):
            t = apply(state, seen(phase, at))
            assert t.outcome is Outcome.STALE
            assert t.after == state
            assert t.reason == "payment phase after success"
    again = apply(state, seen(P.SUCCEEDED, 50, amount=AMOUNT, currency="eur"))
    assert again.outcome is Outcome.UNCHANGED
    assert again.reason == "success already recorded"
    older = apply(state, seen(P.SUCCEEDED, 10, None))
    assert older.outcome is Outcome.UNCHANGED


@pytest.mark.parametrize(
    "observed",
    [
        seen(P.SUCCEEDED, 60, OTHER_PI),
        seen(P.SUCCEEDED, 60, amount=AMOUNT - 1),
        seen(P.SUCCEEDED, 60, currency="usd"),
    ],
)
def test_a_conflicting_success_on_a_paid_order_is_stale(observed: PaymentObserved) -> None:
    state = order(S.PAID, payment_intent_id=PI, observed_at=50)
    t = apply(state, observed)
    assert t.outcome is Outcome.STALE
    assert t.reason == "conflicting success after payment"
    assert t.effects == ()


def test_a_success_after_its_refund_records_the_payment_details() -> None:
    state, _ = run(order(), RefundObserved(300))
    assert state.status is S.PARTIALLY_REFUNDED
    assert state.payment_intent_id is None
    t = apply(state, seen(P.SUCCEEDED, 40, amount=AMOUNT, currency="eur"))
    assert t.outcome is Outcome.APPLIED
    assert t.after == replace(state, payment_intent_id=PI, observed_at=40)
    assert t.steps == ()
    assert t.effects == ()
    assert t.reason == "payment details recorded"


# --- cancels ---------------------------------------------------------------------------------


@pytest.mark.parametrize("start", sorted(PRE_SUCCESS_STATUSES))
def test_stripe_cancel_cancels_any_pre_success_order(start: OrderStatus) -> None:
    state = order(start, observed_at=30)
    t = apply(state, seen(P.CANCELED, 20))
    assert t.outcome is Outcome.APPLIED
    assert t.after == replace(state, status=S.CANCELED, payment_intent_id=PI)
    assert t.steps == (AuditStep.CANCELED,)
    assert t.effects == (CANCELED_EFFECT,)


@pytest.mark.parametrize(
    ("start", "outcome", "reason"),
    [
        (S.CANCELED, Outcome.UNCHANGED, "already canceled"),
        (S.NEEDS_REVIEW, Outcome.STALE, "order under review"),
        (S.PAID, Outcome.STALE, "payment phase after success"),
    ],
)
def test_stripe_cancel_after_the_end(start: OrderStatus, outcome: Outcome, reason: str) -> None:
    t = apply(order(start), seen(P.CANCELED, 20))
    assert (t.outcome, t.reason, t.changed) == (outcome, reason, False)


@pytest.mark.parametrize("start", list(S))
def test_local_cancel_follows_its_table(start: OrderStatus) -> None:
    state = order(start, observed_at=7)
    t = apply(state, CancelRequested())
    expected = LOCAL_CANCEL_OUTCOMES[start]
    assert t.outcome is expected
    if expected is Outcome.APPLIED:
        assert t.after == replace(state, status=S.CANCELED)
        assert t.steps == (AuditStep.CANCELED,)
        assert t.effects == (CANCELED_EFFECT,)
        assert t.reason == "canceled locally"
    else:
        assert t.after == state
        assert t.effects == ()
        assert t.steps == (() if expected is Outcome.UNCHANGED else (AuditStep.REJECTED,))


def test_local_cancel_never_cancels_a_payment_in_flight() -> None:
    t = apply(order(S.PROCESSING), CancelRequested())
    assert t.outcome is Outcome.REFUSED
    assert t.reason == "payment in flight"
    assert apply(order(S.PAID), CancelRequested()).reason == "cancel after success"
    assert apply(order(S.NEEDS_REVIEW), CancelRequested()).reason == "order under review"


@pytest.mark.parametrize("phase", ATTEMPT_PHASES)
def test_attempt_phases_after_a_cancel_are_stale(phase: PaymentPhase) -> None:
    t = apply(order(S.CANCELED, observed_at=5), seen(phase, 50))
    assert t.outcome is Outcome.STALE
    assert t.reason == "payment phase after cancel"


# --- review is sticky ------------------------------------------------------------------------


@pytest.mark.parametrize("phase", [*ATTEMPT_PHASES, P.CANCELED])
def test_review_ignores_payment_phases(phase: PaymentPhase) -> None:
    state = order(S.NEEDS_REVIEW, observed_at=5)
    t = apply(state, seen(phase, 50))
    assert (t.outcome, t.after, t.reason) == (Outcome.STALE, state, "order under review")


def test_review_takes_a_success_as_already_known() -> None:
    state = order(S.NEEDS_REVIEW, observed_at=5)
    t = apply(state, seen(P.SUCCEEDED, 50, amount=AMOUNT, currency="eur"))
    assert (t.outcome, t.after, t.effects) == (Outcome.UNCHANGED, state, ())


# --- refunds ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("start", "recorded", "total", "expected", "steps"),
    [
        (S.PAID, 0, 0, (Outcome.UNCHANGED, S.PAID), ()),
        (S.PAID, 0, 300, (Outcome.APPLIED, S.PARTIALLY_REFUNDED), (AuditStep.PARTIALLY_REFUNDED,)),
        (S.PAID, 0, AMOUNT, (Outcome.APPLIED, S.REFUNDED), (AuditStep.REFUNDED,)),
        (
            S.PARTIALLY_REFUNDED,
            300,
            600,
            (Outcome.APPLIED, S.PARTIALLY_REFUNDED),
            (AuditStep.PARTIALLY_REFUNDED,),
        ),
        (S.PARTIALLY_REFUNDED, 300, AMOUNT, (Outcome.APPLIED, S.REFUNDED), (AuditStep.REFUNDED,)),
        (S.PARTIALLY_REFUNDED, 600, 300, (Outcome.STALE, S.PARTIALLY_REFUNDED), None),
        (S.PARTIALLY_REFUNDED, 600, 600, (Outcome.UNCHANGED, S.PARTIALLY_REFUNDED), ()),
        (S.REFUNDED, AMOUNT, 300, (Outcome.STALE, S.REFUNDED), None),
        # More than the order's amount is recorded as it is: the refunds never decrease.
        (S.REFUNDED, AMOUNT, AMOUNT + 50, (Outcome.APPLIED, S.REFUNDED), (AuditStep.REFUNDED,)),
    ],
)
def test_refunds_are_cumulative_and_never_decrease(
    start: OrderStatus,
    recorded: int,
    total: int,
    expected: tuple[Outcome, OrderStatus],
    steps: tuple[AuditStep, ...] | None,
) -> None:
    outcome, status = expected
    state = order(start, amount_refunded=recorded, payment_intent_id=PI)
    t = apply(state, RefundObserved(total, currency="eur"))
    assert t.outcome is outcome
    assert t.after.status is status
    assert t.after.amount_refunded == max(recorded, total)
    if outcome is Outcome.APPLIED:
        assert t.steps == steps
        assert t.effects == (refund_effect(total),)
        assert t.reason == "refund recorded"
    elif outcome is Outcome.STALE:
        assert t.steps == (AuditStep.IGNORED_STALE,)
        assert t.reason == "older refund total"
    else:
        assert t.steps == ()
        assert t.reason == "same refund total"


@pytest.mark.parametrize("start", sorted(PRE_SUCCESS_STATUSES))
@pytest.mark.parametrize(
    ("total", "status", "step"),
    [
        (300, S.PARTIALLY_REFUNDED, AuditStep.PARTIALLY_REFUNDED),
        (AMOUNT, S.REFUNDED, AuditStep.REFUNDED),
    ],
)
def test_a_refund_before_the_success_implies_it(
    start: OrderStatus, total: int, status: OrderStatus, step: AuditStep
) -> None:
    state = order(start, observed_at=12)
    t = apply(state, RefundObserved(total))
    assert t.outcome is Outcome.APPLIED
    assert t.after == replace(state, status=status, amount_refunded=total)
    assert t.steps == (AuditStep.SUCCEEDED, step)
    assert t.effects == (PAID_EFFECT, refund_effect(total))
    assert t.reason == "refund before success"


@pytest.mark.parametrize(
    ("state", "observed", "reason"),
    [
        (order(S.CANCELED), RefundObserved(300, "usd"), ReviewReason.SUCCEEDED_AFTER_CANCEL),
        (order(S.PROCESSING), RefundObserved(300, "usd"), ReviewReason.CURRENCY_MISMATCH),
        (order(S.CREATED), RefundObserved(AMOUNT + 1), ReviewReason.AMOUNT_MISMATCH),
    ],
)
def test_a_refund_that_does_not_fit_goes_to_review(
    state: OrderState, observed: RefundObserved, reason: ReviewReason
) -> None:
    t = apply(state, observed)
    assert t.after == replace(
        state,
        status=S.NEEDS_REVIEW,
        review_reason=reason,
        amount_refunded=observed.amount_refunded,
    )
    assert t.steps == (AuditStep.NEEDS_REVIEW,)
    assert t.effects == (REVIEW_EFFECT,)


def test_a_refund_in_another_currency_after_success_is_stale() -> None:
    state = order(S.PAID, payment_intent_id=PI)
    t = apply(state, RefundObserved(300, "usd"))
    assert (t.outcome, t.reason, t.after) == (Outcome.STALE, "refund in another currency", state)


@pytest.mark.parametrize(
    ("total", "step"), [(300, AuditStep.PARTIALLY_REFUNDED), (AMOUNT, AuditStep.REFUNDED)]
)
def test_review_records_refunds_and_stays(total: int, step: AuditStep) -> None:
    state = order(S.NEEDS_REVIEW, review_reason=ReviewReason.SUCCEEDED_AFTER_CANCEL)
    t = apply(state, RefundObserved(total))
    assert t.outcome is Outcome.APPLIED
    assert t.after == replace(state, amount_refunded=total)
    assert t.steps == (step,)
    assert t.effects == ()
    assert t.reason == "refund recorded during review"


# --- disputes --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("current", "observed", "outcome", "steps", "effects"),
    [
        (
            DisputeStatus.NONE,
            DisputeStatus.OPEN,
            Outcome.APPLIED,
            (AuditStep.DISPUTE_OPENED,),
            (OPENED_EFFECT,),
        ),
        (
            DisputeStatus.OPEN,
            DisputeStatus.WON,
            Outcome.APPLIED,
            (AuditStep.DISPUTE_CLOSED,),
            (CLOSED_EFFECT,),
        ),
        (
            DisputeStatus.OPEN,
            DisputeStatus.LOST,
            Outcome.APPLIED,
            (AuditStep.DISPUTE_CLOSED,),
            (CLOSED_EFFECT,),
        ),
        (
            DisputeStatus.NONE,
            DisputeStatus.LOST,
            Outcome.APPLIED,
            (AuditStep.DISPUTE_OPENED, AuditStep.DISPUTE_CLOSED),
            (OPENED_EFFECT, CLOSED_EFFECT),
        ),
        (DisputeStatus.OPEN, DisputeStatus.OPEN, Outcome.UNCHANGED, (), ()),
        (DisputeStatus.WON, DisputeStatus.WON, Outcome.UNCHANGED, (), ()),
        (DisputeStatus.WON, DisputeStatus.OPEN, Outcome.STALE, (AuditStep.IGNORED_STALE,), ()),
        (DisputeStatus.LOST, DisputeStatus.WON, Outcome.STALE, (AuditStep.IGNORED_STALE,), ()),
    ],
)
def test_disputes_are_an_overlay(
    current: DisputeStatus,
    observed: DisputeStatus,
    outcome: Outcome,
    steps: tuple[AuditStep, ...],
    effects: tuple[Effect, ...],
) -> None:
    for status in S:
        state = order(status, dispute=current)
        t = apply(state, DisputeObserved(observed))
        assert t.outcome is outcome
        assert t.after.status is status
        assert t.after.dispute is (observed if outcome is Outcome.APPLIED else current)
        assert t.steps == steps
        assert t.effects == effects


# --- scenarios -------------------------------------------------------------------------------


def test_w3_success_before_processing_then_an_older_failure() -> None:
    final, ts = run(
        order(S.AWAITING_PAYMENT, observed_at=1, payment_intent_id=PI),
        seen(P.SUCCEEDED, 30, amount=AMOUNT, currency="eur"),
        seen(P.PROCESSING, 20),
        seen(P.FAILED, 10),
    )
    assert final.status is S.PAID
    assert [t.outcome for t in ts] == [Outcome.APPLIED, Outcome.STALE, Outcome.STALE]
    assert [t.steps for t in ts[1:]] == [(AuditStep.IGNORED_STALE,)] * 2
    assert effects_of(ts) == [PAID_EFFECT]


def test_w4_failure_then_success() -> None:
    final, ts = run(order(), seen(P.FAILED, 10), seen(P.SUCCEEDED, 20))
    assert final.status is S.PAID
    assert [t.steps for t in ts] == [(AuditStep.FAILED,), (AuditStep.SUCCEEDED,)]
    assert effects_of(ts) == [failed_effect(1), PAID_EFFECT]


@pytest.mark.parametrize(
    ("end", "status", "effect"),
    [(P.SUCCEEDED, S.PAID, PAID_EFFECT), (P.FAILED, S.PAYMENT_FAILED, failed_effect(1))],
)
def test_w6_bank_debit_processing_for_days(
    end: PaymentPhase, status: OrderStatus, effect: Effect
) -> None:
    day = 86_400
    state, ts = run(order(), seen(P.AWAITING_PAYMENT, 1), seen(P.PROCESSING, 2))
    # Reconciler polls for a week, and an expiry job tries to cancel the abandoned checkout.
    for n in range(1, 8):
        state, polled = run(state, seen(P.PROCESSING, n * day), CancelRequested())
        assert polled[1].outcome is Outcome.REFUSED
        ts += polled
    assert state.status is S.PROCESSING
    assert effects_of(ts) == []
    final, last = run(state, seen(end, 7 * day + 5))
    assert final.status is status
    assert effects_of(last) == [effect]


def test_w7_success_after_a_local_cancel_needs_review() -> None:
    final, ts = run(
        order(S.AWAITING_PAYMENT, payment_intent_id=PI, observed_at=1),
        CancelRequested(),
        seen(P.SUCCEEDED, 5, amount=AMOUNT, currency="eur"),
        seen(P.SUCCEEDED, 5, amount=AMOUNT, currency="eur"),
        CancelRequested(),
    )
    assert final.status is S.NEEDS_REVIEW
    assert final.review_reason is ReviewReason.SUCCEEDED_AFTER_CANCEL
    assert effects_of(ts) == [CANCELED_EFFECT, REVIEW_EFFECT]
    assert [t.outcome for t in ts[2:]] == [Outcome.UNCHANGED, Outcome.REFUSED]


@pytest.mark.parametrize(
    ("amount", "currency", "reason"),
    [
        (AMOUNT - 1, "eur", ReviewReason.AMOUNT_MISMATCH),
        (AMOUNT, "usd", ReviewReason.CURRENCY_MISMATCH),
    ],
)
def test_w8_a_success_for_another_amount_or_currency(
    amount: int, currency: str, reason: ReviewReason
) -> None:
    final, ts = run(
        order(S.PROCESSING, payment_intent_id=PI, observed_at=3),
        seen(P.SUCCEEDED, 9, amount=amount, currency=currency),
        seen(P.SUCCEEDED, 10, amount=AMOUNT, currency="eur"),
    )
    assert final.status is S.NEEDS_REVIEW
    assert final.review_reason is reason
    assert PAID_EFFECT not in effects_of(ts)


@pytest.mark.parametrize(
    "refunds",
    [(RefundObserved(300), RefundObserved(AMOUNT)), (RefundObserved(AMOUNT), RefundObserved(300))],
)
def test_w9_partial_then_full_refund_in_both_orders(
    refunds: tuple[RefundObserved, RefundObserved],
) -> None:
    paid, _ = run(order(), seen(P.SUCCEEDED, 5))
    final, ts = run(paid, *refunds)
    assert final.status is S.REFUNDED
    assert final.amount_refunded == AMOUNT
    assert refund_effect(AMOUNT) in effects_of(ts)
    if refunds[0].amount_refunded == 300:
        assert [t.after.status for t in ts] == [S.PARTIALLY_REFUNDED, S.REFUNDED]
    else:
        assert ts[1].outcome is Outcome.STALE


def test_w9_refunds_before_the_success() -> None:
    final, ts = run(order(), RefundObserved(AMOUNT), RefundObserved(300), seen(P.SUCCEEDED, 5))
    assert final == order(S.REFUNDED, amount_refunded=AMOUNT, payment_intent_id=PI, observed_at=5)
    assert effects_of(ts) == [PAID_EFFECT, refund_effect(AMOUNT)]


def test_c7_a_decline_then_a_later_success() -> None:
    final, ts = run(
        order(),
        seen(P.AWAITING_PAYMENT, 1),
        seen(P.FAILED, 2),
        seen(P.AWAITING_PAYMENT, 3),
        seen(P.ACTION_REQUIRED, 4),
        seen(P.SUCCEEDED, 5),
    )
    assert final.status is S.PAID
    assert final.failures == 1
    assert [t.steps for t in ts] == [
        (AuditStep.PENDING,),
        (AuditStep.FAILED,),
        (AuditStep.PENDING,),
        (AuditStep.ACTION_REQUIRED,),
        (AuditStep.SUCCEEDED,),
    ]
    assert effects_of(ts) == [failed_effect(1), PAID_EFFECT]


# --- exhaustive ------------------------------------------------------------------------------


def _states_for(status: OrderStatus) -> list[OrderState]:
    refunded = {
        S.PARTIALLY_REFUNDED: (400,),
        S.REFUNDED: (AMOUNT,),
        S.NEEDS_REVIEW: (0, 400, AMOUNT),
    }
    reasons: tuple[ReviewReason | None, ...] = (
        tuple(ReviewReason) if status is S.NEEDS_REVIEW else (None,)
    )
    return [
        OrderState(
            status=status,
            amount=AMOUNT,
            currency="eur",
            payment_intent_id=intent,
            amount_refunded=total,
            dispute=dispute,
            review_reason=reason,
            observed_at=at,
            failures=failures,
        )
        for intent, total, dispute, reason, at, failures in itertools.product(
            (None, PI),
            refunded.get(status, (0,)),
            (DisputeStatus.NONE, DisputeStatus.OPEN, DisputeStatus.WON),
            reasons,
            (0, 10),
            (0, 2),
        )
    ]


OBSERVATIONS: list[Observation] = [
    *(
        PaymentObserved(phase, at, intent, amount=amount, currency=currency)
        for phase, at, intent, (amount, currency) in itertools.product(
            P,
            (0, 5, 10, 15),
            (None, PI, OTHER_PI),
            ((None, None), (AMOUNT, "eur"), (AMOUNT - 1, "eur"), (AMOUNT, "usd")),
        )
    ),
    *(
        RefundObserved(total, currency)
        for total, currency in itertools.product(
            (0, 200, 400, AMOUNT - 1, AMOUNT, AMOUNT + 500), (None, "eur", "usd")
        )
    ),
    *(DisputeObserved(s) for s in (DisputeStatus.OPEN, DisputeStatus.WON, DisputeStatus.LOST)),
    CancelRequested(),
    ReviewResolved(keep=True),
    ReviewResolved(keep=False),
]

_OUTCOME_STEPS = {
    Outcome.UNCHANGED: (),
    Outcome.STALE: (AuditStep.IGNORED_STALE,),
    Outcome.REFUSED: (AuditStep.REJECTED,),
}


@pytest.mark.parametrize("status", list(S))
def test_every_status_and_observation_stays_in_the_table_and_is_idempotent(
    status: OrderStatus,
) -> None:
    outcomes = set()
    for state in _states_for(status):
        for observation in OBSERVATIONS:
            t = apply(state, observation)
            outcomes.add(t.outcome)
            assert t.before == state
            assert t.after.status is status or t.after.status in TRANSITIONS[status]
            assert t.after.amount_refunded >= state.amount_refunded
            assert t.after.observed_at >= state.observed_at
            assert t.after.failures >= state.failures
            assert t.reason
            assert (t.outcome is Outcome.APPLIED) == t.changed
            if t.outcome is Outcome.APPLIED:
                if t.after.status is not status:
                    assert t.steps.count(STEP_FOR_STATUS[t.after.status]) == 1
            else:
                assert t.steps == _OUTCOME_STEPS[t.outcome]
                assert t.effects == ()
            if status in PAID_STATUSES:
                assert t.after.status in PAID_STATUSES
                assert RANK[t.after.status] >= RANK[status]
            if state.payment_intent_id is not None:
                assert t.after.payment_intent_id == state.payment_intent_id
            if PAID_EFFECT in t.effects:
                assert t.after.status in PAID_STATUSES
            again = apply(t.after, observation)
            assert not again.changed
            assert again.effects == ()
            if t.outcome is Outcome.APPLIED:
                assert again.outcome is Outcome.UNCHANGED
                assert again.steps == ()
            else:
                assert again == t
    # Every status meets more than one kind of answer: the loop above is not vacuous.
    assert len(outcomes) >= 2


# --- resolving a review ------------------------------------------------------------------------


def test_keeping_the_payment_of_a_reviewed_order_pays_and_fulfils_it() -> None:
    t = apply(order(S.NEEDS_REVIEW), ReviewResolved(keep=True))
    assert (t.outcome, t.after.status, t.after.review_reason) == (Outcome.APPLIED, S.PAID, None)
    assert t.steps == (AuditStep.SUCCEEDED,)
    assert t.effects == (Effect(EffectTrigger.PAID, "paid"),)
    assert apply(t.after, ReviewResolved(keep=True)).outcome is Outcome.UNCHANGED


def test_keeping_a_partly_refunded_payment_records_both() -> None:
    t = apply(order(S.NEEDS_REVIEW, amount_refunded=400), ReviewResolved(keep=True))
    assert t.after.status is S.PARTIALLY_REFUNDED
    assert t.steps == (AuditStep.SUCCEEDED, AuditStep.PARTIALLY_REFUNDED)
    assert t.effects == (
        Effect(EffectTrigger.PAID, "paid"),
        Effect(EffectTrigger.REFUNDED, "refund:400"),
    )


def test_a_review_closes_as_refunded_only_once_refunded_in_full() -> None:
    early = apply(order(S.NEEDS_REVIEW, amount_refunded=400), ReviewResolved(keep=False))
    assert (early.outcome, early.reason) == (Outcome.REFUSED, "not refunded in full yet")
    t = apply(order(S.NEEDS_REVIEW, amount_refunded=AMOUNT), ReviewResolved(keep=False))
    assert (t.after.status, t.steps) == (S.REFUNDED, (AuditStep.REFUNDED,))
    assert t.effects == (Effect(EffectTrigger.REFUNDED, f"refund:{AMOUNT}"),)
    assert apply(t.after, ReviewResolved(keep=False)).outcome is Outcome.UNCHANGED
    kept = apply(order(S.NEEDS_REVIEW, amount_refunded=AMOUNT), ReviewResolved(keep=True))
    assert (kept.outcome, kept.reason) == (
        Outcome.REFUSED,
        "nothing left to keep: refunded in full",
    )


@pytest.mark.parametrize(
    ("status", "keep", "outcome"),
    [
        (S.CREATED, True, Outcome.REFUSED),
        (S.CANCELED, True, Outcome.REFUSED),
        (S.PAID, False, Outcome.REFUSED),
        (S.PAID, True, Outcome.UNCHANGED),
        (S.PARTIALLY_REFUNDED, True, Outcome.UNCHANGED),
    ],
)
def test_a_decision_without_an_open_review(
    status: OrderStatus, keep: bool, outcome: Outcome
) -> None:
    refunded = {"amount_refunded": 400} if status is S.PARTIALLY_REFUNDED else {}
    t = apply(order(status, **refunded), ReviewResolved(keep=keep))
    assert (t.outcome, t.reason, t.effects) == (outcome, "no review open", ())


def test_moved_ignores_a_refreshed_observation_time() -> None:
    state = order(S.PROCESSING, observed_at=5)
    assert not moved(state, replace(state, observed_at=9))
    assert moved(state, replace(state, status=S.PAID))
    assert moved(state, replace(state, payment_intent_id=PI))
