"""Schema versions and migrations of the project's own tables: Alembic, run from code.

Two table sets, two histories
-----------------------------
The audit trail (``mlops_audit``, ``mlops_registry_lock``: :mod:`mlops.registry.audit`) and the
prediction log (``mlops_predictions`` and its four companions: :mod:`mlops.monitoring.store`)
are reached by two URLs. They may name two databases (by default, beside a SQLite tracking
store, ``mlops.db`` and ``predictions.db``) or one (a PostgreSQL tracking store holds both sets
and MLflow's own tables). So each set has its own Alembic history, in its own folder here
(``audit/``, ``log/``), with its own version table (``mlops_audit_alembic_version``,
``mlops_log_alembic_version``): a database holds exactly the sets opened on it, each at its own
version, and neither version table can collide with the ``alembic_version`` of MLflow (or of
Optuna) in the same database. One history for all tables would create the prediction tables in
the audit file and tie the two stores' upgrades together for nothing. :data:`HISTORIES` says
which tables each history owns; :func:`mlops.db.open_tables` picks the history by its tables.

Opening a store: :func:`upgrade`
--------------------------------
1. The version table is read without any lock. At the head: done. A repeated open costs one
   small query and never waits for a writer (an audit store's promoter holds the SQLite write
   lock for minutes).
2. Otherwise openers are serialised: on PostgreSQL by a transaction-level advisory lock keyed on
   the version table's name, on SQLite by ``BEGIN IMMEDIATE`` (the file's write lock, waited for
   up to the engine's timeout), and within a process by a lock of its own (Alembic keeps its
   running migration in module globals, so two threads must not run one each at once). Under
   the lock the version is read again (a racer may have upgraded meanwhile) and the revisions
   run in that same transaction. Both databases have transactional DDL: an upgrade lands whole
   or not at all, and a waiting opener sees it whole.
3. Other dialects get no lock; there, as everywhere, an attempt that fails on an object a racer
   created just before ("already exists") is tried again, and then finds the work done.

A database at a revision this code does not know (upgraded by a newer mlops) is refused, as
MLflow refuses a tracking store newer than itself.

Adopting a database made before versions
----------------------------------------
Until versions existed the tables were made by ``metadata.create_all``: such a database has
(some of) the tables but no version table. Each history's first revision, its baseline, is
written for both cases: it creates the tables that are missing and adopts those that exist,
adding any missing nullable column and any missing index (a table made by an older create_all);
rows are kept. A missing NOT NULL column stops the upgrade with a message. The version table is
then written as after any upgrade. The baseline's table definitions are frozen copies of the
tables as they were when versions began; the modules' tables may move on, the baseline may not.

Writing a migration
-------------------
Change the table in its module, then add a revision to its history, e.g.::

    from alembic import command
    from mlops.migrations import config
    command.revision(config("log"), "add model_uri to predictions", rev_id="log_0002")

(for ``autogenerate=True`` also set ``cfg.attributes["connection"]`` to a connection to a
database at the head and ``cfg.attributes["target_metadata"]`` to the module's MetaData). On
SQLite, change or drop columns inside ``op.batch_alter_table``; adding a column works as is.
Add a new table's name to :data:`HISTORIES`. ``tests/test_migrations.py`` checks that every
history's head matches the tables the code uses, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.exc import SQLAlchemyError

logger = logging.getLogger(__name__)
HERE = Path(__file__).resolve().parent
ATTEMPTS = 3  # tries of an upgrade that lost a race on a dialect without a lock
# Alembic's ``context`` and ``op`` are module globals: one upgrade at a time in a process
_IN_PROCESS = threading.Lock()


@dataclass(frozen=True)
class History:
    """One independent migration history: its folder (``name``), version table and tables."""

    name: str
    version_table: str
    tables: frozenset[str]  # the tables its head defines


HISTORIES: dict[str, History] = {
    h.name: h
    for h in (
        History(
            "audit",
            "mlops_audit_alembic_version",
            frozenset({"mlops_audit", "mlops_registry_lock"}),
        ),
        History(
            "log",
            "mlops_log_alembic_version",
            frozenset(
                {
                    "mlops_predictions",
                    "mlops_prediction_layouts",
                    "mlops_labels",
                    "mlops_prediction_log_stats",
                    "mlops_alerts",
                }
            ),
        ),
    )
}


class SchemaError(Exception):
    """A database's schema cannot be brought to this code's version (the message says why)."""


def history_of(tables: Iterable[str]) -> History:
    """The history that owns all of ``tables`` (a MetaData's table names)."""
    names = set(tables)
    for history in HISTORIES.values():
        if names and names <= history.tables:
            return history
    raise ValueError(
        f"no migration history owns all of the tables {sorted(names)}: "
        "add a revision that creates them and name them in mlops.migrations.HISTORIES"
    )


def config(history: str) -> Config:
    """An Alembic configuration of one history, made in code (no alembic.ini)."""
    h = HISTORIES[history]
    cfg = Config()
    cfg.set_main_option("script_location", _escape(HERE))
    cfg.set_main_option("version_locations", _escape(HERE / history))
    cfg.set_main_option("path_separator", "os")  # one folder, whatever its name holds
    cfg.set_main_option("version_path_separator", "os")  # the same for Alembic < 1.16
    cfg.set_main_option("version_table", h.version_table)
    return cfg


@cache
def scripts(history: str) -> ScriptDirectory:
    """The revision scripts of ``history`` (read once per process)."""
    return ScriptDirectory.from_config(config(history))


def heads(history: str) -> frozenset[str]:
    """The head revision(s) of ``history``."""
    return frozenset(scripts(history).get_heads())


def current(conn: sa.Connection, history: str) -> frozenset[str]:
    """The revision(s) ``conn``'s database is at for ``history``; empty: none recorded."""
    context = MigrationContext.configure(
        conn, opts={"version_table": HISTORIES[history].version_table}
    )
    return frozenset(context.get_current_heads())


def upgrade(engine: sa.Engine, history: str) -> bool:
    """Bring ``history``'s tables in ``engine``'s database to the head; True if anything ran.

    Safe with concurrent openers (see the module's docstring). Raises :class:`SchemaError` for a
    database newer than this code, and SQLAlchemy's errors for an unreachable or failing one.
    """
    with engine.connect() as conn:
        at = current(conn, history)
        conn.rollback()
        if at == heads(history):
            return False
        attempt = 1
        while True:
            try:
                with _IN_PROCESS, _locked(conn, history):
                    return _upgrade_locked(conn, history)
            except SQLAlchemyError as exc:
                if attempt == ATTEMPTS or not _lost_race(exc):
                    raise
                logger.info(
                    "%s schema upgrade met a concurrent one (%s); trying again",
                    history,
                    str(exc).splitlines()[0],
                )
                attempt += 1


def _upgrade_locked(conn: sa.Connection, history: str) -> bool:
    """The upgrade itself, in the caller's open transaction that holds the upgrade lock."""
    at = current(conn, history)
    if at == heads(history):
        return False  # a racer did it while this opener waited for the lock
    unknown = at - {rev.revision for rev in scripts(history).walk_revisions()}
    if unknown:
        raise SchemaError(
            f"the database's {history} tables are at schema revision "
            f"{', '.join(sorted(unknown))}, which this version of mlops does not know "
            f"(head: {', '.join(sorted(heads(history)))}): it was "
            "upgraded by a newer mlops; use that version (or newer) here too"
        )
    logger.info(
        "upgrading the %s tables from %s to %s",
        history,
        ", ".join(sorted(at)) or "nothing",
        ", ".join(sorted(heads(history))),
    )
    cfg = config(history)
    cfg.attributes["connection"] = conn
    command.upgrade(cfg, "heads")
    return True


@contextmanager
def _locked(conn: sa.Connection, history: str) -> Iterator[None]:
    """A transaction on ``conn`` that holds ``history``'s upgrade lock; committed at the end."""
    dialect = conn.dialect.name
    if dialect == "sqlite":
        # the DB-API module issues no BEGIN before DDL nor SELECT: take the write lock ourselves;
        # conn.commit() then commits it (the module sees the open transaction)
        conn.exec_driver_sql("BEGIN IMMEDIATE")
    elif dialect == "postgresql":
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _lock_key(history)})
    try:
        yield
    except BaseException:
        conn.rollback()
        raise
    conn.commit()


def _lock_key(history: str) -> int:
    """A stable signed 64-bit advisory lock key for ``history`` (per database)."""
    digest = hashlib.sha256(HISTORIES[history].version_table.encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def _lost_race(exc: SQLAlchemyError) -> bool:
    """Whether ``exc`` says another opener created something first."""
    text = str(getattr(exc, "orig", exc)).lower()
    return any(word in text for word in ("already exists", "duplicate"))


def _escape(path: Path) -> str:
    return str(path).replace("%", "%%")  # Config values are interpolated


# ---- used by the baseline revisions ----


def create_or_adopt(bind: sa.Connection, metadata: sa.MetaData) -> None:
    """Create ``metadata``'s tables that are missing; bring those that exist up to them.

    An existing table (made by ``create_all`` before versions existed) gets its missing
    nullable columns and missing indexes; its rows stay. Extra columns are left alone.
    """
    from alembic import op

    inspector = sa.inspect(bind)
    for table in metadata.sorted_tables:
        if not inspector.has_table(table.name):
            table.create(bind)
            continue
        present = {c["name"] for c in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name in present:
                continue
            if not column.nullable:
                raise SchemaError(
                    f"table {table.name} exists without its NOT NULL column {column.name}: "
                    "it was made by an mlops older than the first one with schema versions; "
                    "migrate its rows by hand or drop it"
                )
            logger.info("adopting table %s: adding column %s", table.name, column.name)
            op.add_column(table.name, sa.Column(column.name, column.type, nullable=True))
        indexes = {ix["name"] for ix in inspector.get_indexes(table.name)}
        for index in table.indexes:
            if index.name not in indexes:
                index.create(bind)
