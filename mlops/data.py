"""Data preparation: load, validate, clean, split 70/20/10, hash and log to MLflow.

The public entry point is :func:`prepare`; :func:`log_split` records a split on the active
MLflow run as dataset inputs (contexts ``train``, ``validation``, ``test``).
"""

from __future__ import annotations

import csv
import hashlib
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from pandas.api import types as ptypes
from sklearn.model_selection import train_test_split

from mlops.config import Config, DataConfig
from mlops.errors import DataValidationError

if TYPE_CHECKING:
    from mlflow.data.dataset import Dataset
    from mlflow.data.dataset_source import DatasetSource
    from sklearn.utils import Bunch

logger = logging.getLogger(__name__)

SKLEARN_PREFIX = "sklearn:"
SKLEARN_TARGET = "target"


def _sklearn_loader(name: str) -> Callable[..., Bunch]:
    from sklearn import datasets

    return getattr(datasets, f"load_{name}")


# name -> the task it poses; loaded lazily through sklearn.datasets.load_<name>
SKLEARN_DATASETS: dict[str, str] = {
    "breast_cancer": "classification",
    "wine": "classification",
    "iris": "classification",
    "diabetes": "regression",
}


@dataclass(frozen=True, eq=False)
class DatasetSplit:
    """A cleaned, validated dataset split into train / validation / test."""

    train: pd.DataFrame
    validation: pd.DataFrame
    test: pd.DataFrame
    target: str
    task: str  # "classification" | "regression"
    numeric_columns: tuple[str, ...]
    categorical_columns: tuple[str, ...]
    classes: tuple[str, ...] | None  # sorted class labels, as strings, for classification
    content_hash: str
    source: str
    n_rows: int
    n_duplicates_dropped: int
    quality: dict[str, Any] | None = None  # the data quality report (data.rules), if any rule

    @property
    def feature_columns(self) -> tuple[str, ...]:
        return self.numeric_columns + self.categorical_columns

    def xy(self, part: str) -> tuple[pd.DataFrame, pd.Series]:
        """Features and target of ``part`` ("train", "validation" or "test")."""
        frame: pd.DataFrame = getattr(self, part)
        return frame[list(self.feature_columns)], frame[self.target]


def prepare(config: Config) -> DatasetSplit:
    """Load the configured dataset, validate and clean it, and split it reproducibly.

    Example:
        >>> split = prepare(load_config(overrides=["data.dataset=sklearn:wine"]))
        >>> len(split.train), len(split.validation), len(split.test)
    """
    from mlops.features import string_columns
    from mlops.rules import check_dataset

    data_cfg = config.data
    frame, target, default_task = load_source(data_cfg)
    # string columns of the input: declared categorical, or read by a string feature transform
    strings = list(dict.fromkeys([*data_cfg.categorical, *string_columns(data_cfg.features)]))
    validate_frame(frame, target, strings, data_cfg.dataset)
    # the rules see the data as it came (duplicates included), before anything is dropped
    quality = check_dataset(frame, data_cfg.rules, source=data_cfg.dataset)
    frame, n_dupes = clean(frame, target, strings)
    task = _infer_task(frame[target], data_cfg.task, default_task)
    categorical = tuple(c for c in frame.columns if c != target and c in strings)
    numeric = tuple(c for c in frame.columns if c != target and c not in categorical)
    classes: tuple[str, ...] | None = None
    if task == "classification":
        frame[target] = frame[target].astype(str)
        classes = tuple(sorted(frame[target].unique()))
        if len(classes) < 2:
            raise DataValidationError(
                f"target column '{target}' has a single class {classes[0]!r}; "
                "classification needs at least two classes, or set data.task=regression"
            )
    elif not ptypes.is_numeric_dtype(frame[target]):
        raise DataValidationError(
            f"target column '{target}' is not numeric but data.task is regression; "
            "set data.task=classification or pick a numeric target"
        )
    else:
        frame[target] = frame[target].astype("float64")

    train, validation, test = _split(frame, target, task, data_cfg, config.seed)
    split = DatasetSplit(
        train=train,
        validation=validation,
        test=test,
        target=target,
        task=task,
        numeric_columns=numeric,
        categorical_columns=categorical,
        classes=classes,
        content_hash=content_hash(frame),
        source=_describe_source(data_cfg.dataset),
        n_rows=len(frame),
        n_duplicates_dropped=n_dupes,
        quality=quality,
    )
    logger.info(
        "prepared %s: %d rows (%d duplicates dropped), split %d/%d/%d, hash %s",
        split.source,
        split.n_rows,
        n_dupes,
        len(train),
        len(validation),
        len(test),
        split.content_hash[:12],
    )
    return split


def load_source(data_cfg: DataConfig) -> tuple[pd.DataFrame, str, str | None]:
    """Read the dataset named by ``data.dataset``; returns (frame, target column, known task)."""
    dataset = data_cfg.dataset
    if dataset.startswith(SKLEARN_PREFIX):
        name = dataset[len(SKLEARN_PREFIX) :]
        if name not in SKLEARN_DATASETS:
            valid = ", ".join(SKLEARN_PREFIX + n for n in SKLEARN_DATASETS)
            raise DataValidationError(
                f"data.dataset: unknown scikit-learn dataset '{dataset}'; use one of {valid}"
            )
        bunch = _sklearn_loader(name)(as_frame=True)
        frame = bunch.frame.copy()
        task = SKLEARN_DATASETS[name]
        if task == "classification":
            names = np.asarray(bunch.target_names)
            frame[SKLEARN_TARGET] = names[frame[SKLEARN_TARGET].to_numpy()]
        if data_cfg.target not in (None, SKLEARN_TARGET):
            raise DataValidationError(
                f"data.target: '{data_cfg.target}' is not a column of {dataset}; its target column "
                "is "
                f"'{SKLEARN_TARGET}', so leave --target unset"
            )
        return frame, SKLEARN_TARGET, task

    path = Path(dataset)
    if not path.is_file():
        raise DataValidationError(
            f"data.dataset: file '{dataset}' not found; pass an existing CSV path or one of "
            + ", ".join(SKLEARN_PREFIX + n for n in SKLEARN_DATASETS)
        )
    _check_width(path, dataset, data_cfg.max_columns)
    _check_unique_header(path, dataset)
    try:
        frame = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        raise DataValidationError(
            f"data.dataset: '{dataset}' is empty; give a CSV with a header row and data"
        ) from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataValidationError(
            f"data.dataset: '{dataset}' is not a readable CSV ({exc}); fix the file"
        ) from None
    if not data_cfg.target:
        raise DataValidationError(
            f"data.target: not set for CSV '{dataset}'; pass --target COLUMN (columns: "
            f"{', '.join(map(str, frame.columns))})"
        )
    return frame, data_cfg.target, None


# how much of a file's header :func:`header_width` reads at most, and in pieces of what size
HEADER_SCAN_BYTES = 16 * 2**20
_HEADER_CHUNK = 2**20


def header_width(path: str | Path, limit: int | None = None) -> tuple[int, bool]:
    """The number of columns in a CSV's header line, and whether the whole line was read.

    Only the header is read, in pieces, and at most ``limit`` bytes of it (default
    :data:`HEADER_SCAN_BYTES`, 16 MiB: a million columns of 8-byte names): a header longer
    than that gives the columns counted so far (a lower bound) and ``False``. Commas inside
    double quotes do not count, nor do line ends inside them; blank lines before the header are
    skipped, as ``pandas.read_csv`` skips them. An empty file has 0 columns.
    """
    limit = HEADER_SCAN_BYTES if limit is None else limit
    columns = 0  # separators seen outside quotes in the header so far
    quoted = False
    started = False  # a byte of the header (not of a blank line before it) was seen
    read = 0
    with open(path, "rb") as stream:
        while read < limit:
            chunk = stream.read(min(_HEADER_CHUNK, limit - read))
            if not chunk:
                return (columns + 1 if started else 0), True
            read += len(chunk)
            # pieces between double quotes alternate outside / inside a quoted field (a doubled
            # quote in a quoted field is an empty piece in between, so the parity holds)
            for i, piece in enumerate(chunk.split(b'"')):
                if i:
                    quoted = not quoted
                    started = True
                if quoted:
                    continue
                if not started:
                    stripped = piece.lstrip(b"\r\n")
                    if not stripped:
                        continue
                    piece, started = stripped, True
                ends = [p for p in (piece.find(b"\n"), piece.find(b"\r")) if p >= 0]
                if ends:
                    end = min(ends)
                    return columns + piece.count(b",", 0, end) + 1, True
                columns += piece.count(b",")
    return columns + 1, False


def _check_width(path: Path, dataset: str, max_columns: int) -> None:
    """Refuse a CSV wider than ``data.max_columns`` before it is read whole."""
    count, whole = header_width(path)
    if count <= max_columns:
        return
    counted = f"{count:,} columns" if whole else f"at least {count:,} columns"
    raise DataValidationError(
        f"data.dataset: '{dataset}' has {counted} in its header, more than data.max_columns "
        f"({max_columns:,}); drop columns from the file, or raise the limit with "
        f"--set data.max_columns={count if whole else 'N'}"
    )


def _check_unique_header(path: Path, dataset: str) -> None:
    """Refuse a header that names a column twice (pandas would rename the copy ``a.1``)."""
    with open(path, newline="", encoding="utf-8", errors="replace") as fh:
        header = next(csv.reader(line for line in fh if line.strip()), [])
    seen: set[str] = set()
    for name in header:
        if name in seen:
            raise DataValidationError(
                f"data.dataset: '{dataset}' names column {_clip(name)} twice in its header; "
                "give each column one name"
            )
        seen.add(name)


def _clip(value: object, limit: int = 100) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def validate_frame(frame: pd.DataFrame, target: str, categorical: list[str], source: str) -> None:
    """Check the raw frame; raise one :class:`DataValidationError` naming every problem."""
    if frame.empty or len(frame.columns) == 0:
        raise DataValidationError(f"data.dataset: '{source}' has no rows; give a dataset with data")
    columns = [str(c) for c in frame.columns]
    if target not in columns:
        raise DataValidationError(
            f"data.target: column '{target}' not in '{source}'; pick one of: {', '.join(columns)}"
        )
    problems: list[str] = []
    missing_cat = [c for c in categorical if c not in columns]
    if missing_cat:
        problems.append(
            f"data.categorical names column(s) {missing_cat} not in the data; remove them"
        )
    for col in frame.columns:
        series = frame[col]
        if series.isna().all():
            problems.append(f"column '{col}' is entirely empty; drop it from the data")
            continue
        if col == target or col in categorical:
            continue
        if not (ptypes.is_numeric_dtype(series) or ptypes.is_bool_dtype(series)):
            example = series.dropna().iloc[0]
            problems.append(
                f"column '{col}' is not numeric (e.g. {_clip(example)}); declare it categorical "
                f"with --set data.categorical=[{col}] or remove it"
            )
        elif ptypes.is_numeric_dtype(series) and not ptypes.is_bool_dtype(series):
            infinite = np.isinf(series.to_numpy(dtype=float))
            if infinite.any():
                problems.append(
                    f"column '{col}' holds {int(infinite.sum())} infinite value(s) (first in "
                    f"data row {int(infinite.argmax())}); replace them with numbers or leave "
                    "them empty (missing)"
                )
    if len([c for c in columns if c != target]) == 0:
        problems.append(f"'{source}' has no feature columns besides the target '{target}'")
    if problems:
        raise DataValidationError("; ".join(problems))


def clean(frame: pd.DataFrame, target: str, categorical: list[str]) -> tuple[pd.DataFrame, int]:
    """Drop duplicated rows and rows without a target; give features stable dtypes.

    Returns the cleaned frame and the number of duplicated rows dropped.
    """
    frame = frame.copy()
    frame.columns = [str(c) for c in frame.columns]
    n_before = len(frame)
    frame = frame.drop_duplicates()
    n_dupes = n_before - len(frame)
    if n_dupes:
        logger.warning("dropped %d duplicated row(s)", n_dupes)
    no_target = frame[target].isna()
    if no_target.any():
        logger.warning(
            "dropped %d row(s) with no value in target '%s'", int(no_target.sum()), target
        )
        frame = frame[~no_target]
    for col in frame.columns:
        if col == target:
            continue
        if col in categorical:
            # strings, with NaN for missing: what scikit-learn's imputers and encoders expect
            frame[col] = (
                frame[col].astype("string").astype(object).where(frame[col].notna(), np.nan)
            )
        else:
            # One numeric dtype for every feature keeps the model signature simple (double).
            frame[col] = frame[col].astype("float64")
    return frame.reset_index(drop=True), n_dupes


def encode_target(split: DatasetSplit, y: pd.Series) -> np.ndarray:
    """Class labels as integer codes in ``split.classes`` order; regression targets as floats."""
    if split.task == "classification":
        return np.searchsorted(np.asarray(split.classes), y.to_numpy().astype(str))
    return y.to_numpy(dtype=float)


def content_hash(frame: pd.DataFrame) -> str:
    """SHA-256 of the cleaned data: column names, dtypes and every value, order included."""
    digest = hashlib.sha256()
    digest.update(repr([(c, str(t)) for c, t in frame.dtypes.items()]).encode())
    digest.update(pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes())
    return digest.hexdigest()


def log_split(split: DatasetSplit, *, with_files: bool = False) -> None:
    """Log the three parts as MLflow dataset inputs and the hash as a tag, on the active run.

    With ``with_files``, the parts are also stored as CSV artifacts under ``data/``.
    """
    import tempfile

    import mlflow
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.pandas_dataset import from_pandas

    if split.source.startswith(SKLEARN_PREFIX):
        source: str | DatasetSource = CodeDatasetSource(tags={"dataset": split.source})
    else:
        source = split.source
    base = (
        Path(split.source).stem
        if not split.source.startswith(SKLEARN_PREFIX)
        else split.source[len(SKLEARN_PREFIX) :]
    )
    for context in ("train", "validation", "test"):
        frame = getattr(split, context)
        with warnings.catch_warnings():
            # MLflow registers the local-file source under two schemes and warns that a plain
            # path matches both; either reading is the same source.
            warnings.filterwarnings(
                "ignore", message="The specified dataset source can be interpreted"
            )
            dataset = from_pandas(
                frame, source=source, targets=split.target, name=f"{base}-{context}"
            )
        _log_input(dataset, context, split.content_hash)
    mlflow.set_tags(
        {
            "mlops.data_hash": split.content_hash,
            "mlops.data_source": split.source,
            "mlops.task": split.task,
        }
    )
    mlflow.log_params(
        {"data_hash": split.content_hash, "data_rows": split.n_rows, "task": split.task}
    )
    mlflow.log_metrics(
        {
            "data_duplicates_dropped": split.n_duplicates_dropped,
            "data_train_rows": len(split.train),
            "data_validation_rows": len(split.validation),
            "data_test_rows": len(split.test),
        }
    )
    if split.quality is not None:
        mlflow.log_dict(split.quality, "data/quality_report.json")
    if with_files:
        with tempfile.TemporaryDirectory() as tmp:
            for context in ("train", "validation", "test"):
                getattr(split, context).to_csv(Path(tmp) / f"{context}.csv", index=False)
            mlflow.log_artifacts(tmp, artifact_path="data")


_CONFLICT_CODES = frozenset({"BAD_REQUEST", "RESOURCE_ALREADY_EXISTS"})


def _log_input(dataset: Dataset, context: str, data_hash: str, attempts: int = 3) -> None:
    """``mlflow.log_input``, retried when another process logged the same dataset meanwhile.

    MLflow's SQL store looks the dataset up and then inserts it: two workers of one tuning
    study starting together both miss it and one insert fails on the unique key, which the
    store reports as ``BAD_REQUEST`` (a tracking server: ``RESOURCE_ALREADY_EXISTS``). On a
    retry the dataset is there and is only linked to this run; any other error is raised at
    once, and a conflict that outlives the retries too.
    """
    import time

    import mlflow
    from mlflow.exceptions import MlflowException

    for attempt in range(attempts):
        try:
            mlflow.log_input(dataset, context=context, tags={"mlops.data_hash": data_hash})
            return
        except MlflowException as exc:
            if attempt == attempts - 1 or exc.error_code not in _CONFLICT_CODES:
                raise
            time.sleep(0.2 * (attempt + 1))


def _describe_source(dataset: str) -> str:
    return dataset if dataset.startswith(SKLEARN_PREFIX) else str(Path(dataset).resolve())


def _infer_task(target: pd.Series, configured: str, known: str | None) -> str:
    if configured != "auto":
        return configured
    if known:
        return known
    if not ptypes.is_numeric_dtype(target) or ptypes.is_bool_dtype(target):
        return "classification"
    values = target.dropna()
    if ptypes.is_integer_dtype(values) or np.all(np.mod(values, 1) == 0):
        if values.nunique() <= 20:
            return "classification"
    return "regression"


def _split(
    frame: pd.DataFrame, target: str, task: str, data_cfg: DataConfig, seed: int
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    fractions = data_cfg.split
    if task == "classification":
        counts = frame[target].value_counts()
        needed = int(np.ceil(1 / min(fractions.train, fractions.validation, fractions.test)))
        rare = counts[counts < 3]
        if not rare.empty:
            raise DataValidationError(
                f"target column '{target}': class(es) {list(rare.index)} have fewer than 3 rows, "
                "too few to "
                f"stratify a train/validation/test split (about {needed} per class are advisable); "
                "add rows or merge classes"
            )
    stratify = frame[target] if task == "classification" else None
    # Whole row counts, so 120 rows split exactly 84/24/12 (fractions of fractions drift).
    n_test = max(1, round(len(frame) * fractions.test))
    n_val = max(1, round(len(frame) * fractions.validation))
    try:
        rest, test = train_test_split(frame, test_size=n_test, random_state=seed, stratify=stratify)
        stratify_rest = rest[target] if task == "classification" else None
        train, validation = train_test_split(
            rest, test_size=n_val, random_state=seed, stratify=stratify_rest
        )
    except ValueError as exc:
        raise DataValidationError(
            f"cannot split {len(frame)} rows "
            f"{fractions.train}/{fractions.validation}/{fractions.test}: {exc}; "
            "add rows or change data.split"
        ) from None
    return (
        train.reset_index(drop=True),
        validation.reset_index(drop=True),
        test.reset_index(drop=True),
    )
