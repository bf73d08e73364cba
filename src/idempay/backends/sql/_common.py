"""What the sync and async SQL stores share: dialects, URLs, engine set-up, errors and time.

Nothing here performs I/O, except the SQLite connection hooks that SQLAlchemy calls itself.
"""

from __future__ import annotations

import logging
import secrets
from datetime import UTC, datetime, timedelta
from enum import Enum
from typing import Any, Final

from idempay._lazy import require
from idempay.errors import ConfigurationError, StoreError, TransientStoreError

require("sqlalchemy", extra="sqlite")

import sqlalchemy as sa  # noqa: E402
from sqlalchemy.engine import Dialect  # noqa: E402

__all__ = [
    "EPOCH",
    "Kind",
    "async_engine_url",
    "async_url",
    "default_engine_options",
    "engine_url",
    "from_micros",
    "install_sqlite_hooks",
    "is_unique_violation",
    "kind_of",
    "micros",
    "new_token",
    "positive",
    "require_driver",
    "span",
    "sync_url",
    "wrap",
]

logger = logging.getLogger(__name__)

EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND: Final = timedelta(microseconds=1)
SQLITE_BUSY_TIMEOUT_MS: Final = 5000


class Kind(Enum):
    """The three database families the store speaks to, each with its own statements."""

    SQLITE = "sqlite"
    POSTGRESQL = "postgresql"
    MYSQL = "mysql"


def kind_of(dialect: Dialect) -> Kind:
    """Return the family of an engine's dialect, or raise ConfigurationError."""
    name = dialect.name
    if name == "sqlite":
        return Kind.SQLITE
    if name == "postgresql":
        return Kind.POSTGRESQL
    if name in ("mysql", "mariadb"):
        return Kind.MYSQL
    raise ConfigurationError(f"the SQL store supports SQLite, PostgreSQL and MySQL, not {name!r}")


# --- URLs ------------------------------------------------------------------------------------

# (family, driver) -> (sync driver, async driver); psycopg 3 serves both.
_SYNC_DRIVERS: Final = {"sqlite": "pysqlite", "postgresql": "psycopg", "mysql": "pymysql"}
_ASYNC_DRIVERS: Final = {"sqlite": "aiosqlite", "postgresql": "psycopg", "mysql": "aiomysql"}
_FAMILIES: Final = {
    "sqlite": "sqlite",
    "postgresql": "postgresql",
    "postgres": "postgresql",
    "mysql": "mysql",
    "mariadb": "mysql",
}
# The module each driver imports, and the extra that installs it.
_DRIVER_MODULES: Final = {
    "pysqlite": ("sqlite3", "sqlite"),
    "aiosqlite": ("aiosqlite", "sqlite"),
    "psycopg": ("psycopg", "postgres"),
    "pymysql": ("pymysql", "mysql"),
    "aiomysql": ("aiomysql", "mysql"),
}


def _with_driver(url: str, drivers: dict[str, str]) -> str:
    try:
        parsed = sa.make_url(url)
    except sa.exc.ArgumentError:
        raise ConfigurationError("not a valid SQLAlchemy database URL") from None
    backend = parsed.get_backend_name()
    family = _FAMILIES.get(backend)
    if family is None:
        raise ConfigurationError(f"the SQL store does not support URLs of scheme {backend!r}")
    # mariadb:// keeps its own dialect name; every other scheme gets its canonical one.
    scheme = backend if backend == "mariadb" else family
    driver = drivers[family]
    name = scheme if (family == "sqlite" and driver == "pysqlite") else f"{scheme}+{driver}"
    return parsed.set(drivername=name).render_as_string(hide_password=False)


def sync_url(url: str) -> str:
    """Return ``url`` with the sync driver idempay uses for its database.

    ``sqlite+aiosqlite://`` becomes ``sqlite://``, ``mysql+aiomysql://`` (or any MySQL driver)
    ``mysql+pymysql://``, and any PostgreSQL URL ``postgresql+psycopg://``.

    Raises:
        ConfigurationError: the URL is malformed or names another database.
    """
    return _with_driver(url, _SYNC_DRIVERS)


def async_url(url: str) -> str:
    """Return ``url`` with the async driver idempay uses for its database.

    ``sqlite://`` becomes ``sqlite+aiosqlite://``, ``mysql+pymysql://`` ``mysql+aiomysql://``,
    and any PostgreSQL URL ``postgresql+psycopg://`` (psycopg 3 is sync and async).

    Raises:
        ConfigurationError: the URL is malformed or names another database.
    """
    return _with_driver(url, _ASYNC_DRIVERS)


# The names the async source and its generated sync twin call (``async_`` is dropped).
async_engine_url = async_url
engine_url = sync_url


def require_driver(url: str) -> None:
    """Import the URL's driver now, so that a missing one names the extra that installs it."""
    driver = sa.make_url(url).get_driver_name()
    module, extra = _DRIVER_MODULES.get(driver, (None, ""))
    if module is not None:
        require(module, extra=extra)


def default_engine_options(url: str) -> dict[str, Any]:
    """Engine options for an engine idempay creates from a URL.

    PostgreSQL and MySQL connections run READ COMMITTED, where the store's statements need no
    gap locks and every statement reads the latest committed rows. MySQL sessions are also
    made strict, so that a value too long for its column is refused rather than truncated
    (the server default since MySQL 5.7 and MariaDB 10.2.4; this holds on a server set
    otherwise too).

    No ``pool_pre_ping``: it costs a round trip on every checkout, that is on every store
    operation. A connection the server dropped instead fails the statement it was running
    (a StoreError), and SQLAlchemy, recognising the disconnect, discards every pooled
    connection, so the next operation connects afresh. Pass ``pool_pre_ping=True`` to
    ``from_url`` to pay the round trip instead.
    """
    family = _FAMILIES.get(sa.make_url(url).get_backend_name())
    if family == "sqlite":
        return {}
    options: dict[str, Any] = {"isolation_level": "READ COMMITTED"}
    if family == "mysql":
        options["connect_args"] = {"init_command": _MYSQL_STRICT}
    return options


_MYSQL_STRICT: Final = (
    "SET SESSION sql_mode = CASE WHEN @@SESSION.sql_mode = '' THEN 'STRICT_TRANS_TABLES'"
    " ELSE CONCAT(@@SESSION.sql_mode, ',STRICT_TRANS_TABLES') END"
)


# --- SQLite ----------------------------------------------------------------------------------


def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    # The driver must not open transactions behind SQLAlchemy's back: the "begin" hook below
    # opens each one, as BEGIN IMMEDIATE.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        # The busy timeout first: switching to WAL may itself have to wait for other writers.
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA foreign_keys = ON")
    finally:
        cursor.close()


def _sqlite_begin(connection: sa.Connection) -> None:
    # IMMEDIATE takes the write lock at once (waiting up to the busy timeout): a deferred
    # transaction that reads and then writes fails with SQLITE_BUSY without waiting at all.
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def install_sqlite_hooks(engine: sa.Engine) -> None:
    """Make every transaction of a SQLite engine ``BEGIN IMMEDIATE``, in WAL mode, with a busy
    timeout (SQLAlchemy's documented recipe). Idempotent; applies to connections opened after.
    """
    if not sa.event.contains(engine, "connect", _sqlite_connect):
        sa.event.listen(engine, "connect", _sqlite_connect)
    if not sa.event.contains(engine, "begin", _sqlite_begin):
        sa.event.listen(engine, "begin", _sqlite_begin)


# --- errors ----------------------------------------------------------------------------------

_PG_TRANSIENT: Final = frozenset({"40001", "40P01", "55P03"})
_MYSQL_TRANSIENT: Final = frozenset({1205, 1213, 1020})
_SQLITE_BUSY: Final = frozenset({5, 6})  # SQLITE_BUSY, SQLITE_LOCKED (and extended codes)


def _sqlstate(orig: BaseException) -> str | None:
    state = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    return state if isinstance(state, str) else None


def _mysql_code(orig: BaseException) -> int | None:
    args = getattr(orig, "args", ())
    return args[0] if args and isinstance(args[0], int) else None


def _is_transient(error: sa.exc.DBAPIError) -> bool:
    orig = error.orig
    if orig is None:
        return False
    if _sqlstate(orig) in _PG_TRANSIENT:
        return True
    if _mysql_code(orig) in _MYSQL_TRANSIENT:
        return True
    code = getattr(orig, "sqlite_errorcode", None)
    if isinstance(code, int):
        return code & 0xFF in _SQLITE_BUSY
    # aiosqlite and old sqlite3 builds may not carry the code: fall back to the message.
    message = str(orig).lower()
    return type(orig).__module__.startswith("sqlite3") and (
        "database is locked" in message or "database table is locked" in message
    )


def is_unique_violation(error: sa.exc.DBAPIError) -> bool:
    """Whether a driver error is a duplicate key (PostgreSQL 23505, MySQL 1062, SQLite UNIQUE or
    PRIMARY KEY constraint)."""
    orig = error.orig
    if orig is None or not isinstance(error, sa.exc.IntegrityError):
        return False
    if _sqlstate(orig) == "23505" or _mysql_code(orig) == 1062:
        return True
    code = getattr(orig, "sqlite_errorcode", None)
    if isinstance(code, int):
        return code in (1555, 2067)  # SQLITE_CONSTRAINT_PRIMARYKEY, _UNIQUE
    message = str(orig)
    return "UNIQUE constraint failed" in message


def _error_code(error: sa.exc.SQLAlchemyError) -> str:
    orig = getattr(error, "orig", None)
    if orig is None:
        return type(error).__name__
    code = _sqlstate(orig) or _mysql_code(orig) or getattr(orig, "sqlite_errorname", None)
    name = type(orig).__name__
    return f"{name} {code}" if code else name


def wrap(error: sa.exc.SQLAlchemyError, what: str) -> StoreError:
    """The library's error for a SQLAlchemy or driver error raised while doing ``what``.

    Deadlocks, serialization failures, lock-wait timeouts and SQLite's busy become
    TransientStoreError (worth retrying); anything else StoreError. The message names the
    operation and the driver's error class and code, never the statement or its parameters.
    """
    if isinstance(error, sa.exc.DBAPIError) and _is_transient(error):
        return TransientStoreError(
            f"{what}: transient database error ({_error_code(error)})", attempts=1
        )
    return StoreError(f"{what}: database error ({_error_code(error)})")


# --- time and tokens -------------------------------------------------------------------------


def micros(moment: datetime) -> int:
    """Microseconds since the Unix epoch of an aware datetime."""
    if moment.tzinfo is None:
        raise ConfigurationError("times given to the SQL store must be timezone-aware")
    return (moment - EPOCH) // _MICROSECOND


def span(duration: timedelta) -> int:
    """A duration in whole microseconds."""
    return duration // _MICROSECOND


def from_micros(value: int) -> datetime:
    """The aware UTC datetime of a stored time."""
    return EPOCH + timedelta(microseconds=value)


def positive(value: timedelta, name: str) -> None:
    """Refuse a duration that is zero or negative."""
    if value <= timedelta(0):
        raise ConfigurationError(f"{name} must be positive")


def new_token() -> str:
    """A new lease token: 128 random bits in hex."""
    return secrets.token_hex(16)
