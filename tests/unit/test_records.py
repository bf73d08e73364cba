"""The decision taken on a claim: execute, replay, 409 in flight, 422 mismatch."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from idempay.core.records import (
    MAX_RETRY_AFTER,
    Claimed,
    Execute,
    Existing,
    IdempotencyRecord,
    InFlight,
    Lease,
    Mismatch,
    RecordState,
    Replay,
    StoredResponse,
    decide,
    raise_for_decision,
)
from idempay.errors import ConfigurationError, FingerprintMismatchError, RequestInFlightError

NOW = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
OK = StoredResponse(status=201, body=b'{"order":"o1"}')


def record(
    state: RecordState,
    *,
    fingerprint: str = "fp",
    lease_left: float | None = 30,
    response: StoredResponse | None = None,
) -> IdempotencyRecord:
    lease = (
        None
        if lease_left is None
        else Lease(token="t", fence=3, expires_at=NOW + timedelta(seconds=lease_left))
    )
    return IdempotencyRecord(
        scope="s",
        key="k",
        fingerprint=fingerprint,
        state=state,
        fence=3,
        created_at=NOW,
        expires_at=NOW + timedelta(days=1),
        lease=lease,
        recovery_point="order_created",
        resource_id="o1",
        response=response,
    )


def test_claimed_executes_and_carries_the_recovery_point() -> None:
    rec = record(RecordState.IN_PROGRESS)
    assert rec.lease is not None
    decision = decide(Claimed(record=rec, lease=rec.lease, resumed=True), "fp", NOW)
    assert decision == Execute(
        lease=rec.lease, resumed=True, recovery_point="order_created", resource_id="o1"
    )
    assert raise_for_decision(decision) is decision


@pytest.mark.parametrize("state", [RecordState.COMPLETED, RecordState.FAILED])
def test_finished_record_replays_its_response(state: RecordState) -> None:
    decision = decide(Existing(record(state, lease_left=None, response=OK)), "fp", NOW)
    assert decision == Replay(response=OK)
    assert raise_for_decision(decision) == Replay(response=OK)


@pytest.mark.parametrize("state", list(RecordState))
def test_other_fingerprint_is_a_mismatch_whatever_the_state(state: RecordState) -> None:
    decision = decide(Existing(record(state, response=OK)), "another", NOW)
    assert decision == Mismatch()
    with pytest.raises(FingerprintMismatchError) as err:
        raise_for_decision(decision)
    assert err.value.status == 422
    assert err.value.code == "idempotency_key_reused"


def test_in_flight_answers_409_with_the_lease_time_left() -> None:
    decision = decide(Existing(record(RecordState.IN_PROGRESS, lease_left=7.2)), "fp", NOW)
    assert decision == InFlight(retry_after=8)
    with pytest.raises(RequestInFlightError) as err:
        raise_for_decision(decision)
    assert err.value.status == 409
    assert err.value.headers() == {"Retry-After": "8"}


@given(st.floats(min_value=-1e6, max_value=1e6, allow_nan=False))
def test_retry_after_is_bounded(seconds_left: float) -> None:
    decision = decide(Existing(record(RecordState.IN_PROGRESS, lease_left=seconds_left)), "fp", NOW)
    assert isinstance(decision, InFlight)
    assert 1 <= decision.retry_after <= MAX_RETRY_AFTER


def test_in_flight_without_a_lease_or_response_asks_to_retry_soon() -> None:
    assert decide(Existing(record(RecordState.UNKNOWN, lease_left=None)), "fp", NOW) == InFlight(
        retry_after=1
    )
    finished_without_response = record(RecordState.COMPLETED, lease_left=None, response=None)
    assert decide(Existing(finished_without_response), "fp", NOW) == InFlight(retry_after=1)


def test_lease_expiry_is_judged_at_the_given_time() -> None:
    rec = record(RecordState.IN_PROGRESS, lease_left=5)
    assert not rec.lease_expired(NOW)
    assert rec.lease_expired(NOW + timedelta(seconds=5))
    assert record(RecordState.IN_PROGRESS, lease_left=None).lease_expired(NOW)
    assert not record(RecordState.COMPLETED, lease_left=-5).lease_expired(NOW)
    assert rec.lease is not None
    assert rec.lease.remaining(NOW) == timedelta(seconds=5)


@pytest.mark.parametrize("status", [99, 600, 0, -1])
def test_stored_response_needs_a_real_status(status: int) -> None:
    with pytest.raises(ConfigurationError):
        StoredResponse(status=status)
