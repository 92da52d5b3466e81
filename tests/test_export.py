"""``mlops export``: every family as one ONNX graph with parity on the test split, quantized
variants, refusals (parity, feature transforms, tampered files) and the command line."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest

from mlops.artifacts import PIPELINE_FILE, UntrustedArtifact
from mlops.cli import main
from mlops.config import load_config
from mlops.errors import ExportError
from mlops.export import EXPORT_OF_TAG, export, onnx_inputs, tag_names
from mlops.lineage import load_logged_split
from mlops.training import train
from tests.conftest import using_store
from tests.helpers import make_csv

# family -> (task, extra overrides)
FAMILIES = {
    "logreg": ("classification", []),
    "random_forest": ("classification", ["model.params.n_estimators=100"]),
    "hist_gb": ("classification", ["model.params.max_iter=30"]),
    "ridge": ("regression", []),
    "keras_mlp": (
        "classification",
        ["model.params.epochs=3", "model.params.hidden_units=[256, 256]"],
    ),
}


def regression_csv(path: Path, n: int = 240) -> Path:
    rng = np.random.default_rng(1)
    frame = pd.DataFrame(
        {
            "x1": rng.normal(size=n),
            "x2": rng.normal(size=n),
            "color": rng.choice(["red", "green", "blue"], size=n),
        }
    )
    frame["label"] = (
        2 * frame["x1"] - frame["x2"] + (frame["color"] == "red") + rng.normal(scale=0.1, size=n)
    )
    frame.loc[::13, "x2"] = np.nan  # missing values travel as NaN
    frame.to_csv(path, index=False)
    return path


def overrides(csv: Path, family: str, *extra: str) -> list[str]:
    return [
        f"data.dataset={csv}",
        "data.target=label",
        "data.categorical=[color]",
        f"model.family={family}",
        f"registry.model_name=export-{family.replace('_', '-')}",
        f"experiment=exp-export-{family}",
        "explain.enabled=false",
        *extra,
    ]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, template_store: Path) -> Iterator[dict]:
    """One store with a registered version of each family, exported as float32 once."""
    root = tmp_path_factory.mktemp("export")
    shutil.copy(template_store, root / "mlflow.db")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    classes = make_csv(root / "classes.csv", n=240)
    frame = pd.read_csv(classes)
    frame.loc[::11, "color"] = np.nan  # a missing category travels as ""
    frame.to_csv(classes, index=False)
    values = regression_csv(root / "values.csv")
    versions: dict[str, tuple[str, str]] = {}
    exported = {}
    with using_store(uri):
        for family, (task, extra) in FAMILIES.items():
            csv = classes if task == "classification" else values
            config = load_config(overrides=overrides(csv, family, *extra))
            result = train(config, register=True)
            name = config.registry.model_name
            versions[family] = (name, str(result.registered_version))
            exported[family] = export(name, str(result.registered_version), config)
    yield {"uri": uri, "root": root, "versions": versions, "exported": exported}


@pytest.fixture
def in_store(store: dict, monkeypatch: pytest.MonkeyPatch) -> dict:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", store["uri"])
    mlflow.set_tracking_uri(store["uri"])
    mlflow.set_registry_uri(store["uri"])
    return store


def config_of(family: str, *extra: str):
    csv = Path("unused.csv")
    return load_config(overrides=overrides(csv, family, *FAMILIES[family][1], *extra))


def logged_onnx(run_id: str, variant: str, tmp_path: Path, sha: str) -> tuple[bytes, dict]:
    """The export of ``variant`` whose model.onnx hashes to ``sha``, as logged on the run."""
    from mlops.serving.onnx_runtime import export_path

    return _logged_at(run_id, export_path(variant, sha), tmp_path)


def _logged_at(run_id: str, path: str, tmp_path: Path) -> tuple[bytes, dict]:
    folder = Path(
        mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=path, dst_path=str(tmp_path)
        )
    )
    return (folder / "model.onnx").read_bytes(), json.loads((folder / "report.json").read_text())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_exports_float32_with_parity(
    in_store: dict, family: str, tmp_path: Path
) -> None:
    name, version = in_store["versions"][family]
    result = in_store["exported"][family]
    assert result.report["passed"] and result.variant == "float32"
    model_bytes, report = logged_onnx(result.run_id, "float32", tmp_path, result.sha256)
    sha = hashlib.sha256(model_bytes).hexdigest()
    assert report["sha256"] == sha == result.sha256
    assert report["passed"] and report["rows_compared"] > 0
    assert report["max_abs_difference"] <= 1e-4 and report["label_mismatches"] == 0
    assert report["size_bytes"] == len(model_bytes) and report["native_size_bytes"] > 0
    tags = mlflow.MlflowClient().get_model_version(name, version).tags
    sha_tag, ratio_tag = tag_names("float32")
    assert tags[sha_tag] == sha and float(tags[ratio_tag]) == pytest.approx(
        report["size_ratio"], abs=1e-3
    )

    # the graph itself, through onnxruntime: the contract's names, the native values
    task = FAMILIES[family][0]
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    inputs = {i.name: i.type for i in session.get_inputs()}
    assert inputs == {"x1": "tensor(float)", "x2": "tensor(float)", "color": "tensor(string)"}
    assert [i["name"] for i in report["io_contract"]["inputs"]] == ["x1", "x2", "color"]
    outputs = [o.name for o in session.get_outputs()]
    split = load_logged_split(result.run_id)
    X = split.test[["x1", "x2", "color"]]
    assert X.isna().any().any()  # the test rows hold missing values of both kinds
    got = dict(
        zip(outputs, session.run(None, onnx_inputs(X, ["x1", "x2"], ["color"])), strict=True)
    )
    pipeline = _native(name, version)
    if task == "classification":
        assert outputs == ["label", "probabilities"] and report["classes"] == ["no", "yes"]
        native = pipeline.predict_proba(X)
        assert got["probabilities"].dtype == np.float32 and got["label"].dtype == np.int64
        np.testing.assert_allclose(got["probabilities"], native, atol=1e-4)
        np.testing.assert_array_equal(got["label"], native.argmax(axis=1))
    else:
        assert outputs == ["variable"] and got["variable"].shape == (len(X), 1)
        np.testing.assert_allclose(got["variable"].ravel(), pipeline.predict(X), atol=1e-4)


def _native(name: str, version: str):
    from mlops.artifacts import load_pipeline

    folder = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version}"))
    meta = json.loads(next(folder.rglob("metadata.json")).read_text())
    return load_pipeline(next(folder.rglob(PIPELINE_FILE)), sha256=meta["pipeline_sha256"])


@pytest.mark.parametrize("family", ["random_forest", "keras_mlp"])
@pytest.mark.parametrize("variant", ["int8", "fp16"])
def test_quantized_variants_report_size_and_metric_drop(
    in_store: dict, family: str, variant: str, tmp_path: Path
) -> None:
    name, version = in_store["versions"][family]
    result = export(name, version, config_of(family), quantize=variant)
    report = result.report
    assert report["passed"] and report["variant"] == variant
    assert report["metric"]["name"] == "accuracy"
    assert report["metric"]["drop"] <= 0.005
    float_size = in_store["exported"][family].report["size_bytes"]
    model_bytes, logged = logged_onnx(result.run_id, variant, tmp_path, result.sha256)
    assert logged["size_bytes"] == len(model_bytes) == report["size_bytes"]
    if family == "keras_mlp":
        # the network's weights are the model: int8 weights are a quarter of float32 ones
        # (measured 77 kB vs 275 kB), float16 ones a half (140 kB)
        assert len(model_bytes) <= float_size / (2 if variant == "int8" else 1.8)
    else:
        # trees are ONNX-ML operators with no int8 or float16 form: no smaller, and said so
        assert len(model_bytes) >= float_size * 0.99 and "no smaller" in report["note"]
    tags = mlflow.MlflowClient().get_model_version(name, version).tags
    assert tags[tag_names(variant)[0]] == hashlib.sha256(model_bytes).hexdigest()
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["label", "probabilities"]


def test_a_failed_parity_shows_the_worst_rows_and_logs_nothing(in_store: dict) -> None:
    # a Keras network's float32 ONNX graph differs from Keras by ~1e-7: more than 1e-12
    name, version = in_store["versions"]["keras_mlp"]
    client = mlflow.MlflowClient()
    run_id = client.get_model_version(name, version).run_id
    assert run_id
    before = {a.path for a in client.list_artifacts(run_id, "onnx")}
    with pytest.raises(ExportError) as caught:
        export(name, version, config_of("keras_mlp", "export.tolerance=1e-12"), quantize=None)
    message = str(caught.value)
    assert "fails parity" in message and "export.tolerance 1e-12" in message
    assert message.count("row ") == 5 and "native [" in message and "vs onnx [" in message
    # the float32 export logged by the fixture stays; nothing was added or re-tagged
    assert {a.path for a in client.list_artifacts(run_id, "onnx")} == before
    tags = client.get_model_version(name, version).tags
    assert tags[tag_names("float32")[0]] == in_store["exported"]["keras_mlp"].sha256


def test_a_declared_feature_transform_is_refused_naming_column_and_transform(
    tmp_path: Path,
) -> None:
    csv = make_csv(tmp_path / "d.csv", n=120)
    frame = pd.read_csv(csv)
    frame["comment"] = np.where(frame["x1"] > 0, "great service", "slow and late")
    frame.to_csv(csv, index=False)
    config = load_config(
        overrides=[
            *overrides(csv, "logreg"),
            "data.features={comment: {transform: tfidf, max_features: 5}}",
        ]
    )
    result = train(config, register=True)
    name = config.registry.model_name
    with pytest.raises(ExportError) as caught:
        export(name, str(result.registered_version), config)
    assert (
        "column 'comment': data.features transform 'tfidf' (mlops.features.TextTfidf) has no "
        "ONNX converter" in str(caught.value)
    )
    tags = mlflow.MlflowClient().get_model_version(name, str(result.registered_version)).tags
    assert not any(k.startswith("mlops.onnx.") for k in tags)


def test_log_clip_and_bins_transforms_export_with_parity(tmp_path: Path) -> None:
    csv = make_csv(tmp_path / "d.csv", n=200)
    frame = pd.read_csv(csv)
    frame["amount"] = np.abs(frame["x2"]) * 100
    frame.loc[::9, "amount"] = np.nan  # imputed after the log, as natively
    frame.to_csv(csv, index=False)
    config = load_config(
        overrides=[
            *overrides(csv, "logreg"),
            "data.features={amount: {transform: log}, x1: {transform: clip, min: -1, max: 1}, "
            "x2: {transform: bins, n_bins: 4}}",
        ]
    )
    result = train(config, register=True)
    exported = export(config.registry.model_name, str(result.registered_version), config)
    assert exported.report["passed"] and exported.report["max_abs_difference"] <= 1e-4
    assert [i["name"] for i in exported.report["io_contract"]["inputs"]] == [
        "x1",
        "x2",
        "amount",
        "color",
    ]


def test_a_tampered_model_file_is_refused_before_it_is_loaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    csv = make_csv(tmp_path / "d.csv", n=120)
    config = load_config(overrides=overrides(csv, "logreg"))
    result = train(config, register=True)
    (stored,) = [p for p in tmp_path.rglob(PIPELINE_FILE) if "mlruns" in p.parts]
    stored.write_bytes(stored.read_bytes() + b"\0")
    loaded = []
    monkeypatch.setattr("mlops.artifacts.load_pipeline", lambda *a, **k: loaded.append(a))
    with pytest.raises(UntrustedArtifact, match="checksum"):
        export(config.registry.model_name, str(result.registered_version), config)
    assert loaded == []


def test_the_command_exports_and_registers_a_version(
    in_store: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    name, version = in_store["versions"]["logreg"]
    try:
        main(["export", name, "--version", version, "--format", "onnx", "--register"])
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    assert code == 0, err
    assert f"{name} version {version}: ONNX float32 (opset 17) parity passed" in out
    assert "onnx/float32/" in out and "/model.onnx" in out and "x the native pipeline" in out
    client = mlflow.MlflowClient()
    latest = max(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
    assert f"registered as {name} version {latest}" in out
    copied = client.get_model_version(name, str(latest))
    original = client.get_model_version(name, version)
    assert copied.run_id == original.run_id and copied.source == original.source
    assert copied.tags[EXPORT_OF_TAG] == version
    sha_tag = tag_names("float32")[0]
    assert copied.tags[sha_tag] == original.tags[sha_tag]
    assert copied.tags["mlops.checksum"] == original.tags["mlops.checksum"]

    # a refusal is one line on stderr and exit code 1
    try:
        main(["export", name, "--version", version, "--set", "export.tolerance=1e-12"])
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    assert code == 1 and err.startswith("error: ONNX float32 export fails parity")


def test_the_skl2onnx_tree_fix_still_matches_the_library() -> None:
    """export wraps skl2onnx's tree_ensemble.add_node (a HistGradientBoosting leaf passes a
    Python False where protobuf wants an int): fail loudly if that function changes."""
    import inspect

    from skl2onnx.common import tree_ensemble

    params = inspect.signature(tree_ensemble.add_node).parameters
    assert "nodes_missing_value_tracks_true" in params


def test_columns_named_with_spaces_keep_their_names_in_the_graph(
    in_store: dict, tmp_path: Path
) -> None:
    """The default dataset's columns ('mean radius'): skl2onnx would name the inputs
    'mean_radius'; the contract (and the serving side) wants the column's own name."""
    config = load_config(
        overrides=["registry.model_name=spaced", "explain.enabled=false", "seed=3"]
    )
    result = train(config, register=True)
    done = export("spaced", str(result.registered_version), config)
    session = ort.InferenceSession(
        logged_onnx(done.run_id, "float32", tmp_path, done.sha256)[0],
        providers=["CPUExecutionProvider"],
    )
    names = [i.name for i in session.get_inputs()]
    assert "mean radius" in names and "worst fractal dimension" in names
    uri = f"models:/spaced/{result.registered_version}"
    onnx_model = mlflow.pyfunc.load_model(uri, model_config={"runtime": "onnx"})
    native = mlflow.pyfunc.load_model(uri, model_config={"runtime": "native"})
    assert onnx_model.unwrap_python_model().runtime == "onnx/float32"
    from sklearn.datasets import load_breast_cancer

    rows = load_breast_cancer(as_frame=True).data.head(20)
    a, b = onnx_model.predict(rows), native.predict(rows)
    assert (a["prediction"] == b["prediction"]).all()
    assert (
        np.abs(a.filter(like="proba_").to_numpy() - b.filter(like="proba_").to_numpy()).max() < 1e-4
    )


def _native_with_meta(name: str, version: str):
    from mlops.artifacts import load_pipeline

    folder = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version}"))
    meta = json.loads(next(folder.rglob("metadata.json")).read_text())
    pipeline = load_pipeline(next(folder.rglob(PIPELINE_FILE)), sha256=meta["pipeline_sha256"])
    return pipeline, meta


def test_a_random_forest_on_the_default_dataset_matches_natively_on_every_row(
    in_store: dict, tmp_path: Path
) -> None:
    """scikit-learn scales in float64 and a tree compares float32(scaled) with a float64
    threshold; a float32 graph used to take the other branch where a breast cancer value lies
    on a threshold (0.005 off). The scaler is folded into the trees of the converted copy."""
    from sklearn.datasets import load_breast_cancer

    from mlops.export import convert

    config = load_config(
        overrides=[
            "model.family=random_forest",
            "registry.model_name=rf-bc",
            "explain.enabled=false",
        ]
    )
    version = str(train(config, register=True).registered_version)
    done = export("rf-bc", version, config)
    assert done.report["passed"] and done.report["max_abs_difference"] <= 1e-4
    assert done.report["label_mismatches"] == 0

    pipeline, meta = _native_with_meta("rf-bc", version)
    data = load_breast_cancer(as_frame=True).data
    numeric = list(meta["numeric_columns"])
    assert numeric == list(data.columns) and not meta["categorical_columns"]
    session = ort.InferenceSession(
        logged_onnx(done.run_id, "float32", tmp_path, done.sha256)[0],
        providers=["CPUExecutionProvider"],
    )
    label, probabilities = session.run(None, onnx_inputs(data, numeric, []))
    native = pipeline.predict_proba(data)
    np.testing.assert_allclose(probabilities, native, atol=1e-4)
    np.testing.assert_array_equal(label, native.argmax(axis=1))

    # converting works on a copy: the native trees and scaler keep their values
    forest = pipeline.steps[-1][1]
    scaler = pipeline.steps[0][1].named_transformers_["numeric"].steps[-1][1]
    thresholds = [tree.tree_.threshold.copy() for tree in forest.estimators_]
    mean, scale = scaler.mean_.copy(), scaler.scale_.copy()
    convert(pipeline, meta, config.export.opset)
    for tree, before in zip(forest.estimators_, thresholds, strict=True):
        np.testing.assert_array_equal(tree.tree_.threshold, before)
    np.testing.assert_array_equal(scaler.mean_, mean)
    np.testing.assert_array_equal(scaler.scale_, scale)
    assert pipeline.predict_proba(data) == pytest.approx(native, abs=0)


def test_a_folded_threshold_is_the_last_float32_the_native_tree_sends_left() -> None:
    from mlops.export_trees import raw_cutoff

    rng = np.random.default_rng(0)
    mean, scale = rng.normal(size=500) * 100, np.exp(rng.normal(size=500))
    # thresholds right on decimal values (midpoints of 3-decimal data), as trees make them
    decimals = np.round(rng.normal(size=500) * 50, 3) + 0.0005
    threshold = (decimals - mean) / scale
    cut = raw_cutoff(threshold, mean, scale).astype(np.float32)

    def left(raw: np.ndarray) -> np.ndarray:
        scaled = ((raw.astype(str).astype(np.float64) - mean) / scale).astype(np.float32)
        return scaled <= threshold

    assert left(cut).all()
    assert not left(np.nextafter(cut, np.float32(np.inf))).any()


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_serves_its_export_over_http_in_every_format(
    in_store: dict, family: str
) -> None:
    """A real `mlflow models serve` of each family's exported version on `runtime: onnx`
    answers every input format as the native model does on the same rows (within the export's
    tolerance), missing numbers and categories included."""
    from tests.conftest import free_port
    from tests.servers import models_serve, post, running, server_env

    name, version = in_store["versions"][family]
    task = FAMILIES[family][0]
    csv = in_store["root"] / ("classes.csv" if task == "classification" else "values.csv")
    # the training file's own rows: missing categories (classes) or numbers (values) among them
    frame = pd.read_csv(csv)[["x1", "x2", "color"]].head(30).reset_index(drop=True)
    assert frame.isna().any().any()
    records = json.loads(frame.to_json(orient="records"))
    bodies = {
        "dataframe_split": ({"dataframe_split": json.loads(frame.to_json(orient="split"))}, None),
        "dataframe_records": ({"dataframe_records": records}, None),
        "instances": ({"instances": records}, None),
        "inputs": ({"inputs": {c: frame[c].tolist() for c in frame.columns}}, None),
        "csv": (frame.to_csv(index=False), "text/csv"),
    }
    uri = f"models:/{name}/{version}"
    native = mlflow.pyfunc.load_model(uri, model_config={"runtime": "native"}).predict(frame)
    port = free_port()
    cmd = models_serve(uri, port)
    env = server_env(in_store["uri"], SERVING_MODEL_CONFIG=json.dumps({"runtime": "onnx"}))
    with running(cmd, env, port, in_store["root"] / f"serve-{family}.log") as base:
        for fmt, (body, mime) in bodies.items():
            status, answer = post(base, body, mime or "application/json")
            assert status == 200, (family, fmt, answer)
            served = pd.DataFrame(answer["predictions"])
            assert list(served.columns) == list(native.columns), fmt
            if task == "regression":
                np.testing.assert_allclose(
                    served["prediction"].to_numpy(float),
                    native["prediction"].to_numpy(float),
                    atol=1e-4,
                    rtol=1e-6,
                )
                continue
            probas = [c for c in native.columns if c.startswith("proba_")]
            got, want = served[probas].to_numpy(float), native[probas].to_numpy(float)
            np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
            top2 = np.sort(want, axis=1)[:, -2:]
            clear = (top2[:, 1] - top2[:, 0]) > 1e-4  # off a decision boundary
            assert (served["prediction"][clear] == native["prediction"][clear]).all(), fmt


@pytest.mark.parametrize("variant", ["float32", "fp16"])
def test_an_export_answering_infinity_or_nan_never_passes_parity(
    in_store: dict, tmp_path: Path, variant: str
) -> None:
    """An fp16 network overflowing past 65504 answers inf: the metric of the finite rows alone
    must not let it pass (nor NaN slip past a `>` comparison)."""
    from onnx import TensorProto, helper

    from mlops.export import _verified_pipeline
    from mlops.export_parity import check_parity

    name, version = in_store["versions"]["ridge"]
    pipeline, meta, _ = _verified_pipeline(name, version, tmp_path / "model")
    inputs = [helper.make_tensor_value_info(c, TensorProto.FLOAT, [None, 1]) for c in ("x1", "x2")]
    inputs.append(helper.make_tensor_value_info("color", TensorProto.STRING, [None, 1]))
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x1", "inf"], ["variable"])],
        "overflowing",
        inputs,
        [helper.make_tensor_value_info("variable", TensorProto.FLOAT, [None, 1])],
        [helper.make_tensor("inf", TensorProto.FLOAT, [1], [float("inf")])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    run_id = mlflow.MlflowClient().get_model_version(name, version).run_id
    report = check_parity(
        pipeline, meta, model.SerializeToString(), run_id, variant, config_of("ridge")
    )
    assert not report["passed"]
    assert "NaN or infinity" in report["failure"]


def test_a_later_export_on_the_same_run_leaves_earlier_versions_servable(in_store: dict) -> None:
    """Exports are kept per checksum: a version registered from the run (--register) keeps
    serving its own export after the original is exported again (another opset), which
    replaces neither file nor tag of the copy."""
    name, version = in_store["versions"]["logreg"]
    first = export(name, version, config_of("logreg"), register=True)
    copy = first.registered_version
    assert copy is not None
    again = export(name, version, config_of("logreg", "export.opset=15"))
    assert again.sha256 != first.sha256 and again.artifact_path != first.artifact_path
    client = mlflow.MlflowClient()
    sha_tag = tag_names("float32")[0]
    assert client.get_model_version(name, copy).tags[sha_tag] == first.sha256
    assert client.get_model_version(name, version).tags[sha_tag] == again.sha256
    for v in (copy, version):
        model = mlflow.pyfunc.load_model(f"models:/{name}/{v}", model_config={"runtime": "onnx"})
        assert model.unwrap_python_model().runtime == "onnx/float32"
