"""A direct request path for ``mlflow models serve``, installed by the wrapper at load time.

MLflow's scoring server turns every request into a pandas DataFrame, casts it column by
column to the signature's types, enforces the schema column by column again, and serializes
the output DataFrame: for one row of thirty features that is most of the time a request
takes. Our wrapper validates the input itself (with messages that name the column), so for
this model the server's ``invocations`` function is replaced by one that goes straight from
the JSON or CSV body to NumPy arrays, through the wrapper's validation and its NumPy
preprocessing, to the same JSON response MLflow would send (``{"predictions": [...]}``).

The protocol is unchanged: the same routes, content types, input formats (``dataframe_split``,
``dataframe_records``, ``instances``, ``inputs``, CSV) and error shape
(``{"error_code": ..., "message": ...}`` with a 4xx status). Anything it does not handle
(Parquet bodies, another model in the process) goes to MLflow's own function. Set
``MLOPS_FAST_SERVING=0`` to serve through MLflow's path alone.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from typing import TYPE_CHECKING, Any

import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR

from mlops.serving.wrapper import invalid

if TYPE_CHECKING:
    from mlops.serving.wrapper import MlopsModel

logger = logging.getLogger(__name__)

FORMATS = ("dataframe_split", "dataframe_records", "instances", "inputs")
_JSON, _CSV = "application/json", "text/csv"


def install(wrapper: "MlopsModel") -> bool:
    """Route this process's scoring-server requests for ``wrapper`` through :func:`handle`."""
    from mlflow.pyfunc import scoring_server

    original = getattr(scoring_server, "invocations", None)
    if original is None or not hasattr(scoring_server, "InvocationsResponse"):
        logger.warning("this MLflow's scoring server has no invocations() to extend; serving through MLflow's path")
        return False
    original = getattr(original, "__wrapped_original__", original)
    response_type = scoring_server.InvocationsResponse

    def invocations(data: Any, content_type: str | None, model: Any, input_schema: Any) -> Any:
        impl = getattr(getattr(model, "_model_impl", None), "python_model", None)
        mime, charset = _parse_content_type(content_type)
        if impl is not wrapper or mime not in (_JSON, _CSV) or charset != "utf-8":
            return original(data, content_type, model, input_schema)
        body = handle(wrapper, data, mime)
        return response_type(response=body, status=200, mimetype=_JSON)

    invocations.__wrapped_original__ = original  # type: ignore[attr-defined]
    scoring_server.invocations = invocations
    logger.info("mlops fast scoring path installed")
    return True


def handle(wrapper: "MlopsModel", data: bytes | str, mime: str) -> str:
    """The JSON response body for one request; raises ``MlflowException`` (4xx) on bad input."""
    try:
        result = wrapper.answer(lambda: _from_csv(wrapper, data) if mime == _CSV else _from_json(wrapper, data))
    except MlflowException:
        raise
    except Exception as exc:  # a bug or a model failure: a 500 that says so, and keep serving
        logger.exception("prediction failed")
        raise MlflowException(f"prediction failed: {exc!r}", error_code=INTERNAL_ERROR) from exc
    columns = [(name, _jsonable(result[name])) for name in wrapper.output_columns]
    n = len(columns[0][1])
    rows = [{name: values[i] for name, values in columns} for i in range(n)]
    return json.dumps({"predictions": rows})


def _jsonable(values: np.ndarray) -> list[Any]:
    out = values.tolist()
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        out = [v if np.isfinite(v) else None for v in out]
    return out


def _parse_content_type(content_type: str | None) -> tuple[str, str]:
    parts = [p.strip() for p in (content_type or "").split(";")]
    params = dict(p.partition("=")[::2] for p in parts[1:] if p)
    if set(params) - {"charset"}:
        return "", ""  # MLflow answers unknown parameters with its own 415
    return parts[0].lower(), params.get("charset", "utf-8").lower()


def _from_json(wrapper: "MlopsModel", data: bytes | str) -> tuple[np.ndarray, np.ndarray | None]:
    try:
        payload = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise invalid(f"request body is not valid JSON ({exc}); send an object such as "
                      '{"dataframe_split": {"columns": [...], "data": [[...]]}}') from None
    if not isinstance(payload, dict):
        raise invalid(f"request body must be a JSON object with one of the keys {list(FORMATS)}, "
                      f"got a {type(payload).__name__}")
    keys = [k for k in payload if k in FORMATS]
    unknown = [k for k in payload if k not in FORMATS and k != "params"]
    if unknown or len(keys) != 1:
        found = list(payload) or "no keys"
        raise invalid(f"request body must have exactly one of the keys {list(FORMATS)} (and optionally 'params'); "
                      f"got {found}")
    key = keys[0]
    body = payload[key]
    if key == "dataframe_split":
        if not isinstance(body, dict) or "data" not in body or set(body) - {"columns", "data", "index"}:
            raise invalid("'dataframe_split' must be an object with 'data' and optionally 'columns' and 'index', "
                          f"got {_describe(body)}")
        return _from_rows(wrapper, body.get("columns"), body["data"], key)
    if key == "dataframe_records":
        if not isinstance(body, list):
            raise invalid(f"'dataframe_records' must be a list of objects (one per row), got {_describe(body)}")
        return _from_records(wrapper, body, key)
    # instances / inputs: records, a column mapping, or rows in the signature's column order
    if isinstance(body, dict):
        return _from_columns(wrapper, body, key)
    if isinstance(body, list) and body and all(isinstance(r, dict) for r in body):
        return _from_records(wrapper, body, key)
    if isinstance(body, list):
        return _from_rows(wrapper, None, body, key)
    raise invalid(f"'{key}' must be a list of rows or an object of columns, got {_describe(body)}")


def _from_csv(wrapper: "MlopsModel", data: bytes | str) -> tuple[np.ndarray, np.ndarray | None]:
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
    except UnicodeDecodeError as exc:
        raise invalid(f"CSV body is not UTF-8 ({exc})") from None
    reader = csv.reader(io.StringIO(text))
    try:
        header = next(reader)
    except StopIteration:
        raise invalid(f"CSV body is empty; send a header row with columns {wrapper.features} and data rows") from None
    rows = [[None if v == "" else v for v in row] for row in reader if row]
    return _from_rows(wrapper, header, rows, "text/csv")


def _from_rows(wrapper: "MlopsModel", columns: list[str] | None, rows: Any,
               where: str) -> tuple[np.ndarray, np.ndarray | None]:
    if not isinstance(rows, list):
        raise invalid(f"'{where}' data must be a list of rows, got {_describe(rows)}")
    wrapper.check_rows(len(rows))
    if columns is None:
        columns = wrapper.features  # positional, in the signature's order
    if not isinstance(columns, list):
        raise invalid(f"'{where}' columns must be a list of names, got {_describe(columns)}")
    width = len(columns)
    if any(not isinstance(r, list) or len(r) != width for r in rows):
        bad = next(i for i, r in enumerate(rows) if not isinstance(r, list) or len(r) != width)
        raise invalid(f"'{where}' row {bad} has {len(rows[bad]) if isinstance(rows[bad], list) else 'no'} values "
                      f"but there are {width} columns; every row needs one value per column {wrapper.features}")
    index = {c: i for i, c in enumerate(columns)}
    missing = [c for c in wrapper.features if c not in index]
    if missing:
        raise invalid(f"input is missing required column(s) {missing}; send every column of {wrapper.features}")
    table = np.array(rows, dtype=object).reshape(len(rows), width)
    return _blocks(wrapper, table, index)


def _from_records(wrapper: "MlopsModel", records: list[Any], where: str) -> tuple[np.ndarray, np.ndarray | None]:
    wrapper.check_rows(len(records))
    features = wrapper.feature_set
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise invalid(f"'{where}' row {i} must be an object of column: value, got {_describe(record)}")
        if not features <= record.keys():
            missing = [c for c in wrapper.features if c not in record]
            raise invalid(f"input is missing required column(s) {missing} in row {i}; "
                          f"send every column of {wrapper.features}")
    names = wrapper.features
    table = np.array([[r[c] for c in names] for r in records], dtype=object).reshape(len(records), len(names))
    return _blocks(wrapper, table, {c: i for i, c in enumerate(names)})


def _from_columns(wrapper: "MlopsModel", columns: dict[str, Any], where: str) -> tuple[np.ndarray, np.ndarray | None]:
    missing = [c for c in wrapper.features if c not in columns]
    if missing:
        raise invalid(f"input is missing required column(s) {missing}; send every column of {wrapper.features}")
    values = [columns[c] if isinstance(columns[c], list) else [columns[c]] for c in wrapper.features]
    lengths = {len(v) for v in values}
    if len(lengths) != 1:
        raise invalid(f"'{where}' columns have different lengths {sorted(lengths)}; send one value per row in every column")
    wrapper.check_rows(lengths.pop())
    table = np.array(values, dtype=object).reshape(len(values), -1).T
    return _blocks(wrapper, table, {c: i for i, c in enumerate(wrapper.features)})


def _blocks(wrapper: "MlopsModel", table: np.ndarray, index: dict[str, int]) -> tuple[np.ndarray, np.ndarray | None]:
    numeric = wrapper.numeric_block(table[:, [index[c] for c in wrapper.numeric]])
    categorical = None
    if wrapper.categorical:
        categorical = wrapper.categorical_block(table[:, [index[c] for c in wrapper.categorical]].copy())
    return numeric, categorical


def _describe(value: Any) -> str:
    text = json.dumps(value)[:80] if not isinstance(value, (bytes, bytearray)) else repr(value[:80])
    return f"{type(value).__name__} {text}"
