"""Test infrastructure: real PostgreSQL, MySQL/MariaDB, Redis and SQLite for every test run.

Each service is found, in order: from its environment variable (``IDEMPAY_TEST_POSTGRES_URL``,
``IDEMPAY_TEST_MYSQL_URL``, ``IDEMPAY_TEST_REDIS_URL``), on its default local port, or in a
container started by testcontainers when a Docker engine answers. Otherwise the tests that need
it are skipped with a reason saying how to provide one; under ``CI=true`` such a skip fails the
run, so CI can never pass without the real services.

Each run works in its own uniquely named databases and Redis key prefix, and drops them at the
end: it never touches data it did not create.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"
SERVICE_MARKERS = ("postgres", "mysql", "redis")
RUN_ID = secrets.token_hex(4)


@dataclass(frozen=True)
class Service:
    name: str
    env: str
    default_url: str
    image: str
    hint: str


SERVICES = {
    "postgres": Service(
        "PostgreSQL",
        "IDEMPAY_TEST_POSTGRES_URL",
        "postgresql+psycopg://postgres@127.0.0.1:5432/postgres",
        "postgres:16-alpine",
        "start PostgreSQL on 127.0.0.1:5432 (user postgres, trust auth)",
    ),
    "mysql": Service(
        "MySQL/MariaDB",
        "IDEMPAY_TEST_MYSQL_URL",
        "mysql+pymysql://root@127.0.0.1:3306/test",
        "mariadb:11",
        "start MariaDB or MySQL on 127.0.0.1:3306 (root, empty password)",
    ),
    "redis": Service(
        "Redis",
        "IDEMPAY_TEST_REDIS_URL",
        "redis://127.0.0.1:6379/0",
        "redis:7-alpine",
        "start Redis on 127.0.0.1:6379",
    ),
}


def _port_answers(url: str) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 0), 1.0):
            return True
    except OSError:
        return False


def _docker_answers() -> bool:
    try:
        import docker  # type: ignore[import-untyped]

        docker.from_env(timeout=2).ping()
    except Exception:  # noqa: BLE001 - any failure means "no engine here"
        return False
    return True


def _start_container(kind: str, stack: ExitStack) -> str:
    """Start a throwaway container for ``kind`` and return its URL (used only off this machine)."""
    if kind == "postgres":
        from testcontainers.postgres import PostgresContainer

        pg = stack.enter_context(PostgresContainer(SERVICES[kind].image, driver="psycopg"))
        return str(pg.get_connection_url())
    if kind == "mysql":
        from testcontainers.mysql import MySqlContainer

        my = stack.enter_context(MySqlContainer(SERVICES[kind].image, dialect="pymysql"))
        return str(my.get_connection_url())
    from testcontainers.redis import RedisContainer

    rd = stack.enter_context(RedisContainer(SERVICES[kind].image))
    return f"redis://{rd.get_container_host_ip()}:{rd.get_exposed_port(6379)}/0"


def unavailable(reason: str) -> None:
    """Skip the test, or fail it under CI=true, where every service must be present."""
    if IN_CI:
        pytest.fail(f"service unavailable in CI: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def _containers() -> Iterator[ExitStack]:
    with ExitStack() as stack:
        yield stack


def _service_url(kind: str, containers: ExitStack) -> str:
    service = SERVICES[kind]
    if url := os.environ.get(service.env):
        return url
    if _port_answers(service.default_url):
        return service.default_url
    if _docker_answers():
        return _start_container(kind, containers)
    unavailable(f"no {service.name}: set {service.env}, {service.hint}, or run a Docker engine")
    raise AssertionError  # unreachable: unavailable() always raises


@pytest.fixture(scope="session")
def postgres_server_url(_containers: ExitStack) -> str:
    """SQLAlchemy URL of a PostgreSQL server database with the right to create databases."""
    return _service_url("postgres", _containers)


@pytest.fixture(scope="session")
def mysql_server_url(_containers: ExitStack) -> str:
    """SQLAlchemy URL of a MySQL/MariaDB server with the right to create databases."""
    return _service_url("mysql", _containers)


@pytest.fixture(scope="session")
def redis_url(_containers: ExitStack) -> str:
    """URL of a Redis server."""
    return _service_url("redis", _containers)


def _scratch_database(
    server_url: str,
    create: Callable[[str], str],
    drop: Callable[[str], str],
    **engine_options: Any,
) -> Iterator[str]:
    import sqlalchemy as sa

    name = f"idempay_test_{RUN_ID}_{secrets.token_hex(3)}"
    admin = sa.create_engine(server_url, isolation_level="AUTOCOMMIT", **engine_options)
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(create(name)))
        try:
            yield sa.make_url(server_url).set(database=name).render_as_string(hide_password=False)
        finally:
            with admin.connect() as conn:
                conn.execute(sa.text(drop(name)))
    finally:
        admin.dispose()


@pytest.fixture(scope="session")
def postgres_url(postgres_server_url: str) -> Iterator[str]:
    """A PostgreSQL database created for this test run and dropped after it."""
    yield from _scratch_database(
        postgres_server_url,
        create=lambda name: f'CREATE DATABASE "{name}"',
        drop=lambda name: f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)',
    )


@pytest.fixture(scope="session")
def mysql_url(mysql_server_url: str) -> Iterator[str]:
    """A MySQL/MariaDB database (utf8mb4, binary collation) for this run, dropped after it."""
    yield from _scratch_database(
        mysql_server_url,
        create=lambda name: f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin",
        drop=lambda name: f"DROP DATABASE IF EXISTS `{name}`",
    )


@pytest.fixture
def own_postgres_url(postgres_server_url: str) -> Iterator[str]:
    """A PostgreSQL database for one test alone (a storm that drains every outbox row)."""
    yield from _scratch_database(
        postgres_server_url,
        create=lambda name: f'CREATE DATABASE "{name}"',
        drop=lambda name: f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)',
    )


@pytest.fixture
def own_mysql_url(mysql_server_url: str) -> Iterator[str]:
    """A MySQL/MariaDB database for one test alone."""
    yield from _scratch_database(
        mysql_server_url,
        create=lambda name: f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin",
        drop=lambda name: f"DROP DATABASE IF EXISTS `{name}`",
    )


@pytest.fixture(scope="session")
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix owned by this test run; every key under it is deleted at the end."""
    import redis

    prefix = f"idempay-test:{RUN_ID}:"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    try:
        for key in client.scan_iter(match=f"{prefix}*", count=1000):
            client.delete(key)
    finally:
        client.close()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """SQLAlchemy URL of a fresh SQLite database file for one test."""
    return f"sqlite:///{tmp_path / 'idempay.db'}"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark tests by the services their fixtures need, so ``-m postgres`` and the like work."""
    needs = {
        "postgres_url": "postgres",
        "own_postgres_url": "postgres",
        "own_mysql_url": "mysql",
        "postgres_server_url": "postgres",
        "mysql_url": "mysql",
        "mysql_server_url": "mysql",
        "redis_url": "redis",
        "redis_prefix": "redis",
        "sqlite_url": "sqlite",
    }
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        for fixture, marker in needs.items():
            if fixture in fixtures and item.get_closest_marker(marker) is None:
                item.add_marker(getattr(pytest.mark, marker))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Under CI=true, a skipped service-backed test is a failure."""
    report = yield
    skipped = report.skipped and not hasattr(report, "wasxfail")  # an xfail is not a skip
    if IN_CI and skipped and any(item.get_closest_marker(m) for m in SERVICE_MARKERS):
        report.outcome = "failed"
        report.longrepr = f"service-backed test skipped under CI=true: {report.longrepr}"
    return report


@pytest.fixture(scope="session")
def localstripe_url() -> Iterator[str]:
    """A localstripe server of this run's own, on a free loopback port; stopped by its PID."""
    import subprocess
    import sys

    server = Path(__file__).with_name("localstripe_server.py")
    proc = subprocess.Popen(
        [sys.executable, str(server), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("LISTENING "):
            unavailable("localstripe did not start (pip install localstripe)")
        url = f"http://127.0.0.1:{int(line.split()[1])}"
        for _ in range(200):
            if _port_answers(url):
                break
            threading.Event().wait(0.05)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.fixture
def anyio_backend() -> str:
    """Async tests run on asyncio, the loop every supported web framework uses."""
    return "asyncio"
