"""Operations: the reconciler that makes up for lost webhooks, and the retention purge.

Run :class:`Reconciler` (or :class:`AsyncReconciler`) as a worker, or ``idempay reconcile``
from a scheduler; run :func:`purge` (``idempay purge``) daily. Both are safe with any number of
copies running at once. See docs/operations.md.
"""

from __future__ import annotations

from idempay.operations._async import AsyncReconciler, async_purge
from idempay.operations._config import (
    BACKFILL_EVENT_TYPES,
    UNSETTLED_STATUSES,
    WAITING_STATUSES,
    ReconcileConfig,
    Retention,
)
from idempay.operations._report import Checked, OrderCheck, Progress, PurgeReport, ReconcileReport
from idempay.operations._sync import Reconciler, purge

__all__ = [
    "BACKFILL_EVENT_TYPES",
    "UNSETTLED_STATUSES",
    "WAITING_STATUSES",
    "AsyncReconciler",
    "Checked",
    "OrderCheck",
    "Progress",
    "PurgeReport",
    "ReconcileConfig",
    "ReconcileReport",
    "Reconciler",
    "Retention",
    "async_purge",
    "purge",
]
