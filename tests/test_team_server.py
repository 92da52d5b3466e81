"""The team server on real parts: `mlops server` (MLflow's server with the mlops auth app) on a
PostgreSQL database this module creates and moto's standalone S3 server, both on loopback.

Users are made with MLflow's own auth client. Every client (``mlops`` commands, ``MlflowClient``,
raw REST on the API's and the UI's paths) meets the same policy, and every attempt to move an
alias is one audit row in the server's database, naming the authenticated user.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import pytest
import requests
import sqlalchemy as sa

from mlops.config import load_config
from mlops.registry import register
from mlops.training import train
from tests.conftest import PG_ADMIN_URL, REPO, free_port, skip_or_fail, using_store
from tests.helpers import make_csv
from tests.servers import BIN, post, running

NAME = "team-model"
ADMIN_PASSWORD = "adm1n-" + uuid.uuid4().hex
USERS = {  # name: permission on NAME (carol: the serving user, READ by default)
    "alice": "EDIT",
    "bob": "MANAGE",
    "carol": None,
}
BUCKET = "team-artifacts"
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def password(user: str) -> str:
    return ADMIN_PASSWORD if user == "admin" else f"{user}-pw-{ADMIN_PASSWORD[-8:]}"


# ---- the servers ----
@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """moto's standalone S3 server on loopback, with one bucket; its endpoint URL."""
    import boto3

    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    env = {**os.environ, **S3_ENV}
    with running(
        [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        env,
        port,
        log,
        timeout=60,
        health="/moto-api/",
    ) as endpoint:
        boto3.client("s3", endpoint_url=endpoint, **_boto(S3_ENV)).create_bucket(Bucket=BUCKET)
        yield endpoint


def _boto(env: dict[str, str]) -> dict[str, str]:
    return {
        "aws_access_key_id": env["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": env["AWS_SECRET_ACCESS_KEY"],
        "region_name": env["AWS_DEFAULT_REGION"],
    }


@pytest.fixture(scope="module")
def database() -> Iterator[str]:
    """A PostgreSQL database for this module's server, dropped afterwards."""
    name = f"mlops_team_{uuid.uuid4().hex[:10]}"
    try:
        admin = sa.create_engine(
            PG_ADMIN_URL, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5}
        )
        with admin.connect() as conn:
            conn.execute(sa.text(f'create database "{name}"'))
    except Exception as exc:  # noqa: BLE001
        skip_or_fail(f"PostgreSQL not reachable at {PG_ADMIN_URL}: {exc.__class__.__name__}")
    url = sa.engine.make_url(PG_ADMIN_URL).set(drivername="postgresql+psycopg", database=name)
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'drop database if exists "{name}" with (force)'))
        admin.dispose()


def server_command(*extra: str) -> list[str]:
    return [str(BIN / "mlops"), "server", *extra]


@pytest.fixture(scope="module")
def team(
    s3: str, database: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """`mlops server` on the database and the bucket; users made; two versions of NAME
    registered by the admin; ``alice`` EDIT and ``bob`` MANAGE on it."""
    from mlflow.server import get_app_client

    folder = tmp_path_factory.mktemp("team")
    port = free_port()
    env = {
        **os.environ,
        **S3_ENV,
        "MLFLOW_S3_ENDPOINT_URL": s3,
        "MLOPS_ADMIN_PASSWORD": ADMIN_PASSWORD,
        "MLOPS_CONF_DIR": str(REPO / "conf"),
    }
    command = server_command(
        "--backend-store-uri",
        database,
        "--artifacts-destination",
        f"s3://{BUCKET}/mlflow",
        "--port",
        str(port),
    )
    log = folder / "server.log"
    with running(command, env, port, log, timeout=180, health="/health") as uri:
        client_env = {
            **S3_ENV,
            "MLFLOW_S3_ENDPOINT_URL": s3,
            "MLFLOW_TRACKING_URI": uri,
            "MLFLOW_REGISTRY_URI": uri,
            "MLFLOW_TRACKING_USERNAME": "admin",
            "MLFLOW_TRACKING_PASSWORD": ADMIN_PASSWORD,
            "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        }
        with as_user(client_env):
            auth = get_app_client("mlops", tracking_uri=uri)
            for user in USERS:
                auth.create_user(user, password(user))
            csv = make_csv(folder / "d.csv", n=200)
            config = load_config(
                overrides=[f"data.dataset={csv}", "data.target=label", "data.categorical=[color]"]
            )
            with using_store(uri):
                versions = [register(train(config).model_uri, NAME).version for _ in range(2)]
            for user, permission in USERS.items():
                if permission:
                    auth.grant_user_permission(user, "registered_model", NAME, permission)
        yield {
            "uri": uri,
            "env": client_env,
            "database": database,
            "versions": [str(v) for v in versions],
            "log": log,
            "folder": folder,
            "s3": s3,
        }


class as_user:  # noqa: N801 - reads as a statement: with as_user(env): ...
    """Put ``env`` (a user's MLflow settings) into os.environ for a block, then restore."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env, self.saved = env, {}

    def __enter__(self) -> None:
        self.saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)

    def __exit__(self, *exc: object) -> None:
        for key, value in self.saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def user_env(team: dict[str, Any], user: str) -> dict[str, str]:
    return {
        **team["env"],
        "MLFLOW_TRACKING_USERNAME": user,
        "MLFLOW_TRACKING_PASSWORD": password(user),
    }


def mlops(team: dict[str, Any], user: str, *args: str, **extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **user_env(team, user), "MLOPS_CONF_DIR": str(REPO / "conf"), **extra}
    return subprocess.run(
        [str(BIN / "mlops"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=team["folder"],
    )


def rest(team: dict[str, Any], user: str, method: str, path: str, **kwargs: Any) -> Any:
    return requests.request(
        method, team["uri"] + path, auth=(user, password(user)), timeout=30, **kwargs
    )


def aliases(team: dict[str, Any]) -> dict[str, str]:
    body = rest(
        team, "admin", "GET", "/api/2.0/mlflow/registered-models/get", params={"name": NAME}
    )
    return {a["alias"]: a["version"] for a in body.json()["registered_model"].get("aliases", [])}


def model_version(team: dict[str, Any], version: str) -> dict[str, Any]:
    """Version ``version`` of NAME as the REST API answers it to the admin."""
    body = rest(
        team,
        "admin",
        "GET",
        "/api/2.0/mlflow/model-versions/get",
        params={"name": NAME, "version": version},
    )
    return body.json()["model_version"]


def stages(team: dict[str, Any], *versions: str) -> list[str]:
    return [model_version(team, v)["current_stage"] for v in versions]


def version_tags(team: dict[str, Any], version: str) -> dict[str, str]:
    return {t["key"]: t["value"] for t in model_version(team, version).get("tags", [])}


def audit_rows(team: dict[str, Any]) -> list[dict[str, Any]]:
    """The trail as the server's database holds it (read directly, as only a test does)."""
    engine = sa.create_engine(team["database"])
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.text("select * from mlops_audit where model = :m order by id"), {"m": NAME}
            )
            return [dict(r._mapping) for r in rows]
    finally:
        engine.dispose()


# ---- the tests ----
def test_runs_and_models_land_in_the_bucket(team: dict[str, Any]) -> None:
    import boto3

    s3 = boto3.client("s3", endpoint_url=team["s3"], **_boto(S3_ENV))
    keys = [
        o["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="mlflow/")
        for o in page.get("Contents", [])
    ]
    assert any(k.endswith("/MLmodel") for k in keys), keys[:20]
    assert any(k.endswith("pipeline.skops") for k in keys), keys[:20]
    # nothing of the model was written beside the server instead
    assert not list(Path(team["folder"]).rglob("MLmodel"))


def test_an_edit_user_moves_staging_but_no_client_moves_production_without_manage(
    team: dict[str, Any],
) -> None:
    v1, v2 = team["versions"]
    before = len(audit_rows(team))

    # staging: EDIT is enough, through mlops (gates in the client) and through MlflowClient
    done = mlops(team, "alice", "promote", NAME, "--version", v1, "--to", "staging")
    assert done.returncode == 0, done.stderr
    reason = "weekly retrain: ünïcode & symbols / ok"
    with as_user(user_env(team, "alice")), using_store(team["uri"]):
        os.environ["MLOPS_AUDIT_REASON"] = reason
        try:
            mlflow.MlflowClient().set_registered_model_alias(NAME, "staging", v2)
        finally:
            os.environ.pop("MLOPS_AUDIT_REASON")
    assert aliases(team)["staging"] == v2
    # the server mirrored the legacy stages of that plain MlflowClient move itself
    assert stages(team, v1, v2) == ["None", "Staging"]

    # production: refused to alice by every client, and the alias never moves
    refused = mlops(team, "alice", "promote", NAME, "--version", v2, "--to", "production")
    assert refused.returncode == 1
    assert "refused by the tracking server" in refused.stderr
    assert "needs MANAGE on registered model 'team-model'" in refused.stderr
    with as_user(user_env(team, "alice")), using_store(team["uri"]):
        with pytest.raises(mlflow.MlflowException) as info:
            mlflow.MlflowClient().set_registered_model_alias(NAME, "production", v2)
    assert info.value.error_code == "PERMISSION_DENIED" and "needs MANAGE" in info.value.message
    attempts = [
        ("POST", "/api/2.0/mlflow/registered-models/alias", {"json": {"version": v2}}),
        ("POST", "/ajax-api/2.0/mlflow/registered-models/alias", {"json": {"version": v2}}),
        ("DELETE", "/api/2.0/mlflow/registered-models/alias", {"json": {}}),
    ]
    for method, path, kwargs in attempts:
        where = "json" if "json" in kwargs else "params"
        kwargs[where].update(name=NAME, alias="production")
        answer = rest(team, "alice", method, path, **kwargs)
        assert answer.status_code == 403, (path, answer.text)
        assert "needs MANAGE" in answer.json()["message"]
    stage = rest(
        team,
        "alice",
        "POST",
        "/api/2.0/mlflow/model-versions/transition-stage",
        json={
            "name": NAME,
            "version": v2,
            "stage": "Production",
            "archive_existing_versions": False,
        },
    )
    assert stage.status_code == 403 and "needs MANAGE" in stage.json()["message"]
    assert "production" not in aliases(team)

    # bob (MANAGE) may
    promoted = mlops(
        team, "bob", "promote", NAME, "--version", v2, "--to", "production", "--reason", "ship it"
    )
    assert promoted.returncode == 0, promoted.stderr
    assert aliases(team)["production"] == v2
    # what follows the move, done by the server in the same step: v2's stage, and the staging
    # alias that production used up removed; the client sent no stage or alias request of its own
    assert stages(team, v1, v2) == ["None", "Production"] and "staging" not in aliases(team)

    rows = audit_rows(team)[before:]
    alice = [r for r in rows if r["who"] == "alice"]
    # one row per attempt: 2 staging moves, then 6 production attempts (mlops, MlflowClient,
    # REST, the UI's path, a delete, a stage transition)
    production = [r for r in alice if r["target"] in ("production", "stage Production")]
    assert [r["outcome"] for r in production] == ["refused"] * 6
    assert all("needs MANAGE" in r["detail"] for r in production)
    staging = [r for r in alice if r["target"] == "staging"]
    assert [(r["action"], r["outcome"], r["to_version"]) for r in staging] == [
        ("promote", "done", v1),
        ("alias_set", "done", v2),
    ]
    assert staging[1]["reason"] == reason and staging[1]["from_version"] == v1
    gates = json.loads(staging[0]["gates"])
    assert gates and all(g["passed"] for g in gates)  # the client's gates, declared
    shipped = next(r for r in rows if r["who"] == "bob" and r["action"] == "promote")
    assert (shipped["outcome"], shipped["to_version"], shipped["reason"]) == ("done", v2, "ship it")
    assert shipped["detail"] == (
        f"the server then: v{v2} Production; staging alias removed from v{v2}"
    )
    assert [r["action"] for r in rows if r["outcome"] == "done"] == [
        "promote",
        "alias_set",
        "promote",
    ]
    # the version's one-line note, written by the server with the row (not by the client)
    note = version_tags(team, v2)["mlops.last_change"]
    assert note.startswith("promote to production done by bob at ")
    assert note.endswith(f"(audit #{shipped['id']})")
    assert all(r["outcome"] != "pending" for r in rows)

    # alice (EDIT) registers a version of her own, from a run in her own experiment
    with as_user(user_env(team, "alice")), using_store(team["uri"]):
        csv = make_csv(Path(team["folder"]) / "alice.csv", n=150, seed=3)
        config = load_config(
            overrides=[
                f"data.dataset={csv}",
                "data.target=label",
                "data.categorical=[color]",
                "experiment=alice-experiments",  # hers: the team's own is READ to her
            ]
        )
        mine = register(train(config).model_uri, NAME)
    assert int(mine.version) == int(v2) + 1
    assert aliases(team)["production"] == v2  # and nothing else moved

    # the trail as any client reads it: through the app's endpoint, not the database
    trail = mlops(team, "carol", "audit", NAME)
    assert trail.returncode == 0, trail.stderr
    assert f"bob promote done: production - -> {v2}" in trail.stdout
    assert trail.stdout.count("alice") >= 8


def test_rollback_status_and_a_refusal_by_the_gates_through_the_server(
    team: dict[str, Any],
) -> None:
    v1, v2 = team["versions"]
    if aliases(team).get("production") != v2:
        pytest.skip("needs the promotion of the test before (module order)")
    # a refusal by the client's gates (v1 was never in staging after v2): reported to the trail
    refused = mlops(team, "bob", "promote", NAME, "--version", v1, "--to", "production")
    assert refused.returncode == 1 and "in staging" in refused.stderr
    row = audit_rows(team)[-1]
    assert (row["who"], row["action"], row["outcome"]) == ("bob", "promote", "refused")
    assert any(g["gate"] == "in staging" and not g["passed"] for g in json.loads(row["gates"]))
    note = version_tags(team, v1)["mlops.last_change"]
    assert note.startswith("promote to production refused by bob at ")

    # v2 replaced no production version: back to v1 by name, past the staging gates
    back = mlops(team, "bob", "rollback", NAME, "--to", v1, "--reason", "alert")
    assert back.returncode == 0, back.stderr
    assert aliases(team)["production"] == v1
    # mirrored by the server: v1 in Production, the version rolled back from archived and marked
    assert stages(team, v1, v2) == ["Production", "Archived"]
    assert version_tags(team, v2)["mlops.rolled_back"] == "true"
    row = next(r for r in reversed(audit_rows(team)) if r["action"] == "rollback")
    assert (row["who"], row["outcome"], row["from_version"], row["to_version"]) == (
        "bob",
        "done",
        v2,
        v1,
    )
    status = mlops(team, "carol", "status", NAME)
    assert status.returncode == 0, status.stderr
    assert "production" in status.stdout


def test_a_read_only_user_serves_from_the_bucket_behind_a_token(
    team: dict[str, Any], tmp_path: Path
) -> None:
    """mlops serve (following @production, with --auth-token-env) and mlflow models serve, both
    as carol (READ), load the model from S3 through the server."""
    v1, v2 = team["versions"]
    token = uuid.uuid4().hex
    port = free_port()
    env = {
        **os.environ,
        **user_env(team, "carol"),
        "MLOPS_CONF_DIR": str(REPO / "conf"),
        "SERVE_TOKEN": token,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # uvicorn for mlflow's server
    }
    if "production" not in aliases(team):
        rest(
            team,
            "admin",
            "POST",
            "/api/2.0/mlflow/registered-models/alias",
            json={"name": NAME, "alias": "production", "version": v1},
        )
    command = [str(BIN / "mlops"), "serve", NAME, "--alias", "production", "--port", str(port)]
    row = {"dataframe_records": [{"x1": 0.1, "x2": 0.2, "color": "red"}]}
    with running([*command, "--auth-token-env", "SERVE_TOKEN"], env, port, tmp_path / "s.log") as b:
        assert requests.get(b + "/ping", timeout=10).status_code == 200
        assert requests.get(b + "/health", timeout=10).status_code == 200
        bare = requests.post(b + "/invocations", json=row, timeout=10)
        assert bare.status_code == 401 and "Bearer" in bare.json()["message"]
        wrong = requests.post(
            b + "/invocations", json=row, headers={"Authorization": "Bearer nope"}, timeout=10
        )
        assert wrong.status_code == 401
        assert requests.get(b + "/metrics", timeout=10).status_code == 401
        good = requests.post(
            b + "/invocations", json=row, headers={"Authorization": f"Bearer {token}"}, timeout=10
        )
        assert good.status_code == 200, good.text
        assert good.json()["predictions"][0]["model_version"] in (v1, v2)
    assert token not in (tmp_path / "s.log").read_text()

    port = free_port()
    stock = [str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{NAME}/{v1}"]
    stock += ["--env-manager", "local", "--port", str(port)]
    with running(stock, env, port, tmp_path / "m.log") as base:
        status, body = post(base, row)
        assert status == 200, body
        assert body["predictions"][0]["model_version"] == v1


def test_no_secret_in_the_servers_database_log_or_command_line(team: dict[str, Any]) -> None:
    log = Path(team["log"]).read_text(errors="replace")
    assert ADMIN_PASSWORD not in log
    engine = sa.create_engine(team["database"])
    try:
        with engine.connect() as conn:
            tables = [
                r[0]
                for r in conn.execute(
                    sa.text("select tablename from pg_tables where schemaname = 'public'")
                )
            ]
            for table in tables:
                for row in conn.execute(sa.text(f'select * from "{table}"')):
                    assert ADMIN_PASSWORD not in str(tuple(row)), table
    finally:
        engine.dispose()


@pytest.mark.parametrize("fault", ["no-password", "database", "bucket"])
def test_the_server_refuses_to_start_and_says_what_is_wrong(
    s3: str, database: str, fault: str
) -> None:
    env = {
        **os.environ,
        **S3_ENV,
        "MLFLOW_S3_ENDPOINT_URL": s3,
        "MLOPS_ADMIN_PASSWORD": ADMIN_PASSWORD,
        "MLOPS_CONF_DIR": str(REPO / "conf"),
    }
    backend, bucket = database, BUCKET
    if fault == "no-password":
        env.pop("MLOPS_ADMIN_PASSWORD")
    elif fault == "database":
        closed = free_port()
        backend = f"postgresql+psycopg://postgres:hunter2secret@127.0.0.1:{closed}/nowhere"
    else:
        bucket = "no-such-bucket"
    args = ["--backend-store-uri", backend, "--artifacts-destination", f"s3://{bucket}/x"]
    port = free_port()
    started = time.monotonic()
    done = subprocess.run(
        server_command(*args, "--port", str(port)),
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    if fault == "database":  # the literal password in the URL is warned about (masked) first
        assert "holds a literal password" in lines[0] and len(lines) == 2, done.stderr
        lines = lines[1:]
    assert len(lines) == 1, done.stderr
    expected = {
        "no-password": "no admin password: set MLOPS_ADMIN_PASSWORD",
        "database": "backend store (server.backend_store_uri) at postgresql+psycopg://postgres:***",
        "bucket": "the bucket 'no-such-bucket' does not exist at http://127.0.0.1",
    }[fault]
    assert expected in lines[0]
    assert "hunter2secret" not in done.stderr
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/health", timeout=2)
    assert time.monotonic() - started < 60


def test_a_wrong_admin_password_for_an_existing_admin_is_refused(
    team: dict[str, Any], s3: str
) -> None:
    env = {
        **os.environ,
        **S3_ENV,
        "MLFLOW_S3_ENDPOINT_URL": s3,
        "MLOPS_ADMIN_PASSWORD": "not-the-admins-password",
        "MLOPS_CONF_DIR": str(REPO / "conf"),
    }
    args = ["--backend-store-uri", team["database"], "--artifacts-destination", f"s3://{BUCKET}/x"]
    done = subprocess.run(
        server_command(*args, "--port", str(free_port())),
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert "exists with another password" in done.stderr
    assert "not-the-admins-password" not in done.stderr


def test_the_audit_api_needs_a_login_and_read_permission(team: dict[str, Any]) -> None:
    path = "/api/2.0/mlops/audit"
    anonymous = requests.get(team["uri"] + path, params={"name": NAME}, timeout=10)
    assert anonymous.status_code == 401
    rows = rest(team, "carol", "GET", path, params={"name": NAME})
    assert rows.status_code == 200 and rows.json()["records"]
    everything = rows.json()["records"]
    newest = rest(team, "carol", "GET", path, params={"name": NAME, "last": "2"})
    assert newest.status_code == 200 and newest.json()["records"] == everything[-2:]
    for wrong in ("0", "1001", "two", "٣"):
        refused = rest(team, "carol", "GET", path, params={"name": NAME, "last": wrong})
        assert refused.status_code == 400 and "'last'" in refused.json()["message"], wrong
    bad = rest(team, "carol", "POST", path, json={"name": NAME, "action": "delete_everything"})
    assert bad.status_code == 400 and "'action' must be one of" in bad.json()["message"]
    report = rest(
        team,
        "carol",
        "POST",
        path,
        json={"name": NAME, "action": "shadow_start", "detail": "shadow challenger"},
    )
    assert report.status_code == 200
    record = report.json()["record"]
    assert (record["who"], record["action"], record["outcome"]) == ("carol", "shadow_start", "done")


def test_a_versions_files_come_in_one_answer_and_a_changed_object_is_read_again(
    team: dict[str, Any], tmp_path: Path
) -> None:
    """``model-versions/files``: READ on the model, one tar of exactly the version's files in
    the bucket; the server's cache reads an object again once it changed in S3, so the client's
    checksum sees the change."""
    import io
    import tarfile

    import boto3
    from mlflow.exceptions import MlflowException
    from mlflow.server import get_app_client

    from mlops.artifacts import CHECKSUM_TAG, _from_team_server, download_model, model_checksum

    v1 = team["versions"][0]
    path = "/api/2.0/mlops/model-versions/files"
    from mlflow.server.auth.permissions import RESOURCE_GRANTABLE_PERMISSIONS

    # a user refused this model: MLflow 3.17 grants DENY on one resource; earlier releases
    # refuse nothing to a user on a server whose default is READ (no NO_PERMISSIONS grants),
    # so that part runs under `make test` (3.17) and not under `make test-lowest`
    deniable = "DENY" in RESOURCE_GRANTABLE_PERMISSIONS
    if deniable:
        with as_user(team["env"]):
            auth = get_app_client("mlops", tracking_uri=team["uri"])
            if not _exists(auth, "dave"):
                auth.create_user("dave", password("dave"))
                auth.grant_user_permission("dave", "registered_model", NAME, "DENY")
    anonymous = requests.get(team["uri"] + path, params={"name": NAME, "version": v1}, timeout=10)
    assert anonymous.status_code == 401
    bad = rest(team, "carol", "GET", path, params={"name": NAME, "version": "1; drop"})
    assert bad.status_code == 400 and "'version'" in bad.json()["message"]
    missing = rest(team, "carol", "GET", path, params={"name": NAME, "version": "999"})
    assert missing.status_code == 404 and "no version 999" in missing.json()["message"]
    nameless = rest(team, "carol", "GET", path, params={"version": v1})
    assert nameless.status_code == 400 and "'name'" in nameless.json()["message"]
    posted = rest(team, "carol", "POST", path, params={"name": NAME, "version": v1})
    assert posted.status_code == 405
    if deniable:
        denied = rest(team, "dave", "GET", path, params={"name": NAME, "version": v1})
        assert denied.status_code == 403 and "needs READ" in denied.json()["message"]
        # refused by the endpoint, the client goes to MLflow's own download, which decides alike
        with as_user(user_env(team, "dave")), using_store(team["uri"]):
            with pytest.raises(MlflowException) as refused:
                download_model(NAME, v1, tmp_path / "dave")
        assert refused.value.error_code == "PERMISSION_DENIED"
        assert "the server refused its files" not in refused.value.message

    answer = rest(team, "carol", "GET", path, params={"name": NAME, "version": v1})
    assert answer.status_code == 200 and answer.headers["X-Mlops-Files"] == "1"
    with tarfile.open(fileobj=io.BytesIO(answer.content)) as tar:
        names = sorted(m.name for m in tar.getmembers() if m.isfile())
    s3 = boto3.client("s3", endpoint_url=team["s3"], **_boto(S3_ENV))
    with as_user(user_env(team, "carol")), using_store(team["uri"]):
        client = mlflow.MlflowClient()
        version = client.get_model_version(NAME, v1)
        location = client.get_model_version_download_uri(NAME, v1)
        prefix = "mlflow/" + location.split("mlflow-artifacts:/", 1)[1].strip("/") + "/"
        stored = sorted(
            o["Key"][len(prefix) :]
            for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
            for o in page.get("Contents", [])
        )
        assert names == stored and "MLmodel" in names
        recorded = version.tags[CHECKSUM_TAG]
        assert model_checksum(download_model(NAME, v1, tmp_path / "a")) == recorded
        key = prefix + "artifacts/pipeline.skops"
        original = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        try:
            s3.put_object(Bucket=BUCKET, Key=key, Body=original + b"changed")
            changed = (tmp_path / "b").resolve()
            assert _from_team_server(NAME, v1, changed)  # the one answer, not MLflow's files
            assert (changed / "artifacts" / "pipeline.skops").read_bytes().endswith(b"changed")
            assert model_checksum(changed) != recorded
        finally:
            s3.put_object(Bucket=BUCKET, Key=key, Body=original)
        assert model_checksum(download_model(NAME, v1, tmp_path / "c")) == recorded


def _exists(auth: Any, user: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        auth.get_user(user)
    except MlflowException:
        return False
    return True


def test_serve_refuses_an_empty_token_variable(team: dict[str, Any]) -> None:
    done = mlops(team, "carol", "serve", NAME, "--auth-token-env", "UNSET_TOKEN_VAR", "--dry-run")
    assert done.returncode == 2
    assert "UNSET_TOKEN_VAR: that variable is not set or empty" in done.stderr


def test_ways_around_the_policy_are_closed_and_audited(team: dict[str, Any]) -> None:
    """What a probe of the server found: each refused or audited, none a 500."""
    v1 = team["versions"][0]
    alias_path = "/api/2.0/mlflow/registered-models/alias"
    # a DELETE whose query string names one model and whose body another: basic-auth would
    # check the first, MLflow's handler delete from the second
    sneaky = rest(
        team,
        "carol",
        "DELETE",
        alias_path,
        params={"name": "carols-own", "alias": "x"},
        data=json.dumps({"name": NAME, "alias": "production"}),
        headers={"Content-Type": "text/plain"},
    )
    assert sneaky.status_code == 400 and "not both" in sneaky.json()["message"]
    if "production" not in aliases(team):  # (run alone: the tests before set it)
        production = {"name": NAME, "alias": "production", "version": v1}
        assert rest(team, "admin", "POST", alias_path, json=production).status_code == 200

    # renaming the model that holds production needs MANAGE (alice has EDIT), and is audited
    before = len(audit_rows(team))
    renamed = rest(
        team,
        "alice",
        "POST",
        "/api/2.0/mlflow/registered-models/rename",
        json={"name": NAME, "new_name": NAME + "-old"},
    )
    assert renamed.status_code == 403 and "needs MANAGE" in renamed.json()["message"]
    row = audit_rows(team)[before]
    assert (row["who"], row["action"], row["outcome"]) == ("alice", "rename", "refused")

    # a scratch model: deleting its production version is a MANAGE move, audited when done
    scratch = f"scratch-{uuid.uuid4().hex[:6]}"
    source = model_version(team, v1)
    assert (
        rest(
            team,
            "admin",
            "POST",
            "/api/2.0/mlflow/registered-models/create",
            json={"name": scratch},
        ).status_code
        == 200
    )
    created = rest(
        team,
        "admin",
        "POST",
        "/api/2.0/mlflow/model-versions/create",
        json={
            "name": scratch,
            "source": source["source"],
            "run_id": source["run_id"],
            "model_id": source.get("model_id") or source["source"].removeprefix("models:/"),
        },
    )
    assert created.status_code == 200, created.text
    version = created.json()["model_version"]["version"]
    set_alias = {"name": scratch, "alias": "production", "version": version}
    assert rest(team, "admin", "POST", alias_path, json=set_alias).status_code == 200
    gone = rest(
        team,
        "admin",
        "DELETE",
        "/api/2.0/mlflow/model-versions/delete",
        json={"name": scratch, "version": version},
    )
    assert gone.status_code == 200
    engine = sa.create_engine(team["database"])
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text("select action, outcome, target from mlops_audit where model = :m order by id"),
            {"m": scratch},
        ).all()
    engine.dispose()
    assert [tuple(r) for r in rows] == [
        ("alias_set", "done", "production"),
        ("version_delete", "done", "production"),
    ]

    # a long alias and a reason with a line break and a NUL: stored, clipped, one line each
    long_alias = "challenger-for-november-2026"
    moved = rest(
        team,
        "bob",
        "POST",
        alias_path,
        json={"name": NAME, "alias": long_alias, "version": v1},
        headers={"X-Mlops-Reason": "ok%0D%0A#99 admin approved%00"},
    )
    assert moved.status_code == 200, moved.text
    row = audit_rows(team)[-1]
    assert row["outcome"] == "done" and long_alias in row["detail"]
    assert "\n" not in row["reason"] and "\x00" not in row["reason"]
    printed = mlops(team, "carol", "audit", NAME).stdout.splitlines()
    assert sum("admin approved" in line for line in printed) == 1
    assert not any(line.startswith("#99") for line in printed)

    # a lookalike of production or staging, and a version that is no number: refused first
    for alias, version in (
        ("Production", v1),
        ("production ", v1),
        ("staging", "1_0"),
        ("staging", "0x1"),
    ):
        answer = {"name": NAME, "alias": alias, "version": version}
        bad = rest(team, "admin", "POST", alias_path, json=answer)
        assert bad.status_code == 400, (alias, version, bad.text)
    # staging set on the production version (EDIT is enough): its stage stays Production
    held = aliases(team)["production"]
    staged = {"name": NAME, "alias": "staging", "version": held}
    assert rest(team, "alice", "POST", alias_path, json=staged).status_code == 200
    assert model_version(team, held)["current_stage"] == "Production"
    # the production version written with a leading zero is the same version: nothing archived
    again = {"name": NAME, "alias": "production", "version": "0" + held}
    same = rest(team, "bob", "POST", alias_path, json=again)
    assert same.status_code == 200, same.text
    assert aliases(team)["production"] == held
    assert model_version(team, held)["current_stage"] == "Production"
    row = audit_rows(team)[-1]
    assert (row["from_version"], row["to_version"], row["outcome"]) == (held, held, "done")

    # a lookalike of production (Cyrillic р) is refused
    lookalike = rest(
        team,
        "bob",
        "POST",
        alias_path,
        json={"name": NAME, "alias": "\u0440roduction", "version": v1},
    )
    assert lookalike.status_code == 400 and "ASCII" in lookalike.json()["message"]

    # reports: a refused promotion needs EDIT; booleans are booleans; the model must exist
    report = "/api/2.0/mlops/audit"
    forged = {"name": NAME, "action": "promote", "to_version": v1, "reason": "approved by CTO"}
    assert rest(team, "carol", "POST", report, json=forged).status_code == 403
    stringly = rest(team, "bob", "POST", report, json={**forged, "forced": "false"})
    assert stringly.status_code == 400 and "JSON booleans" in stringly.json()["message"]
    ghost = rest(team, "admin", "POST", report, json={**forged, "name": "no-such-model"})
    assert ghost.status_code == 404
    assert "Traceback" not in Path(team["log"]).read_text(errors="replace")


@pytest.mark.parametrize(
    ("option", "key"), [("--port=70000", "server.port"), ("--workers=0", "server.workers")]
)
def test_server_options_are_checked_and_named(option: str, key: str) -> None:
    env = {
        **os.environ,
        "MLOPS_ADMIN_PASSWORD": ADMIN_PASSWORD,
        "MLOPS_CONF_DIR": str(REPO / "conf"),
    }
    done = subprocess.run(
        server_command(option, "--check"), env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and f"key '{key}'" in lines[0], done.stderr


def test_the_servers_file_cache_keeps_recent_objects_within_its_limit(tmp_path: Path) -> None:
    """mlops.team.files.FileCache: what was put is got back by its key (not by another size or
    ETag), the least recently used go first past the limit, a crashed worker's old parts are
    swept, and nothing is kept with a limit of 0."""
    from mlops.team.files import FileCache

    cache = FileCache(tmp_path / "c", limit_bytes=10)
    cache.put(("b", "k1", "4", "e1"), b"aaaa")
    cache.put(("b", "k2", "4", "e2"), b"bbbb")
    assert cache.get(("b", "k1", "4", "e1")) == b"aaaa"
    assert cache.get(("b", "k1", "4", "e-changed")) is None
    old = time.time() - 60
    os.utime(cache._path(("b", "k2", "4", "e2")), (old, old))  # k2: the least recently used
    cache.put(("b", "k3", "4", "e3"), b"cccc")  # 12 bytes kept, over the limit of 10
    part = cache.folder / ".part-left-by-a-crash"
    part.write_bytes(b"x")
    os.utime(part, (old - 7200, old - 7200))
    cache.trim()
    assert cache.get(("b", "k2", "4", "e2")) is None
    assert cache.get(("b", "k1", "4", "e1")) == b"aaaa"
    assert cache.get(("b", "k3", "4", "e3")) == b"cccc"
    assert not part.exists()
    cache.put(("b", "big", "11", "e"), b"x" * 11)  # larger than the whole cache: not kept
    assert cache.get(("b", "big", "11", "e")) is None
    nothing = FileCache(tmp_path / "none", limit_bytes=0)
    nothing.put(("b", "k", "1", "e"), b"x")
    assert nothing.get(("b", "k", "1", "e")) is None


def test_a_failed_follow_up_of_a_move_puts_the_alias_back_or_says_it_could_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the server does after an alias move, against a real registry database whose
    triggers refuse first the stage changes, then the alias changes too."""
    from datetime import datetime, timezone

    from mlops.registry.audit import AuditRecord
    from mlops.team import app

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_BACKEND_STORE_URI", uri)
    app._registry.cache_clear()
    try:
        client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
        client.create_registered_model("m")
        for _ in range(2):
            client.create_model_version("m", source=str(tmp_path))
        client.set_registered_model_alias("m", "production", "1")
        intent = AuditRecord(
            id=7,
            at=datetime.now(timezone.utc),
            who="bob",
            action="promote",
            outcome="pending",
            model="m",
            target="production",
            from_version="1",
            to_version="2",
            reason=None,
            forced=False,
            gates=[],
        )
        engine = sa.create_engine(uri)
        frozen = "BEGIN SELECT RAISE(ABORT, 'frozen by the test'); END"
        with engine.begin() as conn:
            conn.exec_driver_sql(
                f"CREATE TRIGGER frozen_stages BEFORE UPDATE OF current_stage ON model_versions "
                f"{frozen}"
            )
        client.set_registered_model_alias("m", "production", "2")  # the request's own change
        outcome, detail, error = app._follow(intent)
        assert outcome == "failed" and detail is not None and error is not None
        assert "frozen by the test" in detail and "production put back to 1" in detail
        assert error.startswith("production of m is unchanged")
        assert client.get_registered_model("m").aliases == {"production": 1}
        assert [client.get_model_version("m", v).current_stage for v in "12"] == ["None"] * 2

        client.set_registered_model_alias("m", "production", "2")
        with engine.begin() as conn:
            for event in ("INSERT", "UPDATE", "DELETE"):
                conn.exec_driver_sql(
                    f"CREATE TRIGGER frozen_aliases_{event} BEFORE {event} ON "
                    f"registered_model_aliases {frozen}"
                )
        outcome, detail, error = app._follow(intent)
        assert outcome == "done" and detail is not None and error is not None
        assert "putting production back failed too" in detail
        assert error.startswith("production of m is now version 2")
        assert client.get_registered_model("m").aliases == {"production": 2}

        with engine.begin() as conn:
            for trigger in (
                "frozen_stages",
                *(f"frozen_aliases_{e}" for e in ("INSERT", "UPDATE", "DELETE")),
            ):
                conn.exec_driver_sql(f"DROP TRIGGER {trigger}")
        engine.dispose()
        assert app._follow(intent) == (
            "done",
            "the server then: v2 Production; v1 Archived; v2 tagged mlops.replaced_version=1",
            None,
        )
        assert [client.get_model_version("m", v).current_stage for v in "12"] == [
            "Archived",
            "Production",
        ]
        assert client.get_model_version("m", "2").tags["mlops.replaced_version"] == "1"
    finally:
        app._registry.cache_clear()
