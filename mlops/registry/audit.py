"""The append-only audit trail of promotions, refusals and rollbacks, and the promotion lock.

Reached by a SQLAlchemy URL (``registry.audit_url``): SQLite by default, PostgreSQL in
production. Rows are only ever inserted.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from mlops.db import mask_url, open_tables
from mlops.errors import RegistryError

_META = sa.MetaData()
AUDIT = sa.Table(
    "mlops_audit",
    _META,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("who", sa.String(200), nullable=False),
    sa.Column("action", sa.String(20), nullable=False),  # promote | rollback
    sa.Column("outcome", sa.String(20), nullable=False),  # done | refused
    sa.Column("model", sa.String(256), nullable=False, index=True),
    sa.Column("target", sa.String(20), nullable=False),  # staging | production
    sa.Column("from_version", sa.String(20)),
    sa.Column("to_version", sa.String(20), nullable=False),
    sa.Column("reason", sa.Text),
    sa.Column("forced", sa.Boolean, nullable=False, default=False),
    sa.Column("gates", sa.Text, nullable=False),  # JSON list of gate results
)
LOCKS = sa.Table(
    "mlops_registry_lock",
    _META,
    sa.Column("model", sa.String(256), primary_key=True),
    sa.Column("holder", sa.String(200)),
    sa.Column("since", sa.DateTime(timezone=True)),
)


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
    to_version: str
    reason: str | None
    forced: bool
    gates: list[dict[str, Any]]


class AuditLog:
    """The audit table and the per-model promotion lock behind one SQLAlchemy URL."""

    def __init__(self, url: str) -> None:
        self.url = url
        # promoters queue on SQLite's write lock while another one re-evaluates its models
        self.engine = open_tables(
            url,
            _META,
            key="registry.audit_url",
            what="audit store",
            error=RegistryError,
            sqlite_timeout=120,
        )

    @contextmanager
    def lock(self, model: str, holder: str) -> Iterator[sa.Connection]:
        """Hold the promotion lock of ``model`` for the block (row lock / SQLite write lock).

        Yields the locked connection: records written through it commit with the release.
        Keep the audit store apart from a SQLite tracking store (its writes would wait).
        """
        try:
            with self.engine.begin() as conn:
                conn.execute(sa.insert(LOCKS).values(model=model, holder=None, since=None))
        except IntegrityError:
            pass  # the row exists already
        with self.engine.connect() as conn:
            with conn.begin():
                # The first write takes the lock: a row lock on PostgreSQL, the database write
                # lock on SQLite. A second promoter waits here until this one commits.
                conn.execute(
                    sa.update(LOCKS)
                    .where(LOCKS.c.model == model)
                    .values(holder=holder, since=_now())
                )
                yield conn

    def record(
        self,
        *,
        who: str,
        action: str,
        outcome: str,
        model: str,
        target: str,
        from_version: str | None,
        to_version: str,
        reason: str | None,
        forced: bool,
        gates: list[dict[str, Any]],
        conn: sa.Connection | None = None,
    ) -> AuditRecord:
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
        )
        try:
            if conn is not None:
                row_id = _insert_row(conn, values)
            else:
                with self.engine.begin() as own:
                    row_id = _insert_row(own, values)
        except SQLAlchemyError as exc:
            raise RegistryError(
                f"cannot write the audit record to {mask_url(self.url)}: {exc}"
            ) from exc
        return AuditRecord(id=int(row_id), **{**values, "gates": gates})  # type: ignore[arg-type]

    def records(self, model: str) -> list[AuditRecord]:
        with self.engine.connect() as conn:
            rows = (
                conn.execute(sa.select(AUDIT).where(AUDIT.c.model == model).order_by(AUDIT.c.id))
                .mappings()
                .all()
            )
        return [AuditRecord(**{**dict(r), "gates": json.loads(r["gates"])}) for r in rows]


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _insert_row(conn: sa.Connection, values: dict[str, Any]) -> Any:
    """Insert one audit row and return its generated id."""
    key = conn.execute(sa.insert(AUDIT).values(**values)).inserted_primary_key
    assert key is not None  # a single-row INSERT always reports its primary key
    return key[0]
