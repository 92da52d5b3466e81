"""The reference profile logged with every model, and the drift statistics measured against it.

At training time :func:`build_profile` summarizes the training data per feature (bin edges at
training quantiles, the share of rows in each bin, 101 quantiles for the Kolmogorov–Smirnov
test; category shares for categorical features), the prediction distribution on the
validation split and the validation metrics. It travels inside the model as
``artifacts/reference_profile.json``, so monitoring needs nothing else from the training run.

A sensitive feature (``monitoring.sensitive_columns``) gets no summary at all: quantiles, bin
edges and categories are its raw values. Its entry says only its kind and ``"masked": true``;
the prediction log hashes or masks it, so drift is not computed on it either.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from mlops.metrics import evaluate

PROFILE_ARTIFACT = "reference_profile"
PROFILE_VERSION = 1
# a categorical feature lists at most this many categories (a free-text column has thousands)
MAX_CATEGORIES = 100


def numeric_reference(values: np.ndarray, bins: int) -> dict[str, Any]:
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    inner = (
        np.unique(np.quantile(values, np.linspace(0, 1, bins + 1)[1:-1]))
        if len(values)
        else np.array([])
    )
    return {
        "kind": "numeric",
        "edges": inner.tolist(),  # bins: (-inf, e0], (e0, e1], ..., (e_last, inf)
        "shares": numeric_shares(values, inner).tolist(),
        "quantiles": np.quantile(values, np.linspace(0, 1, 101)).tolist() if len(values) else [],
        "mean": float(values.mean()) if len(values) else None,
        "std": float(values.std()) if len(values) else None,
        "null_share": 0.0,
    }


def categorical_reference(
    values: Sequence[Any], max_categories: int = MAX_CATEGORIES
) -> dict[str, Any]:
    """Category shares; past ``max_categories`` distinct values (free text) only the most common
    are listed, and the rest's total share is ``other_share``."""
    series = pd.Series(values, dtype=object).dropna().astype(str)
    shares = series.value_counts(normalize=True)
    ref: dict[str, Any] = {"kind": "categorical"}
    if len(shares) > max_categories:
        # most common first, ties by value, so the same data gives the same profile
        ordered = sorted(shares.items(), key=lambda kv: (-kv[1], str(kv[0])))
        kept = pd.Series(dict(ordered[:max_categories]))
        ref["other_share"] = float(1.0 - kept.sum())
        ref["distinct"] = int(len(shares))
        shares = kept
    ref["shares"] = {str(k): float(v) for k, v in shares.sort_index().items()}
    return ref


def masked_reference(kind: str) -> dict[str, Any]:
    """The entry of a sensitive feature: no value of it, only that it is there and masked."""
    return {"kind": kind, "masked": True}


def build_profile(
    pipeline: Any, split: Any, *, bins: int = 10, sensitive: Sequence[str] = ()
) -> dict[str, Any]:
    """The reference profile of a model trained on ``split``; the ``sensitive`` features are
    marked masked and carry none of their values."""
    features: dict[str, Any] = {}
    train = split.train
    hidden = set(sensitive)
    for col in split.numeric_columns:
        if col in hidden:
            features[col] = masked_reference("numeric")
            continue
        ref = numeric_reference(train[col].to_numpy(dtype=float), bins)
        ref["null_share"] = float(train[col].isna().mean())
        features[col] = ref
    for col in split.categorical_columns:
        features[col] = (
            masked_reference("categorical")
            if col in hidden
            else categorical_reference(train[col].tolist())
        )
    X_val, y_val = split.xy("validation")
    predicted = np.asarray(pipeline.predict(X_val))
    if split.task == "classification":
        classes = list(split.classes or [])
        labels = [str(classes[int(i)]) if classes else str(i) for i in predicted]
        prediction = categorical_reference(labels)
    else:
        prediction = numeric_reference(predicted.astype(float), bins)
    metrics = evaluate(pipeline, split, X_val, y_val)
    return {
        "profile_version": PROFILE_VERSION,
        "task": split.task,
        "classes": [str(c) for c in split.classes] if split.classes else None,
        "rows": int(len(train)),
        "data_hash": split.content_hash,
        "features": features,
        "prediction": prediction,
        "validation_metrics": {
            k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(v)
        },
    }


def numeric_shares(values: np.ndarray, inner_edges: np.ndarray) -> np.ndarray:
    counts = np.bincount(
        np.searchsorted(inner_edges, values, side="left"), minlength=len(inner_edges) + 1
    )
    return counts / max(len(values), 1)
