"""Serving registered models with a real `mlflow models serve` process over HTTP."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from mlops.config import load_config
from mlops.training import train
from tests.conftest import free_port, using_store
from tests.helpers import make_csv
from tests.servers import BIN, get, models_serve, post, running, server_env

pytestmark = pytest.mark.slow
FEATURES = ["x1", "x2", "color"]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, template_store: Path) -> Iterator[dict]:
    """One store with two registered models at @production: hist_gb and keras_mlp."""
    import shutil

    root = tmp_path_factory.mktemp("serving")
    shutil.copy(template_store, root / "mlflow.db")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    csv = make_csv(root / "data.csv", n=300)
    frame = pd.read_csv(csv)
    frame.loc[::10, "x2"] = np.nan  # x2 had missing values in training: nulls are allowed there
    frame.to_csv(csv, index=False)
    out = {"uri": uri, "root": root, "csv": csv}
    with using_store(uri):
        for name, family, extra in [
            ("svc-sk", "hist_gb", ["model.params.max_iter=30"]),
            ("svc-keras", "keras_mlp", ["model.params.epochs=5", "model.params.hidden_units=[8]"]),
        ]:
            config = load_config(
                overrides=[
                    f"data.dataset={csv}",
                    "data.target=label",
                    "data.categorical=[color]",
                    f"model.family={family}",
                    f"registry.model_name={name}",
                    "serving.max_rows=50",
                    f"experiment=exp-{name}",
                    *extra,
                ]
            )
            result = train(config, register=True)
            mlflow.MlflowClient().set_registered_model_alias(
                name, "production", result.registered_version
            )
            out[name] = result
    yield out


@pytest.fixture(scope="module")
def sk_server(store: dict) -> Iterator[str]:
    port = free_port()
    cmd = models_serve("models:/svc-sk@production", port)
    with running(cmd, server_env(store["uri"]), port, store["root"] / "sk.log") as base:
        yield base


@pytest.fixture(scope="module")
def keras_server(store: dict) -> Iterator[str]:
    """Started through `mlops serve` (MLflow's scoring app under uvicorn), with a row limit."""
    port = free_port()
    cmd = [
        str(BIN / "mlops"),
        "serve",
        "svc-keras",
        "--alias",
        "production",
        "--port",
        str(port),
        "--max-rows",
        "20",
    ]
    with running(cmd, server_env(store["uri"]), port, store["root"] / "keras.log") as base:
        yield base


def expected(store: dict, name: str, frame: pd.DataFrame) -> pd.DataFrame:
    """What the registered model answers in-process (through MLflow's own pyfunc path)."""
    mlflow.set_tracking_uri(store["uri"])
    mlflow.set_registry_uri(store["uri"])
    return mlflow.pyfunc.load_model(f"models:/{name}@production").predict(frame)


def rows(store: dict, n: int = 3) -> pd.DataFrame:
    frame = pd.read_csv(store["csv"])[FEATURES].dropna().head(n).reset_index(drop=True)
    return frame


def payloads(frame: pd.DataFrame) -> dict[str, tuple[object, str]]:
    records = json.loads(frame.to_json(orient="records"))
    return {
        "dataframe_split": (
            {"dataframe_split": json.loads(frame.to_json(orient="split"))},
            "application/json",
        ),
        "dataframe_records": ({"dataframe_records": records}, "application/json"),
        "instances": ({"instances": records}, "application/json"),
        "inputs": (
            {"inputs": {c: frame[c].tolist() for c in frame.columns}},
            "application/json; charset=utf-8",
        ),
        "csv": (frame.to_csv(index=False), "text/csv"),
    }


def test_health_routes(sk_server: str) -> None:
    assert get(sk_server, "/ping")[0] == 200
    assert get(sk_server, "/health")[0] == 200
    status, body = get(sk_server, "/version")
    assert status == 200 and body == mlflow.__version__


def test_every_input_format_gives_the_same_labelled_predictions(
    sk_server: str, store: dict
) -> None:
    frame = rows(store)
    want = expected(store, "svc-sk", frame)
    for fmt, (body, content_type) in payloads(frame).items():
        status, answer = post(sk_server, body, content_type)
        assert status == 200, (fmt, answer)
        got = pd.DataFrame(answer["predictions"])
        assert list(got.columns) == [
            "prediction",
            "proba_no",
            "proba_yes",
            "model_name",
            "model_version",
        ], fmt
        assert got["prediction"].tolist() == want["prediction"].tolist(), fmt
        assert np.allclose(got["proba_yes"], want["proba_yes"]), fmt
        assert set(got["model_name"]) == {"svc-sk"} and set(got["model_version"]) == {"1"}, fmt


def test_nulls_extra_columns_and_unknown_categories(sk_server: str, store: dict) -> None:
    frame = rows(store, 2)
    frame.loc[0, "x2"] = None  # x2 had nulls in training: imputed
    frame["comment"] = "ignored"  # extra columns are ignored
    frame.loc[1, "color"] = "purple"  # unseen category: encoded as none of the known ones
    status, answer = post(
        sk_server, {"dataframe_records": json.loads(frame.to_json(orient="records"))}
    )
    assert status == 200, answer
    assert len(answer["predictions"]) == 2


def _bad_requests(store: dict) -> list[tuple[str, object, str, str]]:
    frame = rows(store, 2)
    split = json.loads(frame.to_json(orient="split"))
    records = json.loads(frame.to_json(orient="records"))
    no_x1 = [{k: v for k, v in r.items() if k != "x1"} for r in records]
    text_x1 = [dict(records[0], x1="tall")]
    null_x1 = [dict(records[0], x1=None)]
    many = [records[0]] * 51
    return [
        (
            "missing column",
            {"dataframe_records": no_x1},
            "application/json",
            "missing required column(s) ['x1']",
        ),
        (
            "string in numeric",
            {"dataframe_records": text_x1},
            "application/json",
            "column 'x1' must be numeric, got 'tall'",
        ),
        (
            "null not allowed",
            {"dataframe_records": null_x1},
            "application/json",
            "column 'x1' is null in row 0",
        ),
        ("empty body", b"", "application/json", "not valid JSON"),
        ("empty object", {}, "application/json", "exactly one of the keys"),
        (
            "zero rows",
            {"dataframe_split": dict(split, data=[])},
            "application/json",
            "input has no rows",
        ),
        ("zero records", {"dataframe_records": []}, "application/json", "input has no rows"),
        (
            "malformed json",
            b'{"dataframe_split": {"columns": [',
            "application/json",
            "not valid JSON",
        ),
        ("unknown format", {"dataframe": records}, "application/json", "got ['dataframe']"),
        (
            "too many rows",
            {"dataframe_records": many},
            "application/json",
            "51 rows, more than the limit of 50",
        ),
        (
            "ragged row",
            {"dataframe_split": dict(split, data=[split["data"][0][:2]])},
            "application/json",
            "row 0 has 2 values",
        ),
        ("csv header only", "x1,x2,color\n", "text/csv", "input has no rows"),
        (
            "csv text in numeric",
            "x1,x2,color\nabc,1.0,red\n",
            "text/csv",
            "column 'x1' must be numeric, got 'abc'",
        ),
        # issue 12: the probe's cases (all of them: tests/test_hostile_input.py)
        (
            "infinity",
            b'{"dataframe_records": [{"x1": Infinity, "x2": 1.0, "color": "red"}]}',
            "application/json",
            "column 'x1' must be a finite number",
        ),
        (
            "numeric string",
            {"dataframe_records": [dict(records[0], x2="1.5")]},
            "application/json",
            "column 'x2' must be numeric, got the string '1.5'",
        ),
        (
            "repeated column",
            {"dataframe_split": dict(split, columns=["x1", "x1", "color"])},
            "application/json",
            "column 'x1' appears more than once",
        ),
        (
            "rows without names",
            {"inputs": split["data"]},
            "application/json",
            "'inputs' rows have no column names",
        ),
        (
            "a list in a cell",
            {"inputs": {c: [[v] * 1000] for c, v in records[0].items()}},
            "application/json",
            "column 'x1' holds a list in row 0",
        ),
    ]


def test_bad_input_gets_a_400_that_names_the_problem_and_serving_goes_on(
    sk_server: str, store: dict
) -> None:
    good = {"dataframe_records": json.loads(rows(store, 1).to_json(orient="records"))}
    for name, body, content_type, message in _bad_requests(store):
        status, answer = post(sk_server, body, content_type)
        assert status == 400, (name, status, answer)
        assert answer["error_code"] == "INVALID_PARAMETER_VALUE", name
        assert message in answer["message"], (name, answer["message"])
        status, answer = post(sk_server, good)
        assert status == 200, f"server stopped serving after {name}: {answer}"


def test_unsupported_content_type_is_415(sk_server: str) -> None:
    status, _ = post(sk_server, "x", "text/plain")
    assert status == 415
    status, _ = post(sk_server, "x", "application/json; charset=latin-1")
    assert status == 415
    # content types are matched without regard to case, on both paths
    body = {"dataframe_records": [{"x1": 0.1, "x2": 0.2, "color": "red"}]}
    assert post(sk_server, body, "APPLICATION/JSON")[0] == 200


def test_keras_model_served_through_mlops_serve(keras_server: str, store: dict) -> None:
    frame = rows(store, 4)
    want = expected(store, "svc-keras", frame)
    for fmt, (body, content_type) in payloads(frame).items():
        status, answer = post(keras_server, body, content_type)
        assert status == 200, (fmt, answer)
        got = pd.DataFrame(answer["predictions"])
        assert got["prediction"].tolist() == want["prediction"].tolist(), fmt
        assert np.allclose(got["proba_no"], want["proba_no"], atol=1e-5), fmt
        assert set(got["model_name"]) == {"svc-keras"} and set(got["model_version"]) == {"1"}
    # --max-rows 20 given to `mlops serve` overrides the 50 logged with the model
    many = {"dataframe_records": json.loads(rows(store, 1).to_json(orient="records")) * 21}
    status, answer = post(keras_server, many)
    assert status == 400 and "more than the limit of 20" in answer["message"]


def test_mlflow_path_without_the_fast_path_agrees(store: dict, sk_server: str) -> None:
    """MLOPS_FAST_SERVING=0 serves through MLflow's own parsing: same answers, the same 400s."""
    port = free_port()
    cmd = [
        str(BIN / "mlflow"),
        "models",
        "serve",
        "-m",
        "models:/svc-sk@production",
        "--env-manager",
        "local",
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
    ]
    frame = rows(store)
    want = expected(store, "svc-sk", frame)
    with running(
        cmd, server_env(store["uri"], MLOPS_FAST_SERVING="0"), port, store["root"] / "slow.log"
    ) as base:
        for fmt, (body, content_type) in payloads(frame).items():
            status, answer = post(base, body, content_type)
            assert status == 200, (fmt, answer)
            got = pd.DataFrame(answer["predictions"])
            assert got["prediction"].tolist() == want["prediction"].tolist()
            assert set(got["model_version"]) == {"1"}
        records = json.loads(frame.to_json(orient="records"))
        status, answer = post(base, {"dataframe_records": [dict(records[0], x1="tall")]})
        assert status == 400 and "x1" in answer["message"]
        status, answer = post(
            base, {"dataframe_records": [{k: v for k, v in records[0].items() if k != "x2"}]}
        )
        assert status == 400 and "x2" in answer["message"]
        for name, body, content_type, message in _bad_requests(store):
            status, answer = post(base, body, content_type)
            assert status == 400 and message in answer["message"], (name, status, answer)
            assert (status, answer) == post(sk_server, body, content_type), name


def test_mlflow_models_predict_cli(store: dict, tmp_path: Path) -> None:
    frame = rows(store)
    src = tmp_path / "in.json"
    src.write_text(json.dumps({"dataframe_split": json.loads(frame.to_json(orient="split"))}))
    dst = tmp_path / "out.json"
    proc = subprocess.run(
        [
            str(BIN / "mlflow"),
            "models",
            "predict",
            "-m",
            "models:/svc-sk@production",
            "-i",
            str(src),
            "-o",
            str(dst),
            "--env-manager",
            "local",
            "-t",
            "json",
        ],
        env=server_env(store["uri"]),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = pd.DataFrame(json.loads(dst.read_text())["predictions"])
    want = expected(store, "svc-sk", frame)
    assert got["prediction"].tolist() == want["prediction"].tolist()


def test_registered_model_shows_signature_and_input_example(store: dict) -> None:
    mlflow.set_tracking_uri(store["uri"])
    mlflow.set_registry_uri(store["uri"])
    model = mlflow.pyfunc.load_model("models:/svc-sk@production")
    inputs = {c.name: c.type.name for c in model.metadata.signature.inputs.inputs}
    assert inputs == {"x1": "double", "x2": "double", "color": "string"}
    outputs = [c.name for c in model.metadata.signature.outputs.inputs]
    assert outputs == ["prediction", "proba_no", "proba_yes", "model_name", "model_version"]
    assert model.metadata.saved_input_example_info["type"] == "dataframe"
