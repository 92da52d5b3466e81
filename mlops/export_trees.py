"""The numeric scaler folded into a tree model's thresholds, for its ONNX graph.

scikit-learn scales a numeric column in float64, then a tree casts the scaled value to float32
and compares it with a float64 threshold; an ONNX graph scales in float32 and compares with a
float32 threshold, so a value near a threshold can take the other branch (a random forest on
the breast cancer data differs by 0.005 in one row). A tree only compares a feature with its
thresholds, and scaling is increasing, so in the copy that is converted each threshold on a
scaled column becomes the matching raw-value threshold and the scaler an exact identity: the
graph then compares the raw float32 input, with no float32 arithmetic before the comparison.

Which raw threshold: data is mostly decimal numbers with a few digits (``0.1175``), and a
split threshold is a midpoint of two training values, so a held-out value often lies EXACTLY
on it (``(0.117 + 0.118) / 2``) and only float64 rounding noise decides its branch natively.
The graph receives ``float32(0.1175)``; the decimal it came from is that float32's shortest
representation, so the raw threshold is the largest float32 ``c`` whose shortest decimal ``d``
the native model sends left (``float32((d - mean) / scale) <= threshold``, scikit-learn's own
arithmetic). A decimal input of up to 7 significant digits (its float32's shortest decimal is
itself) then takes exactly the native branch; any other input can differ only within one
float32 step of a threshold.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mlops.errors import ExportError

NUMERIC = "numeric"  # the ColumnTransformer entry of mlops.models.build_preprocessor
_MAX_STEPS = 64  # search rounds (a bracket doubles each round, bisection halves it)


def fold_numeric_scaler(pipeline: Any) -> int:
    """Fold the ``numeric`` entry's final ``StandardScaler`` into the trees of ``pipeline``'s
    estimator, in place (call it on a copy); the number of thresholds rewritten.

    Nothing is changed (0) unless the estimator is a scikit-learn tree or an ensemble whose
    ``estimators_`` are all trees that see every column (a forest, gradient boosting), and
    the numeric entry ends with a fitted ``StandardScaler``.
    """
    preprocess, estimator = pipeline.steps[0][1], pipeline.steps[-1][1]
    trees = _trees(estimator)
    scaler = _final_scaler(preprocess)
    indices = getattr(preprocess, "output_indices_", {}).get(NUMERIC)
    if not trees or scaler is None or not isinstance(indices, slice):
        return 0
    start, stop = indices.start or 0, indices.stop
    n = stop - start
    mean = np.zeros(n) if scaler.mean_ is None else np.asarray(scaler.mean_, dtype=np.float64)
    scale = np.ones(n) if scaler.scale_ is None else np.asarray(scaler.scale_, dtype=np.float64)
    if mean.shape != (n,) or scale.shape != (n,) or not (scale > 0).all():
        return 0
    rewritten = 0
    for tree in trees:
        structure = tree.tree_
        feature = np.asarray(structure.feature)
        split = (feature >= start) & (feature < stop)  # leaves are -2
        if not split.any():
            continue
        column = feature[split] - start
        cutoff = raw_cutoff(structure.threshold[split], mean[column], scale[column])
        threshold = structure.threshold  # a view of the tree's nodes: written in place
        threshold[split] = cutoff
        if not np.array_equal(structure.threshold[split], cutoff):
            raise ExportError(
                "the tree thresholds could not be rewritten in this scikit-learn version; "
                "serve the version natively"
            )
        rewritten += int(split.sum())
    scaler.mean_ = np.zeros(n)
    scaler.scale_ = np.ones(n)
    if getattr(scaler, "var_", None) is not None:
        scaler.var_ = np.ones(n)
    return rewritten


def raw_cutoff(threshold: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Per node, the largest float32 raw value ``c`` whose shortest decimal scikit-learn sends
    left (``float32((decimal(c) - mean) / scale) <= threshold``), as float64.

    Going left is monotone in ``c``, so it is a search over float32 values in order: bracket
    from ``threshold * scale + mean`` rounded down, then bisect (a column with a small scale
    maps many raw float32 values to one scaled float32)."""
    threshold = np.asarray(threshold, dtype=np.float64)
    mean = np.broadcast_to(np.asarray(mean, dtype=np.float64), threshold.shape)
    scale = np.broadcast_to(np.asarray(scale, dtype=np.float64), threshold.shape)

    def left(key: np.ndarray, at: np.ndarray) -> np.ndarray:
        decimal = _float32(key).astype(str).astype(np.float64)  # numpy writes the shortest
        with np.errstate(over="ignore", invalid="ignore"):
            scaled = ((decimal - mean[at]) / scale[at]).astype(np.float32)
        return np.asarray(scaled <= threshold[at])

    with np.errstate(over="ignore", invalid="ignore"):
        estimate = threshold * scale + mean
        first = estimate.astype(np.float32)
    first = np.where(first > estimate, np.nextafter(first, np.float32(-np.inf)), first)
    low = _key(first)  # grows down until it goes left, `high` up until it goes right
    high = np.minimum(low + 1, _MAX_KEY)
    for bound, goes_left, sign in ((low, False, -1), (high, True, 1)):
        step = np.ones_like(bound)
        at = np.flatnonzero(left(bound, np.arange(bound.size)) == goes_left)
        for _ in range(_MAX_STEPS):
            if not at.size:
                break
            moved = np.clip(bound[at] + sign * step[at], -_MAX_KEY, _MAX_KEY)
            stuck = moved == bound[at]
            bound[at], step[at] = moved, step[at] * 2
            at = at[(left(moved, at) == goes_left) & ~stuck]
    at = np.flatnonzero(high - low > 1)
    for _ in range(_MAX_STEPS):
        if not at.size:
            break
        middle = (low[at] + high[at]) // 2
        went = left(middle, at)
        low[at[went]], high[at[~went]] = middle[went], middle[~went]
        at = at[high[at] - low[at] > 1]
    return _float32(low).astype(np.float64)


_MAX_KEY = 0x7F7FFFFF  # the largest finite float32's bits


def _key(values: np.ndarray) -> np.ndarray:
    """float32 values as int64 keys in the same order (one step = one float32)."""
    bits = np.asarray(values, dtype=np.float32).view(np.int32).astype(np.int64)
    return np.where(bits >= 0, bits, -(bits & 0x7FFFFFFF))


def _float32(key: np.ndarray) -> np.ndarray:
    magnitude = np.abs(key).astype(np.uint32)
    bits = np.where(key >= 0, magnitude, magnitude | np.uint32(0x80000000)).astype(np.uint32)
    return bits.view(np.float32)


def _trees(estimator: Any) -> list[Any]:
    from sklearn.tree import BaseDecisionTree

    if isinstance(estimator, BaseDecisionTree):
        return [estimator]
    members = getattr(estimator, "estimators_", None)
    # bagging gives each member its own subset of the columns: its indices are not ours
    if members is None or hasattr(estimator, "estimators_features_"):
        return []
    trees = list(np.ravel(np.asarray(members, dtype=object)))
    if not trees or not all(isinstance(t, BaseDecisionTree) for t in trees):
        return []
    return trees


def _final_scaler(preprocess: Any) -> Any:
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    named = getattr(preprocess, "named_transformers_", None)
    numeric = None if named is None else named.get(NUMERIC)
    last = numeric.steps[-1][1] if isinstance(numeric, Pipeline) else numeric
    return last if type(last) is StandardScaler else None
