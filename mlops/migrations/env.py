"""Alembic's environment for the project's own tables, run by :func:`mlops.migrations.upgrade`.

Online only, on the connection the caller passes in ``config.attributes["connection"]``; the
caller owns its transaction (and the upgrade lock in it). The version table is the history's
own (``version_table`` option), never MLflow's ``alembic_version``.
"""

from __future__ import annotations

from alembic import context

config = context.config
connection = config.attributes.get("connection")
if context.is_offline_mode() or connection is None:
    raise RuntimeError(
        "mlops migrations run from code, on a connection: use mlops.migrations.upgrade("
        "engine, history), or mlops.migrations.config(history) with "
        "attributes['connection'] set"
    )

context.configure(
    connection=connection,
    version_table=config.get_main_option("version_table"),
    target_metadata=config.attributes.get("target_metadata"),  # only for autogenerate
    render_as_batch=connection.dialect.name == "sqlite",  # autogenerate writes batch ops for SQLite
)
with context.begin_transaction():
    context.run_migrations()
