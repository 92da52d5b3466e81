"""How many data rules (``data.rules``) a logged prediction broke.

A served model with data rules logs, per row, the count of rules the row broke (0 when none);
a request refused for breaking one (``on_rule_violation: reject``) logs the count of its rows
that broke one. ``mlops monitor`` turns them into ``rule_violation_rate``. Rows logged before
this revision, and rows of models without rules, hold null.

Revision ID: log_0004
Revises: log_0003
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "log_0004"
down_revision = "log_0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("mlops_predictions") as batch:
        batch.add_column(sa.Column("violations", sa.Integer))


def downgrade() -> None:
    with op.batch_alter_table("mlops_predictions") as batch:
        batch.drop_column("violations")
