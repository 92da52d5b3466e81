from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from mlops.config import load_config
from mlops.data import content_hash, prepare
from mlops.errors import DataValidationError
from mlops.lineage import log_split
from tests.helpers import make_csv


def cfg(*overrides: str):
    return load_config(overrides=list(overrides))


@pytest.mark.parametrize(
    "name,task,n_classes",
    [
        ("breast_cancer", "classification", 2),
        ("wine", "classification", 3),
        ("diabetes", "regression", None),
    ],
)
def test_sklearn_datasets_split_70_20_10(name: str, task: str, n_classes: int | None) -> None:
    split = prepare(cfg(f"data.dataset=sklearn:{name}"))
    n = split.n_rows
    assert split.task == task
    assert len(split.train) + len(split.validation) + len(split.test) == n
    assert abs(len(split.train) / n - 0.7) < 0.02
    assert abs(len(split.validation) / n - 0.2) < 0.02
    assert abs(len(split.test) / n - 0.1) < 0.02
    assert (len(split.classes) if split.classes else None) == n_classes


def test_split_is_stratified() -> None:
    split = prepare(cfg("data.dataset=sklearn:wine"))
    overall = pd.concat([split.train, split.validation, split.test])[split.target].value_counts(
        normalize=True
    )
    for part in (split.train, split.validation):
        share = part[split.target].value_counts(normalize=True)
        assert np.allclose(share.reindex(overall.index), overall, atol=0.05)


def test_split_is_reproducible_from_seed() -> None:
    a = prepare(cfg("seed=11"))
    b = prepare(cfg("seed=11"))
    c = prepare(cfg("seed=12"))
    pd.testing.assert_frame_equal(a.train, b.train)
    pd.testing.assert_frame_equal(a.test, b.test)
    assert not a.train.equals(c.train)
    assert a.content_hash == c.content_hash  # the hash is of the data, not of the split


def test_hash_changes_with_one_value() -> None:
    frame = pd.DataFrame({"a": [1.0, 2.0, 3.0], "b": ["x", "y", "z"]})
    changed = frame.copy()
    changed.loc[1, "a"] = 2.5
    assert content_hash(frame) == content_hash(frame.copy())
    assert content_hash(frame) != content_hash(changed)


def test_csv_with_declared_categorical(tmp_path: Path) -> None:
    path = make_csv(tmp_path / "d.csv")
    split = prepare(cfg(f"data.dataset={path}", "data.target=label", "data.categorical=[color]"))
    assert split.categorical_columns == ("color",)
    assert split.numeric_columns == ("x1", "x2")
    assert split.classes == ("no", "yes")
    assert split.source == str(path.resolve())


def test_duplicates_are_reported_and_dropped(tmp_path: Path) -> None:
    path = make_csv(tmp_path / "d.csv", n=100)
    frame = pd.read_csv(path)
    pd.concat([frame, frame.head(7)]).to_csv(path, index=False)
    split = prepare(cfg(f"data.dataset={path}", "data.target=label", "data.categorical=[color]"))
    assert split.n_duplicates_dropped == 7
    assert split.n_rows == 100


@pytest.mark.parametrize(
    "setup,overrides,message",
    [
        (
            None,
            ["data.dataset=missing.csv", "data.target=label"],
            r"file 'missing.csv' not found.*sklearn:breast_cancer",
        ),
        ("empty", ["data.target=label"], r"is empty; give a CSV with a header row"),
        ("header_only", ["data.target=label"], r"has no rows"),
        (
            "ok",
            ["data.target=nope", "data.categorical=[color]"],
            r"data.target: column 'nope' not in .*pick one of: x1, x2, color, label",
        ),
        ("ok", [], r"data.target: not set .*--target COLUMN"),
        (
            "ok",
            ["data.target=label"],
            r"column 'color' is not numeric \(e.g. '(red|green|blue)'\); declare it categorical "
            r"with --set data.categorical=\[color\]",
        ),
        (
            "all_null",
            ["data.target=label", "data.categorical=[color]"],
            r"column 'empty' is entirely empty",
        ),
        (
            "ok",
            ["data.target=label", "data.categorical=[colour]"],
            r"data.categorical names column\(s\) \['colour'\] not in the data",
        ),
        (
            None,
            ["data.dataset=sklearn:mnist"],
            r"unknown scikit-learn dataset 'sklearn:mnist'; use one of",
        ),
        ("one_class", ["data.target=label", "data.categorical=[color]"], r"single class 'yes'"),
        (
            "ok",
            ["data.target=label", "data.categorical=[color]", "data.task=regression"],
            r"target column 'label' is not numeric but data.task is regression",
        ),
    ],
)
def test_validation_errors_name_the_problem(
    tmp_path: Path, setup: str | None, overrides: list[str], message: str
) -> None:
    path = tmp_path / "d.csv"
    if setup == "empty":
        path.write_text("")
    elif setup == "header_only":
        path.write_text("x1,x2,label\n")
    elif setup == "ok":
        make_csv(path)
    elif setup == "all_null":
        make_csv(path, empty=np.nan)
    elif setup == "one_class":
        make_csv(path)
        frame = pd.read_csv(path)
        frame["label"] = "yes"
        frame.to_csv(path, index=False)
    if setup:
        overrides = [f"data.dataset={path}", *overrides]
    with pytest.raises(DataValidationError, match=message):
        prepare(cfg(*overrides))


def test_rare_class_cannot_be_stratified(tmp_path: Path) -> None:
    path = make_csv(tmp_path / "d.csv")
    frame = pd.read_csv(path)
    frame.loc[0, "label"] = "maybe"
    frame.to_csv(path, index=False)
    with pytest.raises(
        DataValidationError, match=r"class\(es\) \['maybe'\] have fewer than 3 rows"
    ):
        prepare(cfg(f"data.dataset={path}", "data.target=label", "data.categorical=[color]"))


def test_log_split_records_dataset_inputs_and_hash() -> None:
    split = prepare(cfg("data.dataset=sklearn:wine"))
    with mlflow.start_run() as run:
        log_split(split, with_files=True)
    client = mlflow.MlflowClient()
    stored = client.get_run(run.info.run_id)
    contexts = {}
    for dataset_input in stored.inputs.dataset_inputs:
        tags = {t.key: t.value for t in dataset_input.tags}
        contexts[tags["mlflow.data.context"]] = (dataset_input.dataset, tags["mlops.data_hash"])
    assert set(contexts) == {"train", "validation", "test"}
    assert contexts["train"][0].name == "wine-train"
    assert all(h == split.content_hash for _, h in contexts.values())
    assert stored.data.tags["mlops.data_hash"] == split.content_hash
    assert stored.data.params["data_hash"] == split.content_hash
    assert stored.data.metrics["data_train_rows"] == len(split.train)
    files = {a.path for a in client.list_artifacts(run.info.run_id, "data")}
    assert files == {"data/train.csv", "data/validation.csv", "data/test.csv"}


@pytest.mark.postgres
def test_workers_logging_the_same_split_at_once_all_succeed(postgres_url: str) -> None:
    """Tuning workers start together and log one dataset: MLflow's check-then-insert races there."""
    import threading

    from tests.conftest import using_store

    split = prepare(load_config())
    errors: list[BaseException] = []
    with using_store(postgres_url):
        experiment = mlflow.create_experiment("race")
        barrier = threading.Barrier(4)
        run_ids: list[str] = []

        def worker() -> None:
            try:
                with mlflow.start_run(
                    experiment_id=experiment
                ) as run:  # active runs are per thread
                    run_ids.append(run.info.run_id)
                    barrier.wait(timeout=30)
                    log_split(split)
            except BaseException as exc:  # noqa: BLE001 - asserted below
                errors.append(exc)

        threads = [threading.Thread(target=worker) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors, errors[0]
        client = mlflow.MlflowClient()
        for run_id in run_ids:
            inputs = client.get_run(run_id).inputs.dataset_inputs
            contexts = sorted(
                {t.key: t.value for t in i.tags}["mlflow.data.context"] for i in inputs
            )
            assert contexts == ["test", "train", "validation"]


def test_a_dataset_logged_by_another_worker_meanwhile_is_retried_other_errors_are_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """MLflow's store reports the unique-key race as BAD_REQUEST: retried; anything else raised."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import BAD_REQUEST, RESOURCE_DOES_NOT_EXIST

    from mlops import lineage

    calls: list[str] = []

    def conflict_once(dataset: object, context: str, tags: dict) -> None:
        calls.append(context)
        if len(calls) == 1:
            raise MlflowException("UNIQUE constraint failed: datasets", error_code=BAD_REQUEST)

    monkeypatch.setattr(mlflow, "log_input", conflict_once)
    lineage._log_input(object(), "train", "h")
    assert calls == ["train", "train"]

    def refused(dataset: object, context: str, tags: dict) -> None:
        calls.append(context)
        raise MlflowException("no such run", error_code=RESOURCE_DOES_NOT_EXIST)

    calls.clear()
    monkeypatch.setattr(mlflow, "log_input", refused)
    with pytest.raises(MlflowException, match="no such run"):
        lineage._log_input(object(), "train", "h")
    assert calls == ["train"]


def _wide_csv(path: Path, n_columns: int, n_rows: int) -> Path:
    """A CSV of ``n_columns`` numeric columns, the last one the target ``label`` (0/1)."""
    header = ",".join([*(f"c{i}" for i in range(n_columns - 1)), "label"])
    rng = np.random.default_rng(0)
    rows = [
        ",".join([*(f"{v:.3f}" for v in rng.normal(size=n_columns - 1)), str(r % 2)])
        for r in range(n_rows)
    ]
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def test_a_million_column_header_is_refused_fast_without_reading_the_file(tmp_path: Path) -> None:
    import time
    import tracemalloc

    path = tmp_path / "wide.csv"
    header = ",".join(f"c{i}" for i in range(1_000_000))
    row = ",".join("0" for _ in range(1_000_000))
    path.write_text(f"{header}\n{row}\n{row}\n")
    tracemalloc.start()
    start = time.monotonic()
    try:
        with pytest.raises(DataValidationError) as info:
            prepare(cfg(f"data.dataset={path}", "data.target=c0"))
        elapsed = time.monotonic() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    message = str(info.value)
    assert "1,000,000 columns" in message
    assert "data.max_columns (10,000)" in message
    assert "--set data.max_columns=1000000" in message
    assert elapsed < 2.0, elapsed
    assert peak < 8 * 2**20, peak  # the header is read in pieces, not the file (11 MB) whole


def test_a_file_at_the_column_limit_loads_one_column_more_is_refused(tmp_path: Path) -> None:
    at_limit = _wide_csv(tmp_path / "at.csv", 50, 60)
    split = prepare(cfg(f"data.dataset={at_limit}", "data.target=label", "data.max_columns=50"))
    assert len(split.feature_columns) == 49 and split.n_rows == 60
    over = _wide_csv(tmp_path / "over.csv", 51, 60)
    with pytest.raises(
        DataValidationError,
        match=r"has 51 columns in its header, more than data.max_columns \(50\).*"
        r"--set data.max_columns=51",
    ):
        prepare(cfg(f"data.dataset={over}", "data.target=label", "data.max_columns=50"))


def test_a_file_just_under_the_default_column_limit_loads(tmp_path: Path) -> None:
    from mlops.data import load_source

    path = _wide_csv(tmp_path / "wide.csv", 9_999, 3)
    frame, target, _ = load_source(cfg(f"data.dataset={path}", "data.target=label").data)
    assert frame.shape == (3, 9_999) and target == "label"


@pytest.mark.parametrize(
    "content,expected",
    [
        (b"a,b,c\n1,2,3\n", (3, True)),
        (b"a,b,c", (3, True)),  # no line end
        (b"a,b,c\r\n1,2,3\r\n", (3, True)),
        (b'"a,1","b\nstill b",c\n1,2,3\n', (3, True)),  # commas and line ends inside quotes
        (b'"say ""x, y""",b\n1,2\n', (2, True)),  # a doubled quote inside a quoted name
        (b"\n\na,b\n1,2\n", (2, True)),  # blank lines before the header, as pandas skips them
        (b"a,b,\n1,2,3\n", (3, True)),  # a trailing comma: pandas names the third column too
        (b"", (0, True)),
        (b"a," * 100 + b"z\n", (101, True)),
    ],
)
def test_header_width_counts_the_header_columns(
    tmp_path: Path, content: bytes, expected: tuple[int, bool]
) -> None:
    from mlops.data import header_width

    path = tmp_path / "h.csv"
    path.write_bytes(content)
    assert header_width(path) == expected
    if content:
        assert header_width(path) == (len(pd.read_csv(path).columns), True)


def test_header_width_stops_at_its_limit_with_a_lower_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlops import data
    from mlops.data import header_width

    path = tmp_path / "h.csv"
    path.write_bytes(b"ab," * 1000 + b"z\n1\n")
    assert header_width(path, limit=30) == (11, False)  # 10 commas in 30 bytes
    monkeypatch.setattr(data, "HEADER_SCAN_BYTES", 30)
    with pytest.raises(DataValidationError, match=r"at least 11 columns.*max_columns \(5\)"):
        prepare(cfg(f"data.dataset={path}", "data.target=z", "data.max_columns=5"))


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("a,a,y\n1,2,0\n3,4,1\n", "names column 'a' twice in its header"),
        ("a,b,y\n1,inf,0\n3,4,1\n", "column 'b' holds 1 infinite value(s) (first in data row 0)"),
        ("a,b,y\n1,-inf,0\n3,4,1\n", "column 'b' holds 1 infinite value(s)"),
        ("a,b,y\n1,'" + "z" * 5_000_000 + "',0\n3,4,1\n", "is not numeric (e.g. \"'zzz"),
    ],
    ids=["duplicated header", "inf", "-inf", "a 5 MB text in a numeric column"],
)
def test_training_data_that_would_mislead_or_crash_is_refused_by_name(
    tmp_path: Path, text: str, says: str
) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(DataValidationError) as err:
        prepare(load_config(overrides=[f"data.dataset={path}", "data.target=y"]))
    assert says in str(err.value)
    assert len(str(err.value)) < 400  # never the whole value back
