"""``mlops feedback``: ground-truth labels read from a CSV and joined on the served request ids."""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd

from mlops.config import Config
from mlops.errors import DataValidationError
from mlops.monitoring.store import LOG_FILE, MonitoringStore
from mlops.tracking import project_store_url


def read_labels(path: str | Path) -> pd.DataFrame:
    """A labels CSV (``request_id``, ``label`` and optionally ``row``), validated."""
    path = Path(path)
    if not path.is_file():
        raise DataValidationError(
            f"labels file '{path}' not found; pass a CSV with columns request_id,label"
        )
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataValidationError(
            f"labels file '{path}' is not a readable CSV ({str(exc).splitlines()[0]}); "
            "write a header request_id,label and one line per prediction"
        ) from None
    missing = [c for c in ("request_id", "label") if c not in frame.columns]
    if missing:
        raise DataValidationError(
            f"labels file '{path}' has no column(s) {missing} (found {list(frame.columns)}); "
            "write a header request_id,label[,row]"
        )
    if frame.empty:
        raise DataValidationError(
            f"labels file '{path}' has no rows; add one line per labelled prediction"
        )
    for col in ("request_id", "label"):
        blank = frame.index[frame[col].str.strip() == ""].tolist()
        if blank:
            raise DataValidationError(
                f"labels file '{path}': column '{col}' is empty on line(s) "
                f"{[i + 2 for i in blank[:5]]}; every line needs a {col}"
            )
    if "row" not in frame.columns:
        frame["row"] = "0"
    rows = pd.to_numeric(frame["row"].replace("", "0"), errors="coerce")
    bad = frame.index[rows.isna() | (rows < 0) | (rows % 1 != 0)].tolist()
    if bad:
        raise DataValidationError(
            f"labels file '{path}': column 'row' must be a whole number >= 0 (the row's "
            f"position in its request), got {frame.loc[bad[0], 'row']!r} on line {bad[0] + 2}"
        )
    frame["row"] = rows.astype(int)
    frame["request_id"] = frame["request_id"].str.strip()
    dupes = frame.duplicated(["request_id", "row"], keep=False)
    if dupes.any():
        first = frame[dupes].iloc[0]
        raise DataValidationError(
            f"labels file '{path}': request {first['request_id']} row {first['row']} is "
            "labelled more than once; keep one line per prediction"
        )
    return frame[["request_id", "row", "label"]]


def feedback(config: Config, name: str, labels_path: str | Path) -> int:
    """Attach the ground truth in ``labels_path`` to logged predictions of ``name``; rows stored."""
    labels = read_labels(labels_path)
    stored, unknown = MonitoringStore(
        project_store_url(config.monitoring.log_url, LOG_FILE)
    ).add_labels(name, labels, time.time())
    if unknown:
        shown = ", ".join(unknown[:5]) + (
            f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        )
        raise DataValidationError(
            f"{len(unknown)} of {len(labels)} labels name no logged prediction of {name}: {shown}; "
            "use the request_id the server returned (and row, for multi-row requests); nothing was "
            "stored"
        )
    return stored
