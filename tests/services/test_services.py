"""Each real service answers, and each test run works in a space of its own."""

from __future__ import annotations

import sqlite3

import pytest
import sqlalchemy as sa


def test_postgres_answers_in_a_database_of_its_own(postgres_url: str) -> None:
    engine = sa.create_engine(postgres_url)
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT 1 + 1")).scalar_one() == 2
            current = conn.execute(sa.text("SELECT current_database()")).scalar_one()
            assert current.startswith("idempay_test_")
            assert conn.execute(sa.text("SHOW server_version_num")).scalar_one() >= "120000"
    finally:
        engine.dispose()


def test_mysql_answers_with_a_binary_collation(mysql_url: str) -> None:
    engine = sa.create_engine(mysql_url)
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT 1 + 1")).scalar_one() == 2
            assert (
                conn.execute(sa.text("SELECT DATABASE()")).scalar_one().startswith("idempay_test_")
            )
            collation = conn.execute(sa.text("SELECT @@collation_database")).scalar_one()
            assert collation == "utf8mb4_bin"
            # Columns inherit the database's collation: keys compare byte for byte there, so
            # 'Key' and 'key' are two rows (string literals follow the connection's collation).
            conn.execute(sa.text("CREATE TEMPORARY TABLE probe (k VARCHAR(255) PRIMARY KEY)"))
            conn.execute(sa.text("INSERT INTO probe (k) VALUES ('Key'), ('key')"))
            assert (
                conn.execute(sa.text("SELECT COUNT(*) FROM probe WHERE k = 'key'")).scalar_one()
                == 1
            )
    finally:
        engine.dispose()


def test_redis_answers_under_the_run_prefix(redis_url: str, redis_prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        assert client.ping() is True
        key = f"{redis_prefix}probe"
        client.set(key, b"ok", px=60_000)
        assert client.get(key) == b"ok"
        assert 0 < client.pttl(key) <= 60_000
    finally:
        client.close()


def test_sqlite_file_supports_wal(sqlite_url: str) -> None:
    path = sa.make_url(sqlite_url).database
    assert path is not None
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
        assert conn.execute("SELECT 1 + 1").fetchone()[0] == 2
    finally:
        conn.close()


@pytest.mark.parametrize("kind", ["postgres", "mysql", "redis"])
def test_service_markers_are_registered(kind: str, pytestconfig: pytest.Config) -> None:
    markers = pytestconfig.getini("markers")
    assert any(str(m).startswith(f"{kind}:") for m in markers)
