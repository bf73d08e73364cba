"""The guard's configuration: one frozen value, separate from the stores it uses."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum
from typing import Final, cast

from idempay.core.signature import DEFAULT_TOLERANCE
from idempay.core.strictjson import DEFAULT_LIMITS, JSONLimits
from idempay.errors import ConfigurationError

__all__ = ["MIN_RETAIN", "GuardConfig", "LockFailurePolicy"]

MIN_RETAIN: Final = timedelta(hours=24)
"""The shortest retention of idempotency records: a client retrying within Stripe's 24-hour
key window must find its first response."""


class LockFailurePolicy(StrEnum):
    """What to do when the lock provider itself fails (Redis down, hung, restarted)."""

    CONTINUE = "continue"
    """Carry on with the database guards alone: always safe, only more contention."""
    FAIL_CLOSED = "fail_closed"
    """Answer 503 with Retry-After; a retry later succeeds once."""


@dataclass(frozen=True, slots=True, kw_only=True)
class GuardConfig:
    """How a guard behaves. Frozen: build a new one to change it.

    Attributes:
        webhook_secrets: the endpoint's signing secrets (``whsec_...``); several during a
            rotation. Needed to receive webhooks.
        signature_tolerance: seconds a webhook signature's timestamp may differ from now, in
            either direction.
        livemode: refuse events of the other mode (a test-mode event on a live endpoint);
            None accepts both.
        json_limits: size and depth limits of webhook and checkout bodies.
        lease: how long a worker owns an idempotency record or an outbox entry before another
            may take over.
        in_flight_wait: how long a checkout that finds its key in flight waits for the first
            request to finish, then replays its response; zero (the default) answers 409 with
            ``Retry-After`` at once.
        retain: how long idempotency records are kept: at least 24 hours, as Stripe keeps
            its keys (``idempay purge`` deletes them after).
        commit_attempts: how often a webhook's decision is retried after losing a race.
        lock_ttl: lifetime of the contention locks (never needed for correctness).
        lock_wait: how long a webhook waits for its PaymentIntent's contention lock before
            going on without it (concurrent deliveries then only meet at the database).
        lock_failure: what a failing lock provider means (see :class:`LockFailurePolicy`).
        effect_max_attempts: attempts of an effect before it is dead-lettered.
        effect_backoff: the first retry delay of a failed effect; doubled at each attempt.
        effect_backoff_cap: the longest retry delay of a failed effect.
        journal_batch: how many decisions that changed nothing (duplicates, replays,
            refusals) are queued before they are written to the journal in one batch.
        journal_interval: the longest a queued decision waits for its batch (checked when the
            next decision comes, and by :meth:`~idempay.engine.Guard.dispatch_effects`).
        journal_capacity: the most decisions queued; beyond it (the database is down during
            a flood) they are logged only, and the loss is logged.
        tenant_metadata_key: the PaymentIntent metadata key carrying the tenant.
        order_metadata_key: the PaymentIntent metadata key carrying the order id.
    """

    webhook_secrets: tuple[str, ...] = ()
    signature_tolerance: int = DEFAULT_TOLERANCE
    livemode: bool | None = None
    json_limits: JSONLimits = DEFAULT_LIMITS
    lease: timedelta = timedelta(seconds=30)
    retain: timedelta = timedelta(hours=24)
    in_flight_wait: timedelta = timedelta(0)
    commit_attempts: int = 64
    lock_ttl: timedelta = timedelta(seconds=10)
    lock_wait: timedelta = timedelta(seconds=2)
    lock_failure: LockFailurePolicy = LockFailurePolicy.CONTINUE
    effect_max_attempts: int = 8
    effect_backoff: timedelta = timedelta(seconds=5)
    effect_backoff_cap: timedelta = timedelta(hours=1)
    journal_batch: int = 100
    journal_interval: timedelta = timedelta(seconds=1)
    journal_capacity: int = 10_000
    tenant_metadata_key: str = "idempay_tenant"
    order_metadata_key: str = "order_id"

    def __post_init__(self) -> None:
        secrets: object = self.webhook_secrets
        if isinstance(secrets, str):
            raise ConfigurationError("webhook_secrets is a tuple of secrets, not one string")
        if not all(isinstance(s, str) and s for s in cast("tuple[object, ...]", secrets)):
            raise ConfigurationError("webhook secrets must be non-empty strings")
        if self.signature_tolerance <= 0:
            raise ConfigurationError("signature_tolerance must be positive (zero is not 'off')")
        for name in ("lease", "retain", "lock_ttl", "effect_backoff", "effect_backoff_cap"):
            if getattr(self, name) <= timedelta(0):
                raise ConfigurationError(f"{name} must be positive")
        if self.lock_wait < timedelta(0) or self.in_flight_wait < timedelta(0):
            raise ConfigurationError("lock_wait and in_flight_wait cannot be negative")
        if self.retain < max(self.lease, MIN_RETAIN):
            raise ConfigurationError("retain must be at least 24 hours and at least the lease")
        if self.commit_attempts < 1 or self.effect_max_attempts < 1:
            raise ConfigurationError("attempt counts must be at least 1")
        if not 1 <= self.journal_batch <= self.journal_capacity:
            raise ConfigurationError("journal_batch must be between 1 and journal_capacity")
        if self.journal_interval < timedelta(0):
            raise ConfigurationError("journal_interval cannot be negative")
