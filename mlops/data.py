"""Data preparation: load, validate, clean, split 70/20/10, hash and log to MLflow.

The public entry point is :func:`prepare`. ``data.dataset`` names a CSV or Parquet file, a
folder or glob of them (local or ``s3://``), ``sql:SELECT ...`` run on ``data.sql_url``, or a
bundled ``sklearn:NAME``. What a run records of its data (dataset inputs, the parts as Parquet)
is :mod:`mlops.lineage`.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import logging
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from pandas.api import types as ptypes
from sklearn.model_selection import train_test_split

from mlops.config import Config, DataConfig, redact_url
from mlops.errors import DataValidationError
from mlops.sources import (
    CSV,
    PARQUET,
    Source,
    SourceError,
    format_of,
    is_glob,
    list_sources,
    open_source,
)

if TYPE_CHECKING:
    from sklearn.utils import Bunch

logger = logging.getLogger(__name__)

Opener = Callable[[], Any]  # opens a binary stream of a file (the caller closes it)

SKLEARN_PREFIX = "sklearn:"
SKLEARN_TARGET = "target"
SQL_PREFIX = "sql:"
PARTS = ("train", "validation", "test")
MANIFEST = "data/manifest.json"
QUALITY_REPORT = "data/quality_report.json"


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
    from mlops.features import check_features, string_columns
    from mlops.rules import check_dataset

    data_cfg = config.data
    frame, target, default_task = load_source(data_cfg)
    # string columns of the input: declared categorical, or read by a string feature transform
    strings = list(dict.fromkeys([*data_cfg.categorical, *string_columns(data_cfg.features)]))
    check_features(data_cfg.features, frame, target)  # first: it names the transform
    validate_frame(frame, target, strings, data_cfg.dataset)
    # the rules see the data as it came (duplicates included), before anything is dropped
    quality = check_dataset(frame, data_cfg.rules, source=data_cfg.dataset, strings=strings)
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
        source=describe_source(data_cfg),
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

    if dataset.startswith(SQL_PREFIX):
        frame = _read_sql(data_cfg)
    else:
        frame = _read_files(dataset, data_cfg.max_columns)
    if not data_cfg.target:
        raise DataValidationError(
            f"data.target: not set for '{_clip_text(dataset)}'; pass --target COLUMN (columns: "
            f"{', '.join(map(str, frame.columns))})"
        )
    return frame, data_cfg.target, None


def _read_files(dataset: str, max_columns: int) -> pd.DataFrame:
    """A CSV or Parquet file, or a folder or glob of them (local or ``s3://``), as one frame.

    Every part must have the same columns (in any order: the first part's order is kept).
    """
    on_s3 = dataset.startswith("s3://")
    if not on_s3 and Path(dataset).is_file():
        # a single local file: by its suffix, and as CSV when it has none we know
        sources = [Source(dataset, format_of(dataset) or CSV)]
    elif not on_s3 and not Path(dataset).exists() and not is_glob(dataset):
        raise DataValidationError(
            f"data.dataset: file '{dataset}' not found; pass an existing CSV or Parquet file, a "
            "folder or glob of them, s3://bucket/key, sql:SELECT ... (with data.sql_url), or "
            "one of " + ", ".join(SKLEARN_PREFIX + n for n in SKLEARN_DATASETS)
        )
    else:
        try:
            sources = list_sources(dataset)
        except SourceError as exc:
            raise DataValidationError(f"data.dataset: {exc}") from None
    frames: list[pd.DataFrame] = []
    for source in sources:
        frame = (
            _read_parquet(source, max_columns)
            if source.format == PARQUET
            else _read_csv(source, max_columns)
        )
        if frames:
            frame = _same_columns(frame, frames[0], source.uri, sources[0].uri)
        frames.append(frame)
    if len(frames) == 1:
        return frames[0]
    logger.info("read %d files of %s", len(frames), dataset)
    return pd.concat(frames, ignore_index=True)


def _same_columns(
    frame: pd.DataFrame, first: pd.DataFrame, name: str, first_name: str
) -> pd.DataFrame:
    """``frame`` in ``first``'s column order; a part with other columns is refused by name."""
    columns, expected = [str(c) for c in frame.columns], [str(c) for c in first.columns]
    if columns == expected:
        return frame
    missing = [c for c in expected if c not in columns]
    extra = [c for c in columns if c not in expected]
    if missing or extra:
        raise DataValidationError(
            f"data.dataset: part '{name}' does not have the columns of '{first_name}' "
            f"(missing {_clip(missing)}, extra {_clip(extra)}); every file of a folder or glob "
            "must have the same columns: fix or move that file"
        )
    return frame[expected]


def _read_csv(source: Source, max_columns: int) -> pd.DataFrame:
    """One CSV: its header checked (width, unique names) before it is read whole."""
    try:
        return _read_csv_checked(source, max_columns)
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise DataValidationError(
            f"data.dataset: '{source.uri}' is not a readable gzip file ({exc}); give the "
            "CSV uncompressed, or compress it again (gzip)"
        ) from None


def _read_csv_checked(source: Source, max_columns: int) -> pd.DataFrame:
    name = source.uri
    if source.on_s3:
        try:
            with open_source(source) as body:
                raw = body.read()
        except SourceError as exc:
            raise DataValidationError(f"data.dataset: {exc}") from None
        if name.lower().endswith(".gz"):
            raw = gzip.decompress(raw)

        def opener() -> Any:
            return io.BytesIO(raw)

        target: Any = io.BytesIO(raw)
    else:
        path = Path(name)
        if name.lower().endswith(".gz"):

            def opener() -> Any:
                return gzip.GzipFile(path, "rb")

        else:

            def opener() -> Any:
                return open(path, "rb")

        target = path
    _check_width(opener, name, max_columns)
    _check_unique_header(opener, name)
    try:
        return pd.read_csv(target)
    except pd.errors.EmptyDataError:
        raise DataValidationError(
            f"data.dataset: '{name}' is empty; give a CSV with a header row and data"
        ) from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataValidationError(
            f"data.dataset: '{name}' is not a readable CSV ({exc}); fix the file"
        ) from None


def _read_parquet(source: Source, max_columns: int) -> pd.DataFrame:
    """One Parquet file: its schema checked (width, unique names) before the data is read."""
    import pyarrow.parquet as pq

    name = source.uri
    try:
        with open_source(source) as fh:
            try:
                parquet = pq.ParquetFile(fh)
                columns = parquet.schema_arrow.names
                if len(columns) > max_columns:
                    raise DataValidationError(
                        f"data.dataset: '{name}' has {len(columns):,} columns in its schema, "
                        f"more than data.max_columns ({max_columns:,}); drop columns from the "
                        f"file, or raise the limit with --set data.max_columns={len(columns)}"
                    )
                _check_unique(columns, name)
                table = parquet.read()
            except DataValidationError:
                raise
            except Exception as exc:  # noqa: BLE001 - any unreadable file: name it
                raise DataValidationError(
                    f"data.dataset: '{name}' is not a readable Parquet file ("
                    f"{type(exc).__name__}: {_clip_text(str(exc))}); fix or replace the file, or "
                    "give a CSV file a .csv suffix"
                ) from None
    except SourceError as exc:
        raise DataValidationError(f"data.dataset: {exc}") from None
    return table.to_pandas()


def _read_sql(data_cfg: DataConfig) -> pd.DataFrame:
    """The rows of ``data.dataset``'s query on ``data.sql_url``.

    The URL's ``${VAR}`` placeholders are filled from the environment only in the engine
    (:func:`mlops.db.create_engine`); messages show the URL redacted and the database's error
    with every secret scrubbed out.
    """
    import sqlalchemy as sa

    from mlops.db import create_engine, scrub

    dataset = data_cfg.dataset
    query = dataset[len(SQL_PREFIX) :].strip()
    if not query:
        raise DataValidationError(
            "data.dataset: 'sql:' holds no query; write sql:SELECT ... FROM a_table"
        )
    url = data_cfg.sql_url
    if not url:
        raise DataValidationError(
            f"data.sql_url: not set, but data.dataset is a query ('{_clip_text(dataset)}'); set "
            "data.sql_url to the database's SQLAlchemy URL with the password as ${VAR}, e.g. "
            "--set data.sql_url='postgresql+psycopg://reader:${DB_PASSWORD}@db/sales'"
        )
    engine = None
    try:
        engine = create_engine(url)
        with engine.connect() as conn:
            frame = pd.read_sql_query(query, conn)
    except (sa.exc.SQLAlchemyError, pd.errors.DatabaseError) as exc:
        detail = str(getattr(exc, "orig", None) or exc).strip()
        first = scrub(detail.splitlines()[0] if detail else type(exc).__name__, url)
        raise DataValidationError(
            f"data.dataset: the query failed on {redact_url(url)} ({_clip_text(first)}); fix the "
            "query or data.sql_url"
        ) from None
    finally:
        if engine is not None:
            engine.dispose()
    if len(frame.columns) > data_cfg.max_columns:
        raise DataValidationError(
            f"data.dataset: the query returns {len(frame.columns):,} columns, more than "
            f"data.max_columns ({data_cfg.max_columns:,}); select fewer columns, or raise the "
            f"limit with --set data.max_columns={len(frame.columns)}"
        )
    _check_unique([str(c) for c in frame.columns], dataset)
    return frame


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
    return _header_width(lambda: open(path, "rb"), limit)


def _header_width(opener: Opener, limit: int | None) -> tuple[int, bool]:
    limit = HEADER_SCAN_BYTES if limit is None else limit
    columns = 0  # separators seen outside quotes in the header so far
    quoted = False
    started = False  # a byte of the header (not of a blank line before it) was seen
    read = 0
    with opener() as stream:
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


def _check_width(opener: Opener, dataset: str, max_columns: int) -> None:
    """Refuse a CSV wider than ``data.max_columns`` before it is read whole."""
    count, whole = _header_width(opener, None)
    if count <= max_columns:
        return
    counted = f"{count:,} columns" if whole else f"at least {count:,} columns"
    raise DataValidationError(
        f"data.dataset: '{dataset}' has {counted} in its header, more than data.max_columns "
        f"({max_columns:,}); drop columns from the file, or raise the limit with "
        f"--set data.max_columns={count if whole else 'N'}"
    )


def _check_unique_header(opener: Opener, dataset: str) -> None:
    """Refuse a header that names a column twice (pandas would rename the copy ``a.1``)."""
    with opener() as raw:
        fh = io.TextIOWrapper(raw, newline="", encoding="utf-8", errors="replace")
        header = next(csv.reader(line for line in fh if line.strip()), [])
    _check_unique(header, dataset)


def _check_unique(header: list[str], dataset: str) -> None:
    seen: set[str] = set()
    for name in header:
        if name in seen:
            raise DataValidationError(
                f"data.dataset: '{dataset}' names column {_clip(name)} twice in its header; "
                "give each column one name"
            )
        seen.add(name)


def _clip(value: object, limit: int = 100) -> str:
    return _clip_text(repr(value), limit)


def _clip_text(text: str, limit: int = 100) -> str:
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


def describe_source(data_cfg: DataConfig) -> str:
    """Where the data came from, as logged: ``sklearn:NAME``, the absolute path (file, folder
    or glob), the ``s3://`` URI, or for a query the redacted ``data.sql_url`` and the query.

    Never a password: a URL is shown as :func:`mlops.config.redact_url` shows it.
    """
    dataset = data_cfg.dataset
    if dataset.startswith(SQL_PREFIX):
        # the URL first: a redacted URL holds no space, so the first space ends it
        return f"{redact_url(data_cfg.sql_url or '')} {dataset}"
    if dataset.startswith((SKLEARN_PREFIX, "s3://")):
        return dataset
    return str(Path(dataset).resolve())


def _source_parts(source: str) -> tuple[str | None, str]:
    """A split's source as (redacted URL of a query or None, what ``data.dataset`` held)."""
    url, _, query = source.partition(" ")
    if query.startswith(SQL_PREFIX):
        return url, query
    return None, source


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
