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
plugin for the async ones): ``pip install "idempay[testing]"``.
"""

from __future__ import annotations

from idempay._lazy import require

require("pytest", extra="testing")

from idempay.clock import FrozenClock  # noqa: E402 - after the check for pytest
from idempay.testing._async import (  # noqa: E402
    AsyncIdempotencyStoreContract,
    AsyncLockProviderContract,
    AsyncPaymentStoreContract,
)
from idempay.testing._sync import (  # noqa: E402
    IdempotencyStoreContract,
    LockProviderContract,
    PaymentStoreContract,
)

__all__ = [
    "AsyncIdempotencyStoreContract",
    "AsyncLockProviderContract",
    "AsyncPaymentStoreContract",
    "FrozenClock",
    "IdempotencyStoreContract",
    "LockProviderContract",
    "PaymentStoreContract",
]
