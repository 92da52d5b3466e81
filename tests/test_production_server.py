"""``mlops serve`` follows the registry (issue 13): real servers over HTTP on 127.0.0.1.

One registered model with three versions in a SQLite tracking store. A server following
``@production`` (reload interval 1 s) sees a promotion and a rollback arrive while a client
thread sends requests throughout, none failing; refuses a version whose files were tampered
with (an alert row, the old version still answering); counts on ``/metrics`` what was sent;
and sees an automatic rollback by a monitoring check (a rule marked ``auto_rollback``) arrive
the same way. A second server splits the traffic 90/10 between ``@production`` and
``@challenger`` with two workers (``/metrics`` sums both); a third shadows production with
``@challenger``, on the fast path and on MLflow's (``MLOPS_FAST_SERVING=0``).
The shipped Grafana dashboard and Prometheus rules name only metrics the server exposes.
"""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import mlflow
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from mlops import registry
from mlops.artifacts import PIPELINE_FILE
from mlops.config import AlertRule, load_config
from mlops.monitoring.checks import MONITOR_USER, check
from mlops.monitoring.store import MonitoringStore
from mlops.serving.follower import RELOAD_RULE
from mlops.serving.metrics import EXPOSED
from mlops.serving.routing import ROUTE_HEADER, parse_split
from mlops.serving.server import SERVED_HEADER
from mlops.training import train
from tests.conftest import REPO, free_port, using_store
from tests.helpers import make_csv
from tests.servers import BIN, post, running, server_env

pytestmark = pytest.mark.slow

NAME = "follow"
RELOAD = 1.0  # --reload-interval of the servers here
ROW = {"x1": 0.5, "x2": -0.2, "color": "red"}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, template_store: Path) -> Iterator[dict]:
    """Versions 1, 2 and 3 of one model; @production is 1, @challenger 2."""
    root = tmp_path_factory.mktemp("production-server")
    shutil.copy(template_store, root / "mlflow.db")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    csv = make_csv(root / "data.csv", n=200)
    overrides = [
        f"data.dataset={csv}",
        "data.target=label",
        "data.categorical=[color]",
        f"registry.model_name={NAME}",  # the audit trail beside the store, as the servers keep it
        "registry.production.tolerance=1.0",  # the versions tie or near enough: no margin
        f"experiment=exp-{NAME}",
    ]
    with using_store(uri):
        for expected, c in (("1", 1.0), ("2", 0.5), ("3", 0.2)):
            config = load_config(overrides=[*overrides, f"model.params.C={c}"])
            assert train(config, register=True).registered_version == expected
        client = mlflow.MlflowClient()
        client.set_registered_model_alias(NAME, "production", "1")
        client.set_registered_model_alias(NAME, "challenger", "2")
    yield {"uri": uri, "root": root, "config": load_config(overrides=overrides)}


def serve(store: dict, log: str, *extra: str, **env: str) -> Iterator[str]:
    """``mlops serve NAME *extra`` (``env`` set) until its fixture ends; its base URL."""
    port = free_port()
    command = [str(BIN / "mlops"), "serve", NAME, "--port", str(port), *extra]
    command += ["--reload-interval", str(RELOAD), "--log-url", log_url(store, log)]
    environ = server_env(store["uri"], **env)
    with running(command, environ, port, store["root"] / f"{log}.log") as base:
        yield base


def log_url(store: dict, log: str) -> str:
    return f"sqlite:///{store['root'] / f'{log}.db'}"


@pytest.fixture(scope="class")
def follower(store: dict) -> Iterator[str]:
    yield from serve(store, "follow", "--alias", "production", "--monitor")


# ---- helpers ----
def answer(base: str, rows: int = 1, key: str | None = None) -> tuple[int, Any]:
    body = json.dumps({"dataframe_records": [ROW] * rows}).encode()
    headers = {"Content-Type": "application/json", **({ROUTE_HEADER: key} if key else {})}
    request = urllib.request.Request(base + "/invocations", body, headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def versions_of(body: Any) -> set[str]:
    return {row["model_version"] for row in body["predictions"]}


class Client(threading.Thread):
    """Sends one-row requests back to back until stopped: (time, status, version) of each."""

    def __init__(self, base: str) -> None:
        super().__init__(daemon=True)
        self.base, self.stop, self.seen = base, threading.Event(), []

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                status, body = answer(self.base)
                version = versions_of(body).pop() if status == 200 else None
            except Exception as exc:  # noqa: BLE001 - a failed request is what the test counts
                status, version = -1, repr(exc)
            self.seen.append((time.monotonic(), status, version))

    def until(self, version: str, since: float, timeout: float = 60) -> float:
        """Seconds from ``since`` until the first answer from ``version`` (after ``since``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for at, _, got in list(self.seen):
                if at > since and got == version:
                    return at - since
            time.sleep(0.05)
        raise AssertionError(f"no answer from version {version} within {timeout} s")

    def finish(self) -> list[tuple[float, int, str | None]]:
        self.stop.set()
        self.join(timeout=60)
        return self.seen


def scrape(base: str) -> list[Any]:
    """The samples of ``/metrics``, parsed as Prometheus parses them."""
    with urllib.request.urlopen(base + "/metrics", timeout=10) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain; version=")
        text = resp.read().decode()
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def total(samples: list[Any], name: str, **labels: str) -> float:
    return sum(
        s.value
        for s in samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def loaded_in(log: Path, version: str) -> float:
    """The load time the server logged for the move to ``version`` (the last one)."""
    found = re.findall(rf"to v{version}: now serving .* \(loaded in ([\d.]+) s\)", log.read_text())
    assert found, log.read_text()[-3000:]
    return float(found[-1])


def wait_for(check: Callable[[], Any], timeout: float = 30, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.2)


def predictions(store: dict, log: str) -> list[dict[str, Any]]:
    path = store["root"] / f"{log}.db"
    if not path.exists():
        return []
    with sqlite3.connect(path) as conn:
        conn.row_factory = sqlite3.Row
        try:
            rows = conn.execute(
                "select request_id, row, version, status, arm, shadow from mlops_predictions"
            ).fetchall()
        except sqlite3.OperationalError:  # not made yet
            return []
    return [dict(r) for r in rows]


# ---- following the registry ----
class TestFollowingTheRegistry:
    """One server following @production, stopped when these tests are done."""

    def test_a_promotion_and_a_rollback_reach_the_server_with_no_request_failing(
        self, store: dict, follower: str
    ) -> None:
        config = store["config"]
        client = Client(follower)
        client.start()
        try:
            client.until("1", 0.0)
            took = {}
            moves = {  # the alias moves somewhere in each call, after the gates
                "2": lambda: registry.promote(
                    config, NAME, "2", "production", force=True, reason="r"
                ),
                "1": lambda: registry.rollback(config, NAME, reason="test"),
            }
            for version, move in moves.items():
                started = time.monotonic()
                with using_store(store["uri"]):
                    move()
                returned = time.monotonic() - started
                took[version] = (returned, client.until(version, started))
            time.sleep(0.5)
        finally:
            seen = client.finish()
        log = store["root"] / "follow.log"
        for version, (returned, answered) in took.items():
            load = loaded_in(log, version)
            print(
                f"v{version}: moved in {returned:.2f} s, answering {answered:.2f} s after the call"
            )
            assert answered <= returned + RELOAD + load + 2.0, (returned, answered, load)
        failed = [s for s in seen if s[1] != 200]
        assert not failed and len(seen) > 50, failed[:5]
        # one worker, one atomic swap each way: 1...1 2...2 1...1
        runs = [v for i, (_, _, v) in enumerate(seen) if i == 0 or seen[i - 1][2] != v]
        assert runs == ["1", "2", "1"], runs
        headers, text = _get(follower, "/version")
        assert text == mlflow.__version__ and json.loads(headers[SERVED_HEADER]) == {
            "production": "1"
        }
        samples = scrape(follower)
        assert total(samples, "mlops_alias_version", alias="production") == 1.0
        assert total(samples, "mlops_reloads_total", outcome="success") == 2.0

    def test_a_tampered_version_is_refused_and_the_old_one_keeps_serving(
        self, store: dict, follower: str
    ) -> None:
        with using_store(store["uri"]):
            client = mlflow.MlflowClient()
            location = client.get_model_version_download_uri(NAME, "3")
            (Path(unquote(urlparse(location).path)) / "artifacts" / PIPELINE_FILE).write_bytes(
                b"not the registered pipeline"
            )
        answers = Client(follower)
        answers.start()
        try:
            with using_store(store["uri"]):  # moved outside mlops: promote would refuse the files
                client.set_registered_model_alias(NAME, "production", "3")
            alerts = wait_for(
                lambda: [a for a in MonitoringStore(log_url(store, "follow")).alerts(NAME)],
                timeout=30,
                what="an alert for version 3",
            )
            time.sleep(2 * RELOAD)  # polled again: still refused, not loaded again
        finally:
            seen = answers.finish()
            with using_store(store["uri"]):
                client.set_registered_model_alias(NAME, "production", "1")
        (alert,) = alerts
        assert (alert.version, alert.rule) == ("3", RELOAD_RULE)
        assert (
            "does not match the recorded" in alert.message and "v1 goes on serving" in alert.message
        )
        assert {status for _, status, _ in seen} == {200} and {v for _, _, v in seen} == {"1"}
        samples = scrape(follower)
        assert total(samples, "mlops_reloads_total", outcome="failed") == 1.0
        assert total(samples, "mlops_alias_version", alias="production") == 1.0
        log = (store["root"] / "follow.log").read_text()
        assert log.count("moved to v3, which is NOT served") == 1, log[-3000:]

    def test_metrics_count_what_was_sent(self, store: dict, follower: str) -> None:
        before = scrape(follower)
        sent = {"2xx": 0, "4xx": 0}
        for rows in (1, 1, 1, 2, 5):
            status, _ = answer(follower, rows)
            assert status == 200
            sent["2xx"] += 1
        for bad in ({"dataframe_records": [dict(ROW, x1="tall")]}, {"nothing": 1}, b"\x00"):
            status, _ = post(follower, bad)
            assert status == 400
            sent["4xx"] += 1
        after = scrape(follower)
        labels = {"model": NAME, "alias": "production", "version": "1"}
        for status_class, n in sent.items():
            grew = total(
                after, "mlops_requests_total", status_class=status_class, **labels
            ) - total(before, "mlops_requests_total", status_class=status_class, **labels)
            assert grew == n, status_class
        assert total(after, "mlops_rows_scored_total", **labels) - total(
            before, "mlops_rows_scored_total", **labels
        ) == (1 + 1 + 1 + 2 + 5)
        timed = "mlops_request_duration_seconds_count"
        assert total(after, timed, **labels) - total(before, timed, **labels) == sum(sent.values())
        assert total(after, "mlops_requests_total", status_class="5xx") == 0
        # the prediction log's own counters: nothing dropped (and, where the logger counts them,
        # every row written)
        logged = {"model": NAME, "version": "1", "outcome": "dropped"}
        assert [
            s.value
            for s in after
            if s.name == "mlops_prediction_log_rows_total" and s.labels == logged
        ] == [0]
        if any(s.labels.get("outcome") == "written" for s in after):

            def written() -> float:
                return total(scrape(follower), "mlops_prediction_log_rows_total", outcome="written")

            wait_for(lambda: written() == len(predictions(store, "follow")), what="rows written")

    def test_the_dashboard_and_the_alert_rules_use_only_what_the_server_exposes(
        self,
        follower: str,
    ) -> None:
        dashboard = json.loads((REPO / "conf" / "grafana" / "mlops-dashboard.json").read_text())
        rules = yaml.safe_load((REPO / "conf" / "prometheus" / "mlops-alerts.yml").read_text())
        exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
        alerts = [rule for group in rules["groups"] for rule in group["rules"]]
        exprs += [rule["expr"] for rule in alerts]
        used = {name for expr in exprs for name in re.findall(r"\bmlops_[a-z_]+\b", expr)}
        assert used and used <= set(EXPOSED), used - set(EXPOSED)
        scraped = {s.name for s in scrape(follower)}
        assert set(EXPOSED) - {"mlops_shadow_rows_total"} <= scraped  # no shadow on this server
        titles = " ".join(p["title"].lower() for p in dashboard["panels"])
        for panel in (
            "request rate",
            "latency",
            "rows scored",
            "alias version",
            "reload",
            "dropped",
        ):
            assert panel in titles, panel
        names = {rule["alert"] for rule in alerts}
        assert len(names) == len(alerts) >= 4
        for rule in alerts:
            assert rule["annotations"]["summary"] and rule["labels"]["severity"]

    def test_an_automatic_rollback_reaches_the_server_with_no_request_failing(
        self, store: dict, follower: str
    ) -> None:
        """v2 promoted over v1, then a monitoring check whose rule surely fires, marked
        auto_rollback: production goes back to v1 and the server follows, no request failing."""
        config = store["config"]
        rule = AlertRule(
            name="always", metric="latency_p50_ms", above=0.0, auto_rollback=True, min_requests=1
        )
        monitoring = config.monitoring.model_copy(
            update={"log_url": log_url(store, "follow"), "rules": [rule]}
        )
        checked = config.model_copy(update={"monitoring": monitoring})
        client = Client(follower)
        client.start()
        try:
            client.until("1", 0.0)
            promoted = time.monotonic()
            with using_store(store["uri"]):  # the audit trail: v2 replaced v1
                registry.promote(config, NAME, "2", "production", force=True, reason="r")
            client.until("2", promoted)
            logged = sum(r["version"] == "2" for r in predictions(store, "follow"))
            wait_for(  # v2's answers reach the prediction log the check reads
                lambda: sum(r["version"] == "2" for r in predictions(store, "follow")) > logged,
                what="v2's rows in the prediction log",
            )
            started = time.monotonic()
            with using_store(store["uri"]):
                result = check(checked, NAME, window="1h")
            returned = time.monotonic() - started
            answered = client.until("1", started)
            time.sleep(0.5)
        finally:
            seen = client.finish()
        assert [a.rule for a in result.alerts] == ["always"], result.notes
        assert result.rollback == "rolled back production from 2 to 1", result.rollback
        with using_store(store["uri"]):
            production = mlflow.MlflowClient().get_model_version_by_alias(NAME, "production")
            last = registry.audit_trail(config, NAME)[-1]
        assert str(production.version) == "1"
        assert (last.action, last.who, last.from_version, last.to_version) == (
            "rollback",
            MONITOR_USER,
            "2",
            "1",
        )
        assert last.reason and "auto-rollback" in last.reason
        load = loaded_in(store["root"] / "follow.log", "1")
        print(f"auto-rollback: check in {returned:.2f} s, v1 answering {answered:.2f} s after")
        assert answered <= returned + RELOAD + load + 2.0, (returned, answered, load)
        failed = [s for s in seen if s[1] != 200]
        assert not failed and len(seen) > 20, failed[:5]
        runs = [v for i, (_, _, v) in enumerate(seen) if i == 0 or seen[i - 1][2] != v]
        assert runs == ["1", "2", "1"], runs
        headers, _ = _get(follower, "/version")
        assert json.loads(headers[SERVED_HEADER]) == {"production": "1"}


# ---- an A/B split and a shadow ----
@pytest.fixture
def split(store: dict) -> Iterator[str]:
    yield from serve(
        store, "split", "--split", "production=90,challenger=10", "--workers", "2", "--monitor"
    )


def test_a_split_routes_about_its_share_and_each_key_to_one_arm(store: dict, split: str) -> None:
    before = scrape(split)
    got: Counter[str] = Counter()
    for i in range(400):
        status, body = answer(split, key=f"user-{i}")
        assert status == 200, body
        got[versions_of(body).pop()] += 1
    assert 0.06 <= got["2"] / 400 <= 0.14, got
    for key in ("user-1", "user-2", "user-3", "someone@example.com"):
        assert len({versions_of(answer(split, key=key)[1]).pop() for _ in range(8)}) == 1
    after = scrape(split)  # one worker's answer, summing both
    for version, alias in (("1", "production"), ("2", "challenger")):
        labels = {"version": version, "alias": alias, "status_class": "2xx"}
        grew = total(after, "mlops_requests_total", **labels)
        grew -= total(before, "mlops_requests_total", **labels)
        assert grew >= got[version] and grew <= got[version] + 32, (version, grew)
    assert total(after, "mlops_requests_total") - total(before, "mlops_requests_total") == 432
    assert total(after, "mlops_alias_version", alias="challenger") == 2.0
    rows = wait_for(
        lambda: (r := predictions(store, "split")) and len(r) >= 432 and r,
        what="432 prediction-log rows",
    )
    assert {(r["arm"], r["version"]) for r in rows} == {("production", "1"), ("challenger", "2")}
    assert not any(r["shadow"] for r in rows)
    # both workers answered, and any worker's /metrics counts every request
    with sqlite3.connect(store["root"] / "split.db") as conn:
        processes = conn.execute(
            "select distinct process from mlops_prediction_log_stats"
        ).fetchall()
    assert len(processes) == 2, processes
    counted = {total(scrape(split), "mlops_requests_total") for _ in range(8)}
    assert counted == {total(after, "mlops_requests_total")}
    with using_store(store["uri"]):  # the split is in the audit trail while it runs
        traffic = [r for r in registry.audit_trail(store["config"], NAME) if "split" in r.action]
    assert [(r.action, r.detail) for r in traffic] == [
        ("split_start", "production=90,challenger=10")
    ]


def test_split_is_parsed_strictly() -> None:
    assert parse_split("production=90, challenger=10") == (
        ("production", 90.0),
        ("challenger", 10.0),
    )
    for bad in ("production", "production=0", "production=-1,challenger=1", "a=1,a=2", "=3"):
        with pytest.raises(Exception, match="--split"):
            parse_split(bad)


@pytest.fixture(params=["1", "0"], ids=["fast-path", "mlflow-path"])
def shadowed(store: dict, request: pytest.FixtureRequest) -> Iterator[tuple[str, str]]:
    """A server shadowing production, on the fast path or MLflow's (MLOPS_FAST_SERVING=0);
    its base URL and the name of its prediction log."""
    log = f"shadow-{request.param}"
    args = ("--alias", "production", "--shadow", "challenger")
    for base in serve(store, log, *args, MLOPS_FAST_SERVING=request.param):
        yield base, log


def test_a_shadow_logs_the_challengers_rows_under_productions_request_ids(
    store: dict, shadowed: tuple[str, str]
) -> None:
    base, log = shadowed
    answered = []
    for rows in (1, 3, 1, 2):
        status, body = answer(base, rows)
        assert status == 200 and versions_of(body) == {"1"}
        answered.append(body["predictions"][0]["request_id"])
    logged = wait_for(
        lambda: (r := predictions(store, log)) and len(r) >= 2 * 7 and r,
        what="production's and the shadow's rows",
    )
    production = {(r["request_id"], r["row"]) for r in logged if not r["shadow"]}
    shadow = {(r["request_id"], r["row"]) for r in logged if r["shadow"]}
    assert production == shadow and len(shadow) == 7
    assert {r["request_id"] for r in logged} == set(answered)
    assert {(r["arm"], r["version"]) for r in logged if r["shadow"]} == {("challenger", "2")}
    assert {(r["arm"], r["version"]) for r in logged if not r["shadow"]} == {("production", "1")}
    samples = scrape(base)
    assert total(samples, "mlops_shadow_rows_total", outcome="scored", version="2") == 7
    assert total(samples, "mlops_shadow_rows_total", outcome="dropped") == 0
    headers, _ = _get(base, "/version")
    assert json.loads(headers[SERVED_HEADER]) == {"production": "1", "challenger": "2"}
    with using_store(store["uri"]):
        trail = registry.audit_trail(store["config"], NAME)
    assert ("shadow_start", "shadow challenger") in [(r.action, r.detail) for r in trail]


def _get(base: str, path: str) -> tuple[Any, str]:
    with urllib.request.urlopen(base + path, timeout=10) as resp:
        return resp.headers, resp.read().decode()


def test_a_full_shadow_queue_drops_and_counts_and_never_waits() -> None:
    """In-process: a shadow stuck on one request; the answers offering it more never wait."""
    import numpy as np

    from mlops.serving.metrics import ServerMetrics
    from mlops.serving.routing import ShadowScorer

    release, scoring = threading.Event(), threading.Event()

    class Wrapper:
        def answer_many(self, parts: list[Any]) -> list[bool]:
            scoring.set()
            release.wait(10)
            return [True] * len(parts)

    class Version:
        name, version, columns, wrapper = NAME, "2", (("x1",), ()), Wrapper()

        def acquire(self) -> bool:
            return True

        def release(self) -> None:
            pass

    class Follower:
        current = Version()

        def acquire(self) -> Version:
            return self.current

    metrics = ServerMetrics()
    shadow = ShadowScorer(Follower(), metrics, capacity=2)
    rows = np.zeros((3, 1))
    shadow.offer(Version(), "first", b"", "application/json", rows, None)
    assert scoring.wait(10)
    started = time.perf_counter()
    for i in range(5):  # two fit in the queue, three are dropped
        shadow.offer(Version(), f"r{i}", b"", "application/json", rows, None)
    assert time.perf_counter() - started < 0.05
    release.set()
    shadow.stop(timeout=10)
    samples = [sample for family in metrics.registry.collect() for sample in family.samples]
    assert total(samples, "mlops_shadow_rows_total", outcome="dropped") == 3 * 3
    assert total(samples, "mlops_shadow_rows_total", outcome="scored") == 3 * 3
