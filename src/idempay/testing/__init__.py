"""Testing aids: contract suites for custom backends, and a clock to move time by hand.

Prove that your own lock provider or store keeps idempay's guarantees by running the same suites
the shipped backends pass::

    import pytest
    from idempay.testing import IdempotencyStoreContract

    class TestMyStore(IdempotencyStoreContract):
        @pytest.fixture
        def make_store(self):
            return lambda clock: MyStore(dsn=..., clock=clock)

See docs/backends.md for every fixture a suite uses. The suites need pytest (and anyio's pytest
plugin for the async ones): ``pip install "idempay[testing]"``. The Stripe simulator
(:mod:`idempay.testing.simulator`) and the wire proxy (:mod:`idempay.testing.wire`) need
nothing beyond the standard library.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from idempay._lazy import require
from idempay.clock import FrozenClock

if TYPE_CHECKING:
    from idempay.testing._async import (
        AsyncIdempotencyStoreContract,
        AsyncLockProviderContract,
        AsyncMaintenanceStoreContract,
        AsyncPaymentStoreContract,
    )
    from idempay.testing._sync import (
        IdempotencyStoreContract,
        LockProviderContract,
        MaintenanceStoreContract,
        PaymentStoreContract,
    )

__all__ = [
    "AsyncIdempotencyStoreContract",
    "AsyncLockProviderContract",
    "AsyncMaintenanceStoreContract",
    "AsyncPaymentStoreContract",
    "FrozenClock",
    "IdempotencyStoreContract",
    "LockProviderContract",
    "MaintenanceStoreContract",
    "PaymentStoreContract",
]

_SUITES = {
    "AsyncIdempotencyStoreContract": "idempay.testing._async",
    "AsyncLockProviderContract": "idempay.testing._async",
    "AsyncMaintenanceStoreContract": "idempay.testing._async",
    "AsyncPaymentStoreContract": "idempay.testing._async",
    "IdempotencyStoreContract": "idempay.testing._sync",
    "LockProviderContract": "idempay.testing._sync",
    "MaintenanceStoreContract": "idempay.testing._sync",
    "PaymentStoreContract": "idempay.testing._sync",
}


def __getattr__(name: str) -> Any:
    # The suites need pytest; the rest of the kit (the Stripe simulator, the wire proxy, the
    # clock) does not, so pytest is required only when a suite is asked for.
    module = _SUITES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    require("pytest", extra="testing")
    return getattr(importlib.import_module(module), name)
