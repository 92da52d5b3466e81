"""Baseline of the prediction log: its five tables as create_all made them.

Creates the tables on a fresh database and adopts them where an mlops without schema versions
made them (see :func:`mlops.migrations.create_or_adopt`): a log from before the numeric layout
gets its ``layout`` and ``numeric`` columns and its layouts table. The definitions are frozen
here: later changes to mlops.monitoring.store come as new revisions.

Revision ID: log_0001
Revises:
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from mlops.migrations import create_or_adopt

revision = "log_0001"
down_revision = None
branch_labels = None
depends_on = None


def tables(metadata: sa.MetaData) -> None:
    """Define the baseline tables in ``metadata``."""
    sa.Table(
        "mlops_predictions",
        metadata,
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer, "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("request_id", sa.String(32), nullable=False, index=True),
        sa.Column("row", sa.Integer, nullable=False),
        sa.Column("at", sa.Float, nullable=False),
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("status", sa.Integer, nullable=False),
        sa.Column("error", sa.Text),
        sa.Column("latency_ms", sa.Float, nullable=False),
        sa.Column("layout", sa.String(16)),
        sa.Column("numeric", sa.LargeBinary),
        sa.Column("features", sa.Text),
        sa.Column("prediction", sa.Text),
        sa.Column("scores", sa.Text),
        sa.Index("ix_mlops_predictions_model_at", "model", "at"),
    )
    sa.Table(
        "mlops_prediction_layouts",
        metadata,
        sa.Column("id", sa.String(16), primary_key=True),
        sa.Column("columns", sa.Text, nullable=False),
    )
    sa.Table(
        "mlops_labels",
        metadata,
        sa.Column("request_id", sa.String(32), primary_key=True),
        sa.Column("row", sa.Integer, primary_key=True),
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("label", sa.Text, nullable=False),
        sa.Column("at", sa.Float, nullable=False),
    )
    sa.Table(
        "mlops_prediction_log_stats",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("at", sa.Float, nullable=False),
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("process", sa.String(128), nullable=False),
        sa.Column("written", sa.Integer, nullable=False),
        sa.Column("dropped", sa.Integer, nullable=False),
        sa.Index("ix_mlops_prediction_log_stats_model_at", "model", "at"),
    )
    sa.Table(
        "mlops_alerts",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("at", sa.Float, nullable=False),
        sa.Column("model", sa.String(256), nullable=False, index=True),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("rule", sa.String(128), nullable=False),
        sa.Column("metric", sa.String(256), nullable=False),
        sa.Column("value", sa.Float, nullable=False),
        sa.Column("threshold", sa.Float, nullable=False),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("action", sa.Text),
        sa.Column("check_run_id", sa.String(64)),
        sa.Column("webhook", sa.Text),
    )


def upgrade() -> None:
    metadata = sa.MetaData()
    tables(metadata)
    create_or_adopt(op.get_bind(), metadata)


def downgrade() -> None:
    for name in (
        "mlops_alerts",
        "mlops_prediction_log_stats",
        "mlops_labels",
        "mlops_prediction_layouts",
        "mlops_predictions",
    ):
        op.drop_table(name)  # their indexes go with them
