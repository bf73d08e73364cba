"""The SQL stores on SQLite, PostgreSQL and MariaDB, sync and async, against real databases.

They pass the contract suites, and the SQL-specific cases: joining the caller's transaction,
migrations that build exactly the declared schema, 50 conflicting transitions (L6), concurrent
inserts of one absent key on MariaDB (L7), several processes writing one SQLite file (L8),
byte-exact keys whatever the database's default collation, transient errors mapped and retried,
and no connection left checked out.

Each dialect gets a database of this module's own, migrated once with ``upgrade()``; tests use
random ids, so they share it.
"""

from __future__ import annotations

import multiprocessing
import secrets
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from time import monotonic
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.ext.asyncio import create_async_engine

from idempay.backends.sql import (
    AsyncSQLIdempotencyStore,
    AsyncSQLPaymentStore,
    SQLIdempotencyStore,
    SQLPaymentStore,
    async_url,
    create_all,
    metadata,
    sync_url,
    upgrade,
)
from idempay.backends.sql._common import wrap
from idempay.clock import Clock, FrozenClock
from idempay.core.audit import AuditDraft, AuditSource, AuditStep, verify_trail
from idempay.core.models import (
    AuditHead,
    EventCommit,
    InboxEvent,
    InboxStatus,
    NewEffect,
    OrderRecord,
)
from idempay.core.orders import OrderState, OrderStatus
from idempay.core.records import Claimed, Existing, Lease, StoredResponse
from idempay.errors import (
    ConcurrentUpdateError,
    ConfigurationError,
    LeaseLostError,
    StoreError,
    TransientStoreError,
)
from idempay.protocols import (
    AsyncIdempotencyStore,
    AsyncOutboxStore,
    AsyncPaymentStore,
    IdempotencyStore,
    OutboxStore,
    PaymentStore,
)
from idempay.testing import (
    AsyncIdempotencyStoreContract,
    AsyncMaintenanceStoreContract,
    AsyncPaymentStoreContract,
    IdempotencyStoreContract,
    MaintenanceStoreContract,
    PaymentStoreContract,
)
from idempay.testing._support import concurrently

LEASE = timedelta(seconds=30)
RETAIN = timedelta(hours=1)
NEW = OrderState(OrderStatus.CREATED, 1999, "eur")

DIALECTS = [
    pytest.param("sqlite", marks=pytest.mark.sqlite),
    pytest.param("postgres", marks=pytest.mark.postgres),
    pytest.param("mysql", marks=pytest.mark.mysql),
]


def _uid() -> str:
    return secrets.token_hex(8)


# --- one migrated database per dialect -------------------------------------------------------


def _scratch(server_url: str, create: str, drop: str) -> Iterator[str]:
    """A database of this module's own on ``server_url``, migrated, dropped afterwards."""
    name = f"idempay_sql_{secrets.token_hex(4)}"
    admin = sa.create_engine(server_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(create.format(name=name))
        try:
            url = sa.make_url(server_url).set(database=name).render_as_string(hide_password=False)
            upgrade(url)
            yield url
        finally:
            with admin.connect() as conn:
                conn.exec_driver_sql(drop.format(name=name))
    finally:
        admin.dispose()


@pytest.fixture(scope="module")
def sqlite_db(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A migrated SQLite database file of this module's own."""
    url = f"sqlite:///{tmp_path_factory.mktemp('sql') / 'idempay.db'}"
    upgrade(url)
    return url


@pytest.fixture(scope="module")
def postgres_db(postgres_server_url: str) -> Iterator[str]:
    """A migrated PostgreSQL database of this module's own."""
    yield from _scratch(
        postgres_server_url,
        'CREATE DATABASE "{name}"',
        'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)',
    )


@pytest.fixture(scope="module")
def mysql_db(mysql_server_url: str) -> Iterator[str]:
    """A migrated MariaDB/MySQL database of this module's own, case-insensitive by default on
    purpose: idempay's columns must not depend on the database's default collation."""
    yield from _scratch(
        mysql_server_url,
        "CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_general_ci",
        "DROP DATABASE IF EXISTS `{name}`",
    )


@pytest.fixture(scope="module", params=DIALECTS)
def db_url(request: pytest.FixtureRequest) -> str:
    """The sync URL of a migrated database, for each dialect in turn."""
    url: str = request.getfixturevalue(f"{request.param}_db")
    return url


def _dialect(url: str) -> str:
    return sa.make_url(url).get_backend_name()


def _idle(store: Any) -> None:
    assert store.engine.pool.checkedout() == 0, "a connection was left checked out"


@pytest.fixture
def sync_stores(db_url: str) -> Iterator[Callable[..., Any]]:
    """Make sync stores on their own engines; check for leaks and close them after the test."""
    made: list[Any] = []

    def make(cls: type[Any], clock: Clock | None = None, **options: Any) -> Any:
        made.append(cls.from_url(db_url, clock=clock, **options))
        return made[-1]

    yield make
    for store in made:
        _idle(store)
        store.close()


@pytest.fixture
async def async_stores(db_url: str, anyio_backend: str) -> AsyncIterator[Callable[..., Any]]:
    """Async twin of :func:`sync_stores`: engines live and die with the test's event loop."""
    made: list[Any] = []

    def make(cls: type[Any], clock: Clock | None = None, **options: Any) -> Any:
        made.append(cls.from_url(async_url(db_url), clock=clock, **options))
        return made[-1]

    yield make
    for store in made:
        _idle(store)
        await store.aclose()


# --- contract suites -------------------------------------------------------------------------


class TestSQLIdempotencyStore(IdempotencyStoreContract):
    @pytest.fixture
    def make_store(
        self, sync_stores: Callable[..., Any]
    ) -> Callable[[Clock | None], SQLIdempotencyStore]:
        return partial(sync_stores, SQLIdempotencyStore)

    @pytest.fixture
    def process_factory(self, db_url: str) -> Callable[[], SQLIdempotencyStore]:
        return partial(SQLIdempotencyStore.from_url, db_url)


class TestAsyncSQLIdempotencyStore(AsyncIdempotencyStoreContract):
    @pytest.fixture
    def make_store(
        self, async_stores: Callable[..., Any]
    ) -> Callable[[Clock | None], AsyncSQLIdempotencyStore]:
        return partial(async_stores, AsyncSQLIdempotencyStore)

    @pytest.fixture
    def process_factory(self, db_url: str) -> Callable[[], SQLIdempotencyStore]:
        return partial(SQLIdempotencyStore.from_url, db_url)


class TestSQLPaymentStore(PaymentStoreContract):
    @pytest.fixture
    def make_store(
        self, sync_stores: Callable[..., Any]
    ) -> Callable[[Clock | None], SQLPaymentStore]:
        return partial(sync_stores, SQLPaymentStore)

    @pytest.fixture
    def process_factory(self, db_url: str) -> Callable[[], SQLPaymentStore]:
        return partial(SQLPaymentStore.from_url, db_url)


class TestAsyncSQLPaymentStore(AsyncPaymentStoreContract):
    @pytest.fixture
    def make_store(
        self, async_stores: Callable[..., Any]
    ) -> Callable[[Clock | None], AsyncSQLPaymentStore]:
        return partial(async_stores, AsyncSQLPaymentStore)

    @pytest.fixture
    def process_factory(self, db_url: str) -> Callable[[], SQLPaymentStore]:
        return partial(SQLPaymentStore.from_url, db_url)


@pytest.fixture
def emptied(db_url: str) -> str:
    """The module's database with every idempay row deleted: maintenance spans the whole store.
    (Other tests use random ids and keep nothing across tests, so they lose nothing.)"""
    engine = sa.create_engine(db_url)
    try:
        with engine.begin() as conn:
            for table in reversed(metadata.sorted_tables):
                conn.execute(table.delete())
    finally:
        engine.dispose()
    return db_url


class TestSQLMaintenanceStore(MaintenanceStoreContract):
    @pytest.fixture
    def make_store(
        self, emptied: str, sync_stores: Callable[..., Any]
    ) -> Callable[[Clock | None], SQLPaymentStore]:
        return partial(sync_stores, SQLPaymentStore)

    @pytest.fixture
    def process_factory(self, db_url: str) -> Callable[[], SQLPaymentStore]:
        return partial(SQLPaymentStore.from_url, db_url)


class TestAsyncSQLMaintenanceStore(AsyncMaintenanceStoreContract):
    @pytest.fixture
    def make_store(
        self, emptied: str, async_stores: Callable[..., Any]
    ) -> Callable[[Clock | None], AsyncSQLPaymentStore]:
        return partial(async_stores, AsyncSQLPaymentStore)

    @pytest.fixture
    def process_factory(self, db_url: str) -> Callable[[], SQLPaymentStore]:
        return partial(SQLPaymentStore.from_url, db_url)


def test_the_stores_satisfy_the_protocols(sync_stores: Callable[..., Any]) -> None:
    assert isinstance(sync_stores(SQLIdempotencyStore), IdempotencyStore)
    payments = sync_stores(SQLPaymentStore)
    assert isinstance(payments, PaymentStore)
    assert isinstance(payments, OutboxStore)


@pytest.mark.anyio
async def test_the_async_stores_satisfy_the_protocols(async_stores: Callable[..., Any]) -> None:
    assert isinstance(async_stores(AsyncSQLIdempotencyStore), AsyncIdempotencyStore)
    payments = async_stores(AsyncSQLPaymentStore)
    assert isinstance(payments, AsyncPaymentStore)
    assert isinstance(payments, AsyncOutboxStore)


# --- schema and migrations -------------------------------------------------------------------


def _ours(name: str | None, type_: str, _parents: object) -> bool:
    if type_ == "table":
        return bool(name) and name.startswith("idempay_") and name != "idempay_alembic_version"  # type: ignore[union-attr]
    return True


def test_the_migrated_schema_is_exactly_the_declared_one(db_url: str) -> None:
    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(
                conn, opts={"include_name": _ours, "compare_type": True}
            )
            assert compare_metadata(context, metadata) == []
            inspector = sa.inspect(conn)
            assert "idempay_alembic_version" in inspector.get_table_names()
            assert (
                conn.exec_driver_sql("SELECT version_num FROM idempay_alembic_version").scalar_one()
                == "0003"
            )
        # Upgrading again is a no-op.
        upgrade(engine)
    finally:
        engine.dispose()


def test_a_database_at_the_first_revision_upgrades_to_the_journal(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    upgrade(url, revision="0001")
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            assert "idempay_journal" not in sa.inspect(conn).get_table_names()
        upgrade(url)
        with engine.connect() as conn:
            assert "idempay_journal" in sa.inspect(conn).get_table_names()
    finally:
        engine.dispose()


def test_orders_stored_before_the_checks_migration_are_due_for_a_check(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'journal.db'}"
    upgrade(url, revision="0002")
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(
                "INSERT INTO idempay_orders (tenant, order_id, status, amount, currency,"
                " amount_refunded, dispute, observed_at, failures, version, created_at,"
                " updated_at) VALUES ('t', 'o1', 'processing', 100, 'eur', 0, 'none', 0, 0, 1,"
                " 0, 0)"
            )
    finally:
        engine.dispose()
    upgrade(url)
    with SQLPaymentStore.from_url(url) as store:
        claimed = store.claim_orders_to_check(
            statuses=[OrderStatus.PROCESSING], untouched_for=LEASE, limit=10, lease_for=LEASE
        )
    assert [(o.tenant, o.order_id) for o in claimed] == [("t", "o1")]


@pytest.mark.anyio
async def test_upgrade_runs_on_an_async_engine_through_run_sync(tmp_path: Path) -> None:
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'async.db'}")
    try:
        async with engine.begin() as conn:
            await conn.run_sync(upgrade)
        async with engine.connect() as conn:
            names = await conn.run_sync(lambda sync: set(sa.inspect(sync).get_table_names()))
        assert names == {*metadata.tables, "idempay_alembic_version"}
    finally:
        await engine.dispose()


def test_upgrade_failures_are_idempay_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError):
        upgrade(f"sqlite:///{tmp_path / 'bad.db'}", revision="no-such-revision")
    with socket_closed_port() as port, pytest.raises(StoreError) as caught:
        upgrade(f"postgresql+psycopg://postgres@127.0.0.1:{port}/nowhere")
    assert isinstance(caught.value.__cause__, sa.exc.SQLAlchemyError)


def test_create_all_builds_the_same_tables(tmp_path: Path) -> None:
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'quick.db'}")
    try:
        create_all(engine)
        create_all(engine)  # tables that exist are left alone
        with engine.connect() as conn:
            names = set(sa.inspect(conn).get_table_names())
        assert names == set(metadata.tables)
    finally:
        engine.dispose()


def test_mysql_key_columns_are_ascii_binary_whatever_the_database_default(
    mysql_db: str,
) -> None:
    engine = sa.create_engine(mysql_db)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.text(
                    "SELECT table_name, column_name, collation_name"
                    " FROM information_schema.columns"
                    " WHERE table_schema = DATABASE() AND table_name LIKE 'idempay\\_%'"
                    " AND table_name <> 'idempay_alembic_version' AND data_type = 'varchar'"
                )
            ).all()
            default = conn.exec_driver_sql("SELECT @@collation_database").scalar_one()
    finally:
        engine.dispose()
    assert default == "utf8mb4_general_ci"
    assert rows
    assert {collation for _, _, collation in rows} == {"ascii_bin"}


# --- keys ------------------------------------------------------------------------------------


def test_keys_differing_in_case_spaces_or_wildcards_stay_apart(
    sync_stores: Callable[..., Any],
) -> None:
    store = sync_stores(SQLIdempotencyStore)
    scope = _uid()
    keys = ["Key", "key", "KEY", "k%", "k_", "k\\", "k'", 'k"', "k x", "k x ", "k  x", "k\\%"]
    # validate_key refuses a trailing space; the others go in unchanged.
    keys.remove("k x ")
    for key in keys:
        assert isinstance(
            store.claim(scope, key, "fp", lease_for=LEASE, retain_for=RETAIN), Claimed
        )
    for key in keys:
        record = store.get(scope, key)
        assert record is not None
        assert record.key == key
    # A LIKE-style wildcard never matches another key.
    assert store.get(scope, "k") is None


def test_a_non_ascii_id_is_refused_by_mysql_and_kept_exactly_elsewhere(
    sync_stores: Callable[..., Any], db_url: str
) -> None:
    store = sync_stores(SQLPaymentStore)
    tenant = f"t\u00e9-{_uid()}"
    if _dialect(db_url) in ("mysql", "mariadb"):
        with pytest.raises(StoreError) as caught, store.transaction() as tx:
            tx.insert_order(tenant, "o1", NEW)
        assert tenant not in str(caught.value)
        assert not isinstance(caught.value.__cause__, StoreError)
        return
    with store.transaction() as tx:
        tx.insert_order(tenant, "o1", NEW)
    with store.transaction() as tx:
        found = tx.get_order(tenant, "o1")
        assert found is not None
        assert found.tenant == tenant


def test_an_over_long_id_is_refused_never_truncated(
    sync_stores: Callable[..., Any], db_url: str
) -> None:
    store = sync_stores(SQLPaymentStore)
    tenant = _uid() + "x" * 300
    if _dialect(db_url) == "sqlite":
        # SQLite does not enforce VARCHAR lengths: it keeps the whole id, which is as exact.
        with store.transaction() as tx:
            tx.insert_order(tenant, "o1", NEW)
        with store.transaction() as tx:
            assert tx.get_order(tenant[:255], "o1") is None
            assert tx.get_order(tenant, "o1") is not None
        return
    with pytest.raises(StoreError), store.transaction() as tx:
        tx.insert_order(tenant, "o1", NEW)
    with store.transaction() as tx:
        assert tx.get_order(tenant[:255], "o1") is None


def test_mysql_sessions_of_a_store_are_strict(mysql_db: str) -> None:
    with SQLPaymentStore.from_url(mysql_db) as store, store.engine.connect() as conn:
        assert (
            "STRICT_TRANS_TABLES" in conn.exec_driver_sql("SELECT @@SESSION.sql_mode").scalar_one()
        )
        assert conn.get_isolation_level() == "READ COMMITTED"


# --- joining the caller's transaction --------------------------------------------------------


@pytest.fixture
def app_table(db_url: str) -> Iterator[tuple[sa.Engine, sa.Table]]:
    """A table of 'the application', in the same database, and an engine of the app's own."""
    engine = sa.create_engine(db_url)
    table = sa.Table(
        f"app_licence_{_uid()}",
        sa.MetaData(),
        sa.Column("order_id", sa.String(64), primary_key=True),
    )
    table.create(engine)
    try:
        yield engine, table
    finally:
        table.drop(engine)
        engine.dispose()


def _count(engine: sa.Engine, table: sa.Table, order_id: str) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                sa.select(sa.func.count()).select_from(table).where(table.c.order_id == order_id)
            ).scalar_one()
        )


def test_a_joined_transaction_commits_and_rolls_back_with_the_callers(
    sync_stores: Callable[..., Any], app_table: tuple[sa.Engine, sa.Table]
) -> None:
    engine, licences = app_table
    store = sync_stores(SQLPaymentStore)
    tenant = _uid()

    class AppError(Exception):
        pass

    with pytest.raises(AppError), engine.begin() as conn:
        conn.execute(licences.insert().values(order_id="o1"))
        with store.transaction(conn) as tx:
            tx.insert_order(tenant, "o1", NEW)
            tx.append_audit(
                AuditDraft(tenant, "o1", AuditStep.STARTED, AuditSource.CHECKOUT, tx.now())
            )
        raise AppError  # the application changes its mind after idempay's block
    with store.transaction() as tx:
        assert tx.get_order(tenant, "o1") is None
        assert list(tx.audit_trail(tenant, "o1")) == []
    assert _count(engine, licences, "o1") == 0

    with engine.begin() as conn:
        conn.execute(licences.insert().values(order_id="o1"))
        with store.transaction(conn) as tx:
            tx.insert_order(tenant, "o1", NEW)
        # Still uncommitted: another connection does not see idempay's row yet.
        with engine.connect() as reader:
            orders = metadata.tables["idempay_orders"]
            assert reader.execute(sa.select(orders).where(orders.c.tenant == tenant)).all() == []
    with store.transaction() as tx:
        assert tx.get_order(tenant, "o1") is not None
    assert _count(engine, licences, "o1") == 1


def test_a_failure_inside_a_joined_block_undoes_only_idempays_part(
    sync_stores: Callable[..., Any], app_table: tuple[sa.Engine, sa.Table]
) -> None:
    engine, licences = app_table
    store = sync_stores(SQLPaymentStore)
    tenant = _uid()
    with store.transaction() as tx:
        base, _ = tx.insert_order(tenant, "o0", NEW)
    with engine.begin() as conn:
        conn.execute(licences.insert().values(order_id="o2"))
        with pytest.raises(ConcurrentUpdateError), store.transaction(conn) as tx:
            tx.insert_order(tenant, "o2", NEW)
            tx.update_order(base, OrderState(OrderStatus.CANCELED, 1999, "eur"))
            tx.update_order(base, OrderState(OrderStatus.PAID, 1999, "eur"))  # stale version
        # The caller's transaction is intact and carries on.
        conn.execute(licences.insert().values(order_id="o3"))
    with store.transaction() as tx:
        assert tx.get_order(tenant, "o2") is None
        current = tx.get_order(tenant, "o0")
        assert current is not None
        assert current.version == 1
    assert _count(engine, licences, "o2") == 1
    assert _count(engine, licences, "o3") == 1


def test_the_orm_session_connection_joins_too(
    sync_stores: Callable[..., Any], app_table: tuple[sa.Engine, sa.Table]
) -> None:
    from sqlalchemy.orm import Session

    engine, licences = app_table
    store = sync_stores(SQLPaymentStore)
    tenant = _uid()
    with Session(engine) as session:
        session.execute(licences.insert().values(order_id="o1"))
        with store.transaction(session.connection()) as tx:
            tx.insert_order(tenant, "o1", NEW)
        session.rollback()
    with store.transaction() as tx:
        assert tx.get_order(tenant, "o1") is None
    with Session(engine) as session, session.begin():
        session.execute(licences.insert().values(order_id="o1"))
        with store.transaction(session.connection()) as tx:
            tx.insert_order(tenant, "o1", NEW)
    with store.transaction() as tx:
        assert tx.get_order(tenant, "o1") is not None
    assert _count(engine, licences, "o1") == 1


@pytest.mark.anyio
async def test_an_async_joined_transaction_commits_and_rolls_back_with_the_callers(
    async_stores: Callable[..., Any], app_table: tuple[sa.Engine, sa.Table], db_url: str
) -> None:
    _, licences = app_table
    store = async_stores(AsyncSQLPaymentStore)
    tenant = _uid()
    engine = create_async_engine(async_url(db_url))
    try:
        async with engine.connect() as conn:
            await conn.execute(licences.insert().values(order_id="o1"))
            async with store.transaction(conn) as tx:
                await tx.insert_order(tenant, "o1", NEW)
            await conn.rollback()
        async with store.transaction() as tx:
            assert await tx.get_order(tenant, "o1") is None
        async with engine.begin() as conn:
            await conn.execute(licences.insert().values(order_id="o1"))
            async with store.transaction(conn) as tx:
                await tx.insert_order(tenant, "o1", NEW)
        async with store.transaction() as tx:
            assert await tx.get_order(tenant, "o1") is not None
    finally:
        await engine.dispose()


def test_a_connection_to_another_kind_of_database_is_refused(
    sync_stores: Callable[..., Any], tmp_path: Path, db_url: str
) -> None:
    if _dialect(db_url) == "sqlite":
        pytest.skip("needs a store on a server database")
    store = sync_stores(SQLPaymentStore)
    other = sa.create_engine(f"sqlite:///{tmp_path / 'other.db'}")
    try:
        with other.connect() as conn, pytest.raises(ConfigurationError), store.transaction(conn):
            pass
    finally:
        other.dispose()


# --- scenarios L6, L7, L8 --------------------------------------------------------------------


def test_l6_fifty_conflicting_transitions_retry_and_keep_every_invariant(
    sync_stores: Callable[..., Any],
) -> None:
    store = sync_stores(SQLPaymentStore, pool_size=10, max_overflow=50)
    tenant = _uid()
    with store.transaction() as tx:
        tx.insert_order(tenant, "o1", NEW)

    def transition(tx: Any) -> int:
        current = tx.get_order(tenant, "o1")
        failures = current.state.failures + 1
        updated = tx.update_order(
            current, OrderState(OrderStatus.CREATED, 1999, "eur", failures=failures)
        )
        tx.append_audit(
            AuditDraft(
                tenant,
                "o1",
                AuditStep.FAILED,
                AuditSource.WEBHOOK,
                tx.now(),
                details={"n": str(failures)},
            )
        )
        tx.enqueue_effect(NewEffect(tenant, "o1", "payment_failed", str(failures)))
        return int(updated.version)

    def contend(_: int) -> int | str:
        try:
            return store.run_transaction(transition, attempts=50)
        except (ConcurrentUpdateError, TransientStoreError) as error:
            return type(error).__name__  # gave up after its retries: an error of ours

    outcomes = concurrently(50, contend)
    versions = sorted(v for v in outcomes if isinstance(v, int))
    assert versions == list(range(2, len(versions) + 2))
    with store.transaction() as tx:
        final = tx.get_order(tenant, "o1")
        trail = list(tx.audit_trail(tenant, "o1"))
    assert final is not None
    assert final.version == 1 + len(versions)
    assert final.state.failures == len(versions)
    assert len(trail) == len(versions)
    assert verify_trail(trail).ok
    assert len(store.effects_for(tenant, "o1")) == len(versions)
    # With fifty attempts each, every one of them gets through in practice.
    assert len(versions) == 50


def test_l7_sessions_inserting_one_absent_key_on_mariadb_make_one_row(mysql_db: str) -> None:
    records = SQLIdempotencyStore.from_url(mysql_db)
    payments = SQLPaymentStore.from_url(mysql_db)
    for _ in range(20):
        scope, tenant = _uid(), _uid()

        def claim(_: int, scope: str = scope) -> bool:
            result = records.claim(scope, "absent", "fp", lease_for=LEASE, retain_for=RETAIN)
            return isinstance(result, Claimed)

        def insert(_: int, tenant: str = tenant) -> bool:
            with payments.transaction() as tx:
                return bool(tx.insert_order(tenant, "o1", NEW)[1])

        assert concurrently(2, claim).count(True) == 1
        assert concurrently(2, insert).count(True) == 1
        assert concurrently(6, claim).count(True) == 0
    for store in (records, payments):
        _idle(store)
        store.close()
    engine = sa.create_engine(mysql_db)
    try:
        with engine.connect() as conn:
            dupes = conn.exec_driver_sql(
                "SELECT COUNT(*) FROM idempay_orders GROUP BY tenant, order_id HAVING COUNT(*) > 1"
            ).all()
    finally:
        engine.dispose()
    assert dupes == []


def _wait_until_someone_waits_for_a_lock(engine: sa.Engine, table: str) -> None:
    """Return once another session is blocked writing ``table`` (polled, no sleep).

    PostgreSQL lists lock waits in ``pg_locks``. InnoDB's lock-wait tables are a cache that
    busy polling keeps stale, so on MySQL the probe is the live process list: the other session
    is running its INSERT, which cannot finish before the row lock it needs is released.
    """
    if engine.dialect.name == "postgresql":
        probe = sa.text("SELECT COUNT(*) FROM pg_locks WHERE NOT granted")
    else:
        probe = sa.text(
            "SELECT COUNT(*) FROM information_schema.PROCESSLIST"
            " WHERE ID <> CONNECTION_ID() AND DB = DATABASE() AND COMMAND = 'Query'"
            " AND INFO LIKE :insert"
        ).bindparams(insert=f"INSERT INTO {table}%")
    deadline = monotonic() + 30
    with engine.connect() as conn:
        while conn.execute(probe).scalar_one() == 0:
            conn.rollback()  # a fresh snapshot at every probe
            assert monotonic() < deadline, "nobody ever waited for the lock"


def test_a_claim_waiting_on_an_uncommitted_insert_sees_the_committed_row(
    sync_stores: Callable[..., Any], db_url: str
) -> None:
    """The READ COMMITTED corner (PostgreSQL) and two sessions inserting one absent key (L7):
    the claim blocks on the other session's uncommitted row, which commits first; the claim
    must then return that row, not fail and not claim it twice."""
    if _dialect(db_url) == "sqlite":
        pytest.skip("SQLite has one writer at a time: no session waits on a row")
    store = sync_stores(SQLIdempotencyStore)
    scope = _uid()
    engine = sa.create_engine(db_url)
    try:
        other = engine.connect()
        other.begin()
        records = metadata.tables["idempay_idempotency_records"]
        far = 10**17  # microseconds: year 5138, never expired
        other.execute(
            records.insert().values(
                scope=scope,
                key="k",
                fingerprint="fp",
                state="in_progress",
                fence=1,
                lease_token="other-session",
                lease_expires_at=far,
                created_at=0,
                expires_at=far,
            )
        )
        outcome: list[Any] = []
        claimer = threading.Thread(
            target=lambda: outcome.append(
                store.claim(scope, "k", "fp", lease_for=LEASE, retain_for=RETAIN)
            )
        )
        claimer.start()
        try:
            _wait_until_someone_waits_for_a_lock(engine, "idempay_idempotency_records")
            other.commit()
        finally:
            claimer.join(timeout=60)
            other.close()
    finally:
        engine.dispose()
    (result,) = outcome
    assert isinstance(result, Existing)
    assert result.record.lease is not None
    assert result.record.lease.token == "other-session"


def test_an_order_insert_waiting_on_an_uncommitted_insert_fetches_it(
    sync_stores: Callable[..., Any], db_url: str
) -> None:
    if _dialect(db_url) == "sqlite":
        pytest.skip("SQLite has one writer at a time: no session waits on a row")
    store = sync_stores(SQLPaymentStore)
    tenant = _uid()
    engine = sa.create_engine(db_url)
    try:
        other = engine.connect()
        other.begin()
        orders = metadata.tables["idempay_orders"]
        other.execute(
            orders.insert().values(
                tenant=tenant,
                order_id="o1",
                status="created",
                amount=500,
                currency="usd",
                amount_refunded=0,
                dispute="none",
                observed_at=0,
                failures=0,
                version=1,
                created_at=0,
                updated_at=0,
            )
        )
        outcome: list[Any] = []

        def insert() -> None:
            with store.transaction() as tx:
                outcome.append(tx.insert_order(tenant, "o1", NEW))

        inserter = threading.Thread(target=insert)
        inserter.start()
        try:
            _wait_until_someone_waits_for_a_lock(engine, "idempay_orders")
            other.commit()
        finally:
            inserter.join(timeout=60)
            other.close()
    finally:
        engine.dispose()
    ((record, inserted),) = outcome
    assert not inserted
    assert record.state.amount == 500


@pytest.mark.postgres
def test_a_connection_killed_mid_transaction_is_a_store_error_and_the_pool_recovers(
    postgres_db: str,
) -> None:
    store = SQLPaymentStore.from_url(postgres_db)
    tenant = _uid()
    killer = sa.create_engine(postgres_db)
    try:
        with pytest.raises(StoreError) as caught, store.transaction() as tx:
            tx.insert_order(tenant, "o1", NEW)
            pid = tx.connection.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
            with killer.connect() as conn:
                conn.exec_driver_sql(f"SELECT pg_terminate_backend({int(pid)})")
            tx.get_order(tenant, "o1")
        assert not isinstance(caught.value, TransientStoreError)
        assert isinstance(caught.value.__cause__, sa.exc.DBAPIError)
        with store.transaction() as tx:  # a new connection, the dead one discarded
            assert tx.get_order(tenant, "o1") is None
        _idle(store)
    finally:
        killer.dispose()
        store.close()


def _l8_writer(url: str, tag: str, worker: int, start: Any, results: Any, *, rounds: int) -> None:
    records = SQLIdempotencyStore.from_url(url)
    payments = SQLPaymentStore.from_url(url)
    try:
        start.wait(timeout=60)
        wins = 0
        for n in range(rounds):
            claimed = records.claim(tag, f"k{n}", "fp", lease_for=LEASE, retain_for=RETAIN)
            if isinstance(claimed, Claimed):
                wins += 1
                records.complete(tag, f"k{n}", claimed.lease, StoredResponse(200))

            def work(tx: Any, n: int = n) -> None:
                tx.insert_order(tag, f"o{n}", NEW)
                tx.append_audit(
                    AuditDraft(tag, f"o{n}", AuditStep.DUPLICATE, AuditSource.WEBHOOK, tx.now())
                )
                tx.enqueue_effect(NewEffect(tag, f"o{n}", "receipt", str(worker)))

            payments.run_transaction(work, attempts=20)
        results.put(wins)
    except Exception as error:  # noqa: BLE001 - reported to the parent
        results.put(f"error: {type(error).__name__}: {error}")
    finally:
        records.close()
        payments.close()


@pytest.mark.sqlite
def test_l8_processes_writing_one_sqlite_file_never_see_database_is_locked(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    upgrade(url)
    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Barrier(4), ctx.Queue()
    rounds, tag = 40, _uid()
    procs = [
        ctx.Process(
            target=_l8_writer,
            args=(url, tag, i, start, results),
            kwargs={"rounds": rounds},
            daemon=True,
        )
        for i in range(4)
    ]
    for proc in procs:
        proc.start()
    outcomes = [results.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)
    assert all(isinstance(o, int) for o in outcomes), outcomes
    assert sum(outcomes) == rounds  # each key claimed by exactly one process
    payments = SQLPaymentStore.from_url(url)
    try:
        with payments.transaction() as tx:
            for n in range(rounds):
                assert tx.get_order(tag, f"o{n}") is not None
                trail = list(tx.audit_trail(tag, f"o{n}"))
                assert [e.seq for e in trail] == [1, 2, 3, 4]
                assert verify_trail(trail).ok
        assert all(len(payments.effects_for(tag, f"o{n}")) == 4 for n in range(rounds))
    finally:
        payments.close()


# --- errors, retries and time ----------------------------------------------------------------


def _held_row_lock(db_url: str, tenant: str) -> tuple[sa.Engine, sa.Connection]:
    """A connection of another engine holding the order row of ``tenant`` locked."""
    engine = sa.create_engine(db_url)
    conn = engine.connect()
    conn.begin()
    conn.exec_driver_sql(
        "UPDATE idempay_orders SET failures = failures WHERE tenant = %s"
        if _dialect(db_url) != "sqlite"
        else "UPDATE idempay_orders SET failures = failures WHERE tenant = ?",
        (tenant,),
    )
    return engine, conn


def test_a_lock_wait_timeout_is_a_transient_error_and_rolls_back(
    sync_stores: Callable[..., Any], db_url: str
) -> None:
    dialect = _dialect(db_url)
    if dialect == "sqlite":
        pytest.skip("SQLite waits for its busy timeout instead (see the L8 test)")
    options: dict[str, Any]
    if dialect == "postgresql":
        options = {"connect_args": {"options": "-c lock_timeout=200"}}
    else:
        options = {"connect_args": {"init_command": "SET innodb_lock_wait_timeout = 1"}}
    store = sync_stores(SQLPaymentStore, **options)
    tenant = _uid()
    with store.transaction() as tx:
        base, _ = tx.insert_order(tenant, "o1", NEW)
    engine, holder = _held_row_lock(db_url, tenant)
    try:
        with pytest.raises(TransientStoreError) as caught, store.transaction() as tx:
            tx.insert_order(tenant, "o2", NEW)
            tx.update_order(base, OrderState(OrderStatus.CANCELED, 1999, "eur"))
        assert caught.value.attempts == 1
        assert tenant not in str(caught.value)
    finally:
        holder.rollback()
        holder.close()
        engine.dispose()
    with store.transaction() as tx:
        assert tx.get_order(tenant, "o2") is None
        updated = tx.update_order(base, OrderState(OrderStatus.CANCELED, 1999, "eur"))
        assert updated.version == 2


def test_sqlite_busy_is_classified_as_transient(tmp_path: Path) -> None:
    path = tmp_path / "busy.db"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE t (x INTEGER)")
    holder.execute("BEGIN IMMEDIATE")
    engine = sa.create_engine(f"sqlite:///{path}", connect_args={"timeout": 0})
    try:
        with engine.connect() as conn, pytest.raises(sa.exc.OperationalError) as caught:
            conn.exec_driver_sql("INSERT INTO t VALUES (1)")
        assert isinstance(wrap(caught.value, "test"), TransientStoreError)
    finally:
        engine.dispose()
        holder.rollback()
        holder.close()


def test_an_unreachable_database_is_a_store_error_naming_no_key() -> None:
    with socket_closed_port() as port:
        url = f"postgresql+psycopg://postgres@127.0.0.1:{port}/nowhere"
        records = SQLIdempotencyStore.from_url(url, connect_args={"connect_timeout": 2})
        payments = SQLPaymentStore.from_url(url, connect_args={"connect_timeout": 2})
        try:
            with pytest.raises(StoreError) as caught:
                records.claim("scope", "secret-key", "fp", lease_for=LEASE, retain_for=RETAIN)
            assert "secret-key" not in str(caught.value)
            assert isinstance(caught.value.__cause__, sa.exc.SQLAlchemyError)
            with pytest.raises(StoreError), payments.transaction():
                pass
        finally:
            records.close()
            payments.close()


class socket_closed_port:  # noqa: N801 - reads as a context manager
    """A loopback port where nothing listens (bound, then closed)."""

    def __enter__(self) -> int:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        return port

    def __exit__(self, *_: object) -> None:
        return None


def test_times_must_be_timezone_aware(sync_stores: Callable[..., Any]) -> None:
    store = sync_stores(SQLPaymentStore)
    tenant = _uid()
    with store.transaction() as tx:
        tx.enqueue_effect(NewEffect(tenant, "o1", "receipt", "paid"))
    (entry,) = [
        e for e in store.claim_due_effects(limit=1000, lease_for=LEASE) if e.tenant == tenant
    ]
    with pytest.raises(ConfigurationError):
        store.fail_effect(entry, error="x", retry_at=datetime(2030, 1, 1))  # noqa: DTZ001
    store.fail_effect(entry, error="x", retry_at=datetime(2030, 1, 1, tzinfo=UTC))
    (after,) = store.effects_for(tenant, "o1")
    assert after.next_attempt_at == datetime(2030, 1, 1, tzinfo=UTC)
    assert after.lease is None


def test_an_unleased_entry_cannot_be_finished(sync_stores: Callable[..., Any]) -> None:
    store = sync_stores(SQLPaymentStore)
    tenant = _uid()
    with store.transaction() as tx:
        tx.enqueue_effect(NewEffect(tenant, "o1", "receipt", "paid"))
    (entry,) = store.effects_for(tenant, "o1")
    with pytest.raises(LeaseLostError):
        store.finish_effect(entry)


def test_the_database_clock_runs_leases_and_transactions(
    sync_stores: Callable[..., Any],
) -> None:
    records = sync_stores(SQLIdempotencyStore)
    payments = sync_stores(SQLPaymentStore)
    before = datetime.now(UTC)
    claimed = records.claim(_uid(), "k", "fp", lease_for=LEASE, retain_for=RETAIN)
    assert isinstance(claimed, Claimed)
    # The server runs on this machine: its clock agrees with ours to within a second.
    assert abs(claimed.record.created_at - before) < timedelta(seconds=1)
    assert claimed.lease.expires_at - claimed.record.created_at == LEASE
    with payments.transaction() as tx:
        first = tx.now()
        second = tx.now()
    assert first.tzinfo is not None
    assert first <= second
    assert abs(first - before) < timedelta(seconds=1)


def test_a_lease_is_fenced_by_token_and_fence_together(sync_stores: Callable[..., Any]) -> None:
    clock = FrozenClock()
    store = sync_stores(SQLIdempotencyStore, clock)
    scope = _uid()
    first = store.claim(scope, "k", "fp", lease_for=LEASE, retain_for=RETAIN)
    assert isinstance(first, Claimed)
    forged = Lease(
        token=first.lease.token, fence=first.lease.fence + 1, expires_at=first.lease.expires_at
    )
    with pytest.raises(LeaseLostError):
        store.checkpoint(scope, "k", forged, recovery_point="x")
    other = Lease(token="0" * 32, fence=first.lease.fence, expires_at=first.lease.expires_at)
    with pytest.raises(LeaseLostError):
        store.complete(scope, "k", other, StoredResponse(200))
    again = store.claim(scope, "k", "fp", lease_for=LEASE, retain_for=RETAIN)
    assert isinstance(again, Existing)


# --- URLs and engines ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "sync", "async_"),
    [
        ("sqlite:///x.db", "sqlite:///x.db", "sqlite+aiosqlite:///x.db"),
        ("sqlite+aiosqlite:///x.db", "sqlite:///x.db", "sqlite+aiosqlite:///x.db"),
        ("sqlite://", "sqlite://", "sqlite+aiosqlite://"),
        (
            "postgresql://u:p%40ss@h:5433/db",
            "postgresql+psycopg://u:p%40ss@h:5433/db",
            "postgresql+psycopg://u:p%40ss@h:5433/db",
        ),
        ("postgres+asyncpg://h/db", "postgresql+psycopg://h/db", "postgresql+psycopg://h/db"),
        ("mysql://root@h/db", "mysql+pymysql://root@h/db", "mysql+aiomysql://root@h/db"),
        (
            "mysql+aiomysql://root@h/db?charset=utf8mb4",
            "mysql+pymysql://root@h/db?charset=utf8mb4",
            "mysql+aiomysql://root@h/db?charset=utf8mb4",
        ),
        ("mariadb+pymysql://h/db", "mariadb+pymysql://h/db", "mariadb+aiomysql://h/db"),
    ],
)
def test_urls_map_between_sync_and_async_drivers(given: str, sync: str, async_: str) -> None:
    assert sync_url(given) == sync
    assert async_url(given) == async_


@pytest.mark.parametrize("url", ["oracle://h/db", "redis://h", "not a url"])
def test_unsupported_urls_are_configuration_errors(url: str) -> None:
    with pytest.raises(ConfigurationError):
        sync_url(url)
    with pytest.raises(ConfigurationError):
        SQLPaymentStore.from_url(url)


def test_an_engine_you_pass_stays_yours(db_url: str) -> None:
    engine = sa.create_engine(db_url)
    try:
        store = SQLIdempotencyStore(engine)
        claimed = store.claim(_uid(), "k", "fp", lease_for=LEASE, retain_for=RETAIN)
        assert isinstance(claimed, Claimed)
        store.close()
        with engine.connect() as conn:  # still usable
            assert conn.exec_driver_sql("SELECT 1").scalar_one() == 1
        assert engine.pool.checkedout() == 0
    finally:
        engine.dispose()


def test_the_store_as_a_context_manager_closes_its_engine(db_url: str) -> None:
    with SQLPaymentStore.from_url(db_url) as store:
        assert store.effects_for(_uid(), "o1") == []
        engine = store.engine
    assert engine.pool.checkedout() == 0


def test_a_sqlite_engine_runs_wal_and_immediate_transactions(tmp_path: Path) -> None:
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'mode.db'}")
    try:
        SQLPaymentStore(engine)  # configures the engine it is given
        create_all(engine)
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar_one() == "wal"
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar_one() == 5000
        other = sqlite3.connect(tmp_path / "mode.db", timeout=0)
        try:
            # BEGIN IMMEDIATE takes the write lock at once, before any write.
            with engine.begin(), pytest.raises(sqlite3.OperationalError, match="locked"):
                other.execute("BEGIN IMMEDIATE")
        finally:
            other.close()
    finally:
        engine.dispose()


# --- the webhook's two steps -----------------------------------------------------------------

PAID_EVENT = "payment_intent.succeeded"


def _inbox_event(event_id: str, **fields: Any) -> InboxEvent:
    base: dict[str, Any] = {
        "account": "",
        "event_id": event_id,
        "type": PAID_EVENT,
        "created": 1_767_225_600,
        "payload": b'{"id":"' + event_id.encode() + b'"}\x00\xff',
        "received_at": datetime.now(UTC),
    }
    return InboxEvent(**(base | fields))


def _draft(tenant: str, order_id: str, step: AuditStep = AuditStep.SUCCEEDED) -> AuditDraft:
    return AuditDraft(
        tenant, order_id, step, AuditSource.WEBHOOK, datetime.now(UTC), details={"n": "1"}
    )


def _paid(intent: str | None = None) -> OrderState:
    return OrderState(OrderStatus.PAID, 1999, "eur", payment_intent_id=intent)


def _order_with_trail(store: Any, tenant: str, intent: str | None = None) -> OrderRecord:
    with store.transaction() as tx:
        order, _ = tx.insert_order(
            tenant, "o1", OrderState(OrderStatus.CREATED, 1999, "eur", intent)
        )
        tx.append_audit(_draft(tenant, "o1", AuditStep.STARTED))
    return order


def _written(store: Any, tenant: str, event_id: str) -> tuple[Any, ...]:
    """Everything a commit may write for (tenant, o1) and the event, to compare before/after."""
    with store.transaction() as tx:
        rows = (
            tx.get_order(tenant, "o1"),
            list(tx.audit_trail(tenant, "o1")),
            tx.get_event("", event_id),
        )
    return (*rows, list(store.effects_for(tenant, "o1")))


class _Statements:
    """The statements an engine sends, and whether each ran outside any transaction."""

    def __init__(self, engine: sa.Engine) -> None:
        self.sent: list[tuple[str, bool]] = []
        self._engine = engine
        sa.event.listen(engine, "before_cursor_execute", self._record)

    def _record(self, conn: sa.Connection, _c: Any, statement: str, *_: Any) -> None:
        dbapi = conn.connection.dbapi_connection
        assert dbapi is not None
        idle = dbapi.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        self.sent.append((statement, bool(dbapi.autocommit) and idle))

    def take(self) -> list[tuple[str, bool]]:
        sent, self.sent = self.sent, []
        return sent

    def close(self) -> None:
        sa.event.remove(self._engine, "before_cursor_execute", self._record)


def _xmin(db_url: str, table: str, **key: str) -> tuple[Any, ...]:
    """The row versions (xmin) of ``table``'s rows matching ``key``: a rewritten row has a new
    one, so equal results mean nothing was written."""
    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            where = " AND ".join(f"{name} = :{name}" for name in key)
            return tuple(
                conn.execute(
                    sa.text(f"SELECT xmin::text FROM {table} WHERE {where} ORDER BY 1"),
                    key,
                ).scalars()
            )
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_on_postgresql_a_delivery_is_two_statements_and_one_commit_a_duplicate_one_read(
    postgres_db: str,
) -> None:
    store = SQLPaymentStore.from_url(postgres_db)
    watch = _Statements(store.engine)
    tenant, intent = _uid(), f"pi_{_uid()}"
    try:
        order = _order_with_trail(store, tenant, intent)
        event = _inbox_event(f"evt_{tenant}", payment_intent_id=intent)
        rows = _xmins(postgres_db, tenant, event.event_id)
        watch.take()
        got = store.receive_event(event)
        assert (got.event, got.order, got.audit_head.seq) == (None, order, 1)
        assert _xmins(postgres_db, tenant, event.event_id) == rows  # the read wrote nothing
        written = store.commit_event(
            EventCommit(
                event=event,
                status=InboxStatus.PROCESSED,
                expected_status=got.stored_status,
                audit_head=got.audit_head,
                order=got.order,
                new_state=_paid(intent),
                audit=(_draft(tenant, "o1"),),
                effects=(NewEffect(tenant, "o1", "receipt", "paid"),),
                order_id="o1",
            )
        )
        assert written is not None
        assert written.version == 2
        sent = watch.take()
        # Two statements, each in autocommit: one durable commit (the second), no BEGIN.
        assert len(sent) == 2, [s for s, _ in sent]
        assert all(outside for _, outside in sent), "a statement ran inside a transaction"

        before = _written(store, tenant, event.event_id)
        rows = _xmins(postgres_db, tenant, event.event_id)
        watch.take()
        again = store.receive_event(event)
        sent = watch.take()
        assert len(sent) == 1
        assert sent[0][1]
        assert again.event is not None
        assert again.event.status is InboxStatus.PROCESSED
        assert again.order == written
        assert again.audit_head.seq == 2
        assert _written(store, tenant, event.event_id) == before
        assert _xmins(postgres_db, tenant, event.event_id) == rows
        _idle(store)
    finally:
        watch.close()
        store.close()


def _xmins(db_url: str, tenant: str, event_id: str) -> dict[str, tuple[Any, ...]]:
    """The row versions of everything a delivery may write (see :func:`_xmin`)."""
    return {
        table: _xmin(db_url, table, **key)
        for table, key in (
            ("idempay_inbox", {"event_id": event_id}),
            ("idempay_orders", {"tenant": tenant}),
            ("idempay_audit", {"tenant": tenant}),
            ("idempay_outbox", {"tenant": tenant}),
        )
    }


@pytest.mark.postgres
def test_on_postgresql_claim_complete_and_lease_writes_are_one_statement_each_outside_begin(
    postgres_db: str,
) -> None:
    store = SQLIdempotencyStore.from_url(postgres_db)
    watch = _Statements(store.engine)
    scope = _uid()
    try:
        claimed = store.claim(scope, "k", "fp", lease_for=LEASE, retain_for=RETAIN)
        assert isinstance(claimed, Claimed)
        store.checkpoint(scope, "k", claimed.lease, recovery_point="order")
        lease = store.extend(scope, "k", claimed.lease, lease_for=LEASE)
        store.complete(scope, "k", lease, StoredResponse(201, b"{}"))
        assert store.get(scope, "k") is not None
        sent = watch.take()
        assert len(sent) == 5
        assert all(outside for _, outside in sent)
    finally:
        watch.close()
        store.close()


@pytest.mark.postgres
def test_transactions_read_the_database_clock_once_not_at_every_begin(postgres_db: str) -> None:
    store = SQLPaymentStore.from_url(postgres_db)
    watch = _Statements(store.engine)
    try:
        times = []
        for _ in range(5):
            with store.transaction() as tx:
                times.append(tx.now())
        assert len(watch.take()) == 1  # the first transaction sampled the clock
        assert times == sorted(times)
        assert abs(times[0] - datetime.now(UTC)) < timedelta(seconds=1)
    finally:
        watch.close()
        store.close()


def test_engines_from_urls_do_not_ping_unless_asked(db_url: str) -> None:
    with SQLPaymentStore.from_url(db_url) as plain:
        assert not plain.engine.pool._pre_ping
    with SQLPaymentStore.from_url(db_url, pool_pre_ping=True) as pinging:
        assert pinging.engine.pool._pre_ping
        assert pinging.effects_for(_uid(), "o1") == []


def test_commit_event_writes_several_entries_and_effects_and_keeps_existing_ones(
    sync_stores: Callable[..., Any],
) -> None:
    store = sync_stores(SQLPaymentStore)
    tenant = _uid()
    _order_with_trail(store, tenant)
    with store.transaction() as tx:
        tx.enqueue_effect(NewEffect(tenant, "o1", "receipt", "paid", '{"first":true}'))
    received = _inbox_event(f"evt_{tenant}")
    got = store.receive_event(received, tenant=tenant, order_id="o1")
    assert got.order is not None
    written = store.commit_event(
        EventCommit(
            event=received,
            status=InboxStatus.PROCESSED,
            expected_status=None,
            audit_head=got.audit_head,
            order=got.order,
            new_state=_paid(),
            audit=(_draft(tenant, "o1"), _draft(tenant, "o1", AuditStep.DUPLICATE)),
            effects=(
                NewEffect(tenant, "o1", "receipt", "paid", '{"second":true}'),
                NewEffect(tenant, "o1", "grant", "paid"),
                NewEffect(tenant, "o1", "ship", "paid"),
            ),
            order_id="o1",
        )
    )
    assert written is not None
    assert (written.state, written.version) == (_paid(), 2)
    with store.transaction() as tx:
        assert tx.get_order(tenant, "o1") == written
        trail = list(tx.audit_trail(tenant, "o1"))
        event = tx.get_event("", f"evt_{tenant}")
    assert [e.step for e in trail] == [AuditStep.STARTED, AuditStep.SUCCEEDED, AuditStep.DUPLICATE]
    assert verify_trail(trail).ok
    assert event is not None
    assert (event.status, event.attempts, event.order_id) == (InboxStatus.PROCESSED, 1, "o1")
    assert (event.payload, event.type, event.received_at) == (
        received.payload,
        received.type,
        received.received_at,
    )
    assert event.processed_at is not None
    effects = {e.effect: e.payload for e in store.effects_for(tenant, "o1")}
    assert effects == {"receipt": '{"first":true}', "grant": "{}", "ship": "{}"}
    # A commit that changes nothing but the inbox row: the order comes back unchanged.
    second = _inbox_event(f"evt2_{tenant}", order_id="hinted")
    other = store.receive_event(second, tenant=tenant, order_id="o1")
    assert other.order == written
    assert other.audit_head.seq == 3
    kept = store.commit_event(
        EventCommit(
            event=second,
            status=InboxStatus.FAILED,
            expected_status=None,
            audit_head=other.audit_head,
            order=other.order,
            error="not ours",
        )
    )
    assert kept == written
    with store.transaction() as tx:
        failed = tx.get_event("", f"evt2_{tenant}")
    assert failed is not None
    assert (failed.status, failed.error, failed.attempts, failed.order_id) == (
        InboxStatus.FAILED,
        "not ours",
        1,
        "hinted",
    )
    assert failed.processed_at is None
    # From the status read, the stored row is updated: one more attempt, the outcome set.
    retried = store.commit_event(
        EventCommit(
            event=second,
            status=InboxStatus.IGNORED,
            expected_status=InboxStatus.FAILED,
            audit_head=other.audit_head,
            order=other.order,
        )
    )
    assert retried == written
    with store.transaction() as tx:
        ignored = tx.get_event("", f"evt2_{tenant}")
    assert ignored is not None
    assert (ignored.status, ignored.error, ignored.attempts, ignored.order_id) == (
        InboxStatus.IGNORED,
        None,
        2,
        "hinted",
    )
    assert ignored.processed_at is not None


def test_a_refused_commit_writes_nothing(sync_stores: Callable[..., Any]) -> None:
    store = sync_stores(SQLPaymentStore)
    tenant, intent = _uid(), f"pi_{_uid()}"
    _order_with_trail(store, tenant, intent)
    with store.transaction() as tx:
        tx.insert_order(tenant, "taken", OrderState(OrderStatus.CREATED, 1999, "eur", "pi_taken"))
    event_id, stored_id = f"evt_{tenant}", f"evt_stored_{tenant}"
    event = _inbox_event(event_id, payment_intent_id=intent)
    stored = _inbox_event(stored_id, payment_intent_id=intent)
    got = store.receive_event(event)
    assert got.order is not None
    store.commit_event(
        EventCommit(
            event=stored,
            status=InboxStatus.FAILED,
            expected_status=None,
            audit_head=AuditHead(),
        )
    )

    def commit(**changes: Any) -> EventCommit:
        fields: dict[str, Any] = {
            "event": event,
            "status": InboxStatus.PROCESSED,
            "expected_status": None,
            "audit_head": got.audit_head,
            "order": got.order,
            "new_state": _paid(intent),
            "audit": (_draft(tenant, "o1"),),
            "effects": (NewEffect(tenant, "o1", "receipt", "paid"),),
            "order_id": "o1",
        }
        return EventCommit(**(fields | changes))

    def state() -> tuple[Any, ...]:
        return (*_written(store, tenant, event_id), _written(store, tenant, stored_id)[2])

    before = state()
    refusals: list[tuple[type[Exception], EventCommit]] = [
        # The order moved on (its version is no longer the one read).
        (ConcurrentUpdateError, commit(order=replace(got.order, version=7))),
        # The trail moved on, with or without a change of the order.
        (ConcurrentUpdateError, commit(audit_head=AuditHead())),
        (ConcurrentUpdateError, commit(new_state=None, audit_head=AuditHead())),
        (ConcurrentUpdateError, commit(audit_head=AuditHead(1, "f" * 64))),
        (ConcurrentUpdateError, commit(audit_head=AuditHead(0, "f" * 64))),
        # The new state names another order's PaymentIntent.
        (ConcurrentUpdateError, commit(new_state=_paid("pi_taken"))),
        # The event was read as stored, but it is not.
        (ConcurrentUpdateError, commit(expected_status=InboxStatus.ORPHAN)),
        (ConcurrentUpdateError, commit(expected_status=InboxStatus.ORPHAN, new_state=None)),
        # The event is stored although it was read as absent, or with another status: with a
        # compare-and-set that matches (PostgreSQL's guard undoes it), and without one.
        (ConcurrentUpdateError, commit(event=stored)),
        (ConcurrentUpdateError, commit(event=stored, expected_status=InboxStatus.ORPHAN)),
        (ConcurrentUpdateError, commit(event=stored, new_state=None, audit=())),
        # Entries of another order.
        (ConfigurationError, commit(audit=(_draft(tenant, "o2"),))),
    ]
    for error, refused in refusals:
        with pytest.raises(error) as caught:
            store.commit_event(refused)
        assert type(caught.value) is error, refused
        assert tenant not in str(caught.value)
        assert state() == before, refused
    # The refusals left the way open: the right commit goes through.
    assert store.commit_event(commit()) is not None


@pytest.mark.parametrize("change", [True, False], ids=["order-change", "no-order-change"])
def test_concurrent_commits_of_one_event_store_it_once(
    sync_stores: Callable[..., Any], change: bool
) -> None:
    store = sync_stores(SQLPaymentStore, pool_size=8)
    tenant = _uid()
    order = _order_with_trail(store, tenant)
    event = _inbox_event(f"evt_{tenant}")
    got = store.receive_event(event, tenant=tenant, order_id="o1")
    commit = EventCommit(
        event=event,
        status=InboxStatus.PROCESSED,
        expected_status=got.stored_status,
        audit_head=got.audit_head,
        order=order,
        new_state=_paid() if change else None,
        effects=(NewEffect(tenant, "o1", "receipt", "paid"),),
        order_id="o1",
    )

    def attempt(_: int) -> bool:
        try:
            store.commit_event(commit)
        except ConcurrentUpdateError:
            return False
        return True

    assert concurrently(8, attempt).count(True) == 1
    with store.transaction() as tx:
        stored = tx.get_event("", event.event_id)
        final = tx.get_order(tenant, "o1")
    assert stored is not None
    assert stored.attempts == 1
    assert final is not None
    assert final.version == (2 if change else 1)
    assert len(store.effects_for(tenant, "o1")) == 1


def test_a_commit_waiting_on_an_uncommitted_insert_of_its_event_is_refused(
    sync_stores: Callable[..., Any], db_url: str
) -> None:
    """A concurrent delivery stored the event first (still uncommitted when ours runs): ours
    waits for it, then writes nothing, even though its compare-and-set would have matched."""
    if _dialect(db_url) == "sqlite":
        pytest.skip("SQLite has one writer at a time: no session waits on a row")
    store = sync_stores(SQLPaymentStore)
    tenant = _uid()
    order = _order_with_trail(store, tenant)
    event = _inbox_event(f"evt_{tenant}")
    got = store.receive_event(event, tenant=tenant, order_id="o1")
    before = _written(store, tenant, event.event_id)
    engine = sa.create_engine(db_url)
    try:
        other = engine.connect()
        other.begin()
        inbox = metadata.tables["idempay_inbox"]
        other.execute(
            inbox.insert().values(
                account="",
                event_id=event.event_id,
                type=PAID_EVENT,
                created=1,
                payload=b"other",
                status="processed",
                attempts=1,
                received_at=0,
            )
        )
        outcome: list[Any] = []

        def commit() -> None:
            try:
                store.commit_event(
                    EventCommit(
                        event=event,
                        status=InboxStatus.PROCESSED,
                        expected_status=got.stored_status,
                        audit_head=got.audit_head,
                        order=order,
                        new_state=_paid(),
                        audit=(_draft(tenant, "o1"),),
                        effects=(NewEffect(tenant, "o1", "receipt", "paid"),),
                        order_id="o1",
                    )
                )
            except ConcurrentUpdateError as error:
                outcome.append(error)
            else:
                outcome.append(None)

        committer = threading.Thread(target=commit)
        committer.start()
        try:
            _wait_until_someone_waits_for_a_lock(engine, "idempay_inbox")
            other.commit()
        finally:
            committer.join(timeout=60)
            other.close()
    finally:
        engine.dispose()
    (error,) = outcome
    assert isinstance(error, ConcurrentUpdateError)
    after = _written(store, tenant, event.event_id)
    assert after[:2] == before[:2]
    assert after[3] == before[3]
    assert after[2] is not None
    assert after[2].payload == b"other"


@pytest.mark.anyio
async def test_the_async_webhook_steps_match_the_sync_ones(
    async_stores: Callable[..., Any],
) -> None:
    store = async_stores(AsyncSQLPaymentStore)
    tenant = _uid()
    async with store.transaction() as tx:
        order, _ = await tx.insert_order(tenant, "o1", NEW)
    event = _inbox_event(f"evt_{tenant}")
    got = await store.receive_event(event, tenant=tenant, order_id="o1")
    assert (got.event, got.order, got.audit_head) == (None, order, AuditHead())
    commit = EventCommit(
        event=event,
        status=InboxStatus.PROCESSED,
        expected_status=got.stored_status,
        audit_head=got.audit_head,
        order=got.order,
        new_state=_paid(),
        audit=(_draft(tenant, "o1"), _draft(tenant, "o1", AuditStep.DUPLICATE)),
        effects=(NewEffect(tenant, "o1", "receipt", "paid"), NewEffect(tenant, "o1", "a", "b")),
    )
    written = await store.commit_event(commit)
    assert written is not None
    assert written.version == 2
    with pytest.raises(ConcurrentUpdateError):
        await store.commit_event(commit)
    async with store.transaction() as tx:
        assert verify_trail(await tx.audit_trail(tenant, "o1")).ok
    assert len(await store.effects_for(tenant, "o1")) == 2
    again = await store.receive_event(event, tenant=tenant, order_id="o1")
    assert again.stored_status is InboxStatus.PROCESSED
