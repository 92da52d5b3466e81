"""Which alias a logged prediction answered for, and whether it was a shadow's.

A production server that splits traffic between aliases (an A/B test) or lets a challenger
score a copy of it (shadow) logs each row with its ``arm`` (the alias) and ``shadow`` (true for
rows no client saw). Rows logged before this revision answered for no arm and were not shadows.

Revision ID: log_0003
Revises: log_0002
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "log_0003"
down_revision = "log_0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("mlops_predictions") as batch:
        batch.add_column(sa.Column("arm", sa.String(64)))
        batch.add_column(sa.Column("shadow", sa.Boolean, nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("mlops_predictions") as batch:
        batch.drop_column("shadow")
        batch.drop_column("arm")
