"""The PostgreSQL advisory-lock providers: the lock contract, plus what only the server gives.

A stalled holder loses its lock because the *server* ends its session at the ttl; locks are
shared by every engine and process on the database; connections go back to the pool.
"""

from __future__ import annotations

import asyncio
import functools
import secrets
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from idempay.backends.sql._advisory import (
    AsyncPostgresAdvisoryLockProvider,
    PostgresAdvisoryLockProvider,
    _lock_key,
)
from idempay.errors import ConfigurationError, LockError
from idempay.protocols import AsyncLockProvider, LockProvider
from idempay.testing import AsyncLockProviderContract, LockProviderContract
from idempay.testing._support import concurrently

LONG = timedelta(seconds=30)
SHORT = timedelta(milliseconds=300)
PATIENCE = timedelta(seconds=20)


def _name() -> str:
    return f"lock:{secrets.token_hex(8)}"


@pytest.fixture
def providers(postgres_url: str) -> Iterator[Callable[[], PostgresAdvisoryLockProvider]]:
    """Make providers, each on its own engine; close them all after the test."""
    made: list[PostgresAdvisoryLockProvider] = []

    def make() -> PostgresAdvisoryLockProvider:
        made.append(PostgresAdvisoryLockProvider.from_url(postgres_url))
        return made[-1]

    yield make
    for provider in made:
        provider.close()


@pytest.fixture
async def async_providers(
    postgres_url: str, anyio_backend: str
) -> AsyncIterator[Callable[[], AsyncPostgresAdvisoryLockProvider]]:
    """Async twin of :func:`providers`."""
    made: list[AsyncPostgresAdvisoryLockProvider] = []

    def make() -> AsyncPostgresAdvisoryLockProvider:
        made.append(AsyncPostgresAdvisoryLockProvider.from_url(postgres_url))
        return made[-1]

    yield make
    for provider in made:
        await provider.aclose()


def _checked_out(provider: PostgresAdvisoryLockProvider | AsyncPostgresAdvisoryLockProvider) -> int:
    pool: Any = provider._engine.pool
    return int(pool.checkedout())


# --- the contract ------------------------------------------------------------------------------


class TestPostgresAdvisoryLockContract(LockProviderContract):
    @pytest.fixture
    def make_provider(
        self, providers: Callable[[], PostgresAdvisoryLockProvider]
    ) -> Callable[[], PostgresAdvisoryLockProvider]:
        return providers

    @pytest.fixture
    def process_factory(self, postgres_url: str) -> Callable[[], PostgresAdvisoryLockProvider]:
        return functools.partial(PostgresAdvisoryLockProvider.from_url, postgres_url)


class TestAsyncPostgresAdvisoryLockContract(AsyncLockProviderContract):
    @pytest.fixture
    def make_provider(
        self, async_providers: Callable[[], AsyncPostgresAdvisoryLockProvider]
    ) -> Callable[[], AsyncPostgresAdvisoryLockProvider]:
        return async_providers

    @pytest.fixture
    def process_factory(self, postgres_url: str) -> Callable[[], PostgresAdvisoryLockProvider]:
        return functools.partial(PostgresAdvisoryLockProvider.from_url, postgres_url)


# --- sync ------------------------------------------------------------------------------------


def test_both_providers_satisfy_the_protocols(
    providers: Callable[[], PostgresAdvisoryLockProvider],
    async_providers: Callable[[], AsyncPostgresAdvisoryLockProvider],
) -> None:
    assert isinstance(providers(), LockProvider)
    assert isinstance(async_providers(), AsyncLockProvider)


def test_a_stalled_holder_loses_the_lock_when_the_server_ends_its_session(
    providers: Callable[[], PostgresAdvisoryLockProvider],
) -> None:
    stalled, other = providers(), providers()
    name = _name()
    held = stalled.acquire(name, ttl=SHORT)
    assert held is not None
    assert other.acquire(name, ttl=LONG) is None
    # Nothing runs on the holder's connection: only the server ending that session can free
    # the lock, and it must do so by itself once the ttl has passed.
    successor = other.acquire(name, ttl=LONG, wait=PATIENCE)
    assert successor is not None
    assert successor.fence > held.fence
    assert stalled.extend(name, held, ttl=LONG) is None
    assert stalled.release(name, held) is False
    assert _checked_out(stalled) == 0
    assert other.release(name, successor)
    assert _checked_out(other) == 0


def test_another_engine_sees_the_lock_held_and_cannot_release_it(
    providers: Callable[[], PostgresAdvisoryLockProvider],
) -> None:
    owner, stranger = providers(), providers()
    name = _name()
    held = owner.acquire(name, ttl=LONG)
    assert held is not None
    assert stranger.acquire(name, ttl=LONG, wait=timedelta(milliseconds=200)) is None
    assert stranger.release(name, held) is False
    assert stranger.extend(name, held, ttl=LONG) is None
    assert owner.release(f"{name}:other", held) is False
    assert stranger.acquire(name, ttl=LONG) is None
    assert owner.release(name, held)
    taken = stranger.acquire(name, ttl=LONG)
    assert taken is not None
    assert stranger.release(name, taken)


def test_threads_waiting_for_one_name_hold_it_one_at_a_time_in_fence_order(
    providers: Callable[[], PostgresAdvisoryLockProvider],
) -> None:
    shared, separate = providers(), providers()
    name = _name()
    guard = threading.Lock()
    inside: list[int] = []
    fences: list[int] = []

    def work(i: int) -> None:
        locks = shared if i % 2 else separate
        lease = locks.acquire(name, ttl=LONG, wait=PATIENCE)
        assert lease is not None
        with guard:
            inside.append(i)
            assert len(inside) == 1
            fences.append(lease.fence)
        with guard:
            inside.remove(i)
        assert locks.release(name, lease)

    concurrently(8, work)
    assert len(fences) == 8
    assert fences == sorted(fences)
    assert len(set(fences)) == 8
    assert _checked_out(shared) == _checked_out(separate) == 0


def test_no_connection_is_left_checked_out(
    providers: Callable[[], PostgresAdvisoryLockProvider],
) -> None:
    locks = providers()
    names = [_name() for _ in range(3)]
    leases = [locks.acquire(name, ttl=LONG) for name in names]
    assert _checked_out(locks) == 3
    assert locks.acquire(names[0], ttl=LONG) is None
    assert locks.acquire(names[0], ttl=LONG, wait=timedelta(milliseconds=100)) is None
    assert _checked_out(locks) == 3
    assert leases[1] is not None
    extended = locks.extend(names[1], leases[1], ttl=LONG)
    assert extended is not None
    for name, lease in zip(names, (leases[0], extended, leases[2]), strict=True):
        assert lease is not None
        assert locks.release(name, lease)
    assert _checked_out(locks) == 0


def test_closing_a_provider_frees_its_locks_and_refuses_new_ones(
    providers: Callable[[], PostgresAdvisoryLockProvider],
) -> None:
    closing, other = providers(), providers()
    name = _name()
    held = closing.acquire(name, ttl=LONG)
    assert held is not None
    closing.close()
    assert closing.release(name, held) is False
    taken = other.acquire(name, ttl=LONG)
    assert taken is not None
    with pytest.raises(LockError):
        closing.acquire(_name(), ttl=LONG)
    assert other.release(name, taken)


def test_an_autocommit_engine_still_holds_the_lock(
    postgres_url: str, providers: Callable[[], PostgresAdvisoryLockProvider]
) -> None:
    engine = sa.create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    try:
        locks = PostgresAdvisoryLockProvider(engine)
        name = _name()
        held = locks.acquire(name, ttl=LONG)
        assert held is not None
        assert providers().acquire(name, ttl=LONG) is None
        assert locks.release(name, held)
        locks.close()
        assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    finally:
        engine.dispose()


def test_the_fence_sequence_is_created_once_under_concurrent_first_use(
    postgres_url: str,
) -> None:
    schema = f"fresh_{secrets.token_hex(4)}"
    admin = sa.create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
        made = [
            PostgresAdvisoryLockProvider.from_url(
                postgres_url, connect_args={"options": f"-c search_path={schema}"}
            )
            for _ in range(6)
        ]
        try:
            leases = concurrently(6, lambda i: made[i].acquire(_name(), ttl=LONG))
            assert all(lease is not None for lease in leases)
            assert len({lease.fence for lease in leases if lease is not None}) == 6
        finally:
            for provider in made:
                provider.close()
        with admin.connect() as conn:
            found = conn.execute(
                sa.text("SELECT to_regclass(:seq) IS NOT NULL"),
                {"seq": f'"{schema}".idempay_lock_fence'},
            ).scalar_one()
            assert found
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
    finally:
        admin.dispose()


def test_a_database_failure_is_a_lock_error_without_the_name() -> None:
    name = "secret-order-name"
    locks = PostgresAdvisoryLockProvider.from_url(
        "postgresql+psycopg://postgres@127.0.0.1:1/postgres",
        connect_args={"connect_timeout": 2},
    )
    try:
        with pytest.raises(LockError) as caught:
            locks.acquire(name, ttl=LONG)
        assert name not in str(caught.value)
        assert isinstance(caught.value.__cause__, sa.exc.SQLAlchemyError)
    finally:
        locks.close()


def test_bad_urls_and_ttls_are_configuration_errors(
    providers: Callable[[], PostgresAdvisoryLockProvider],
) -> None:
    with pytest.raises(ConfigurationError) as caught:
        PostgresAdvisoryLockProvider.from_url("mysql+pymysql://root:hunter2@127.0.0.1/test")
    assert "hunter2" not in str(caught.value)
    with pytest.raises(ConfigurationError) as caught:
        PostgresAdvisoryLockProvider.from_url("::not a url hunter2::")
    assert "hunter2" not in str(caught.value)
    assert caught.value.__cause__ is None
    locks = providers()
    with pytest.raises(ConfigurationError):
        locks.acquire(_name(), ttl=timedelta(days=30))
    with pytest.raises(ConfigurationError):
        locks.acquire(_name(), ttl=-LONG)
    tiny = locks.acquire(_name(), ttl=timedelta(microseconds=1))  # rounds up to 1 ms, not "off"
    assert tiny is not None


def test_lock_keys_are_stable_signed_64_bit_numbers() -> None:
    # Changing the mapping would let two versions of idempay hold "the same" lock at once.
    assert _lock_key("order:1") == _lock_key("order:1")
    assert _lock_key("order:1") != _lock_key("order:2")
    assert _lock_key("order:1") == 3683725722010872324
    assert all(-(2**63) <= _lock_key(str(i)) < 2**63 for i in range(1000))


# --- async -----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_async_stalled_holder_loses_the_lock_to_the_server(
    async_providers: Callable[[], AsyncPostgresAdvisoryLockProvider],
) -> None:
    stalled, other = async_providers(), async_providers()
    name = _name()
    held = await stalled.acquire(name, ttl=SHORT)
    assert held is not None
    assert await other.acquire(name, ttl=LONG) is None
    successor = await other.acquire(name, ttl=LONG, wait=PATIENCE)
    assert successor is not None
    assert successor.fence > held.fence
    assert await stalled.extend(name, held, ttl=LONG) is None
    assert await stalled.release(name, held) is False
    assert _checked_out(stalled) == 0
    assert await other.release(name, successor)
    assert _checked_out(other) == 0


@pytest.mark.anyio
async def test_async_tasks_waiting_for_one_name_hold_it_one_at_a_time(
    async_providers: Callable[[], AsyncPostgresAdvisoryLockProvider],
) -> None:
    locks = async_providers()
    name = _name()
    inside = 0
    fences: list[int] = []

    async def work() -> None:
        nonlocal inside
        lease = await locks.acquire(name, ttl=LONG, wait=PATIENCE)
        assert lease is not None
        inside += 1
        assert inside == 1
        fences.append(lease.fence)
        await asyncio.sleep(0)  # let the others run while we hold it
        inside -= 1
        assert await locks.release(name, lease)

    await asyncio.gather(*(work() for _ in range(6)))
    assert fences == sorted(fences)
    assert len(set(fences)) == 6
    assert _checked_out(locks) == 0


@pytest.mark.anyio
async def test_async_cancelled_waiter_leaves_no_connection_behind(
    async_providers: Callable[[], AsyncPostgresAdvisoryLockProvider],
) -> None:
    locks = async_providers()
    name = _name()
    held = await locks.acquire(name, ttl=LONG)
    assert held is not None
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(locks.acquire(name, ttl=LONG, wait=PATIENCE), timeout=0.2)
    assert _checked_out(locks) == 1
    assert await locks.release(name, held)
    assert _checked_out(locks) == 0


@pytest.mark.anyio
async def test_async_closing_frees_locks_and_autocommit_engines_still_hold(
    postgres_url: str,
    async_providers: Callable[[], AsyncPostgresAdvisoryLockProvider],
) -> None:
    engine = create_async_engine(postgres_url, isolation_level="AUTOCOMMIT")
    try:
        closing = AsyncPostgresAdvisoryLockProvider(engine)
        other = async_providers()
        name = _name()
        held = await closing.acquire(name, ttl=LONG)
        assert held is not None
        assert await other.acquire(name, ttl=LONG) is None
        await closing.aclose()
        assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
        assert await closing.release(name, held) is False
        with pytest.raises(LockError):
            await closing.acquire(_name(), ttl=LONG)
        taken = await other.acquire(name, ttl=LONG)
        assert taken is not None
        assert await other.release(name, taken)
    finally:
        await engine.dispose()


@pytest.mark.anyio
async def test_async_database_failure_is_a_lock_error() -> None:
    locks = AsyncPostgresAdvisoryLockProvider.from_url(
        "postgresql+psycopg://postgres@127.0.0.1:1/postgres",
        connect_args={"connect_timeout": 2},
    )
    try:
        with pytest.raises(LockError):
            await locks.acquire("secret-order-name", ttl=LONG)
    finally:
        await locks.aclose()
