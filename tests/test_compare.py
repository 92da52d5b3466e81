"""Two versions on the same live traffic (issue 13): the statistics of ``mlops.monitoring.compare``
against direct computations on the same rows, the ``compare/`` section of a check's run, the
``mlops monitor --compare`` table, the ``live_comparison`` promotion gate on real registered
versions, and the audit rows of a split or shadow starting and stopping.

No server runs here: prediction-log rows are written straight into a SQLite log (through
``PredictionLogger``, as a split or shadow server's arms write them, or inserted row by row
where a test needs exact times, statuses and latencies).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa
from scipy import stats

from mlops.cli import main
from mlops.config import load_config
from mlops.errors import ConfigError, GateFailed
from mlops.monitoring import compare
from mlops.monitoring.checks import COMPARE_TAG, check
from mlops.monitoring.drift import psi
from mlops.monitoring.logger import PredictionLogger
from mlops.monitoring.store import PREDICTIONS, MonitoringStore
from mlops.registry import evaluate, promote, record_traffic, rollback
from mlops.registry.audit import AuditLog
from mlops.training import train
from tests.helpers import make_csv

NAME = "cmp-model"


# ---- direct computations, written out here (no statsmodels) ----
def z_test_by_hand(correct_a: np.ndarray, correct_b: np.ndarray) -> dict[str, float]:
    """Two-proportion z-test (pooled) and 95% Wald interval of p_b - p_a."""
    n1, n2 = len(correct_a), len(correct_b)
    p1, p2 = correct_a.sum() / n1, correct_b.sum() / n2
    pooled = (correct_a.sum() + correct_b.sum()) / (n1 + n2)
    z = (p2 - p1) / math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))

    def phi(x: float) -> float:  # the standard normal CDF (erfc: exact in the tails too)
        return 0.5 * math.erfc(-x / math.sqrt(2))

    half = 1.959963984540054 * math.sqrt(p1 * (1 - p1) / n1 + p2 * (1 - p2) / n2)
    return {
        "a": p1,
        "b": p2,
        "diff": p2 - p1,
        "z": z,
        "p_value": 2 * phi(-abs(z)),
        "p_worse": phi(z),
        "ci_low": p2 - p1 - half,
        "ci_high": p2 - p1 + half,
    }


def insert_rows(store: MonitoringStore, rows: list[dict]) -> None:
    """Prediction-log rows as a server writes them (features left out: not needed here)."""
    base = dict(error=None, layout=None, numeric=None, features=None, scores=None, row=0)
    with store.engine.begin() as conn:
        conn.execute(sa.insert(PREDICTIONS), [{**base, **r} for r in rows])


def add_labels(store: MonitoringStore, model: str, ids: list[str], labels: list) -> None:
    frame = pd.DataFrame({"request_id": ids, "row": 0, "label": [str(v) for v in labels]})
    assert store.add_labels(model, frame, time.time()) == (len(ids), [])


# ---- the statistics ----
def test_accuracy_difference_is_the_two_proportion_z_test() -> None:
    rng = np.random.default_rng(1)
    a = rng.random(400) < 0.86
    b = rng.random(300) < 0.80
    got = compare.accuracy_difference(a, b)
    want = z_test_by_hand(a, b)
    assert (got.n_a, got.n_b, got.test) == (400, 300, "two-proportion z-test")
    for key in ("a", "b", "diff", "p_value", "p_worse", "ci_low", "ci_high"):
        assert getattr(got, key) == pytest.approx(want[key], rel=1e-9, abs=1e-12), key
    assert got.statistic == pytest.approx(want["z"], rel=1e-9)
    # all right on both arms: nothing to test, and nothing worse
    same = compare.accuracy_difference(np.ones(50, bool), np.ones(60, bool))
    assert (same.diff, same.p_value, same.p_worse) == (0.0, 1.0, 0.5)


def test_squared_error_difference_is_welchs_t_test() -> None:
    rng = np.random.default_rng(2)
    a = rng.normal(0, 1.0, 250) ** 2
    b = rng.normal(0, 1.3, 180) ** 2
    got = compare.squared_error_difference(a, b)
    want = stats.ttest_ind(b, a, equal_var=False)
    low, high = want.confidence_interval(0.95)
    assert got.test == "Welch's t-test on squared errors" and got.metric == "mse"
    assert got.diff == pytest.approx(b.mean() - a.mean())
    assert got.statistic == pytest.approx(want.statistic) and got.p_value == pytest.approx(
        want.pvalue
    )
    assert (got.ci_low, got.ci_high) == (pytest.approx(low), pytest.approx(high))
    # Welch's t by hand, and the one-sided p-value from its Welch-Satterthwaite degrees of freedom
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    t = (b.mean() - a.mean()) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    assert got.statistic == pytest.approx(t)
    assert got.p_worse == pytest.approx(stats.t.sf(t, df))  # b's errors larger: b worse


def test_classification_arms_from_a_shadow_against_direct_computation(tmp_path: Path) -> None:
    """Production answers 300 requests; a shadow scores the same rows. Labels for 240 of them
    (joined to both arms on request id and row): every per-arm number and the test of the
    difference, against the same computations done here on the rows that were logged."""
    url = f"sqlite:///{tmp_path / 'log.db'}"
    rng = np.random.default_rng(3)
    n = 300
    truth = rng.choice(["no", "yes"], size=n)
    pred_a = np.where(rng.random(n) < 0.9, truth, np.where(truth == "yes", "no", "yes"))
    pred_b = np.where(rng.random(n) < 0.75, truth, np.where(truth == "yes", "no", "yes"))
    lat_a, lat_b = rng.gamma(2, 2, n), rng.gamma(2, 3, n)
    ids = [f"req{i}" for i in range(n)]
    logs = [
        PredictionLogger(
            url,
            model=NAME,
            version=version,
            numeric=["x"],
            categorical=[],
            arm=arm,
            shadow=shadow,
            flush_interval=3600,
        )
        for version, arm, shadow in (("1", "production", False), ("2", "challenger", True))
    ]
    for i in range(n):
        for log, pred, lat in ((logs[0], pred_a, lat_a), (logs[1], pred_b, lat_b)):
            log.submit(
                ids[i],
                latency_ms=float(lat[i]),
                numeric=np.array([[float(i)]]),
                predictions=np.array([pred[i]], dtype=object),
            )
    for log in logs:
        assert log.flush(timeout=30)
        log.close()
    store = MonitoringStore(url)
    labelled = rng.permutation(n)[:240]
    add_labels(store, NAME, [ids[i] for i in labelled], truth[labelled].tolist())
    now = time.time() + 1

    result = compare.compare_versions(
        store,
        NAME,
        "classification",
        version_a="1",
        version_b="2",
        since=now - 3600,
        until=now,
        min_labels=100,
    )
    a, b = result.a.metrics, result.b.metrics
    assert (a["requests"], b["requests"], a["predictions"], b["predictions"]) == (n, n, n, n)
    assert (a["shadow_rows"], b["shadow_rows"]) == (0, n)
    assert a["latency_p50_ms"] == pytest.approx(np.percentile(lat_a, 50))
    assert b["latency_p99_ms"] == pytest.approx(np.percentile(lat_b, 99))
    assert (a["client_error_rate"], a["server_error_rate"]) == (0.0, 0.0)
    shares_a = {c: float(np.mean(pred_a == c)) for c in ("no", "yes")}
    shares_b = {c: float(np.mean(pred_b == c)) for c in ("no", "yes")}
    assert result.a.distribution == pytest.approx(shares_a)
    assert result.b.distribution == pytest.approx(shares_b)
    assert result.prediction_psi == pytest.approx(
        psi([shares_a["no"], shares_a["yes"]], [shares_b["no"], shares_b["yes"]])
    )
    correct_a = pred_a[labelled] == truth[labelled]
    correct_b = pred_b[labelled] == truth[labelled]
    want = z_test_by_hand(correct_a, correct_b)
    assert (a["labelled"], b["labelled"]) == (240, 240)
    assert a["accuracy"] == pytest.approx(want["a"]) and b["accuracy"] == pytest.approx(want["b"])
    d = result.difference
    assert d is not None and result.decided and not result.notes
    assert d.diff == pytest.approx(want["diff"]) and d.p_value == pytest.approx(want["p_value"])
    assert (d.ci_low, d.ci_high) == (pytest.approx(want["ci_low"]), pytest.approx(want["ci_high"]))
    logged = result.metrics()
    assert logged["compare/challenger/accuracy"] == pytest.approx(want["b"])
    assert logged["compare/accuracy_diff"] == pytest.approx(want["diff"])
    assert logged["compare/accuracy_diff_ci_low"] == pytest.approx(want["ci_low"])
    assert logged["compare/accuracy_diff_ci_high"] == pytest.approx(want["ci_high"])
    assert logged["compare/p_value"] == pytest.approx(want["p_value"])
    assert logged["compare/production/share/yes"] == pytest.approx(shares_a["yes"])
    assert (logged["compare/production/version"], logged["compare/challenger/version"]) == (1, 2)


def test_regression_arms_with_errors_against_direct_computation(tmp_path: Path) -> None:
    """A 90/10 split with client and server errors: request metrics per arm as a check measures
    them, prediction quantiles and PSI, RMSE and Welch's test on the labelled squared errors."""
    store = MonitoringStore(f"sqlite:///{tmp_path / 'log.db'}")
    rng = np.random.default_rng(4)
    now = time.time()
    rows, truth = [], {}
    arms = {"production": ("3", 900, 1.0), "challenger": ("4", 120, 1.4)}
    sent: dict[str, dict[str, np.ndarray]] = {}
    for arm, (version, n, noise) in arms.items():
        status = rng.choice([200, 200, 200, 200, 200, 200, 200, 200, 400, 500], size=n)
        latency = rng.gamma(2.0, 1.5, n)
        y = rng.normal(50, 10, n)
        pred = y + rng.normal(0, noise, n)
        for i in range(n):
            rid = f"{arm}{i}"
            rows.append(
                dict(
                    request_id=rid,
                    at=now - 100 + i * 0.05,
                    model=NAME,
                    version=version,
                    status=int(status[i]),
                    latency_ms=float(latency[i]),
                    prediction=repr(float(pred[i])) if status[i] == 200 else None,
                    arm=arm,
                    shadow=False,
                )
            )
            if status[i] == 200:
                truth[rid] = y[i]
        sent[arm] = {"status": status, "latency": latency, "y": y, "pred": pred}
    rows.append(  # outside the window: not counted
        dict(
            request_id="old",
            at=now - 7200,
            model=NAME,
            version="4",
            status=200,
            latency_ms=1.0,
            prediction="0.0",
            arm="challenger",
            shadow=False,
        )
    )
    insert_rows(store, rows)
    ids = sorted(truth)
    add_labels(store, NAME, ids, [truth[i] for i in ids])

    assert compare.other_arms(store, NAME, "3", now - 3600, now + 1) == [("challenger", "4", 120)]
    result = compare.compare_versions(
        store,
        NAME,
        "regression",
        version_a="3",
        version_b="4",
        since=now - 3600,
        until=now + 1,
        min_labels=50,
    )
    squared = {}
    for arm, got in (("production", result.a), ("challenger", result.b)):
        s = sent[arm]
        client = (s["status"] >= 400) & (s["status"] < 500)
        accepted = ~client
        ok = s["status"] == 200
        m = got.metrics
        assert m["requests"] == len(s["status"]) and m["predictions"] == ok.sum()
        assert m["client_error_rate"] == pytest.approx(client.mean())
        assert m["server_error_rate"] == pytest.approx((s["status"][accepted] >= 500).mean())
        assert m["latency_p50_ms"] == pytest.approx(np.percentile(s["latency"][accepted], 50))
        assert m["latency_p99_ms"] == pytest.approx(np.percentile(s["latency"][accepted], 99))
        squared[arm] = (s["y"][ok] - s["pred"][ok]) ** 2
        assert m["labelled"] == ok.sum()
        assert m["rmse"] == pytest.approx(math.sqrt(squared[arm].mean()))
        assert got.distribution["prediction_p50"] == pytest.approx(np.median(s["pred"][ok]))
        assert got.distribution["prediction_p90"] == pytest.approx(np.quantile(s["pred"][ok], 0.9))
    pa, pb = sent["production"]["pred"], sent["challenger"]["pred"]
    pa, pb = pa[sent["production"]["status"] == 200], pb[sent["challenger"]["status"] == 200]
    edges = np.unique(np.quantile(pa, np.linspace(0, 1, 11)[1:-1]))
    shares = [
        np.bincount(np.searchsorted(edges, p, side="left"), minlength=len(edges) + 1) / len(p)
        for p in (pa, pb)
    ]
    assert result.prediction_psi == pytest.approx(psi(shares[0], shares[1]))
    want = stats.ttest_ind(squared["challenger"], squared["production"], equal_var=False)
    d = result.difference
    assert d is not None and d.metric == "mse"
    assert d.p_value == pytest.approx(want.pvalue) and d.statistic == pytest.approx(want.statistic)
    assert (d.ci_low, d.ci_high) == tuple(pytest.approx(v) for v in want.confidence_interval())
    logged = result.metrics()
    assert logged["compare/mse_diff"] == pytest.approx(
        squared["challenger"].mean() - squared["production"].mean()
    )
    assert logged["compare/rmse_diff"] == pytest.approx(
        math.sqrt(squared["challenger"].mean()) - math.sqrt(squared["production"].mean())
    )
    lines = "\n".join(result.lines())
    assert "MSE difference (challenger - production)" in lines and "Welch's t-test" in lines
    assert f"{result.b.metrics['rmse']:.4f}" in lines


def test_too_few_labels_is_said_plainly_and_nothing_is_tested(tmp_path: Path) -> None:
    store = MonitoringStore(f"sqlite:///{tmp_path / 'log.db'}")
    now = time.time()
    rows = [
        dict(
            request_id=f"{arm}{i}",
            at=now - 10,
            model=NAME,
            version=version,
            status=200,
            latency_ms=1.0,
            prediction="yes",
            arm=arm,
            shadow=False,
        )
        for arm, version, n in (("production", "1", 150), ("challenger", "2", 60))
        for i in range(n)
    ]
    insert_rows(store, rows)
    add_labels(store, NAME, [f"production{i}" for i in range(120)], ["yes"] * 120)
    add_labels(store, NAME, [f"challenger{i}" for i in range(40)], ["no"] * 40)
    result = compare.compare_versions(
        store,
        NAME,
        "classification",
        version_a="1",
        version_b="2",
        since=now - 60,
        until=now,
        min_labels=100,
    )
    assert result.difference is None and not result.decided
    assert result.b.metrics["accuracy"] == 0.0 and result.b.metrics["labelled"] == 40
    (note,) = result.notes
    assert note.startswith("too few labels to decide between production and challenger: 120")
    assert "40 of challenger (version 2)" in note and "at least 100 per arm" in note
    assert not any(k.endswith(("_diff", "p_value")) for k in result.metrics())
    assert result.lines()[-1] == (
        "  too few labels to decide: 120 labelled (production), 40 labelled (challenger); at "
        "least 100 per arm needed (monitoring.compare_min_labels); feed labels with mlops feedback"
    )


# ---- a check's run, the CLI and the gate, on registered versions ----
def config_for(tmp_path: Path, *extra: str):
    return load_config(
        overrides=[
            f"registry.model_name={NAME}",
            f"registry.audit_url=sqlite:///{tmp_path / 'audit.db'}",
            f"monitoring.log_url=sqlite:///{tmp_path / 'predictions.db'}",
            f"data.dataset={tmp_path / 'data.csv'}",
            "data.target=label",
            "data.categorical=[color]",
            *extra,
        ]
    )


@pytest.fixture
def versions(tmp_path: Path):
    """v1 in production (promoted through staging), v2 a second version of the same data."""
    make_csv(tmp_path / "data.csv", n=300)
    cfg = config_for(tmp_path)
    v1 = train(cfg, register=True).registered_version
    v2 = train(config_for(tmp_path, "model.params.C=0.5"), register=True).registered_version
    assert (v1, v2) == ("1", "2")
    promote(cfg, NAME, "1", "staging")
    promote(cfg, NAME, "1", "production")
    return cfg


def traffic(
    store: MonitoringStore, accuracy: dict[str, float], n: dict[str, int], seed: int = 0
) -> dict[str, np.ndarray]:
    """Labelled rows of v1 (arm production) and v2 (arm challenger) in the last minutes, right
    at about ``accuracy`` of each version; the right/wrong vectors as logged."""
    rng = np.random.default_rng(seed)
    now = time.time()
    rows, ids, labels, correct = [], [], [], {}
    for version, arm in (("1", "production"), ("2", "challenger")):
        right = rng.random(n[version]) < accuracy[version]
        truth = rng.choice(["no", "yes"], size=n[version])
        pred = np.where(right, truth, np.where(truth == "yes", "no", "yes"))
        for i in range(n[version]):
            rid = f"s{seed}v{version}r{i}"
            rows.append(
                dict(
                    request_id=rid,
                    at=now - 120 + i * 0.01,
                    model=NAME,
                    version=version,
                    status=200,
                    latency_ms=2.0,
                    prediction=str(pred[i]),
                    arm=arm,
                    shadow=False,
                )
            )
            ids.append(rid)
            labels.append(truth[i])
        correct[version] = right
    insert_rows(store, rows)
    add_labels(store, NAME, ids, labels)
    return correct


def test_check_run_and_cli_compare_the_arms(
    versions, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = versions
    client = mlflow.MlflowClient()
    client.set_registered_model_alias(NAME, "challenger", "2")
    store = MonitoringStore(cfg.monitoring.log_url)
    correct = traffic(store, {"1": 0.9, "2": 0.8}, {"1": 400, "2": 250})
    want = z_test_by_hand(correct["1"], correct["2"])

    # no --compare: the other arm in the window is found and compared in the check's run
    result = check(cfg, NAME, window="1h")
    run = client.get_run(result.run_id)
    m = run.data.metrics
    assert run.data.tags[COMPARE_TAG] == "production v1 vs challenger v2"
    assert m["compare/production/requests"] == 400 and m["compare/challenger/requests"] == 250
    assert m["compare/production/accuracy"] == pytest.approx(want["a"])
    assert m["compare/challenger/accuracy"] == pytest.approx(want["b"])
    assert m["compare/accuracy_diff"] == pytest.approx(want["diff"])
    assert m["compare/accuracy_diff_ci_low"] == pytest.approx(want["ci_low"])
    assert m["compare/accuracy_diff_ci_high"] == pytest.approx(want["ci_high"])
    assert m["compare/p_value"] == pytest.approx(want["p_value"])
    assert m["compare/p_worse"] == pytest.approx(want["p_worse"])
    assert m["requests"] == 400  # production's own metrics: its rows alone
    assert m["accuracy"] == pytest.approx(want["a"])
    page = Path(
        client.download_artifacts(result.run_id, "drift_report/report.html", str(tmp_path))
    ).read_text()
    assert (
        "Comparison of the arms" in page and "accuracy difference (challenger - production)" in page
    )

    conf = tmp_path / "exp.yaml"
    conf.write_text(
        f"registry:\n  model_name: {NAME}\n  audit_url: sqlite:///{tmp_path / 'audit.db'}\n"
        f"monitoring:\n  log_url: {cfg.monitoring.log_url}\n"
    )
    capsys.readouterr()
    main(["monitor", NAME, "--window", "1h", "--compare", "challenger", "--config", str(conf)])
    out = capsys.readouterr().out
    lines = out.splitlines()
    start = lines.index("  compare:")
    header, *body = lines[start + 1 :]
    assert header.split() == ["production", "challenger"]
    row = {line[:24].strip(): line[24:].split() for line in body if line.startswith("    ")}
    assert row["version"] == ["1", "2"] and row["requests"] == ["400", "250"]
    assert row["accuracy"] == [f"{want['a']:.4f}", f"{want['b']:.4f}"]
    assert (
        f"accuracy difference (challenger - production): {want['diff']:+.4f} (95% CI "
        f"{want['ci_low']:+.4f} to {want['ci_high']:+.4f}), two-proportion z-test "
        f"p = {want['p_value']:.4g}"
    ) in out

    main(
        ["monitor", NAME, "--window", "1h", "--compare", "challenger", "--config", str(conf)]
        + ["--set", "monitoring.compare_min_labels=1000"]
    )
    out = capsys.readouterr().out
    assert (
        "too few labels to decide: 400 labelled (production), 250 labelled (challenger); at "
        "least 1000 per arm needed"
    ) in out
    assert "note: too few labels to decide between production and challenger" in out

    with pytest.raises(SystemExit):
        main(["monitor", NAME, "--compare", "canary", "--config", str(conf)])
    assert "error: --compare canary: cmp-model has no alias 'canary'" in capsys.readouterr().err


def test_live_comparison_gate_on_registered_versions(versions, tmp_path: Path) -> None:
    """Off by default; on: no labels refuses, a significantly worse v2 refuses, an equal one
    passes and is promoted. Split start/stop rows do not disturb promotion or rollback."""
    gates = [g.gate for g in evaluate(versions, NAME, "2")]
    assert "live comparison" not in gates  # off by default
    cfg = config_for(
        tmp_path,
        "registry.production.live_comparison=true",
        "registry.production.live_window=1h",
        "registry.production.tolerance=1.0",  # the held-out test split does not decide here
        "monitoring.compare_min_labels=100",
    )
    promote(cfg, NAME, "2", "staging")
    record_traffic(cfg, NAME, "split_start", "production=90,challenger=10", who="ops")

    live = {g.gate: g for g in evaluate(cfg, NAME, "2")}["live comparison"]
    assert not live.passed and live.measured.startswith("0 labelled predictions of v2")
    assert "too few labels to decide: v2 has no predictions in the prediction log" in live.detail

    store = MonitoringStore(cfg.monitoring.log_url)
    correct = traffic(store, {"1": 0.92, "2": 0.84}, {"1": 600, "2": 300}, seed=1)
    want = z_test_by_hand(correct["1"], correct["2"])
    with pytest.raises(GateFailed) as refused:
        promote(cfg, NAME, "2", "production")
    live = {g.gate: g for g in refused.value.gates}["live comparison"]
    assert not live.passed and want["p_worse"] < 0.05
    assert f"difference {want['diff']:+.4f}" in live.measured
    assert f"one-sided p = {want['p_worse']:.3g}" in live.measured
    assert "significantly worse than v1" in live.detail
    assert str(mlflow.MlflowClient().get_model_version_by_alias(NAME, "production").version) == "1"

    # a fresh log where v2 does as well as v1: not significantly worse
    cfg = config_for(
        tmp_path,
        "registry.production.live_comparison=true",
        "registry.production.live_window=1h",
        "registry.production.tolerance=1.0",
        f"monitoring.log_url=sqlite:///{tmp_path / 'predictions-2.db'}",
    )
    correct = traffic(
        MonitoringStore(cfg.monitoring.log_url), {"1": 0.9, "2": 0.9}, {"1": 500, "2": 200}, seed=2
    )
    want = z_test_by_hand(correct["1"], correct["2"])
    assert want["p_worse"] >= 0.05
    done = promote(cfg, NAME, "2", "production", reason="canary held")
    live = {g.gate: g for g in done.gates}["live comparison"]
    assert live.passed and f"one-sided p = {want['p_worse']:.3g}" in live.measured
    record_traffic(cfg, NAME, "split_stop", "production=100", who="ops", reason="promoted")
    back = rollback(cfg, NAME, reason="check the trail")
    assert (back.from_version, back.to_version) == ("2", "1")
    trail = AuditLog(cfg.registry.audit_url).records(NAME)
    assert [(r.action, r.outcome) for r in trail][-5:] == [
        ("split_start", "done"),
        ("promote", "refused"),
        ("promote", "done"),
        ("split_stop", "done"),
        ("rollback", "done"),
    ]
    stored = [g for g in trail[-3].gates if g["gate"] == "live comparison"]
    assert stored and stored[0]["passed"]


def test_traffic_changes_are_audit_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    conf = tmp_path / "exp.yaml"
    conf.write_text(f"registry:\n  audit_url: sqlite:///{tmp_path / 'audit.db'}\n")
    cfg = load_config(conf)
    record_traffic(
        cfg, NAME, "split_start", "production=90,challenger=10", who="alice", reason="canary of v4"
    )
    record_traffic(cfg, NAME, "shadow_start", "shadow challenger (version 4)", who="alice")
    record_traffic(cfg, NAME, "shadow_stop", "shadow challenger (version 4)")
    record_traffic(cfg, NAME, "split_stop", "production=100", who="bob")
    with pytest.raises(ConfigError, match="traffic action 'split_pause' is unknown"):
        record_traffic(cfg, NAME, "split_pause", "x")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="detail is empty"):
        record_traffic(cfg, NAME, "split_start", "  ")
    main(["audit", NAME, "--config", str(conf)])
    out = capsys.readouterr().out.splitlines()
    assert [line.split(" ", 4)[3:] for line in out] == [
        ["alice", "split_start: production=90,challenger=10 reason: canary of v4"],
        ["alice", "shadow_start: shadow challenger (version 4)"],
        [out[2].split()[3], "shadow_stop: shadow challenger (version 4)"],
        ["bob", "split_stop: production=100"],
    ]
    rows = AuditLog(cfg.registry.audit_url).records(NAME)
    assert {(r.outcome, r.target, r.to_version) for r in rows} == {("done", "production", None)}
