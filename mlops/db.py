"""SQLAlchemy engines for the project's own tables (audit trail, prediction log), one way, and
the URLs' secrets.

Every store is reached by a URL (SQLite by default, PostgreSQL in production). A URL may name
its secrets as ``${VAR}`` placeholders: they are kept as written in everything logged or shown
and replaced by the environment's values (:func:`expand_env`) only at the moment of connecting
(:func:`create_engine`) or posting. Messages show a URL with every literal secret as ``***``
(:func:`mask_url`) and have the secrets scrubbed out of the errors they quote (:func:`scrub`).
The tables carry a schema version and are migrated when a store is opened
(:mod:`mlops.migrations`).
"""

from __future__ import annotations

import os
import re
import sqlite3
import time
from urllib.parse import quote

import sqlalchemy as sa
from sqlalchemy.exc import SQLAlchemyError

from mlops.config import (
    HIDDEN,
    PLACEHOLDER,
    literal_secrets,
    redact_url,
    split_url,
    strip_secrets,
)
from mlops.errors import ConfigError, MlopsError


def expand_env(url: str) -> str:
    """``url`` with each ``${VAR}`` replaced by the value of environment variable ``VAR``.

    Call it at the moment of connecting or posting, never before logging. A value placed in
    the userinfo or the query string is percent-encoded there (a password may hold ``@`` or
    ``/``); elsewhere (a whole URL in one variable, a host, a path) it is inserted as it is.
    Raises :class:`ConfigError` naming the variable when it is not set.
    """
    names = PLACEHOLDER.findall(url)
    if not names:
        return url
    missing = sorted({n for n in names if n not in os.environ})
    if missing:
        raise ConfigError(
            f"environment variable(s) {', '.join(missing)} not set: the URL {redact_url(url)} "
            "names its secret(s) there; set them in the environment of this process"
        )
    encoded = _encoded_spans(url)

    def value(match: re.Match[str]) -> str:
        raw = os.environ[match.group(1)]
        return quote(raw, safe="") if match.start() in encoded else raw

    return PLACEHOLDER.sub(value, url)


def _encoded_spans(url: str) -> set[int]:
    """Start offsets of the placeholders of ``url`` that sit in its userinfo or query string."""
    parts = split_url(url)
    if parts is None:
        return set()
    base = len(parts.scheme) + 3
    spans = []
    if parts.user is not None:
        end = base + len(parts.user)
        if parts.password is not None:
            end += 1 + len(parts.password)
        spans.append((base, end))
        base = end + 1  # past the "@"
    limit = url.find("#", base)
    limit = len(url) if limit < 0 else limit
    mark = url.find("?", base, limit)
    if mark >= 0:
        spans.append((mark + 1, limit))
    return {m.start() for start, end in spans for m in PLACEHOLDER.finditer(url, start, end)}


def secret_free_url(url: str) -> str:
    """``url`` with every literal password or token removed and ``${VAR}`` placeholders kept: a
    URL that may be stored (inside a model, say). What connects with it later gets the secret
    from the placeholder's variable or from the driver's own sources (PostgreSQL's
    ``PGPASSWORD`` or ``~/.pgpass``). The user name of a database URL is kept.
    """
    return strip_secrets(url)


def mask_url(url: str) -> str:
    """``url`` for a message: each literal password or token shown as ``***``, placeholders
    kept (:func:`mlops.config.redact_url`)."""
    return redact_url(url)


def scrub(text: str, *urls: str | None) -> str:
    """``text`` (an error message, say) with every secret of ``urls`` replaced by ``***``: the
    literal ones, and the values their placeholders take in this environment."""
    for url in urls:
        if not url:
            continue
        try:
            expanded = expand_env(url)
        except ConfigError:
            expanded = url
        for form in {expanded, url}:
            if form in text:
                text = text.replace(form, redact_url(url))
        for secret in sorted(
            set(literal_secrets(url)) | set(literal_secrets(expanded)), key=len, reverse=True
        ):
            if len(secret) >= 8:  # anywhere
                text = text.replace(secret, HIDDEN)
            else:  # a short one only as a word of its own: "ops" stays in "mlops"
                text = re.sub(rf"(?<![\w]){re.escape(secret)}(?![\w])", HIDDEN, text)
    return text


def create_engine(
    url: str, *, connect_timeout: int = 10, sqlite_timeout: int = 30, wal: bool = False
) -> sa.Engine:
    """An engine that fails fast on an unreachable server and waits out SQLite's write lock.

    ``wal``: a SQLite file is put in write-ahead-log mode (it stays so), where readers and the
    writer do not block each other: a long ``mlops monitor`` read does not stall the servers'
    prediction writers, and a commit costs less. The switch needs a moment when no other
    connection writes (SQLite answers "locked" at once rather than waiting): it is tried
    again for up to ``sqlite_timeout`` seconds.

    ``url`` may name its secrets as ``${VAR}``: they are read from the environment here
    (:func:`expand_env`), and only the engine holds them, in memory.
    """
    url = expand_env(url)
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
    except ConfigError as exc:
        raise ConfigError(f"{key}: {exc}") from None
    except SchemaError as exc:
        _dispose(engine)
        raise error(
            f"{key}: the {what} {mask_url(url)} cannot be used: {scrub(str(exc), url)}"
        ) from None
    except (SQLAlchemyError, ImportError, CommandError) as exc:
        _dispose(engine)
        first = scrub((str(exc).splitlines() or [""])[0], url)
        raise error(
            f"{key}: cannot open the {what} {mask_url(url)} ({exc.__class__.__name__}: "
            f"{first}); check the URL and that the database is reachable"
        ) from None
    return engine


def _dispose(engine: sa.Engine | None) -> None:
    if engine is not None:
        engine.dispose()
