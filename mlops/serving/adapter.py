"""The one place where mlops relies on MLflow's scoring server beyond its public API.

MLflow's ``/invocations`` route hands every request to the module function
``mlflow.pyfunc.scoring_server.invocations(data, content_type, model, input_schema)`` and
answers the ``InvocationsResponse`` it returns. For a model that wraps our
:class:`~mlops.serving.wrapper.MlopsModel`, :func:`install_guard` replaces that function with
a guard that holds every request to one input contract, whichever path parses it:

- content type: JSON, CSV or Parquet (in any letter case), no parameter but a UTF-8
  ``charset``; anything else, a missing header included, is MLflow's own 415 (plain text);
- size: a body over the model's ``max_body_bytes`` is a 413. ``mlops serve`` refuses it
  before reading it (:class:`mlops.serving.server.BodyLimit`); under ``mlflow models serve``
  MLflow has already read the whole body into memory when the guard sees it;
- parsing: on the fast path (the default) JSON and CSV bodies go straight to
  :meth:`MlopsModel.respond`, skipping MLflow's DataFrame, milliseconds that dominate a
  one-row answer (``benchmarks/serving.py``). With ``MLOPS_FAST_SERVING=0`` MLflow parses and
  scores, but the contract reads the body first: MLflow's schema enforcement turns booleans
  and numeric strings into numbers before ``predict`` could refuse them, and merges repeated
  CSV headers. What the contract refuses is refused with the contract's words on both paths;
  what it accepts and MLflow refuses is answered by the contract. A JSON body naming
  ``"params"`` (``{"explain": k}``) is answered by ``respond`` on both paths: MLflow hands
  params only to a model whose signature declares them;
- errors: every failure leaves as MLflow's error JSON (``{"error_code": ..., "message": ...}``)
  with no stack trace and no more than 100 characters of any value sent: 400 for the input's
  fault, 500 only for a failure of the model or the server.

:func:`in_scoring_server` reads the variable MLflow's server sets for its workers; in such a
worker ``MlopsModel.load_context`` installs the guard (and, by default, the fast path).
``tests/test_adapter.py`` checks each internal used here against the installed MLflow and fails
loudly when a release changes one; the guard then stays out (logged) and MLflow's
own path serves alone.
"""

from __future__ import annotations

import inspect
import logging
import os
import weakref
from collections.abc import Callable
from typing import Any, Protocol

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, ErrorCode
from mlflow.pyfunc import scoring_server

from mlops.serving.inputs import CLIP_CHARS, InvalidInput, PredictionFailed, Unavailable, clip


class Responder(Protocol):
    """What the fast path needs of a model: the JSON answer to a raw body
    (``MlopsModel.respond``)."""

    def respond(self, data: bytes | str, mime: str) -> str: ...


logger = logging.getLogger(__name__)

# the variable `mlflow models serve` sets to the model path in each worker
SERVER_MODEL_PATH_ENV: str = scoring_server._SERVER_MODEL_PATH
INVOCATIONS_PARAMETERS = ("data", "content_type", "model", "input_schema")
RESPONSE_FIELDS = ("response", "status", "mimetype")
_JSON, _CSV, _PARQUET = "application/json", "text/csv", "application/vnd.apache.parquet"
CONTENT_TYPES = [_CSV, _JSON, _PARQUET]  # what MLflow's server reads, in its order
TOO_LARGE = 413
_BOM = b"\xef\xbb\xbf"
_PARAMS = ('"params"', b'"params"')  # indexed by isinstance(body, bytes)

_fast: weakref.WeakSet[Any] = weakref.WeakSet()  # wrappers whose JSON and CSV skip MLflow's parsing


class AdapterMismatch(RuntimeError):
    """The installed MLflow no longer has the scoring-server internals this module relies on."""


def check_mlflow() -> None:
    """Raise :class:`AdapterMismatch` naming what changed, if anything the guard uses did."""
    problems = []
    function = getattr(scoring_server, "invocations", None)
    if not callable(function):
        problems.append("mlflow.pyfunc.scoring_server.invocations is gone")
    else:
        found = tuple(
            inspect.signature(getattr(function, "__wrapped_original__", function)).parameters
        )
        if found != INVOCATIONS_PARAMETERS:
            problems.append(f"invocations{found} no longer takes {INVOCATIONS_PARAMETERS}")
    response = getattr(scoring_server, "InvocationsResponse", None)
    if getattr(response, "_fields", None) != RESPONSE_FIELDS:
        problems.append(
            f"InvocationsResponse fields are {getattr(response, '_fields', None)}, not "
            f"{RESPONSE_FIELDS}"
        )
    if not isinstance(SERVER_MODEL_PATH_ENV, str) or not SERVER_MODEL_PATH_ENV:
        problems.append(
            "scoring_server._SERVER_MODEL_PATH is no longer an environment variable name"
        )
    if list(getattr(scoring_server, "CONTENT_TYPES", [])) != CONTENT_TYPES:
        problems.append(
            f"the scoring server reads {getattr(scoring_server, 'CONTENT_TYPES', None)}, not "
            f"{CONTENT_TYPES}"
        )
    if problems:
        raise AdapterMismatch(
            "mlops.serving.adapter does not fit this MLflow: " + "; ".join(problems)
        )


def in_scoring_server() -> bool:
    """Whether this process is a worker of a scoring server (MLflow's or ``mlops serve``)."""
    return SERVER_MODEL_PATH_ENV in os.environ


def install_fast_path(wrapper: Responder) -> bool:
    """Guard this process's ``/invocations`` and let ``wrapper`` parse its JSON and CSV itself."""
    if not install_guard():
        return False
    _fast.add(wrapper)
    logger.info("mlops fast scoring path installed")
    return True


def install_guard() -> bool:
    """Put the guard around MLflow's ``invocations`` (again: it always wraps MLflow's own)."""
    try:
        check_mlflow()
    except AdapterMismatch as exc:
        logger.error("%s; serving through MLflow's own path, unguarded", exc)
        return False
    original = unguarded_invocations()
    guard = _guard(original)
    guard.__wrapped_original__ = original  # type: ignore[attr-defined]
    scoring_server.invocations = guard
    return True


def unguarded_invocations() -> Callable[..., Any]:
    """MLflow's own ``scoring_server.invocations`` (the guard wraps it, never itself)."""
    function: Callable[..., Any] = getattr(
        scoring_server.invocations, "__wrapped_original__", scoring_server.invocations
    )
    return function


def answer(
    wrapper: Any,
    original: Callable[..., Any],
    data: Any,
    content_type: str | None,
    model: Any,
    input_schema: Any,
    *,
    respond: Callable[[Any, str], str] | None = None,
) -> Any:
    """The guarded answer (an ``InvocationsResponse``) to one request for ``wrapper``'s model:
    the guard's, and ``mlops serve``'s, which passes the wrapper's ``respond`` with its request
    id bound as ``respond``. ``original`` is MLflow's ``invocations``."""
    try:
        return _invoke(wrapper, original, data, content_type, model, input_schema, respond)
    except Exception as exc:  # noqa: BLE001 - every failure becomes a clean answer
        return _failure(exc)


def body_limit(model: Any) -> int | None:
    """The largest request body the model served as ``model`` (a PyFuncModel) accepts."""
    wrapper = _python_model(model)
    return int(wrapper.max_body_bytes) if _guarded(wrapper) else None


def too_large(limit: int) -> str:
    """The 413 answer's JSON body (the same from the guard and from ``mlops serve``'s
    middleware)."""
    return MlflowException(
        f"request body is larger than the limit of {limit} bytes; send fewer rows per request "
        "(the limit is the model's serving.max_body_bytes)",
        error_code=ErrorCode.Value("REQUEST_LIMIT_EXCEEDED"),
    ).serialize_as_json()


def parse_content_type(content_type: str | None) -> tuple[str, str]:
    """``(mime type, charset)``; empty for parameters MLflow answers with its own 415."""
    parts = [p.strip() for p in (content_type or "").split(";")]
    params = dict(p.partition("=")[::2] for p in parts[1:] if p)
    if set(params) - {"charset"}:
        return "", ""
    return parts[0].lower(), params.get("charset", "utf-8").lower()


# ---- the guard ----
def _guard(original: Callable[..., Any]) -> Callable[..., Any]:
    seen: list[Any] = [None, None]  # the last model object asked about, and its wrapper or None

    def ours(model: Any) -> Any:
        if model is not seen[0]:
            wrapper = _python_model(model)
            seen[:] = [model, wrapper if _guarded(wrapper) else None]
        return seen[1]

    def invocations(data: Any, content_type: str | None, model: Any, input_schema: Any) -> Any:
        wrapper = ours(model)
        if wrapper is None:  # not ours: MLflow's, untouched
            return original(data, content_type, model, input_schema)
        return answer(wrapper, original, data, content_type, model, input_schema)

    return invocations


def _invoke(
    wrapper: Any,
    original: Callable[..., Any],
    data: Any,
    content_type: str | None,
    model: Any,
    input_schema: Any,
    respond: Callable[[Any, str], str] | None = None,
) -> Any:
    respond = respond or wrapper.respond
    mime, charset = parse_content_type(content_type)
    if mime not in CONTENT_TYPES or charset != "utf-8":
        return _unsupported(content_type, mime)
    limit = wrapper.max_body_bytes
    if len(data) > limit:
        return _answer(too_large(limit), TOO_LARGE)
    if data[:3] == _BOM or data[:1] == "\ufeff":
        data = data[3:] if isinstance(data, bytes) else data[1:]
    if wrapper in _fast or (mime == _JSON and _PARAMS[isinstance(data, bytes)] in data):
        # a body with "params" (e.g. {"explain": 3}) is answered by the wrapper on both paths:
        # MLflow passes params only to a model whose signature declares them
        return _answer(respond(data, mime))
    # MLflow's path: the contract reads the body first
    try:
        wrapper.contract.parse(data, mime)
    except Exception:  # noqa: BLE001 - refused again, and logged, by respond
        return _answer(respond(data, mime))
    try:
        return original(data, mime, model, input_schema)
    except Exception as exc:
        if _ours(exc) is not None:  # `predict` refused or failed: already logged
            raise
        logger.info("MLflow refused input the contract accepts (%s); answered by it", clip(exc))
        return _answer(respond(data, mime))


def _failure(exc: Exception) -> Any:
    """The answer to any failure: MLflow's error JSON, no traceback, values clipped."""
    found = _ours(exc)
    if found is not None:  # MLflow may have prefixed the message with the whole input
        status, code, message = found.get_http_status_code(), found.error_code, found.detail
    elif isinstance(exc, MlflowException):
        status, code, message = exc.get_http_status_code(), exc.error_code, exc.message
        if len(message) > CLIP_CHARS:  # MLflow's own words may quote the input
            message = message[:CLIP_CHARS] + "..."
    else:
        logger.error("scoring failed", exc_info=exc)
        status, code = 500, ErrorCode.Name(INTERNAL_ERROR)
        message = f"the server failed to answer: {clip(exc)}"
    if status >= 500:
        logger.error("answered %s: %s", status, message)
    body = MlflowException(message, error_code=ErrorCode.Value(code)).serialize_as_json()
    return _answer(body, status)


def _ours(exc: BaseException | None) -> InvalidInput | PredictionFailed | Unavailable | None:
    """The contract's or the wrapper's exception behind ``exc``, if any (MLflow re-raises
    ``predict``'s errors, or raises its own from them)."""
    for _ in range(8):
        if exc is None or isinstance(exc, (InvalidInput, PredictionFailed, Unavailable)):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _unsupported(content_type: str | None, mime: str) -> Any:
    """MLflow's 415, in MLflow's words, quoting at most 100 characters of the header."""
    if content_type is None:
        got = "no Content-Type header"
    elif mime in CONTENT_TYPES:
        got = f"{clip(content_type)}: only a UTF-8 charset is read"
    else:
        got = clip(content_type)
    return scoring_server.InvocationsResponse(
        response=(
            f"This predictor only supports the following content types: Types: {CONTENT_TYPES}."
            f" Got {got}."
        ),
        status=415,
        mimetype="text/plain",
    )


def _answer(body: str, status: int = 200) -> Any:
    return scoring_server.InvocationsResponse(response=body, status=status, mimetype=_JSON)


def _guarded(python_model: Any) -> bool:
    """Whether ``python_model`` is our wrapper (duck-typed: the model's code may be its own
    copy of this package)."""
    return (
        python_model is not None
        and callable(getattr(python_model, "respond", None))
        and hasattr(python_model, "contract")
        and hasattr(python_model, "max_body_bytes")
    )


def _python_model(model: Any) -> Any:
    try:
        return model.unwrap_python_model()
    except (AttributeError, MlflowException):
        return None
