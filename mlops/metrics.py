"""The one implementation of the evaluation metrics, used by training, tuning, gates and monitoring.

Conventions, the same everywhere: classification labels are compared as given, ``classes``
lists them in the model's order, binary F1 is the F1 of the positive class ``classes[1]``
(the second label in sorted order, as scikit-learn's own default), more than two classes
take the unweighted (macro) mean. Probabilities, when given, have one column per class in
``classes`` order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from sklearn import metrics as skm

from mlops.data import DatasetSplit, encode_target

CLASSIFICATION = ("accuracy", "f1", "precision", "recall", "roc_auc", "log_loss")
REGRESSION = ("rmse", "mae", "r2")
LOWER_IS_BETTER = frozenset({"rmse", "mae", "log_loss"})


def classification(
    y_true: ArrayLike,
    y_pred: ArrayLike,
    classes: Sequence[Any],
    proba: np.ndarray | None = None,
) -> dict[str, float]:
    """Accuracy, F1, precision and recall, and with ``proba`` log loss and ROC AUC (when every
    class occurs)."""
    truth, pred = _labels(y_true), _labels(y_pred)
    labels = list(classes)
    out = {"accuracy": float(np.mean(truth == pred)) if len(truth) else float("nan")}
    # binary: of the positive class (classes[1]); more classes: the unweighted mean over classes
    averaging: dict[str, Any] = (
        {"pos_label": labels[1], "average": "binary"} if len(labels) == 2 else {"average": "macro"}
    )
    for name, score in (
        ("f1", skm.f1_score),
        ("precision", skm.precision_score),
        ("recall", skm.recall_score),
    ):
        out[name] = float(score(truth, pred, labels=labels, zero_division=0, **averaging))
    if proba is not None and len(truth):
        proba = np.asarray(proba, dtype=float)
        codes = _codes(truth, labels)
        known = codes >= 0
        out["log_loss"] = float(
            skm.log_loss(codes[known], proba[known], labels=list(range(len(labels))))
        )
        if len(np.unique(codes[known])) == len(labels):
            out["roc_auc"] = float(
                skm.roc_auc_score(codes[known], proba[known, 1])
                if len(labels) == 2
                else skm.roc_auc_score(
                    codes[known], proba[known], multi_class="ovr", labels=list(range(len(labels)))
                )
            )
    return out


def regression(y_true: ArrayLike, y_pred: ArrayLike) -> dict[str, float]:
    """RMSE, MAE and R² over the rows where both values are finite."""
    truth, pred = np.asarray(y_true, dtype=float), np.asarray(y_pred, dtype=float)
    keep = np.isfinite(truth) & np.isfinite(pred)
    truth, pred = truth[keep], pred[keep]
    if not len(truth):
        return {}
    return {
        "rmse": float(np.sqrt(skm.mean_squared_error(truth, pred))),
        "mae": float(skm.mean_absolute_error(truth, pred)),
        "r2": float(skm.r2_score(truth, pred)) if len(truth) > 1 else float("nan"),
    }


def evaluate(pipeline: Any, split: DatasetSplit, X: pd.DataFrame, y: pd.Series) -> dict[str, float]:
    """The task's metrics of a fitted pipeline (which predicts class codes) on ``X``, ``y``."""
    y_true = encode_target(split, y)
    if split.task == "regression":
        return regression(y_true, pipeline.predict(X))
    codes = list(range(len(split.classes or ())))
    pred = np.asarray(pipeline.predict(X)).astype(int)
    proba = pipeline.predict_proba(X) if hasattr(pipeline, "predict_proba") else None
    return classification(y_true, pred, codes, proba)


def higher_is_better(metric: str) -> bool:
    """Whether a larger value of ``metric`` (``accuracy``, ``validation_rmse``...) is better."""
    return not any(metric == m or metric.endswith("_" + m) for m in LOWER_IS_BETTER)


def _labels(values: ArrayLike) -> np.ndarray:
    """Labels as an array scikit-learn reads as classes: text as str, codes as int."""
    array = np.asarray(values)
    if array.dtype == object:
        array = array.astype(str) if all(isinstance(v, str) for v in array) else array.astype(int)
    return array


def _codes(values: np.ndarray, labels: list[Any]) -> np.ndarray:
    index = {label: i for i, label in enumerate(labels)}
    return np.array([index.get(v, -1) for v in values], dtype=int)
