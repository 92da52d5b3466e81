"""One monitoring check of a registered model's production version, tracked as an MLflow run.

:func:`check` reads the predictions logged in the window, compares them with the reference
profile that travels inside the model, joins the labels fed back so far, logs everything as
one run of the ``<model>-monitoring`` experiment (metrics stepped by the check time, so the
UI charts them over time; a drift report as artifacts), evaluates the alert rules of
``conf/`` and, for a rule marked ``auto_rollback``, rolls production back through the
registry, audited like a manual rollback.

When a production server answers for a second alias in the window (a split or a shadow, see
:mod:`mlops.monitoring.compare`), or when asked for one (``mlops monitor --compare ALIAS``),
the check's run gets a ``compare/`` section: each arm's requests, errors, latencies,
prediction distribution and labelled accuracy or RMSE, and the test of their difference.

What clients cannot steer: their own errors (4xx: a bad request, a wrong type) are counted
apart as ``client_error_rate`` and never in ``server_error_rate`` or the latencies, which
measure the requests the model accepted; and a rule fires only over at least its
``min_requests`` requests (accepted ones; any, for a rule on ``client_error_rate`` or
``rule_violation_rate``), so a handful of requests cannot raise an alert or roll production back.

A model with data rules (``data.rules``) logs how many each row broke; the check reports
``rule_violation_rate`` (the share of checked rows, flagged or refused, that broke one), which an
alert rule can name like any other metric.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import logging
import math
import tempfile
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

import mlflow
import pandas as pd
from mlflow.entities import Metric, RunTag
from mlflow.exceptions import MlflowException

from mlops import metrics
from mlops.config import AlertRule, Config, check_webhook_url, parse_duration
from mlops.db import expand_env, scrub
from mlops.errors import ConfigError, MlopsError
from mlops.monitoring import drift
from mlops.monitoring.compare import (
    Comparison,
    canonical_label,
    compare_versions,
    other_arms,
    request_metrics,
)
from mlops.monitoring.drift import metric_key
from mlops.monitoring.logger import HASH_PREFIX, LEGACY_HASH_PREFIX, MASK
from mlops.monitoring.profile import PROFILE_ARTIFACT
from mlops.monitoring.report import write_report
from mlops.monitoring.store import LOG_FILE, Alert, CheckResult, MonitoringStore
from mlops.tracking import download_model_file, end_runs, ensure_experiment, project_store_url

logger = logging.getLogger(__name__)

PRODUCTION = "production"
MONITOR_USER = "mlops-monitor"
NOTES_TAG = "mlops.monitor.notes"
COMPARE_TAG = "mlops.monitor.compare"
# metrics measured over every request, the ones refused as the client's error included
EVERY_REQUEST = frozenset({"client_error_rate", "rule_violation_rate"})


def experiment_name(model: str) -> str:
    return f"{model}-monitoring"


def load_profile(name: str, version: str) -> dict[str, Any]:
    """The reference profile logged inside version ``version`` of ``name``."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = download_model_file(name, version, f"artifacts/{PROFILE_ARTIFACT}.json", tmp)
        except (MlflowException, OSError) as exc:
            raise MlopsError(
                f"{name} version {version} has no reference profile "
                f"({str(exc).splitlines()[0][:200]}); "
                "it was logged before monitoring existed: retrain it with this version of mlops"
            ) from None
        return json.loads(Path(path).read_text())


def check(
    config: Config,
    name: str,
    *,
    window: str | float | None = None,
    now: float | None = None,
    store: MonitoringStore | None = None,
    compare: str | None = None,
) -> CheckResult:
    """Check the production version of ``name`` over the last ``window`` (default from config).

    ``compare``: an alias whose version is compared with production's on the same window
    (its shadow rows included); without it, the busiest other arm of a server answering for
    two aliases is compared, if it has rows in the window.
    """
    mcfg = config.monitoring
    window_s = parse_duration(window if window is not None else mcfg.window)
    at = time.time() if now is None else float(now)
    client = mlflow.MlflowClient()
    # alias changes made outside mlops are recorded (and stages mirrored) before production is
    # read, so this check, its alerts and any rollback act on what production really is
    from mlops.registry import reconcile

    reconciled = [
        f"the registry changed outside mlops, now recorded in the audit trail: {r.line()}"
        for r in reconcile(name, config)
    ]
    try:
        version = str(client.get_model_version_by_alias(name, PRODUCTION).version)
    except MlflowException:
        raise MlopsError(
            f"{name} has no '{PRODUCTION}' version to monitor; promote one first "
            f"(mlops promote {name} --version V --to production)"
        ) from None
    profile = load_profile(name, version)
    store = store or MonitoringStore(project_store_url(mcfg.log_url, LOG_FILE))

    frame = store.predictions(name, version, at - window_s, at)
    result = CheckResult(
        model=name, version=version, at=at, window_s=window_s, run_id="", status="ok"
    )
    result.notes.extend(reconciled)
    m = result.metrics
    per_request = frame.drop_duplicates("request_id")
    _request_metrics(per_request, m)
    _rule_violations(frame, m)
    ok = frame[frame["status"] == 200]
    m["predictions"] = float(len(ok))
    written, dropped = store.writer_counts(name, version, at - window_s, at)
    m["dropped_rows"] = float(dropped)

    features = store.features(ok) if len(ok) else pd.DataFrame()
    if len(ok) < mcfg.min_rows:
        result.status = "insufficient_data"
        result.notes.append(
            f"too little data: {len(ok)} predictions of version {version} in the last "
            f"{_human(window_s)}, at least {mcfg.min_rows} needed (monitoring.min_rows); "
            "drift not computed"
        )
    else:
        _drift(profile, features, ok, result)
    _accuracy(profile, ok, store, name, mcfg.min_labels, result)
    comparison = _compare(config, client, store, profile, frame, compare, result)
    if dropped:
        result.notes.append(
            f"{dropped} predictions were dropped by the servers' prediction log (its store was "
            "slow or down and the buffer was full); they are missing from this check"
        )

    result.run_id = _start_run(client, result)
    try:
        noted = len(result.notes)
        if comparison is not None:
            client.set_tag(
                result.run_id,
                COMPARE_TAG,
                f"{comparison.a.name} v{comparison.a.version} vs {comparison.b.name} "
                f"v{comparison.b.version}",
            )
        _alerts(config, store, result)
        client.set_tag(result.run_id, "mlops.monitor.alerts", str(len(result.alerts)))
        if result.held:
            client.set_tag(result.run_id, "mlops.monitor.held", ",".join(result.held))
        if len(result.notes) > noted:  # the rules held back by min_requests say so
            client.set_tag(result.run_id, NOTES_TAG, "\n".join(result.notes)[:5000])
        if result.rollback:
            client.set_tag(result.run_id, "mlops.monitor.rollback", result.rollback)
        _log_report(client, result, profile, features, ok)
    except BaseException:
        end_runs(client, [result.run_id], "FAILED")
        raise
    client.set_terminated(result.run_id, "FINISHED", end_time=int(time.time() * 1000))
    return result


# ---- the measurements ----
def _request_metrics(per_request: pd.DataFrame, m: dict[str, float]) -> None:
    """Request counts, error rates and latencies: see :func:`compare.request_metrics`."""
    m.update(request_metrics(per_request))


def _rule_violations(frame: pd.DataFrame, m: dict[str, float]) -> None:
    """``rule_violation_rate``: the share of the rows checked against the model's data rules
    that broke one, flagged (answered) or refused (a refused request is one logged row, so it
    counts once); ``rule_violations`` their count. Absent when no row was checked (a model
    without ``data.rules``)."""
    checked = pd.to_numeric(frame["violations"], errors="coerce").dropna()
    if len(checked):
        broken = int((checked > 0).sum())
        m["rule_violations"] = float(broken)
        m["rule_violation_rate"] = broken / len(checked)


def _drift(
    profile: dict[str, Any], features: pd.DataFrame, ok: pd.DataFrame, result: CheckResult
) -> None:
    m = result.metrics
    worst = 0.0
    for col, ref in profile["features"].items():
        if col not in features.columns:
            result.notes.append(
                f"feature '{col}' is not in the logged predictions; drift not computed"
            )
            continue
        if ref.get("masked"):
            result.notes.append(
                f"feature '{col}' is sensitive (masked in the profile and the prediction log); "
                "drift not computed"
            )
            continue
        values = features[col]
        if _masked(values):
            result.notes.append(
                f"feature '{col}' is masked in the prediction log (sensitive); drift not computed"
            )
            continue
        stats_ = (
            drift.numeric_drift(ref, pd.to_numeric(values, errors="coerce").to_numpy(dtype=float))
            if ref["kind"] == "numeric"
            else drift.categorical_drift(ref, values.tolist())
        )
        key = metric_key(col)
        for stat, value in stats_.items():
            m[f"{stat}/{key}"] = value
        worst = max(worst, stats_.get("psi", 0.0))
    m["psi_max"] = worst
    pred_ref = profile["prediction"]
    if pred_ref["kind"] == "numeric":
        pred_stats = drift.numeric_drift(
            pred_ref, pd.to_numeric(ok["prediction"], errors="coerce").to_numpy(dtype=float)
        )
    else:
        pred_stats = drift.categorical_drift(pred_ref, ok["prediction"].tolist())
    for stat, value in pred_stats.items():
        m[f"prediction_{stat}"] = value


def _masked(values: pd.Series) -> bool:
    """The prediction log hashed or masked this column (a server lists it as sensitive)."""
    first = values.dropna().iloc[:1].tolist()
    return (
        bool(first)
        and isinstance(first[0], str)
        and first[0].startswith((HASH_PREFIX, LEGACY_HASH_PREFIX, MASK))
    )


def _accuracy(
    profile: dict[str, Any],
    ok: pd.DataFrame,
    store: MonitoringStore,
    name: str,
    min_labels: int,
    result: CheckResult,
) -> None:
    m = result.metrics
    labels = (
        store.labels_for(name, ok["request_id"].unique())
        if len(ok)
        else pd.DataFrame(columns=["request_id", "row", "label"])
    )
    joined = (
        ok.merge(labels, on=["request_id", "row"]) if len(labels) else ok.iloc[0:0].assign(label=[])
    )
    m["labelled"] = float(len(joined))
    if len(joined) < min_labels:
        if len(ok):
            result.notes.append(
                f"{len(joined)} labelled predictions in the window, at least {min_labels} needed "
                "(monitoring.min_labels); accuracy not computed (feed labels with mlops feedback)"
            )
        return
    val = profile.get("validation_metrics", {})
    if profile["task"] == "classification":
        y_true = joined["label"].map(canonical_label).to_numpy(dtype=object)
        y_pred = joined["prediction"].map(canonical_label).to_numpy(dtype=object)
        classes = [
            canonical_label(c) for c in profile.get("classes") or sorted(set(y_true) | set(y_pred))
        ]
        scores = metrics.classification(y_true, y_pred, classes)
        m["accuracy"], m["f1"] = scores["accuracy"], scores["f1"]
        if "accuracy" in val:
            m["accuracy_drop"] = float(val["accuracy"] - m["accuracy"])
    else:
        scores = metrics.regression(
            pd.to_numeric(joined["label"], errors="coerce").to_numpy(dtype=float),
            pd.to_numeric(joined["prediction"], errors="coerce").to_numpy(dtype=float),
        )
        m.update({k: scores[k] for k in ("rmse", "mae") if k in scores})
        if val.get("rmse") and "rmse" in scores:
            m["rmse_ratio"] = float(m["rmse"] / val["rmse"])


def _compare(
    config: Config,
    client: mlflow.MlflowClient,
    store: MonitoringStore,
    profile: dict[str, Any],
    frame: pd.DataFrame,
    alias: str | None,
    result: CheckResult,
) -> Comparison | None:
    """The ``compare/`` section: production against ``alias``'s version, or against the
    busiest other arm that has rows in the window; ``None`` when there is nothing to compare."""
    since, until = result.at - result.window_s, result.at
    name, version = result.model, result.version
    if alias is not None:
        if alias == PRODUCTION:
            raise MlopsError(
                f"--compare {alias}: production is what every check looks at; name the other "
                "alias the server answers for (e.g. --compare challenger)"
            )
        try:
            other = str(client.get_model_version_by_alias(name, alias).version)
        except MlflowException:
            raise MlopsError(
                f"--compare {alias}: {name} has no alias '{alias}'; name the alias the server "
                f"splits or shadows traffic to (mlops status {name} lists the aliases)"
            ) from None
        if other == version:
            result.notes.append(
                f"'{alias}' is version {version}, the production version itself: nothing to compare"
            )
            return None
    else:
        arms = [a for a in other_arms(store, name, version, since, until) if a[0] != PRODUCTION]
        if not arms:
            return None
        (alias, other, _), *rest = arms
        if rest:
            result.notes.append(
                f"compared with the busiest other arm, {alias} (version {other}); also in the "
                "window: "
                + ", ".join(f"{a} (version {v}, {n} rows)" for a, v, n in rest)
                + " (mlops monitor --compare ALIAS picks one)"
            )
    comparison = compare_versions(
        store,
        name,
        profile["task"],
        version_a=version,
        version_b=other,
        since=since,
        until=until,
        min_labels=config.monitoring.compare_min_labels,
        name_a=PRODUCTION,
        name_b=alias,
        frame_a=frame,
    )
    result.metrics.update(comparison.metrics())
    result.notes.extend(comparison.notes)
    return comparison


# ---- the MLflow run and its report ----
def _start_run(client: mlflow.MlflowClient, result: CheckResult) -> str:
    """The check's run in ``<model>-monitoring``, with its metrics stepped by the check time."""
    experiment_id = ensure_experiment(experiment_name(result.model), client)
    when = datetime.fromtimestamp(result.at, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    run = client.create_run(
        experiment_id,
        run_name=f"check v{result.version} {when}",
        tags={
            "mlops.monitor.model": result.model,
            "mlops.monitor.version": result.version,
            "mlops.monitor.window_s": str(int(result.window_s)),
            "mlops.monitor.status": result.status,
            "mlops.step": "monitor",
        },
    )
    step, ts = int(result.at), int(result.at * 1000)
    metrics = [
        Metric(k, float(v), ts, step)
        for k, v in result.metrics.items()
        if v is not None and math.isfinite(v)
    ]
    for start in range(0, len(metrics), 900):
        client.log_batch(run.info.run_id, metrics=metrics[start : start + 900])
    if result.notes:
        client.log_batch(run.info.run_id, tags=[RunTag(NOTES_TAG, "\n".join(result.notes)[:5000])])
    return run.info.run_id


def _log_report(
    client: mlflow.MlflowClient,
    result: CheckResult,
    profile: dict[str, Any],
    features: pd.DataFrame,
    ok: pd.DataFrame,
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        write_report(Path(tmp), result, profile, features, ok)
        client.log_artifacts(result.run_id, tmp, artifact_path="drift_report")


# ---- alerts ----
class Fired(NamedTuple):
    """A broken rule: its worst metric and value, its bound, and every metric it found past it."""

    rule: AlertRule
    metric: str
    value: float
    bound: float
    hits: list[tuple[str, float]]


def evaluate_rules(rules: list[AlertRule], metrics: dict[str, float]) -> list[Fired]:
    """Every rule broken by ``metrics``, each with its worst metric first."""
    fired = []
    for rule in rules:
        hits = [
            (k, v)
            for k, v in metrics.items()
            if fnmatch.fnmatchcase(k, rule.metric) and math.isfinite(v) and _breaks(rule, v)
        ]
        if hits:
            hits.sort(key=lambda kv: kv[1], reverse=rule.above is not None)
            fired.append(Fired(rule, *hits[0], _bound(rule), hits))
    return fired


def _breaks(rule: AlertRule, value: float) -> bool:
    if rule.above is not None:
        return value > rule.above
    assert rule.below is not None  # AlertRule's validator requires exactly one bound
    return value < rule.below


def _bound(rule: AlertRule) -> float:
    bound = rule.above if rule.above is not None else rule.below
    assert bound is not None  # AlertRule's validator requires exactly one bound
    return float(bound)


def requests_for(metric: str, metrics: dict[str, float]) -> int:
    """The requests a rule on ``metric`` is measured over: every request for the clients'
    error rate and the rule violation rate (refused requests count there), the accepted ones
    (not refused as the client's error) for anything else."""
    key = "requests" if metric in EVERY_REQUEST else "requests_accepted"
    return int(metrics.get(key, metrics.get("requests", 0.0)))


def _alerts(config: Config, store: MonitoringStore, result: CheckResult) -> None:
    mcfg = config.monitoring
    fired: list[tuple[AlertRule, Alert]] = []
    drifted: set[str] = set()
    for rule, metric, value, bound, hits in evaluate_rules(mcfg.rules, result.metrics):
        side = "above" if rule.above is not None else "below"
        seen = requests_for(metric, result.metrics)
        if seen < rule.min_requests:
            result.held.append(rule.name)
            result.notes.append(
                f"rule '{rule.name}' not fired: {metric} = {value:.4g} is {side} {bound:g}, but "
                f"over only {seen} {'' if metric in EVERY_REQUEST else 'accepted '}"
                f"request(s), fewer than its min_requests ({rule.min_requests})"
            )
            continue
        others = [k for k, _ in hits[1:]]
        message = (
            f"{result.model} v{result.version}: {rule.name}: {metric} = {value:.4g} is {side} "
            f"{bound:g}"
            + (
                f" (also {', '.join(others[:5])}{'...' if len(others) > 5 else ''})"
                if others
                else ""
            )
        )
        drifted.update(k.split("/", 1)[1] for k, _ in hits if k.startswith(("psi/", "ks/")))
        fired.append(
            (
                rule,
                Alert(
                    at=result.at,
                    model=result.model,
                    version=result.version,
                    rule=rule.name,
                    metric=metric,
                    value=float(value),
                    threshold=bound,
                    message=message,
                    check_run_id=result.run_id,
                ),
            )
        )
    result.drifted = sorted(drifted)
    rollback_rules = [rule.name for rule, _ in fired if rule.auto_rollback]
    if rollback_rules:
        result.rollback = _auto_rollback(config, result, rollback_rules)
    for rule, alert in fired:
        alert = dataclasses.replace(alert, action=result.rollback if rule.auto_rollback else None)
        if mcfg.webhook:
            alert = dataclasses.replace(alert, webhook=post_webhook(mcfg.webhook, alert))
        store.add_alert(alert)
        result.alerts.append(alert)


def _auto_rollback(config: Config, result: CheckResult, rules: list[str]) -> str:
    from mlops import registry  # monitoring acts on the registry, never the reverse

    reason = f"auto-rollback by mlops monitor: {', '.join(rules)} (check run {result.run_id})"
    try:
        done = registry.rollback(config, result.model, reason=reason, who=MONITOR_USER)
    except MlopsError as exc:
        logger.error("auto-rollback of %s failed: %s", result.model, exc)
        return f"rollback failed: {str(exc).splitlines()[0]}"
    return f"rolled back production from {done.from_version} to {done.to_version}"


def post_webhook(url: str, alert: Alert) -> str:
    """POST ``alert`` as JSON to ``url``; the outcome as text (a failure never stops the check).

    ``url``'s ``${VAR}`` placeholders are expanded here, at the moment of posting; only
    ``http(s)://`` is accepted, redirects are not followed (the alert, and a token in the URL,
    go to the address configured and nowhere else), and the outcome holds no secret of the URL.
    """
    try:
        target = expand_env(url)
        check_webhook_url(target, expanded=True)
    except (ConfigError, ValueError) as exc:
        return scrub(f"failed: {exc}", url)
    body = json.dumps({"source": "mlops", **alert.as_dict()}).encode()
    request = urllib.request.Request(
        target, data=body, method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with _web_opener().open(request, timeout=5) as response:
            return f"delivered (HTTP {response.status})"
    except urllib.error.HTTPError as exc:
        if 300 <= exc.code < 400:
            return f"failed: HTTP {exc.code} (a redirect, not followed: configure its target)"
        return f"failed: HTTP {exc.code}"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return scrub(f"failed: {exc}", url)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # the 3xx then surfaces as an HTTPError


def _web_opener() -> urllib.request.OpenerDirector:
    """An opener for http(s) alone (no file:, ftp: or data: handler), following no redirect."""
    opener = urllib.request.OpenerDirector()
    for handler in (
        urllib.request.ProxyHandler(),
        urllib.request.HTTPHandler(),
        urllib.request.HTTPSHandler(),
        _NoRedirect(),
        urllib.request.HTTPDefaultErrorHandler(),
        urllib.request.HTTPErrorProcessor(),
    ):
        opener.add_handler(handler)
    return opener


def _human(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"
