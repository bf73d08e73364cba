"""The audit log's mirror in standard logging, and the decisions that are only logged.

Every audit step is also emitted on the ``idempay.audit`` logger with structured fields in
``extra={"idempay": {...}}`` (step, source, tenant, order id, event id, statuses, reason). A
decision that changes nothing (a duplicate delivery, a replayed checkout, a request in flight, a
key reused, a refused webhook) is recorded there and not in the database: an unauthenticated or
repeated request must never cost a durable write. Fields never include a raw idempotency key
(only its digest), a payload, a secret or personal data. idempay never configures logging.

Every step also reaches the registered observers (:mod:`idempay.observability`) as a
``(step, source)`` pair, whether or not the logger is enabled: metrics do not depend on the
logging configuration.
"""

from __future__ import annotations

import logging
from typing import Final

from idempay.core.audit import AuditDraft, AuditSource, AuditStep
from idempay.observability import notify_decision

__all__ = ["AUDIT_LOGGER", "log_decision", "log_draft"]

AUDIT_LOGGER: Final = logging.getLogger("idempay.audit")

_WARNING_STEPS: Final = frozenset(
    {
        AuditStep.NEEDS_REVIEW,
        AuditStep.REJECTED,
        AuditStep.LEASE_LOST,
        AuditStep.OUTCOME_UNKNOWN,
        AuditStep.MISMATCH,
    }
)


def log_decision(
    step: AuditStep,
    *,
    source: AuditSource,
    tenant: str = "",
    order_id: str | None = None,
    event_id: str | None = None,
    key_digest: str | None = None,
    reason: str | None = None,
) -> None:
    """Emit one audit record on the ``idempay.audit`` logger, and count it for the observers."""
    notify_decision(step, source)
    level = logging.WARNING if step in _WARNING_STEPS else logging.INFO
    if not AUDIT_LOGGER.isEnabledFor(level):
        return
    fields = {
        "step": step.value,
        "source": source.value,
        "tenant": tenant,
        "order_id": order_id,
        "event_id": event_id,
        "key_digest": key_digest,
        "reason": reason,
    }
    AUDIT_LOGGER.log(
        level,
        "idempay %s %s%s",
        step.value,
        source.value,
        f" ({reason})" if reason else "",
        extra={"idempay": {k: v for k, v in fields.items() if v is not None}},
    )


def log_draft(draft: AuditDraft) -> None:
    """Mirror an audit entry written to the database."""
    log_decision(
        draft.step,
        source=draft.source,
        tenant=draft.tenant,
        order_id=draft.order_id,
        event_id=draft.event_id,
        key_digest=draft.key_digest,
        reason=draft.details.get("reason"),
    )
