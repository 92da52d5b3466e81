"""Prometheus metrics of ``mlops serve``: ``GET /metrics`` in the text format.

Every request to ``/invocations`` is counted and timed by the server around its whole handling
(reading the body, parsing, scoring, writing the answer), labelled with the model, the alias
(the arm) that answered and the version that did:

- ``mlops_requests_total{model,alias,version,status_class}``: ``2xx``, ``4xx`` or ``5xx``;
- ``mlops_request_duration_seconds{model,alias,version}``: a histogram (p50/p99 in Grafana);
- ``mlops_rows_scored_total{model,alias,version}``;
- ``mlops_alias_version{model,alias}``: the version number each alias is served at;
- ``mlops_reloads_total{model,alias,outcome}``: ``success`` or ``failed`` (a version refused);
- ``mlops_prediction_log_rows_total{model,version,outcome}``: ``written`` or ``dropped``, read
  from the prediction loggers' own counters;
- ``mlops_shadow_rows_total{model,version,outcome}``: ``scored``, ``dropped`` (the shadow's queue
  was full) or ``failed``.

With several workers ``mlops serve`` runs prometheus-client's multiprocess mode (its
supervisor sets ``PROMETHEUS_MULTIPROC_DIR`` to a folder of its own, removed when it exits), so
any worker's ``/metrics`` sums every worker. A collector that reads objects at scrape time
would only see the scraped worker's loggers, so their counts are carried into counters by
:meth:`ServerMetrics.sync_logs`: at each scrape and each registry poll of every worker (a
worker's prediction-log counts are at most one ``serving.reload_interval`` old).

The label children of a served version are made once, when it is loaded (:class:`Meter`): a
request only increments and observes.
"""

from __future__ import annotations

import os
import threading
import weakref
from dataclasses import dataclass
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# a one-row answer takes about a millisecond: buckets fine enough there for a useful p50
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
STATUS_CLASSES = ("2xx", "4xx", "5xx")
# a PredictionLogger's running totals, by the outcome label they are counted under
LOG_COUNTERS = {"written": "written_total", "dropped": "dropped_total"}
# every metric the server exposes, by the names a scrape shows (the dashboard and the alert
# rules shipped in conf/ may use no other; tests/test_production_server.py checks)
EXPOSED = (
    "mlops_requests_total",
    "mlops_request_duration_seconds_bucket",
    "mlops_request_duration_seconds_sum",
    "mlops_request_duration_seconds_count",
    "mlops_rows_scored_total",
    "mlops_alias_version",
    "mlops_reloads_total",
    "mlops_prediction_log_rows_total",
    "mlops_shadow_rows_total",
)


@dataclass(frozen=True)
class Meter:
    """The request metrics of one served version, labels bound (made at load)."""

    requests: dict[str, Any]  # status class -> counter
    duration: Any
    rows: Any

    def observe(self, status: int, seconds: float) -> None:
        """One answered request (any status) and its duration."""
        self.requests["2xx" if status < 400 else "4xx" if status < 500 else "5xx"].inc()
        self.duration.observe(seconds)


class ServerMetrics:
    """The metrics of one server process (in multiprocess mode, of one worker)."""

    def __init__(self) -> None:
        self.multiprocess = bool(os.environ.get(MULTIPROC_ENV))
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ["model", "alias", "version"]
        self.requests = Counter(
            "mlops_requests",
            "Requests to /invocations answered, by the version that answered and status class",
            [*labels, "status_class"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "mlops_request_duration_seconds",
            "Time to answer a request to /invocations, whole (read, parse, score, write)",
            labels,
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.rows = Counter(
            "mlops_rows_scored", "Rows scored and answered", labels, registry=self.registry
        )
        self.alias_version = Gauge(
            "mlops_alias_version",
            "The version number each alias is served at",
            ["model", "alias"],
            multiprocess_mode="mostrecent",
            registry=self.registry,
        )
        self.reloads = Counter(
            "mlops_reloads",
            "Versions loaded after an alias moved: success, or failed (refused, the old one kept)",
            ["model", "alias", "outcome"],
            registry=self.registry,
        )
        self.log_rows = Counter(
            "mlops_prediction_log_rows",
            "Prediction-log rows written to the store, or dropped (its buffer full)",
            ["model", "version", "outcome"],
            registry=self.registry,
        )
        self.shadow_rows = Counter(
            "mlops_shadow_rows",
            "Rows a shadow scored off the request path, dropped (its queue full) or failed",
            ["model", "version", "outcome"],
            registry=self.registry,
        )
        self._seen: weakref.WeakKeyDictionary[Any, dict[str, int]] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def meter(self, model: str, alias: str, version: str) -> Meter:
        """The request metrics of ``version`` answering for ``alias`` (each series shown at 0)."""
        requests = {c: self.requests.labels(model, alias, version, c) for c in STATUS_CLASSES}
        return Meter(
            requests,
            self.duration.labels(model, alias, version),
            self.rows.labels(model, alias, version),
        )

    def loaded(self, model: str, alias: str, version: str) -> None:
        self.alias_version.labels(model, alias).set(float(version))
        self.reloads.labels(model, alias, "success")  # shown at 0 before the first reload

    def reloaded(self, model: str, alias: str, *, ok: bool) -> None:
        self.reloads.labels(model, alias, "success" if ok else "failed").inc()

    def shadow(self, model: str, version: str, outcome: str, rows: int) -> None:
        self.shadow_rows.labels(model, version, outcome).inc(rows)

    def track_log(self, logger: Any) -> None:
        """Count ``logger``'s (a PredictionLogger's) rows from now on: each outcome it keeps a
        running total of (``written_total``, ``dropped_total``), shown at 0 until it grows."""
        kept = {o: 0 for o, attribute in LOG_COUNTERS.items() if hasattr(logger, attribute)}
        with self._lock:
            self._seen[logger] = kept
        for outcome in kept:
            self.log_rows.labels(logger.model, logger.version, outcome)

    def sync_logs(self) -> None:
        """Carry what each tracked logger wrote and dropped since the last call into counters."""
        with self._lock:
            for logger, seen in list(self._seen.items()):
                for outcome in seen:
                    total = int(getattr(logger, LOG_COUNTERS[outcome]))
                    if total > seen[outcome]:
                        self.log_rows.labels(logger.model, logger.version, outcome).inc(
                            total - seen[outcome]
                        )
                        seen[outcome] = total

    def exposition(self) -> tuple[bytes, str]:
        """``/metrics``: the body (every worker's, summed, in multiprocess mode) and its type."""
        self.sync_logs()
        if not self.multiprocess:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
