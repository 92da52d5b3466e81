"""Audit rows as intents: ``detail`` and ``settled_at`` columns, ``to_version`` nullable.

A promotion now writes its row first, as ``pending``, moves the alias, then settles the row
once (``done`` or ``failed``), so no failure leaves production moved without its row. A row
that records a change made outside mlops (action ``external``) may say that an alias was
removed: its ``to_version`` is then empty. ``detail`` says what happened beyond the gates
(why an intent failed, how a change outside mlops was noticed); ``settled_at`` when a pending
row was settled.

Revision ID: audit_0002
Revises: audit_0001
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "audit_0002"
down_revision = "audit_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # SQLite cannot change a column's nullability in place: batch mode copies the table (its
    # rows and its index) into the new shape, inside the upgrade's transaction
    with op.batch_alter_table("mlops_audit") as batch:
        batch.add_column(sa.Column("detail", sa.Text, nullable=True))
        batch.add_column(sa.Column("settled_at", sa.DateTime(timezone=True), nullable=True))
        batch.alter_column("to_version", existing_type=sa.String(20), nullable=True)


def downgrade() -> None:
    op.execute(sa.text("DELETE FROM mlops_audit WHERE to_version IS NULL"))
    with op.batch_alter_table("mlops_audit") as batch:
        batch.alter_column("to_version", existing_type=sa.String(20), nullable=False)
        batch.drop_column("settled_at")
        batch.drop_column("detail")
