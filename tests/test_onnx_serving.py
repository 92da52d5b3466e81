"""Serving a registered version through its ONNX export (serving.runtime auto | native | onnx).

The export is made here the way ``mlops export --format onnx`` is specified to make it (graph
inputs named as the columns, outputs ``label``/``probabilities``, files under ``onnx/<variant>/``
on the version's run, the tag ``mlops.onnx.<variant>.sha256``), so these tests stand on their own.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlparse

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException

from mlops.config import load_config
from mlops.serving.onnx_runtime import export_path, sha256_tag
from mlops.training import train
from tests.conftest import free_port, using_store
from tests.helpers import make_csv
from tests.servers import BIN, models_serve, post, running, server_env

pytestmark = pytest.mark.slow
NAME = "onnx-lr"
FEATURES = ["x1", "x2", "color"]
EXPORTED, PLAIN, TAMPERED = "1", "2", "3"  # the versions the store holds


def export_onnx(name: str, version: str, root: Path) -> str:
    """What ``mlops export NAME --version V --format onnx`` leaves: ``onnx/float32/`` on the
    version's run and the checksum tag; returns the run id."""
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType, StringTensorType

    client = mlflow.MlflowClient()
    registered = client.get_model_version(name, version)
    wrapper = mlflow.pyfunc.load_model(
        f"models:/{name}/{version}", model_config={"runtime": "native"}
    ).unwrap_python_model()
    pipeline = copy.deepcopy(wrapper.pipeline)
    for block, transformer, _ in pipeline.steps[0][1].transformers_:
        if block == "categorical":  # skl2onnx has no NaN in a string tensor: "" is missing
            transformer.named_steps["impute"].missing_values = ""
    types = [(c, FloatTensorType([None, 1])) for c in wrapper.numeric]
    types += [(c, StringTensorType([None, 1])) for c in wrapper.categorical]
    graph = to_onnx(
        pipeline,
        initial_types=types,
        options={id(pipeline.steps[-1][1]): {"zipmap": False}},
        target_opset={"": 17, "ai.onnx.ml": 3},
    )
    assert [o.name for o in graph.graph.output] == ["label", "probabilities"]
    data = graph.SerializeToString()
    sha = hashlib.sha256(data).hexdigest()
    folder = root / f"export-{version}"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(data)
    report = {
        "passed": True,
        "variant": "float32",
        "inputs": [{"name": c, "type": "float"} for c in wrapper.numeric]
        + [{"name": c, "type": "string"} for c in wrapper.categorical],
        "outputs": ["label", "probabilities"],
        "classes": list(wrapper.classes),
        "task": wrapper.task,
        "sha256": sha,
    }
    (folder / "report.json").write_text(json.dumps(report))
    client.log_artifacts(registered.run_id, str(folder), export_path("float32", sha))
    client.set_model_version_tag(name, version, sha256_tag("float32"), sha)
    return registered.run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, template_store: Path) -> Iterator[dict]:
    """Three registered versions of one logistic regression: 1 with an ONNX export (at
    @production), 2 without, 3 with an export whose file was changed after it was tagged."""
    root = tmp_path_factory.mktemp("onnx")
    shutil.copy(template_store, root / "mlflow.db")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    csv = make_csv(root / "data.csv", n=240)
    frame = pd.read_csv(csv)
    frame.loc[::10, "x2"] = np.nan  # nulls allowed in x2: the export's NaN path is exercised
    frame.loc[5::10, "color"] = np.nan
    frame.to_csv(csv, index=False)
    with using_store(uri):
        mlflow.create_experiment("exp-onnx", artifact_location=str(root / "artifacts"))
        config = load_config(
            overrides=[
                f"data.dataset={csv}",
                "data.target=label",
                "data.categorical=[color]",
                "model.family=logreg",
                f"registry.model_name={NAME}",
                "experiment=exp-onnx",
            ]
        )
        for _ in range(3):
            train(config, register=True)
        client = mlflow.MlflowClient()
        client.set_registered_model_alias(NAME, "production", EXPORTED)
        export_onnx(NAME, EXPORTED, root)
        run_id = export_onnx(NAME, TAMPERED, root)
        stored = urlparse(client.get_run(run_id).info.artifact_uri)
        sha = client.get_model_version(NAME, TAMPERED).tags[sha256_tag("float32")]
        onnx_file = Path(unquote(stored.path)) / export_path("float32", sha) / "model.onnx"
        onnx_file.write_bytes(onnx_file.read_bytes() + b"\x00")  # changed after tagging
    yield {"uri": uri, "root": root, "csv": csv}


def loaded(store: dict, version: str, **config: str):  # noqa: ANN201 - a PyFuncModel
    with using_store(store["uri"]):
        return mlflow.pyfunc.load_model(f"models:/{NAME}/{version}", model_config=config or None)


def rows(store: dict) -> pd.DataFrame:
    """Rows with a missing number and a missing category among them."""
    frame = pd.read_csv(store["csv"])[FEATURES].head(16).reset_index(drop=True)
    assert frame["x2"].isna().any() and frame["color"].isna().any()
    return frame


def same_answers(got: pd.DataFrame, native: pd.DataFrame) -> None:
    assert list(got.columns) == list(native.columns)
    assert got["prediction"].tolist() == native["prediction"].tolist()
    probas = [c for c in native.columns if c.startswith("proba_")]
    assert probas
    np.testing.assert_allclose(
        got[probas].to_numpy(float), native[probas].to_numpy(float), atol=1e-4, rtol=0
    )
    assert got["model_version"].tolist() == native["model_version"].tolist()


def test_in_process_load_serves_the_export_and_native_ignores_it(store: dict) -> None:
    onnx = loaded(store, EXPORTED)
    native = loaded(store, EXPORTED, runtime="native")
    assert onnx.unwrap_python_model().runtime == "onnx/float32"
    assert native.unwrap_python_model().runtime == "native"
    frame = rows(store)
    same_answers(onnx.predict(frame), native.predict(frame))
    forced = loaded(store, EXPORTED, runtime="onnx")
    assert forced.unwrap_python_model().runtime == "onnx/float32"


def test_auto_falls_back_to_native_without_an_export(
    store: dict, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="mlops.serving"):
        model = loaded(store, PLAIN)
    assert model.unwrap_python_model().runtime == "native"
    said = [r.getMessage() for r in caplog.records]
    assert any("has no float32 ONNX export: serving it natively" in m for m in said), said
    assert any(f"serving {NAME} version {PLAIN} natively" in m for m in said), said
    assert len(model.predict(rows(store))) == 16


def test_runtime_onnx_without_an_export_refuses_to_load(store: dict) -> None:
    with pytest.raises(MlflowException, match="no float32 ONNX export") as err:
        loaded(store, PLAIN, runtime="onnx")
    assert f"mlops export {NAME} --version {PLAIN} --format onnx" in err.value.message


@pytest.mark.parametrize("runtime", ["auto", "onnx"])
def test_a_tampered_export_refuses_to_load(store: dict, runtime: str) -> None:
    with pytest.raises(MlflowException, match="does not match the recorded") as err:
        loaded(store, TAMPERED, runtime=runtime)
    assert "onnx/float32/" in err.value.message and "/model.onnx" in err.value.message
    # and the native runtime, which never reads the export, still serves that version
    assert loaded(store, TAMPERED, runtime="native").unwrap_python_model().runtime == "native"


def test_explanations_keep_using_the_native_pipeline(store: dict) -> None:
    pytest.importorskip("shap")
    model = loaded(store, EXPORTED)
    frame = rows(store).dropna().head(3)
    answered = model.predict(frame, params={"explain": 2})
    native = loaded(store, EXPORTED, runtime="native").predict(frame, params={"explain": 2})
    assert answered["explanation"].tolist() == native["explanation"].tolist()


def payloads(frame: pd.DataFrame) -> dict[str, tuple[object, str]]:
    records = json.loads(frame.to_json(orient="records"))
    return {
        "dataframe_split": (
            {"dataframe_split": json.loads(frame.to_json(orient="split"))},
            "application/json",
        ),
        "dataframe_records": ({"dataframe_records": records}, "application/json"),
        "instances": ({"instances": records}, "application/json"),
        "inputs": ({"inputs": {c: frame[c].tolist() for c in frame.columns}}, "application/json"),
        "csv": (frame.to_csv(index=False), "text/csv"),
    }


def test_served_onnx_answers_equal_native_ones_in_every_format(store: dict) -> None:
    port = free_port()
    cmd = models_serve(f"models:/{NAME}@production", port)
    log = store["root"] / "mlflow-serve.log"
    frame = rows(store)
    native = loaded(store, EXPORTED, runtime="native").predict(frame)
    onnx = loaded(store, EXPORTED).predict(frame)
    probas = [c for c in native.columns if c.startswith("proba_")]
    # float32 arithmetic: the export's answers differ from the native ones in their last digits,
    # so an answer equal to the export's to the bit came from the export
    assert not np.array_equal(onnx[probas].to_numpy(float), native[probas].to_numpy(float))
    with running(cmd, server_env(store["uri"]), port, log) as base:
        for fmt, (body, mime) in payloads(frame).items():
            status, answer = post(base, body, mime)
            assert status == 200, (fmt, answer)
            served = pd.DataFrame(answer["predictions"])
            same_answers(served, native)
            assert served[probas].to_numpy(float).tolist() == onnx[probas].to_numpy(float).tolist()


def test_mlops_serve_names_the_runtime_on_version(store: dict) -> None:
    from mlops.serving.server import RUNTIME_HEADER, SERVED_HEADER

    port = free_port()
    cmd = [str(BIN / "mlops"), "serve", NAME, "--alias", "production", "--port", str(port)]
    log = store["root"] / "mlops-serve.log"
    with running(cmd, server_env(store["uri"]), port, log) as base:
        import urllib.request

        with urllib.request.urlopen(base + "/version", timeout=10) as resp:
            headers, text = resp.headers, resp.read().decode()
        assert text == mlflow.__version__
        assert json.loads(headers[SERVED_HEADER]) == {"production": EXPORTED}
        assert json.loads(headers[RUNTIME_HEADER]) == {"production": "onnx/float32"}
        status, answer = post(base, payloads(rows(store))["dataframe_split"][0])
        assert status == 200
        native = loaded(store, EXPORTED, runtime="native").predict(rows(store))
        same_answers(pd.DataFrame(answer["predictions"]), native)
    said = log.read_text()
    assert f"serving {NAME} version {EXPORTED} with onnxruntime (float32 export)" in said


def test_keras_small_batches_answer_as_model_predict_does(tmp_path: Path) -> None:
    """The one-graph path for small batches and ``model.predict`` for large ones agree, and a
    model that has answered still saves and loads (the graph is not persisted)."""
    from mlops.artifacts import load_pipeline, save_pipeline
    from mlops.models.keras_mlp import SMALL_BATCH, KerasMLPClassifier, KerasMLPRegressor

    rng = np.random.default_rng(0)
    X = rng.normal(size=(SMALL_BATCH + 100, 4)).astype("float32")
    y = np.where(X[:, 0] + X[:, 1] > 0, "yes", "no")
    clf = KerasMLPClassifier(hidden_units=[8], epochs=2, random_state=0).fit(X[:200], y[:200])
    large = clf.predict_proba(X)  # more than SMALL_BATCH rows: model.predict
    small = np.concatenate([clf.predict_proba(X[i : i + 7]) for i in range(0, 70, 7)])
    np.testing.assert_allclose(small, large[:70], atol=1e-6, rtol=0)
    np.testing.assert_allclose(clf.predict_proba(X[:1]), large[:1], atol=1e-6, rtol=0)
    assert clf.predict(X[:70]).tolist() == clf.predict(X)[:70].tolist()
    reg = KerasMLPRegressor(hidden_units=[8], epochs=2, random_state=0).fit(X[:200], X[:200, 0])
    np.testing.assert_allclose(reg.predict(X[:50]), reg.predict(X)[:50], atol=1e-5, rtol=0)
    again = load_pipeline(save_pipeline(clf, tmp_path))
    np.testing.assert_allclose(again.predict_proba(X[:70]), small, atol=1e-6, rtol=0)
    clf.fit(X[200:400], y[200:400])  # refitted: the new network answers, not a kept graph
    np.testing.assert_allclose(
        clf.predict_proba(X[:5]), clf.model_.predict(X[:5], verbose=0), atol=1e-6, rtol=0
    )


def test_a_version_exported_by_mlops_export_is_served_through_it(store: dict) -> None:
    """``mlops.export.export`` (the command's function) makes what the server loads."""
    from mlops.export import export

    with using_store(store["uri"]):
        config = load_config(
            overrides=[
                f"data.dataset={store['csv']}",
                "data.target=label",
                "data.categorical=[color]",
                "model.family=logreg",
                f"registry.model_name={NAME}",
                "experiment=exp-onnx",
            ]
        )
        version = str(train(config, register=True).registered_version)
        export(NAME, version, config)
        export(NAME, version, config, quantize="int8")
    frame = rows(store)
    native = loaded(store, version, runtime="native").predict(frame)
    onnx = loaded(store, version)
    assert onnx.unwrap_python_model().runtime == "onnx/float32"
    same_answers(onnx.predict(frame), native)
    int8 = loaded(store, version, runtime="onnx", onnx_variant="int8")
    assert int8.unwrap_python_model().runtime == "onnx/int8"
    answered = int8.predict(frame)
    assert list(answered.columns) == list(native.columns) and len(answered) == len(native)


def test_a_regressor_is_served_through_its_export(tmp_path: Path) -> None:
    """``variable`` is the prediction column, as the native regressor's values."""
    from mlops.export import export

    csv = make_csv(tmp_path / "data.csv", n=160)
    pd.read_csv(csv).drop(columns=["label"]).to_csv(csv, index=False)
    config = load_config(
        overrides=[
            f"data.dataset={csv}",
            "data.target=x1",
            "data.task=regression",
            "data.categorical=[color]",
            "model.family=ridge",
            "registry.model_name=onnx-ridge",
        ]
    )
    version = str(train(config, register=True).registered_version)
    export("onnx-ridge", version, config)
    frame = pd.read_csv(csv)[["x2", "color"]].head(8)
    model = mlflow.pyfunc.load_model(f"models:/onnx-ridge/{version}")
    assert model.unwrap_python_model().runtime == "onnx/float32"
    native = mlflow.pyfunc.load_model(
        f"models:/onnx-ridge/{version}", model_config={"runtime": "native"}
    ).predict(frame)
    got = model.predict(frame)
    assert list(got.columns) == list(native.columns)
    np.testing.assert_allclose(got["prediction"], native["prediction"], atol=1e-4, rtol=0)


def test_a_batch_runs_on_the_batch_session_with_the_same_answers(store: dict) -> None:
    """From BATCH_ROWS rows a request runs on a second session (several threads), made at the
    first such request from the same verified bytes; it answers as the small-request one."""
    from mlops.serving.onnx_runtime import BATCH_ROWS

    model = loaded(store, EXPORTED)
    scorer = model.unwrap_python_model().onnx
    frame = pd.concat([rows(store)] * (BATCH_ROWS // 16 + 1), ignore_index=True)
    assert len(frame) >= BATCH_ROWS and scorer._batch is None
    small = pd.concat(
        [model.predict(frame.iloc[i : i + 16]) for i in range(0, len(frame), 16)],
        ignore_index=True,
    )
    assert scorer._batch is None  # small requests never build it
    whole = model.predict(frame)
    assert scorer._batch is not None and scorer.session_for(len(frame)) is scorer._batch
    assert scorer.session_for(1) is scorer.session
    assert whole["prediction"].tolist() == small["prediction"].tolist()
    probas = [c for c in whole.columns if c.startswith("proba_")]
    np.testing.assert_allclose(
        whole[probas].to_numpy(float), small[probas].to_numpy(float), atol=1e-6, rtol=0
    )


def test_mlops_serve_takes_the_runtime_as_an_option(store: dict) -> None:
    """`mlops serve --runtime native` overrides the logged serving.runtime for every version it
    loads, as the model config it passes to the wrapper."""
    port = free_port()
    cmd = [str(BIN / "mlops"), "serve", NAME, "--alias", "production", "--port", str(port)]
    cmd += ["--runtime", "native"]
    log = store["root"] / "mlops-serve-native.log"
    with running(cmd, server_env(store["uri"]), port, log) as base:
        import urllib.request

        from mlops.serving.server import RUNTIME_HEADER

        with urllib.request.urlopen(base + "/version", timeout=10) as resp:
            assert json.loads(resp.headers[RUNTIME_HEADER]) == {"production": "native"}
    assert f"serving {NAME} version {EXPORTED} natively" in log.read_text()


def test_text_onnx_runtime_cannot_take_is_a_400_naming_the_column(store: dict) -> None:
    """JSON may carry a lone surrogate ("\\ud800"), which UTF-8 cannot: the export's session
    refuses it, and the answer is the contract's 400 naming the column and row, not a 500."""
    from mlflow.exceptions import MlflowException

    model = loaded(store, EXPORTED, runtime="onnx").unwrap_python_model()
    body = json.dumps({"dataframe_records": [{"x1": 0.1, "x2": 0.2, "color": "\ud800"}]})
    with pytest.raises(MlflowException) as caught:
        model.respond(body, "application/json")
    assert caught.value.get_http_status_code() == 400
    assert "column 'color' in row 0" in caught.value.message
