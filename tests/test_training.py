from __future__ import annotations

import os

import mlflow
import numpy as np
import pytest

from mlops.config import load_config
from mlops.errors import ConfigError
from mlops.training import train

CASES = [
    ("logreg", "sklearn:breast_cancer", []),
    ("ridge", "sklearn:diabetes", []),
    ("random_forest", "sklearn:wine", ["model.params.n_estimators=20", "model.params.n_jobs=1"]),
    (
        "random_forest",
        "sklearn:diabetes",
        ["model.params.n_estimators=20", "model.params.n_jobs=1"],
    ),
    ("hist_gb", "sklearn:wine", ["model.params.max_iter=20"]),
    ("hist_gb", "sklearn:diabetes", ["model.params.max_iter=20"]),
    (
        "keras_mlp",
        "sklearn:breast_cancer",
        ["model.params.epochs=6", "model.params.hidden_units=[16]"],
    ),
    ("keras_mlp", "sklearn:diabetes", ["model.params.epochs=6", "model.params.hidden_units=[16]"]),
]


@pytest.mark.parametrize("family,dataset,extra", CASES, ids=[f"{c[0]}-{c[1][8:]}" for c in CASES])
def test_train_logs_everything_and_the_model_predicts(
    family: str, dataset: str, extra: list[str]
) -> None:
    config = load_config(overrides=[f"model.family={family}", f"data.dataset={dataset}", *extra])
    result = train(config)
    client = mlflow.MlflowClient()
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"

    params = run.data.params
    assert params["model.family"] == family
    assert params["data.dataset"] == dataset
    assert params["data_hash"] == result.data_hash
    assert run.data.tags["mlops.data_hash"] == result.data_hash

    metrics = run.data.metrics
    if result.task == "classification":
        expected = {"accuracy", "f1", "precision", "recall", "roc_auc", "log_loss"}
        plots = {
            "plots/confusion_matrix.png",
            "plots/roc_curve.png",
            "plots/precision_recall_curve.png",
        }
    else:
        expected = {"rmse", "mae", "r2"}
        plots = {"plots/residuals.png"}
    for part in ("validation", "test"):
        for name in expected:
            assert np.isfinite(metrics[f"{part}_{name}"]), f"{part}_{name}"
    plots |= {"plots/permutation_importance.png", "plots/shap_summary.png"}  # explain.enabled
    assert {a.path for a in client.list_artifacts(result.run_id, "plots")} == plots

    contexts = {
        {t.key: t.value for t in d.tags}["mlflow.data.context"] for d in run.inputs.dataset_inputs
    }
    assert contexts == {"train", "validation", "test"}

    model = mlflow.pyfunc.load_model(result.model_uri)
    assert model.metadata.signature is not None
    assert model.metadata.saved_input_example_info is not None
    from sklearn import datasets

    frame = getattr(datasets, f"load_{dataset.split(':')[1]}")(as_frame=True).data.head(10)
    out = model.predict(frame)
    assert len(out) == 10
    if result.task == "classification":
        bunch = getattr(datasets, f"load_{dataset.split(':')[1]}")()
        assert set(out["prediction"]) <= set(map(str, bunch.target_names))
        proba = out[[c for c in out.columns if c.startswith("proba_")]]
        assert proba.shape[1] == len(bunch.target_names)
        assert np.allclose(proba.sum(axis=1), 1.0, atol=1e-4)
        assert result.metrics["test_accuracy"] > 0.6
    else:
        assert out["prediction"].dtype == float


def test_keras_logs_per_epoch_step_metrics() -> None:
    config = load_config(
        overrides=["model.family=keras_mlp", "model.params.epochs=5", "model.params.patience=50"]
    )
    result = train(config)
    client = mlflow.MlflowClient()
    history = client.get_metric_history(result.run_id, "val_loss")
    assert [m.step for m in history] == [0, 1, 2, 3, 4]
    assert len(client.get_metric_history(result.run_id, "train_loss")) == 5
    assert client.get_run(result.run_id).data.metrics["epochs_trained"] == 5


def test_unknown_family_lists_valid_ones() -> None:
    with pytest.raises(
        ConfigError,
        match=r"unknown model family 'xgb'; choose one of: "
        r"logreg, ridge, random_forest, hist_gb, keras_mlp",
    ):
        train(load_config(overrides=["model.family=xgb"]))


def test_family_that_cannot_do_the_task() -> None:
    with pytest.raises(
        ConfigError, match=r"'logreg' does not do regression; for regression use one of: ridge"
    ):
        train(load_config(overrides=["data.dataset=sklearn:diabetes"]))


def test_unknown_hyperparameter_names_it_and_the_valid_ones() -> None:
    with pytest.raises(
        ConfigError,
        match=r"\['n_trees'\] not accepted by random_forest.*valid parameters: .*n_estimators",
    ):
        train(load_config(overrides=["model.family=random_forest", "model.params.n_trees=5"]))


def test_failed_training_leaves_run_failed_not_running() -> None:
    with pytest.raises(ConfigError):
        train(load_config(overrides=["model.family=random_forest", "model.params.n_trees=5"]))
    runs = mlflow.search_runs(experiment_names=["mlops"], output_format="list")
    assert len(runs) == 1 and runs[0].info.status == "FAILED"


@pytest.mark.parametrize(
    "override,message",
    [
        ("model.params.dropout=1.5", r"'dropout' parameter must be a float in \[0, 1\), got 1.5"),
        ("model.params.epochs=0", r"'epochs' parameter must be an integer >= 1, got 0"),
        ("model.params.hidden_units=[8, -1]", r"hidden_units must be a list of positive integers"),
        (
            "model.params.learning_rate=fast",
            r"'learning_rate' parameter must be a float > 0, got 'fast'",
        ),
    ],
)
def test_keras_hyperparameters_are_checked_before_training(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        train(load_config(overrides=["model.family=keras_mlp", override]))


def test_each_run_goes_to_its_configured_experiment() -> None:
    a = train(load_config(overrides=["experiment=first", "model.params.max_iter=200"]))
    b = train(load_config(overrides=["experiment=second", "model.params.max_iter=200"]))
    client = mlflow.MlflowClient()
    names = {
        client.get_experiment(client.get_run(r.run_id).info.experiment_id).name for r in (a, b)
    }
    assert names == {"first", "second"}


@pytest.mark.parametrize(
    "truth,pred,classes",
    [
        (["a", "b", "b", "a", "b", "b"], ["a", "b", "a", "a", "b", "a"], ["a", "b"]),
        ([0, 0, 0, 1, 1, 2, 2], [0, 0, 0, 1, 0, 2, 1], [0, 1, 2]),
    ],
    ids=["binary", "multiclass"],
)
def test_precision_and_recall_follow_the_metric_conventions(
    truth: list[object], pred: list[object], classes: list[object]
) -> None:
    """Binary: of the positive class (the second label); more classes: the macro mean."""
    from sklearn import metrics as skm

    from mlops.metrics import classification

    out = classification(truth, pred, classes)
    if len(classes) == 2:
        # positive class "b": predicted b 2 times, both right; 4 true b, 2 found
        assert out["precision"] == 1.0
        assert out["recall"] == 0.5
    else:
        # per class precision 3/4, 1/2, 1/1 and recall 3/3, 1/2, 1/2
        assert out["precision"] == pytest.approx(0.75)
        assert out["recall"] == pytest.approx(2 / 3)
        assert out["precision"] == pytest.approx(
            skm.precision_score(truth, pred, average="macro", zero_division=0)
        )


def test_batched_async_logging_sets_mlflows_buffer_for_the_block_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Per-epoch metrics are merged by MLflow's async logger (one request per second, not per
    epoch) only while a model fits; a buffer the user set is theirs; every metric arrives."""
    from mlops.tracking import ASYNC_BUFFER_ENV, batched_async_logging

    monkeypatch.delenv(ASYNC_BUFFER_ENV, raising=False)
    with mlflow.start_run() as run:
        with batched_async_logging():
            assert os.environ[ASYNC_BUFFER_ENV] == "1"
            with batched_async_logging():  # nested (a tuning trial inside a fit): still on
                pass
            assert os.environ[ASYNC_BUFFER_ENV] == "1"
            for step in range(50):
                mlflow.log_metrics({"loss": 1.0 / (step + 1)}, step=step, synchronous=False)
            mlflow.flush_async_logging()
        assert ASYNC_BUFFER_ENV not in os.environ
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(50))
    monkeypatch.setenv(ASYNC_BUFFER_ENV, "3")
    with batched_async_logging():
        assert os.environ[ASYNC_BUFFER_ENV] == "3"
    assert os.environ[ASYNC_BUFFER_ENV] == "3"
