"""The input contract of a served model: every request format becomes the same two arrays.

A request reaches the model as a pandas DataFrame (``predict`` called by MLflow or a
notebook) or as a raw body (the scoring server's JSON and CSV, parsed here without pandas).
Whatever the format (``dataframe_split``, ``dataframe_records``, ``instances``, ``inputs``,
CSV), it ends as a float matrix of the numeric features and an object matrix of the
categorical ones, in training order, and it is checked once, by the same rules:

- at least one row and at most ``max_rows``, in every format;
- every required column present, named (no positional rows), and named once: a repeated
  JSON key, CSV header or ``columns`` entry is refused, never "the last copy wins";
- one value per cell (a list or an object in a cell is refused);
- numbers where numbers belong: finite (``Infinity``, ``1e309``, ``"inf"`` are refused), not
  booleans nor strings in JSON unless the contract was built with ``coerce_numbers`` (a CSV
  field is text by nature; either way only plain decimal notation is a number, never
  Python's ``1_000``); nulls only where training had them;
- no text value longer than :data:`MAX_FIELD_CHARS` (the CSV reader's own limit);
- a UTF-8 byte-order mark before a body is ignored.

Every refusal is an :class:`InvalidInput` (``INVALID_PARAMETER_VALUE``, HTTP 400) whose
message names the column and the row where there is one, and the fix, and quotes at most
:data:`CLIP_CHARS` characters of any value it was sent. A failure while scoring is a
:class:`PredictionFailed` (HTTP 500). The checks run on whole arrays (a set of the Python
types present, NumPy conversions); a value-by-value scan runs only to name what was refused.
"""

from __future__ import annotations

import csv
import io
import json
import math
import numbers
import re
import reprlib
from collections.abc import Sequence
from operator import itemgetter
from typing import Any

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE, NOT_IMPLEMENTED

try:  # a faster JSON decoder for batches; without it, json decodes every body (same values)
    import orjson as _orjson
except ImportError:  # pragma: no cover - a serving environment without orjson
    _orjson = None  # type: ignore[assignment]

FORMATS = ("dataframe_split", "dataframe_records", "instances", "inputs")
JSON, CSV = "application/json", "text/csv"
PARQUET = "application/vnd.apache.parquet"
MAX_FIELD_CHARS = 131_072  # the csv module's default field limit, for every format alike
CLIP_CHARS = 100  # the most of any sent value an error message quotes
BOM = "\ufeff"
# what pandas.read_csv (MLflow's CSV path) reads as a null by default
_NULL_WORDS = "|#N/A|#N/A N/A|#NA|-1.#IND|-1.#QNAN|-NaN|-nan|1.#IND|1.#QNAN|<NA>|N/A|NA|NULL|NaN"
CSV_NULLS = frozenset(f"{_NULL_WORDS}|None|n/a|nan|null".split("|"))  # "" included
# a number written as text: plain ASCII decimal notation (Python's float() would also take
# "1_000", other scripts' digits and surrounding Unicode spaces)
NUMBER = re.compile(
    r"[ \t]*[+-]?(?:(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|inf|infinity|nan)[ \t]*",
    re.IGNORECASE,
)

Arrays = tuple[np.ndarray, "np.ndarray | None"]
_PLAIN_NUMBERS = frozenset({float, int, type(None)})
_TEXT = frozenset({str})
_TEXT_OR_NULL = frozenset({str, type(None)})

_short = reprlib.Repr()
_short.maxstring = _short.maxother = _short.maxlong = CLIP_CHARS
_short.maxlist = _short.maxtuple = _short.maxdict = _short.maxset = 4
_short.maxlevel = 2


class InvalidInput(MlflowException):
    """Input the contract refuses: MLflow's scoring server answers it with HTTP 400.

    ``detail`` keeps the message as written here: MLflow's server prefixes ``message`` with
    the whole input before answering, which the serving adapter undoes.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)
        self.detail = message


class PredictionFailed(MlflowException):
    """Valid input that the model failed to score: HTTP 500, the cause chained."""

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=INTERNAL_ERROR)
        self.detail = message


class Unavailable(MlflowException):
    """A valid request this server cannot fulfil as deployed (a library it lacks): HTTP 501,
    with what to install; not the input's fault (400), nor a crash (500)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=NOT_IMPLEMENTED)
        self.detail = message


def invalid(message: str) -> InvalidInput:
    """The error MLflow's scoring server turns into an HTTP 400 with ``message``."""
    return InvalidInput(message)


def failed(exc: BaseException) -> PredictionFailed:
    """The HTTP 500 for a scoring failure: its type and a clipped message, no traceback."""
    return PredictionFailed(f"prediction failed: {clip(exc)}")


def unreadable(exc: BaseException) -> InvalidInput:
    """The HTTP 400 for input that broke a reader in a way no rule names (a safety net)."""
    return InvalidInput(
        f"input could not be read ({clip(exc)}); send a JSON object such as "
        '{"dataframe_split": {"columns": [...], "data": [[...]]}} or a CSV with a header row'
    )


def clip(value: Any) -> str:
    """``value`` for an error message: at most :data:`CLIP_CHARS` characters of anything sent."""
    if isinstance(value, BaseException):
        return f"{type(value).__name__}: {_short.repr(str(value))[1:-1]}"
    try:
        return _short.repr(value)
    except Exception:  # noqa: BLE001 - a value whose repr fails is still described
        return f"a {type(value).__name__}"


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
        self._take = itemgetter(*self.features) if self.features else None

    # ---- the entry points ----
    def parse(self, data: bytes | str, mime: str) -> Arrays:
        """A scoring-server body (``application/json`` or ``text/csv``) as checked arrays."""
        if mime == PARQUET:
            return _from_parquet(self, data)
        return _from_csv(self, data) if mime == CSV else _from_json(self, data)

    def parse_with_params(self, data: bytes | str, mime: str) -> tuple[Arrays, dict[str, Any]]:
        """:meth:`parse`, and the request's ``params`` object (MLflow's inference parameters,
        a JSON body's ``"params"``; empty for CSV and Parquet, which carry none)."""
        if mime == PARQUET or mime == CSV:
            return self.parse(data, mime), {}
        params: dict[str, Any] = {}
        return _from_json(self, data, params=params), params

    def from_frame(self, frame: Any) -> Arrays:
        """A DataFrame (or anything pandas reads as one) as checked arrays, by the same rules."""
        if not isinstance(frame, pd.DataFrame):
            try:
                frame = pd.DataFrame(frame)
            except (ValueError, TypeError) as exc:
                raise invalid(
                    f"input cannot be read as a table ({clip(exc)}); send columns {self.features}"
                ) from None
        self.check_rows(len(frame))
        if frame.columns.has_duplicates:
            repeated = list(dict.fromkeys(frame.columns[frame.columns.duplicated()]))
            raise self.repeated(repeated[0])
        missing = [c for c in self.features if c not in frame.columns]
        if missing:
            raise self.missing(missing)
        if not self.numeric:
            numeric = np.zeros((len(frame), 0))
        else:
            part = frame[self.numeric]
            if all(
                pd.api.types.is_numeric_dtype(t) and not pd.api.types.is_bool_dtype(t)
                for t in part.dtypes
            ):
                numeric = self.numeric_block(part.to_numpy(dtype=float, na_value=np.nan))
            else:
                numeric = self.numeric_block(part.to_numpy(dtype=object), text=False)
        categorical = (
            self.categorical_block(frame[self.categorical].to_numpy(dtype=object))
            if self.categorical
            else None
        )
        return numeric, categorical

    # ---- the rules ----
    def missing(self, columns: list[str], where: str = "") -> InvalidInput:
        """The one error for absent required columns."""
        return invalid(
            f"input is missing required column(s) {columns}{where}; "
            f"send every column of {self.features}"
        )

    def repeated(self, column: Any, where: str = "") -> InvalidInput:
        """The one error for a column sent twice."""
        return invalid(
            f"column {clip(column)} appears more than once{where}; send each column once "
            "(no copy is silently preferred)"
        )

    def check_rows(self, n: int) -> None:
        if n == 0:
            raise invalid(f"input has no rows; send at least one row with columns {self.features}")
        if n > self.max_rows:
            raise invalid(
                f"input has {n} rows, more than the limit of {self.max_rows}; "
                f"split it into batches of at most {self.max_rows}"
            )

    def numeric_block(self, block: np.ndarray, *, text: bool = False) -> np.ndarray:
        """Numeric columns as finite floats (NaN for null); a refused value names its column.

        ``text``: the values were read from text (CSV), where numbers are strings by nature.
        """
        values: np.ndarray | None
        if block.dtype.kind == "f":
            values = block
        else:
            kinds = set(map(type, block.ravel().tolist())) if block.size else set()
            values = None
            if kinds <= _PLAIN_NUMBERS:  # JSON numbers and nulls: the common case
                try:
                    values = block.astype(float)
                except OverflowError:  # an integer beyond float range: named below
                    values = None
            elif (text or self.coerce_numbers) and kinds <= _TEXT_OR_NULL:
                strings = [v for v in block.ravel().tolist() if v is not None]
                if all(map(NUMBER.fullmatch, strings)):
                    values = block.astype(float)
            if values is None:
                values = self._numbers_one_by_one(block, text=text)
        # one sum tells whether anything is infinite or null (a small block sums fastest in
        # Python); only then is it looked at closely
        flat = values.ravel()
        if math.isfinite(sum(flat.tolist()) if flat.size <= 256 else float(flat.sum())):
            return values
        infinite = np.isinf(values)
        if infinite.any():
            row, j = map(int, np.argwhere(infinite)[0])
            raise self._not_finite(self.numeric[j], block[row, j], row)
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
        """Categorical columns as strings (NaN for null); lists, objects and over-long text
        are refused."""
        flat = block.ravel().tolist()
        if set(map(type, flat)) <= _TEXT and max(map(len, flat), default=0) <= MAX_FIELD_CHARS:
            return block  # all text of a sane length: the common case
        for j, col in enumerate(self.categorical):
            column = block[:, j]
            for i, value in enumerate(column):
                if _is_null(value):
                    if self.required_categorical[j]:
                        raise invalid(
                            f"column '{col}' is null in row {i}, but the model was trained without "
                            "missing values there; "
                            "send one of its categories"
                        )
                    column[i] = np.nan
                elif isinstance(value, str):
                    if len(value) > MAX_FIELD_CHARS:
                        raise invalid(
                            f"column '{col}' has a value of {len(value)} characters in row {i} "
                            f"({clip(value)}), more than the limit of {MAX_FIELD_CHARS}; "
                            "send one of its categories"
                        )
                elif isinstance(value, (list, tuple, dict, set, np.ndarray)):
                    raise self._not_single(col, value, i)
                else:
                    column[i] = str(value)
        return block

    # ---- naming what was refused (off the hot path) ----
    def _numbers_one_by_one(self, block: np.ndarray, *, text: bool) -> np.ndarray:
        values = np.empty(block.shape, dtype=float)
        for j, col in enumerate(self.numeric):
            for i, value in enumerate(block[:, j]):
                values[i, j] = self._number(col, value, i, text=text)
        return values

    def _number(self, col: str, value: Any, row: int, *, text: bool) -> float:
        if _is_null(value):
            return math.nan
        if isinstance(value, (bool, np.bool_)):
            if self.coerce_numbers:
                return float(value)
            raise invalid(
                f"column '{col}' must be numeric, got {value!r} (a boolean) in row {row}; send a "
                "number (or serve with coerce_numbers=true to read true/false as 1/0)"
            )
        if isinstance(value, numbers.Real):
            try:
                return float(value)
            except OverflowError:
                raise self._not_finite(col, value, row) from None
        if isinstance(value, str):
            if not NUMBER.fullmatch(value):
                raise invalid(
                    f"column '{col}' must be numeric, got {clip(value)} in row {row}; send a "
                    "number in decimal notation"
                )
            if not (text or self.coerce_numbers):
                raise invalid(
                    f"column '{col}' must be numeric, got the string {clip(value)} in row {row}; "
                    "send the number unquoted (or serve with coerce_numbers=true to accept "
                    "numeric strings)"
                )
            return float(value)
        if isinstance(value, (list, tuple, dict, set, np.ndarray)):
            raise self._not_single(col, value, row)
        raise invalid(
            f"column '{col}' must be numeric, got {clip(value)} in row {row}; send a number"
        )

    def _not_finite(self, col: str, value: Any, row: int) -> InvalidInput:
        return invalid(
            f"column '{col}' must be a finite number, got {clip(value)} in row {row}; "
            "infinities and numbers beyond the float range are refused"
        )

    def _not_single(self, col: str, value: Any, row: int) -> InvalidInput:
        kind = "an object" if isinstance(value, dict) else "a list"
        return invalid(
            f"column '{col}' holds {kind} in row {row} ({clip(value)}); send one value per "
            "column and row"
        )


def _first_repeat(items: list[Any]) -> Any:
    seen = set()
    for item in items:
        if item in seen:
            return item
        seen.add(item)
    return None


def _is_null(value: Any) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and value != value)


# ---- JSON ----
def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        key = _first_repeat([k for k, _ in pairs])
        raise invalid(
            f"request body repeats the key {clip(key)} in one object; send each key once (no "
            "copy is silently preferred)"
        )
    return obj


def decode_json(data: bytes | str) -> Any:
    """The JSON value of a request body; a repeated key, too deep a nesting or a number
    Python cannot hold is an :class:`InvalidInput`, as is invalid JSON.

    orjson (where installed) decodes a body first, several times faster on the numbers that
    fill a batch; its value is used only when it is provably the one the standard library
    gives (:func:`_fast_decode`), else the body is decoded again by ``json``, whose rules and
    errors are the contract's."""
    if isinstance(data, str) and data.startswith(BOM):
        data = data[1:]
    fast = _fast_decode(data)
    if fast is not _UNDECIDED:
        return fast
    try:
        return json.loads(data, object_pairs_hook=_unique_keys)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise invalid(
            f"request body is not valid JSON ({clip(exc)}); send an object such as "
            '{"dataframe_split": {"columns": [...], "data": [[...]]}}'
        ) from None
    except RecursionError:
        raise invalid(
            "request body nests arrays or objects too deeply; send one value per column and row"
        ) from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise invalid(f"request body holds a value that cannot be read ({clip(exc)})") from None


_UNDECIDED = object()


def _fast_decode(data: bytes | str) -> Any:
    """``data`` decoded by orjson, or ``_UNDECIDED`` where that is not certainly what
    ``json.loads`` with :func:`_unique_keys` would return.

    orjson refuses what ``json`` reads leniently (``NaN``, ``1e400``, lone surrogates, a byte
    order mark), reads an integer beyond 64 bits as a float where ``json`` keeps it exact, and
    keeps the last of a repeated key, which the contract refuses. A refusal is left to
    ``json``, and so is any body with a run of 19 digits (the shortest integer orjson may turn
    into a float has 19; JSON writers put at most 17 significant digits in a float). Repeated
    keys are ruled out by counting: every key
    in the text is followed by one colon, and any other colon sits inside a string, so when
    the colons in the text equal the keys of the decoded objects (the objects of the body's
    own structure: the top level, its objects, and records), no key was repeated and no
    object went uncounted; when they differ (a colon in some text, a repeat, an object in a
    cell), ``json`` decodes the body again.
    """
    if _orjson is None:
        return _UNDECIDED
    raw = data if isinstance(data, bytes) else data.encode("utf-8", "surrogatepass")
    if raw.translate(_DIGITS_AS_ONES).find(_LONG_NUMBER) >= 0:
        return _UNDECIDED
    try:
        value = _orjson.loads(raw)
    except (_orjson.JSONDecodeError, TypeError, ValueError):
        return _UNDECIDED
    return value if _keys(value, 3) == raw.count(b":") else _UNDECIDED


_DIGITS_AS_ONES = bytes.maketrans(b"0123456789", b"1" * 10)
_LONG_NUMBER = b"1" * 19


def _keys(value: Any, depth: int) -> int:
    """Keys of the objects in ``value``: itself, and down to ``depth`` levels of objects and
    of lists' objects (lists of lists, such as a split's rows, are not entered)."""
    if isinstance(value, dict):
        n = len(value)
        if depth:
            n += sum(_keys(v, depth - 1) for v in value.values() if isinstance(v, (dict, list)))
        return n
    if isinstance(value, list) and depth:
        return sum(_keys(v, depth - 1) for v in value if isinstance(v, dict))
    return 0


def _from_json(
    contract: InputContract, data: bytes | str, *, params: dict[str, Any] | None = None
) -> Arrays:
    """The arrays of a JSON body; its ``"params"`` object is copied into ``params`` when given
    (else ignored, as MLflow ignores params a model's signature does not declare)."""
    payload = decode_json(data)
    if not isinstance(payload, dict):
        raise invalid(
            f"request body must be a JSON object with one of the keys {list(FORMATS)}, "
            f"got a {type(payload).__name__}"
        )
    keys = [k for k in payload if k in FORMATS]
    unknown = [k for k in payload if k not in FORMATS and k != "params"]
    if unknown or len(keys) != 1:
        found = [k[:CLIP_CHARS] for k in list(payload)[:10]] or "no keys"
        raise invalid(
            f"request body must have exactly one of the keys {list(FORMATS)} (and optionally "
            f"'params'); got {found}"
        )
    if params is not None and payload.get("params") is not None:
        given = payload["params"]
        if not isinstance(given, dict):
            raise invalid(
                f"'params' must be an object of parameter names and values, got {clip(given)}; "
                'send for example {"params": {"explain": 3}}'
            )
        params.update(given)
    key = keys[0]
    body = payload[key]
    if key == "dataframe_split":
        if (
            not isinstance(body, dict)
            or "data" not in body
            or set(body) - {"columns", "data", "index"}
        ):
            raise invalid(
                "'dataframe_split' must be an object with 'data', 'columns' and optionally "
                f"'index', got {clip(body)}"
            )
        if "columns" not in body:
            raise _unnamed(contract, key)
        rows = body["data"]
        arrays = _from_rows(contract, body["columns"], rows, key)
        index = body.get("index", rows)
        if not isinstance(index, list) or len(index) != len(rows):
            length = len(index) if isinstance(index, list) else clip(index)
            raise invalid(
                f"'dataframe_split' index has {length} entries but data has {len(rows)} rows; "
                "send one index entry per row, or no index"
            )
        return arrays
    if key == "dataframe_records":
        if not isinstance(body, list):
            raise invalid(
                f"'dataframe_records' must be a list of objects (one per row), got {clip(body)}"
            )
        return _from_records(contract, body, key)
    # instances / inputs: records, or an object of columns
    if isinstance(body, dict):
        return _from_columns(contract, body, key)
    if isinstance(body, list) and body and all(isinstance(r, dict) for r in body):
        return _from_records(contract, body, key)
    if isinstance(body, list) and body and any(isinstance(r, list) for r in body):
        raise _unnamed(contract, key)
    if isinstance(body, list) and not body:
        contract.check_rows(0)
    raise invalid(
        f"'{key}' must be a list of objects (one per row) or an object of columns, got {clip(body)}"
    )


def explain_param(params: dict[str, Any], limit: int) -> int | None:
    """The ``explain`` parameter of a request (how many contributions per row it asks for):
    None when not asked (absent, or 0: the default the model's signature declares), else an
    integer from 1 to ``limit``; anything else is refused."""
    value = params.get("explain")
    if value is None or (value == 0 and not isinstance(value, bool)):
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
        raise invalid(
            f"params 'explain' must be an integer from 1 to {limit} (the number of feature "
            f"contributions per row; 0 for none), got {clip(value)}; send for example "
            '{"params": {"explain": 3}}'
        )
    return value


def _unnamed(contract: InputContract, where: str) -> InvalidInput:
    return invalid(
        f"'{where}' rows have no column names; name every value: send objects such as "
        f"{{{', '.join(repr(c) + ': ...' for c in contract.features[:3])}}} or a "
        "'dataframe_split' with 'columns'"
    )


# ---- CSV ----
def _from_parquet(contract: InputContract, data: bytes | str) -> Arrays:
    """A Parquet body: its row count and column names are read from the file's footer and
    checked before any column is decoded (a small, highly compressed body may hold millions of
    rows); then the table goes through :meth:`InputContract.from_frame`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    raw = data.encode() if isinstance(data, str) else data
    try:
        reader = pq.ParquetFile(pa.BufferReader(raw))
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the sender's
        raise invalid(
            f"request body is not a readable Parquet file ({clip(exc)}); send the bytes of "
            "pandas.DataFrame.to_parquet()"
        ) from None
    contract.check_rows(reader.metadata.num_rows)
    names = [str(n) for n in reader.schema_arrow.names]
    if len(names) > MAX_PARQUET_COLUMNS:
        raise invalid(
            f"Parquet body has {len(names)} columns; send only the model's columns "
            f"{clip(contract.features)}"
        )
    if len(set(names)) != len(names):
        raise contract.repeated(_first_repeat(names))
    wanted = [n for n in names if n in contract.feature_set]
    missing = [c for c in contract.features if c not in wanted]
    if missing:
        raise contract.missing(missing)
    try:
        frame = reader.read(columns=wanted).to_pandas()
    except Exception as exc:  # noqa: BLE001
        raise invalid(f"Parquet body cannot be read ({clip(exc)})") from None
    for col in frame.columns:  # a list or a struct where one value belongs
        if frame[col].dtype == object and len(frame) and not frame[col].map(_scalar).all():
            row = int((~frame[col].map(_scalar)).to_numpy().argmax())
            raise contract._not_single(col, frame[col].iloc[row], row)
    return contract.from_frame(frame)


MAX_PARQUET_COLUMNS = 10_000


def _scalar(value: Any) -> bool:
    return not isinstance(value, (list, tuple, dict, set, np.ndarray))


def _from_csv(contract: InputContract, data: bytes | str) -> Arrays:
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
    except UnicodeDecodeError as exc:
        raise invalid(f"CSV body is not UTF-8 ({clip(exc)})") from None
    if text.startswith(BOM):  # Excel's "CSV UTF-8"
        text = text[1:]
    reader = csv.reader(io.StringIO(text))
    header: list[str] | None = None
    try:
        header = next(reader, None)
        if header is None:
            raise invalid(
                f"CSV body is empty; send a header row with columns {contract.features} and "
                "data rows"
            )
        rows: list[list[str]] = []
        for row in reader:
            if row:  # blank lines are skipped, as pandas does
                rows.append(row)
                if len(rows) > contract.max_rows:  # refused: the rest is counted, not kept
                    contract.check_rows(len(rows) + sum(1 for more in reader if more))
    except csv.Error as exc:
        if "field larger than field limit" in str(exc):
            where = _long_field(text, reader.line_num, header or [])
            raise invalid(
                f"{where} has a value longer than {MAX_FIELD_CHARS} characters in CSV line "
                f"{reader.line_num}; send one of the column's categories or a number"
            ) from None
        raise invalid(
            f"CSV body could not be read at line {reader.line_num} ({clip(exc)})"
        ) from None
    nulls = CSV_NULLS
    table = [[None if v in nulls else v for v in row] for row in rows]
    return _from_rows(contract, header, table, "text/csv", text=True)


def _long_field(text: str, line_num: int, header: list[str]) -> str:
    """The column of the over-long field on line ``line_num``, where the line says it plainly
    (no quotes: its commas separate its fields)."""
    lines = text.split("\n", line_num)
    line = lines[line_num - 1] if 0 < line_num <= len(lines) else '"'
    if '"' not in line:
        fields = line.rstrip("\r").split(",")
        j = next((j for j, f in enumerate(fields) if len(f) > MAX_FIELD_CHARS), len(header))
        if j < len(header):
            return f"column {clip(header[j])}"
    return "a field"


# ---- the shapes of a table ----
def _check_names(contract: InputContract, columns: Any, where: str) -> dict[str, int]:
    if not isinstance(columns, list):
        raise invalid(f"'{where}' columns must be a list of names, got {clip(columns)}")
    bad = next((c for c in columns if not isinstance(c, str)), None)
    if bad is not None:
        raise invalid(
            f"'{where}' column names must be strings, got {clip(bad)}; name each column once"
        )
    index = {c: i for i, c in enumerate(columns)}
    if len(index) != len(columns):
        raise contract.repeated(_first_repeat(columns))
    missing = [c for c in contract.features if c not in index]
    if missing:
        raise contract.missing(missing)
    return index


def _from_rows(
    contract: InputContract, columns: Any, rows: Any, where: str, *, text: bool = False
) -> Arrays:
    if not isinstance(rows, list):
        raise invalid(f"'{where}' data must be a list of rows, got {clip(rows)}")
    contract.check_rows(len(rows))
    index = _check_names(contract, columns, where)
    width = len(columns)
    if any(not isinstance(r, list) or len(r) != width for r in rows):
        bad = next(i for i, r in enumerate(rows) if not isinstance(r, list) or len(r) != width)
        count = len(rows[bad]) if isinstance(rows[bad], list) else "no list of"
        raise invalid(
            f"'{where}' row {bad} has {count} values but there are {width} columns; every row "
            f"needs one value per column {clip(columns)}"
        )
    table = _table(contract, rows, list(columns), width)
    return _blocks(contract, table, index, text=text)


def _from_records(contract: InputContract, records: list[Any], where: str) -> Arrays:
    contract.check_rows(len(records))
    names = contract.features
    take = contract._take
    try:
        picked = list(map(take, records)) if take is not None else [() for _ in records]
    except (KeyError, TypeError):  # a row that is not an object, or lacks a column: named here
        for i, record in enumerate(records):
            if not isinstance(record, dict):
                raise invalid(
                    f"'{where}' row {i} must be an object of column: value, got {clip(record)}"
                ) from None
            if not contract.feature_set <= record.keys():
                raise contract.missing(
                    [c for c in names if c not in record], f" in row {i}"
                ) from None
        raise
    if len(names) == 1:
        picked = [(v,) for v in picked]
    table = _table(contract, picked, names, len(names))
    return _blocks(contract, table, {c: i for i, c in enumerate(names)})


def _from_columns(contract: InputContract, columns: dict[str, Any], where: str) -> Arrays:
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
    n = lengths.pop()
    contract.check_rows(n)
    names = contract.features
    table = _table(contract, list(zip(*values, strict=True)), names, len(names))
    return _blocks(contract, table, {c: i for i, c in enumerate(names)})


def _table(
    contract: InputContract, rows: Sequence[Any], names: list[str], width: int
) -> np.ndarray:
    """Rows of single values as an object matrix; a list in a cell is refused by name."""
    try:
        table = np.array(rows, dtype=object)
    except ValueError:
        table = None
    if table is None or table.shape != (len(rows), width):
        for i, row in enumerate(rows):
            for name, value in zip(names, row, strict=True):
                if isinstance(value, (list, dict)) and name in contract.feature_set:
                    raise contract._not_single(name, value, i)
        # a list in a column the model does not use: keep it out of the way
        table = np.empty((len(rows), width), dtype=object)
        for i, row in enumerate(rows):
            for j, value in enumerate(row):
                table[i, j] = value
    return table


def _blocks(
    contract: InputContract, table: np.ndarray, index: dict[str, int], *, text: bool = False
) -> Arrays:
    numeric = contract.numeric_block(table[:, [index[c] for c in contract.numeric]], text=text)
    categorical = None
    if contract.categorical:
        categorical = contract.categorical_block(
            table[:, [index[c] for c in contract.categorical]].copy()
        )
    return numeric, categorical
