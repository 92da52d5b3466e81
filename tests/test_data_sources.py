"""Training data from Parquet, folders, globs, S3 and SQL; what a run logs of it; rebuilding it.

Real parts only: files in tmp_path, moto's S3 server over HTTP, the PostgreSQL at
127.0.0.1:5432 (a fresh database per test), MLflow's SQLite store per test.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from mlops.config import load_config
from mlops.data import DatasetSplit, prepare
from mlops.errors import DataValidationError
from mlops.lineage import load_logged_split
from mlops.training import train
from tests.conftest import free_port
from tests.helpers import make_csv
from tests.servers import MOTO_S3_ENV, moto_s3

FAST = ["model.family=logreg", "explain.enabled=false"]
PARTS = ("train", "validation", "test")


def frame(n: int = 90, seed: int = 0) -> pd.DataFrame:
    """Two numeric features, a categorical one with a few missing values, a yes/no label."""
    rows = pd.read_csv(make_csv(Path(f"made-{uuid.uuid4().hex}.csv"), n=n, seed=seed))
    rows.loc[rows.index % 17 == 3, "color"] = np.nan
    # eighths: exact in binary, so CSV and Parquet give the very same floats
    rows[["x1", "x2"]] = (rows[["x1", "x2"]] * 8).round() / 8
    return rows


def cfg(dataset: str, *extra: str):  # noqa: ANN201 - a Config
    return load_config(
        overrides=[
            f"data.dataset={dataset}",
            "data.target=label",
            "data.categorical=[color]",
            *FAST,
            *extra,
        ]
    )


def parquet_folder(folder: Path, rows: pd.DataFrame, parts: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, piece in enumerate(np.array_split(np.arange(len(rows)), parts)):
        rows.iloc[piece].to_parquet(folder / f"part-{i}.parquet", index=False)
    (folder / "_SUCCESS").write_text("")  # Spark's marker: not data
    return folder


def assert_same_split(got: DatasetSplit, want: DatasetSplit) -> None:
    for part in PARTS:
        pd.testing.assert_frame_equal(getattr(got, part), getattr(want, part), check_dtype=True)
    for field in (
        "target",
        "task",
        "numeric_columns",
        "categorical_columns",
        "classes",
        "content_hash",
        "source",
        "n_rows",
        "n_duplicates_dropped",
        "quality",
    ):
        assert getattr(got, field) == getattr(want, field), field


# ---- files, folders and globs ----


def test_a_parquet_folder_and_a_mixed_glob_read_as_the_csv_does(tmp_path: Path) -> None:
    rows = frame()
    rows.to_csv(tmp_path / "all.csv", index=False)
    from_csv = prepare(cfg(str(tmp_path / "all.csv")))

    folder = parquet_folder(tmp_path / "lake", rows)
    from_folder = prepare(cfg(str(folder)))
    assert from_folder.content_hash == from_csv.content_hash
    assert from_folder.source == str(folder.resolve())

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    rows.iloc[:40].to_csv(mixed / "a.csv", index=False)
    rows.iloc[40:][["label", "x2", "color", "x1"]].to_parquet(mixed / "b.parquet", index=False)
    from_glob = prepare(cfg(str(mixed / "*")))
    assert from_glob.content_hash == from_csv.content_hash  # column order of the first part
    assert from_glob.feature_columns == from_csv.feature_columns


def test_a_part_with_other_columns_is_refused_by_name(tmp_path: Path) -> None:
    rows = frame()
    rows.iloc[:40].to_csv(tmp_path / "a.csv", index=False)
    rows.iloc[40:].assign(extra=1.0).to_csv(tmp_path / "b.csv", index=False)
    with pytest.raises(DataValidationError, match=r"part '.*b\.csv' does not have the columns"):
        prepare(cfg(str(tmp_path)))


@pytest.mark.parametrize(
    ("setup", "dataset", "message"),
    [
        ("empty_folder", "empty", r"data.dataset: input folder '.*empty' holds no .csv or"),
        (None, "nothing/*.parquet", r"data.dataset: input glob '.*' matches no file"),
        ("bad_parquet", "bad.parquet", r"'bad.parquet' is not a readable Parquet file"),
        ("wide_parquet", "wide.parquet", r"8 columns in its schema, more than data.max_columns"),
        ("folder_of_bad", "lake", r"'lake/b.parquet' is not a readable Parquet file"),
        (None, "missing.parquet", r"file 'missing.parquet' not found"),
    ],
)
def test_file_sources_that_cannot_be_read_name_the_problem(
    tmp_path: Path, setup: str | None, dataset: str, message: str
) -> None:
    if setup == "empty_folder":
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "notes.txt").write_text("not data")
    elif setup == "bad_parquet":
        Path("bad.parquet").write_bytes(b"PAR1 this is no parquet")
    elif setup == "wide_parquet":
        pd.DataFrame({f"c{i}": [1.0, 2.0] for i in range(8)}).to_parquet("wide.parquet")
    elif setup == "folder_of_bad":
        parquet_folder(Path("lake"), frame(), parts=1)
        Path("lake/b.parquet").write_bytes(b"garbage")
    with pytest.raises(DataValidationError, match=message) as err:
        prepare(cfg(dataset, "data.max_columns=6"))
    assert len(str(err.value)) < 500


# ---- S3 through boto3 on moto's server ----


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with moto_s3(free_port(), log) as endpoint:
        yield endpoint


@pytest.fixture
def s3(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    for key, value in {**MOTO_S3_ENV, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint}.items():
        monkeypatch.setenv(key, value)
    return s3_endpoint


def test_s3_file_prefix_and_glob_read_as_local_files(tmp_path: Path, s3: str) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=s3)
    bucket = f"lake-{uuid.uuid4().hex[:8]}"
    client.create_bucket(Bucket=bucket)
    rows = frame()
    rows.to_csv(tmp_path / "all.csv", index=False)
    want = prepare(cfg(str(tmp_path / "all.csv"))).content_hash
    folder = parquet_folder(tmp_path / "parts", rows)
    for path in sorted(folder.iterdir()):
        client.upload_file(str(path), bucket, f"sales/day=1/{path.name}")
    client.upload_file(str(tmp_path / "all.csv"), bucket, "csv/all.csv")

    assert prepare(cfg(f"s3://{bucket}/csv/all.csv")).content_hash == want
    by_prefix = prepare(cfg(f"s3://{bucket}/sales/"))
    assert by_prefix.content_hash == want
    assert by_prefix.source == f"s3://{bucket}/sales/"
    assert prepare(cfg(f"s3://{bucket}/sales/*/part-*.parquet")).content_hash == want
    # as a local glob: `*` stays within one part of the key, `**` crosses parts
    from mlops.sources import list_sources

    client.upload_file(str(tmp_path / "all.csv"), bucket, "csv/old/all.csv")
    assert [x.uri for x in list_sources(f"s3://{bucket}/csv/*.csv")] == [
        f"s3://{bucket}/csv/all.csv"
    ]
    assert [x.uri for x in list_sources(f"s3://{bucket}/csv/**/*.csv")] == [
        f"s3://{bucket}/csv/all.csv",
        f"s3://{bucket}/csv/old/all.csv",
    ]
    with pytest.raises(DataValidationError, match=r"matches no object"):
        prepare(cfg(f"s3://{bucket}/sales*.parquet"))

    with pytest.raises(DataValidationError, match=r"data.dataset: input .* matches no object"):
        prepare(cfg(f"s3://{bucket}/nothing/here.parquet"))
    with pytest.raises(DataValidationError, match=r"cannot be read from .*NoSuchBucket"):
        prepare(cfg("s3://no-such-bucket-here/x.parquet"))


def test_a_training_run_on_s3_logs_its_s3_source(s3: str, tmp_path: Path) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=s3)
    bucket = f"lake-{uuid.uuid4().hex[:8]}"
    client.create_bucket(Bucket=bucket)
    folder = parquet_folder(tmp_path / "parts", frame(), parts=2)
    for path in folder.glob("*.parquet"):
        client.upload_file(str(path), bucket, f"train/{path.name}")
    result = train(cfg(f"s3://{bucket}/train/"))
    inputs = mlflow.MlflowClient().get_run(result.run_id).inputs.dataset_inputs
    assert {json.loads(i.dataset.source)["uri"] for i in inputs} == {f"s3://{bucket}/train/"}
    assert {i.dataset.source_type for i in inputs} == {"s3"}


# ---- SQL through SQLAlchemy, the password as ${VAR} ----


@pytest.fixture
def sales_db(postgres_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, str]]:
    """A table in a fresh database, readable by a role whose password is in an env var.

    Yields ``(data.sql_url with ${MLOPS_TEST_SALES_PW}, the password)``.
    """
    import sqlalchemy as sa

    role, password = f"reader_{uuid.uuid4().hex[:8]}", f"pw-{uuid.uuid4().hex}"
    admin = sa.create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    frame().to_sql("sales", admin, index=False)
    with admin.connect() as conn:
        conn.execute(sa.text(f"create role {role} login password '{password}'"))
        conn.execute(sa.text(f"grant select on sales to {role}"))
    monkeypatch.setenv("MLOPS_TEST_SALES_PW", password)
    url = sa.engine.make_url(postgres_url)
    sql_url = (
        f"postgresql+psycopg://{role}:${{MLOPS_TEST_SALES_PW}}@{url.host}:{url.port or 5432}/"
        f"{url.database}"
    )
    try:
        yield sql_url, password
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f"drop owned by {role}"))
            conn.execute(sa.text(f"drop role if exists {role}"))
        admin.dispose()


@pytest.mark.postgres
def test_a_sql_query_trains_and_no_password_reaches_the_run(
    sales_db: tuple[str, str], tmp_path: Path
) -> None:
    sql_url, password = sales_db
    config = cfg("sql:SELECT x1, x2, color, label FROM sales", f"data.sql_url={sql_url}")
    result = train(config)
    split = load_logged_split(result.run_id)
    assert split.n_rows == 90
    assert split.source.startswith("postgresql+psycopg://reader_")
    assert split.source.endswith(" sql:SELECT x1, x2, color, label FROM sales")

    client = mlflow.MlflowClient()
    run = client.get_run(result.run_id)
    seen = [json.dumps(run.data.params), json.dumps(run.data.tags)]
    for dataset_input in run.inputs.dataset_inputs:
        seen.append(dataset_input.dataset.source)
        source = json.loads(dataset_input.dataset.source)
        assert source["tags"]["query"] == "sql:SELECT x1, x2, color, label FROM sales"
        assert "${MLOPS_TEST_SALES_PW}" in source["tags"]["sql_url"]
    out = mlflow.artifacts.download_artifacts(run_id=result.run_id, dst_path=str(tmp_path))
    for path in Path(out).rglob("*"):
        if path.is_file() and path.suffix in (".json", ".yaml", ".txt", ".csv", ".md", ""):
            seen.append(path.read_text(errors="replace"))
    assert len(run.inputs.dataset_inputs) == 3
    assert all(password not in text for text in seen)


@pytest.mark.postgres
def test_sql_errors_name_the_field_and_hide_the_password(sales_db: tuple[str, str]) -> None:
    sql_url, password = sales_db
    with pytest.raises(DataValidationError, match=r"data.sql_url: not set.*\$\{DB_PASSWORD\}"):
        prepare(cfg("sql:SELECT * FROM sales"))
    with pytest.raises(DataValidationError) as err:
        prepare(cfg("sql:SELECT * FROM no_such_table", f"data.sql_url={sql_url}"))
    message = str(err.value)
    assert 'relation "no_such_table" does not exist' in message
    assert "${MLOPS_TEST_SALES_PW}" in message and password not in message
    assert "\n" not in message
    # a literal password (warned about) and a database that is not there
    wrong = sql_url.replace("${MLOPS_TEST_SALES_PW}", "literal-wrong-password") + "_gone"
    with pytest.raises(DataValidationError, match=r"the query failed on .*:\*\*\*@.*_gone") as err:
        prepare(cfg("sql:SELECT * FROM sales", f"data.sql_url={wrong}"))
    assert "literal-wrong-password" not in str(err.value)


# ---- what a training run logs, and rebuilding the split from it ----


def test_a_training_run_logs_inputs_parquet_parts_and_a_manifest_that_rebuild_the_split(
    tmp_path: Path,
) -> None:
    folder = parquet_folder(tmp_path / "lake", frame())
    config = cfg(str(folder))
    original = prepare(config)
    result = train(config, original)

    client = mlflow.MlflowClient()
    run = client.get_run(result.run_id)
    inputs = {
        {t.key: t.value for t in i.tags}["mlflow.data.context"]: i.dataset
        for i in run.inputs.dataset_inputs
    }
    assert set(inputs) == set(PARTS)
    for part, dataset in inputs.items():
        assert json.loads(dataset.source) == {"uri": str(folder.resolve())}
        assert dataset.name == f"lake-{part}"
        assert len(dataset.digest) == 32 and dataset.digest.isalnum()
    assert len({d.digest for d in inputs.values()}) == 3

    files = {a.path for a in client.list_artifacts(result.run_id, "data")}
    assert {f"data/{p}.parquet" for p in PARTS} | {"data/manifest.json"} <= files
    manifest = json.loads(
        Path(mlflow.artifacts.download_artifacts(run_id=result.run_id, dst_path=str(tmp_path)))
        .joinpath("data/manifest.json")
        .read_text()
    )
    assert manifest["source"] == str(folder.resolve())
    assert manifest["content_hash"] == original.content_hash
    assert {p: manifest["parts"][p]["rows"] for p in PARTS} == {
        p: len(getattr(original, p)) for p in PARTS
    }
    assert manifest["categorical_columns"] == ["color"]
    assert manifest["classes"] == ["no", "yes"] and manifest["task"] == "classification"

    rebuilt = load_logged_split(result.run_id)
    assert_same_split(rebuilt, original)
    assert rebuilt.train["color"].isna().any()  # missing strings come back as NaN, not None
    again = train(config, rebuilt)
    assert again.metrics == pytest.approx(result.metrics, rel=0, abs=0)


def test_beyond_the_cap_only_the_manifest_is_kept_and_a_changed_source_is_refused(
    tmp_path: Path,
) -> None:
    rows = frame()
    path = tmp_path / "data.parquet"
    rows.to_parquet(path, index=False)
    config = cfg(str(path), "data.log_data_max_mb=0")
    original = prepare(config)
    result = train(config, original)

    files = {a.path for a in mlflow.MlflowClient().list_artifacts(result.run_id, "data")}
    assert "data/manifest.json" in files
    assert not {f"data/{p}.parquet" for p in PARTS} & files

    assert_same_split(load_logged_split(result.run_id), original)

    rows.loc[5, "x1"] += 1.0
    rows.to_parquet(path, index=False)
    with pytest.raises(DataValidationError, match=r"changed since run .*retrain on the current"):
        load_logged_split(result.run_id)


def test_a_run_without_a_manifest_cannot_be_rebuilt() -> None:
    with mlflow.start_run() as run:
        mlflow.log_param("x", 1)
    with pytest.raises(DataValidationError, match=r"records no checksum of its data/manifest"):
        load_logged_split(run.info.run_id)


def _artifact_file(run_id: str, path: str) -> Path:
    """The stored file of a run's artifact (the local artifact store of the tests)."""
    from urllib.parse import urlparse

    root = mlflow.MlflowClient().get_run(run_id).info.artifact_uri
    return Path(urlparse(root).path) / path


@pytest.mark.parametrize("artifact", ["data/manifest.json", "data/test.parquet", "config.yaml"])
def test_a_run_record_changed_after_the_run_is_refused_before_it_is_read(
    tmp_path: Path, artifact: str
) -> None:
    """The manifest, each Parquet part and the config are checked against checksums the run
    keeps in the tracking store (tags, and the manifest for the parts) before any is parsed:
    an edited record cannot feed rows to reproduce or to an export's parity check, nor point a
    rebuild at another source or database."""
    from mlops.artifacts import UntrustedArtifact
    from mlops.reproduce import reproduce

    path = tmp_path / "data.parquet"
    frame().to_parquet(path, index=False)
    result = train(cfg(str(path)))
    stored = _artifact_file(result.run_id, artifact)
    original = stored.read_bytes()
    if artifact.endswith(".json"):
        manifest = json.loads(original)
        manifest["dataset"] = "sql:SELECT * FROM elsewhere"
        stored.write_text(json.dumps(manifest, indent=2))
    elif artifact.endswith(".parquet"):
        part = pd.read_parquet(stored)
        part.loc[0, "x1"] += 1.0
        part.to_parquet(stored, index=False)
    else:
        stored.write_text(original.decode().replace("seed: 42", "seed: 43"))
    try:
        if artifact == "config.yaml":
            with pytest.raises(UntrustedArtifact, match="config.yaml does not match"):
                reproduce(result.run_id)
        else:
            with pytest.raises(DataValidationError, match=f"{artifact} does not match"):
                load_logged_split(result.run_id)
    finally:
        stored.write_bytes(original)
    assert_same_split(load_logged_split(result.run_id), prepare(cfg(str(path))))
