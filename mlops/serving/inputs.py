"""The input contract of a served model: every request format becomes the same two arrays.

A request reaches the model as a pandas DataFrame (``predict`` called by MLflow or a
notebook) or as a raw body (the scoring server's JSON and CSV, parsed here without pandas).
Whatever the format (``dataframe_split``, ``dataframe_records``, ``instances``, ``inputs``,
CSV), it ends as a float matrix of the numeric features and an object matrix of the
categorical ones, in training order, and it is checked once, by the same rules: row limit,
required columns, numbers where numbers belong, nulls only where training had them. Every
refusal is an ``MlflowException`` with ``INVALID_PARAMETER_VALUE`` (HTTP 400) whose message
names the column, the row and the fix.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

FORMATS = ("dataframe_split", "dataframe_records", "instances", "inputs")
JSON, CSV = "application/json", "text/csv"

Arrays = tuple[np.ndarray, "np.ndarray | None"]


def invalid(message: str) -> MlflowException:
    """The error MLflow's scoring server turns into an HTTP 400 with ``message``."""
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


class InputContract:
    """The columns a model takes, which may be null, and the row limit; parses and checks input."""

    def __init__(
        self,
        numeric: Sequence[str],
        categorical: Sequence[str],
        *,
        nullable: Sequence[str] = (),
        max_rows: int = 10_000,
        coerce_numbers: bool = False,
    ) -> None:
        self.numeric, self.categorical = list(numeric), list(categorical)
        self.features = self.numeric + self.categorical
        self.feature_set = frozenset(self.features)
        self.max_rows = int(max_rows)
        self.coerce_numbers = bool(coerce_numbers)  # numeric strings and booleans taken as numbers
        self.required_numeric = np.array([c not in nullable for c in self.numeric], dtype=bool)
        self.required_categorical = [c not in nullable for c in self.categorical]

    # ---- the entry points ----
    def parse(self, data: bytes | str, mime: str) -> Arrays:
        """A scoring-server body (``application/json`` or ``text/csv``) as checked arrays."""
        return _from_csv(self, data) if mime == CSV else _from_json(self, data)

    def from_frame(self, frame: Any) -> Arrays:
        """A DataFrame (or anything pandas reads as one) as checked arrays."""
        if not isinstance(frame, pd.DataFrame):
            try:
                frame = pd.DataFrame(frame)
            except (ValueError, TypeError) as exc:
                raise invalid(
                    f"input cannot be read as a table ({exc}); send columns {self.features}"
                ) from None
        self.check_rows(len(frame))
        missing = [c for c in self.features if c not in frame.columns]
        if missing:
            raise self.missing(missing)
        if not self.numeric:
            numeric = np.zeros((len(frame), 0))
        else:
            part = frame[self.numeric]
            all_numbers = all(
                pd.api.types.is_numeric_dtype(t) and not pd.api.types.is_bool_dtype(t)
                for t in part.dtypes
            )
            numeric = self.numeric_block(part.to_numpy(dtype=float if all_numbers else object))
        categorical = (
            self.categorical_block(frame[self.categorical].to_numpy(dtype=object))
            if self.categorical
            else None
        )
        return numeric, categorical

    # ---- the rules ----
    def missing(self, columns: list[str], where: str = "") -> MlflowException:
        """The one error for absent required columns."""
        return invalid(
            f"input is missing required column(s) {columns}{where}; "
            f"send every column of {self.features}"
        )

    def check_rows(self, n: int) -> None:
        if n == 0:
            raise invalid(f"input has no rows; send at least one row with columns {self.features}")
        if n > self.max_rows:
            raise invalid(
                f"input has {n} rows, more than the limit of {self.max_rows}; "
                f"split it into batches of at most {self.max_rows}"
            )

    def numeric_block(self, block: np.ndarray) -> np.ndarray:
        """Numeric columns as floats; a non-number or a forbidden null names its column."""
        try:
            values = block.astype(float) if block.dtype != float else block
        except (ValueError, TypeError):
            for j, col in enumerate(self.numeric):
                for i, value in enumerate(block[:, j]):
                    try:
                        float(value if value is not None else "nan")
                    except (ValueError, TypeError):
                        raise invalid(
                            f"column '{col}' must be numeric, got {value!r} in row {i}; send a "
                            "number"
                        ) from None
            raise
        if self.required_numeric.any():
            nulls = np.isnan(values[:, self.required_numeric])
            if nulls.any():
                row, j = map(int, np.argwhere(nulls)[0])
                col = np.asarray(self.numeric)[self.required_numeric][j]
                raise invalid(
                    f"column '{col}' is null in row {row}, but the model was trained without "
                    "missing values there; "
                    "send a number (or serve with impute_missing=true to impute it)"
                )
        return values

    def categorical_block(self, block: np.ndarray) -> np.ndarray:
        for j, col in enumerate(self.categorical):
            column = block[:, j]
            for i, value in enumerate(column):
                if value is None or (isinstance(value, float) and np.isnan(value)):
                    if self.required_categorical[j]:
                        raise invalid(
                            f"column '{col}' is null in row {i}, but the model was trained without "
                            "missing values there; "
                            "send one of its categories"
                        )
                    column[i] = np.nan
                elif not isinstance(value, str):
                    column[i] = str(value)
        return block


def _from_json(contract: InputContract, data: bytes | str) -> tuple[np.ndarray, np.ndarray | None]:
    try:
        payload = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise invalid(
            f"request body is not valid JSON ({exc}); send an object such as "
            '{"dataframe_split": {"columns": [...], "data": [[...]]}}'
        ) from None
    if not isinstance(payload, dict):
        raise invalid(
            f"request body must be a JSON object with one of the keys {list(FORMATS)}, "
            f"got a {type(payload).__name__}"
        )
    keys = [k for k in payload if k in FORMATS]
    unknown = [k for k in payload if k not in FORMATS and k != "params"]
    if unknown or len(keys) != 1:
        found = list(payload) or "no keys"
        raise invalid(
            f"request body must have exactly one of the keys {list(FORMATS)} (and optionally "
            "'params'); "
            f"got {found}"
        )
    key = keys[0]
    body = payload[key]
    if key == "dataframe_split":
        if (
            not isinstance(body, dict)
            or "data" not in body
            or set(body) - {"columns", "data", "index"}
        ):
            raise invalid(
                "'dataframe_split' must be an object with 'data' and optionally 'columns' and "
                "'index', "
                f"got {_describe(body)}"
            )
        return _from_rows(contract, body.get("columns"), body["data"], key)
    if key == "dataframe_records":
        if not isinstance(body, list):
            raise invalid(
                "'dataframe_records' must be a list of objects (one per row), got "
                f"{_describe(body)}"
            )
        return _from_records(contract, body, key)
    # instances / inputs: records, a column mapping, or rows in the signature's column order
    if isinstance(body, dict):
        return _from_columns(contract, body, key)
    if isinstance(body, list) and body and all(isinstance(r, dict) for r in body):
        return _from_records(contract, body, key)
    if isinstance(body, list):
        return _from_rows(contract, None, body, key)
    raise invalid(f"'{key}' must be a list of rows or an object of columns, got {_describe(body)}")


def _from_csv(contract: InputContract, data: bytes | str) -> tuple[np.ndarray, np.ndarray | None]:
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
    except UnicodeDecodeError as exc:
        raise invalid(f"CSV body is not UTF-8 ({exc})") from None
    reader = csv.reader(io.StringIO(text))
    try:
        header = next(reader)
    except StopIteration:
        raise invalid(
            f"CSV body is empty; send a header row with columns {contract.features} and data rows"
        ) from None
    rows = [[None if v == "" else v for v in row] for row in reader if row]
    return _from_rows(contract, header, rows, "text/csv")


def _from_rows(
    contract: InputContract, columns: list[str] | None, rows: Any, where: str
) -> tuple[np.ndarray, np.ndarray | None]:
    if not isinstance(rows, list):
        raise invalid(f"'{where}' data must be a list of rows, got {_describe(rows)}")
    contract.check_rows(len(rows))
    if columns is None:
        columns = contract.features  # positional, in the signature's order
    if not isinstance(columns, list):
        raise invalid(f"'{where}' columns must be a list of names, got {_describe(columns)}")
    width = len(columns)
    if any(not isinstance(r, list) or len(r) != width for r in rows):
        bad = next(i for i, r in enumerate(rows) if not isinstance(r, list) or len(r) != width)
        raise invalid(
            f"'{where}' row {bad} has {len(rows[bad]) if isinstance(rows[bad], list) else 'no'} "
            "values "
            f"but there are {width} columns; every row needs one value per column "
            f"{contract.features}"
        )
    index = {c: i for i, c in enumerate(columns)}
    missing = [c for c in contract.features if c not in index]
    if missing:
        raise contract.missing(missing)
    table = np.array(rows, dtype=object).reshape(len(rows), width)
    return _blocks(contract, table, index)


def _from_records(
    contract: InputContract, records: list[Any], where: str
) -> tuple[np.ndarray, np.ndarray | None]:
    contract.check_rows(len(records))
    features = contract.feature_set
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise invalid(
                f"'{where}' row {i} must be an object of column: value, got {_describe(record)}"
            )
        if not features <= record.keys():
            raise contract.missing(
                [c for c in contract.features if c not in record], f" in row {i}"
            )
    names = contract.features
    table = np.array([[r[c] for c in names] for r in records], dtype=object).reshape(
        len(records), len(names)
    )
    return _blocks(contract, table, {c: i for i, c in enumerate(names)})


def _from_columns(
    contract: InputContract, columns: dict[str, Any], where: str
) -> tuple[np.ndarray, np.ndarray | None]:
    missing = [c for c in contract.features if c not in columns]
    if missing:
        raise contract.missing(missing)
    values = [
        columns[c] if isinstance(columns[c], list) else [columns[c]] for c in contract.features
    ]
    lengths = {len(v) for v in values}
    if len(lengths) != 1:
        raise invalid(
            f"'{where}' columns have different lengths {sorted(lengths)}; send one value per row "
            "in every column"
        )
    contract.check_rows(lengths.pop())
    table = np.array(values, dtype=object).reshape(len(values), -1).T
    return _blocks(contract, table, {c: i for i, c in enumerate(contract.features)})


def _blocks(
    contract: InputContract, table: np.ndarray, index: dict[str, int]
) -> tuple[np.ndarray, np.ndarray | None]:
    numeric = contract.numeric_block(table[:, [index[c] for c in contract.numeric]])
    categorical = None
    if contract.categorical:
        categorical = contract.categorical_block(
            table[:, [index[c] for c in contract.categorical]].copy()
        )
    return numeric, categorical


def _describe(value: Any) -> str:
    text = json.dumps(value)[:80] if not isinstance(value, (bytes, bytearray)) else repr(value[:80])
    return f"{type(value).__name__} {text}"
