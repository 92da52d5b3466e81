"""Training: build the configured family, fit it, evaluate, plot and log the model.

The public entry point is :func:`train`; it runs inside the active MLflow run (or starts
one) and returns a :class:`TrainingResult`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: plots go to files, never to a window

import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import numpy as np  # noqa: E402
from sklearn import metrics as skm  # noqa: E402
from sklearn.preprocessing import label_binarize  # noqa: E402

from mlops import data as data_step  # noqa: E402
from mlops.config import Config  # noqa: E402
from mlops.data import DatasetSplit, encode_target  # noqa: E402
from mlops.lineage import log_split  # noqa: E402
from mlops.metrics import evaluate  # noqa: E402
from mlops.models import build_model, fit_model  # noqa: E402
from mlops.serving.flavor import log_model  # noqa: E402
from mlops.tracking import batched_async_logging, log_config, step_run  # noqa: E402

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingResult:
    """What a training run produced."""

    run_id: str
    model_uri: str
    family: str
    task: str
    data_hash: str
    metrics: dict[str, float] = field(default_factory=dict)
    registered_version: str | None = None


def train(
    config: Config, split: DatasetSplit | None = None, *, register: bool = False
) -> TrainingResult:
    """Prepare the data (unless given), train, evaluate and log the model on one MLflow run.

    Example:
        >>> result = train(load_config(overrides=["model.family=hist_gb"]))
        >>> result.metrics["test_accuracy"]
    """
    with step_run(config, run_name=f"train-{config.model.family}") as run:
        log_config(config)
        if split is None:
            split = data_step.prepare(config)
        log_split(split, max_mb=config.data.log_data_max_mb)
        pipeline, metrics = fit_and_evaluate(config, split)
        _log_plots(pipeline, split)
        if config.explain.enabled:
            metrics.update(_explained(pipeline, split, config))
        info = log_model(pipeline, split, config)
        version = None
        if register:
            from mlops.registry import register as register_version

            version = register_version(info.model_uri, config.registry.model_name).version
        return TrainingResult(
            run_id=run.info.run_id,
            model_uri=info.model_uri,
            family=config.model.family,
            task=split.task,
            data_hash=split.content_hash,
            metrics=metrics,
            registered_version=str(version) if version is not None else None,
        )


def fit_and_evaluate(
    config: Config, split: DatasetSplit, *, log: bool = True
) -> tuple[Any, dict[str, float]]:
    """Fit the configured model on train and score it on validation and test.

    With ``log``, per-epoch metrics (Keras) and final metrics go to the active run.
    """
    pipeline = build_model(
        config.model.family,
        split.task,
        config.model.params,
        numeric_columns=split.numeric_columns,
        categorical_columns=split.categorical_columns,
        seed=config.seed,
        features=config.data.features,
    )
    X_train, y_train = split.xy("train")
    X_val, y_val = split.xy("validation")

    def on_epoch_end(epoch: int, logs: dict[str, float]) -> None:
        # Keras names validation metrics val_*; train-side ones get a train_ prefix.
        named = {
            (k if k.startswith("val_") else f"train_{k}"): v
            for k, v in logs.items()
            if np.isfinite(v)
        }
        # queued, sent in batches by MLflow's async logger (batched_async_logging; flushed when
        # the run ends): an epoch never waits for a round trip to a tracking server
        mlflow.log_metrics(named, step=epoch, synchronous=False)

    with batched_async_logging():
        fit_model(
            pipeline,
            X_train,
            encode_target(split, y_train),
            X_val,
            encode_target(split, y_val),
            on_epoch_end=on_epoch_end if log else None,
            family=config.model.family,
        )
    metrics: dict[str, float] = {}
    for part in ("validation", "test"):
        X, y = split.xy(part)
        metrics.update({f"{part}_{k}": v for k, v in evaluate(pipeline, split, X, y).items()})
    if log:
        mlflow.log_metrics(metrics)
        epochs = getattr(pipeline.steps[-1][1], "n_epochs_", None)
        if epochs is not None:
            mlflow.log_metric("epochs_trained", epochs)
    return pipeline, metrics


def _explained(pipeline: Any, split: DatasetSplit, config: Config) -> dict[str, float]:
    """The global explanations (:mod:`mlops.explain`) on the active run, or, where this model's
    preprocessing cannot be mapped back to its features (an imputer drops a column that is
    empty in the training part), none: a warning and the tag ``mlops.explain_skipped`` with
    the reason, and the model is trained and logged as without explanations."""
    from mlops.explain import log_global_explanations

    try:
        return log_global_explanations(pipeline, split, config)
    except ValueError as exc:
        logger.warning("explanations skipped: %s", exc)
        mlflow.set_tag("mlops.explain_skipped", str(exc)[:500])
        return {}


def _log_plots(pipeline: Any, split: DatasetSplit) -> None:
    X, y = split.xy("test")
    y_true = encode_target(split, y)
    if split.task == "regression":
        pred = pipeline.predict(X)
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
        ax1.scatter(pred, y_true - pred, s=10, alpha=0.6)
        ax1.axhline(0, color="grey", lw=1)
        ax1.set(xlabel="predicted", ylabel="residual (true - predicted)", title="Residuals (test)")
        ax2.scatter(y_true, pred, s=10, alpha=0.6)
        lims = [min(y_true.min(), pred.min()), max(y_true.max(), pred.max())]
        ax2.plot(lims, lims, color="grey", lw=1)
        ax2.set(xlabel="true", ylabel="predicted", title="Predicted vs true (test)")
        fig.tight_layout()
        mlflow.log_figure(fig, "plots/residuals.png")
        plt.close(fig)
        return
    classes = list(split.classes or ())
    pred = np.asarray(pipeline.predict(X)).astype(int)
    fig, ax = plt.subplots(figsize=(5, 4.5))
    skm.ConfusionMatrixDisplay.from_predictions(
        y_true,
        pred,
        labels=list(range(len(classes))),
        display_labels=classes,
        ax=ax,
        colorbar=False,
    )
    ax.set_title("Confusion matrix (test)")
    fig.tight_layout()
    mlflow.log_figure(fig, "plots/confusion_matrix.png")
    plt.close(fig)
    if hasattr(pipeline, "predict_proba"):
        proba = pipeline.predict_proba(X)
        fig, ax = plt.subplots(figsize=(5, 4.5))
        if len(classes) == 2:
            skm.RocCurveDisplay.from_predictions(
                y_true, proba[:, 1], name=f"{classes[1]} vs {classes[0]}", ax=ax
            )
        else:
            onehot = label_binarize(y_true, classes=list(range(len(classes))))
            for i, cls in enumerate(classes):
                if onehot[:, i].any() and not onehot[:, i].all():
                    skm.RocCurveDisplay.from_predictions(
                        onehot[:, i], proba[:, i], name=f"{cls} vs rest", ax=ax
                    )
        ax.plot([0, 1], [0, 1], color="grey", lw=1, ls="--")
        # scikit-learn labels the axes with the class code ("Positive label: 1"): name the class
        positive = (
            f"positive class: {classes[1]}" if len(classes) == 2 else "each class vs the rest"
        )
        ax.set(
            xlabel=f"False positive rate ({positive})", ylabel=f"True positive rate ({positive})"
        )
        ax.set_title("ROC curve (test)")
        fig.tight_layout()
        mlflow.log_figure(fig, "plots/roc_curve.png")
        plt.close(fig)
        _log_precision_recall(y_true, proba, classes)


def _log_precision_recall(y_true: np.ndarray, proba: np.ndarray, classes: list[str]) -> None:
    """The precision-recall curve on the test split: of the positive class (binary), or of each
    class against the rest with their micro-average (more classes)."""
    fig, ax = plt.subplots(figsize=(5, 4.5))
    if len(classes) == 2:
        skm.PrecisionRecallDisplay.from_predictions(
            y_true, proba[:, 1], name=f"{classes[1]} vs {classes[0]}", ax=ax, plot_chance_level=True
        )
        positive = f"positive class: {classes[1]}"
    else:
        onehot = label_binarize(y_true, classes=list(range(len(classes))))
        for i, cls in enumerate(classes):
            if onehot[:, i].any():
                skm.PrecisionRecallDisplay.from_predictions(
                    onehot[:, i], proba[:, i], name=f"{cls} vs rest", ax=ax
                )
        skm.PrecisionRecallDisplay.from_predictions(
            onehot.ravel(), proba.ravel(), name="micro-average", ax=ax, linestyle="--"
        )
        positive = "each class vs the rest"
    ax.set(xlabel=f"Recall ({positive})", ylabel=f"Precision ({positive})")
    ax.set_title("Precision-recall curve (test)")
    fig.tight_layout()
    mlflow.log_figure(fig, "plots/precision_recall_curve.png")
    plt.close(fig)
