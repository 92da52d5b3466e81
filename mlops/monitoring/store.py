"""The monitoring store: served predictions, ground-truth labels, writer counts and alerts.

One SQLAlchemy URL (``monitoring.log_url``): SQLite by default, PostgreSQL in production.
The served model's background writer inserts predictions; ``mlops feedback`` inserts labels;
``mlops monitor`` reads both and inserts alerts. Nothing here deletes a prediction.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa

from mlops.db import open_tables

LOG_FILE = "predictions.db"  # the default prediction log beside a SQLite tracking store
META = sa.MetaData()
PREDICTIONS = sa.Table(
    "mlops_predictions",
    META,
    sa.Column(
        "id",
        sa.BigInteger().with_variant(sa.Integer, "sqlite"),
        primary_key=True,
        autoincrement=True,
    ),
    sa.Column("request_id", sa.String(32), nullable=False, index=True),
    sa.Column("row", sa.Integer, nullable=False),  # the row's position in its request
    sa.Column("at", sa.Float, nullable=False),  # epoch seconds when the request was answered
    sa.Column("model", sa.String(256), nullable=False),
    sa.Column("version", sa.String(64), nullable=False),
    sa.Column("status", sa.Integer, nullable=False),  # 200, or the 4xx/5xx the request got
    sa.Column("error", sa.Text),
    sa.Column("latency_ms", sa.Float, nullable=False),  # the wrapper's own work for the request
    # the features: numeric ones as little-endian float64 in the order of their layout (cheap to
    # write and to read back in bulk); categorical and masked (sensitive) ones as a JSON object.
    # MonitoringStore.features() decodes both into one table.
    sa.Column("layout", sa.String(16)),
    sa.Column("numeric", sa.LargeBinary),
    sa.Column("features", sa.Text),
    sa.Column("prediction", sa.Text),  # label or number, as text
    sa.Column("scores", sa.Text),  # JSON object of class probabilities
    sa.Column("arm", sa.String(64)),  # the alias answered for on a production server, if any
    # a shadow's rows: the same request scored off the request path; no client saw them
    sa.Column("shadow", sa.Boolean, nullable=False, server_default=sa.false()),
    # data rules (data.rules) the row broke; on a refused request's row, its rows that broke
    # one; null where the model has no rules (or the row was logged before they existed)
    sa.Column("violations", sa.Integer),
    sa.Index("ix_mlops_predictions_model_at", "model", "at"),
)
LAYOUTS = sa.Table(
    "mlops_prediction_layouts",
    META,
    sa.Column("id", sa.String(16), primary_key=True),
    sa.Column("columns", sa.Text, nullable=False),  # JSON list of the numeric columns' names
)
LABELS = sa.Table(
    "mlops_labels",
    META,
    sa.Column("request_id", sa.String(32), primary_key=True),
    sa.Column("row", sa.Integer, primary_key=True),
    sa.Column("model", sa.String(256), nullable=False),
    sa.Column("label", sa.Text, nullable=False),
    sa.Column("at", sa.Float, nullable=False),
)
WRITER_STATS = sa.Table(
    "mlops_prediction_log_stats",
    META,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("model", sa.String(256), nullable=False),
    sa.Column("version", sa.String(64), nullable=False),
    sa.Column("process", sa.String(128), nullable=False),
    sa.Column("written", sa.Integer, nullable=False),  # rows written since the previous stats row
    sa.Column("dropped", sa.Integer, nullable=False),  # rows dropped (buffer full) since then
    sa.Index("ix_mlops_prediction_log_stats_model_at", "model", "at"),
)
ALERTS = sa.Table(
    "mlops_alerts",
    META,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("model", sa.String(256), nullable=False, index=True),
    sa.Column("version", sa.String(64), nullable=False),
    sa.Column("rule", sa.String(128), nullable=False),
    sa.Column("metric", sa.String(256), nullable=False),
    sa.Column("value", sa.Float, nullable=False),
    sa.Column("threshold", sa.Float, nullable=False),
    sa.Column("message", sa.Text, nullable=False),
    sa.Column("action", sa.Text),  # e.g. "rolled back production from 3 to 2"
    sa.Column("check_run_id", sa.String(64)),
    sa.Column("webhook", sa.Text),  # delivery outcome (no secret of the URL), when one is set
)


@dataclass(frozen=True)
class Alert:
    at: float
    model: str
    version: str
    rule: str
    metric: str
    value: float
    threshold: float
    message: str
    action: str | None = None
    check_run_id: str | None = None
    webhook: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class MonitoringStore:
    """Reads and writes of the monitoring tables behind one URL (created on first use)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = open_tables(
            url, META, key="monitoring.log_url", what="prediction log", wal=True
        )

    # ---- predictions ----
    def predictions(
        self,
        model: str,
        version: str | None,
        since: float,
        until: float,
        *,
        shadow: bool = False,
    ) -> pd.DataFrame:
        """Logged rows of ``model`` (one version, or all) answered in ``[since, until)``; a
        shadow's rows (which answered no client) only with ``shadow=True``."""
        p = PREDICTIONS
        names = [
            "request_id",
            "row",
            "at",
            "version",
            "status",
            "latency_ms",
            "layout",
            "numeric",
            "features",
            "prediction",
            "arm",
            "shadow",
            "violations",
        ]
        query = sa.select(*(p.c[n] for n in names)).where(
            p.c.model == model, p.c.at >= since, p.c.at < until
        )
        if version is not None:
            query = query.where(p.c.version == version)
        if not shadow:
            query = query.where(p.c.shadow == sa.false())
        with self.engine.connect() as conn:
            return pd.DataFrame(conn.execute(query).all(), columns=names)

    def features(self, frame: pd.DataFrame) -> pd.DataFrame:
        """The features of the logged rows in ``frame`` (from :meth:`predictions`), one row each."""
        parts = []
        if len(frame) and frame["layout"].notna().any():
            ids = [i for i in frame["layout"].dropna().unique()]
            with self.engine.connect() as conn:
                layouts = dict(
                    conn.execute(
                        sa.select(LAYOUTS.c.id, LAYOUTS.c.columns).where(LAYOUTS.c.id.in_(ids))
                    ).all()
                )
            for layout, group in frame[frame["layout"].notna()].groupby("layout", sort=False):
                columns = json.loads(layouts[layout])
                values = np.frombuffer(b"".join(group["numeric"]), dtype="<f8").reshape(
                    len(group), len(columns)
                )
                parts.append(pd.DataFrame(values, columns=columns, index=group.index))
        numeric = (
            pd.concat(parts).reindex(frame.index) if parts else pd.DataFrame(index=frame.index)
        )
        other = (
            pd.DataFrame(loads_features(frame["features"].tolist()), index=frame.index)
            if len(frame)
            else None
        )
        if other is None or other.empty:
            return numeric
        return pd.concat([numeric, other], axis=1)

    def labels_for(self, model: str, request_ids: Iterable[str]) -> pd.DataFrame:
        rows = self._by_request_id(
            sa.select(LABELS.c.request_id, LABELS.c.row, LABELS.c.label).where(
                LABELS.c.model == model
            ),
            LABELS.c.request_id,
            request_ids,
        )
        return pd.DataFrame(rows, columns=["request_id", "row", "label"])

    def _by_request_id(
        self, query: sa.Select, column: sa.Column, request_ids: Iterable[str]
    ) -> list:
        """The rows of ``query`` whose ``column`` is one of ``request_ids`` (bounded IN lists)."""
        ids = list(dict.fromkeys(request_ids))
        rows: list = []
        with self.engine.connect() as conn:
            for start in range(0, len(ids), 5000):
                rows += conn.execute(query.where(column.in_(ids[start : start + 5000]))).all()
        return rows

    def writer_counts(
        self, model: str, version: str | None, since: float, until: float
    ) -> tuple[int, int]:
        """Rows written and rows dropped by the servers' writers in the span."""
        s = WRITER_STATS
        query = sa.select(
            sa.func.coalesce(sa.func.sum(s.c.written), 0),
            sa.func.coalesce(sa.func.sum(s.c.dropped), 0),
        ).where(s.c.model == model, s.c.at >= since, s.c.at < until)
        if version is not None:
            query = query.where(s.c.version == version)
        with self.engine.connect() as conn:
            written, dropped = conn.execute(query).one()
        return int(written), int(dropped)

    # ---- labels ----
    def add_labels(self, model: str, labels: pd.DataFrame, at: float) -> tuple[int, list[str]]:
        """Attach ``labels`` (request_id, row, label); returns (stored, unknown request ids).

        Every request id must name a logged prediction of ``model``; otherwise nothing is stored.
        A label given again for the same prediction replaces the earlier one.
        """
        known = {
            (r, int(i))
            for r, i in self._by_request_id(
                sa.select(PREDICTIONS.c.request_id, PREDICTIONS.c.row).where(
                    PREDICTIONS.c.model == model, PREDICTIONS.c.status == 200
                ),
                PREDICTIONS.c.request_id,
                labels["request_id"],
            )
        }
        keys = list(zip(labels["request_id"], labels["row"].astype(int), strict=False))
        unknown = sorted({f"{r}#{i}" if i else r for r, i in keys if (r, i) not in known})
        if unknown:
            return 0, unknown
        records = [
            dict(request_id=r, row=int(i), model=model, label=str(lab), at=at)
            for (r, i), lab in zip(keys, labels["label"], strict=False)
        ]
        with self.engine.begin() as conn:
            for start in range(0, len(keys), 5000):
                chunk = keys[start : start + 5000]
                conn.execute(
                    sa.delete(LABELS).where(sa.tuple_(LABELS.c.request_id, LABELS.c.row).in_(chunk))
                )
            conn.execute(sa.insert(LABELS), records)
        return len(records), []

    # ---- alerts ----
    def add_alert(self, alert: Alert) -> None:
        with self.engine.begin() as conn:
            conn.execute(sa.insert(ALERTS).values(**alert.as_dict()))

    def alerts(self, model: str) -> list[Alert]:
        with self.engine.connect() as conn:
            rows = (
                conn.execute(sa.select(ALERTS).where(ALERTS.c.model == model).order_by(ALERTS.c.id))
                .mappings()
                .all()
            )
        return [Alert(**{k: v for k, v in r.items() if k != "id"}) for r in rows]


def loads_features(texts: Iterable[str | None]) -> list[dict[str, Any]]:
    """Feature JSON objects of many rows, parsed in one call."""
    objects = [t if t else "{}" for t in texts]
    return json.loads("[" + ",".join(objects) + "]") if objects else []


@dataclass
class CheckResult:
    """One monitoring check: what it measured, noticed, alerted and did."""

    model: str
    version: str
    at: float
    window_s: float
    run_id: str
    status: str  # ok | insufficient_data
    metrics: dict[str, float] = field(default_factory=dict)
    drifted: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    alerts: list[Alert] = field(default_factory=list)
    rollback: str | None = None
    held: list[str] = field(default_factory=list)  # rules past their bound, under min_requests
