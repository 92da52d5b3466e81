"""Which version answers a request (an A/B split), and a shadow scoring production's traffic.

``mlops serve NAME --split production=90,challenger=10`` routes each request by a hash of its
route key: the ``X-Mlops-Route-Key`` header a caller sends (a user or session id), else the
request id. BLAKE2b of the key, modulo 10,000, picks the arm, so one key always lands on the
same arm, in every worker and every server. Each arm is an alias, followed as production is.

``mlops serve NAME --shadow challenger``: the answering arm's parsed rows are handed to a
bounded queue; one background thread takes what has gathered there (every 20 ms, up to 256
requests), scores it in one model call with the shadow's version and logs each request's
predictions with ``shadow=True`` and the request id of its answer. A full queue drops the rows
(counted); the answer never waits for the shadow.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import queue
import threading
import time
from typing import Any

import numpy as np

from mlops.errors import ConfigError
from mlops.serving.follower import AliasFollower, Served
from mlops.serving.metrics import ServerMetrics

logger = logging.getLogger(__name__)

ROUTE_HEADER = "X-Mlops-Route-Key"
BUCKETS = 10_000
SHADOW_BATCH = 256  # requests a shadow scores in one model call, at most
SHADOW_GATHER_S = 0.02  # how long a shadow lets requests gather after a short batch


def parse_split(text: str) -> tuple[tuple[str, float], ...]:
    """``"production=90,challenger=10"`` as ``(("production", 90.0), ("challenger", 10.0))``."""
    arms: list[tuple[str, float]] = []
    for part in (p.strip() for p in text.split(",")):
        alias, _, weight = part.partition("=")
        try:
            share = float(weight)
        except ValueError:
            share = -1.0
        if not alias.strip() or not share > 0 or share == float("inf"):
            raise ConfigError(
                f"--split: {part!r} is not ALIAS=WEIGHT with a positive weight; write it like "
                "production=90,challenger=10"
            )
        arms.append((alias.strip(), share))
    aliases = [a for a, _ in arms]
    if len(set(aliases)) != len(aliases):
        raise ConfigError(f"--split: an alias is named twice in {aliases}")
    return tuple(arms)


class Router:
    """Picks the arm of a request from its route key (one arm: always that one)."""

    def __init__(self, arms: list[tuple[AliasFollower, float]]) -> None:
        self.followers = [follower for follower, _ in arms]
        total = sum(weight for _, weight in arms)
        self.bounds: list[int] = []
        share = 0.0
        for _, weight in arms:
            share += weight
            self.bounds.append(round(share / total * BUCKETS))

    def pick(self, key: bytes) -> Served:
        """The version that answers the request with route key ``key`` (acquired: release it)."""
        follower = self.followers[0]
        if len(self.followers) > 1:
            digest = hashlib.blake2b(key, digest_size=8).digest()
            bucket = int.from_bytes(digest, "big") % BUCKETS
            follower = self.followers[bisect.bisect_right(self.bounds, bucket)]
        return follower.acquire()


class ShadowScorer:
    """Scores what the answering versions parsed with the shadow's version, in the background."""

    def __init__(self, follower: AliasFollower, metrics: ServerMetrics, capacity: int) -> None:
        self.follower = follower
        self.metrics = metrics
        self.queue: queue.Queue[tuple[Any, ...] | None] = queue.Queue(maxsize=capacity)
        self._thread = threading.Thread(target=self._run, name="mlops-shadow", daemon=True)
        self._thread.start()

    def offer(
        self,
        source: Served,
        request_id: str,
        data: bytes | str,
        mime: str,
        numeric: np.ndarray,
        categorical: np.ndarray | None,
    ) -> None:
        """Queue one answered request's rows; dropped (and counted) when the queue is full.

        The body is kept only when the shadow reads other columns than ``source``: it then
        parses it with its own contract.
        """
        same = self.follower.current.columns == source.columns
        item = (request_id, source.columns, None if same else data, mime, numeric, categorical)
        try:
            self.queue.put_nowait(item)
        except queue.Full:
            self._count("dropped", numeric.shape[0])

    def stop(self, timeout: float = 5.0) -> None:
        """Score what is queued (for at most ``timeout`` seconds), then stop."""
        try:
            self.queue.put(None, timeout=timeout)
        except queue.Full:
            return
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            items = [self.queue.get()]
            while len(items) < SHADOW_BATCH:  # what else is waiting: scored in the same call
                try:
                    items.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            stop = None in items
            batch = [item for item in items if item is not None]
            if batch:
                served = self.follower.acquire()
                try:
                    self._score(served, batch)
                except Exception:  # noqa: BLE001 - a shadow never stops serving
                    logger.exception("shadow scoring failed")
                finally:
                    served.release()
            if stop:
                return
            if len(batch) < SHADOW_BATCH:
                # let the next requests gather: one wake-up and one model call for many of them
                # instead of a thread switch per request, which the answers would pay for
                time.sleep(SHADOW_GATHER_S)

    def _score(self, served: Served, batch: list[tuple[Any, ...]]) -> None:
        wrapper = served.wrapper
        parts: list[tuple[str, np.ndarray, np.ndarray | None]] = []
        for request_id, columns, data, mime, numeric, categorical in batch:
            if served.columns == columns:
                parts.append((request_id, numeric, categorical))
            elif data is not None:  # the shadow reads other columns: its own contract parses
                try:
                    parts.append((request_id, *wrapper.contract.parse(data, mime)))
                except Exception:  # noqa: BLE001 - refused by the shadow's contract
                    self._count("failed", numeric.shape[0], served)
            else:  # the shadow's columns changed after the request was queued
                self._count("dropped", numeric.shape[0], served)
        outcomes = wrapper.answer_many(parts)  # logged as the shadow's, whatever happens
        for (_, numeric, _), scored in zip(parts, outcomes, strict=True):
            self._count("scored" if scored else "failed", numeric.shape[0], served)

    def _count(self, outcome: str, rows: int, served: Served | None = None) -> None:
        served = served or self.follower.current
        self.metrics.shadow(served.name, served.version, outcome, rows)
