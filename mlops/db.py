"""SQLAlchemy engines for the project's own tables (audit trail, prediction log), one way.

Every store is reached by a URL (SQLite by default, PostgreSQL in production); messages show
it with the password masked. The tables carry a schema version and are migrated when a store
is opened (:mod:`mlops.migrations`).
"""

from __future__ import annotations

import sqlite3
import time

import sqlalchemy as sa
from sqlalchemy.exc import SQLAlchemyError

from mlops.errors import MlopsError


def mask_url(url: str) -> str:
    """``url`` with its password hidden, for messages."""
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - only for messages
        return "<invalid URL>"


def without_password(url: str) -> str:
    """``url`` with no password at all (the driver then reads it from its own sources, such as
    PostgreSQL's ``PGPASSWORD`` or ``~/.pgpass``); a URL SQLAlchemy cannot read is kept as is."""
    try:
        parsed = sa.engine.make_url(url)
    except sa.exc.ArgumentError:
        return url
    if parsed.password is None:
        return url
    bare = sa.engine.URL.create(  # URL.set() reads password=None as "keep it"
        parsed.drivername,
        parsed.username,
        None,
        parsed.host,
        parsed.port,
        parsed.database,
        parsed.query,
    )
    return bare.render_as_string(hide_password=False)


def create_engine(
    url: str, *, connect_timeout: int = 10, sqlite_timeout: int = 30, wal: bool = False
) -> sa.Engine:
    """An engine that fails fast on an unreachable server and waits out SQLite's write lock.

    ``wal``: a SQLite file is put in write-ahead-log mode (it stays so), where readers and the
    writer do not block each other: a long ``mlops monitor`` read does not stall the servers'
    prediction writers, and a commit costs less. The switch needs a moment when no other
    connection writes (SQLite answers "locked" at once rather than waiting): it is tried
    again for up to ``sqlite_timeout`` seconds.
    """
    args = (
        {"timeout": sqlite_timeout}
        if url.startswith("sqlite")
        else {"connect_timeout": connect_timeout}
    )
    engine = sa.create_engine(url, connect_args=args, pool_pre_ping=True)
    if (
        wal
        and engine.dialect.name == "sqlite"
        and (engine.url.database or ":memory:") != ":memory:"
    ):

        @sa.event.listens_for(engine, "connect")
        def _wal(dbapi_connection, _record) -> None:  # noqa: ANN001 - a DB-API connection
            _switch_to_wal(dbapi_connection, sqlite_timeout)

    return engine


def _switch_to_wal(dbapi_connection: sqlite3.Connection, timeout: float) -> None:
    if dbapi_connection.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal":
        return  # the usual case: switched by an earlier connection
    deadline = time.monotonic() + timeout
    while True:
        try:
            mode = dbapi_connection.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        except sqlite3.OperationalError as exc:
            # e.g. another store's upgrade holds the write lock of a file in rollback mode
            if "locked" not in str(exc):
                raise
            mode = "locked"
        if mode.lower() == "wal":
            return
        if time.monotonic() > deadline:
            raise sqlite3.OperationalError(f"cannot switch to WAL mode ({mode})")
        time.sleep(0.05)


def open_tables(
    url: str,
    metadata: sa.MetaData,
    *,
    key: str,
    what: str,
    error: type[MlopsError] = MlopsError,
    sqlite_timeout: int = 30,
    wal: bool = False,
) -> sa.Engine:
    """An engine for ``url`` with ``metadata``'s tables at their schema head.

    Failures raise ``error`` naming ``key``.

    The tables are created, adopted (made by an mlops without schema versions) or upgraded by
    the migration history that owns them (:mod:`mlops.migrations`); an open that finds them at
    the head costs one query.
    """
    # here, not at the top: the served model's prediction logger imports this module too and
    # should not pay for Alembic's import
    from alembic.util import CommandError

    from mlops.migrations import SchemaError, history_of, upgrade

    history = history_of(metadata.tables).name
    engine = None
    try:
        engine = create_engine(url, sqlite_timeout=sqlite_timeout, wal=wal)
        upgrade(engine, history)
    except SchemaError as exc:
        _dispose(engine)
        raise error(f"{key}: the {what} {mask_url(url)} cannot be used: {exc}") from None
    except (SQLAlchemyError, ImportError, CommandError) as exc:
        _dispose(engine)
        raise error(
            f"{key}: cannot open the {what} {mask_url(url)} ({exc.__class__.__name__}: "
            f"{str(exc).splitlines()[0]}); check the URL and that the database is reachable"
        ) from None
    return engine


def _dispose(engine: sa.Engine | None) -> None:
    if engine is not None:
        engine.dispose()
