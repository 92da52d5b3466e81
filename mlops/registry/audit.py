"""The audit trail of promotions, refusals, rollbacks and changes made outside mlops, and the
per-model promotion lock.

Reached by a SQLAlchemy URL (``registry.audit_url``): SQLite by default, PostgreSQL in
production. Rows are inserted and never deleted; the one update a row ever gets settles an
intent: a change is written first as a ``pending`` row, committed, and only then made, and the
row is settled once to ``done`` or ``failed`` (see :mod:`mlops.registry.promotion`). A pending
row left by a process that died between the two steps is settled against the registry by the
next command that holds the lock.

Actions: ``promote`` and ``rollback`` (outcomes ``pending``, ``done``, ``failed``, ``refused``),
``external`` (an alias moved outside mlops, noticed and recorded: ``done``), ``mirror``
(legacy stages put back in line with the aliases: ``pending``, ``done``, ``failed``) and the
traffic of a production server answering for two aliases, ``split_start``, ``split_stop``,
``shadow_start`` and ``shadow_stop`` (``done``; what is served in ``detail``), which move no
alias.

The lock serialises the promoters of one store and is held while they run their gates, so
every audit row names the version a promotion really replaced. It is independent of the
writes of the audit rows, which commit at once (an intent must be durable before its change):
a row lock held by a connection of its own on PostgreSQL (and other servers), an exclusive
``flock`` on ``<file>.lock`` beside a SQLite file (released by the OS if the process dies).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError, IntegrityError, SQLAlchemyError

from mlops.db import mask_url, open_tables
from mlops.errors import RegistryError, first_line

logger = logging.getLogger(__name__)

PENDING, DONE, FAILED, REFUSED = "pending", "done", "failed", "refused"
EXTERNAL, MIRROR = "external", "mirror"
LAST_CHANGE_TAG = "mlops.last_change"  # one compact line; the full record is in the audit table
# a production server starts or stops answering for a second alias (no alias moves)
TRAFFIC_ACTIONS = ("split_start", "split_stop", "shadow_start", "shadow_stop")

_META = sa.MetaData()
AUDIT = sa.Table(
    "mlops_audit",
    _META,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("who", sa.String(200), nullable=False),
    # promote | rollback | external | mirror | split_start | split_stop | shadow_start | shadow_stop
    sa.Column("action", sa.String(20), nullable=False),
    sa.Column("outcome", sa.String(20), nullable=False),  # pending | done | failed | refused
    sa.Column("model", sa.String(256), nullable=False, index=True),
    sa.Column("target", sa.String(20), nullable=False),  # staging | production
    sa.Column("from_version", sa.String(20)),
    sa.Column("to_version", sa.String(20)),  # empty: an alias removed outside mlops
    sa.Column("reason", sa.Text),
    sa.Column("forced", sa.Boolean, nullable=False, default=False),
    sa.Column("gates", sa.Text, nullable=False),  # JSON list of gate results
    sa.Column("detail", sa.Text),  # what happened beyond the gates (failure, how noticed)
    sa.Column("settled_at", sa.DateTime(timezone=True)),  # when a pending row was settled
)
LOCKS = sa.Table(
    "mlops_registry_lock",
    _META,
    sa.Column("model", sa.String(256), primary_key=True),
    sa.Column("holder", sa.String(200)),
    sa.Column("since", sa.DateTime(timezone=True)),
)

_LOCK_POLL_S = 0.1
# SQLite databases without a file (in memory): one lock per URL within this process
_MEMORY_LOCKS: dict[str, threading.Lock] = {}
_MEMORY_LOCKS_GUARD = threading.Lock()


@dataclass(frozen=True)
class AuditRecord:
    id: int
    at: datetime
    who: str
    action: str
    outcome: str
    model: str
    target: str
    from_version: str | None
    to_version: str | None
    reason: str | None
    forced: bool
    gates: list[dict[str, Any]]
    detail: str | None = None
    settled_at: datetime | None = None

    def as_json(self) -> dict[str, Any]:
        """The record as JSON values (ISO 8601 times), as the team server's audit API sends it."""
        out = dict(self.__dict__)
        out["at"] = self.at.isoformat()
        out["settled_at"] = self.settled_at.isoformat() if self.settled_at else None
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AuditRecord:
        """A record as :meth:`as_json` wrote it."""
        settled = data.get("settled_at")
        values: dict[str, Any] = {k: data.get(k) for k in cls.__dataclass_fields__}
        values.update(
            at=datetime.fromisoformat(data["at"]),
            settled_at=datetime.fromisoformat(settled) if settled else None,
            gates=list(data.get("gates") or []),
            forced=bool(data.get("forced")),
        )
        return cls(**values)

    def line(self) -> str:
        """The record as one line, as ``mlops audit`` prints it (control characters a client
        put in a reason or a detail printed escaped, so no row reads as two)."""
        return _one_line(self._line())

    def _line(self) -> str:
        failed = [g["gate"] for g in self.gates if not g.get("passed")]
        if self.action in TRAFFIC_ACTIONS:  # what is served says it all; no alias moved
            return (
                f"#{self.id} {self.at:%Y-%m-%d %H:%M:%S} {self.who} {self.action}: "
                f"{self.detail or '-'}{' reason: ' + self.reason if self.reason else ''}"
            )
        return (
            f"#{self.id} {self.at:%Y-%m-%d %H:%M:%S} {self.who} {self.action} {self.outcome}: "
            f"{self.target} {self.from_version or '-'} -> {self.to_version or '-'}"
            f"{' (forced)' if self.forced else ''}"
            f"{' reason: ' + self.reason if self.reason else ''}"
            f"{' failed: ' + ', '.join(failed) if failed else ''}"
            f"{' note: ' + self.detail if self.detail else ''}"
        )


class AuditLog:
    """The audit table and the per-model promotion lock behind one SQLAlchemy URL."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = open_tables(
            url,
            _META,
            key="registry.audit_url",
            what="audit store",
            error=RegistryError,
            sqlite_timeout=120,
        )

    # ---- the lock ----

    @contextmanager
    def lock(self, model: str, holder: str, *, timeout: float | None = None) -> Iterator[bool]:
        """Hold the promotion lock of ``model`` for the block; yields whether it is held.

        ``timeout``: seconds to wait for a holder to finish; ``None`` waits as long as it
        takes (a promotion), ``0`` tries once (``mlops status`` must not wait for a promotion).
        Audit rows written while the lock is held commit at once, each in its own transaction.
        """
        holder = holder[:200]
        if self.engine.dialect.name == "sqlite":
            with self._file_lock(model, timeout) as held:
                if held:
                    self._set_holder(model, holder)
                try:
                    yield held
                finally:
                    if held:
                        self._set_holder(model, None)
            return
        self._ensure_lock_row(model)
        with self.engine.connect() as conn:
            with conn.begin():
                held = self._row_lock(conn, model, timeout)
                if held:
                    conn.execute(
                        sa.update(LOCKS)
                        .where(LOCKS.c.model == model)
                        .values(holder=holder, since=_now())
                    )
                yield held

    def _row_lock(self, conn: sa.Connection, model: str, timeout: float | None) -> bool:
        """Take the lock row of ``model`` in ``conn``'s transaction (held until it ends)."""
        query = sa.select(LOCKS.c.model).where(LOCKS.c.model == model)
        try:
            if timeout is None:
                conn.execute(query.with_for_update())
            elif timeout <= 0:
                conn.execute(query.with_for_update(nowait=True))
            else:
                if conn.dialect.name == "postgresql":
                    ms = max(1, int(timeout * 1000))
                    conn.execute(sa.text(f"SET LOCAL lock_timeout = {ms}"))
                conn.execute(query.with_for_update())
        except DBAPIError as exc:
            if timeout is None or not _lock_not_available(exc):
                raise RegistryError(
                    f"cannot take the promotion lock of {model} in {mask_url(self.url)}: "
                    f"{str(exc.orig).splitlines()[0]}"
                ) from None
            return False
        return True

    def _ensure_lock_row(self, model: str) -> None:
        try:
            with self.engine.begin() as conn:
                if conn.execute(sa.select(LOCKS.c.model).where(LOCKS.c.model == model)).first():
                    return
                conn.execute(sa.insert(LOCKS).values(model=model, holder=None, since=None))
        except IntegrityError:
            pass  # another process inserted it first

    @contextmanager
    def _file_lock(self, model: str, timeout: float | None) -> Iterator[bool]:
        database = self.engine.url.database or ""
        if database in ("", ":memory:") or database.startswith("file:"):
            with _MEMORY_LOCKS_GUARD:
                mem = _MEMORY_LOCKS.setdefault(self.url, threading.Lock())
            got = mem.acquire(timeout=-1 if timeout is None else max(timeout, 0))
            try:
                yield got
            finally:
                if got:
                    mem.release()
            return
        import fcntl

        path = Path(database + ".lock")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            problem = f"cannot open the promotion lock file {path} beside the audit store: {exc}"
            if timeout is None:  # a promotion must hold the lock
                raise RegistryError(problem + "; make its folder writable") from None
            logger.warning("%s", problem)  # a reader (status, audit) goes on without it
            yield False
            return
        held = False
        try:
            deadline = None if timeout is None else time.monotonic() + max(timeout, 0)
            told = False
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    held = True
                    break
                except BlockingIOError:
                    if deadline is not None and time.monotonic() >= deadline:
                        break
                    if not told:
                        logger.info(
                            "waiting for the promotion lock of %s (%s)", model, self.holders()
                        )
                        told = True
                    time.sleep(_LOCK_POLL_S)
            yield held
        finally:
            if held:
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _set_holder(self, model: str, holder: str | None) -> None:
        """Note who holds the lock (SQLite: for the message of a waiting promoter)."""
        self._ensure_lock_row(model)
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    sa.update(LOCKS)
                    .where(LOCKS.c.model == model)
                    .values(holder=holder, since=_now() if holder else None)
                )
        except SQLAlchemyError as exc:  # informational only
            logger.debug("could not note the lock holder of %s: %s", model, exc)

    def holders(self) -> str:
        """Who holds a promotion lock of this store now, as far as it is noted."""
        try:
            with self.engine.connect() as conn:
                rows = conn.execute(
                    sa.select(LOCKS.c.model, LOCKS.c.holder, LOCKS.c.since).where(
                        LOCKS.c.holder.is_not(None)
                    )
                ).all()
        except SQLAlchemyError:
            return "holder unknown"
        return (
            "; ".join(f"{m} held by {h} since {s:%Y-%m-%d %H:%M:%S}" for m, h, s in rows)
            or "holder unknown"
        )

    # ---- the rows ----

    def record(
        self,
        *,
        who: str,
        action: str,
        outcome: str,
        model: str,
        target: str,
        from_version: str | None,
        to_version: str | None,
        reason: str | None,
        forced: bool,
        gates: list[dict[str, Any]],
        detail: str | None = None,
    ) -> AuditRecord:
        """Insert one row and commit it; raises :class:`RegistryError` if it cannot."""
        values = dict(
            at=_now(),
            who=who,
            action=action,
            outcome=outcome,
            model=model,
            target=target,
            from_version=from_version,
            to_version=to_version,
            reason=reason,
            forced=forced,
            gates=json.dumps(gates),
            detail=detail,
        )
        try:
            with self.engine.begin() as conn:
                key = conn.execute(sa.insert(AUDIT).values(**values)).inserted_primary_key
        except SQLAlchemyError as exc:
            raise RegistryError(
                f"cannot write the audit record to {mask_url(self.url)}: {first_line(exc, None)}"
            ) from None
        assert key is not None  # a single-row INSERT always reports its primary key
        return AuditRecord(id=int(key[0]), **{**values, "gates": gates})  # type: ignore[arg-type]

    def settle(self, record_id: int, outcome: str, detail: str | None = None) -> AuditRecord:
        """Settle the pending row ``record_id`` once, as ``outcome`` (with ``detail``)."""
        values: dict[str, Any] = {"outcome": outcome, "settled_at": _now()}
        if detail is not None:
            values["detail"] = detail
        try:
            with self.engine.begin() as conn:
                changed = conn.execute(
                    sa.update(AUDIT)
                    .where(AUDIT.c.id == record_id, AUDIT.c.outcome == PENDING)
                    .values(**values)
                ).rowcount
                row = conn.execute(sa.select(AUDIT).where(AUDIT.c.id == record_id)).mappings()
                found = row.first()
        except SQLAlchemyError as exc:
            raise RegistryError(
                f"cannot settle audit record #{record_id} in {mask_url(self.url)}: "
                f"{first_line(exc, None)}"
            ) from None
        if found is None or changed != 1:
            raise RegistryError(f"audit record #{record_id} is not pending; it was settled before")
        return _to_record(found)

    def records(
        self, model: str, outcome: str | None = None, *, last: int | None = None
    ) -> list[AuditRecord]:
        """The rows of ``model`` (with ``outcome``, if given), oldest first; with ``last``, only
        the newest ``last`` of them."""
        query = sa.select(AUDIT).where(AUDIT.c.model == model)
        if outcome is not None:
            query = query.where(AUDIT.c.outcome == outcome)
        if last is not None:
            query = query.order_by(AUDIT.c.id.desc()).limit(last)
        else:
            query = query.order_by(AUDIT.c.id)
        with self.engine.connect() as conn:
            rows = conn.execute(query).mappings().all()
        records = [_to_record(r) for r in rows]
        return records[::-1] if last is not None else records


def _one_line(text: str) -> str:
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _to_record(row: Any) -> AuditRecord:
    return AuditRecord(**{**dict(row), "gates": json.loads(row["gates"])})


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _lock_not_available(exc: DBAPIError) -> bool:
    """Whether ``exc`` says the lock is held by someone else (NOWAIT, lock_timeout)."""
    orig = exc.orig
    code = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    if code == "55P03":  # PostgreSQL lock_not_available
        return True
    text = str(orig).lower()
    return any(w in text for w in ("could not obtain lock", "lock wait timeout", "nowait"))


def last_change(record: AuditRecord) -> str:
    """The ``mlops.last_change`` tag's text for ``record`` (on the version it names)."""
    what = (
        f"{record.target} set outside mlops, noticed"
        if record.action == EXTERNAL
        else f"{record.action} to {record.target} {record.outcome} by {record.who}"
    )
    return f"{what} at {record.at:%Y-%m-%d %H:%M:%S} UTC (audit #{record.id})"
