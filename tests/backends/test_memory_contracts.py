"""The in-memory backends pass every contract suite (they share nothing between processes)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from idempay.clock import Clock
from idempay.memory import (
    AsyncMemoryIdempotencyStore,
    AsyncMemoryLockProvider,
    AsyncMemoryPaymentStore,
    MemoryIdempotencyStore,
    MemoryLockProvider,
    MemoryPaymentStore,
)
from idempay.testing import (
    AsyncIdempotencyStoreContract,
    AsyncLockProviderContract,
    AsyncMaintenanceStoreContract,
    AsyncPaymentStoreContract,
    IdempotencyStoreContract,
    LockProviderContract,
    MaintenanceStoreContract,
    PaymentStoreContract,
)

pytestmark = pytest.mark.memory


class TestMemoryIdempotencyStore(IdempotencyStoreContract):
    @pytest.fixture
    def make_store(self) -> Callable[[Clock | None], MemoryIdempotencyStore]:
        return lambda clock: MemoryIdempotencyStore(clock=clock)


class TestAsyncMemoryIdempotencyStore(AsyncIdempotencyStoreContract):
    @pytest.fixture
    def make_store(self) -> Callable[[Clock | None], AsyncMemoryIdempotencyStore]:
        return lambda clock: AsyncMemoryIdempotencyStore(clock=clock)


class TestMemoryLockProvider(LockProviderContract):
    @pytest.fixture
    def make_provider(self) -> Callable[[], MemoryLockProvider]:
        return MemoryLockProvider


class TestAsyncMemoryLockProvider(AsyncLockProviderContract):
    @pytest.fixture
    def make_provider(self) -> Callable[[], AsyncMemoryLockProvider]:
        return AsyncMemoryLockProvider


class TestMemoryPaymentStore(PaymentStoreContract):
    @pytest.fixture
    def make_store(self) -> Callable[[Clock | None], MemoryPaymentStore]:
        return lambda clock: MemoryPaymentStore(clock=clock)


class TestAsyncMemoryPaymentStore(AsyncPaymentStoreContract):
    @pytest.fixture
    def make_store(self) -> Callable[[Clock | None], AsyncMemoryPaymentStore]:
        return lambda clock: AsyncMemoryPaymentStore(clock=clock)


class TestMemoryMaintenanceStore(MaintenanceStoreContract):
    @pytest.fixture
    def make_store(self) -> Callable[[Clock | None], MemoryPaymentStore]:
        return lambda clock: MemoryPaymentStore(clock=clock)


class TestAsyncMemoryMaintenanceStore(AsyncMaintenanceStoreContract):
    @pytest.fixture
    def make_store(self) -> Callable[[Clock | None], AsyncMemoryPaymentStore]:
        return lambda clock: AsyncMemoryPaymentStore(clock=clock)
