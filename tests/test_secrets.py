"""No secret at rest: URLs name their secrets as ${VAR} or have them hidden; sensitive columns
are keyed-hashed or masked; webhooks are http(s) only.

The end-to-end test runs the real commands against real stores (SQLite tracking, PostgreSQL
audit trail, prediction log and Optuna study, a local HTTP webhook) with passwords and tokens
in every URL, then reads every file and every table back looking for them.
"""

from __future__ import annotations

import hashlib
import hmac
import http.server
import json
import logging
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
import yaml

from mlops.config import load_config, redact_url
from mlops.db import create_engine, expand_env, mask_url, scrub, secret_free_url
from mlops.errors import ConfigError
from mlops.monitoring.checks import post_webhook
from mlops.monitoring.logger import HASH_PREFIX, MASK, PredictionLogger
from mlops.monitoring.store import Alert, MonitoringStore
from tests.helpers import make_csv
from tests.servers import BIN, server_env


def with_password(url: str, password: str) -> str:
    """``url`` (a test database from the fixtures) with ``password`` in it, written literally."""
    bare = sa.engine.make_url(url).set(drivername="postgresql+psycopg", password=None)
    scheme, _, rest = bare.render_as_string(hide_password=False).partition("://")
    user, at, host = rest.partition("@")
    assert at and ":" not in user
    return f"{scheme}://{user}:{password}@{host}"  # as written: SQLAlchemy would encode ${...}


# ---- the URL helpers ----
@pytest.mark.parametrize(
    ("url", "masked", "stored"),
    [
        (
            "postgresql+psycopg://app:Lit3ralPW@db:5432/mlops",
            "postgresql+psycopg://app:***@db:5432/mlops",
            "postgresql+psycopg://app@db:5432/mlops",
        ),
        (
            "postgresql+psycopg://app:${MLOPS_LOG_DB_PASSWORD}@db/mlops?sslmode=require",
            "postgresql+psycopg://app:${MLOPS_LOG_DB_PASSWORD}@db/mlops?sslmode=require",
            "postgresql+psycopg://app:${MLOPS_LOG_DB_PASSWORD}@db/mlops?sslmode=require",
        ),
        (
            "postgresql://app@db/mlops?sslmode=require&password=QueryPW1",
            "postgresql://app@db/mlops?sslmode=require&password=***",
            "postgresql://app@db/mlops?sslmode=require",
        ),
        (
            "https://hooks.example/x?token=Tok3n&sig=${HOOK_SIG}",
            "https://hooks.example/x?token=***&sig=${HOOK_SIG}",
            "https://hooks.example/x?sig=${HOOK_SIG}",
        ),
        (
            "https://BareToken1@hooks.example/x",
            "https://***@hooks.example/x",
            "https://hooks.example/x",
        ),
        ("sqlite:////tmp/x.db", "sqlite:////tmp/x.db", "sqlite:////tmp/x.db"),
        ("${DATABASE_URL}", "${DATABASE_URL}", "${DATABASE_URL}"),
        ("postgresql://u:p/w@rd@h/db", "postgresql://u:***@rd@h/db", None),
    ],
)
def test_urls_are_shown_and_stored_without_their_literal_secrets(
    url: str, masked: str, stored: str | None
) -> None:
    assert mask_url(url) == masked == redact_url(url)
    if stored is not None:
        assert secret_free_url(url) == stored


def test_expand_env_reads_the_environment_and_names_a_missing_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("T_PW", "p@ss/w:rd")
    monkeypatch.setenv("T_URL", "postgresql://a:b@h/d")
    monkeypatch.setenv("T_HOST", "db.example")
    monkeypatch.delenv("T_MISSING", raising=False)
    url = expand_env("postgresql+psycopg://app:${T_PW}@${T_HOST}/mlops?x=${T_PW}")
    assert url == "postgresql+psycopg://app:p%40ss%2Fw%3Ard@db.example/mlops?x=p%40ss%2Fw%3Ard"
    assert sa.engine.make_url(url).password == "p@ss/w:rd"  # encoded where the URL needs it
    assert expand_env("${T_URL}") == "postgresql://a:b@h/d"  # a whole URL is inserted as it is
    assert expand_env("sqlite:///plain.db") == "sqlite:///plain.db"
    with pytest.raises(ConfigError, match=r"T_MISSING not set.*set them in the environment"):
        expand_env("postgresql://app:${T_MISSING}@db/x")


def test_scrub_removes_literal_and_expanded_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("T_TOKEN", "ExpandedTok3n")
    url = "https://hooks.example/x?token=${T_TOKEN}&k=LiteralKey9"
    text = (
        "failed: <urlopen error https://hooks.example/x?token=ExpandedTok3n&k=LiteralKey9> "
        "ExpandedTok3n LiteralKey9 mlops"
    )
    out = scrub(text, url, None)
    assert "ExpandedTok3n" not in out and "LiteralKey9" not in out and "mlops" in out


def test_an_error_quoted_in_one_line_names_its_own_cause_and_never_the_password(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``first_line``: a driver error's own text (not SQLAlchemy's advice), not a context that
    ``raise ... from None`` hid; the team server's one line scrubs the database URL before it
    cuts the line, so a URL across the cut leaves no piece of its password."""
    from mlops.errors import RegistryError, first_line
    from mlops.team import app

    class Wrapped(Exception):
        orig = ValueError("FATAL: role 'x' does not exist\nDETAIL: more")

    assert first_line(Wrapped("(psycopg.OperationalError) advice")) == (
        "FATAL: role 'x' does not exist"
    )
    try:
        try:
            raise Wrapped("low level")
        except Wrapped:
            raise RegistryError("cannot write the audit record: check the URL") from None
    except RegistryError as exc:
        assert first_line(exc) == "cannot write the audit record: check the URL"
    assert first_line(ValueError("x" * 500)) == "x" * 300
    assert first_line(ValueError("")) == "ValueError"

    url = "postgresql://mlops:S3cretPassw0rd@db.internal:5432/mlflow"
    monkeypatch.setenv(app.BACKEND_ENV, url)
    for start in (0, 250, 280, 295, 299):
        line = app._first_line(RuntimeError("e" * start + f" cannot connect to {url}"))
        assert len(line) <= 300 and "S3c" not in line, (start, line)
        if "mlops:" in line:  # no first letter of the password either
            assert not line.split("mlops:", 1)[1].startswith("S"), (start, line)


def test_a_store_url_with_a_placeholder_connects_and_an_unset_one_is_named(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLOPS_T_LOG_PW", "PlaceholderPW7")
    url = with_password(postgres_url, "${MLOPS_T_LOG_PW}")
    store = MonitoringStore(url)
    assert store.url == url  # the placeholder is what is kept
    store.add_alert(Alert(1.0, "m", "1", "r", "x", 1.0, 0.5, "msg"))
    assert [a.rule for a in store.alerts("m")] == ["r"]
    store.engine.dispose()
    monkeypatch.delenv("MLOPS_T_LOG_PW")
    with pytest.raises(ConfigError, match=r"monitoring.log_url: .*MLOPS_T_LOG_PW not set"):
        MonitoringStore(url)
    engine = create_engine(f"sqlite:///{Path.cwd() / 'plain.db'}")
    engine.dispose()


def test_optuna_storage_with_a_placeholder_connects(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlops.tuning import open_storage

    monkeypatch.setenv("MLOPS_T_STUDY_PW", "StudyPW7")
    url = with_password(postgres_url, "${MLOPS_T_STUDY_PW}")
    storage = open_storage(load_config(overrides={"tuning.storage": url}))
    assert storage is not None and storage.get_all_studies() == []
    storage.engine.dispose()
    monkeypatch.delenv("MLOPS_T_STUDY_PW")
    with pytest.raises(ConfigError, match=r"tuning.storage: .*MLOPS_T_STUDY_PW not set"):
        open_storage(load_config(overrides={"tuning.storage": url}))


# ---- the webhook ----
@contextmanager
def hook_server(status: int = 204, location: str | None = None) -> Iterator[tuple[int, list]]:
    """A local HTTP server recording (path, JSON body) of each POST; answers ``status``."""
    received: list[tuple[str, dict]] = []

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the http.server API
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((self.path, json.loads(body)))
            self.send_response(status)
            if location:
                self.send_header("Location", location)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1], received
    finally:
        server.shutdown()
        server.server_close()


ALERT = Alert(1.0, "m", "1", "rule", "metric", 1.0, 0.5, "m v1: rule")


def test_the_webhook_token_is_read_at_posting_and_never_reported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("T_HOOK_TOKEN", "PostedTok3n")
    with hook_server() as (port, received):
        outcome = post_webhook(f"http://127.0.0.1:{port}/hook?token=${{T_HOOK_TOKEN}}", ALERT)
    assert outcome == "delivered (HTTP 204)"
    assert received[0][0] == "/hook?token=PostedTok3n" and received[0][1]["rule"] == "rule"
    monkeypatch.delenv("T_HOOK_TOKEN")
    outcome = post_webhook(f"http://127.0.0.1:{port}/hook?token=${{T_HOOK_TOKEN}}", ALERT)
    assert outcome.startswith("failed:") and "T_HOOK_TOKEN not set" in outcome


def test_the_webhook_refuses_other_schemes_and_redirects(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("FileContent1")
    for url in (f"file://{secret}", "ftp://user:FtpPW123@127.0.0.1:1/x?token=FtpTok123"):
        outcome = post_webhook(url, ALERT)
        assert outcome.startswith("failed: monitoring.webhook must be an http:// or https://")
        assert "FtpPW123" not in outcome and "FtpTok123" not in outcome
    with hook_server() as (other_port, elsewhere):
        with hook_server(302, f"http://127.0.0.1:{other_port}/stolen") as (port, received):
            outcome = post_webhook(f"http://127.0.0.1:{port}/h?token=RedirTok1", ALERT)
    assert len(received) == 1 and not elsewhere  # the alert went where it was configured only
    assert outcome.startswith("failed: HTTP 302") and "RedirTok1" not in outcome
    closed = post_webhook("http://user:ClosedPW1@127.0.0.1:1/h?token=ClosedTok1", ALERT)
    assert closed.startswith("failed:") and "ClosedPW1" not in closed and "ClosedTok1" not in closed


# ---- sensitive columns ----
def test_sensitive_values_are_keyed_hashes_or_masks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def logged(**options: object) -> dict:
        url = f"sqlite:///{tmp_path / f'log-{uuid.uuid4().hex[:6]}.db'}"
        log = PredictionLogger(
            url,
            model="m",
            version="1",
            numeric=["x", "age"],
            categorical=["city"],
            sensitive=["age", "city"],
            flush_interval=0.05,
            **options,
        )
        log.submit(
            "r1",
            latency_ms=1.0,
            numeric=np.array([[1.5, 42.0]]),
            categorical=np.array([["Paris"]], dtype=object),
            predictions=np.array(["a"], dtype=object),
        )
        log.submit(
            "r2",
            latency_ms=1.0,
            status=400,
            error="column 'age' must be numeric, got 'forty-two' in row 0; send a number",
        )
        assert log.flush(timeout=10)
        log.close()
        store = MonitoringStore(url)
        frame = store.predictions("m", "1", 0, time.time() + 60)
        features = store.features(frame[frame["status"] == 200]).iloc[0].to_dict()
        with store.engine.connect() as conn:
            error = conn.execute(
                sa.text("select error from mlops_predictions where status = 400")
            ).scalar_one()
        store.engine.dispose()
        return {**features, "error": error}

    monkeypatch.setenv("T_MASK_KEY", "a-long-random-key-for-the-test")
    keyed = logged(mask_key_env="T_MASK_KEY")
    expected = hmac.new(b"a-long-random-key-for-the-test", b"42.0", hashlib.sha256).hexdigest()
    assert keyed["age"] == HASH_PREFIX + expected and keyed["x"] == 1.5
    assert keyed["city"].startswith(HASH_PREFIX) and keyed["city"] != HASH_PREFIX + (
        hashlib.sha256(b"Paris").hexdigest()
    )
    assert "forty-two" not in keyed["error"] and "'age'" in keyed["error"]

    monkeypatch.delenv("T_MASK_KEY")
    with caplog.at_level(logging.WARNING, logger="mlops.monitoring.logger"):
        unkeyed = logged(mask_key_env="T_MASK_KEY")
    assert unkeyed["age"] == MASK and unkeyed["city"] == MASK  # never an unkeyed hash
    warnings = [r for r in caplog.records if "T_MASK_KEY" in r.getMessage()]
    assert len(warnings) == 1 and "masked" in warnings[0].getMessage()


def test_the_reference_profile_holds_no_value_of_a_sensitive_column(tmp_path: Path) -> None:
    from mlops import data
    from mlops.monitoring.profile import build_profile
    from mlops.training import fit_and_evaluate

    rng = np.random.default_rng(3)
    make_csv(tmp_path / "d.csv", n=200, salary=np.round(rng.normal(50_000, 9_000, 200), 2))
    config = load_config(
        overrides=[
            f"data.dataset={tmp_path / 'd.csv'}",
            "data.target=label",
            "data.categorical=[color]",
        ]
    )
    split = data.prepare(config)
    pipeline, _ = fit_and_evaluate(config, split, log=False)
    profile = build_profile(pipeline, split, bins=5, sensitive=["salary", "color"])
    assert profile["features"]["salary"] == {"kind": "numeric", "masked": True}
    assert profile["features"]["color"] == {"kind": "categorical", "masked": True}
    assert "quantiles" in profile["features"]["x1"]
    text = json.dumps(profile)
    assert not any(repr(float(v)) in text for v in split.train["salary"])
    assert '"red"' not in text and '"green"' not in text
    assert "quantiles" in json.dumps(build_profile(pipeline, split)["features"]["salary"])


def test_unkeyed_hashes_of_an_older_log_are_masked_by_the_upgrade(tmp_path: Path) -> None:
    from alembic import command

    from mlops.migrations import config as alembic_config

    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        cfg = alembic_config("log")
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "log_0001")
        for i, features in enumerate(
            ['{"age": "sha256:0123456789abcdef", "color": "red"}', '{"color": "blue"}', None]
        ):
            conn.execute(
                sa.text(
                    "insert into mlops_predictions (request_id, row, at, model, version, status, "
                    "latency_ms, features) values (:r, 0, 1.0, 'm', '1', 200, 1.0, :f)"
                ),
                {"r": f"r{i}", "f": features},
            )
    engine.dispose()
    store = MonitoringStore(url)
    with store.engine.connect() as conn:
        rows = conn.execute(sa.text("select features from mlops_predictions order by id")).all()
    store.engine.dispose()
    assert [r[0] for r in rows] == ['{"age": "***", "color": "red"}', '{"color": "blue"}', None]


# ---- end to end ----
@pytest.mark.slow
@pytest.mark.once  # the secrets are ours; each MLflow call it makes is tested on the lowest too
def test_no_secret_at_rest_after_train_promote_tune_and_monitor(
    tmp_path: Path, tracking_uri: str, postgres_databases
) -> None:
    """Passwords and tokens in every configured URL reach no file and no table."""
    tag = uuid.uuid4().hex[:8]
    secrets = {
        "log": f"LogPw{tag}",
        "audit": f"AuditPw{tag}",
        "study": f"StudyPw{tag}",
        "token": f"HookTok{tag}",
    }
    log_url = with_password(postgres_databases(), secrets["log"])
    audit_url = with_password(postgres_databases(), secrets["audit"])
    study_url = with_password(postgres_databases(), secrets["study"])
    inputs = tmp_path.parent / f"{tmp_path.name}-inputs"  # the user's own files: not scanned
    inputs.mkdir()
    make_csv(inputs / "data.csv", n=400, seed=1)
    name = "secret-model"

    with hook_server() as (port, received):
        config = {
            "experiment": "secrets",
            "data": {
                "dataset": str(inputs / "data.csv"),
                "target": "label",
                "categorical": ["color"],
            },
            "registry": {"model_name": name, "audit_url": audit_url},
            "tuning": {"n_trials": 2, "cv_folds": 2, "register_best": True},
            "monitoring": {
                "enabled": True,
                "log_url": log_url,
                "sensitive_columns": ["x2"],
                "webhook": f"http://127.0.0.1:{port}/hook?token={secrets['token']}",
                # fires on a quiet window: an alert, its webhook delivery and its row
                "rules": [{"name": "quiet", "metric": "requests", "below": 1, "min_requests": 0}],
            },
        }
        config_path = inputs / "config.yaml"
        config_path.write_text(yaml.safe_dump(config))
        env = server_env(tracking_uri, MLOPS_MASK_KEY="a-long-random-key-for-the-test")
        outputs = []

        def mlops(*args: str) -> str:
            done = subprocess.run(
                [str(BIN / "mlops"), *args, "--config", str(config_path)],
                env=env,
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=600,
            )
            outputs.append(done.stdout + done.stderr)
            assert done.returncode == 0, done.stdout + done.stderr
            return done.stdout

        mlops("train", "--register")
        mlops("promote", name, "--version", "1", "--to", "staging")
        mlops("promote", name, "--version", "1", "--to", "production", "--reason", "first")
        mlops("tune", "--storage", study_url, "--no-progress")
        checked = mlops("monitor", name, "--window", "1h")
    assert "ALERT" in checked and "delivered (HTTP 204)" in checked
    assert received and received[0][0] == f"/hook?token={secrets['token']}"  # used, at posting

    def leaks(text: str | bytes, where: str) -> list[str]:
        data = text if isinstance(text, bytes) else text.encode()
        return [f"{what} in {where}" for what, s in secrets.items() if s.encode() in data]

    found: list[str] = []
    for i, output in enumerate(outputs):
        found += leaks(output, f"the output of command {i}")
    # every file the commands left: the SQLite tracking store (and its journal), the artifact
    # root (config.yaml, plots, study files, the models' MLmodel, metadata.json, profile...)
    engine = sa.create_engine(tracking_uri)
    with engine.connect() as conn:
        roots = [
            Path(r[0].removeprefix("file://"))
            for r in conn.execute(sa.text("select artifact_location from experiments"))
        ]
    engine.dispose()
    folders = {tmp_path, *(r for r in roots if r.exists() and tmp_path not in r.parents)}
    files = [p for folder in folders for p in folder.rglob("*") if p.is_file()]
    assert any(p.name == "MLmodel" for p in files) and any(p.name == "config.yaml" for p in files)
    model_files = [p for p in files if p.name in ("MLmodel", "metadata.json")]
    found += [hit for p in files if p not in model_files for hit in leaks(p.read_bytes(), str(p))]
    # the audit trail, the prediction log (its alerts) and the study, through SQL
    counts: dict[str, int] = {}
    for label, url in (("audit", audit_url), ("log", log_url), ("study", study_url)):
        engine = sa.create_engine(url)
        with engine.connect() as conn:
            for table in sa.inspect(conn).get_table_names():
                rows = conn.execute(sa.text(f'select * from "{table}"')).all()
                counts[table] = len(rows)
                found += leaks(repr(rows), f"{label} table {table}")
        engine.dispose()
    assert not found, found
    assert counts["mlops_audit"] >= 2 and counts["mlops_alerts"] >= 1 and counts["trials"] == 2
    # checked last and apart: the serving side writes these (mlops/serving/flavor.py)
    model_leaks = [hit for p in model_files for hit in leaks(p.read_bytes(), str(p))]
    assert not model_leaks, model_leaks
