"""Declarative feature transforms (``data.features``), fitted inside the logged pipeline.

Each configured column gets its own transform; a column whose transform reads text (dates, free
text, frequency encoding) is a string column of the input contract. The transforms:

========== ======================================================= ===========================
transform  options                                                 input
========== ======================================================= ===========================
log        (none): log1p; negative training values are refused     number
clip       min, max (at least one)                                 number
bins       n_bins (5), strategy (quantile | uniform); one-hot      number
date       parts (year, month, day, dayofweek, dayofyear, hour,    string (parsed here)
           is_weekend), format (strftime; default ISO 8601)
tfidf      max_features (100), ngram_range ([1, 1]), min_df (1)    string
frequency  (none): share of training rows with the value; unseen 0 string
a.b.Class  params ({}), input (number | string)                    number (default)
========== ======================================================= ===========================

Every configured column becomes its own ``ColumnTransformer`` entry named ``feature_<column>``
over that single column (:func:`feature_entries`). Numeric transforms impute (median) before
they transform; the custom classes here are small scikit-learn transformers, so the pipeline
keeps one contract and persists with skops (:data:`TRUSTED_TYPES`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
from pandas.api import types as ptypes
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.impute import SimpleImputer
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import KBinsDiscretizer, StandardScaler

from mlops.errors import DataValidationError

# transforms whose input column holds strings (dates are parsed inside the pipeline)
STRING_TRANSFORMS = frozenset({"date", "tfidf", "frequency"})
NUMERIC_TRANSFORMS = frozenset({"log", "clip", "bins"})
# the ColumnTransformer entry of a configured column is ENTRY_PREFIX + column (scikit-learn
# forbids "__" in entry names, so the prefix has one underscore and a column name none pair)
ENTRY_PREFIX = "feature_"
DATE_PARTS = ("year", "month", "day", "dayofweek", "dayofyear", "hour", "is_weekend")
DEFAULT_DATE_PARTS = ("year", "month", "day", "dayofweek")
# the types of this module a fitted pipeline may hold: the model loader (mlops.artifacts) must
# trust them for a served model with data.features to load
TRUSTED_TYPES = (
    "mlops.features.Log1p",
    "mlops.features.Clip",
    "mlops.features.DateParts",
    "mlops.features.TextTfidf",
    "mlops.features.FrequencyEncoder",
)


def string_columns(features: dict[str, dict[str, Any]]) -> list[str]:
    """The feature columns whose configured transform takes strings (in config order)."""
    return [
        col
        for col, spec in features.items()
        if spec.get("transform") in STRING_TRANSFORMS or spec.get("input") == "string"
    ]


# ---------------------------------------------------------------------------------------------
# the transformers (scikit-learn contract: parameters in __init__, fitted state in *_)


class _OneColumn(TransformerMixin, BaseEstimator):
    """A transformer of one column that names its outputs after it."""

    def _remember_input(self, X: Any) -> None:
        names = getattr(X, "columns", None)
        self.feature_names_in_ = (
            np.asarray([str(c) for c in names], dtype=object)
            if (names is not None)
            else np.asarray(["x0"], dtype=object)
        )
        self.n_features_in_ = 1

    def _column(self, input_features: Any = None) -> str:
        # a Pipeline passes the ColumnTransformer's column name on; a step after an imputer
        # saw only an array
        if input_features is not None and len(input_features):
            return str(input_features[0])
        return str(self.feature_names_in_[0])

    def get_feature_names_out(self, input_features: Any = None) -> np.ndarray:
        return np.asarray([self._column(input_features)], dtype=object)


def _as_float(X: Any) -> np.ndarray:
    return np.asarray(X, dtype=float).reshape(len(X), -1)


def _as_strings(X: Any) -> pd.Series:
    """The single column of ``X`` as an object Series, missing values as NaN."""
    values = X.iloc[:, 0] if isinstance(X, pd.DataFrame) else np.asarray(X, dtype=object)
    if not isinstance(values, pd.Series):
        values = pd.Series(values.reshape(len(values), -1)[:, 0], dtype=object)
    values = values.astype(object)
    return values.where(values.notna(), np.nan).reset_index(drop=True)


class Log1p(_OneColumn):
    """``log1p`` of a non-negative column; negative training values are refused at ``fit``.

    A negative value at serving counts as 0 (refuse such rows with a ``data.rules`` minimum).
    """

    def fit(self, X: Any, y: Any = None) -> Log1p:
        self._remember_input(X)
        values = _as_float(X)
        if np.nanmin(values, initial=0.0) < 0:
            raise DataValidationError(
                f"data.features: column '{self._column()}' (transform 'log') has negative values "
                f"(min {np.nanmin(values):g}); log needs values >= 0: use 'clip' with min: 0, or "
                "another transform"
            )
        return self

    def transform(self, X: Any) -> np.ndarray:
        return np.log1p(np.maximum(_as_float(X), 0.0))


class Clip(_OneColumn):
    """Values limited to ``[min, max]`` (either bound may be left out)."""

    def __init__(self, min: float | None = None, max: float | None = None) -> None:
        self.min = min
        self.max = max

    def fit(self, X: Any, y: Any = None) -> Clip:
        self._remember_input(X)
        return self

    def transform(self, X: Any) -> np.ndarray:
        values = _as_float(X)
        low = -np.inf if self.min is None else float(self.min)
        high = np.inf if self.max is None else float(self.max)
        return np.clip(values, low, high)  # NaN stays NaN (imputed before)


class DateParts(_OneColumn):
    """Parts of a date written as a string; a value that does not parse becomes missing."""

    def __init__(self, parts: Sequence[str] = DEFAULT_DATE_PARTS, format: str | None = None):
        self.parts = parts
        self.format = format

    def fit(self, X: Any, y: Any = None) -> DateParts:
        self._remember_input(X)
        return self

    def transform(self, X: Any) -> np.ndarray:
        return date_parts(_as_strings(X), list(self.parts), self.format)

    def get_feature_names_out(self, input_features: Any = None) -> np.ndarray:
        column = self._column(input_features)
        return np.asarray([f"{column}_{p}" for p in self.parts], dtype=object)


def parse_dates(values: pd.Series, format: str | None = None) -> pd.Series:
    """Strings as UTC timestamps (ISO 8601 unless ``format``); unparseable values are NaT."""
    strings = values.astype(object).where(values.notna(), None)
    return pd.to_datetime(strings, errors="coerce", format=format or "ISO8601", utc=True)


def date_parts(values: pd.Series, parts: list[str], format: str | None = None) -> np.ndarray:
    """One float column per part (NaN where the value is missing or not a date)."""
    stamps = parse_dates(values, format)
    out = np.empty((len(stamps), len(parts)), dtype=float)
    for j, part in enumerate(parts):
        if part == "is_weekend":
            column = (stamps.dt.dayofweek >= 5).astype(float).where(stamps.notna())
        else:
            column = getattr(stamps.dt, part).astype(float)
        out[:, j] = column.to_numpy(dtype=float, na_value=np.nan)
    return out


class TextTfidf(_OneColumn):
    """TF-IDF of a free-text column (missing text is empty); outputs named ``<column>_<term>``."""

    def __init__(
        self, max_features: int = 100, ngram_range: Sequence[int] = (1, 1), min_df: float = 1
    ) -> None:
        self.max_features = max_features
        self.ngram_range = ngram_range
        self.min_df = min_df

    def fit(self, X: Any, y: Any = None) -> TextTfidf:
        self._remember_input(X)
        self.vectorizer_ = TfidfVectorizer(
            max_features=self.max_features,
            ngram_range=tuple(self.ngram_range),
            min_df=self.min_df,
        )
        try:
            self.vectorizer_.fit(_as_strings(X).fillna("").astype(str))
        except ValueError as exc:  # e.g. an empty vocabulary
            raise DataValidationError(
                f"data.features: column '{self._column()}' (transform 'tfidf'): {exc}; give text "
                "with words, or lower min_df"
            ) from None
        return self

    def transform(self, X: Any) -> np.ndarray:
        text = _as_strings(X).fillna("").astype(str)
        return np.asarray(self.vectorizer_.transform(text).toarray(), dtype=float)

    def get_feature_names_out(self, input_features: Any = None) -> np.ndarray:
        terms = self.vectorizer_.get_feature_names_out()
        column = self._column(input_features)
        return np.asarray([f"{column}_{t}" for t in terms], dtype=object)


class FrequencyEncoder(_OneColumn):
    """The share of training rows holding each value (missing counts as a value); unseen: 0."""

    def fit(self, X: Any, y: Any = None) -> FrequencyEncoder:
        self._remember_input(X)
        values = _as_strings(X)
        shares = values.dropna().astype(str).value_counts() / max(len(values), 1)
        self.shares_ = {str(k): float(v) for k, v in shares.items()}
        self.missing_share_ = float(values.isna().mean()) if len(values) else 0.0
        return self

    def transform(self, X: Any) -> np.ndarray:
        values = _as_strings(X)
        missing = values.isna().to_numpy()
        out = values.astype(str).map(self.shares_).fillna(0.0).to_numpy(dtype=float)
        out[missing] = self.missing_share_
        return out.reshape(-1, 1)


# ---------------------------------------------------------------------------------------------
# the configuration: options of each transform, checked when the config is loaded


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and np.isfinite(value)


def _check_clip(opts: dict[str, Any]) -> str | None:
    for key in ("min", "max"):
        if key in opts and opts[key] is not None and not _number(opts[key]):
            return f"option '{key}' must be a number (got {opts[key]!r})"
    low, high = opts.get("min"), opts.get("max")
    if low is None and high is None:
        return "give 'min', 'max' or both"
    if low is not None and high is not None and low > high:
        return f"'min' ({low:g}) must not be above 'max' ({high:g})"
    return None


def _check_bins(opts: dict[str, Any]) -> str | None:
    n_bins = opts.get("n_bins", 5)
    if not isinstance(n_bins, int) or isinstance(n_bins, bool) or n_bins < 2:
        return f"option 'n_bins' must be a whole number of at least 2 (got {n_bins!r})"
    strategy = opts.get("strategy", "quantile")
    if strategy not in ("quantile", "uniform"):
        return f"option 'strategy' must be 'quantile' or 'uniform' (got {strategy!r})"
    return None


def _check_date(opts: dict[str, Any]) -> str | None:
    parts = opts.get("parts", list(DEFAULT_DATE_PARTS))
    if not isinstance(parts, list) or not parts:
        return f"option 'parts' must be a non-empty list of {', '.join(DATE_PARTS)} (got {parts!r})"
    unknown = [p for p in parts if p not in DATE_PARTS]
    if unknown:
        return f"option 'parts' has unknown part(s) {unknown}; choose from {', '.join(DATE_PARTS)}"
    if len(set(parts)) != len(parts):
        return f"option 'parts' names a part twice ({parts})"
    fmt = opts.get("format")
    if fmt is not None and (not isinstance(fmt, str) or "%" not in fmt):
        return f"option 'format' must be a strftime format such as '%d/%m/%Y' (got {fmt!r})"
    return None


def _check_tfidf(opts: dict[str, Any]) -> str | None:
    max_features = opts.get("max_features", 100)
    if not isinstance(max_features, int) or isinstance(max_features, bool) or max_features < 1:
        return f"option 'max_features' must be a whole number of at least 1 (got {max_features!r})"
    ngrams = opts.get("ngram_range", [1, 1])
    if (
        not isinstance(ngrams, list | tuple)
        or len(ngrams) != 2
        or not all(isinstance(n, int) and not isinstance(n, bool) for n in ngrams)
        or not 1 <= ngrams[0] <= ngrams[1]
    ):
        return f"option 'ngram_range' must be [low, high] with 1 <= low <= high (got {ngrams!r})"
    min_df = opts.get("min_df", 1)
    if not _number(min_df) or min_df <= 0 or (isinstance(min_df, float) and min_df > 1):
        return (
            "option 'min_df' must be a count of documents (1, 2, ...) or a share in (0, 1] "
            f"(got {min_df!r})"
        )
    return None


def _check_none(opts: dict[str, Any]) -> str | None:
    return None


# transform -> (its options, the check of their values)
BUILTIN: dict[str, tuple[tuple[str, ...], Callable[[dict[str, Any]], str | None]]] = {
    "log": ((), _check_none),
    "clip": (("min", "max"), _check_clip),
    "bins": (("n_bins", "strategy"), _check_bins),
    "date": (("parts", "format"), _check_date),
    "tfidf": (("max_features", "ngram_range", "min_df"), _check_tfidf),
    "frequency": ((), _check_none),
}
CUSTOM_OPTIONS = ("params", "input")


def validate_features(features: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Check ``data.features``: known transforms, known options, sane values, importable classes.

    Raises ``ValueError`` (the config loader reports it under ``data.features``) naming the
    column and the transform.
    """
    for column, spec in features.items():
        if not isinstance(spec, dict):
            raise ValueError(
                f"data.features.{column}: give a mapping such as {{transform: log}} (got {spec!r})"
            )
        name = spec.get("transform")
        if not isinstance(name, str) or not name:
            raise ValueError(
                f"data.features.{column}: 'transform' is missing; use one of "
                f"{', '.join(BUILTIN)} or a class import path such as "
                "sklearn.preprocessing.QuantileTransformer"
            )
        opts = {k: v for k, v in spec.items() if k != "transform"}
        where = f"data.features.{column} (transform '{name}')"
        if "__" in column:
            raise ValueError(
                f"{where}: a column name with '__' cannot have a transform (scikit-learn keeps "
                "'__' for nested parameters); rename the column"
            )
        if name in BUILTIN:
            allowed, check = BUILTIN[name]
        elif "." in name:
            allowed, check = CUSTOM_OPTIONS, _custom_checker(name)
        else:
            raise ValueError(
                f"data.features.{column}: unknown transform '{name}'; use one of "
                f"{', '.join(BUILTIN)} or a class import path such as "
                "sklearn.preprocessing.QuantileTransformer"
            )
        unknown = sorted(set(opts) - set(allowed))
        if unknown:
            raise ValueError(
                f"{where}: unknown option(s) {unknown}; valid options: "
                f"{', '.join(allowed) if allowed else '(none)'}"
            )
        problem = check(opts)
        if problem:
            raise ValueError(f"{where}: {problem}")
    return features


def _custom_checker(path: str) -> Callable[[dict[str, Any]], str | None]:
    def check(opts: dict[str, Any]) -> str | None:
        if opts.get("input", "number") not in ("number", "string"):
            return f"option 'input' must be 'number' or 'string' (got {opts['input']!r})"
        params = opts.get("params", {})
        if not isinstance(params, dict):
            return f"option 'params' must be a mapping of constructor arguments (got {params!r})"
        try:
            cls = import_transformer(path)
            cls(**params)
        except (ImportError, TypeError, ValueError) as exc:
            return str(exc)
        return None

    return check


def import_transformer(path: str) -> type:
    """The transformer class at ``path`` (``module.Class``); refuses one a served model could
    not load or that lacks ``fit``/``transform``."""
    module_name, _, attr = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ImportError(
            f"'{path}' does not import ({type(exc).__name__}: {exc}); give module.Class of an "
            "installed transformer"
        ) from None
    if not isinstance(cls, type) or not all(
        callable(getattr(cls, m, None)) for m in ("fit", "transform")
    ):
        raise TypeError(f"'{path}' is not a transformer class with fit and transform")
    from mlops.artifacts import TRUSTED_EXACT, TRUSTED_PREFIXES

    type_name = f"{cls.__module__}.{cls.__qualname__}"
    if type_name not in TRUSTED_EXACT and not type_name.startswith(TRUSTED_PREFIXES):
        raise TypeError(
            f"'{path}' ({type_name}) is not a type a served model may load (models load only "
            "scikit-learn and project types, without pickle); use a scikit-learn transformer"
        )
    return cls


# ---------------------------------------------------------------------------------------------
# the pipeline entries


def build_feature(column: str, spec: dict[str, Any]) -> Pipeline:
    """The unfitted transformer of one configured column (its ``ColumnTransformer`` entry)."""
    name = spec["transform"]
    opts = {k: v for k, v in spec.items() if k != "transform"}
    median = ("impute", SimpleImputer(strategy="median"))
    steps: list[tuple[str, Any]]
    if name == "log":
        # log first: its fit sees the column by name (negative values are refused naming it)
        steps = [("log", Log1p()), median, ("scale", StandardScaler())]
    elif name == "clip":
        steps = [
            median,
            ("clip", Clip(opts.get("min"), opts.get("max"))),
            ("scale", StandardScaler()),
        ]
    elif name == "bins":
        bins = KBinsDiscretizer(
            n_bins=opts.get("n_bins", 5),
            encode="onehot-dense",
            strategy=opts.get("strategy", "quantile"),
            subsample=None,
        )
        steps = [median, ("bins", bins)]
    elif name == "date":
        parts = list(opts.get("parts", DEFAULT_DATE_PARTS))
        steps = [
            ("date", DateParts(parts, opts.get("format"))),
            # keep a part every training date lacks (as its fill value) so the width is stable
            ("impute", SimpleImputer(strategy="median", keep_empty_features=True)),
            ("scale", StandardScaler()),
        ]
    elif name == "tfidf":
        steps = [
            (
                "tfidf",
                TextTfidf(
                    opts.get("max_features", 100),
                    tuple(opts.get("ngram_range", (1, 1))),
                    opts.get("min_df", 1),
                ),
            )
        ]
    elif name == "frequency":
        steps = [("frequency", FrequencyEncoder())]
    else:
        cls = import_transformer(name)
        impute = (
            ("impute", SimpleImputer(strategy="most_frequent"))
            if opts.get("input") == "string"
            else median
        )
        steps = [impute, (name, cls(**opts.get("params", {})))]
    return Pipeline(steps)


def feature_entries(features: dict[str, dict[str, Any]]) -> list[tuple[str, Any, list[str]]]:
    """One ``(feature_<column>, transformer, [column])`` entry per configured column."""
    return [(ENTRY_PREFIX + col, build_feature(col, spec), [col]) for col, spec in features.items()]


def describe_entry(name: str, transformer: Any) -> tuple[str, str] | None:
    """``(column, transform)`` of a ``feature_<column>`` entry, or ``None`` for another one."""
    if not name.startswith(ENTRY_PREFIX):
        return None
    steps = [s for s, _ in getattr(transformer, "steps", [])]
    kind = next((s for s in steps if s not in ("impute", "scale")), type(transformer).__name__)
    return name[len(ENTRY_PREFIX) :], kind


# ---------------------------------------------------------------------------------------------
# the data: checked at prepare, before anything is fitted


def check_features(features: dict[str, dict[str, Any]], frame: pd.DataFrame, target: str) -> None:
    """Check ``data.features`` against the raw data; one error naming every problem.

    A configured column must be in the data and not be the target; a numeric transform needs a
    numeric column (a ``log`` one, no negative value); a ``date`` column needs some value that
    parses as a date.
    """
    if not features or frame.empty:
        return  # validate_frame reports an empty dataset
    columns = {str(c): c for c in frame.columns}
    problems: list[str] = []
    for col, spec in features.items():
        name = spec.get("transform")
        where = f"data.features: column '{col}' (transform '{name}')"
        if col == target:
            problems.append(f"{where} is the target; the target cannot be a feature, remove it")
            continue
        if col not in columns:
            problems.append(
                f"{where} is not in the data; remove it or pick one of: "
                + ", ".join(c for c in columns if c != target)
            )
            continue
        series = frame[columns[col]]
        numeric_input = name in NUMERIC_TRANSFORMS or (
            name not in STRING_TRANSFORMS and spec.get("input", "number") == "number"
        )
        present = series.dropna()
        if numeric_input and not (
            ptypes.is_numeric_dtype(series) or pd.to_numeric(present, errors="coerce").notna().all()
        ):
            example = present[pd.to_numeric(present, errors="coerce").isna()].iloc[0]
            problems.append(
                f"{where} needs numbers but the column holds text (e.g. {str(example)[:40]!r}); "
                "use a text transform (tfidf, frequency, date), input: string, or drop the entry"
            )
            continue
        if name == "log":
            low = pd.to_numeric(present, errors="coerce").min()
            if pd.notna(low) and low < 0:
                problems.append(
                    f"{where} has negative values (min {low:g}); log needs values >= 0: use "
                    "'clip' with min: 0, or another transform"
                )
        if name == "date" and len(present):
            parsed = parse_dates(present.astype(str), spec.get("format"))
            if parsed.isna().all():
                problems.append(
                    f"{where}: no value parses as a date (e.g. {str(present.iloc[0])[:40]!r}); "
                    "give ISO 8601 dates (2024-01-31) or set 'format'"
                )
    if problems:
        raise DataValidationError("; ".join(problems))
