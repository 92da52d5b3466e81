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
                    values = pd.Series(column, dtype=object, copy=False)
                    missing = values.isna().to_numpy()
                    if missing.any():
                        values = values.where(~missing, self.cat_fill[j])
                    codes = self._indexes[j].get_indexer(values)
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
) -> CompiledPreprocess | None:
    """The NumPy form of ``pipeline``'s preprocessing, or ``None`` if it cannot be trusted."""
    try:
        ct = pipeline.steps[0][1]
        named = dict(ct.named_transformers_)
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
            if (
                len(categories) != len(categorical)
                or getattr(encoder, "drop_idx_", None) is not None
            ):
                return None
        width = len(numeric) + sum(len(m) for m in categories)
        compiled = CompiledPreprocess(fill, mean, scale, cat_fill, categories, width)
    except (AttributeError, KeyError, TypeError, IndexError):
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
