"""The prediction log of a served model: a bounded in-process buffer and a background writer.

A request hands its arrays to :meth:`PredictionLogger.submit` (a lock, a counter and a deque
append: microseconds) and is answered at once. A daemon thread turns what is buffered into
rows (masking sensitive columns there, still inside the process: a keyed HMAC-SHA256 with the
key from the environment, or ``***``), writes them in batches
through SQLAlchemy, and records how many rows it wrote and dropped. When the store is slow
or down the rows wait in the buffer, up to ``capacity`` rows; beyond that new rows are
dropped and counted, and the count is written with the next successful batch, so
``mlops monitor`` reports it. Serving never waits on the database.
"""

from __future__ import annotations

import atexit
import collections
import hashlib
import hmac
import json
import logging
import os
import re
import socket
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain, repeat
from typing import Any

import numpy as np
import sqlalchemy as sa

from mlops.db import create_engine, expand_env, mask_url, scrub
from mlops.errors import ConfigError
from mlops.monitoring.store import LAYOUTS, PREDICTIONS, WRITER_STATS

logger = logging.getLogger(__name__)

MASK = "***"
# a sensitive value in "hash" mode: HMAC-SHA256 keyed by the variable MASK_KEY_ENV names (the
# same value gives the same text, so a column can still be grouped; without the key it cannot
# be reversed by trying the few values it may take)
HASH_PREFIX = "hmac-sha256:"
LEGACY_HASH_PREFIX = "sha256:"  # unkeyed hashes of older logs (replaced by log_0002)
MASK_KEY_ENV = "MLOPS_MASK_KEY"
MIN_KEY_CHARS = 16


# "..., got 'x' in row 3" (the input contract's messages): the value a client sent
_QUOTED_VALUE = re.compile(r"(\bgot ).*?( in row \d+)")


@dataclass
class _Request:
    request_id: str
    at: float
    latency_ms: float
    status: int
    error: str | None
    numeric: np.ndarray | None
    categorical: np.ndarray | None
    predictions: np.ndarray | None
    scores: np.ndarray | None
    rows: int
    violations: np.ndarray | int | None = None  # data rules broken, per row (or one for all)


COLUMNS = (
    "request_id",
    "row",
    "at",
    "model",
    "version",
    "status",
    "error",
    "latency_ms",
    "layout",
    "numeric",
    "features",
    "prediction",
    "scores",
    "arm",
    "shadow",
    "violations",
)


def _insert_sql(engine: sa.Engine) -> str:
    """INSERT of one prediction row in the driver's own parameter style."""
    quote = engine.dialect.identifier_preparer.quote
    style = engine.dialect.paramstyle
    marks = {
        "qmark": ["?"] * len(COLUMNS),
        "format": ["%s"] * len(COLUMNS),
        "pyformat": ["%s"] * len(COLUMNS),
        "numeric": [f":{i + 1}" for i in range(len(COLUMNS))],
    }.get(style)
    if marks is None:
        raise ValueError(f"unsupported DB-API parameter style {style!r}")
    return (
        f"INSERT INTO {quote(PREDICTIONS.name)} ({', '.join(quote(c) for c in COLUMNS)}) "
        f"VALUES ({', '.join(marks)})"
    )


class PredictionLogger:
    """Buffers served predictions and writes them to the monitoring store in the background."""

    _live: weakref.WeakSet[PredictionLogger] = weakref.WeakSet()

    @classmethod
    def close_all(cls, timeout: float = 5.0) -> None:
        """Flush and stop every logger of this process (a server's graceful shutdown)."""
        for log in list(cls._live):
            log.close(timeout=timeout)

    def __init__(
        self,
        url: str,
        *,
        model: str,
        version: str,
        numeric: Sequence[str],
        categorical: Sequence[str],
        classes: Sequence[Any] | None = None,
        sensitive: Sequence[str] = (),
        sensitive_mode: str = "hash",
        mask_key_env: str = MASK_KEY_ENV,
        arm: str | None = None,
        shadow: bool = False,
        capacity: int = 10_000,
        batch_rows: int = 1_000,
        flush_interval: float = 0.5,
        max_backoff: float = 5.0,
    ) -> None:
        try:  # a malformed URL stops the server at load; an unreachable one only fills the buffer
            sa.engine.make_url(expand_env(url))  # a ${VAR} it names must be set (checked, dropped)
        except ConfigError as exc:
            raise ValueError(f"monitoring_url: {exc}") from None
        except sa.exc.ArgumentError:
            raise ValueError(
                "monitoring_url is not a SQLAlchemy URL (not shown: it may hold a password); write "
                "it like "
                "sqlite:///predictions.db or postgresql://user@host/db"
            ) from None
        self.url, self.model, self.version = url, model, version
        # the alias this model answers for on a production server (an A/B arm), and whether it
        # only scores a copy of production's traffic (shadow): its answers reach no client
        self.arm, self.shadow = arm, bool(shadow)
        self.numeric, self.categorical = list(numeric), list(categorical)
        self.classes = [str(c) for c in classes] if classes is not None else None
        unknown = sorted(set(sensitive) - set(self.numeric) - set(self.categorical))
        if unknown:
            raise ValueError(
                f"sensitive column(s) {unknown} are not features of the model; "
                f"choose from {self.numeric + self.categorical}"
            )
        self.sensitive = frozenset(sensitive)
        self.sensitive_mode = sensitive_mode
        self._key: bytes | None = None
        if self.sensitive and sensitive_mode == "hash":
            key = os.environ.get(mask_key_env, "")
            if key:
                self._key = key.encode()
                if len(key) < MIN_KEY_CHARS:
                    logger.warning(
                        "prediction log: the hashing key in %s is shorter than %d characters; "
                        "use a long random one (e.g. python -c 'import secrets; "
                        "print(secrets.token_hex(32))')",
                        mask_key_env,
                        MIN_KEY_CHARS,
                    )
            else:  # never an unkeyed hash: a few guesses reverse it
                self.sensitive_mode = "mask"
                logger.warning(
                    "prediction log: sensitive column(s) %s are masked as %s, not hashed: no key "
                    "in the environment variable %s (set it, the same in every server, to hash "
                    "them with HMAC-SHA256)",
                    sorted(self.sensitive),
                    MASK,
                    mask_key_env,
                )
        self.capacity, self.batch_rows = int(capacity), int(batch_rows)
        self.flush_interval, self.max_backoff = float(flush_interval), float(max_backoff)
        self.process = f"{socket.gethostname()}:{os.getpid()}"[:128]
        self._items: collections.deque[_Request] = collections.deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._buffered = 0  # rows submitted and not yet written
        self._dropped = 0  # rows dropped since the last stats row
        self.dropped_total = 0
        self.written_total = 0  # rows stored since start (a server's /metrics reads both)
        self.failures = 0
        self._engine: sa.Engine | None = None
        self._pending: list[tuple[Any, ...]] = []  # rows built, waiting for the store
        # unmasked numeric features are written as float64 bytes in this layout; the rest as JSON
        self._plain_idx = [j for j, c in enumerate(self.numeric) if c not in self.sensitive]
        self._extra_idx = [j for j, c in enumerate(self.numeric) if c in self.sensitive]
        self.layout_columns = [self.numeric[j] for j in self._plain_idx]
        self.layout = hashlib.sha256(json.dumps(self.layout_columns).encode()).hexdigest()[:16]
        self._layout_stored = False
        self._scores_template = (
            "{" + ", ".join(f"{json.dumps(c).replace('%', '%%')}: %r" for c in self.classes) + "}"
            if self.classes
            else None
        )
        self._insert_sql: str | None = None
        self._thread = threading.Thread(target=self._run, name="mlops-prediction-log", daemon=True)
        self._thread.start()
        atexit.register(self.close, timeout=3.0)
        PredictionLogger._live.add(self)

    # ---- the request path ----
    def submit(
        self,
        request_id: str,
        *,
        latency_ms: float,
        numeric: np.ndarray | None = None,
        categorical: np.ndarray | None = None,
        predictions: np.ndarray | None = None,
        scores: np.ndarray | None = None,
        status: int = 200,
        error: str | None = None,
        violations: np.ndarray | int | None = None,
    ) -> bool:
        """Buffer one request's rows; False (and counted as dropped) when the buffer is full.

        ``violations``: for a model with data rules, the rules each row broke (an array, or one
        number for every row); on a refused request, the count of its rows that broke one.
        """
        rows = int(numeric.shape[0]) if numeric is not None else 1
        with self._lock:
            if self._buffered + rows > self.capacity:
                self._dropped += rows
                self.dropped_total += rows
                return False
            self._buffered += rows
        self._items.append(
            _Request(
                request_id,
                time.time(),
                latency_ms,
                status,
                error,
                numeric,
                categorical,
                predictions,
                scores,
                rows,
                violations,
            )
        )
        if self._buffered >= self.batch_rows:
            self._wake.set()
        return True

    # ---- the writer thread ----
    def _run(self) -> None:
        backoff = self.flush_interval
        while not self._stop.is_set():
            self._wake.wait(self.flush_interval if not self._pending else backoff)
            self._wake.clear()
            if self._flush_once():
                backoff = self.flush_interval
            else:
                backoff = min(self.max_backoff, max(backoff, 0.25) * 2)

    def _flush_once(self) -> bool:
        """Write what is buffered; False when the store refused (rows stay buffered)."""
        if self._items and len(self._pending) < self.batch_rows:
            taken, rows = [], len(self._pending)
            while self._items and rows < self.batch_rows:
                taken.append(self._items.popleft())
                rows += taken[-1].rows
            self._pending.extend(self._rows(taken))
        with self._lock:
            dropped = self._dropped
        if not self._pending and not dropped:
            return True
        batch = self._pending[: self.batch_rows]
        try:
            if self._engine is None:
                engine = create_engine(self.url, connect_timeout=3, wal=True)
                # versioned tables, safe with workers starting together; Alembic is imported here,
                # on the writer thread, not at model load
                from mlops.migrations import upgrade

                upgrade(engine, "log")
                self._engine, self._insert_sql = engine, _insert_sql(engine)
            insert_sql = self._insert_sql
            assert insert_sql is not None  # set together with the engine
            with self._engine.begin() as conn:
                if not self._layout_stored:
                    known = conn.execute(
                        sa.select(LAYOUTS.c.id).where(LAYOUTS.c.id == self.layout)
                    ).first()
                    if known is None:
                        conn.execute(
                            sa.insert(LAYOUTS).values(
                                id=self.layout, columns=json.dumps(self.layout_columns)
                            )
                        )
                if batch:  # straight to the driver's executemany: no per-row SQLAlchemy work
                    conn.exec_driver_sql(insert_sql, batch)
                conn.execute(
                    sa.insert(WRITER_STATS).values(
                        at=time.time(),
                        model=self.model,
                        version=self.version,
                        process=self.process,
                        written=len(batch),
                        dropped=dropped,
                    )
                )
        except Exception as exc:  # noqa: BLE001 - the store is down or slow: keep the rows, try again
            self.failures += 1
            if self.failures == 1 or self.failures % 50 == 0:
                logger.warning(
                    "prediction log %s unavailable (%s: %s); %d rows buffered, %d dropped so far",
                    mask_url(self.url),
                    exc.__class__.__name__,
                    scrub((str(exc).splitlines() or [""])[0][:200], self.url),
                    self._buffered,
                    self.dropped_total,
                )
            return False
        self._layout_stored = True
        del self._pending[: len(batch)]
        with self._lock:
            self._buffered -= len(batch)
            self._dropped -= dropped
            self.written_total += len(batch)
        if self._items or self._pending:
            self._wake.set()  # more than one batch waiting: go again at once
        return True

    def _rows(self, items: list[_Request]) -> list[tuple]:
        """The requests' rows as tuples in :data:`COLUMNS` order (sensitive columns masked).

        Built for many requests at once (one concatenation and one ``tobytes`` for all their
        numeric features, one ``tolist`` per output): the writer's time per row, not per
        request, is what logging costs a busy server.
        """
        out = [
            (
                it.request_id,
                0,
                it.at,
                self.model,
                self.version,
                it.status,
                self._safe_error(it.error),
                it.latency_ms,
                None,
                None,
                None,
                None,
                None,
                self.arm,
                self.shadow,
                None if it.violations is None else int(it.violations),
            )
            for it in items
            if it.numeric is None
        ]
        done = [it for it in items if it.numeric is not None]
        if not done:
            return out
        counts = [it.rows for it in done]
        n = sum(counts)
        single = n == len(done)  # one row per request, the common case: nothing to repeat

        def per_row(values: list) -> list:
            return values if single else list(chain.from_iterable(map(repeat, values, counts)))

        def stacked(arrays: list[np.ndarray]) -> np.ndarray:
            return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)

        numeric = stacked([it.numeric for it in done if it.numeric is not None])
        block = np.ascontiguousarray(
            numeric if not self._extra_idx else numeric[:, self._plain_idx], dtype="<f8"
        )
        blob, width = block.tobytes(), block.shape[1] * 8
        blobs = [blob[k : k + width] for k in range(0, n * width, width)] if width else [b""] * n
        # a part a request lacks (scores of a model without probabilities, say) is blank on its rows
        predictions = [
            None if p is None else str(p)
            for p in stacked(
                [
                    it.predictions
                    if it.predictions is not None
                    else np.full(it.rows, None, dtype=object)
                    for it in done
                ]
            ).tolist()
        ]
        scores: list = [None] * n
        if self._scores_template:
            assert self.classes is not None  # the template is built from the classes
            n_classes = len(self.classes)
            values = stacked(
                [
                    it.scores if it.scores is not None else np.full((it.rows, n_classes), np.nan)
                    for it in done
                ]
            )
            finite = np.isfinite(values).all(axis=1).tolist()
            template = self._scores_template
            scores = [
                template % tuple(row) if ok else None
                for row, ok in zip(values.tolist(), finite, strict=False)
            ]
        texts: list = [None] * n
        if self._extra_idx or self.categorical:
            masked = numeric[:, self._extra_idx].tolist() if self._extra_idx else None
            categorical = (
                stacked(
                    [
                        it.categorical
                        if it.categorical is not None
                        else np.full((it.rows, len(self.categorical)), None, dtype=object)
                        for it in done
                    ]
                ).tolist()
                if self.categorical
                else None
            )
            for i in range(n):
                extra: dict[str, Any] = {}
                if masked is not None:
                    for j, value in zip(self._extra_idx, masked[i], strict=False):
                        extra[self.numeric[j]] = self._mask(value) if value == value else None
                if categorical is not None:
                    for c, value in zip(self.categorical, categorical[i], strict=False):
                        value = value if isinstance(value, str) else None
                        extra[c] = self._mask(value) if c in self.sensitive else value
                texts[i] = json.dumps(extra)
        positions = [0] * n if single else list(chain.from_iterable(map(range, counts)))
        out += zip(
            per_row([it.request_id for it in done]),
            positions,
            per_row([it.at for it in done]),
            repeat(self.model),
            repeat(self.version),
            per_row([it.status for it in done]),
            per_row([self._safe_error(it.error) for it in done]),
            per_row([it.latency_ms for it in done]),
            repeat(self.layout),
            blobs,
            texts,
            predictions,
            scores,
            repeat(self.arm),
            repeat(self.shadow),
            self._violations(done, n),
        )
        return out

    @staticmethod
    def _violations(done: list[_Request], n: int) -> Any:
        """Each row's count of broken data rules (None where its model has no rules)."""
        if all(it.violations is None for it in done):
            return repeat(None)
        values: list[Any] = []
        for it in done:
            v = it.violations
            if isinstance(v, np.ndarray):
                values += v.tolist()
            else:
                values += [None if v is None else int(v)] * it.rows
        return values

    def _mask(self, value: Any) -> str | None:
        if value is None:
            return None
        if self._key is None:
            return MASK
        return HASH_PREFIX + hmac.new(self._key, str(value).encode(), hashlib.sha256).hexdigest()

    def _safe_error(self, error: str | None) -> str | None:
        """A request's error text as logged: the value it quotes of a sensitive column hidden."""
        if error is None or not self.sensitive:
            return error
        named = sorted(c for c in self.sensitive if f"'{c}'" in error)
        if not named or "got " not in error:  # quotes no value ("missing column(s) [...]")
            return error
        cleaned, found = _QUOTED_VALUE.subn(r"\1" + MASK + r"\2", error)
        if found:
            return cleaned
        return f"invalid input naming sensitive column(s) {named} (the message is not logged)"

    # ---- lifecycle ----
    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything buffered is written (True) or ``timeout`` passes (False)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if self._buffered == 0 and self._dropped == 0:
                    return True
            self._wake.set()
            time.sleep(0.02)
        return False

    def close(self, timeout: float = 3.0) -> None:
        """Flush for at most ``timeout`` seconds and stop the writer; what is left is lost."""
        if self._stop.is_set():
            return
        self.flush(timeout)
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=1.0)
        if self._buffered:
            logger.warning(
                "prediction log: %d buffered rows not written at shutdown", self._buffered
            )
