"""Alembic environment of idempay's own migrations (run by ``idempay.backends.sql.upgrade``).

It touches only the ``idempay_`` tables and records its history in ``idempay_alembic_version``,
apart from any Alembic history of the application sharing the database. The connection comes
from ``config.attributes["connection"]``; failing that, from the ``sqlalchemy.url`` option
(``--sql`` mode writes the statements out instead of running them).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context

from idempay.backends.sql._migrate import VERSION_TABLE
from idempay.backends.sql._schema import metadata


def include_name(name: str | None, type_: str, _parent_names: object) -> bool:
    """Only idempay's tables are compared or migrated here (not the version table)."""
    if type_ == "table":
        return name is not None and name.startswith("idempay_") and name != VERSION_TABLE
    return True


def _migrate(connection: sa.Connection | None, url: str | None = None) -> None:
    context.configure(
        connection=connection,
        url=url,
        literal_binds=connection is None,
        target_metadata=metadata,
        version_table=VERSION_TABLE,
        include_name=include_name,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run() -> None:
    config = context.config
    url = config.get_main_option("sqlalchemy.url")
    if context.is_offline_mode():
        _migrate(None, url)
        return
    connection = config.attributes.get("connection")
    if connection is not None:
        _migrate(connection)
        return
    engine = sa.create_engine(url or "")
    try:
        with engine.begin() as owned:
            _migrate(owned)
    finally:
        engine.dispose()


run()
