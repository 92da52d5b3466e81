"""Explanations: SHAP contributions that add up, one-hot blocks summed back to their column,
what a training run logs, `mlops explain` (file and logged request, verified before load), and
a real served model answering ``{"params": {"explain": 3}}``."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from sklearn.compose import ColumnTransformer
from sklearn.datasets import load_diabetes, load_iris
from sklearn.preprocessing import SplineTransformer, StandardScaler

from mlops.config import load_config
from mlops.explain import Explainer, background_for, feature_owners
from mlops.models import build_model, fit_model
from mlops.training import train
from tests.conftest import free_port, using_store
from tests.helpers import make_csv, run_cli
from tests.servers import BIN, models_serve, post, running, server_env

NAME = "explain-model"
FEATURES = ["x1", "x2", "color"]


def fitted(family: str, task: str, X: pd.DataFrame, y: np.ndarray, categorical=()) -> object:
    numeric = [c for c in X.columns if c not in categorical]
    pipeline = build_model(
        family,
        task,
        {"n_estimators": 20} if family == "random_forest" else {},
        numeric_columns=numeric,
        categorical_columns=list(categorical),
        seed=0,
    )
    return fit_model(pipeline, X, y)


def explainer_for(pipeline, family: str, task: str, X: pd.DataFrame, classes=None) -> Explainer:
    background = background_for(pipeline, X, family, rows=50, seed=0)
    return Explainer(
        pipeline,
        family=family,
        task=task,
        classes=classes,
        features=list(X.columns),
        background=background if background.size else None,
    )


def model_output(pipeline, family: str, task: str, X: pd.DataFrame) -> np.ndarray:
    """The output each family's contributions explain, computed from the model itself."""
    estimator, Xt = pipeline.steps[-1][1], pipeline.steps[0][1].transform(X)
    if task == "regression":
        return np.asarray(estimator.predict(Xt), dtype=float)
    # linear: log-odds / logits; hist_gb: raw score; random forest: probability
    raw = (
        estimator.predict_proba(Xt)
        if family == "random_forest"
        else estimator.decision_function(Xt)
    )
    raw = np.asarray(raw, dtype=float)
    return raw if raw.ndim == 1 else raw[np.arange(len(raw)), raw.argmax(axis=1)]


@pytest.mark.parametrize(
    ("family", "task", "data"),
    [
        ("logreg", "classification", "binary"),
        ("logreg", "classification", "iris"),
        ("ridge", "regression", "diabetes"),
        ("random_forest", "classification", "binary"),
        ("random_forest", "classification", "iris"),
        ("random_forest", "regression", "diabetes"),
        ("hist_gb", "classification", "binary"),
        ("hist_gb", "classification", "iris"),
        ("hist_gb", "regression", "diabetes"),
    ],
)
def test_contributions_and_expected_value_add_up_to_the_model_output(
    family: str, task: str, data: str, tmp_path: Path
) -> None:
    categorical: tuple[str, ...] = ()
    if data == "binary":
        frame = pd.read_csv(make_csv(tmp_path / "d.csv", n=200))
        X, y = frame[FEATURES], (frame["label"] == "yes").to_numpy().astype(int)
        categorical = ("color",)
    elif data == "iris":
        X, y = load_iris(return_X_y=True, as_frame=True)
        y = y.to_numpy()
    else:
        X, y = load_diabetes(return_X_y=True, as_frame=True)
        X, y = X.head(200), y.to_numpy()[:200]
    pipeline = fitted(family, task, X, y, categorical)
    classes = [str(c) for c in np.unique(y)] if task == "classification" else None
    rows = X.head(25)
    got = explainer_for(pipeline, family, task, X, classes).explain(rows)
    assert got.values.shape == (25, X.shape[1])
    want = model_output(pipeline, family, task, rows)
    np.testing.assert_allclose(got.expected + got.values.sum(axis=1), want, rtol=0, atol=1e-6)
    np.testing.assert_allclose(got.output, want, rtol=0, atol=1e-6)
    if family in ("logreg", "hist_gb") and data == "binary":
        assert set(got.explains) == {"log-odds of '1'"} or set(got.explains) == {
            "raw score (log-odds) of '1'"
        }
    if family == "random_forest" and task == "classification":
        assert all(e.startswith("probability of ") for e in got.explains)
    if task == "regression":
        assert set(got.explains) == {"prediction"}


def test_one_hot_columns_sum_back_to_their_feature(tmp_path: Path) -> None:
    frame = pd.read_csv(make_csv(tmp_path / "d.csv", n=200))
    X, y = frame[FEATURES], (frame["label"] == "yes").to_numpy().astype(int)
    pipeline = fitted("logreg", "classification", X, y, ("color",))
    preprocess, estimator = pipeline.steps[0][1], pipeline.steps[-1][1]
    # x1, x2 one output each; color's three categories all to color
    assert feature_owners(preprocess, FEATURES).tolist() == [0, 1, 2, 2, 2]
    explainer = explainer_for(pipeline, "logreg", "classification", X, ["0", "1"])
    rows = X.head(10)
    got = explainer.explain(rows)
    assert got.features == FEATURES
    # linear SHAP by hand on the transformed columns: coef * (x - background mean)
    mean = background_for(pipeline, X, "logreg", rows=50, seed=0)[0]
    per_column = estimator.coef_[0] * (preprocess.transform(rows) - mean)
    np.testing.assert_allclose(got.values[:, 2], per_column[:, 2:].sum(axis=1), atol=1e-9)
    np.testing.assert_allclose(got.values[:, :2], per_column[:, :2], atol=1e-9)


def test_a_declared_feature_transform_maps_all_its_outputs_to_its_column() -> None:
    X = pd.DataFrame({"a": np.linspace(0, 1, 30), "b": np.linspace(1, 2, 30)})
    preprocess = ColumnTransformer(
        [
            ("numeric", StandardScaler(), ["b"]),
            ("feature_a", SplineTransformer(n_knots=4, degree=2), ["a"]),
        ]
    ).fit(X)
    owners = feature_owners(preprocess, ["a", "b"])
    assert owners[0] == 1 and len(owners) > 2 and set(owners[1:].tolist()) == {0}


def test_declared_feature_transforms_are_explained_per_original_column(tmp_path: Path) -> None:
    frame = pd.read_csv(make_csv(tmp_path / "d.csv", n=200))
    X, y = frame[FEATURES], (frame["label"] == "yes").to_numpy().astype(int)
    pipeline = build_model(
        "logreg",
        "classification",
        {},
        numeric_columns=["x1", "x2"],
        categorical_columns=["color"],
        features={"x2": {"transform": "bins", "n_bins": 4}, "color": {"transform": "frequency"}},
        seed=0,
    )
    fit_model(pipeline, X, y)
    got = explainer_for(pipeline, "logreg", "classification", X, ["0", "1"]).explain(X.head(10))
    assert got.features == FEATURES and got.values.shape == (10, 3)
    want = model_output(pipeline, "logreg", "classification", X.head(10))
    np.testing.assert_allclose(got.expected + got.values.sum(axis=1), want, atol=1e-6)


def test_keras_mlp_is_explained_by_a_sampled_kernel_explainer(tmp_path: Path) -> None:
    frame = pd.read_csv(make_csv(tmp_path / "d.csv", n=80))
    X, y = frame[FEATURES], (frame["label"] == "yes").to_numpy().astype(int)
    pipeline = build_model(
        "keras_mlp",
        "classification",
        {"epochs": 2, "hidden_units": [4]},
        numeric_columns=["x1", "x2"],
        categorical_columns=["color"],
        seed=0,
    )
    fit_model(pipeline, X, y)
    background = background_for(pipeline, X, "keras_mlp", rows=30, seed=0)
    assert background.shape[0] <= 10  # a k-means summary, no training row kept
    explainer = Explainer(
        pipeline,
        family="keras_mlp",
        task="classification",
        classes=["no", "yes"],
        features=FEATURES,
        background=background,
        kernel_samples=40,
    )
    rows = X.head(3)
    got = explainer.explain(rows)
    proba = pipeline.predict_proba(rows)
    want = proba[np.arange(3), proba.argmax(axis=1)]
    # Kernel SHAP's efficiency constraint: the parts add up to the explained probability
    np.testing.assert_allclose(got.expected + got.values.sum(axis=1), want, atol=1e-5)
    assert all(e.startswith("probability of ") for e in got.explains)


def config_for(csv: Path, family: str = "logreg", *extra: str):
    return load_config(
        overrides=[
            f"data.dataset={csv}",
            "data.target=label",
            "data.categorical=[color]",
            f"model.family={family}",
            f"registry.model_name={NAME}",
            "explain.permutation_repeats=2",
            "explain.sample_rows=30",
            *extra,
        ]
    )


@pytest.mark.parametrize("family", ["logreg", "random_forest"])
def test_a_training_run_logs_importance_shap_tables_and_plots(tmp_path: Path, family: str) -> None:
    csv = make_csv(tmp_path / "d.csv", n=200)
    extra = ["model.params.n_estimators=20"] if family == "random_forest" else []
    result = train(config_for(csv, family, *extra))
    run = mlflow.get_run(result.run_id)
    for feature in FEATURES:
        assert f"importance_{feature}" in run.data.metrics
        assert result.metrics[f"importance_{feature}"] == run.data.metrics[f"importance_{feature}"]
    client = mlflow.MlflowClient()
    plots = {a.path for a in client.list_artifacts(result.run_id, "plots")}
    assert {"plots/permutation_importance.png", "plots/shap_summary.png"} <= plots
    folder = Path(
        mlflow.artifacts.download_artifacts(run_id=result.run_id, artifact_path="explain")
    )
    table = pd.read_csv(folder / "shap_importance.csv")
    assert sorted(table["feature"]) == sorted(FEATURES)  # color once, not per category
    assert (table["mean_abs_contribution"] >= 0).all()
    summary = json.loads((folder / "shap_importance.json").read_text())
    assert set(summary["importance"]) == set(FEATURES) and summary["rows"] == 30


# ---- a registered version: `mlops explain`, and serving ----
@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory, template_store: Path) -> Iterator[dict]:
    """One store with a logreg model (x1, x2, color) registered at @production."""
    root = tmp_path_factory.mktemp("explain")
    shutil.copy(template_store, root / "mlflow.db")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    csv = make_csv(root / "data.csv", n=200)
    with using_store(uri):
        config = config_for(csv, "logreg", "explain.enabled=false", f"experiment=exp-{NAME}")
        result = train(config, register=True)
        mlflow.MlflowClient().set_registered_model_alias(
            NAME, "production", result.registered_version
        )
    yield {"uri": uri, "root": root, "csv": csv, "version": result.registered_version}


@pytest.fixture
def store(registered: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """This test's own copy of the registered store (it may be changed)."""
    db = tmp_path / "mlflow.db"
    shutil.copy(Path(registered["uri"].removeprefix("sqlite:///")), db)
    uri = f"sqlite:///{db}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return {**registered, "uri": uri}


def explained_rows(out: str) -> list[list[str]]:
    rows: list[list[str]] = []
    for line in out.splitlines():
        if line.startswith("row "):
            rows.append([])
        elif line.startswith("  ") and rows and "(the other features)" not in line:
            rows[-1].append(line.split()[-1])
    return rows


def test_mlops_explain_on_an_input_file(
    store: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = tmp_path / "rows.csv"
    pd.read_csv(store["csv"])[FEATURES].head(4).to_csv(rows, index=False)
    code, out, err = run_cli(
        ["explain", NAME, "--alias", "production", "--input", str(rows), "--top", "2"], capsys
    )
    assert code == 0, err
    shown = explained_rows(out)
    assert len(shown) == 4 and all(len(r) == 2 and set(r) <= set(FEATURES) for r in shown)
    assert "log-odds of 'yes'" in out
    (run,) = mlflow.search_runs(
        search_all_experiments=True,
        filter_string=f"attributes.run_name = 'explain-{NAME}-v{store['version']}'",
        output_format="list",
    )
    assert run.data.params["rows"] == "4"
    path = mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="explain/contributions.json"
    )
    logged = json.loads(Path(path).read_text())  # mlflow.log_table's form
    table = pd.DataFrame(logged["data"], columns=logged["columns"])
    assert len(table) == 4 and set(FEATURES) <= set(table.columns)
    assert list(table.columns[:4]) == ["_row", "_explains", "_value", "_expected_value"]
    np.testing.assert_allclose(
        table["_expected_value"] + table[FEATURES].sum(axis=1), table["_value"], atol=1e-9
    )


def test_mlops_explain_a_logged_request(
    store: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mlops.monitoring.store import LOG_FILE
    from mlops.tracking import project_store_url

    model = mlflow.pyfunc.load_model(f"models:/{NAME}@production").unwrap_python_model()
    model.enable_monitoring(project_store_url(None, LOG_FILE))
    records = json.loads(pd.read_csv(store["csv"])[FEATURES].head(3).to_json(orient="records"))
    model.respond(json.dumps({"dataframe_records": records}), "application/json", request_id="r1")
    assert model.monitor.flush(timeout=30)
    model.monitor.close()
    code, out, err = run_cli(["explain", NAME, "--request-id", "r1", "--top", "3"], capsys)
    assert code == 0, err
    shown = explained_rows(out)
    assert len(shown) == 3 and all(sorted(r) == sorted(FEATURES) for r in shown)
    code, _, err = run_cli(["explain", NAME, "--request-id", "nope"], capsys)
    assert code == 1 and "--request-id 'nope'" in err


def test_predict_with_the_explain_param_adds_an_explanation_per_row(store: dict) -> None:
    from mlflow.exceptions import MlflowException

    model = mlflow.pyfunc.load_model(f"models:/{NAME}@production").unwrap_python_model()
    frame = pd.read_csv(store["csv"])[FEATURES].head(3)
    plain = model.predict(None, frame)
    out = model.predict(None, frame, params={"explain": 2})
    pd.testing.assert_frame_equal(out.drop(columns="explanation"), plain)
    assert [len(e["contributions"]) for e in out["explanation"]] == [2, 2, 2]
    # 0 is the default the signature declares: no explanation
    pd.testing.assert_frame_equal(model.predict(None, frame, params={"explain": 0}), plain)
    with pytest.raises(MlflowException, match="params 'explain' must be an integer from 1 to 20"):
        model.predict(None, frame, params={"explain": 21})


def test_a_tampered_pipeline_is_refused_before_it_is_read(
    store: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import skops.io

    uri = mlflow.MlflowClient().get_model_version_download_uri(NAME, store["version"])
    stored = Path(uri.removeprefix("file://")) / "artifacts" / "pipeline.skops"
    original = stored.read_bytes()
    read: list[int] = []
    monkeypatch.setattr(skops.io, "loads", lambda *a, **k: read.append(1))
    monkeypatch.setattr(skops.io, "get_untrusted_types", lambda *a, **k: read.append(1))
    rows = tmp_path / "rows.csv"
    pd.read_csv(store["csv"])[FEATURES].head(2).to_csv(rows, index=False)
    try:
        stored.write_bytes(original + b"tampered")
        code, _, err = run_cli(["explain", NAME, "--input", str(rows)], capsys)
    finally:
        stored.write_bytes(original)  # the module's store is shared by the other tests
    assert code == 1 and "checksum" in err and not read


@pytest.mark.slow
def test_a_served_model_answers_explain_params_over_http(store: dict) -> None:
    frame = pd.read_csv(store["csv"])[FEATURES].head(4)
    records = json.loads(frame.to_json(orient="records"))
    bodies = {
        "dataframe_split": {"dataframe_split": json.loads(frame.to_json(orient="split"))},
        "dataframe_records": {"dataframe_records": records},
        "instances": {"instances": records},
        "inputs": {"inputs": {c: frame[c].tolist() for c in FEATURES}},
    }
    port = free_port()
    cmd = models_serve(f"models:/{NAME}@production", port)
    with running(cmd, server_env(store["uri"]), port, store["root"] / "serve.log") as base:
        check_explain_answers(base, bodies)
    port = free_port()
    cmd = [str(BIN / "mlops"), "serve", NAME, "--alias", "production", "--port", str(port)]
    # the production server, on MLflow's parsing path: a body with params is still ours
    env = server_env(store["uri"], MLOPS_FAST_SERVING="0")
    with running(cmd, env, port, store["root"] / "mlops.log") as base:
        check_explain_answers(base, {"dataframe_records": bodies["dataframe_records"]})


def check_explain_answers(base: str, bodies: dict[str, dict]) -> None:
    for name, body in bodies.items():
        status, plain = post(base, body)
        assert status == 200, (name, plain)
        assert all("explanation" not in row for row in plain["predictions"])
        # an unknown param is ignored, as MLflow ignores params a model does not declare
        assert post(base, {**body, "params": {"other": 1}}) == (200, plain)
        status, answer = post(base, {**body, "params": {"explain": 3}})
        assert status == 200, (name, answer)
        for row, before in zip(answer["predictions"], plain["predictions"], strict=True):
            explanation = row.pop("explanation")
            assert row == before  # the answer itself is unchanged
            parts = explanation["contributions"]
            assert len(parts) == 3 and {p["feature"] for p in parts} == set(FEATURES)
            total = explanation["expected_value"] + sum(p["contribution"] for p in parts)
            assert abs(total + explanation["others"] - explanation["value"]) < 1e-9
            assert explanation["explains"] == "log-odds of 'yes'"
            # the log-odds explained are those of the answered probability
            assert abs(1 / (1 + np.exp(-explanation["value"])) - before["proba_yes"]) < 1e-9
    body = next(iter(bodies.values()))
    # 0 is the default the model's signature declares: no explanation
    assert post(base, {**body, "params": {"explain": 0}}) == post(base, body)
    for bad in (-1, 21, "3", 2.5, True, [3]):
        status, answer = post(base, {**body, "params": {"explain": bad}})
        assert status == 400, (bad, answer)
        assert "'explain'" in answer["message"] and "1 to 20" in answer["message"], answer


@pytest.mark.parametrize(
    "family,task", [("random_forest", "classification"), ("ridge", "regression")]
)
def test_permutation_importance_equals_shuffling_the_original_columns(
    tmp_path: Path, family: str, task: str
) -> None:
    """Shuffling a column's outputs after the preprocessing (all permuted copies scored in one
    call) gives exactly what shuffling the column itself before the whole pipeline gives."""
    from sklearn.metrics import r2_score

    from mlops.explain import permutation_importances

    frame = pd.read_csv(make_csv(tmp_path / "d.csv", n=90))
    frame.loc[::7, "color"] = np.nan
    features = ["x1", "x2", "color"]
    X = frame[features]
    if task == "classification":
        y = (frame["label"] == "yes").to_numpy().astype(int)
    else:
        y = (2 * frame["x1"] - frame["x2"] + (frame["color"] == "red")).to_numpy()
    pipeline = build_model(
        family, task, {}, numeric_columns=["x1", "x2"], categorical_columns=["color"], seed=0
    )
    fit_model(pipeline, X, y)
    got = permutation_importances(pipeline, X, y, features, task=task, repeats=3, seed=5)

    def score(pred: np.ndarray) -> float:
        if task == "classification":
            return float(np.mean(pred.astype(int) == y))
        return float(r2_score(y, pred))

    baseline = score(np.asarray(pipeline.predict(X)))
    rng = np.random.RandomState(5)
    want = np.zeros((3, 3))
    for j, col in enumerate(features):
        for r in range(3):
            shuffled = X.copy()
            shuffled[col] = X[col].to_numpy()[rng.permutation(len(X))]
            want[j, r] = baseline - score(np.asarray(pipeline.predict(shuffled)))
    np.testing.assert_allclose(got, want, atol=1e-12)
    assert np.abs(got).max() > 0  # the features matter: the check is not vacuous


def test_a_column_empty_in_the_training_part_skips_explanations_not_training(
    tmp_path: Path,
) -> None:
    """An imputer drops a column with no value in the training part, so its outputs no longer
    map back to the features: the model is still trained, its explanations skipped with the
    reason as a tag of the run."""
    from mlops.data import prepare
    from mlops.training import _explained, fit_and_evaluate

    csv = make_csv(tmp_path / "d.csv", n=120, sparse=np.linspace(0, 1, 120))
    config = load_config(
        overrides=[f"data.dataset={csv}", "data.target=label", "data.categorical=[color]"]
    )
    split = prepare(config)
    split.train["sparse"] = np.nan  # as if its few values had all landed in validation/test
    pipeline, metrics = fit_and_evaluate(config, split, log=False)
    assert "test_accuracy" in metrics
    with mlflow.start_run() as run:
        assert _explained(pipeline, split, config) == {}
    tags = mlflow.MlflowClient().get_run(run.info.run_id).data.tags
    assert "cannot map" in tags["mlops.explain_skipped"]


def test_explanations_of_more_rows_than_the_limit_are_a_400(store: dict) -> None:
    """explain.max_rows (serving option max_explain_rows) bounds what one request may cost."""
    from mlflow.exceptions import MlflowException

    model = mlflow.pyfunc.load_model(
        f"models:/{NAME}@production", model_config={"max_explain_rows": 3}
    ).unwrap_python_model()
    frame = pd.read_csv(store["csv"])[FEATURES].head(4)
    body = {"dataframe_records": json.loads(frame.to_json(orient="records"))}
    with pytest.raises(MlflowException) as caught:
        model.respond(json.dumps({**body, "params": {"explain": 2}}), "application/json")
    assert caught.value.get_http_status_code() == 400
    assert "at most 3 rows" in caught.value.message and "has 4" in caught.value.message
    with pytest.raises(MlflowException, match="at most 3 rows"):
        model.predict(None, frame, params={"explain": 2})
    # within the limit, and without explain, as before
    three = {"dataframe_records": body["dataframe_records"][:3], "params": {"explain": 2}}
    assert len(json.loads(model.respond(json.dumps(three), "application/json"))["predictions"]) == 3
    assert len(json.loads(model.respond(json.dumps(body), "application/json"))["predictions"]) == 4


def _logged_status(url: str, request_id: str) -> list[int]:
    import sqlalchemy as sa

    from mlops.monitoring.store import PREDICTIONS

    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            query = sa.select(PREDICTIONS.c.status).where(PREDICTIONS.c.request_id == request_id)
            return sorted({int(r[0]) for r in conn.execute(query)})
    finally:
        engine.dispose()


def test_a_server_without_shap_answers_501_and_a_failed_explanation_500_each_logged_so(
    store: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No explanation is promised before it is made: a server without shap refuses the request
    (501, naming shap) before scoring it, and an explainer that fails makes the request a 500;
    the prediction log records each with that status, not as answered."""
    import sys

    from mlflow.exceptions import MlflowException

    url = f"sqlite:///{tmp_path / 'predictions.db'}"
    frame = pd.read_csv(store["csv"])[FEATURES].head(2)
    body = json.dumps(
        {"dataframe_records": json.loads(frame.to_json(orient="records")), "params": {"explain": 2}}
    )

    model = mlflow.pyfunc.load_model(f"models:/{NAME}@production").unwrap_python_model()
    model.enable_monitoring(url)
    monkeypatch.setitem(sys.modules, "shap", None)  # `import shap` raises ImportError
    for mlops_module in [m for m in sys.modules if m == "mlops.explain"]:
        monkeypatch.delitem(sys.modules, mlops_module)
    with pytest.raises(MlflowException) as caught:
        model.respond(body, "application/json", request_id="no-shap")
    assert caught.value.get_http_status_code() == 501
    assert "need the shap package" in caught.value.message
    # both servers answer it through the adapter's one error path: a 501 in MLflow's JSON,
    # also when MLflow wraps it in an error of its own
    from mlops.serving.adapter import _failure

    for raised in (caught.value, MlflowException("Failed to predict")):
        if raised is not caught.value:
            raised.__cause__ = caught.value
        answer = _failure(raised)
        assert answer.status == 501, answer
        assert "need the shap package" in json.loads(answer.response)["message"]
    with pytest.raises(MlflowException) as caught:
        model.predict(None, frame, params={"explain": 2})
    assert caught.value.get_http_status_code() == 501
    monkeypatch.undo()
    # without params the same server still answers
    assert (
        len(
            json.loads(
                model.respond(body.replace('"explain": 2', '"explain": 0'), "application/json")
            )["predictions"]
        )
        == 2
    )

    class Broken:
        def explain_transformed(self, X: object) -> None:
            raise RuntimeError("the explainer broke")

        explain = explain_transformed

    model.explainer = Broken()
    with pytest.raises(MlflowException) as caught:
        model.respond(body, "application/json", request_id="broken")
    assert caught.value.get_http_status_code() == 500
    assert model.monitor.flush(timeout=30)
    model.monitor.close()
    assert _logged_status(url, "no-shap") == [501]
    assert _logged_status(url, "broken") == [500]


def test_a_kernel_explanation_is_the_same_every_time_and_leaves_numpy_s_generator_alone() -> None:
    """The kernel explainer samples coalitions (8 features: 254 of them, 20 sampled); seeded,
    the same rows get the same explanation every time, and the process's own random sequence
    goes on as if nothing had happened."""
    rng = np.random.default_rng(3)
    X = pd.DataFrame(rng.normal(size=(300, 8)), columns=[f"f{i}" for i in range(8)])
    y = np.where(X["f0"] + X["f1"] * X["f2"] - X["f3"] > 0, "yes", "no")
    pipeline = fitted("logreg", "classification", X, y)
    explainer = explainer_for(pipeline, "keras_mlp", "classification", X, classes=["no", "yes"])
    assert explainer.kind == "kernel"
    explainer.kernel_samples = 20
    np.random.seed(42)
    expected_next = np.random.random()
    np.random.seed(42)
    first = explainer.explain(X.head(3)).as_records(8)
    assert np.random.random() == expected_next
    for _ in range(2):
        np.random.seed(7)  # whatever the process's generator holds
        assert explainer.explain(X.head(3)).as_records(8) == first
