"""A NumPy re-statement of the fitted preprocessing, built once at model load.

scikit-learn's ``ColumnTransformer`` selects columns by name from a DataFrame and runs a
joblib dispatch per call: milliseconds that dominate a one-row request. The fitted state is
just a few vectors (imputation values, means, scales, category lists), so a request needs
only array arithmetic. :func:`compile_pipeline` checks its result against the original
pipeline on sample rows and returns ``None`` if they differ, so a pipeline of another shape
is served through scikit-learn unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

SMALL_BATCH = 16  # up to this many rows a Python loop beats building a pandas column


class CompiledPreprocess:
    """Median imputation + standard scaling, and most-frequent imputation + one-hot."""

    def __init__(
        self,
        fill: np.ndarray,
        mean: np.ndarray,
        scale: np.ndarray,
        cat_fill: list[Any],
        categories: list[dict[Any, int]],
        width: int,
    ) -> None:
        self.fill = fill
        self.mean = mean
        self.scale = scale
        self.cat_fill = cat_fill
        self.categories = categories
        self.width = width
        self.n_numeric = len(fill)
        # hash lookups of a whole column at once, for batches (Python's equality, as the dicts)
        self._indexes = [pd.Index(list(m), dtype=object) for m in categories]
        # the one-hot position of each column's imputed category (-1: none), for nulls
        self._fill_codes = [m.get(f, -1) for m, f in zip(categories, cat_fill, strict=True)]

    def transform(self, numeric: np.ndarray, categorical: np.ndarray | None) -> np.ndarray:
        n = numeric.shape[0]
        out = np.empty((n, self.width), dtype=float)
        num = numeric
        if self.n_numeric:
            nan = np.isnan(num)
            if nan.any():
                num = np.where(nan, self.fill, num)
            out[:, : self.n_numeric] = (num - self.mean) / self.scale
        if self.categories:
            onehot = out[:, self.n_numeric :]
            onehot.fill(0.0)
            offset = 0
            assert categorical is not None  # a model with categorical columns always gets them
            for j, mapping in enumerate(self.categories):
                column = categorical[:, j]
                if n > SMALL_BATCH:
                    codes = self._indexes[j].get_indexer(column)
                    unmatched = np.flatnonzero(codes < 0)
                    if len(unmatched):  # nulls among them take the imputed category's code
                        missing = unmatched[pd.isna(column[unmatched])]
                        if len(missing):
                            codes[missing] = self._fill_codes[j]
                    hit = np.flatnonzero(codes >= 0)  # unknown: all zeros (handle_unknown="ignore")
                    onehot[hit, offset + codes[hit]] = 1.0
                    offset += len(mapping)
                    continue
                for i in range(n):
                    value = column[i]
                    if value is None or (isinstance(value, float) and np.isnan(value)):
                        value = self.cat_fill[j]
                    k = mapping.get(value)
                    if (
                        k is not None
                    ):  # unknown categories encode as all zeros, as handle_unknown="ignore"
                        onehot[i, offset + k] = 1.0
                offset += len(mapping)
        return out


def compile_pipeline(
    pipeline: Any, numeric: list[str], categorical: list[str], sample: pd.DataFrame | None
) -> CompiledPreprocess | CompiledFeatures | None:
    """The NumPy form of ``pipeline``'s preprocessing, or ``None`` if it cannot be trusted.

    ``data.features`` transforms ``log``, ``clip`` and ``frequency`` compile too; any other one
    sends the pipeline through scikit-learn, and which columns did is logged once, here (at
    model load).
    """
    try:
        ct = pipeline.steps[0][1]
        named = dict(ct.named_transformers_)
        entries = _feature_entries(named)
        compiled: CompiledPreprocess | CompiledFeatures | None
        if entries:
            compiled = _compile_with_features(ct, named, entries, numeric, categorical)
        else:
            compiled = _compile_blocks(named, numeric, categorical)
    except (AttributeError, KeyError, TypeError, IndexError, ValueError):
        return None
    if compiled is None:
        return None
    if sample is not None and len(sample):
        sample = sample.copy()
        for col in categorical:  # missing as NaN, as training data and the wrapper give it
            sample[col] = sample[col].astype(object).where(sample[col].notna(), np.nan)
        expected = np.asarray(ct.transform(sample), dtype=float)
        num = sample[numeric].to_numpy(dtype=float) if numeric else np.zeros((len(sample), 0))
        cat = sample[categorical].to_numpy(dtype=object) if categorical else None
        got = compiled.transform(num, cat)
        if got.shape != expected.shape or not np.allclose(
            got, expected, rtol=1e-9, atol=1e-12, equal_nan=True
        ):
            logger.warning(
                "compiled preprocessing differs from the pipeline's; serving through scikit-learn"
            )
            return None
    return compiled


def _compile_blocks(
    named: dict[str, Any], numeric: list[str], categorical: list[str]
) -> CompiledPreprocess | None:
    """The ``numeric`` and ``categorical`` entries over exactly these columns."""
    fill = mean = scale = np.zeros(0)
    if numeric:
        num_pipe = named["numeric"]
        imputer, scaler = num_pipe.named_steps["impute"], num_pipe.named_steps["scale"]
        fill = np.asarray(imputer.statistics_, dtype=float)
        mean = np.asarray(
            scaler.mean_ if scaler.mean_ is not None else np.zeros(len(numeric)), dtype=float
        )
        scale = np.asarray(
            scaler.scale_ if scaler.scale_ is not None else np.ones(len(numeric)), dtype=float
        )
        if len(fill) != len(numeric):
            return None
    cat_fill: list[Any] = []
    categories: list[dict[Any, int]] = []
    if categorical:
        cat_pipe = named["categorical"]
        cat_fill = list(cat_pipe.named_steps["impute"].statistics_)
        encoder = cat_pipe.named_steps["onehot"]
        categories = [{v: k for k, v in enumerate(cats)} for cats in encoder.categories_]
        if len(categories) != len(categorical) or getattr(encoder, "drop_idx_", None) is not None:
            return None
    width = len(numeric) + sum(len(m) for m in categories)
    return CompiledPreprocess(fill, mean, scale, cat_fill, categories, width)


# data.features transforms with a NumPy form: each of one value per row
COMPILED_TRANSFORMS = ("log", "clip", "frequency")
ColumnOp = Callable[[np.ndarray], np.ndarray]


class CompiledFeatures:
    """The ``numeric``/``categorical`` blocks over the columns without a ``data.features``
    transform, and one NumPy function per transformed column, placed where scikit-learn puts
    each entry's output."""

    def __init__(
        self,
        base: CompiledPreprocess,
        numeric_index: list[int],
        categorical_index: list[int],
        base_columns: np.ndarray,
        ops: list[tuple[bool, int, ColumnOp, int]],
        width: int,
    ) -> None:
        self.base = base
        self.numeric_index = numeric_index  # the base block's columns in the numeric input
        self.categorical_index = categorical_index
        self.base_columns = base_columns  # where the base block's outputs go
        self.ops = ops  # (reads a numeric input?, input column, function, output column)
        self.width = width

    def transform(self, numeric: np.ndarray, categorical: np.ndarray | None) -> np.ndarray:
        n = numeric.shape[0]
        out = np.empty((n, self.width), dtype=float)
        cat = (
            categorical[:, self.categorical_index]
            if categorical is not None and self.categorical_index
            else None
        )
        out[:, self.base_columns] = self.base.transform(numeric[:, self.numeric_index], cat)
        for from_numeric, j, op, k in self.ops:
            source = numeric if from_numeric else categorical
            assert source is not None  # the input contract always gives a feature's column
            out[:, k] = op(source[:, j])
        return out


def _compile_with_features(
    ct: Any,
    named: dict[str, Any],
    entries: list[tuple[str, str]],
    numeric: list[str],
    categorical: list[str],
) -> CompiledFeatures | None:
    slow = [(col, kind) for col, kind in entries if kind not in COMPILED_TRANSFORMS]
    if slow:
        logger.info(
            "serving through scikit-learn's path: %s",
            "; ".join(
                f"data.features transform '{kind}' of column '{col}' has no NumPy form"
                for col, kind in slow
            ),
        )
        return None
    from mlops.features import ENTRY_PREFIX

    blocks = {name: list(cols) for name, _, cols in ct.transformers_ if name != "remainder"}
    block_num, block_cat = blocks.get("numeric", []), blocks.get("categorical", [])
    base = _compile_blocks(named, block_num, block_cat)
    if base is None:
        return None
    num_pos = {c: i for i, c in enumerate(numeric)}
    cat_pos = {c: i for i, c in enumerate(categorical)}
    indices = ct.output_indices_
    base_columns = np.concatenate(
        [
            np.arange(indices[b].start, indices[b].stop)
            for b in ("numeric", "categorical")
            if b in indices
        ]
        or [np.zeros(0, dtype=int)]
    ).astype(int)
    if len(base_columns) != base.width:
        return None
    ops: list[tuple[bool, int, ColumnOp, int]] = []
    for col, kind in entries:
        name = ENTRY_PREFIX + col
        part = indices[name]
        if part.stop - part.start != 1:
            return None
        op = _column_op(kind, named[name])
        from_numeric = kind != "frequency"
        position = (num_pos if from_numeric else cat_pos).get(col)
        if op is None or position is None:
            return None
        ops.append((from_numeric, position, op, part.start))
    width = max((p.stop for p in indices.values()), default=0)
    return CompiledFeatures(
        base,
        [num_pos[c] for c in block_num],
        [cat_pos[c] for c in block_cat],
        base_columns,
        ops,
        width,
    )


def _column_op(kind: str, entry: Any) -> ColumnOp | None:
    """The NumPy form of one fitted ``log``/``clip``/``frequency`` entry (see mlops.features)."""
    steps = entry.named_steps
    if kind == "frequency":
        encoder = steps["frequency"]
        shares, missing_share = dict(encoder.shares_), float(encoder.missing_share_)
        index = pd.Index(list(shares), dtype=object)
        values = np.asarray(list(shares.values()) + [0.0], dtype=float)  # last: unseen

        def frequency(column: np.ndarray) -> np.ndarray:
            strings = pd.Series(column, dtype=object, copy=False)
            missing = strings.isna().to_numpy()
            out = values[index.get_indexer(strings.astype(str))]  # -1 (unseen) reads the 0
            out[missing] = missing_share
            return out

        return frequency
    fill = float(steps["impute"].statistics_[0])
    scaler = steps["scale"]
    mean = float(scaler.mean_[0]) if scaler.mean_ is not None else 0.0
    scale = float(scaler.scale_[0]) if scaler.scale_ is not None else 1.0
    if kind == "log":

        def log(column: np.ndarray) -> np.ndarray:
            values = np.log1p(np.maximum(column.astype(float), 0.0))  # NaN stays NaN
            return (np.where(np.isnan(values), fill, values) - mean) / scale

        return log
    clip = steps["clip"]
    low = -np.inf if clip.min is None else float(clip.min)
    high = np.inf if clip.max is None else float(clip.max)

    def clipped(column: np.ndarray) -> np.ndarray:
        values = column.astype(float)
        values = np.clip(np.where(np.isnan(values), fill, values), low, high)
        return (values - mean) / scale

    return clipped


def _feature_entries(named: dict[str, Any]) -> list[tuple[str, str]]:
    """The ``(column, transform)`` of every ``data.features`` entry."""
    from mlops.features import describe_entry

    return [d for d in (describe_entry(n, t) for n, t in named.items()) if d is not None]
