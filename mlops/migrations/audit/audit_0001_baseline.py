"""Baseline of the audit trail: mlops_audit and mlops_registry_lock as create_all made them.

Creates the tables on a fresh database and adopts them where an mlops without schema versions
made them (see :func:`mlops.migrations.create_or_adopt`). The definitions are frozen here:
later changes to mlops.registry.audit come as new revisions.

Revision ID: audit_0001
Revises:
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from mlops.migrations import create_or_adopt

revision = "audit_0001"
down_revision = None
branch_labels = None
depends_on = None


def tables(metadata: sa.MetaData) -> None:
    """Define the baseline tables in ``metadata``."""
    sa.Table(
        "mlops_audit",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("who", sa.String(200), nullable=False),
        sa.Column("action", sa.String(20), nullable=False),
        sa.Column("outcome", sa.String(20), nullable=False),
        sa.Column("model", sa.String(256), nullable=False, index=True),
        sa.Column("target", sa.String(20), nullable=False),
        sa.Column("from_version", sa.String(20)),
        sa.Column("to_version", sa.String(20), nullable=False),
        sa.Column("reason", sa.Text),
        sa.Column("forced", sa.Boolean, nullable=False),
        sa.Column("gates", sa.Text, nullable=False),
    )
    sa.Table(
        "mlops_registry_lock",
        metadata,
        sa.Column("model", sa.String(256), primary_key=True),
        sa.Column("holder", sa.String(200)),
        sa.Column("since", sa.DateTime(timezone=True)),
    )


def upgrade() -> None:
    metadata = sa.MetaData()
    tables(metadata)
    create_or_adopt(op.get_bind(), metadata)


def downgrade() -> None:
    for name in ("mlops_registry_lock", "mlops_audit"):
        op.drop_table(name)  # their indexes go with them
