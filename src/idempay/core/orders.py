"""The order state machine, as data and one pure function.

Everything that can reach an order (a webhook event, a synchronous API response, the
reconciler's fetch of a PaymentIntent, a local cancel) is first reduced to an
:data:`Observation`; :func:`apply` then decides what it does to the order's
:class:`OrderState` and returns a :class:`Transition`: the state after, an :class:`Outcome`, the
audit steps to record and the side effects (outbox rows) the change justifies.

The decisions are driven by tables, so that the documentation can print them
(:func:`transition_table_markdown`) and the tests can check them exhaustively:

* :data:`RANK` orders the payment statuses; newer observations win, and within one second the
  higher rank wins, so the delivery order of webhook events does not matter.
* :data:`PHASE_STATUS` maps what was observed of the payment to the order status it implies.
* :data:`STEP_FOR_STATUS` names the audit step recorded on entering a status.
* :data:`TRANSITIONS` lists every move :func:`apply` may make; it never makes another.
* :data:`LOCAL_CANCEL_OUTCOMES` says what a local cancel does in each status.

The rules, in short: success dominates (a success moves any order that was not yet paid to
``paid``, whatever its time), failure is not terminal (a newer attempt supersedes it), a paid
order only moves on through refunds, refunds are cumulative and never decrease, money that
arrives after a cancel or does not match the order goes to ``needs_review`` (never fulfilled),
disputes are an overlay, and applying an observation twice changes nothing the second time.

The Stripe tables at the end (:data:`INTENT_STATUS_PHASES`, :data:`EVENT_TYPE_PHASES`) say
which :class:`PaymentPhase` a PaymentIntent status or an event type stands for.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from enum import StrEnum
from types import MappingProxyType
from typing import Final, TypeAlias, assert_never

from idempay.core.audit import AuditStep
from idempay.errors import ConfigurationError

__all__ = [
    "EVENT_TYPE_PHASES",
    "INTENT_STATUS_EVENT_TYPES",
    "INTENT_STATUS_PHASES",
    "LOCAL_CANCEL_OUTCOMES",
    "PAID_STATUSES",
    "PHASE_STATUS",
    "PRE_SUCCESS_STATUSES",
    "RANK",
    "STEP_FOR_STATUS",
    "TRANSITIONS",
    "CancelRequested",
    "DisputeObserved",
    "DisputeStatus",
    "Effect",
    "EffectTrigger",
    "Observation",
    "OrderState",
    "OrderStatus",
    "Outcome",
    "PaymentObserved",
    "PaymentPhase",
    "RefundObserved",
    "ReviewReason",
    "ReviewResolved",
    "Transition",
    "apply",
    "moved",
    "new_order",
    "phase_for_event_type",
    "phase_for_intent_status",
    "resolved_statuses",
    "transition_table_markdown",
]


# --- values ----------------------------------------------------------------------------------


class OrderStatus(StrEnum):
    """The main status of an order. The values are stable: they are stored and exported."""

    CREATED = "created"
    """Recorded by a checkout; no PaymentIntent observed yet."""
    AWAITING_PAYMENT = "awaiting_payment"
    """A PaymentIntent waits for a payment method or a confirmation."""
    ACTION_REQUIRED = "action_required"
    """The customer must authenticate (3-D Secure, redirect, micro-deposits)."""
    PROCESSING = "processing"
    """A payment was submitted; its outcome is pending (bank debits: days)."""
    AUTHORIZED = "authorized"
    """Funds are held and wait for a capture (manual capture only)."""
    PAID = "paid"
    """The payment succeeded: the only status that justifies fulfilment."""
    PAYMENT_FAILED = "payment_failed"
    """The last attempt failed; the customer may try again."""
    CANCELED = "canceled"
    """Canceled (locally or at Stripe) before any success."""
    PARTIALLY_REFUNDED = "partially_refunded"
    """Paid, then part of the amount was refunded."""
    REFUNDED = "refunded"
    """Paid, then the whole amount was refunded."""
    NEEDS_REVIEW = "needs_review"
    """A human must decide (money after a cancel, a mismatch); see :class:`ReviewReason`."""


class DisputeStatus(StrEnum):
    """The dispute overlay: it never changes the main status."""

    NONE = "none"
    OPEN = "open"
    WON = "won"
    LOST = "lost"


class PaymentPhase(StrEnum):
    """What was observed of the payment, whatever the source of the observation."""

    AWAITING_PAYMENT = "awaiting_payment"
    ACTION_REQUIRED = "action_required"
    PROCESSING = "processing"
    AUTHORIZED = "authorized"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"


class ReviewReason(StrEnum):
    """Why an order is in ``needs_review``."""

    SUCCEEDED_AFTER_CANCEL = "succeeded_after_cancel"
    """Money arrived (a success, a refund) for an order that was already canceled."""
    AMOUNT_MISMATCH = "amount_mismatch"
    """The payment's amount is not the order's."""
    CURRENCY_MISMATCH = "currency_mismatch"
    """The payment's currency is not the order's."""
    PAYMENT_INTENT_MISMATCH = "payment_intent_mismatch"
    """A success for another PaymentIntent than the one recorded for the order."""


class Outcome(StrEnum):
    """What :func:`apply` did with an observation."""

    APPLIED = "applied"
    """The state changed (``Transition.changed`` is true)."""
    UNCHANGED = "unchanged"
    """The observation says nothing new: no change, no audit step, no effect."""
    STALE = "stale"
    """Older than, or regressing from, the state: ignored, audited as ``ignored_stale``."""
    REFUSED = "refused"
    """A local request the state forbids (a cancel while a debit is in flight): audited as
    ``rejected``, nothing changed."""


class EffectTrigger(StrEnum):
    """The kind of side effect a transition justifies (one outbox row each)."""

    PAID = "paid"
    PAYMENT_FAILED = "payment_failed"
    CANCELED = "canceled"
    REFUNDED = "refunded"
    NEEDS_REVIEW = "needs_review"
    DISPUTE_OPENED = "dispute_opened"
    DISPUTE_CLOSED = "dispute_closed"


_CURRENCY: Final = re.compile(r"[a-z]{3}")


def _check_int(value: object, where: str, *, minimum: int) -> None:
    # bool is an int subclass: True would pass as an amount of 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigurationError(f"{where} must be an integer")
    if value < minimum:
        qualifier = "positive" if minimum > 0 else "zero or positive"
        raise ConfigurationError(f"{where} must be {qualifier}")


def _check_currency(value: object, where: str) -> None:
    if not isinstance(value, str) or _CURRENCY.fullmatch(value) is None:
        raise ConfigurationError(f"{where} must be a lowercase three-letter ISO currency code")


def _check_intent_id(value: object, where: str) -> None:
    if value is not None and (not isinstance(value, str) or not value):
        raise ConfigurationError(f"{where} must be None or a non-empty string")


@dataclass(frozen=True, slots=True)
class OrderState:
    """Everything the state machine knows about one order.

    Raises:
        ConfigurationError: a field is out of its domain (``amount`` not positive, a currency
            that is not three lowercase letters, a negative count or time), or
            ``review_reason`` is set without ``needs_review`` (or missing with it).
    """

    status: OrderStatus
    amount: int
    """The order's amount in minor units (> 0)."""
    currency: str
    """Lowercase ISO 4217 code."""
    payment_intent_id: str | None = None
    amount_refunded: int = 0
    """Cumulative refunded amount in minor units; never decreases."""
    dispute: DisputeStatus = DisputeStatus.NONE
    review_reason: ReviewReason | None = None
    observed_at: int = 0
    """Unix seconds of the newest payment-phase observation applied."""
    failures: int = 0
    """Failed attempts applied so far (numbers the ``payment_failed`` effects)."""

    def __post_init__(self) -> None:
        _check_int(self.amount, "OrderState.amount", minimum=1)
        _check_currency(self.currency, "OrderState.currency")
        _check_intent_id(self.payment_intent_id, "OrderState.payment_intent_id")
        _check_int(self.amount_refunded, "OrderState.amount_refunded", minimum=0)
        _check_int(self.observed_at, "OrderState.observed_at", minimum=0)
        _check_int(self.failures, "OrderState.failures", minimum=0)
        if (self.review_reason is None) == (self.status is OrderStatus.NEEDS_REVIEW):
            raise ConfigurationError(
                "OrderState.review_reason must be set exactly when the status is needs_review"
            )


@dataclass(frozen=True, slots=True)
class PaymentObserved:
    """A payment phase, seen in a webhook event, an API response or a fetched PaymentIntent.

    ``observed_at`` is the event's ``created`` time, or the time the PaymentIntent was fetched.
    ``amount`` and ``currency`` are the PaymentIntent's when known; a success whose amount or
    currency differs from the order's goes to review.

    Raises:
        ConfigurationError: a negative time or amount, a malformed currency, an empty id.
    """

    phase: PaymentPhase
    observed_at: int
    payment_intent_id: str | None = None
    amount: int | None = None
    currency: str | None = None

    def __post_init__(self) -> None:
        _check_int(self.observed_at, "PaymentObserved.observed_at", minimum=0)
        _check_intent_id(self.payment_intent_id, "PaymentObserved.payment_intent_id")
        if self.amount is not None:
            _check_int(self.amount, "PaymentObserved.amount", minimum=0)
        if self.currency is not None:
            _check_currency(self.currency, "PaymentObserved.currency")


@dataclass(frozen=True, slots=True)
class RefundObserved:
    """The cumulative refunded amount of the order's charge (``Charge.amount_refunded``).

    Raises:
        ConfigurationError: a negative amount or a malformed currency.
    """

    amount_refunded: int
    currency: str | None = None

    def __post_init__(self) -> None:
        _check_int(self.amount_refunded, "RefundObserved.amount_refunded", minimum=0)
        if self.currency is not None:
            _check_currency(self.currency, "RefundObserved.currency")


@dataclass(frozen=True, slots=True)
class DisputeObserved:
    """A dispute on the order's charge: opened, or closed as won or lost.

    Raises:
        ConfigurationError: ``status`` is ``none`` (there is nothing to observe).
    """

    status: DisputeStatus

    def __post_init__(self) -> None:
        if self.status is DisputeStatus.NONE:
            raise ConfigurationError("DisputeObserved.status must be open, won or lost")


@dataclass(frozen=True, slots=True)
class CancelRequested:
    """A local cancel (a user, an operator, an expiry job), as opposed to Stripe's.

    It never cancels a payment in flight: from ``processing`` it is refused, and the engine
    must ask Stripe (cancel the PaymentIntent, apply what Stripe answers) instead.
    """


@dataclass(frozen=True, slots=True)
class ReviewResolved:
    """An operator's decision on an order in ``needs_review``, taken after looking at Stripe.

    ``keep``: the payment is kept and the order honoured: ``paid`` (or ``partially_refunded``
    when part of it was refunded during the review), with the ``paid`` effect, so that it is
    fulfilled. Otherwise the money went back to the customer: the refund, made at Stripe, must
    have been recorded in full (refund events are applied during a review), and the order
    becomes ``refunded``. Anything else is refused, and so is a decision on an order that is
    not under review, unless it already stands where that decision leads (a repeat).
    """

    keep: bool


Observation: TypeAlias = (
    PaymentObserved | RefundObserved | DisputeObserved | CancelRequested | ReviewResolved
)
"""Everything that can reach an order, reduced to what the state machine needs."""


@dataclass(frozen=True, slots=True)
class Effect:
    """A side effect a transition justifies: one outbox row.

    ``(order, trigger, discriminator)`` identifies one real effect: :func:`apply` never
    produces the same pair twice over the life of an order.
    """

    trigger: EffectTrigger
    discriminator: str


@dataclass(frozen=True, slots=True)
class Transition:
    """The result of :func:`new_order` or :func:`apply`.

    ``steps`` are the audit steps to record, in order; ``effects`` the outbox rows to write, in
    the same transaction as ``after``. ``reason`` is a short stable phrase for the audit
    details (it never contains an id or an amount).
    """

    before: OrderState
    after: OrderState
    outcome: Outcome
    steps: tuple[AuditStep, ...]
    effects: tuple[Effect, ...]
    reason: str

    @property
    def changed(self) -> bool:
        """Whether ``after`` differs from ``before`` (the engine writes only then)."""
        return self.after != self.before


# --- tables ----------------------------------------------------------------------------------

_S = OrderStatus

RANK: Final[Mapping[OrderStatus, int]] = MappingProxyType(
    {
        _S.CREATED: 0,
        _S.AWAITING_PAYMENT: 10,
        _S.ACTION_REQUIRED: 20,
        _S.PROCESSING: 30,
        _S.AUTHORIZED: 40,
        _S.PAYMENT_FAILED: 45,
        _S.PAID: 50,
        _S.PARTIALLY_REFUNDED: 60,
        _S.REFUNDED: 70,
    }
)
"""Order of the payment statuses; ``canceled`` and ``needs_review`` have explicit rules."""

PRE_SUCCESS_STATUSES: Final = frozenset(
    {
        _S.CREATED,
        _S.AWAITING_PAYMENT,
        _S.ACTION_REQUIRED,
        _S.PROCESSING,
        _S.AUTHORIZED,
        _S.PAYMENT_FAILED,
    }
)
"""Statuses in which no success has been observed yet: a success moves them to ``paid``."""

PAID_STATUSES: Final = frozenset({_S.PAID, _S.PARTIALLY_REFUNDED, _S.REFUNDED})
"""Statuses reached through a success; an order leaves them only through refunds."""

PHASE_STATUS: Final[Mapping[PaymentPhase, OrderStatus]] = MappingProxyType(
    {
        PaymentPhase.AWAITING_PAYMENT: _S.AWAITING_PAYMENT,
        PaymentPhase.ACTION_REQUIRED: _S.ACTION_REQUIRED,
        PaymentPhase.PROCESSING: _S.PROCESSING,
        PaymentPhase.AUTHORIZED: _S.AUTHORIZED,
        PaymentPhase.SUCCEEDED: _S.PAID,
        PaymentPhase.FAILED: _S.PAYMENT_FAILED,
        PaymentPhase.CANCELED: _S.CANCELED,
    }
)
"""The status each observed payment phase leads to (when the rules let it apply)."""

STEP_FOR_STATUS: Final[Mapping[OrderStatus, AuditStep]] = MappingProxyType(
    {
        _S.CREATED: AuditStep.STARTED,
        _S.AWAITING_PAYMENT: AuditStep.PENDING,
        _S.ACTION_REQUIRED: AuditStep.ACTION_REQUIRED,
        _S.PROCESSING: AuditStep.PROCESSING,
        _S.AUTHORIZED: AuditStep.AUTHORIZED,
        _S.PAID: AuditStep.SUCCEEDED,
        _S.PAYMENT_FAILED: AuditStep.FAILED,
        _S.CANCELED: AuditStep.CANCELED,
        _S.PARTIALLY_REFUNDED: AuditStep.PARTIALLY_REFUNDED,
        _S.REFUNDED: AuditStep.REFUNDED,
        _S.NEEDS_REVIEW: AuditStep.NEEDS_REVIEW,
    }
)
"""The audit step recorded when an order enters each status."""

# Any attempt phase may follow any other (a retry after a failure, a capture after an
# authorisation); a refund seen before the success implies the success, hence the refund
# statuses; money that does not fit goes to review.
_FROM_PRE_SUCCESS: Final = frozenset(
    {
        _S.AWAITING_PAYMENT,
        _S.ACTION_REQUIRED,
        _S.PROCESSING,
        _S.AUTHORIZED,
        _S.PAYMENT_FAILED,
        _S.PAID,
        _S.PARTIALLY_REFUNDED,
        _S.REFUNDED,
        _S.CANCELED,
        _S.NEEDS_REVIEW,
    }
)

TRANSITIONS: Final[Mapping[OrderStatus, frozenset[OrderStatus]]] = MappingProxyType(
    {
        _S.CREATED: _FROM_PRE_SUCCESS,
        _S.AWAITING_PAYMENT: _FROM_PRE_SUCCESS - {_S.AWAITING_PAYMENT},
        _S.ACTION_REQUIRED: _FROM_PRE_SUCCESS - {_S.ACTION_REQUIRED},
        _S.PROCESSING: _FROM_PRE_SUCCESS - {_S.PROCESSING},
        _S.AUTHORIZED: _FROM_PRE_SUCCESS - {_S.AUTHORIZED},
        _S.PAYMENT_FAILED: _FROM_PRE_SUCCESS - {_S.PAYMENT_FAILED},
        _S.PAID: frozenset({_S.PARTIALLY_REFUNDED, _S.REFUNDED}),
        _S.PARTIALLY_REFUNDED: frozenset({_S.REFUNDED}),
        _S.REFUNDED: frozenset(),
        _S.CANCELED: frozenset({_S.NEEDS_REVIEW}),
        # Only an operator resolves a review (ReviewResolved).
        _S.NEEDS_REVIEW: frozenset({_S.PAID, _S.PARTIALLY_REFUNDED, _S.REFUNDED}),
    }
)
"""Every status an order may move to from each status (staying put is always allowed)."""

LOCAL_CANCEL_OUTCOMES: Final[Mapping[OrderStatus, Outcome]] = MappingProxyType(
    {
        _S.CREATED: Outcome.APPLIED,
        _S.AWAITING_PAYMENT: Outcome.APPLIED,
        _S.ACTION_REQUIRED: Outcome.APPLIED,
        # A bank debit in flight may still succeed: only Stripe can cancel it.
        _S.PROCESSING: Outcome.REFUSED,
        _S.AUTHORIZED: Outcome.APPLIED,
        _S.PAID: Outcome.REFUSED,
        _S.PAYMENT_FAILED: Outcome.APPLIED,
        _S.CANCELED: Outcome.UNCHANGED,
        _S.PARTIALLY_REFUNDED: Outcome.REFUSED,
        _S.REFUNDED: Outcome.REFUSED,
        _S.NEEDS_REVIEW: Outcome.REFUSED,
    }
)
"""What a :class:`CancelRequested` does in each status (``applied`` moves to ``canceled``)."""

_CANCEL_REFUSAL_REASONS: Final[Mapping[OrderStatus, str]] = MappingProxyType(
    {
        _S.PROCESSING: "payment in flight",
        _S.PAID: "cancel after success",
        _S.PARTIALLY_REFUNDED: "cancel after success",
        _S.REFUNDED: "cancel after success",
        _S.NEEDS_REVIEW: "order under review",
    }
)

_DISPUTE_RANK: Final[Mapping[DisputeStatus, int]] = MappingProxyType(
    {DisputeStatus.NONE: 0, DisputeStatus.OPEN: 1, DisputeStatus.WON: 2, DisputeStatus.LOST: 2}
)


# --- the machine -----------------------------------------------------------------------------


def new_order(*, amount: int, currency: str) -> Transition:
    """Return the transition that creates an order: status ``created``, audit step ``started``.

    There is no state before creation: ``before`` is the new state itself, so ``changed`` is
    false although the outcome is ``applied``; the engine inserts ``after``.

    Raises:
        ConfigurationError: ``amount`` is not a positive integer or ``currency`` is not a
            lowercase three-letter code.
    """
    state = OrderState(status=OrderStatus.CREATED, amount=amount, currency=currency)
    return Transition(
        before=state,
        after=state,
        outcome=Outcome.APPLIED,
        steps=(STEP_FOR_STATUS[OrderStatus.CREATED],),
        effects=(),
        reason="order created",
    )


def apply(state: OrderState, observation: Observation) -> Transition:
    """Decide what ``observation`` does to an order in ``state``.

    Guarantees (all tested exhaustively):

    * ``after.status`` is ``before.status`` or one of ``TRANSITIONS[before.status]``.
    * The outcome is ``applied`` exactly when the state changed; effects come only with it.
      ``stale`` carries the single step ``ignored_stale``, ``refused`` the single step
      ``rejected``, ``unchanged`` none.
    * A move to a new status carries that status's :data:`STEP_FOR_STATUS` step exactly once.
    * Applying the same observation to ``after`` again is ``unchanged`` when this one was
      applied, and changes nothing otherwise.
    * An effect ``(trigger, discriminator)`` is never produced twice for one order, and a
      success that does not match the order never produces the ``paid`` effect.

    Nothing is raised here: invalid values are refused with :class:`ConfigurationError` when the
    :class:`OrderState` or the observation is built.
    """
    match observation:
        case PaymentObserved():
            return _apply_payment(state, observation)
        case RefundObserved():
            return _apply_refund(state, observation)
        case DisputeObserved():
            return _apply_dispute(state, observation)
        case CancelRequested():
            return _apply_local_cancel(state)
        case ReviewResolved():
            return _apply_resolution(state, keep=observation.keep)
        case _:
            assert_never(observation)


def moved(before: OrderState, after: OrderState) -> bool:
    """Whether ``after`` says more than ``before`` beyond the time of the latest observation
    (a poll that finds a debit still processing only refreshes that time)."""
    return replace(after, observed_at=before.observed_at) != before


def _applied(
    before: OrderState,
    after: OrderState,
    reason: str,
    steps: tuple[AuditStep, ...] = (),
    effects: tuple[Effect, ...] = (),
) -> Transition:
    return Transition(before, after, Outcome.APPLIED, steps, effects, reason)


def _unchanged(state: OrderState, reason: str) -> Transition:
    return Transition(state, state, Outcome.UNCHANGED, (), (), reason)


def _stale(state: OrderState, reason: str) -> Transition:
    return Transition(state, state, Outcome.STALE, (AuditStep.IGNORED_STALE,), (), reason)


def _refused(state: OrderState, reason: str) -> Transition:
    return Transition(state, state, Outcome.REFUSED, (AuditStep.REJECTED,), (), reason)


def _not_newer(state: OrderState, *, same: bool, what: str) -> Transition:
    if same:
        return _unchanged(state, f"same {what}")
    return _stale(state, f"older {what}")


def _to_review(
    state: OrderState, reason: ReviewReason, *, observed_at: int, intent: str | None, refunded: int
) -> Transition:
    after = replace(
        state,
        status=OrderStatus.NEEDS_REVIEW,
        review_reason=reason,
        observed_at=observed_at,
        payment_intent_id=intent,
        amount_refunded=refunded,
    )
    return _applied(
        state,
        after,
        f"needs review: {reason.value}",
        (AuditStep.NEEDS_REVIEW,),
        (Effect(EffectTrigger.NEEDS_REVIEW, "needs_review"),),
    )


def _intent_conflicts(state: OrderState, obs: PaymentObserved) -> bool:
    return (
        obs.payment_intent_id is not None
        and state.payment_intent_id is not None
        and obs.payment_intent_id != state.payment_intent_id
    )


def _recorded_intent(state: OrderState, obs: PaymentObserved) -> str | None:
    return state.payment_intent_id or obs.payment_intent_id


def _money_mismatch(state: OrderState, obs: PaymentObserved) -> ReviewReason | None:
    # The order of the checks is part of the contract: the first mismatch names the review.
    if obs.currency is not None and obs.currency != state.currency:
        return ReviewReason.CURRENCY_MISMATCH
    if obs.amount is not None and obs.amount != state.amount:
        return ReviewReason.AMOUNT_MISMATCH
    if _intent_conflicts(state, obs):
        return ReviewReason.PAYMENT_INTENT_MISMATCH
    return None


def _closed_to_payments(state: OrderState) -> str | None:
    """Why a payment observation cannot move ``state`` at all, or None if it can."""
    if state.status in PAID_STATUSES:
        return "payment phase after success"
    if state.status is OrderStatus.CANCELED:
        return "payment phase after cancel"
    if state.status is OrderStatus.NEEDS_REVIEW:
        return "order under review"
    return None


def _apply_payment(state: OrderState, obs: PaymentObserved) -> Transition:
    match obs.phase:
        case PaymentPhase.SUCCEEDED:
            return _apply_success(state, obs)
        case PaymentPhase.CANCELED:
            return _apply_stripe_cancel(state, obs)
        case (
            PaymentPhase.AWAITING_PAYMENT
            | PaymentPhase.ACTION_REQUIRED
            | PaymentPhase.PROCESSING
            | PaymentPhase.AUTHORIZED
            | PaymentPhase.FAILED
        ):
            return _apply_attempt(state, obs)
        case _:
            assert_never(obs.phase)


def _apply_attempt(state: OrderState, obs: PaymentObserved) -> Transition:
    target = PHASE_STATUS[obs.phase]
    closed = _closed_to_payments(state)
    if closed is None and _intent_conflicts(state, obs):
        closed = "another payment intent"
    if closed is not None:
        return _stale(state, closed)
    # Newer wins; within one second (Stripe's resolution) the higher rank wins. Every status
    # here is pre-success, so both ranks exist.
    if (obs.observed_at, RANK[target]) <= (state.observed_at, RANK[state.status]):
        return _not_newer(state, same=target is state.status, what="payment phase")
    failed = target is OrderStatus.PAYMENT_FAILED
    after = replace(
        state,
        status=target,
        observed_at=obs.observed_at,
        payment_intent_id=_recorded_intent(state, obs),
        failures=state.failures + 1 if failed else state.failures,
    )
    reason = "newer payment phase"
    steps: tuple[AuditStep, ...] = (STEP_FOR_STATUS[target],)
    effects: tuple[Effect, ...] = ()
    if failed:
        # A newer failure on a failed order is another attempt that failed.
        reason = "payment attempt failed"
        effects = (Effect(EffectTrigger.PAYMENT_FAILED, f"failed:{after.failures}"),)
    elif target is state.status:
        # Same status, newer time (a reconciler poll of a debit still processing): record the
        # time so that an older event arriving later is recognised as stale; nothing to audit.
        reason, steps = "payment phase refreshed", ()
    return _applied(state, after, reason, steps, effects)


def _apply_success(state: OrderState, obs: PaymentObserved) -> Transition:
    observed_at = max(state.observed_at, obs.observed_at)
    intent = _recorded_intent(state, obs)
    if state.status in PAID_STATUSES:
        return _confirm_success(state, obs, observed_at=observed_at, intent=intent)
    if state.status is OrderStatus.NEEDS_REVIEW:
        # The review already holds the money; another success adds nothing to decide on.
        return _unchanged(state, "order under review")
    review = (
        ReviewReason.SUCCEEDED_AFTER_CANCEL
        if state.status is OrderStatus.CANCELED
        else _money_mismatch(state, obs)
    )
    if review is not None:
        return _to_review(
            state, review, observed_at=observed_at, intent=intent, refunded=state.amount_refunded
        )
    after = replace(
        state, status=OrderStatus.PAID, observed_at=observed_at, payment_intent_id=intent
    )
    return _applied(
        state,
        after,
        "payment succeeded",
        (AuditStep.SUCCEEDED,),
        (Effect(EffectTrigger.PAID, "paid"),),
    )


def _confirm_success(
    state: OrderState, obs: PaymentObserved, *, observed_at: int, intent: str | None
) -> Transition:
    """A success seen again by an order already paid (possibly paid by an earlier refund)."""
    if _money_mismatch(state, obs) is not None:
        return _stale(state, "conflicting success after payment")
    # A refund delivered before the success paid the order without the success's details.
    after = replace(state, observed_at=observed_at, payment_intent_id=intent)
    if after == state:
        return _unchanged(state, "success already recorded")
    return _applied(state, after, "payment details recorded")


def _apply_stripe_cancel(state: OrderState, obs: PaymentObserved) -> Transition:
    if state.status is OrderStatus.CANCELED:
        return _unchanged(state, "already canceled")
    closed = _closed_to_payments(state)
    if closed is not None:
        return _stale(state, closed)
    if _intent_conflicts(state, obs):
        return _stale(state, "another payment intent")
    # Canceled is terminal at Stripe: it applies whatever its time.
    after = replace(
        state,
        status=OrderStatus.CANCELED,
        observed_at=max(state.observed_at, obs.observed_at),
        payment_intent_id=_recorded_intent(state, obs),
    )
    return _applied(
        state,
        after,
        "payment intent canceled",
        (AuditStep.CANCELED,),
        (Effect(EffectTrigger.CANCELED, "canceled"),),
    )


def _apply_local_cancel(state: OrderState) -> Transition:
    # The table holds only applied, unchanged and refused (checked by the tests).
    outcome = LOCAL_CANCEL_OUTCOMES[state.status]
    if outcome is Outcome.APPLIED:
        after = replace(state, status=OrderStatus.CANCELED)
        return _applied(
            state,
            after,
            "canceled locally",
            (AuditStep.CANCELED,),
            (Effect(EffectTrigger.CANCELED, "canceled"),),
        )
    if outcome is Outcome.UNCHANGED:
        return _unchanged(state, "already canceled")
    return _refused(state, _CANCEL_REFUSAL_REASONS[state.status])


def resolved_statuses(*, keep: bool) -> frozenset[OrderStatus]:
    """Where a :class:`ReviewResolved` decision leads: a payment kept is ``paid`` or
    ``partially_refunded``; one given back is ``refunded``."""
    return PAID_STATUSES - {OrderStatus.REFUNDED} if keep else frozenset({OrderStatus.REFUNDED})


def _apply_resolution(state: OrderState, *, keep: bool) -> Transition:
    refunded = state.amount_refunded
    if state.status is not OrderStatus.NEEDS_REVIEW:
        if state.status in resolved_statuses(keep=keep):
            return _unchanged(state, "no review open")
        return _refused(state, "no review open")
    if keep and refunded >= state.amount:
        return _refused(state, "nothing left to keep: refunded in full")
    if not keep and refunded < state.amount:
        return _refused(state, "not refunded in full yet")
    status = _refund_status(state, refunded) if refunded else OrderStatus.PAID
    after = replace(state, status=status, review_reason=None)
    steps = tuple(dict.fromkeys((AuditStep.SUCCEEDED, STEP_FOR_STATUS[status])))
    effects: tuple[Effect, ...] = ()
    if keep:
        effects = (Effect(EffectTrigger.PAID, "paid"),)
    if refunded:
        effects += (Effect(EffectTrigger.REFUNDED, f"refund:{refunded}"),)
    reason = "review resolved: payment kept" if keep else "review resolved: refunded"
    return _applied(state, after, reason, steps if keep else (STEP_FOR_STATUS[status],), effects)


def _refund_status(state: OrderState, amount_refunded: int) -> OrderStatus:
    if amount_refunded >= state.amount:
        return OrderStatus.REFUNDED
    return OrderStatus.PARTIALLY_REFUNDED


def _apply_refund(state: OrderState, obs: RefundObserved) -> Transition:
    total = obs.amount_refunded
    if total <= state.amount_refunded:
        return _not_newer(state, same=total == state.amount_refunded, what="refund total")
    new_status = _refund_status(state, total)
    if state.status is OrderStatus.NEEDS_REVIEW:
        # Recorded for the operator; what to tell the customer is their decision.
        after = replace(state, amount_refunded=total)
        return _applied(
            state, after, "refund recorded during review", (STEP_FOR_STATUS[new_status],)
        )
    other_currency = obs.currency is not None and obs.currency != state.currency
    refund_effect = Effect(EffectTrigger.REFUNDED, f"refund:{total}")
    if state.status in PAID_STATUSES:
        if other_currency:
            return _stale(state, "refund in another currency")
        after = replace(state, status=new_status, amount_refunded=total)
        return _applied(
            state, after, "refund recorded", (STEP_FOR_STATUS[new_status],), (refund_effect,)
        )
    # Canceled or pre-success: the refund proves money arrived, and it must fit the order.
    review: ReviewReason | None = None
    if state.status is OrderStatus.CANCELED:
        review = ReviewReason.SUCCEEDED_AFTER_CANCEL
    elif other_currency:
        review = ReviewReason.CURRENCY_MISMATCH
    elif total > state.amount:
        # More refunded than the order's amount: the charge was larger than the order.
        review = ReviewReason.AMOUNT_MISMATCH
    if review is not None:
        return _to_review(
            state,
            review,
            observed_at=state.observed_at,
            intent=state.payment_intent_id,
            refunded=total,
        )
    # The refund was delivered before the success it implies: apply both, so that the final
    # state and the effects do not depend on the delivery order.
    after = replace(state, status=new_status, amount_refunded=total)
    return _applied(
        state,
        after,
        "refund before success",
        (AuditStep.SUCCEEDED, STEP_FOR_STATUS[new_status]),
        (Effect(EffectTrigger.PAID, "paid"), refund_effect),
    )


def _apply_dispute(state: OrderState, obs: DisputeObserved) -> Transition:
    current = state.dispute
    if obs.status is current:
        return _unchanged(state, "same dispute status")
    if _DISPUTE_RANK[obs.status] <= _DISPUTE_RANK[current]:
        return _stale(state, "dispute already closed")
    after = replace(state, dispute=obs.status)
    if obs.status is DisputeStatus.OPEN:
        return _applied(
            state,
            after,
            "dispute opened",
            (AuditStep.DISPUTE_OPENED,),
            (Effect(EffectTrigger.DISPUTE_OPENED, "dispute_opened"),),
        )
    closed = Effect(EffectTrigger.DISPUTE_CLOSED, "dispute_closed")
    if current is DisputeStatus.OPEN:
        return _applied(state, after, "dispute closed", (AuditStep.DISPUTE_CLOSED,), (closed,))
    # The closing was delivered before the opening: it implies it, so that the set of effects
    # does not depend on the delivery order.
    return _applied(
        state,
        after,
        "dispute closed before its opening was seen",
        (AuditStep.DISPUTE_OPENED, AuditStep.DISPUTE_CLOSED),
        (Effect(EffectTrigger.DISPUTE_OPENED, "dispute_opened"), closed),
    )


# --- Stripe ----------------------------------------------------------------------------------

INTENT_STATUS_PHASES: Final[Mapping[str, PaymentPhase]] = MappingProxyType(
    {
        "requires_payment_method": PaymentPhase.AWAITING_PAYMENT,
        "requires_confirmation": PaymentPhase.AWAITING_PAYMENT,
        "requires_action": PaymentPhase.ACTION_REQUIRED,
        "processing": PaymentPhase.PROCESSING,
        "requires_capture": PaymentPhase.AUTHORIZED,
        "succeeded": PaymentPhase.SUCCEEDED,
        "canceled": PaymentPhase.CANCELED,
    }
)
"""The phase each PaymentIntent ``status`` stands for (a fetched PI, an API response)."""

EVENT_TYPE_PHASES: Final[Mapping[str, PaymentPhase]] = MappingProxyType(
    {
        "payment_intent.succeeded": PaymentPhase.SUCCEEDED,
        # The PI is back in requires_payment_method by then: its status would say "awaiting".
        "payment_intent.payment_failed": PaymentPhase.FAILED,
        "payment_intent.processing": PaymentPhase.PROCESSING,
        "payment_intent.requires_action": PaymentPhase.ACTION_REQUIRED,
        "payment_intent.canceled": PaymentPhase.CANCELED,
        "payment_intent.amount_capturable_updated": PaymentPhase.AUTHORIZED,
        "charge.failed": PaymentPhase.FAILED,
        "charge.pending": PaymentPhase.PROCESSING,
        "checkout.session.async_payment_succeeded": PaymentPhase.SUCCEEDED,
        "checkout.session.async_payment_failed": PaymentPhase.FAILED,
        "checkout.session.expired": PaymentPhase.CANCELED,
    }
)
"""Event types whose type alone decides the phase.

``charge.succeeded`` is deliberately absent: with manual capture Stripe sends it when the charge
is only authorised (``captured`` false), so its type alone would pay an order whose money is
merely held. ``payment_intent.succeeded`` always follows a real success.
``checkout.session.completed`` is absent too: its ``payment_status`` decides.
"""

INTENT_STATUS_EVENT_TYPES: Final = frozenset(
    {"payment_intent.created", "payment_intent.partially_funded"}
)
"""Event types whose phase comes from the PaymentIntent ``status`` carried in the event."""


def phase_for_intent_status(status: str) -> PaymentPhase | None:
    """Return the phase a PaymentIntent ``status`` stands for, or None for an unknown status."""
    return INTENT_STATUS_PHASES.get(status)


def phase_for_event_type(event_type: str) -> PaymentPhase | None:
    """Return the phase an event type alone decides, or None.

    None means: the type does not decide by itself (see :data:`INTENT_STATUS_EVENT_TYPES`), or
    it is not a payment-phase event at all (refunds, disputes, unknown types).
    """
    return EVENT_TYPE_PHASES.get(event_type)


# --- documentation ---------------------------------------------------------------------------


def _code(value: str) -> str:
    return f"`{value}`"


def transition_table_markdown() -> str:
    """Render the tables as Markdown for the documentation.

    The first table has one row per status (rank, the statuses it may move to, the audit step
    recorded on entry, what a local cancel does); the second maps each payment phase to the
    status it leads to and the PaymentIntent statuses that stand for it. The output depends
    only on the tables: the same text every time.
    """
    lines = [
        "| status | rank | may move to | audit step on entry | local cancel |",
        "|---|---|---|---|---|",
    ]
    for status in OrderStatus:
        rank = RANK.get(status)
        targets = [_code(target) for target in OrderStatus if target in TRANSITIONS[status]]
        lines.append(
            f"| {_code(status)} | {'—' if rank is None else rank} "
            f"| {', '.join(targets) or '—'} | {_code(STEP_FOR_STATUS[status])} "
            f"| {LOCAL_CANCEL_OUTCOMES[status]} |"
        )
    lines += [
        "",
        "| payment phase | order status | PaymentIntent status |",
        "|---|---|---|",
    ]
    for phase in PaymentPhase:
        intent_statuses = [_code(name) for name, p in INTENT_STATUS_PHASES.items() if p is phase]
        lines.append(
            f"| {_code(phase)} | {_code(PHASE_STATUS[phase])} "
            f"| {', '.join(intent_statuses) or '—'} |"
        )
    return "\n".join(lines) + "\n"
