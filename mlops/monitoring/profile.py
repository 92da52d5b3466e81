"""The reference profile logged with every model, and the drift statistics measured against it.

At training time :func:`build_profile` summarizes the training data per feature (bin edges at
training quantiles, the share of rows in each bin, 101 quantiles for the Kolmogorov–Smirnov
test; category shares for categorical features), the prediction distribution on the
validation split and the validation metrics. It travels inside the model as
``artifacts/reference_profile.json``, so monitoring needs nothing else from the training run.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import pandas as pd
from scipy import stats

PROFILE_ARTIFACT = "reference_profile"
PROFILE_VERSION = 1
_EPS = 1e-4  # share floor in PSI: an empty bin on one side is not an infinite drift


def numeric_reference(values: np.ndarray, bins: int) -> dict[str, Any]:
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    inner = np.unique(np.quantile(values, np.linspace(0, 1, bins + 1)[1:-1])) if len(values) else np.array([])
    return {
        "kind": "numeric",
        "edges": inner.tolist(),  # bins: (-inf, e0], (e0, e1], ..., (e_last, inf)
        "shares": _numeric_shares(values, inner).tolist(),
        "quantiles": np.quantile(values, np.linspace(0, 1, 101)).tolist() if len(values) else [],
        "mean": float(values.mean()) if len(values) else None,
        "std": float(values.std()) if len(values) else None,
        "null_share": 0.0,
    }


def categorical_reference(values: Sequence[Any]) -> dict[str, Any]:
    series = pd.Series(values, dtype=object).dropna().astype(str)
    shares = series.value_counts(normalize=True).sort_index()
    return {"kind": "categorical", "shares": {str(k): float(v) for k, v in shares.items()}}


def build_profile(pipeline: Any, split: Any, *, bins: int = 10) -> dict[str, Any]:
    """The reference profile of a model trained on ``split``."""
    from mlops.training import evaluate

    features: dict[str, Any] = {}
    train = split.train
    for col in split.numeric_columns:
        ref = numeric_reference(train[col].to_numpy(dtype=float), bins)
        ref["null_share"] = float(train[col].isna().mean())
        features[col] = ref
    for col in split.categorical_columns:
        features[col] = categorical_reference(train[col].tolist())
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
        "validation_metrics": {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(v)},
    }


def _numeric_shares(values: np.ndarray, inner_edges: np.ndarray) -> np.ndarray:
    counts = np.bincount(np.searchsorted(inner_edges, values, side="left"), minlength=len(inner_edges) + 1)
    return counts / max(len(values), 1)


def psi(reference_shares: Sequence[float], current_shares: Sequence[float]) -> float:
    """Population stability index of two share vectors over the same bins."""
    ref = np.clip(np.asarray(reference_shares, dtype=float), _EPS, None)
    cur = np.clip(np.asarray(current_shares, dtype=float), _EPS, None)
    return float(np.sum((cur - ref) * np.log(cur / ref)))


def numeric_drift(reference: dict[str, Any], values: np.ndarray) -> dict[str, float]:
    """PSI over the reference bins and the KS statistic / p-value against the reference quantiles."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if not len(values) or not reference["quantiles"]:
        return {}
    edges = np.asarray(reference["edges"], dtype=float)
    out = {"psi": psi(reference["shares"], _numeric_shares(values, edges))}
    quantiles = np.asarray(reference["quantiles"], dtype=float)
    probs = np.linspace(0, 1, len(quantiles))
    # the reference CDF, piecewise linear through its quantiles (flat runs collapse to a step)
    xs = np.unique(quantiles)
    last = len(quantiles) - 1 - np.unique(quantiles[::-1], return_index=True)[1]
    ps = probs[last]
    if len(xs) == 1:
        def cdf(x: np.ndarray) -> np.ndarray:
            return (np.asarray(x) >= xs[0]).astype(float)
    else:
        def cdf(x: np.ndarray) -> np.ndarray:
            return np.interp(x, xs, ps, left=0.0, right=1.0)
    # the exact p-value costs ~0.1 s per feature at 100,000 rows; the asymptotic one is as good there
    result = stats.kstest(values, cdf, method="auto" if len(values) < 10_000 else "asymp")
    out["ks"] = float(result.statistic)
    out["ks_pvalue"] = float(result.pvalue)
    return out


def categorical_drift(reference: dict[str, Any], values: Sequence[Any]) -> dict[str, float]:
    """PSI over the reference categories plus one bin for categories never seen in training."""
    _, ref, cur = _category_shares(reference, values)
    return {"psi": psi(ref, cur)} if cur is not None else {}


def _category_shares(reference: dict[str, Any], values: Sequence[Any]) -> tuple[list[str], list[float], list[float] | None]:
    """Category names (+ "(new)"), their reference shares and their shares in ``values``."""
    cats = list(reference["shares"])
    ref = [reference["shares"][c] for c in cats] + [0.0]
    series = pd.Series(values, dtype=object).dropna().astype(str)
    if series.empty:
        return cats + ["(new)"], ref, None
    counts = series.value_counts(normalize=True)
    cur = [float(counts.get(c, 0.0)) for c in cats] + [float(counts[~counts.index.isin(cats)].sum())]
    return cats + ["(new)"], ref, cur


def shares_for_plot(reference: dict[str, Any], values: Sequence[Any]) -> tuple[list[str], list[float], list[float]]:
    """Bin labels, reference shares and current shares, for the drift report's bar charts."""
    if reference["kind"] != "numeric":
        labels, ref, cur = _category_shares(reference, values)
        return labels, ref, cur if cur is not None else [0.0] * len(ref)
    edges = np.asarray(reference["edges"], dtype=float)
    vals = pd.to_numeric(pd.Series(values), errors="coerce").to_numpy(dtype=float)
    vals = vals[np.isfinite(vals)]
    labels = [f"≤{edges[0]:.3g}"] if len(edges) else ["all"]
    labels += [f"{a:.3g}–{b:.3g}" for a, b in zip(edges[:-1], edges[1:])]
    if len(edges):
        labels.append(f">{edges[-1]:.3g}")
    return labels, list(reference["shares"]), _numeric_shares(vals, edges).tolist()
