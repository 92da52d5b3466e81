"""Batch scoring (`mlops score`): both engines, the rejects file, the run, the input errors.

One model is trained and registered (at @production) per module, and one Spark session
(local[2]) is shared by the Spark tests; a real 200,000-row Parquet with a few bad rows is
scored by both engines and checked against ``mlflow.pyfunc.load_model`` on the same rows.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from mlops.cli import main
from mlops.config import load_config
from mlops.scoring import ScoringInputError, score
from mlops.scoring.model import ScoringFailed
from mlops.training import train
from tests.conftest import IN_CI, free_port, using_store
from tests.helpers import make_csv
from tests.servers import BIN, MOTO_S3_ENV, moto_s3, server_env

NAME = "score-model"
ROWS = 200_000
# (row, column, value): rows the contract refuses, and the column its reason must name
BAD = [
    (17, "x1", np.nan),
    (50_001, "x2", np.inf),
    (123_456, "color", None),
    (199_999, "x1", -np.inf),
]
ANSWER = ["prediction", "proba_no", "proba_yes", "model_version"]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, template_store: Path) -> Iterator[dict]:
    """One store with NAME version 1 at @production (logreg on x1, x2, color)."""
    root = tmp_path_factory.mktemp("scoring")
    shutil.copy(template_store, root / "mlflow.db")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    csv = make_csv(root / "train.csv", n=300)
    with using_store(uri):
        config = load_config(
            overrides=[
                f"data.dataset={csv}",
                "data.target=label",
                "data.categorical=[color]",
                f"registry.model_name={NAME}",
                "experiment=scoring",
            ]
        )
        result = train(config, register=True)
        assert result.registered_version is not None
        mlflow.MlflowClient().set_registered_model_alias(
            NAME, "production", result.registered_version
        )
    yield {"uri": uri, "root": root, "version": result.registered_version}


@pytest.fixture
def shared(store: dict, monkeypatch: pytest.MonkeyPatch) -> dict:
    """This test talks to the module's store (its registered model) instead of its own."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", store["uri"])
    mlflow.set_tracking_uri(store["uri"])
    mlflow.set_registry_uri(store["uri"])
    return store


@pytest.fixture(scope="module")
def big_parquet(store: dict) -> Path:
    """200,000 rows in 4 row groups, an ``id`` column, and the BAD rows."""
    rng = np.random.default_rng(1)
    base = pd.read_csv(store["root"] / "train.csv").drop(columns="label")
    frame = pd.concat([base] * (ROWS // len(base) + 1), ignore_index=True).iloc[:ROWS].copy()
    frame["x1"] += rng.normal(scale=0.1, size=ROWS)
    frame["x2"] += rng.normal(scale=0.1, size=ROWS)
    frame.insert(0, "id", np.arange(ROWS))
    frame["color"] = frame["color"].astype(object)
    for row, col, value in BAD:
        frame.loc[row, col] = value
    path = store["root"] / "big.parquet"
    frame.to_parquet(path, index=False, row_group_size=50_000)
    return path


@pytest.fixture(scope="module")
def spark() -> Iterator[Any]:
    """One local Spark session for the module (score() uses the active one, and leaves it)."""
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        if IN_CI:
            pytest.fail("java is not on PATH (CI=true: the Spark test may not skip)")
        pytest.skip("java is not on PATH: the Spark engine needs Java 17")
    from pyspark.sql import SparkSession

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    session = (
        SparkSession.builder.master("local[2]")
        .config("spark.driver.memory", "1g")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.execution.arrow.maxRecordsPerBatch", "20000")
        .getOrCreate()
    )
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


def reference(store: dict, frame: pd.DataFrame) -> pd.DataFrame:
    """What ``mlflow.pyfunc.load_model`` of the registered version answers for ``frame``."""
    model = mlflow.pyfunc.load_model(
        f"models:/{NAME}/{store['version']}", model_config={"max_rows": len(frame) + 1}
    )
    return model.predict(frame[["x1", "x2", "color"]]).reset_index(drop=True)


def run_cli(args: list[str]) -> None:
    main(args)


def assert_matches(scored: pd.DataFrame, expected: pd.DataFrame) -> None:
    assert list(scored["prediction"]) == list(expected["prediction"])
    for col in ("proba_no", "proba_yes"):
        np.testing.assert_allclose(scored[col].to_numpy(), expected[col].to_numpy(), rtol=1e-9)


# ---- the 200,000-row Parquet, both engines ----
@pytest.mark.slow
def test_both_engines_score_the_same_and_match_pyfunc(
    shared: dict, big_parquet: Path, spark: Any, tmp_path: Path
) -> None:
    out_pandas = tmp_path / "scores.parquet"
    run_cli(
        [
            "score",
            NAME,
            "--alias",
            "production",
            "--input",
            str(big_parquet),
            "--output",
            str(out_pandas),
            "--chunk-rows",
            "30000",
        ]
    )
    config = load_config(overrides=["experiment=scoring"])
    result = score(
        config,
        NAME,
        version=shared["version"],
        input_uri=str(big_parquet),
        output_uri=str(tmp_path / "spark-scores"),
        engine="spark",
        chunk_rows=30000,
    )
    bad_ids = sorted(row for row, _, _ in BAD)
    assert (result.rows_scored, result.rows_rejected) == (ROWS - len(BAD), len(BAD))

    by_pandas = pd.read_parquet(out_pandas).sort_values("id").reset_index(drop=True)
    by_spark = pd.read_parquet(tmp_path / "spark-scores").sort_values("id").reset_index(drop=True)
    assert len(by_pandas) == len(by_spark) == ROWS - len(BAD)
    assert not set(by_pandas["id"]) & set(bad_ids)
    assert list(by_pandas["id"]) == list(by_spark["id"])
    assert_matches(by_spark, by_pandas)
    assert set(by_pandas["model_version"]) == set(by_spark["model_version"]) == {"1"}

    source = pd.read_parquet(big_parquet)
    good = source[~source["id"].isin(bad_ids)].reset_index(drop=True)
    assert_matches(by_pandas, reference(shared, good))

    # each engine's run: its id in every row, the counts logged
    client = mlflow.MlflowClient()
    for scored, engine in ((by_pandas, "pandas"), (by_spark, "spark")):
        (run_id,) = set(scored["scoring_run_id"])
        run = client.get_run(run_id)
        assert run.data.params["engine"] == engine
        assert run.data.params["model_version"] == "1"
        assert run.data.params["input"] == str(big_parquet)
        assert run.data.metrics["rows_scored"] == ROWS - len(BAD)
        assert run.data.metrics["rows_rejected"] == len(BAD)
        assert run.data.metrics["rows_per_second"] > 0
        assert run.info.status == "FINISHED"
    assert result.run_id == by_spark["scoring_run_id"][0]

    # rejects: the same rows from both engines, each with the column at fault
    want = {row: col for row, col, _ in BAD}
    for rejects in (
        pd.read_csv(tmp_path / "scores-rejects.csv"),
        pd.concat(pd.read_csv(p) for p in (tmp_path / "spark-scores-rejects.csv").glob("*.csv")),
    ):
        assert sorted(rejects["id"]) == bad_ids
        for row_id, reason in zip(rejects["id"], rejects["reason"], strict=True):
            assert f"'{want[row_id]}'" in reason, reason
            assert "in row" not in reason


# ---- CSV, folders and globs ----
def write_csv_parts(folder: Path) -> pd.DataFrame:
    """Three CSV files (one bad row among them); their rows, concatenated."""
    folder.mkdir()
    parts = []
    for i in range(3):
        part = pd.read_csv(make_csv(folder / f"part-{i}.csv", n=50, seed=i)).drop(columns="label")
        part.insert(0, "id", np.arange(50) + 100 * i)
        parts.append(part)
    parts[1].loc[7, "x1"] = "abc"  # not a number: refused by name
    for i, part in enumerate(parts):
        part.to_csv(folder / f"part-{i}.csv", index=False)
    (folder / "_SUCCESS").write_text("")
    return pd.concat(parts, ignore_index=True)


@pytest.mark.slow
def test_csv_folder_and_glob_with_pandas(shared: dict, tmp_path: Path) -> None:
    rows = write_csv_parts(tmp_path / "in")
    good = rows[rows["id"] != 107].reset_index(drop=True)
    good["x1"] = good["x1"].astype(float)
    expected = reference(shared, good)
    for given, out in (
        (tmp_path / "in", "folder.csv"),
        (tmp_path / "in" / "part-*.csv", "glob.csv"),
    ):
        run_cli(
            [
                "score",
                NAME,
                "--input",
                str(given),
                "--output",
                str(tmp_path / out),
                "--chunk-rows",
                "20",
            ]
        )
        scored = pd.read_csv(tmp_path / out)
        assert list(scored["id"]) == list(good["id"])
        assert_matches(scored, expected)
        rejects = pd.read_csv(tmp_path / out.replace(".csv", "-rejects.csv"))
        assert list(rejects["id"]) == [107]
        assert "column 'x1' must be numeric, got 'abc'" in rejects["reason"][0]


@pytest.mark.slow
def test_csv_with_spark(shared: dict, spark: Any, tmp_path: Path) -> None:
    rows = write_csv_parts(tmp_path / "in")
    result = score(
        load_config(),
        NAME,
        input_uri=str(tmp_path / "in"),
        output_uri=str(tmp_path / "out"),
        engine="spark",
    )
    assert (result.rows_scored, result.rows_rejected) == (149, 1)
    scored = pd.read_parquet(tmp_path / "out")
    scored["id"] = scored["id"].astype(int)  # Spark reads CSV as text: other columns stay text
    scored = scored.sort_values("id").reset_index(drop=True)
    good = rows[rows["id"] != 107].reset_index(drop=True)
    good["x1"] = good["x1"].astype(float)
    assert list(scored["id"]) == list(good["id"])
    assert scored["x1"].dtype == float  # the model's numeric columns as the contract read them
    rejects = pd.concat(pd.read_csv(p) for p in (tmp_path / "out-rejects.csv").glob("*.csv"))
    assert list(rejects["id"]) == [107]
    assert "column 'x1' must be numeric, got 'abc'" in rejects["reason"].iloc[0]
    assert_matches(scored, reference(shared, good))


# ---- S3 through boto3 (moto's standalone server) ----
S3_ENV = MOTO_S3_ENV


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """moto's S3 server on loopback; its endpoint URL."""
    with moto_s3(free_port(), tmp_path_factory.mktemp("moto") / "moto.log") as endpoint:
        yield endpoint


@pytest.mark.slow
def test_s3_parquet_and_csv_with_pandas(
    shared: dict, s3: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import boto3

    for key, value in {**S3_ENV, "MLFLOW_S3_ENDPOINT_URL": s3}.items():
        monkeypatch.setenv(key, value)
    client = boto3.client("s3", endpoint_url=s3)
    client.create_bucket(Bucket="lake")
    rows = write_csv_parts(tmp_path / "in")
    rows = rows[rows["id"] != 107].reset_index(drop=True)
    rows["x1"] = rows["x1"].astype(float)
    rows.to_parquet(tmp_path / "part.parquet", index=False, row_group_size=40)
    client.upload_file(str(tmp_path / "part.parquet"), "lake", "data/day=1/part.parquet")
    client.upload_file(str(tmp_path / "in" / "part-0.csv"), "lake", "csv/part-0.csv")
    expected = reference(shared, rows)

    run_cli(
        [
            "score",
            NAME,
            "--input",
            "s3://lake/data/",
            "--output",
            str(tmp_path / "s.parquet"),
            "--chunk-rows",
            "25",
        ]
    )
    assert_matches(pd.read_parquet(tmp_path / "s.parquet"), expected)
    assert pq.ParquetFile(tmp_path / "s.parquet").metadata.num_row_groups > 1  # written by chunk

    run_cli(["score", NAME, "--input", "s3://lake/csv/*.csv", "--output", "s3://lake/out/s.csv"])
    body = client.get_object(Bucket="lake", Key="out/s.csv")["Body"]
    assert_matches(pd.read_csv(body), expected.iloc[:50].reset_index(drop=True))


# ---- what the job refuses, in one line ----
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--input", "missing.parquet"], "does not exist; pass a CSV or Parquet file"),
        (["--input", "data.json"], "unknown format; pass .csv or .parquet"),
        (["--input", "nothing/*.parquet"], "matches no file"),
        (["--input", "ok.csv", "--output", "out.txt"], "end the file name with .parquet or .csv"),
        (["--input", "ok.csv", "--alias", "nope"], "has no alias 'nope'"),
        (["--input", "ok.csv", "--version", "7"], "cannot be downloaded"),
        (["--input", "no_color.csv"], "missing required column(s) ['color']"),
    ],
)
def test_bad_input_is_one_line(
    shared: dict,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    expected: str,
) -> None:
    Path("data.json").write_text("{}")
    make_csv(tmp_path / "ok.csv", n=5)
    pd.read_csv(tmp_path / "ok.csv").drop(columns="color").to_csv("no_color.csv", index=False)
    argv = ["score", NAME, "--output", "out.parquet", *args]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(argv)
    assert exit_info.value.code in (1, 2)
    err = capsys.readouterr().err.strip()
    assert expected in err
    assert "Traceback" not in err and len(err.splitlines()) <= 3
    assert not Path("out.parquet").exists() and not Path("out.txt").exists()


def test_unreadable_s3_key_is_one_line(
    shared: dict, s3: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in {**S3_ENV, "MLFLOW_S3_ENDPOINT_URL": s3}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ScoringInputError, match="cannot be read from .*NoSuchBucket"):
        score(load_config(), NAME, input_uri="s3://no-such-bucket/x.parquet", output_uri="o.csv")


# ---- the pandas engine's pieces: order, row groups, a failure in its I/O thread ----
def test_pandas_engine_keeps_order_in_pieces(shared: dict, tmp_path: Path) -> None:
    """Pieces of a quarter of --chunk-rows, read ahead and written behind by the I/O thread,
    come out in the input's order, one row group each, answered as pyfunc answers them."""
    base = pd.read_csv(make_csv(tmp_path / "rows.csv", n=1000, seed=5)).drop(columns="label")
    base.insert(0, "id", np.arange(len(base)))
    base["color"] = base["color"].astype(object)
    base.loc[[3, 640], "x2"] = np.inf  # refused: set aside, the rest keeps its order
    source = tmp_path / "rows.parquet"
    base.to_parquet(source, index=False, row_group_size=300)
    out = tmp_path / "scored.parquet"
    result = score(
        load_config(overrides=["experiment=scoring"]),
        NAME,
        version=shared["version"],
        input_uri=str(source),
        output_uri=str(out),
        chunk_rows=100,
    )
    assert (result.rows_scored, result.rows_rejected) == (998, 2)
    scored = pd.read_parquet(out)
    good = base.drop(index=[3, 640]).reset_index(drop=True)
    assert list(scored["id"]) == list(good["id"])
    assert_matches(scored, reference(shared, good))
    groups = pq.ParquetFile(out).metadata
    sizes = [groups.row_group(i).num_rows for i in range(groups.num_row_groups)]
    assert sum(sizes) == 998 and max(sizes) == 25  # pieces of 100 // 4 rows
    assert sorted(pd.read_csv(tmp_path / "scored-rejects.csv")["id"]) == [3, 640]


def test_a_failed_write_stops_the_job_and_leaves_nothing(shared: dict, tmp_path: Path) -> None:
    """A piece the I/O thread cannot append (a second file whose `id` is text where the first
    file's was a number) fails the job with the reason; no output, partial or whole, is left."""
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(2):
        part = pd.read_csv(make_csv(tmp_path / f"p{i}.csv", n=400, seed=i)).drop(columns="label")
        part.insert(0, "id", np.arange(400) + 1000 * i)
        if i == 1:
            part["id"] = part["id"].map(lambda v: f"row-{v}")
        part.to_parquet(folder / f"part-{i}.parquet", index=False)
    out = tmp_path / "out" / "scored.parquet"
    with pytest.raises(ScoringInputError, match="other column types than the first rows"):
        score(
            load_config(overrides=["experiment=scoring"]),
            NAME,
            version=shared["version"],
            input_uri=str(folder),
            output_uri=str(out),
            chunk_rows=200,
        )
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.slow
def test_spark_on_a_cluster_ships_the_verified_model_to_its_executors(
    shared: dict, spark: Any, tmp_path: Path
) -> None:
    """A ``local-cluster`` master runs executors in JVMs of their own, each with its own Python
    workers: the model folder reaches them as an archive Spark ships and unpacks, not as the
    driver's path."""
    frame = pd.read_csv(make_csv(tmp_path / "rows.csv", n=120, seed=11)).drop(columns="label")
    frame.insert(0, "id", np.arange(len(frame)))
    frame.to_parquet(tmp_path / "rows.parquet", index=False)
    out = tmp_path / "cluster-scores"
    # Spark's local cluster keeps its executors' folders under SPARK_HOME/work: a SPARK_HOME of
    # links to the installed pyspark's own files, with a work folder of the test's
    import pyspark

    home = tmp_path / "spark-home"
    home.mkdir()
    for entry in Path(pyspark.__file__).parent.iterdir():
        if entry.name != "work":
            (home / entry.name).symlink_to(entry)
    done = subprocess.run(
        [
            str(BIN / "mlops"),
            "score",
            NAME,
            "--version",
            shared["version"],
            "--input",
            str(tmp_path / "rows.parquet"),
            "--output",
            str(out),
            "--engine",
            "spark",
            "--spark-master",
            "local-cluster[1,1,1024]",
        ],
        env=server_env(
            shared["uri"],
            PYSPARK_PYTHON=sys.executable,
            SPARK_HOME=str(home),
            MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false",
        ),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    scored = pd.read_parquet(out).sort_values("id").reset_index(drop=True)
    assert list(scored["id"]) == list(frame["id"])
    assert_matches(scored, reference(shared, frame))
    assert set(scored["model_version"]) == {shared["version"]}
    # the executors' copy: unpacked from the shipped archive in their own work folder
    assert list((home / "work").rglob("model-*.zip/MLmodel")), done.stderr[-2000:]


@pytest.mark.slow
def test_spark_sets_doubtful_rows_aside_by_type_and_leaves_the_rest_to_the_contract(
    shared: dict, spark: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Typed Parquet: the rejects job sends only the rows Spark finds doubtful through the
    contract, once (integer columns scored as numbers, an over-long text refused with the
    contract's reason); a type the contract judges itself (booleans for a numeric column)
    sends every row through it. Input columns named like answer columns (in any letter case)
    or like ``reason`` are replaced; a name with a dot is kept."""
    from mlops.scoring import spark_engine
    from mlops.scoring.spark_engine import _doubt

    checks: list[list[str]] = []  # each check job the rejects file took (its columns)
    real_checker = spark_engine._checker

    def checker(model_ref: str, model_config: dict, text: bool, names: list[str]) -> Any:
        checks.append(names)
        return real_checker(model_ref, model_config, text, names)

    monkeypatch.setattr(spark_engine, "_checker", checker)

    base = pd.read_csv(make_csv(tmp_path / "rows.csv", n=60, seed=9)).drop(columns="label")
    base.insert(0, "id", np.arange(len(base)))
    base["x1"] = base["x1"].round().astype("int64")
    base["color"] = base["color"].astype(object)
    base.loc[5, "color"] = "z" * 200_000  # over MAX_FIELD_CHARS
    # an earlier output scored again: its answer columns are replaced, its other columns kept
    base["model_version"], base["Prediction"], base["note"] = "0", "stale", "kept"
    base["note.text"] = "a name with a dot"  # Spark reads a dot in a name as a struct's field
    base["reason"] = "the input's own"
    typed = tmp_path / "typed.parquet"
    base.to_parquet(typed, index=False)
    assert _doubt(load_contract(shared), spark.read.parquet(str(typed)).schema) is not None
    result = score_on_spark(shared, typed, tmp_path / "typed-out")
    assert (result.rows_scored, result.rows_rejected) == (59, 1)
    scored = pd.read_parquet(tmp_path / "typed-out").sort_values("id").reset_index(drop=True)
    good = base.drop(index=5).reset_index(drop=True)
    assert list(scored["id"]) == list(good["id"])
    assert_matches(scored, reference(shared, good.assign(x1=good["x1"].astype(float))))
    assert set(scored["model_name"]) == {NAME} and set(scored["model_version"]) == {"1"}
    assert set(scored["note"]) == {"kept"} and list(scored.columns).count("prediction") == 1
    assert set(scored["note.text"]) == {"a name with a dot"}
    assert "Prediction" not in scored.columns
    rejects = pd.concat(pd.read_csv(p) for p in (tmp_path / "typed-out-rejects.csv").glob("*.csv"))
    assert list(rejects.columns).count("reason") == 1 and list(rejects["id"]) == [5]
    assert "column 'color' has a value of 200000 characters" in rejects["reason"].iloc[0]
    assert set(rejects["note.text"]) == {"a name with a dot"}
    assert len(checks) == 1  # the doubtful rows held the refused one: no second check

    booleans = base.drop(index=5).assign(x1=lambda f: f["x1"] > 0)
    booleans.to_parquet(tmp_path / "bool.parquet", index=False)
    assert (
        _doubt(load_contract(shared), spark.read.parquet(str(tmp_path / "bool.parquet")).schema)
        is None
    )
    result = score_on_spark(shared, tmp_path / "bool.parquet", tmp_path / "bool-out")
    assert (result.rows_scored, result.rows_rejected) == (0, 59)


@pytest.mark.slow
def test_a_refusal_spark_did_not_foresee_still_reaches_the_rejects_file(
    shared: dict, spark: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rejects job checks only the rows Spark finds doubtful; should those miss a row the
    scoring job refused (here: a doubt condition that finds none), every row is checked again
    and the rejects file holds each refused row with its reason."""
    from pyspark.sql import functions as F

    from mlops.scoring import spark_engine

    base = pd.read_csv(make_csv(tmp_path / "rows.csv", n=40, seed=4)).drop(columns="label")
    base.insert(0, "id", np.arange(len(base)))
    base["color"] = base["color"].astype(object)
    base.loc[[3, 30], "x2"] = [np.inf, np.nan]
    base.to_parquet(tmp_path / "rows.parquet", index=False)
    monkeypatch.setattr(spark_engine, "_doubt", lambda contract, schema: F.lit(False))
    result = score_on_spark(shared, tmp_path / "rows.parquet", tmp_path / "out")
    assert (result.rows_scored, result.rows_rejected) == (38, 2)
    rejects = pd.concat(pd.read_csv(p) for p in (tmp_path / "out-rejects.csv").glob("*.csv"))
    assert sorted(rejects["id"]) == [3, 30]
    assert all("'x2'" in reason for reason in rejects["reason"])
    assert sorted(pd.read_parquet(tmp_path / "out")["id"]) == [
        i for i in range(40) if i not in (3, 30)
    ]

    # a check that finds fewer refused rows than the scoring job even over every row: the job
    # fails and says so, rather than report rejects it cannot show
    def lenient(model_ref: str, model_config: dict, text: bool, names: list[str]) -> Any:
        return lambda batches: (b.assign(_mlops_reason=None) for b in batches)

    monkeypatch.setattr(spark_engine, "_checker", lenient)
    with pytest.raises(ScoringFailed, match="refused 2 rows, but checking every row again found 0"):
        score_on_spark(shared, tmp_path / "rows.parquet", tmp_path / "out2")


@pytest.mark.slow
def test_a_model_whose_feature_name_holds_a_dot_scores_the_same_on_both_engines(
    shared: dict, spark: Any, tmp_path: Path
) -> None:
    """A feature named ``x.1`` (Spark would read it as field ``1`` of a struct ``x``): checked,
    refused by name and scored by the Spark engine as by the pandas engine."""
    csv = tmp_path / "train.csv"
    pd.read_csv(make_csv(tmp_path / "raw.csv", n=200, seed=3)).rename(columns={"x1": "x.1"}).to_csv(
        csv, index=False
    )
    config = load_config(
        overrides=[
            f"data.dataset={csv}",
            "data.target=label",
            "data.categorical=[color]",
            "registry.model_name=dotted",
            "experiment=scoring",
        ]
    )
    version = train(config, register=True).registered_version
    rows = pd.read_csv(csv).drop(columns="label")
    rows.insert(0, "id", np.arange(len(rows)))
    rows.loc[7, "x.1"] = np.nan
    rows.to_parquet(tmp_path / "rows.parquet", index=False)
    answers = {}
    for engine in ("spark", "pandas"):
        out = tmp_path / f"{engine}.parquet"
        result = score(
            config,
            "dotted",
            version=version,
            input_uri=str(tmp_path / "rows.parquet"),
            output_uri=str(out),
            engine=engine,
        )
        assert (result.rows_scored, result.rows_rejected) == (199, 1)
        answers[engine] = pd.read_parquet(out).sort_values("id").reset_index(drop=True)
        found = sorted((tmp_path / f"{engine}-rejects.csv").glob("**/*.csv")) or [
            tmp_path / f"{engine}-rejects.csv"
        ]
        rejects = pd.concat(pd.read_csv(p) for p in found)
        assert list(rejects["id"]) == [7] and "'x.1'" in rejects["reason"].iloc[0]
        assert "x.1" in rejects.columns
    spark_rows, pandas_rows = answers["spark"], answers["pandas"]
    assert list(spark_rows["id"]) == [i for i in range(200) if i != 7]
    assert list(spark_rows["prediction"]) == list(pandas_rows["prediction"])
    np.testing.assert_allclose(spark_rows["x.1"], pandas_rows["x.1"])
    np.testing.assert_allclose(spark_rows["proba_yes"], pandas_rows["proba_yes"], rtol=1e-9)


@pytest.mark.slow
def test_spark_input_it_cannot_read_and_a_failed_job_are_one_line_errors(
    shared: dict, spark: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file that is no Parquet, or whose column names differ only in letter case, is named
    with Spark's own reason (not a Java trace); a job that fails in the Python workers is a
    ScoringFailed with the worker's error, and nothing is left where the output belongs."""
    from mlops.scoring import spark_engine

    (tmp_path / "broken.parquet").write_text("not parquet")
    with pytest.raises(ScoringInputError, match=r"'.*broken.parquet' cannot be read by Spark \("):
        score_on_spark(shared, tmp_path / "broken.parquet", tmp_path / "o1")
    rows = pd.read_csv(make_csv(tmp_path / "rows.csv", n=20, seed=2)).drop(columns="label")
    rows.assign(Note="a", note="b").to_parquet(tmp_path / "case.parquet", index=False)
    with pytest.raises(ScoringInputError, match="COLUMN_ALREADY_EXISTS.*letter case"):
        score_on_spark(shared, tmp_path / "case.parquet", tmp_path / "o2")

    rows.to_parquet(tmp_path / "rows.parquet", index=False)

    def failing(*args: Any, **kwargs: Any) -> Any:
        def score(batches: Any) -> Any:
            raise RuntimeError("the model's library is missing on this worker")
            yield  # a generator, as mapInArrow wants

        return score

    monkeypatch.setattr(spark_engine, "_scorer", failing)
    with pytest.raises(ScoringFailed, match="library is missing on this worker") as failed:
        score_on_spark(shared, tmp_path / "rows.parquet", tmp_path / "o3")
    assert "\n" not in str(failed.value) and "nothing was written" in str(failed.value)
    assert not (tmp_path / "o3").exists()
    assert not list(tmp_path.glob(".o3*"))


def score_on_spark(store: dict, source: Path, output: Path) -> Any:
    """The module's model (its registered version) scores ``source`` with the Spark engine."""
    return score(
        load_config(overrides=["experiment=scoring"]),
        NAME,
        version=store["version"],
        input_uri=str(source),
        output_uri=str(output),
        engine="spark",
    )


def load_contract(store: dict) -> Any:
    return (
        mlflow.pyfunc.load_model(f"models:/{NAME}/{store['version']}")
        .unwrap_python_model()
        .contract
    )


@pytest.mark.slow
def test_rows_breaking_a_data_rule_are_rejects_with_the_rule_not_a_failed_job(
    shared: dict, spark: Any, tmp_path: Path
) -> None:
    """A model with data.rules (on_rule_violation: reject, the default) refuses a served row
    that breaks one; a batch job sets such rows aside with the rule's refusal as the reason
    and scores the rest, on both engines (before, the job failed)."""
    csv = make_csv(tmp_path / "train.csv", n=300, seed=2)
    config = load_config(
        overrides=[
            f"data.dataset={csv}",
            "data.target=label",
            "data.categorical=[color]",
            "registry.model_name=ruled-model",
            "experiment=scoring",
            "data.rules={columns: {x2: {max: 3.5}, color: {allowed: [red, green, blue]}}}",
        ]
    )
    version = train(config, register=True).registered_version
    rows = pd.read_csv(make_csv(tmp_path / "rows.csv", n=40, seed=8)).drop(columns="label")
    rows.insert(0, "id", np.arange(len(rows)))
    rows.loc[3, "x2"] = 9.0  # above the max
    rows.loc[11, "color"] = "purple"  # not allowed
    rows.loc[20, "x1"] = np.inf  # the contract's own refusal, beside the rules'
    source = tmp_path / "rows.parquet"
    rows.to_parquet(source, index=False)
    for engine, out in (("pandas", "p.parquet"), ("spark", "s-out")):
        result = score(
            config,
            "ruled-model",
            version=version,
            input_uri=str(source),
            output_uri=str(tmp_path / out),
            engine=engine,
            chunk_rows=40,
        )
        assert (result.rows_scored, result.rows_rejected) == (37, 3), engine
        scored = pd.read_parquet(tmp_path / out)
        assert sorted(scored["id"]) == [i for i in range(40) if i not in (3, 11, 20)]
        rejects_at = tmp_path / f"{Path(out).stem}-rejects.csv"
        rejects = (
            pd.read_csv(rejects_at)
            if rejects_at.is_file()
            else pd.concat(pd.read_csv(p) for p in rejects_at.glob("*.csv"))
        )
        reason = dict(zip(rejects["id"], rejects["reason"], strict=True))
        assert sorted(reason) == [3, 11, 20], engine
        assert "column 'x2' is above its max 3.5 (data.rules), got 9.0" in reason[3]
        assert "column 'color'" in reason[11] and "(data.rules)" in reason[11]
        assert "'x1'" in reason[20] and "in row" not in reason[3] + reason[11] + reason[20]
