"""Two versions of one model compared on the same live traffic: ``mlops monitor --compare``,
the ``compare/`` section of a check's run and the ``live_comparison`` promotion gate.

A production server can answer for two aliases at once: a split (each request answered by one
arm) or a shadow (production answers; the other version scores a copy of the same rows off the
request path). Every prediction-log row names its version, its ``arm`` (the alias) and whether
a shadow scored it. Here the production version's answered rows (never shadow rows) are the
baseline, arm ``a``; the compared version's rows, shadow rows included, are arm ``b``.

Per arm: requests, client and server error rates, latency p50/p99 (as :func:`request_metrics`
measures them for a check), the prediction distribution (class shares, or quantiles) and, on
the rows whose labels were fed back (``mlops feedback``), accuracy or RMSE. Between the arms:
the PSI of the predictions and, once both arms have ``min_labels`` labelled rows, the
difference ``b - a`` with a 95% confidence interval and its test:

- classification: accuracy, a two-proportion z-test (pooled standard error for the statistic,
  unpooled for the Wald interval);
- regression: the mean squared error, Welch's t-test on the squared errors (so the interval is
  on the MSE difference; the RMSE of each arm and their difference are reported beside it).

``p_value`` is two-sided (any difference); ``p_worse`` is one-sided, small when ``b`` is worse
than ``a`` (lower accuracy, higher squared error): the promotion gate refuses a challenger
whose ``p_worse`` is below its alpha. Fewer labels than ``min_labels`` on either arm: nothing
is decided, and the notes say so.

Everything but :func:`compare_versions` and :func:`other_arms` (which read the log) is a pure
function of its inputs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa
from numpy.typing import ArrayLike
from scipy import stats

from mlops.monitoring.drift import metric_key, psi
from mlops.monitoring.profile import numeric_shares
from mlops.monitoring.store import PREDICTIONS, MonitoringStore

PREFIX = "compare"
CONFIDENCE = 0.95
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)  # the prediction distribution of a regression arm
PSI_BINS = 10  # regression: the baseline's deciles bin both arms for their PSI
ACCURACY_TEST = "two-proportion z-test"
SQUARED_ERROR_TEST = "Welch's t-test on squared errors"


# ---- what a check measures per arm (shared with mlops.monitoring.checks) ----
def request_metrics(per_request: pd.DataFrame) -> dict[str, float]:
    """Request counts, error rates and latencies (one row per request in ``per_request``).

    A client error (4xx) is the client's doing: it counts in ``client_error_rate`` (over every
    request) and nowhere else. ``server_error_rate`` (5xx) and the latencies are measured on
    the requests the model accepted, so no client can raise them, or dilute them, by sending
    bad requests.
    """
    m: dict[str, float] = {}
    status = per_request["status"].to_numpy(dtype=int)
    client = (status >= 400) & (status < 500)
    accepted = ~client
    m["requests"] = float(len(status))
    m["requests_accepted"] = float(accepted.sum())
    if len(status):
        m["client_error_rate"] = float(client.mean())
    if accepted.any():
        m["server_error_rate"] = float((status[accepted] >= 500).mean())
        lat = per_request["latency_ms"].to_numpy(dtype=float)[accepted]
        m["latency_p50_ms"] = float(np.percentile(lat, 50))
        m["latency_p99_ms"] = float(np.percentile(lat, 99))
    return m


def canonical_label(value: Any) -> str:
    """A label as text, with 1, 1.0 and "1" the same."""
    text = str(value).strip()
    try:
        number = float(text)
    except ValueError:
        return text
    return str(int(number)) if number.is_integer() else repr(number)


# ---- the statistics ----
@dataclass(frozen=True)
class Difference:
    """Arm ``b`` against arm ``a`` on labelled rows: ``diff = b - a`` of ``metric``."""

    metric: str  # accuracy | mse
    test: str  # ACCURACY_TEST | SQUARED_ERROR_TEST
    n_a: int
    n_b: int
    a: float  # the metric on arm a (accuracy, or mean squared error)
    b: float
    diff: float
    ci_low: float
    ci_high: float
    confidence: float
    statistic: float  # z, or Welch's t
    p_value: float  # two-sided: the arms differ
    p_worse: float  # one-sided: b is worse than a (lower accuracy, larger squared errors)

    @property
    def higher_is_better(self) -> bool:
        return self.metric == "accuracy"


def accuracy_difference(
    correct_a: ArrayLike, correct_b: ArrayLike, confidence: float = CONFIDENCE
) -> Difference:
    """Accuracy of ``b`` minus accuracy of ``a`` (each a vector of right/wrong), with a Wald
    interval and the two-proportion z-test (pooled standard error)."""
    a = np.asarray(correct_a, dtype=bool)
    b = np.asarray(correct_b, dtype=bool)
    if not len(a) or not len(b):
        raise ValueError("both arms need at least one labelled prediction")
    n_a, n_b = len(a), len(b)
    p_a, p_b = float(a.mean()), float(b.mean())
    diff = p_b - p_a
    pooled = (a.sum() + b.sum()) / (n_a + n_b)
    se_pooled = math.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
    # all right (or all wrong) on both arms: no difference to test
    z = diff / se_pooled if se_pooled > 0 else 0.0
    se = math.sqrt(p_a * (1 - p_a) / n_a + p_b * (1 - p_b) / n_b)
    half = float(stats.norm.ppf(0.5 + confidence / 2)) * se
    return Difference(
        metric="accuracy",
        test=ACCURACY_TEST,
        n_a=n_a,
        n_b=n_b,
        a=p_a,
        b=p_b,
        diff=diff,
        ci_low=diff - half,
        ci_high=diff + half,
        confidence=confidence,
        statistic=float(z),
        p_value=float(2 * stats.norm.sf(abs(z))),
        p_worse=float(stats.norm.cdf(z)),
    )


def squared_error_difference(
    squared_a: ArrayLike, squared_b: ArrayLike, confidence: float = CONFIDENCE
) -> Difference:
    """Mean squared error of ``b`` minus that of ``a`` (each a vector of squared errors), with
    Welch's t-test and its interval (``scipy.stats.ttest_ind(b, a, equal_var=False)``)."""
    a = np.asarray(squared_a, dtype=float)
    b = np.asarray(squared_b, dtype=float)
    if len(a) < 2 or len(b) < 2:
        raise ValueError("Welch's t-test needs at least two labelled predictions per arm")
    diff = float(b.mean() - a.mean())
    two_sided = stats.ttest_ind(b, a, equal_var=False)
    worse = stats.ttest_ind(b, a, equal_var=False, alternative="greater")
    low, high = two_sided.confidence_interval(confidence)
    t, p_value, p_worse = float(two_sided.statistic), float(two_sided.pvalue), float(worse.pvalue)
    if not math.isfinite(p_value):  # no spread on either arm: the errors are constants
        t = 0.0 if diff == 0 else math.copysign(math.inf, diff)
        p_value = 1.0 if diff == 0 else 0.0
        p_worse = 0.5 if diff == 0 else float(diff < 0)
        low = high = diff
    return Difference(
        metric="mse",
        test=SQUARED_ERROR_TEST,
        n_a=len(a),
        n_b=len(b),
        a=float(a.mean()),
        b=float(b.mean()),
        diff=diff,
        ci_low=float(low),
        ci_high=float(high),
        confidence=confidence,
        statistic=t,
        p_value=p_value,
        p_worse=p_worse,
    )


def prediction_distributions(
    task: str, predictions_a: Sequence[Any], predictions_b: Sequence[Any]
) -> tuple[dict[str, float], dict[str, float], float | None]:
    """Each arm's prediction distribution and the PSI of ``b`` against ``a``.

    Classification: the share of each class (over the classes either arm predicted).
    Regression: the quantiles ``p10``...``p90``; the PSI bins both arms at ``a``'s deciles.
    The PSI is ``None`` when an arm has no prediction.
    """
    if task == "classification":
        pa = pd.Series(list(predictions_a), dtype=object).dropna().map(canonical_label)
        pb = pd.Series(list(predictions_b), dtype=object).dropna().map(canonical_label)
        classes = sorted(set(pa) | set(pb))
        shares_a = {c: float((pa == c).mean()) if len(pa) else 0.0 for c in classes}
        shares_b = {c: float((pb == c).mean()) if len(pb) else 0.0 for c in classes}
        value = (
            psi([shares_a[c] for c in classes], [shares_b[c] for c in classes])
            if len(pa) and len(pb)
            else None
        )
        return shares_a, shares_b, value
    a = _finite(predictions_a)
    b = _finite(predictions_b)
    qa = {_quantile_key(q): float(np.quantile(a, q)) for q in QUANTILES} if len(a) else {}
    qb = {_quantile_key(q): float(np.quantile(b, q)) for q in QUANTILES} if len(b) else {}
    if not len(a) or not len(b):
        return qa, qb, None
    edges = np.unique(np.quantile(a, np.linspace(0, 1, PSI_BINS + 1)[1:-1]))
    return qa, qb, psi(numeric_shares(a, edges), numeric_shares(b, edges))


def _finite(values: Sequence[Any]) -> np.ndarray:
    array = pd.to_numeric(pd.Series(list(values), dtype=object), errors="coerce").to_numpy(
        dtype=float
    )
    return array[np.isfinite(array)]


def _quantile_key(q: float) -> str:
    return f"prediction_p{round(q * 100)}"


# ---- one comparison ----
@dataclass(frozen=True)
class Arm:
    """What one version did in the window."""

    name: str  # the alias it answered for ("production", "challenger"), or a label of it
    version: str
    metrics: dict[str, float]  # request_metrics, predictions, shadow_rows, labelled, accuracy|rmse
    distribution: dict[str, float]  # class shares, or prediction quantiles


@dataclass
class Comparison:
    """Arm ``b`` (the compared version) against arm ``a`` (production) over one window."""

    task: str
    a: Arm
    b: Arm
    min_labels: int
    prediction_psi: float | None
    difference: Difference | None  # None: too few labels on an arm to decide
    notes: list[str] = field(default_factory=list)

    @property
    def decided(self) -> bool:
        return self.difference is not None

    def metrics(self) -> dict[str, float]:
        """The comparison as ``compare/...`` metrics of a check's run."""
        out: dict[str, float] = {}
        for arm in (self.a, self.b):
            key = f"{PREFIX}/{metric_key(arm.name)}"
            if arm.version.isdigit():
                out[f"{key}/version"] = float(arm.version)
            for name, value in arm.metrics.items():
                out[f"{key}/{name}"] = value
            for name, value in arm.distribution.items():
                shown = name if name.startswith("prediction_p") else f"share/{metric_key(name)}"
                out[f"{key}/{shown}"] = value
        if self.prediction_psi is not None:
            out[f"{PREFIX}/prediction_psi"] = self.prediction_psi
        d = self.difference
        if d is not None:
            name = "accuracy_diff" if d.metric == "accuracy" else "mse_diff"
            out[f"{PREFIX}/{name}"] = d.diff
            out[f"{PREFIX}/{name}_ci_low"] = d.ci_low
            out[f"{PREFIX}/{name}_ci_high"] = d.ci_high
            if d.metric == "mse":
                out[f"{PREFIX}/rmse_diff"] = math.sqrt(d.b) - math.sqrt(d.a)
            out[f"{PREFIX}/statistic"] = d.statistic
            out[f"{PREFIX}/p_value"] = d.p_value
            out[f"{PREFIX}/p_worse"] = d.p_worse
        return out

    def lines(self) -> list[str]:
        """The comparison as a table, one line each (what ``mlops monitor --compare`` prints)."""
        return table(self.metrics(), self.min_labels, base=self.a.name)


def compare_arms(
    task: str,
    frame_a: pd.DataFrame,
    frame_b: pd.DataFrame,
    labels: pd.DataFrame,
    *,
    name_a: str,
    version_a: str,
    name_b: str,
    version_b: str,
    min_labels: int,
    confidence: float = CONFIDENCE,
) -> Comparison:
    """Compare two arms' logged rows (as :meth:`MonitoringStore.predictions` returns them),
    joining ``labels`` (request_id, row, label) to each."""
    arms, evidence = [], []
    for name, version, frame in ((name_a, version_a, frame_a), (name_b, version_b, frame_b)):
        m = request_metrics(frame.drop_duplicates("request_id"))
        ok = frame[frame["status"] == 200]
        m["predictions"] = float(len(ok))
        m["shadow_rows"] = float(ok["shadow"].astype(bool).sum()) if "shadow" in ok else 0.0
        joined = (
            ok.merge(labels, on=["request_id", "row"])
            if len(labels) and len(ok)
            else ok.iloc[0:0].assign(label=[])
        )
        if task == "classification":
            values: np.ndarray = (
                joined["label"].map(canonical_label).to_numpy(dtype=object)
                == joined["prediction"].map(canonical_label).to_numpy(dtype=object)
            ).astype(bool)
        else:
            truth = pd.to_numeric(joined["label"], errors="coerce").to_numpy(dtype=float)
            pred = pd.to_numeric(joined["prediction"], errors="coerce").to_numpy(dtype=float)
            values = (truth - pred) ** 2
            values = values[np.isfinite(values)]
        m["labelled"] = float(len(values))
        if len(values):
            if task == "classification":
                m["accuracy"] = float(values.mean())
            else:
                m["mse"] = float(values.mean())
                m["rmse"] = float(math.sqrt(values.mean()))
        arms.append((name, version, m, ok["prediction"].tolist()))
        evidence.append(values)
    dist_a, dist_b, shift = prediction_distributions(task, arms[0][3], arms[1][3])
    a = Arm(arms[0][0], arms[0][1], arms[0][2], dist_a)
    b = Arm(arms[1][0], arms[1][1], arms[1][2], dist_b)
    comparison = Comparison(task, a, b, min_labels, shift, None)
    if not b.metrics["requests"]:
        comparison.notes.append(
            f"{b.name} (version {b.version}) has no predictions in the window: nothing to "
            "compare (is a server splitting or shadowing traffic to it, with the prediction log "
            "on?)"
        )
    n_a, n_b = len(evidence[0]), len(evidence[1])
    if min(n_a, n_b) < min_labels:
        comparison.notes.append(
            f"too few labels to decide between {a.name} and {b.name}: {n_a} labelled "
            f"predictions of {a.name} (version {a.version}) and {n_b} of {b.name} (version "
            f"{b.version}) in the window, at least {min_labels} per arm needed "
            "(monitoring.compare_min_labels); feed labels with mlops feedback"
        )
        return comparison
    comparison.difference = (
        accuracy_difference(evidence[0], evidence[1], confidence)
        if task == "classification"
        else squared_error_difference(evidence[0], evidence[1], confidence)
    )
    return comparison


# ---- reading the log ----
def compare_versions(
    store: MonitoringStore,
    model: str,
    task: str,
    *,
    version_a: str,
    version_b: str,
    since: float,
    until: float,
    min_labels: int,
    name_a: str = "production",
    name_b: str = "challenger",
    frame_a: pd.DataFrame | None = None,
) -> Comparison:
    """Compare ``version_b``'s logged rows (shadow rows included) with ``version_a``'s
    answered rows in ``[since, until)``; ``frame_a``: those rows, when already read."""
    if frame_a is None:
        frame_a = store.predictions(model, version_a, since, until)
    frame_b = store.predictions(model, version_b, since, until, shadow=True)
    ids = pd.concat(
        [f.loc[f["status"] == 200, "request_id"] for f in (frame_a, frame_b)], ignore_index=True
    ).unique()
    labels = (
        store.labels_for(model, ids)
        if len(ids)
        else pd.DataFrame(columns=["request_id", "row", "label"])
    )
    return compare_arms(
        task,
        frame_a,
        frame_b,
        labels,
        name_a=name_a,
        version_a=version_a,
        name_b=name_b,
        version_b=version_b,
        min_labels=min_labels,
    )


def other_arms(
    store: MonitoringStore, model: str, version: str, since: float, until: float
) -> list[tuple[str, str, int]]:
    """(arm, version, rows) of every arm other than ``version`` (production) that has rows in
    ``[since, until)`` on a server answering for two aliases, the busiest first."""
    p = PREDICTIONS
    rows = sa.func.count().label("rows")
    query = (
        sa.select(p.c.arm, p.c.version, rows, sa.func.max(p.c.at))
        .where(
            p.c.model == model,
            p.c.at >= since,
            p.c.at < until,
            p.c.version != version,
            p.c.arm.is_not(None),
        )
        .group_by(p.c.arm, p.c.version)
    )
    with store.engine.connect() as conn:
        found = conn.execute(query).all()
    # an arm whose alias moved within the window: its latest version stands for it
    latest: dict[str, tuple[float, str]] = {}
    counts: dict[str, int] = {}
    for arm, ver, n, last in found:
        counts[arm] = counts.get(arm, 0) + int(n)
        if arm not in latest or last > latest[arm][0]:
            latest[arm] = (last, str(ver))
    return sorted(
        ((arm, latest[arm][1], counts[arm]) for arm in counts),
        key=lambda item: (-item[2], item[0]),
    )


# ---- the table ----
_ROWS = (
    ("version", "version"),
    ("requests", "requests"),
    ("shadow_rows", "shadow rows"),
    ("client_error_rate", "client error rate"),
    ("server_error_rate", "server error rate"),
    ("latency_p50_ms", "latency p50 (ms)"),
    ("latency_p99_ms", "latency p99 (ms)"),
    ("predictions", "predictions"),
)
_LABELLED_ROWS = (
    ("labelled", "labelled"),
    ("accuracy", "accuracy"),
    ("rmse", "RMSE"),
)


def table(
    metrics: Mapping[str, float], min_labels: int | None = None, *, base: str = "production"
) -> list[str]:
    """The ``compare/`` metrics of a check as a readable table (empty if there are none)."""
    prefix = f"{PREFIX}/"
    arms: list[str] = []
    for key in metrics:
        parts = key[len(prefix) :].split("/") if key.startswith(prefix) else []
        if len(parts) >= 2 and parts[1] == "requests" and parts[0] not in arms:
            arms.append(parts[0])
    if not arms:
        return []
    arms.sort(key=lambda arm: (arm != base, arm))

    def cell(arm: str, name: str) -> str:
        value = metrics.get(f"{prefix}{arm}/{name}")
        if value is None or not math.isfinite(value):
            return "-"
        if name in ("version", "requests", "shadow_rows", "predictions", "labelled"):
            return f"{int(value)}"
        if name.startswith("latency"):
            return f"{value:.2f}"
        return f"{value:.4f}"

    names = {
        key[len(prefix) + len(arm) + 1 :]
        for key in metrics
        for arm in arms
        if key.startswith(f"{prefix}{arm}/")
    }
    extra = [
        (name, f"share {name[6:]}" if name.startswith("share/") else f"prediction {name[11:]}")
        for name in sorted(
            (n for n in names if n.startswith(("share/", "prediction_p"))),
            key=lambda n: (n.startswith("prediction_p"), _order(n), n),
        )
    ]
    rows = [*_ROWS, *extra, *_LABELLED_ROWS]
    width = max(12, *(len(arm) + 2 for arm in arms))
    lines = [f"  {'':<20}" + "".join(f"{arm:>{width}}" for arm in arms)]
    for name, label in rows:
        if not any(f"{prefix}{arm}/{name}" in metrics for arm in arms):
            continue
        lines.append(f"  {label:<20}" + "".join(f"{cell(arm, name):>{width}}" for arm in arms))
    other = next((arm for arm in arms if arm != arms[0]), arms[0])
    shift = metrics.get(f"{prefix}prediction_psi")
    if shift is not None:
        lines.append(f"  prediction PSI ({other} against {arms[0]}): {shift:.4f}")
    pair = f"{other} - {arms[0]}"
    p = metrics.get(f"{prefix}p_value")
    worse = metrics.get(f"{prefix}p_worse")
    if f"{prefix}accuracy_diff" in metrics and p is not None:
        lines.append(
            f"  accuracy difference ({pair}): {_signed(metrics, 'accuracy_diff')}, "
            f"{ACCURACY_TEST} p = {p:.4g} (one-sided, {other} worse: p = {worse:.4g})"
        )
    elif f"{prefix}mse_diff" in metrics and p is not None:
        lines.append(
            f"  MSE difference ({pair}): {_signed(metrics, 'mse_diff')}, RMSE difference "
            f"{metrics.get(f'{prefix}rmse_diff', math.nan):+.4f}; {SQUARED_ERROR_TEST} "
            f"p = {p:.4g} (one-sided, {other} worse: p = {worse:.4g})"
        )
    else:
        counts = [int(metrics.get(f"{prefix}{arm}/labelled", 0.0)) for arm in arms]
        needed = f"; at least {min_labels} per arm needed" if min_labels else ""
        lines.append(
            "  too few labels to decide: "
            + ", ".join(f"{n} labelled ({arm})" for n, arm in zip(counts, arms, strict=False))
            + needed
            + " (monitoring.compare_min_labels); feed labels with mlops feedback"
        )
    return lines


def _order(name: str) -> float:
    digits = name.rpartition("_p")[2]
    return float(digits) if digits.isdigit() else 0.0


def _signed(metrics: Mapping[str, float], name: str) -> str:
    value = metrics[f"{PREFIX}/{name}"]
    low = metrics.get(f"{PREFIX}/{name}_ci_low", math.nan)
    high = metrics.get(f"{PREFIX}/{name}_ci_high", math.nan)
    return f"{value:+.4f} (95% CI {low:+.4f} to {high:+.4f})"
