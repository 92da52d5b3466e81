"""Test isolation: every test gets its own SQLite tracking store and working folder."""

from __future__ import annotations

import os
import shutil
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # no traffic off this machine
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

REPO = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def template_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite store, made once: creating one runs MLflow's migrations (seconds)."""
    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    store = SqlAlchemyStore(f"sqlite:///{path}", str(path.parent / "mlruns"))
    store.engine.dispose()
    return path


@pytest.fixture(autouse=True)
def tracking_uri(tmp_path: Path, template_store: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each test: its own store copied from the template, cwd in tmp_path, no run left active."""
    db = tmp_path / "mlflow.db"
    shutil.copy(template_store, db)
    uri = f"sqlite:///{db}"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    monkeypatch.setenv("MLOPS_CONF_DIR", str(REPO / "conf"))
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    # set_experiment() in an earlier test must not leak its experiment id into this one
    monkeypatch.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    yield uri
    while mlflow.active_run():
        mlflow.end_run()


@contextmanager
def using_store(uri: str) -> Iterator[None]:
    """Point MLflow at ``uri`` for a block (module fixtures), then restore what was there."""
    saved_env = {
        k: os.environ.get(k)
        for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_ID")
    }
    saved = (
        mlflow.get_tracking_uri(),
        mlflow.get_registry_uri(),
        mlflow.tracking.fluent._active_experiment_id,
    )
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    mlflow.tracking.fluent._active_experiment_id = None
    try:
        yield
    finally:
        while mlflow.active_run():
            mlflow.end_run()
        mlflow.set_tracking_uri(saved[0])
        mlflow.set_registry_uri(saved[1])
        mlflow.tracking.fluent._active_experiment_id = saved[2]
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def python_bin() -> str:
    return sys.executable


def skip_or_fail(reason: str) -> None:
    """Skip on a laptop without the service; fail in CI, where the service must be there."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: this test may not skip)")
    pytest.skip(reason)


PG_ADMIN_URL = os.environ.get("MLOPS_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture
def postgres_url(postgres_databases) -> str:
    """A fresh, empty PostgreSQL database for one test, dropped afterwards."""
    return postgres_databases()


@pytest.fixture
def postgres_databases() -> Iterator:
    """A factory of fresh PostgreSQL databases for one test, all dropped afterwards."""
    import uuid

    import sqlalchemy as sa

    try:
        admin = sa.create_engine(
            PG_ADMIN_URL, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5}
        )
        with admin.connect() as conn:
            conn.execute(sa.text("select 1"))
    except Exception as exc:  # noqa: BLE001
        skip_or_fail(f"PostgreSQL not reachable at {PG_ADMIN_URL}: {exc.__class__.__name__}")
    names: list[str] = []

    def create() -> str:
        name = f"mlops_test_{uuid.uuid4().hex[:10]}"
        with admin.connect() as conn:
            conn.execute(sa.text(f'create database "{name}"'))
        names.append(name)
        return (
            sa.engine.make_url(PG_ADMIN_URL)
            .set(database=name)
            .render_as_string(hide_password=False)
        )

    try:
        yield create
    finally:
        with admin.connect() as conn:
            for name in names:
                conn.execute(sa.text(f'drop database if exists "{name}" with (force)'))
        admin.dispose()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Files with tests that build Docker images run last: meanwhile the image cache warms up
    (scripts/delivery.sh builds the layers they share in the background)."""
    image_files = {item.path for item in items if item.get_closest_marker("image")}
    items.sort(key=lambda item: item.path in image_files)  # stable: the rest keep their order
