"""Unkeyed hashes of sensitive values replaced by ``***``: no schema change, data only.

Before this revision the prediction log stored a sensitive column in "hash" mode as
``sha256:<16 hex digits>`` of the value, with no key: for a column of few values (an age, a
postcode) each is reversed by hashing the candidates. They are masked here, as the logger now
masks a sensitive value it has no key for; new values are keyed HMACs
(:mod:`mlops.monitoring.logger`). Drift was never computed on such a column, so no check reads
them. Irreversible by design: the downgrade leaves the masks.

Revision ID: log_0002
Revises: log_0001
Create Date: 2026-11-28
"""

from __future__ import annotations

import re

import sqlalchemy as sa
from alembic import op

revision = "log_0002"
down_revision = "log_0001"
branch_labels = None
depends_on = None

_UNKEYED = re.compile(r'"sha256:[0-9a-f]{16}"')
_BATCH = 5000


def upgrade() -> None:
    bind = op.get_bind()
    predictions = sa.table(
        "mlops_predictions", sa.column("id", sa.BigInteger), sa.column("features", sa.Text)
    )
    last = None
    while True:
        query = (
            sa.select(predictions.c.id, predictions.c.features)
            .where(predictions.c.features.like('%"sha256:%'))
            .order_by(predictions.c.id)
            .limit(_BATCH)
        )
        if last is not None:
            query = query.where(predictions.c.id > last)
        rows = bind.execute(query).all()
        if not rows:
            return
        changed = [
            {"row_id": row_id, "masked": _UNKEYED.sub('"***"', text)}
            for row_id, text in rows
            if _UNKEYED.search(text)
        ]
        if changed:
            bind.execute(
                sa.update(predictions)
                .where(predictions.c.id == sa.bindparam("row_id"))
                .values(features=sa.bindparam("masked")),
                changed,
            )
        last = rows[-1][0]


def downgrade() -> None:
    pass  # the hashes are gone for good
