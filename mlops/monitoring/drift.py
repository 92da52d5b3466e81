"""Drift statistics of served data against a model's reference profile (see :mod:`.profile`).

PSI over the reference bins (numeric) or categories (plus one bin for categories never seen
in training), and the Kolmogorov–Smirnov test against the reference quantiles.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from scipy import stats

from mlops.monitoring.profile import numeric_shares

_EPS = 1e-4  # share floor in PSI: an empty bin on one side is not an infinite drift


def metric_key(name: str) -> str:
    """A feature name as MLflow accepts it in a metric key."""
    return re.sub(r"[^\w\-. :/]", "_", str(name))


def psi(reference_shares: ArrayLike, current_shares: ArrayLike) -> float:
    """Population stability index of two share vectors over the same bins."""
    ref = np.clip(np.asarray(reference_shares, dtype=float), _EPS, None)
    cur = np.clip(np.asarray(current_shares, dtype=float), _EPS, None)
    return float(np.sum((cur - ref) * np.log(cur / ref)))


def numeric_drift(reference: dict[str, Any], values: np.ndarray) -> dict[str, float]:
    """PSI over the reference bins and the KS statistic / p-value against the reference
    quantiles."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if not len(values) or not reference["quantiles"]:
        return {}
    edges = np.asarray(reference["edges"], dtype=float)
    out = {"psi": psi(reference["shares"], numeric_shares(values, edges))}
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

    # the exact p-value costs ~0.1 s per feature at 100,000 rows; the asymptotic one is as good
    # there
    result = stats.kstest(values, cdf, method="auto" if len(values) < 10_000 else "asymp")
    out["ks"] = float(result.statistic)
    out["ks_pvalue"] = float(result.pvalue)
    return out


def categorical_drift(reference: dict[str, Any], values: Sequence[Any]) -> dict[str, float]:
    """PSI over the reference categories plus one bin for categories never seen in training."""
    _, ref, cur = _category_shares(reference, values)
    return {"psi": psi(ref, cur)} if cur is not None else {}


def _category_shares(
    reference: dict[str, Any], values: Sequence[Any]
) -> tuple[list[str], list[float], list[float] | None]:
    """Category names (+ "(new)"), their reference shares and their shares in ``values``.

    "(new)" is every value the reference does not list: new ones, and for a column with more
    categories than a profile keeps (free text), the training data's rarer ones, whose share
    the profile records as ``other_share``."""
    cats = list(reference["shares"])
    ref = [reference["shares"][c] for c in cats] + [float(reference.get("other_share", 0.0))]
    series = pd.Series(values, dtype=object).dropna().astype(str)
    if series.empty:
        return cats + ["(new)"], ref, None
    counts = series.value_counts(normalize=True)
    cur = [float(counts.get(c, 0.0)) for c in cats] + [
        float(counts[~counts.index.isin(cats)].sum())
    ]
    return cats + ["(new)"], ref, cur


def shares_for_plot(
    reference: dict[str, Any], values: Sequence[Any]
) -> tuple[list[str], list[float], list[float]]:
    """Bin labels, reference shares and current shares, for the drift report's bar charts."""
    if reference["kind"] != "numeric":
        labels, ref, cur = _category_shares(reference, values)
        return labels, ref, cur if cur is not None else [0.0] * len(ref)
    edges = np.asarray(reference["edges"], dtype=float)
    vals = pd.to_numeric(pd.Series(values), errors="coerce").to_numpy(dtype=float)
    vals = vals[np.isfinite(vals)]
    labels = [f"≤{edges[0]:.3g}"] if len(edges) else ["all"]
    labels += [f"{a:.3g}–{b:.3g}" for a, b in zip(edges[:-1], edges[1:], strict=False)]
    if len(edges):
        labels.append(f">{edges[-1]:.3g}")
    return labels, list(reference["shares"]), numeric_shares(vals, edges).tolist()
