from __future__ import annotations

from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from idempay.core.audit import AuditStep
from idempay.core.orders import (
    PAID_STATUSES,
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
    ReviewResolved,
    apply,
    new_order,
)

P = PaymentPhase
AMOUNTS = (500, 1000)
CURRENCIES = ("eur", "usd")
INTENTS = (None, "pi_1", "pi_2")

observations = st.one_of(
    st.builds(
        PaymentObserved,
        phase=st.sampled_from(P),
        observed_at=st.integers(0, 30),
        payment_intent_id=st.sampled_from(INTENTS),
        amount=st.sampled_from((None, *AMOUNTS)),
        currency=st.sampled_from((None, *CURRENCIES)),
    ),
    st.builds(
        RefundObserved,
        amount_refunded=st.integers(0, 1200),
        currency=st.sampled_from((None, *CURRENCIES)),
    ),
    st.builds(
        DisputeObserved,
        status=st.sampled_from((DisputeStatus.OPEN, DisputeStatus.WON, DisputeStatus.LOST)),
    ),
    st.just(CancelRequested()),
    st.builds(ReviewResolved, keep=st.booleans()),
)


def _mismatched_success(state: OrderState, observation: Observation) -> bool:
    """Whether ``observation`` is a success that does not fit the order (judged independently)."""
    if not isinstance(observation, PaymentObserved) or observation.phase is not P.SUCCEEDED:
        return False
    return (
        observation.currency not in (None, state.currency)
        or observation.amount not in (None, state.amount)
        or (
            observation.payment_intent_id is not None
            and state.payment_intent_id not in (None, observation.payment_intent_id)
        )
    )


class OrderLife(RuleBasedStateMachine):
    """Random observations, of every kind and in any order, against one order."""

    def __init__(self) -> None:
        super().__init__()
        self.state: OrderState | None = None
        self.effects: set[Effect] = set()
        self.mismatch_seen = False
        self.resolved = False

    @initialize(amount=st.sampled_from(AMOUNTS), currency=st.sampled_from(CURRENCIES))
    def create(self, amount: int, currency: str) -> None:
        created = new_order(amount=amount, currency=currency)
        assert created.steps == (AuditStep.STARTED,)
        self.state = created.after

    @rule(observation=observations)
    def observe(self, observation: Observation) -> None:
        before = self.state
        assert before is not None
        t = apply(before, observation)
        assert t.before == before
        assert t.after.status is before.status or t.after.status in TRANSITIONS[before.status]
        assert (t.outcome is Outcome.APPLIED) == t.changed
        if before.status in PAID_STATUSES:
            # A paid order only moves on through refunds.
            assert t.after.status in PAID_STATUSES
            assert RANK[t.after.status] >= RANK[before.status]
        assert t.after.amount_refunded >= before.amount_refunded
        if t.after.status is not before.status:
            assert t.steps.count(STEP_FOR_STATUS[t.after.status]) == 1
        if t.outcome is not Outcome.APPLIED:
            assert t.effects == ()
        # No effect is ever produced twice over the life of the order.
        for effect in t.effects:
            assert effect not in self.effects
            self.effects.add(effect)
        paid = Effect(EffectTrigger.PAID, "paid")
        kept = isinstance(observation, ReviewResolved) and observation.keep
        if (_mismatched_success(before, observation) or self.mismatch_seen) and not kept:
            # Money that did not fit is fulfilled only by an operator's decision to keep it.
            assert paid not in t.effects
        if isinstance(observation, ReviewResolved) and t.changed:
            self.resolved = True
        if _mismatched_success(before, observation):
            self.mismatch_seen = True
        # Applying the same observation again changes nothing.
        again = apply(t.after, observation)
        assert not again.changed
        assert again.effects == ()
        if t.outcome is Outcome.APPLIED:
            assert again.outcome is Outcome.UNCHANGED
            assert again.steps == ()
        self.state = t.after

    @invariant()
    def effects_match_the_state(self) -> None:
        state = self.state
        if state is None:
            return
        # Refunds only ever land on a paid order or one under review.
        if state.amount_refunded:
            assert state.status in PAID_STATUSES or state.status is OrderStatus.NEEDS_REVIEW
        # Fulfilment was justified only for an order that stays paid.
        if Effect(EffectTrigger.PAID, "paid") in self.effects:
            assert state.status in PAID_STATUSES
        if Effect(EffectTrigger.CANCELED, "canceled") in self.effects and not self.resolved:
            # Only an operator may honour (or settle) an order canceled before its money came.
            assert state.status in {OrderStatus.CANCELED, OrderStatus.NEEDS_REVIEW}


TestOrderLife = OrderLife.TestCase
TestOrderLife.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)


# --- order independence ----------------------------------------------------------------------

PI = "pi_1"


@st.composite
def stripe_histories(draw: st.DrawFn) -> tuple[int, list[Observation]]:
    """One PaymentIntent's history, in the order it happened.

    Attempts may fail and be retried; the history ends in at most one success or cancel; after
    a success come refunds (increasing cumulative totals up to the amount) and at most one
    dispute, opened then closed.
    """
    amount = draw(st.integers(1, 5000))
    history: list[Observation] = []
    clock = 0

    def phase(p: PaymentPhase) -> None:
        nonlocal clock
        clock += draw(st.integers(1, 3))
        history.append(PaymentObserved(p, clock, PI, amount=amount, currency="eur"))

    if draw(st.booleans()):
        phase(P.AWAITING_PAYMENT)
    ending = "in_flight"
    for _ in range(draw(st.integers(0, 4))):
        path = draw(st.sampled_from(("card", "3ds", "debit", "manual")))
        if path == "3ds":
            phase(P.ACTION_REQUIRED)
        elif path == "debit":
            # The reconciler may poll a debit still processing several times.
            for _ in range(draw(st.integers(1, 3))):
                phase(P.PROCESSING)
        elif path == "manual":
            phase(P.AUTHORIZED)
        ending = draw(st.sampled_from(("failed", "succeeded", "canceled", "in_flight")))
        if ending == "canceled" and path == "debit":
            ending = "failed"
        if ending == "failed":
            phase(P.FAILED)
            if draw(st.booleans()):
                # The PaymentIntent is back in requires_payment_method.
                phase(P.AWAITING_PAYMENT)
            continue
        break
    if ending == "canceled":
        phase(P.CANCELED)
    if ending == "succeeded":
        phase(P.SUCCEEDED)
        refunds: list[Observation] = [
            RefundObserved(total, currency="eur")
            for total in sorted(
                draw(st.sets(st.integers(1, amount), max_size=3)),
            )
        ]
        dispute: list[Observation] = [
            DisputeObserved(s)
            for s in draw(
                st.sampled_from(
                    (
                        (),
                        (DisputeStatus.OPEN,),
                        (DisputeStatus.OPEN, DisputeStatus.WON),
                        (DisputeStatus.OPEN, DisputeStatus.LOST),
                    )
                )
            )
        ]
        # Refunds and the dispute interleave in any way that keeps each in its own order.
        while refunds or dispute:
            source = refunds if not dispute or (refunds and draw(st.booleans())) else dispute
            history.append(source.pop(0))
    return amount, history


def _deliver(amount: int, observations: list[Observation]) -> tuple[OrderState, list[Effect]]:
    state = new_order(amount=amount, currency="eur").after
    effects: list[Effect] = []
    for observation in observations:
        t = apply(state, observation)
        state = t.after
        effects.extend(t.effects)
    return state, effects


def _kind(effects: list[Effect], trigger: EffectTrigger) -> set[Effect]:
    return {e for e in effects if e.trigger is trigger}


@settings(max_examples=400, deadline=None)
@given(data=st.data())
def test_delivery_order_does_not_change_the_outcome(data: st.DataObject) -> None:
    amount, history = data.draw(stripe_histories())
    duplicates = data.draw(st.lists(st.sampled_from(history), max_size=5)) if history else []
    delivery = data.draw(st.permutations(history + duplicates))

    expected, expected_effects = _deliver(amount, history)
    final, effects = _deliver(amount, delivery)

    # In order, every effect is produced once.
    assert len(expected_effects) == len(set(expected_effects))
    assert len(effects) == len(set(effects))

    # The final state is the same, except for the number of failures applied: a failure
    # delivered after a newer observation is stale (W3), so it is not counted.
    assert replace(final, failures=0) == replace(expected, failures=0)
    assert final.failures <= expected.failures

    # The effects are the same, except for superseded failures and refund totals: both are
    # observed as "the latest", so an older one delivered late is stale.
    order_free = set(EffectTrigger) - {EffectTrigger.PAYMENT_FAILED, EffectTrigger.REFUNDED}
    assert {e for e in effects if e.trigger in order_free} == {
        e for e in expected_effects if e.trigger in order_free
    }
    assert _kind(effects, EffectTrigger.PAYMENT_FAILED) == {
        Effect(EffectTrigger.PAYMENT_FAILED, f"failed:{n}") for n in range(1, final.failures + 1)
    }
    refunds = _kind(effects, EffectTrigger.REFUNDED)
    assert refunds <= _kind(expected_effects, EffectTrigger.REFUNDED)
    if expected.amount_refunded:
        # The latest total is always applied, whatever came before it.
        assert Effect(EffectTrigger.REFUNDED, f"refund:{expected.amount_refunded}") in refunds


@given(history=stripe_histories())
def test_in_order_delivery_applies_every_failure_and_refund(
    history: tuple[int, list[Observation]],
) -> None:
    amount, observations = history
    final, effects = _deliver(amount, observations)
    failures = sum(
        1 for o in observations if isinstance(o, PaymentObserved) and o.phase is P.FAILED
    )
    refunds = [o for o in observations if isinstance(o, RefundObserved)]
    assert final.failures == failures
    assert len(_kind(effects, EffectTrigger.PAYMENT_FAILED)) == failures
    assert len(_kind(effects, EffectTrigger.REFUNDED)) == len(refunds)
    succeeded = any(isinstance(o, PaymentObserved) and o.phase is P.SUCCEEDED for o in observations)
    assert (Effect(EffectTrigger.PAID, "paid") in effects) == succeeded
    assert final.payment_intent_id == (PI if observations else None)
