"""Schema versions of the project's own tables (mlops.migrations), on SQLite and PostgreSQL.

Fresh databases, databases made by the old ``create_all`` (adopted, rows kept), repeated and
concurrent opens, a newer database refused, and the version tables beside MLflow's own.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from mlops.db import create_engine
from mlops.errors import MlopsError, RegistryError
from mlops.migrations import HISTORIES, current, heads, scripts, upgrade
from mlops.monitoring.store import META as LOG_META
from mlops.monitoring.store import Alert, MonitoringStore
from mlops.registry.audit import AUDIT, AuditLog

APP_METADATA = {"audit": AUDIT.metadata, "log": LOG_META}
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database: a SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    return request.getfixturevalue("postgres_url")


@contextmanager
def connected(url: str) -> Iterator[sa.Connection]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            yield conn
    finally:
        engine.dispose()


def versions(url: str) -> dict[str, frozenset[str]]:
    with connected(url) as conn:
        return {h: current(conn, h) for h in HISTORIES}


def open_both(url: str) -> tuple[AuditLog, MonitoringStore]:
    return AuditLog(url), MonitoringStore(url)


def baseline(history: str) -> sa.MetaData:
    """The tables as the old ``create_all`` made them: the history's frozen baseline."""
    metadata = sa.MetaData()
    base = scripts(history).get_base()
    scripts(history).get_revision(base).module.tables(metadata)
    return metadata


def test_fresh_database_gets_tables_and_versions_at_head(url: str) -> None:
    audit, store = open_both(url)
    assert versions(url) == {h: heads(h) for h in HISTORIES}
    with connected(url) as conn:
        names = set(sa.inspect(conn).get_table_names())
    expected = {n for h in HISTORIES.values() for n in h.tables | {h.version_table}}
    assert names == expected  # and no "alembic_version" of MLflow's name
    record = audit.record(
        who="a",
        action="promote",
        outcome="done",
        model="m",
        target="staging",
        from_version=None,
        to_version="1",
        reason=None,
        forced=False,
        gates=[],
    )
    assert [r.id for r in audit.records("m")] == [record.id]
    store.add_alert(
        Alert(
            at=1.0, model="m", version="1", rule="r", metric="x", value=1, threshold=0, message="hi"
        )
    )
    assert [a.message for a in store.alerts("m")] == ["hi"]


def test_each_history_only_touches_its_own_tables(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    AuditLog(url)
    with connected(url) as conn:
        assert set(sa.inspect(conn).get_table_names()) == HISTORIES["audit"].tables | {
            HISTORIES["audit"].version_table
        }


def test_head_matches_the_tables_the_code_uses(url: str) -> None:
    """A change to a module's tables needs a revision: the head must equal the code's MetaData."""
    open_both(url)
    with connected(url) as conn:
        for history, metadata in APP_METADATA.items():
            owned = HISTORIES[history].tables
            context = MigrationContext.configure(
                conn,
                opts={
                    "compare_type": True,
                    "include_name": lambda name, kind, _parent, owned=owned: (
                        kind != "table" or name in owned
                    ),
                },
            )
            assert compare_metadata(context, metadata) == [], history
            assert set(metadata.tables) == owned


def _rows(conn: sa.Connection, table: sa.Table) -> list[tuple]:
    """The rows of ``table``, in the columns it has in its baseline (later revisions add some)."""
    names = ", ".join(c.name for c in table.columns)
    return [tuple(r) for r in conn.execute(sa.text(f"select {names} from {table.name} order by 1"))]


def test_database_made_by_create_all_is_adopted_with_its_rows(url: str) -> None:
    old = {h: baseline(h) for h in HISTORIES}
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        for metadata in old.values():
            metadata.create_all(conn)
        conn.execute(
            old["audit"]
            .tables["mlops_audit"]
            .insert()
            .values(
                at=sa.func.now(),
                who="old",
                action="promote",
                outcome="done",
                model="m",
                target="production",
                to_version="3",
                forced=False,
                gates="[]",
            )
        )
        conn.execute(old["audit"].tables["mlops_registry_lock"].insert().values(model="m"))
        conn.execute(
            old["log"]
            .tables["mlops_predictions"]
            .insert()
            .values(
                request_id="r1",
                row=0,
                at=5.0,
                model="m",
                version="3",
                status=200,
                latency_ms=1.5,
                features="{}",
            )
        )
        conn.execute(
            old["log"]
            .tables["mlops_alerts"]
            .insert()
            .values(
                at=6.0,
                model="m",
                version="3",
                rule="r",
                metric="x",
                value=2,
                threshold=1,
                message="old alert",
            )
        )
    with engine.connect() as conn:
        before = {
            name: _rows(conn, table)
            for metadata in old.values()
            for name, table in sorted(metadata.tables.items())
        }
    engine.dispose()

    audit, store = open_both(url)
    assert versions(url) == {h: heads(h) for h in HISTORIES}
    with connected(url) as conn:
        tables = {n: t for m in old.values() for n, t in m.tables.items()}
        assert {n: _rows(conn, tables[n]) for n in before} == before
    assert [(r.who, r.to_version) for r in audit.records("m")] == [("old", "3")]
    assert store.predictions("m", None, 0, 10)["request_id"].tolist() == ["r1"]
    assert [a.message for a in store.alerts("m")] == ["old alert"]


def test_older_tables_get_their_missing_columns_tables_and_indexes(url: str) -> None:
    """A log made before the numeric layout: no layout/numeric columns, no layouts table."""
    metadata = sa.MetaData()
    old = sa.Table(
        "mlops_predictions",
        metadata,
        *(
            sa.Column(c.name, c.type, primary_key=c.primary_key, nullable=c.nullable)
            for c in baseline("log").tables["mlops_predictions"].columns
            if c.name not in ("layout", "numeric")
        ),
    )
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        metadata.create_all(conn)
        conn.execute(
            old.insert().values(
                request_id="r1",
                row=0,
                at=5.0,
                model="m",
                version="1",
                status=200,
                latency_ms=1.0,
                features='{"a": 1}',
            )
        )
    engine.dispose()

    store = MonitoringStore(url)
    frame = store.predictions("m", None, 0, 10)
    assert frame["request_id"].tolist() == ["r1"] and frame["layout"].isna().all()
    with connected(url) as conn:
        inspector = sa.inspect(conn)
        assert {"layout", "numeric"} <= {
            c["name"] for c in inspector.get_columns("mlops_predictions")
        }
        assert inspector.has_table("mlops_prediction_layouts")
        assert {"ix_mlops_predictions_model_at", "ix_mlops_predictions_request_id"} <= {
            ix["name"] for ix in inspector.get_indexes("mlops_predictions")
        }
    assert versions(url)["log"] == heads("log")


def test_a_table_missing_a_not_null_column_fails_whole_and_is_named(url: str) -> None:
    metadata = sa.MetaData()
    sa.Table(
        "mlops_predictions",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("request_id", sa.String(32)),
    )
    engine = sa.create_engine(url)
    metadata.create_all(engine)
    engine.dispose()
    with pytest.raises(
        MlopsError, match="monitoring.log_url: .*mlops_predictions .*NOT NULL column row"
    ):
        MonitoringStore(url)
    with connected(url) as conn:  # nothing of the failed upgrade stays: no other table, no version
        assert sa.inspect(conn).get_table_names() == ["mlops_predictions"]


@contextmanager
def statements() -> Iterator[list[str]]:
    """Every SQL statement any engine sends in the block."""
    seen: list[str] = []

    def listener(_conn, _cursor, statement, *_args) -> None:  # noqa: ANN001
        seen.append(statement)

    sa.event.listen(sa.Engine, "before_cursor_execute", listener)
    try:
        yield seen
    finally:
        sa.event.remove(sa.Engine, "before_cursor_execute", listener)


def test_opening_again_is_a_read_only_no_op(url: str) -> None:
    open_both(url)
    with statements() as seen:
        open_both(url)
        for history in HISTORIES:
            assert upgrade(create_engine(url), history) is False
    assert seen, "the listener saw nothing"
    writes = [
        s
        for s in seen
        if re.match(r"\s*(create|alter|drop|insert|update|delete|begin)", s, re.I)
        or "advisory" in s
    ]
    assert writes == []
    assert versions(url) == {h: heads(h) for h in HISTORIES}


def test_threads_opening_a_fresh_database_at_once_all_succeed(url: str) -> None:
    n = 8
    barrier = threading.Barrier(n)
    failures: list[BaseException] = []

    def opener() -> None:
        try:
            barrier.wait(timeout=30)
            open_both(url)
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(exc)

    threads = [threading.Thread(target=opener) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert failures == []
    assert versions(url) == {h: heads(h) for h in HISTORIES}
    with connected(url) as conn:  # one version row per history, not one per opener
        for h in HISTORIES.values():
            assert conn.execute(sa.text(f"select count(*) from {h.version_table}")).scalar() == 1


OPENER = """
import sys, time
from pathlib import Path
from mlops.db import create_engine
from mlops.migrations import upgrade
url, ready, go = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
engine = create_engine(url)
ready.touch()
while not go.exists():
    time.sleep(0.005)
print(sorted(h for h in ("log", "audit") if upgrade(engine, h)))
"""


def test_processes_opening_a_fresh_database_at_once_all_succeed(url: str, tmp_path: Path) -> None:
    n = 4
    go = tmp_path / "go"
    ready = [tmp_path / f"ready{i}" for i in range(n)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", OPENER, url, str(r), str(go)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in ready
    ]
    deadline = time.time() + 60
    while not all(r.exists() for r in ready) and time.time() < deadline:
        time.sleep(0.01)
    go.touch()
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * n, [err for _out, err in results]
    ran = [out.strip() for out, _err in results]
    # each history was upgraded by exactly one opener; the others found it done
    assert sum(r.count("audit") for r in ran) == 1 and sum(r.count("log") for r in ran) == 1, ran
    assert versions(url) == {h: heads(h) for h in HISTORIES}


def test_a_database_newer_than_the_code_is_refused_with_the_url_masked(url: str) -> None:
    AuditLog(url)
    with sa.create_engine(url).begin() as conn:
        conn.execute(
            sa.text(f"update {HISTORIES['audit'].version_table} set version_num = 'audit_9999'")
        )
    secret = url if url.startswith("sqlite") else url.replace("postgres@", "postgres:s3cret@")
    with pytest.raises(
        RegistryError, match="registry.audit_url: .*audit_9999.*newer mlops"
    ) as info:
        AuditLog(secret)
    assert "s3cret" not in str(info.value)


def test_an_unreachable_server_is_reported_with_the_url_masked() -> None:
    masked = r"registry.audit_url: cannot open the audit store .*\*\*\*"
    with pytest.raises(RegistryError, match=masked) as info:
        AuditLog("postgresql://u:s3cret@127.0.0.1:1/x")
    assert "s3cret" not in str(info.value)


def _mlflow_store(uri: str, root: Path):
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    store = SqlAlchemyStore(uri, str(root))
    store.engine.dispose()
    return store


def _mlflow_version(uri: str) -> list[str]:
    with connected(uri) as conn:
        return [
            r[0] for r in conn.execute(sa.text("select version_num from alembic_version")).all()
        ]


def test_version_tables_live_beside_mlflows_in_one_sqlite_file(
    tracking_uri: str, tmp_path: Path
) -> None:
    # MLflow first: the test's tracking store was made by SqlAlchemyStore (conftest's template)
    mlflow_head = _mlflow_version(tracking_uri)
    assert mlflow_head and not mlflow_head[0].startswith(("audit", "log"))
    open_both(tracking_uri)
    assert versions(tracking_uri) == {h: heads(h) for h in HISTORIES}
    assert _mlflow_version(tracking_uri) == mlflow_head
    _mlflow_store(tracking_uri, tmp_path / "mlruns")  # MLflow still opens (its schema check passes)
    # ours first: MLflow creates its tables into a file that already holds ours
    fresh = f"sqlite:///{tmp_path / 'fresh.db'}"
    open_both(fresh)
    _mlflow_store(fresh, tmp_path / "mlruns2")
    assert _mlflow_version(fresh) == mlflow_head
    open_both(fresh)
    _mlflow_store(fresh, tmp_path / "mlruns2")
    assert versions(fresh) == {h: heads(h) for h in HISTORIES}


@pytest.mark.postgres
def test_version_tables_live_beside_mlflows_in_one_postgres_database(
    postgres_url: str, tmp_path: Path
) -> None:
    """The production layout: the tracking database holds both histories' tables as well."""
    _mlflow_store(postgres_url, tmp_path / "mlruns")
    mlflow_head = _mlflow_version(postgres_url)
    open_both(postgres_url)
    assert versions(postgres_url) == {h: heads(h) for h in HISTORIES}
    assert _mlflow_version(postgres_url) == mlflow_head
    _mlflow_store(postgres_url, tmp_path / "mlruns")
