"""Versioned schema migrations, shipped in the package and run with Alembic.

idempay keeps its migration history in its own table, ``idempay_alembic_version``, so it never
meets the application's own Alembic history in the same database.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

import sqlalchemy as sa

from idempay._lazy import require
from idempay.backends.sql._common import sync_url, wrap
from idempay.errors import ConfigurationError

__all__ = ["MIGRATIONS", "VERSION_TABLE", "upgrade"]

MIGRATIONS: Final = Path(__file__).resolve().parent / "migrations"
"""The Alembic script directory (``env.py`` and ``versions/``)."""

VERSION_TABLE: Final = "idempay_alembic_version"
"""Where Alembic records which idempay migrations a database has had."""


def upgrade(url_or_engine: str | sa.Engine | sa.Connection, *, revision: str = "head") -> None:
    """Migrate the idempay tables to ``revision`` (the latest by default).

    ``url_or_engine`` is a database URL (a sync or async driver: the sync one is used), an
    engine, or a connection; on a connection the migrations run in its transaction, which the
    caller commits. With an async engine::

        async with engine.begin() as conn:
            await conn.run_sync(upgrade)

    Raises:
        MissingDependencyError: Alembic or the driver is not installed.
        ConfigurationError: the URL is malformed or names an unsupported database, or
            ``revision`` is not one of idempay's.
        StoreError: the database failed (TransientStoreError if it may succeed again).
    """
    require("alembic", extra="sqlite")
    from alembic import command
    from alembic.config import Config
    from alembic.util import CommandError

    def migrate(connection: sa.Connection) -> None:
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        config.attributes["connection"] = connection
        try:
            command.upgrade(config, revision)
        except CommandError as error:
            raise ConfigurationError(f"cannot upgrade to revision {revision!r}: {error}") from error
        except sa.exc.SQLAlchemyError as error:
            raise wrap(error, "upgrade") from error

    if isinstance(url_or_engine, sa.Connection):
        migrate(url_or_engine)
        return
    owned = isinstance(url_or_engine, str)
    engine = (
        sa.create_engine(sync_url(url_or_engine))
        if isinstance(url_or_engine, str)
        else url_or_engine
    )
    try:
        with engine.begin() as connection:
            migrate(connection)
    except sa.exc.SQLAlchemyError as error:
        # Connecting or committing failed (the migrations' own errors are wrapped above).
        raise wrap(error, "upgrade") from error
    finally:
        if owned:
            engine.dispose()
