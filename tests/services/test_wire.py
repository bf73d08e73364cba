"""idempay.testing.wire: what the proxy counts and how it breaks the wire, on real servers."""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterator

import psycopg
import pytest
import redis
import sqlalchemy as sa
from redis.backoff import NoBackoff
from redis.retry import Retry

from idempay.testing.wire import WireProxy, is_sql_write


def _libpq(url: str) -> str:
    """A SQLAlchemy URL as psycopg takes it (no ``+driver``)."""
    return sa.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@pytest.fixture
def pg(postgres_url: str) -> Iterator[WireProxy]:
    with WireProxy.from_url(postgres_url) as proxy:
        yield proxy


@pytest.fixture
def rp(redis_url: str) -> Iterator[WireProxy]:
    with WireProxy.from_url(redis_url) as proxy:
        yield proxy


@pytest.fixture
def table(postgres_url: str) -> Iterator[str]:
    """A table of this test's own, and a direct connection (not proxied) to look at it."""
    name = f"wire_{secrets.token_hex(4)}"
    with psycopg.connect(_libpq(postgres_url), autocommit=True) as direct:
        direct.execute(f"CREATE TABLE {name} (x int)")
        try:
            yield name
        finally:
            direct.execute(f"DROP TABLE {name}")


def _rows(postgres_url: str, table: str) -> list[int]:
    with psycopg.connect(_libpq(postgres_url), autocommit=True) as direct:
        return [x for (x,) in direct.execute(f"SELECT x FROM {table} ORDER BY x")]


def _no_retries(url: str) -> redis.Redis:
    # redis-py retries a command whose connection broke; the faults below must reach the test.
    return redis.Redis.from_url(url, retry=Retry(NoBackoff(), 0), socket_timeout=10)


# --- counting ------------------------------------------------------------------------------


def test_the_opening_exchange_is_counted_apart(pg: WireProxy, postgres_url: str) -> None:
    with psycopg.connect(pg.url_for(_libpq(postgres_url)), autocommit=True):
        opened = pg.stats()
    assert opened.connections == 1
    # psycopg asks for TLS (the proxy says no), then starts the session: two turns, apart.
    assert opened.startup_round_trips == 2
    assert (opened.round_trips, opened.statements) == (0, ())


def test_an_autocommit_select_is_one_round_trip(pg: WireProxy, postgres_url: str) -> None:
    with psycopg.connect(pg.url_for(_libpq(postgres_url)), autocommit=True) as conn:
        pg.reset()
        assert conn.execute("SELECT 1").fetchone() == (1,)
        stats = pg.stats()
    assert (stats.round_trips, stats.statements, stats.writes) == (1, ("SELECT 1",), ())


def test_a_transaction_sends_begin_the_statement_and_commit_one_at_a_time(
    pg: WireProxy, postgres_url: str, table: str
) -> None:
    # psycopg 3 outside autocommit: BEGIN, answered, then the INSERT, answered, then COMMIT.
    with psycopg.connect(pg.url_for(_libpq(postgres_url)), prepare_threshold=None) as conn:
        for value in range(3):
            pg.reset()
            conn.execute(f"INSERT INTO {table} VALUES (%s)", (value,))
            conn.commit()
            stats = pg.stats()
            insert = f"INSERT INTO {table} VALUES ($1)"
            assert stats.round_trips == 3
            assert stats.statements == ("BEGIN", insert, "COMMIT")
            assert stats.writes == (insert,)
    assert _rows(postgres_url, table) == [0, 1, 2]


def test_prepared_statements_are_still_counted(
    pg: WireProxy, postgres_url: str, table: str
) -> None:
    select = f"SELECT count(*) FROM {table} WHERE x = $1"
    with psycopg.connect(pg.url_for(_libpq(postgres_url)), autocommit=True) as conn:
        conn.prepare_threshold = 0  # prepared at the first execution
        pg.reset()
        conn.execute(f"SELECT count(*) FROM {table} WHERE x = %s", (1,))
        first = pg.stats()
        pg.reset()
        conn.execute(f"SELECT count(*) FROM {table} WHERE x = %s", (2,))
        again = pg.stats()
    # Parse (named) then Bind + Execute: two turns; then Bind + Execute of the named one only.
    assert (first.round_trips, first.statements) == (2, (select,))
    assert (again.round_trips, again.statements) == (1, (select,))


def test_an_sqlalchemy_pool_counts_each_operation_alike(pg: WireProxy, postgres_url: str) -> None:
    engine = sa.create_engine(pg.url_for(postgres_url))
    try:
        with engine.connect() as conn:  # the first connection: dialect set-up queries
            conn.execute(sa.text("SELECT 1"))
        per_operation = []
        for _ in range(3):
            pg.reset()
            with engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
            per_operation.append(pg.stats())
        auto = engine.execution_options(isolation_level="AUTOCOMMIT")
        pg.reset()
        with auto.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        autocommit = pg.stats()
    finally:
        engine.dispose()
    for stats in per_operation:
        # The pool's connection is reused: no opening exchange; SQLAlchemy's implicit
        # transaction, then the pool's reset-on-return rollback.
        assert (stats.connections, stats.startup_round_trips) == (0, 0)
        assert stats.round_trips == 3
        assert stats.statements == ("BEGIN", "SELECT 1", "ROLLBACK")
    assert (autocommit.round_trips, autocommit.statements) == (1, ("SELECT 1",))


def test_a_redis_pipeline_is_one_round_trip(
    rp: WireProxy, redis_url: str, redis_prefix: str
) -> None:
    key = f"{redis_prefix}wire:{secrets.token_hex(4)}"
    with redis.Redis.from_url(rp.url_for(redis_url)) as client:
        client.ping()
        opened = rp.stats()
        rp.reset()
        pipe = client.pipeline(transaction=False)
        pipe.set(key, b"1").get(key).delete(key)
        assert pipe.execute() == [True, b"1", 1]
        stats = rp.stats()
        rp.reset()
        assert client.eval("return redis.call('GET', KEYS[1])", 1, key) is None
        script = rp.stats()
    # redis-py's CLIENT SETINFO on connecting is the opening exchange, not the PING.
    assert opened.startup_round_trips >= 1
    assert (opened.round_trips, opened.statements) == (1, ("PING",))
    assert (stats.round_trips, stats.statements) == (1, ("SET", "GET", "DEL"))
    assert stats.writes == ("SET", "DEL")
    # A script may or may not write: reported apart.
    assert (script.statements, script.scripts, script.writes) == (("EVAL",), ("EVAL",), ())


@pytest.mark.parametrize(
    ("sql", "writes"),
    [
        ("SELECT 1", False),
        ("BEGIN", False),
        ("COMMIT", False),
        ("SELECT * FROM orders WHERE id = $1 FOR UPDATE", False),
        ("SELECT * FROM orders WHERE id = $1 FOR NO KEY UPDATE SKIP LOCKED", False),
        ("SELECT 'insert into x values (1)' AS text, \"update\" FROM t", False),
        ("SELECT updated_at FROM t -- then DELETE it", False),
        ("CREATE TABLE t (id int REFERENCES o ON DELETE CASCADE)", False),
        ("insert into t values (1)", True),
        ("UPDATE t SET x = 1", True),
        ("DELETE FROM t", True),
        ("WITH moved AS (UPDATE t SET x = 2 RETURNING 1) SELECT count(*) FROM moved", True),
        ("MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DO NOTHING", True),
        ("TRUNCATE t", True),
        ("COPY t (x) FROM STDIN", True),
        ("COPY t TO STDOUT", False),
    ],
)
def test_writes_are_told_from_reads(sql: str, writes: bool) -> None:
    assert is_sql_write(sql) is writes


# --- faults --------------------------------------------------------------------------------


def test_a_lost_commit_acknowledgement(pg: WireProxy, postgres_url: str, table: str) -> None:
    with psycopg.connect(pg.url_for(_libpq(postgres_url))) as conn:
        conn.execute(f"INSERT INTO {table} VALUES (1)")
        pg.drop_reply_after(lambda sql: sql.upper().startswith("COMMIT"))
        assert pg.drop_armed
        with pytest.raises(psycopg.OperationalError):
            conn.commit()
    # The client lost its connection, yet the server committed.
    assert _rows(postgres_url, table) == [1]
    assert not pg.drop_armed  # one shot: the next commit goes through
    with psycopg.connect(pg.url_for(_libpq(postgres_url))) as conn:
        conn.execute(f"INSERT INTO {table} VALUES (2)")
        conn.commit()
    assert _rows(postgres_url, table) == [1, 2]


def test_a_dropped_reply_leaves_the_earlier_replies_alone(
    pg: WireProxy, postgres_url: str, table: str
) -> None:
    with psycopg.connect(pg.url_for(_libpq(postgres_url)), autocommit=True) as conn:
        pg.drop_reply_after(lambda sql: sql.startswith("INSERT"))
        assert conn.execute("SELECT 41 + 1").fetchone() == (42,)
        with pytest.raises(psycopg.OperationalError):
            conn.execute(f"INSERT INTO {table} VALUES (3)")
    assert _rows(postgres_url, table) == [3]


def test_a_lost_redis_reply(rp: WireProxy, redis_url: str, redis_prefix: str) -> None:
    key = f"{redis_prefix}wire:{secrets.token_hex(4)}"
    with _no_retries(rp.url_for(redis_url)) as client, redis.Redis.from_url(redis_url) as direct:
        client.ping()
        rp.drop_reply_after(lambda name: name == "INCRBY")  # what redis-py's incr() sends
        with pytest.raises(redis.ConnectionError):
            client.incr(key)
        assert direct.get(key) == b"1"
        # A client that retries blindly would now count the increment twice.
        assert client.incr(key) == 2


def test_pause_holds_requests_until_resume(pg: WireProxy, postgres_url: str, table: str) -> None:
    with psycopg.connect(pg.url_for(_libpq(postgres_url)), autocommit=True) as conn:
        pg.pause()
        done = threading.Event()

        def insert() -> None:
            conn.execute(f"INSERT INTO {table} VALUES (7)")
            done.set()

        worker = threading.Thread(target=insert)
        worker.start()
        try:
            assert pg.wait_until_held()
            # Held by the proxy: the server never saw it.
            assert not done.is_set()
            assert _rows(postgres_url, table) == []
        finally:
            pg.resume()
            worker.join(timeout=30)
        assert done.is_set()
    assert _rows(postgres_url, table) == [7]


def test_pause_holds_replies_until_resume(rp: WireProxy, redis_url: str) -> None:
    channel = f"wire-{secrets.token_hex(4)}"
    with (
        redis.Redis.from_url(rp.url_for(redis_url)) as client,
        redis.Redis.from_url(redis_url) as direct,
    ):
        subscriber = client.pubsub()
        try:
            subscriber.subscribe(channel)
            assert subscriber.get_message(timeout=10)["type"] == "subscribe"
            rp.pause()
            assert direct.publish(channel, b"hello") == 1  # Redis sent it to the proxy
            assert rp.wait_until_held()
            assert subscriber.get_message(timeout=0) is None
            rp.resume()
            message = subscriber.get_message(timeout=10)
            assert message is not None
            assert message["data"] == b"hello"
        finally:
            subscriber.close()


def test_kill_connections_cuts_every_connection(pg: WireProxy, postgres_url: str) -> None:
    url = pg.url_for(_libpq(postgres_url))
    with psycopg.connect(url, autocommit=True) as one, psycopg.connect(url, autocommit=True):
        one.execute("SELECT 1")
        assert pg.kill_connections() == 2
        with pytest.raises(psycopg.OperationalError):
            one.execute("SELECT 1")
    # The proxy itself is still there: a new connection works.
    with psycopg.connect(url, autocommit=True) as again:
        assert again.execute("SELECT 2").fetchone() == (2,)


def test_close_leaves_no_thread_and_no_connection(postgres_url: str) -> None:
    before = set(threading.enumerate())
    proxy = WireProxy.from_url(postgres_url)
    conn = psycopg.connect(proxy.url_for(_libpq(postgres_url)), autocommit=True)
    try:
        conn.execute("SELECT 1")
        assert proxy.open_connections == 1
        proxy.close()
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
    finally:
        conn.close()
    assert set(threading.enumerate()) <= before
    assert proxy.open_connections == 0
    proxy.close()  # twice is harmless
