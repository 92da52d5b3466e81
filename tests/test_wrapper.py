"""The pyfunc wrapper in-process: NumPy preprocessing equals scikit-learn's, errors are 400s."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException

from mlops.config import load_config
from mlops.training import train
from tests.helpers import make_csv


@pytest.fixture
def trained(tmp_path: Path):
    csv = make_csv(tmp_path / "d.csv", n=200)
    frame = pd.read_csv(csv)
    frame.loc[::7, "x1"] = np.nan
    frame.loc[::9, "color"] = np.nan
    frame.to_csv(csv, index=False)
    config = load_config(
        overrides=[
            f"data.dataset={csv}",
            "data.target=label",
            "data.categorical=[color]",
            "serving.max_rows=100",
        ]
    )
    result = train(config)
    model = mlflow.pyfunc.load_model(result.model_uri)
    return model, model._model_impl.python_model, frame


def test_numpy_preprocessing_matches_scikit_learn(trained) -> None:
    model, wrapper, frame = trained
    assert wrapper.compiled is not None
    X = frame[["x1", "x2", "color"]].head(100).copy()
    X.loc[3, "color"] = "purple"  # unseen category
    X["color"] = X["color"].astype(object).where(X["color"].notna(), np.nan)
    assert X["color"].isna().sum() > 2
    expected = wrapper.pipeline.predict_proba(X)
    numeric, categorical = wrapper.contract.from_frame(X.assign(x1=X["x1"]))
    assert categorical is not None
    categorical[np.flatnonzero(X["color"].isna())[0], 0] = None  # None and NaN are both null
    got = wrapper.estimator.predict_proba(wrapper.compiled.transform(numeric, categorical))
    assert np.allclose(got, expected, rtol=1e-10, atol=1e-12)
    out = model.predict(X)
    classes = np.array(["no", "yes"])
    assert out["prediction"].tolist() == classes[expected.argmax(axis=1)].tolist()


def test_answer_columns_of_every_length_name_the_model(trained) -> None:
    """The model's name and version are one kept column sliced to each answer's length: right
    for a batch longer or shorter than the last, and read-only (no caller can change them)."""
    _, wrapper, frame = trained
    X = frame[["x1", "x2", "color"]]
    for n in (3, 100, 2, 100):
        numeric, categorical = wrapper.contract.from_frame(X.head(n))
        out = wrapper.score(numeric, categorical)
        assert len(out["model_version"]) == len(out["prediction"]) == n
        assert set(out["model_version"]) == {wrapper.model_version}
        assert set(out["model_name"]) == {wrapper.model_name}
        assert list(wrapper.classes[out["__class__"]]) == list(out["prediction"])
        with pytest.raises(ValueError, match="read-only"):
            out["model_version"][0] = "tampered"


def test_nulls_allowed_only_where_training_had_them(trained) -> None:
    model, wrapper, frame = trained
    row = frame[["x1", "x2", "color"]].head(1).copy()
    model.predict(row.assign(x1=np.nan, color=None))  # both had nulls in training
    with pytest.raises(MlflowException, match=r"column 'x2' is null in row 0"):
        model.predict(row.assign(x2=np.nan))


def test_row_limit_and_missing_columns(trained) -> None:
    model, _, frame = trained
    X = frame[["x1", "x2", "color"]]
    with pytest.raises(MlflowException, match=r"150 rows, more than the limit of 100"):
        model.predict(X.head(150))
    # in-process, MLflow's own schema enforcement answers first; it names the column too
    with pytest.raises(MlflowException, match=r"missing inputs \['x2'\]") as info:
        model.predict(X.head(2).drop(columns="x2"))
    assert info.value.get_http_status_code() == 400


def test_model_config_overrides_row_limit(trained, tmp_path: Path) -> None:
    model, _, frame = trained
    uri = model.metadata.get_model_info().model_uri
    relaxed = mlflow.pyfunc.load_model(
        uri, model_config={"max_rows": 500, "impute_missing": "true"}
    )
    wrapper = relaxed.unwrap_python_model()
    assert wrapper.contract.max_rows == 500
    out = relaxed.predict(frame[["x1", "x2", "color"]].head(150).assign(x2=np.nan))
    assert len(out) == 150


def test_the_log_url_password_stays_out_of_the_model_and_the_default_log_follows_the_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No password in the model's files; with no URL, a server logs beside its tracking store."""
    import json

    from mlops.serving import adapter

    csv = make_csv(tmp_path / "d.csv", n=120)
    base = [f"data.dataset={csv}", "data.target=label", "data.categorical=[color]"]
    secret = load_config(
        overrides=[*base, "monitoring.log_url=postgresql+psycopg://mon:LOGPW@db.invalid/log"]
    )
    result = train(secret)
    model_dir = Path(
        mlflow.artifacts.download_artifacts(result.model_uri, dst_path=str(tmp_path / "m"))
    )
    for file in model_dir.rglob("*"):
        if file.is_file() and file.suffix in (".json", ".yaml", ".txt", ""):
            assert "LOGPW" not in file.read_text(errors="ignore"), file
    meta = json.loads((model_dir / "artifacts" / "metadata.json").read_text())
    assert meta["serving"]["monitoring_url"] == "postgresql+psycopg://mon@db.invalid/log"

    plain = train(load_config(overrides=base))
    monkeypatch.setenv(adapter.SERVER_MODEL_PATH_ENV, "in a server")
    monkeypatch.setenv("MLOPS_FAST_SERVING", "0")
    served = mlflow.pyfunc.load_model(plain.model_uri, model_config={"monitoring": True})
    wrapper = served.unwrap_python_model()
    try:
        tracking_folder = Path(mlflow.get_tracking_uri().removeprefix("sqlite:///")).parent
        assert wrapper.monitor.url == f"sqlite:///{tracking_folder / 'predictions.db'}"
    finally:
        wrapper.monitor.close()


def test_answer_many_scores_several_requests_in_one_call_and_logs_each_under_its_id(
    trained, tmp_path: Path
) -> None:
    """A shadow's batch: the same predictions as one request at a time, each request logged
    under its own id with its own rows; a failing call falls back to one request at a time."""
    import sqlalchemy as sa

    _, wrapper, frame = trained
    X = frame[["x1", "x2", "color"]]
    parts = [
        (f"r{i}", *wrapper.contract.from_frame(X.iloc[start : start + rows].reset_index(drop=True)))
        for i, (start, rows) in enumerate([(0, 1), (1, 3), (4, 2)])
    ]
    one_by_one = [wrapper.score(n, c)["prediction"].tolist() for _, n, c in parts]
    url = f"sqlite:///{tmp_path / 'log.db'}"
    wrapper.enable_monitoring(url)
    try:
        assert wrapper.answer_many(parts) == [True, True, True]
        calls = []
        real = wrapper.score

        def failing_once(numeric, categorical):  # the batch call fails, single ones answer
            calls.append(numeric.shape[0])
            if len(calls) == 1:
                raise RuntimeError("boom")
            return real(numeric, categorical)

        wrapper.score = failing_once
        assert wrapper.answer_many([(f"s{i}", n, c) for i, (_, n, c) in enumerate(parts)]) == [
            True,
            True,
            True,
        ]
        assert calls == [6, 1, 3, 2]
        del wrapper.score
        assert wrapper.monitor.flush(10)
    finally:
        wrapper.monitor.close()
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        logged = conn.execute(
            sa.text(
                "SELECT request_id, row, prediction FROM mlops_predictions ORDER BY request_id, row"
            )
        ).all()
    by_request: dict[str, list[str]] = {}
    for request_id, _, prediction in logged:
        by_request.setdefault(request_id, []).append(str(prediction))
    for prefix in ("r", "s"):
        got = [by_request[f"{prefix}{i}"] for i in range(3)]
        assert got == [[str(p) for p in expected] for expected in one_by_one]


@pytest.mark.parametrize(
    "columns",
    [
        {
            "prediction": np.array(["no", 'say "yes"', "50%", "ünï"], dtype=object),
            "proba_no": np.array([0.1, np.nan, 1e-300, np.inf]),
            "n": np.array([1, -2, 3, 2**40]),
            "flag": np.array([True, False, True, False]),
            "model_version": np.array(["1", "1", "1", "1"], dtype=object),
        },
        {"a%s": np.array([0.5]), 'b"': np.array([None], dtype=object)},
        {"prediction": np.array([], dtype=float), "model_name": np.array([], dtype=object)},
        {"weird": np.array([["not", "hashable"], ["x"]], dtype=object)},
    ],
    ids=["mixed", "odd-names", "empty", "unhashable"],
)
def test_records_json_is_the_text_json_dumps_writes(columns) -> None:
    from mlops.serving.wrapper import _jsonable, records_json

    pairs = list(columns.items())
    lists = [(name, _jsonable(values)) for name, values in pairs]
    n = len(lists[0][1])
    expected = json.dumps(
        {"predictions": [{name: values[i] for name, values in lists} for i in range(n)]}
    )
    assert records_json(pairs) == expected
    assert "NaN" not in expected and "Infinity" not in expected  # non-finite floats are null
