"""Production monitoring against a real served model: prediction log, drift, labels, alerts,
rollback."""

from __future__ import annotations

import csv
import hashlib
import hmac
import http.server
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa

from mlops import registry
from mlops.config import load_config
from mlops.errors import ConfigError, DataValidationError
from mlops.monitoring import drift, read_labels
from mlops.monitoring import profile as prof
from mlops.monitoring.checks import check, evaluate_rules, load_profile, parse_duration
from mlops.monitoring.logger import HASH_PREFIX, PredictionLogger
from mlops.monitoring.store import PREDICTIONS, MonitoringStore
from mlops.training import train
from tests.conftest import free_port, skip_or_fail, using_store
from tests.servers import BIN, post, running, server_env

pytestmark = pytest.mark.slow
NAME = "mon-model"
FEATURES = ["x1", "x2", "x3", "age", "color"]
MASK_KEY = "the-servers-hashing-key-for-tests"  # MLOPS_MASK_KEY of the served model


def synthetic(n: int, seed: int, shift_x3: float = 0.0) -> pd.DataFrame:
    """x1 and x2 decide the label; x3 does not; age is a sensitive feature."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        {
            "x1": rng.normal(size=n),
            "x2": rng.normal(size=n),
            "x3": rng.normal(size=n) + shift_x3,
            "age": rng.integers(18, 90, size=n).astype(float),
            "color": rng.choice(["red", "green", "blue"], size=n),
        }
    )
    frame["label"] = np.where(frame.x1 + frame.x2 + 0.5 * (frame.color == "red") > 0.2, "yes", "no")
    return frame


def write_config(root: Path, **monitoring: object) -> Path:
    """The experiment YAML the tests' commands share (stores in ``root``)."""
    import yaml

    config = {
        "experiment": "mon",
        "data": {"dataset": str(root / "data.csv"), "target": "label", "categorical": ["color"]},
        "registry": {
            "model_name": NAME,
            "audit_url": f"sqlite:///{root / 'audit.db'}",
            "production": {"tolerance": 0.05},
        },
        "monitoring": {
            "enabled": True,
            "log_url": f"sqlite:///{root / 'predictions.db'}",
            "sensitive_columns": ["age"],
            "min_rows": 100,
            "min_labels": 30,
            **monitoring,
        },
    }
    path = root / f"config-{len(list(root.glob('config-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, template_store: Path) -> Iterator[dict]:
    """Versions 1 and 2 of NAME; 2 is production and replaced 1."""
    root = tmp_path_factory.mktemp("monitoring")
    shutil.copy(template_store, root / "mlflow.db")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    synthetic(2000, seed=0).to_csv(root / "data.csv", index=False)
    config_path = write_config(root)
    # the experiment made here gets its artifact root in the working folder: keep it in root
    # (this fixture runs before the per-test one that moves into the test's own folder)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        with using_store(uri):
            config = load_config(config_path)
            v1 = train(config, register=True).registered_version
            v2 = train(
                load_config(config_path, ["model.params.C=0.3"]), register=True
            ).registered_version
            for version in (v1, v2):
                registry.promote(config, NAME, version, "staging")
                registry.promote(config, NAME, version, "production", reason="test set-up")
    finally:
        os.chdir(cwd)
    yield {"uri": uri, "root": root, "config": config_path, "v1": v1, "v2": v2}


@pytest.fixture(scope="module")
def server(store: dict) -> Iterator[str]:
    """`mlops serve` of @production with monitoring on (the log URL given on the command line)."""
    port = free_port()
    cmd = [
        str(BIN / "mlops"),
        "serve",
        NAME,
        "--alias",
        "production",
        "--port",
        str(port),
        "--monitor",
        "--log-url",
        f"sqlite:///{store['root'] / 'predictions.db'}",
    ]
    env = server_env(store["uri"], MLOPS_MASK_KEY=MASK_KEY)
    with running(cmd, env, port, store["root"] / "server.log") as base:
        yield base


def logged(url: str, request_ids: list[str], expect_rows: int, timeout: float = 20) -> pd.DataFrame:
    """The logged rows of ``request_ids``, once ``expect_rows`` of them are there."""
    engine = sa.create_engine(url)
    deadline = time.monotonic() + timeout
    try:
        while True:
            with engine.connect() as conn:
                try:
                    rows = (
                        conn.execute(
                            sa.select(PREDICTIONS).where(PREDICTIONS.c.request_id.in_(request_ids))
                        )
                        .mappings()
                        .all()
                    )
                except sa.exc.DBAPIError:  # no table yet, or the database is down
                    rows = []
            if len(rows) >= expect_rows or time.monotonic() > deadline:
                return pd.DataFrame([dict(r) for r in rows])
            time.sleep(0.2)
    finally:
        engine.dispose()


def requests_since(url: str, start: float, expect: int, timeout: float = 20) -> int:
    """How many requests (refused ones too) were logged since ``start``, once ``expect`` are."""
    engine = sa.create_engine(url)
    deadline = time.monotonic() + timeout
    query = sa.select(sa.func.count(sa.distinct(PREDICTIONS.c.request_id))).where(
        PREDICTIONS.c.at >= start, PREDICTIONS.c.shadow == sa.false()
    )
    try:
        while True:
            with engine.connect() as conn:
                count = int(conn.execute(query).scalar_one())
            if count >= expect or time.monotonic() > deadline:
                return count
            time.sleep(0.2)
    finally:
        engine.dispose()


def records(frame: pd.DataFrame) -> dict:
    return {"dataframe_split": {"columns": FEATURES, "data": frame[FEATURES].values.tolist()}}


def test_served_requests_are_logged_with_their_request_id_masked_and_timed(
    store: dict, server: str
) -> None:
    frame = synthetic(3, seed=5)
    status, body = post(server, records(frame))
    assert status == 200, body
    rows = body["predictions"]
    request_id = rows[0]["request_id"]
    assert len(request_id) == 32 and all(r["request_id"] == request_id for r in rows)
    assert {r["model_version"] for r in rows} == {store["v2"]}

    bad_status, bad = post(server, {"dataframe_records": [{"x1": 1.0}]})
    assert bad_status == 400 and "x2" in bad["message"]
    good_after_status, after = post(server, records(frame.head(1)))
    assert good_after_status == 200

    url = f"sqlite:///{store['root'] / 'predictions.db'}"
    log = logged(url, [request_id], 3).sort_values("row")
    assert list(log["row"]) == [0, 1, 2] and set(log["status"]) == {200}
    assert list(log["prediction"]) == [r["prediction"] for r in rows]
    assert (
        (log["latency_ms"] > 0).all()
        and set(log["version"]) == {store["v2"]}
        and set(log["model"]) == {NAME}
    )
    store_ = MonitoringStore(url)
    stored = store_.predictions(NAME, store["v2"], 0, time.time() + 60)
    stored = stored[stored["request_id"] == request_id].sort_values("row")
    features = store_.features(stored).to_dict("records")
    assert len(features) == 3 and set(features[0]) == set(FEATURES)
    for sent, got in zip(frame.to_dict("records"), features, strict=False):
        assert got["x1"] == pytest.approx(sent["x1"]) and got["color"] == sent["color"]
        # the sensitive column left the server as a keyed hash, never as the value
        digest = hmac.new(MASK_KEY.encode(), str(sent["age"]).encode(), hashlib.sha256)
        assert got["age"] == HASH_PREFIX + digest.hexdigest()
    scores = json.loads(log["scores"].iloc[0])
    assert scores == pytest.approx({"no": rows[0]["proba_no"], "yes": rows[0]["proba_yes"]})

    engine = sa.create_engine(url)
    with engine.connect() as conn:
        failed = (
            conn.execute(sa.select(PREDICTIONS).where(PREDICTIONS.c.status == 400)).mappings().all()
        )
    engine.dispose()
    assert failed and "x2" in failed[-1]["error"] and failed[-1]["features"] is None
    # the server's writer made the log through the migrations: its schema version is recorded
    assert sa.inspect(sa.create_engine(url)).has_table("mlops_log_alembic_version")


def test_drift_labels_alert_webhook_and_auto_rollback(
    store: dict, server: str, tmp_path: Path
) -> None:
    received: list[dict] = []

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the http.server API
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    hook = http.server.HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    try:
        bad_status, _ = post(
            server, {"dataframe_records": [{"x1": 1.0}]}
        )  # a client error for the client-error-rate rule
        assert bad_status == 400
        # traffic with a known shift on x3 only (x3 does not decide the label)
        traffic = synthetic(600, seed=11, shift_x3=1.5)
        answered = []
        for start in range(0, len(traffic), 50):
            part = traffic.iloc[start : start + 50]
            status, body = post(server, records(part))
            assert status == 200, body
            answered += [
                (p["request_id"], i, p["prediction"], label)
                for i, (p, label) in enumerate(
                    zip(body["predictions"], part["label"], strict=False)
                )
            ]
        labels_csv = tmp_path / "labels.csv"
        labelled = answered[::2]  # ground truth arrives for half of the predictions
        with open(labels_csv, "w", newline="") as fh:
            out = csv.writer(fh)
            out.writerow(["request_id", "row", "label"])
            out.writerows([(rid, row, label) for rid, row, _, label in labelled])
        expected_accuracy = np.mean([pred == label for _, _, pred, label in labelled])

        env = server_env(store["uri"])
        config = write_config(
            store["root"],
            webhook=f"http://127.0.0.1:{hook.server_address[1]}/alerts",
            # the window holds about 15 requests (of up to 50 rows): rules over at least 10
            rules=[
                {
                    "name": "feature_drift",
                    "metric": "psi/*",
                    "above": 0.2,
                    "auto_rollback": True,
                    "min_requests": 10,
                },
                {
                    "name": "client_errors",
                    "metric": "client_error_rate",
                    "above": 0.01,
                    "min_requests": 10,
                },
                {
                    "name": "server_errors",
                    "metric": "server_error_rate",
                    "above": 0.0,
                    "auto_rollback": True,
                    "min_requests": 10,
                },
                {
                    "name": "accuracy_drop",
                    "metric": "accuracy_drop",
                    "above": 0.05,
                    "auto_rollback": True,
                    "min_requests": 10,
                },
            ],
        )
        url = f"sqlite:///{store['root'] / 'predictions.db'}"
        assert len(logged(url, list({a[0] for a in answered}), len(answered))) == len(answered)

        # a label for a request that does not exist: refused as a whole, nothing stored
        bogus = tmp_path / "bogus.csv"
        bogus.write_text("request_id,label\nnot-a-request,yes\n" + f"{labelled[0][0]},yes\n")
        refused = subprocess.run(
            [str(BIN / "mlops"), "feedback", NAME, "--labels", str(bogus), "--config", str(config)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert (
            refused.returncode == 1
            and "not-a-request" in refused.stderr
            and "nothing was stored" in refused.stderr
        )

        fed = subprocess.run(
            [
                str(BIN / "mlops"),
                "feedback",
                NAME,
                "--labels",
                str(labels_csv),
                "--config",
                str(config),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert fed.returncode == 0, fed.stderr
        assert f"{len(labelled)} labels attached" in fed.stdout

        before = time.time()
        done = subprocess.run(
            [str(BIN / "mlops"), "monitor", NAME, "--window", "1h", "--config", str(config)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
        assert "drifted features: x3" in done.stdout and "ALERT" in done.stdout, done.stdout
    finally:
        hook.shutdown()

    with using_store(store["uri"]):
        client = mlflow.MlflowClient()
        experiment = client.get_experiment_by_name(f"{NAME}-monitoring")
        (run,) = client.search_runs([experiment.experiment_id])
        metrics = run.data.metrics
        assert metrics["psi/x3"] > 0.2 and metrics["ks/x3"] > 0.3
        for other in ("x1", "x2", "color"):
            assert metrics[f"psi/{other}"] < 0.2, (other, metrics[f"psi/{other}"])
        assert "psi/age" not in metrics and "masked" in run.data.tags["mlops.monitor.notes"]
        assert metrics["labelled"] == len(labelled)
        assert metrics["accuracy"] == pytest.approx(expected_accuracy, abs=1e-12)
        # the 400s of the first test and this one: the clients' errors, not the server's
        assert metrics["requests"] >= 12 and metrics["client_error_rate"] > 0.01
        assert metrics["server_error_rate"] == 0.0
        assert 0 < metrics["requests_accepted"] < metrics["requests"]
        history = client.get_metric_history(run.info.run_id, "psi/x3")
        assert len(history) == 1 and before - 1 <= history[0].step <= time.time()
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "drift_report")}
        assert {
            "drift_report/report.html",
            "drift_report/psi.png",
            "drift_report/feature_x3.png",
        } <= artifacts
        assert run.data.tags["mlops.monitor.version"] == store["v2"]
        page = Path(
            client.download_artifacts(run.info.run_id, "drift_report/report.html", str(tmp_path))
        ).read_text()
        assert (
            "feature_drift: psi/x3" in page and f"rolled back production from {store['v2']}" in page
        )
        assert "<tr class=drift><td>x3</td>" in page and "<tr class=drift><td>x1</td>" not in page

        # the drift rule rolled production back to the version 2 replaced, audited like a manual one
        assert str(client.get_model_version_by_alias(NAME, "production").version) == store["v1"]
        trail = registry.audit_trail(load_config(config), NAME)
        last = trail[-1]
        assert (last.action, last.outcome, last.who) == ("rollback", "done", "mlops-monitor")
        assert (last.from_version, last.to_version) == (
            store["v2"],
            store["v1"],
        ) and "feature_drift" in last.reason

    rules = {a["rule"]: a for a in received}
    assert set(rules) == {"feature_drift", "client_errors"}
    assert rules["feature_drift"]["metric"] == "psi/x3" and rules["feature_drift"]["value"] > 0.2
    assert (
        rules["feature_drift"]["action"]
        == f"rolled back production from {store['v2']} to {store['v1']}"
    )
    assert rules["client_errors"]["action"] is None
    stored = MonitoringStore(f"sqlite:///{store['root'] / 'predictions.db'}").alerts(NAME)
    assert {a.rule for a in stored} == {"feature_drift", "client_errors"}
    assert all(
        a.webhook == "delivered (HTTP 204)" and a.check_run_id == run.info.run_id for a in stored
    )

    # production is now version 1, which has served nothing: said plainly, nothing computed
    with using_store(store["uri"]):
        quiet = check(load_config(config), NAME, window="1h")
    assert quiet.version == store["v1"] and quiet.status == "insufficient_data"
    assert "too little data: 0 predictions" in quiet.notes[0]
    assert not any(k.startswith("psi") for k in quiet.metrics) and not quiet.alerts


def test_client_errors_cannot_roll_back_and_rules_wait_for_min_requests(
    store: dict, server: str
) -> None:
    """20 bad requests (4xx) and 5 good ones: no server error, no rollback; a rule over fewer
    requests than its min_requests does not fire, and the check says so."""
    start = time.time()
    bad = [
        {"dataframe_records": [{"x1": 1.0}]},  # columns missing
        {"dataframe_split": {"columns": FEATURES, "data": [["a", "b", "c", "d", "red"]]}},
        {"dataframe_split": {"columns": FEATURES, "data": [[1.0, 2.0, 3.0, "old", "red"]]}},
        "not json",
    ]
    statuses = [post(server, bad[i % len(bad)])[0] for i in range(20)]
    assert all(400 <= s < 500 for s in statuses), statuses
    good = [post(server, records(synthetic(1, seed=100 + i))) for i in range(5)]
    assert all(s == 200 for s, _ in good)
    served = good[0][1]["predictions"][0]["model_version"]
    ids = [body["predictions"][0]["request_id"] for _, body in good]
    url = f"sqlite:///{store['root'] / 'predictions.db'}"
    assert len(logged(url, ids, 5)) == 5
    # the refused requests are written by the same background writer: wait until all 25 are in
    assert requests_since(url, start, 25) == 25
    end = time.time() + 0.5

    config = write_config(
        store["root"],
        rules=[
            # a client's bad requests are no server error, however few requests there are
            {
                "name": "server_errors",
                "metric": "server_error_rate",
                "above": 0.01,
                "auto_rollback": True,
                "min_requests": 0,
            },
            # 80% client errors, but 25 requests < 100: held back
            {"name": "client_errors", "metric": "client_error_rate", "above": 0.5},
            # past its bound, but 5 accepted requests < 10 (the 20 bad ones do not count)
            {
                "name": "latency",
                "metric": "latency_p99_ms",
                "above": 0.0,
                "auto_rollback": True,
                "min_requests": 10,
            },
            {"name": "latency_small", "metric": "latency_p99_ms", "above": 0.0, "min_requests": 5},
        ],
    )
    with using_store(store["uri"]):
        client = mlflow.MlflowClient()
        client.set_registered_model_alias(NAME, "production", served)
        result = check(load_config(config), NAME, window=end - start, now=end)
        assert str(client.get_model_version_by_alias(NAME, "production").version) == served
        run = client.get_run(result.run_id)
    m = result.metrics
    assert m["requests"] == 25 and m["requests_accepted"] == 5
    assert m["client_error_rate"] == pytest.approx(0.8) and m["server_error_rate"] == 0.0
    assert [a.rule for a in result.alerts] == ["latency_small"] and result.rollback is None
    assert result.held == ["client_errors", "latency"]
    notes = run.data.tags["mlops.monitor.notes"]
    assert (
        "rule 'client_errors' not fired" in notes and "fewer than its min_requests (100)" in notes
    )
    assert "rule 'latency' not fired" in notes and "only 5 accepted request(s)" in notes
    assert run.data.tags["mlops.monitor.held"] == "client_errors,latency"


def test_the_reference_profile_carries_no_value_of_the_sensitive_column(store: dict) -> None:
    """Needs mlops/serving/flavor.py to pass the sensitive columns to build_profile."""
    with using_store(store["uri"]):
        profile = load_profile(NAME, store["v1"])
    assert profile["features"]["age"] == {"kind": "numeric", "masked": True}
    assert "quantiles" in profile["features"]["x1"]


@pytest.fixture
def private_postgres() -> Iterator[tuple[str, callable, callable]]:
    """A PostgreSQL server of this test's own (initdb on a free port), to stop and start at will."""
    bins = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    if not bins and not shutil.which("pg_ctl"):
        skip_or_fail("no PostgreSQL server binaries (pg_ctl) on this machine")
    bindir = bins[-1].parent if bins else Path(shutil.which("pg_ctl")).parent
    folder = Path(tempfile.mkdtemp(prefix="mlops-pg-"))
    folder.chmod(0o755)
    data = folder / "data"
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses root: run the server as the postgres user
        shutil.chown(folder, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    pg_ctl = [*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-w", "-t", "30"]
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off"

    def start() -> None:
        subprocess.run(
            [*pg_ctl, "-o", options, "-l", str(folder / "log"), "start"],
            check=True,
            capture_output=True,
            timeout=60,
        )

    def stop() -> None:
        subprocess.run(
            [*pg_ctl, "-m", "immediate", "stop"], check=True, capture_output=True, timeout=60
        )

    try:
        init = subprocess.run(
            [
                *as_user,
                str(bindir / "initdb"),
                "-D",
                str(data),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if init.returncode:
            skip_or_fail(f"initdb failed: {init.stderr[-500:]}")
        start()
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres", stop, start
    finally:
        subprocess.run([*pg_ctl, "-m", "immediate", "stop"], capture_output=True, timeout=60)
        shutil.rmtree(folder, ignore_errors=True)


def test_log_database_stopped_mid_traffic_loses_no_request_and_reports_drops(
    store: dict, private_postgres: tuple
) -> None:
    url, stop_db, start_db = private_postgres
    port = free_port()
    capacity = 40
    env = server_env(
        store["uri"],
        SERVING_MODEL_CONFIG=json.dumps(
            {"monitoring": True, "monitoring_url": url, "monitoring_queue_rows": capacity}
        ),
    )
    # `mlops serve`: its graceful stop flushes the prediction log (checked at the end)
    cmd = [str(BIN / "mlops"), "serve", NAME, "--version", store["v1"], "--port", str(port)]
    one = records(synthetic(1, seed=3))
    with running(cmd, env, port, store["root"] / "pg-server.log") as base:
        before = [post(base, one) for _ in range(20)]
        assert all(status == 200 for status, _ in before)
        before_ids = [body["predictions"][0]["request_id"] for _, body in before]
        assert len(logged(url, before_ids, 20)) == 20

        stop_db()
        during = [post(base, one) for _ in range(100)]  # the store is down: serving goes on
        assert [status for status, _ in during] == [200] * 100, [b for s, b in during if s != 200][
            :1
        ]
        during_ids = [body["predictions"][0]["request_id"] for _, body in during]
        start_db()

        all_ids = before_ids + during_ids
        deadline = time.monotonic() + 40
        while True:
            rows = logged(url, all_ids, 20 + capacity, timeout=1)
            engine = sa.create_engine(url)
            with engine.connect() as conn:
                dropped = conn.execute(
                    sa.text("select coalesce(sum(dropped), 0) from mlops_prediction_log_stats")
                ).scalar_one()
            engine.dispose()
            if (len(rows) >= 20 + capacity and dropped) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        # answered just before a graceful stop: flushed by the server's shutdown, not lost
        last = [post(base, one)[1]["predictions"][0]["request_id"] for _ in range(5)]
    assert len(logged(url, last, 5, timeout=5)) == 5
    # the buffer kept what it could hold; the rest was counted, not silently lost
    assert len(rows) == 20 + capacity and rows["request_id"].is_unique
    assert set(before_ids) <= set(rows["request_id"]) and set(rows["request_id"]) <= set(all_ids)
    assert int(dropped) == 100 - capacity
    assert len(rows) + int(dropped) == len(all_ids)

    with using_store(store["uri"]):
        mlflow.MlflowClient().set_registered_model_alias(NAME, "production", store["v1"])
        config = load_config(
            store["config"], [f"monitoring.log_url={url}", "monitoring.min_rows=10"]
        )
        result = check(config, NAME, window="1h")
    assert (
        result.metrics["dropped_rows"] == 100 - capacity
        and result.metrics["predictions"] == 20 + capacity + 5
    )
    assert any("dropped" in note for note in result.notes)


def test_monitor_every_runs_a_check_per_interval_until_its_count(store: dict) -> None:
    from click.testing import CliRunner

    from mlops.cli import cli

    with using_store(store["uri"]):
        client = mlflow.MlflowClient()
        experiment = client.get_experiment_by_name(f"{NAME}-monitoring")
        before = len(client.search_runs([experiment.experiment_id])) if experiment else 0
        outcome = CliRunner().invoke(
            cli,
            [
                "monitor",
                NAME,
                "--window",
                "10s",
                "--every",
                "1s",
                "--count",
                "2",
                "--config",
                str(store["config"]),
            ],
        )
        assert outcome.exit_code == 0, outcome.output
        runs = client.search_runs(
            [client.get_experiment_by_name(f"{NAME}-monitoring").experiment_id]
        )
    assert len(runs) == before + 2
    assert outcome.output.count("too little data") == 2  # nothing served in the last 10 s
    with using_store(store["uri"]):
        steps = sorted(
            client.get_metric_history(r.info.run_id, "requests")[0].step for r in runs[:2]
        )
    assert [r.data.metrics["requests"] for r in runs[:2]] == [0.0, 0.0]
    assert steps[1] - steps[0] >= 1  # stepped by the check time, one interval apart


# ---- the parts, on their own ----
def test_psi_and_ks_separate_a_shift_from_sampling_noise() -> None:
    rng = np.random.default_rng(0)
    reference = prof.numeric_reference(rng.normal(size=5000), bins=10)
    same = drift.numeric_drift(reference, rng.normal(size=1000))
    shifted = drift.numeric_drift(reference, rng.normal(loc=0.8, size=1000))
    assert same["psi"] < 0.05 and same["ks"] < 0.06 and same["ks_pvalue"] > 0.01
    assert shifted["psi"] > 0.4 and shifted["ks"] > 0.25 and shifted["ks_pvalue"] < 1e-6
    cats = prof.categorical_reference(["a"] * 50 + ["b"] * 50)
    assert drift.categorical_drift(cats, ["a"] * 48 + ["b"] * 52)["psi"] < 0.01
    assert (
        drift.categorical_drift(cats, ["a"] * 30 + ["c"] * 70)["psi"] > 1.0
    )  # a category never seen


def test_rules_pick_the_worst_metric_and_respect_the_side() -> None:
    config = load_config(
        overrides={
            "monitoring.rules": [
                {"name": "drift", "metric": "psi/*", "above": 0.2},
                {"name": "accuracy_floor", "metric": "accuracy", "below": 0.9},
            ]
        }
    )
    fired = evaluate_rules(
        config.monitoring.rules, {"psi/a": 0.1, "psi/b": 0.5, "psi/c": 0.3, "accuracy": 0.95}
    )
    assert [(r.name, k, v) for r, k, v, *_ in fired] == [("drift", "psi/b", 0.5)]
    assert fired[0].hits == [
        ("psi/b", 0.5),
        ("psi/c", 0.3),
    ]  # every metric past the bound, worst first
    fired = evaluate_rules(config.monitoring.rules, {"accuracy": 0.7})
    assert [(r.name, k) for r, k, *_ in fired] == [("accuracy_floor", "accuracy")]
    with pytest.raises(ConfigError, match="exactly one of 'above' or 'below'"):
        load_config(overrides={"monitoring.rules": [{"name": "x", "metric": "error_rate"}]})


def test_bad_monitoring_input_names_the_problem(tmp_path: Path) -> None:
    for text, fix in [
        ("1x", "write it like"),
        ("-5m", "write it like"),
        ("0s", "longer than zero"),
    ]:
        with pytest.raises(ConfigError, match=fix):
            parse_duration(text)
    assert parse_duration("90s") == 90 and parse_duration("2h") == 7200
    with pytest.raises(ConfigError, match=r"key 'monitoring.window': .*'1x' is not a duration"):
        load_config(overrides=["monitoring.window=1x"])
    with pytest.raises(ValueError, match="monitoring_url is not a SQLAlchemy URL"):
        PredictionLogger("not a url", model="m", version="1", numeric=["a"], categorical=[])
    with pytest.raises(ValueError, match=r"sensitive column\(s\) \['ssn'\] are not features"):
        PredictionLogger(
            "sqlite://", model="m", version="1", numeric=["a"], categorical=[], sensitive=["ssn"]
        )
    cases = {
        "missing.csv": (None, "not found"),
        "nocol.csv": ("request_id,truth\nabc,yes\n", r"no column\(s\) \['label'\]"),
        "empty.csv": ("request_id,label\n", "has no rows"),
        "blank.csv": ("request_id,label\nabc,\n", "column 'label' is empty on line\\(s\\) \\[2\\]"),
        "row.csv": ("request_id,row,label\nabc,x,yes\n", "column 'row' must be a whole number"),
        "dupe.csv": ("request_id,label\nabc,yes\nabc,no\n", "labelled more than once"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        if content is not None:
            path.write_text(content)
        with pytest.raises(DataValidationError, match=message):
            read_labels(path)
    ok = tmp_path / "ok.csv"
    ok.write_text("request_id,label\nabc,yes\n")
    assert read_labels(ok).to_dict("records") == [{"request_id": "abc", "row": 0, "label": "yes"}]


def test_a_sensitive_column_that_is_not_a_feature_fails_training(tmp_path: Path) -> None:
    synthetic(200, seed=1).to_csv(tmp_path / "d.csv", index=False)
    config = load_config(
        overrides=[
            f"data.dataset={tmp_path / 'd.csv'}",
            "data.target=label",
            "data.categorical=[color]",
            "monitoring.sensitive_columns=[ssn]",
        ]
    )
    with pytest.raises(
        ConfigError, match=r"monitoring.sensitive_columns: \['ssn'\] are not feature columns"
    ):
        train(config)


def test_a_mixed_batch_reads_back_row_for_row(tmp_path: Path) -> None:
    """Requests of one and of several rows, failed requests, a non-finite score and sensitive
    columns, written in one batch, read back exactly (masked where configured)."""
    url = f"sqlite:///{tmp_path / 'log.db'}"
    log = PredictionLogger(
        url,
        model="m",
        version="3",
        numeric=["x1", "ssn", "x3"],
        categorical=["color", "city"],
        classes=["no", "yes"],
        sensitive=["ssn", "city"],
        sensitive_mode="mask",
        flush_interval=3600,
    )  # nothing is written before the flush below: one batch
    rng = np.random.default_rng(7)
    sent = []
    for k in range(30):
        if k % 9 == 4:
            log.submit(
                f"bad{k}",
                latency_ms=0.2,
                status=400,
                error="input is missing required column(s) ['x1']",
            )
            continue
        n = 1 if k % 2 else 3
        numeric = rng.normal(size=(n, 3))
        categorical = np.array(
            [["red" if i % 2 else None, f"city{i}"] for i in range(n)], dtype=object
        )
        scores = rng.random((n, 2))
        if k == 5:
            scores[0, 1] = np.nan
        predictions = np.array(["yes" if s[1] > 0.5 else "no" for s in scores], dtype=object)
        log.submit(
            f"req{k}",
            latency_ms=float(k),
            numeric=numeric,
            categorical=categorical,
            predictions=predictions,
            scores=scores,
        )
        sent.append((f"req{k}", numeric, categorical, predictions, scores))
    assert log.flush(timeout=30)
    log.close()
    store = MonitoringStore(url)
    frame = store.predictions("m", "3", 0, time.time() + 60)
    assert len(frame) == sum(len(s[1]) for s in sent) + 3
    failed = frame[frame["status"] == 400]
    assert (
        sorted(failed["request_id"]) == ["bad13", "bad22", "bad4"]
        and failed["numeric"].isna().all()
    )
    features = store.features(frame)
    with store.engine.connect() as conn:
        scores = dict(
            ((r.request_id, r.row), r.scores)
            for r in conn.execute(
                sa.select(PREDICTIONS.c.request_id, PREDICTIONS.c.row, PREDICTIONS.c.scores)
            )
        )
    by_key = {(r.request_id, r.row): i for i, r in enumerate(frame.itertuples())}
    for request_id, numeric, categorical, predictions, score in sent:
        for i in range(len(numeric)):
            at = frame.index[by_key[(request_id, i)]]
            got = features.loc[at]
            assert got["x1"] == numeric[i, 0] and got["x3"] == numeric[i, 2]
            assert got["ssn"] == "***" and got["city"] == "***"
            assert got["color"] == categorical[i, 0] or (
                categorical[i, 0] is None and pd.isna(got["color"])
            )
            assert frame.loc[at, "prediction"] == predictions[i]
            expected = (
                None if not np.isfinite(score[i]).all() else {"no": score[i, 0], "yes": score[i, 1]}
            )
            assert (
                json.loads(scores[(request_id, i)]) if scores[(request_id, i)] else None
            ) == expected
    assert frame.loc[frame["request_id"] == "req5", "row"].tolist() == [0]  # k odd: one row
    assert sorted(frame.loc[frame["request_id"] == "req0", "row"]) == [0, 1, 2]


def test_a_long_read_of_a_sqlite_log_does_not_stall_the_writer(tmp_path: Path) -> None:
    """A check reading the log (an open read transaction) while a server writes: the writes land."""
    url = f"sqlite:///{tmp_path / 'log.db'}"
    log = PredictionLogger(
        url, model="m", version="1", numeric=["x"], categorical=[], flush_interval=0.05
    )
    log.submit(
        "first",
        latency_ms=1.0,
        numeric=np.array([[1.0]]),
        predictions=np.array(["a"], dtype=object),
    )
    assert log.flush(timeout=10)
    store = MonitoringStore(url)
    import sqlite3

    reader = sqlite3.connect(tmp_path / "log.db", isolation_level=None)  # explicit transactions
    try:
        assert reader.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        reader.execute("BEGIN")
        assert reader.execute("SELECT count(*) FROM mlops_predictions").fetchone() == (
            1,
        )  # a read lock held
        log.submit(
            "second",
            latency_ms=1.0,
            numeric=np.array([[2.0]]),
            predictions=np.array(["b"], dtype=object),
        )
        assert log.flush(timeout=5), "the writer waited on the reader"
        # the reader's snapshot is unchanged until it ends; afterwards both rows are there
        assert reader.execute("SELECT count(*) FROM mlops_predictions").fetchone() == (1,)
        reader.execute("COMMIT")
    finally:
        reader.close()
    assert sorted(store.predictions("m", "1", 0, time.time() + 60)["request_id"]) == [
        "first",
        "second",
    ]
    log.close()
