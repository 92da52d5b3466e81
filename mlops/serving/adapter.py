"""The one place where mlops relies on MLflow's scoring server beyond its public API.

MLflow's ``/invocations`` turns every body into a pandas DataFrame before ``predict``: a
few milliseconds that dominate a one-row answer (measured in ``benchmarks/serving.py``). No
public hook lets a model take the raw body, so :func:`install_fast_path` replaces
``mlflow.pyfunc.scoring_server.invocations`` (a module function, called per request with
``(data, content_type, model, input_schema)`` and answering an ``InvocationsResponse``)
with one that hands JSON and CSV bodies for our wrapper to :meth:`MlopsModel.respond` and
everything else to MLflow's own function. :func:`in_scoring_server` reads the environment
variable MLflow's server sets for its workers. ``tests/test_adapter.py`` checks each of
these against the installed MLflow and fails loudly when a release changes them; set
``MLOPS_FAST_SERVING=0`` to serve through MLflow's path alone.
"""

from __future__ import annotations

import inspect
import logging
import os
from typing import Any, Protocol

from mlflow.exceptions import MlflowException
from mlflow.pyfunc import scoring_server


class Responder(Protocol):
    """What the fast path needs of a model: the JSON answer to a raw body
    (``MlopsModel.respond``)."""

    def respond(self, data: bytes | str, mime: str) -> str: ...


logger = logging.getLogger(__name__)

# the variable `mlflow models serve` sets to the model path in each worker
SERVER_MODEL_PATH_ENV: str = scoring_server._SERVER_MODEL_PATH
INVOCATIONS_PARAMETERS = ("data", "content_type", "model", "input_schema")
RESPONSE_FIELDS = ("response", "status", "mimetype")
_JSON, _CSV = "application/json", "text/csv"


class AdapterMismatch(RuntimeError):
    """The installed MLflow no longer has the scoring-server internals this module relies on."""


def check_mlflow() -> None:
    """Raise :class:`AdapterMismatch` naming what changed, if anything the fast path uses did."""
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
    if problems:
        raise AdapterMismatch(
            "mlops.serving.adapter does not fit this MLflow: " + "; ".join(problems)
        )


def in_scoring_server() -> bool:
    """Whether this process is a worker of a scoring server (MLflow's or ``mlops serve``)."""
    return SERVER_MODEL_PATH_ENV in os.environ


def install_fast_path(wrapper: Responder) -> bool:
    """Route this process's ``/invocations`` requests for ``wrapper`` through its own parsing."""
    try:
        check_mlflow()
    except AdapterMismatch as exc:
        logger.error("%s; serving through MLflow's own path (slower, same answers)", exc)
        return False
    original = getattr(
        scoring_server.invocations, "__wrapped_original__", scoring_server.invocations
    )
    response_type = scoring_server.InvocationsResponse

    served: list[Any] = []  # the PyFuncModel found to wrap `wrapper`, looked up on first use

    def ours(model: Any) -> bool:
        if served and model is served[0]:
            return True
        if _python_model(model) is wrapper:
            served[:] = [model]
            return True
        return False

    def invocations(data: Any, content_type: str | None, model: Any, input_schema: Any) -> Any:
        mime, charset = parse_content_type(content_type)
        if mime not in (_JSON, _CSV) or charset != "utf-8" or not ours(model):
            return original(data, content_type, model, input_schema)
        return response_type(response=wrapper.respond(data, mime), status=200, mimetype=_JSON)

    invocations.__wrapped_original__ = original  # type: ignore[attr-defined]
    scoring_server.invocations = invocations
    logger.info("mlops fast scoring path installed")
    return True


def parse_content_type(content_type: str | None) -> tuple[str, str]:
    """``(mime type, charset)``; empty for parameters MLflow answers with its own 415."""
    parts = [p.strip() for p in (content_type or "").split(";")]
    params = dict(p.partition("=")[::2] for p in parts[1:] if p)
    if set(params) - {"charset"}:
        return "", ""
    return parts[0].lower(), params.get("charset", "utf-8").lower()


def _python_model(model: Any) -> Any:
    try:
        return model.unwrap_python_model()
    except (AttributeError, MlflowException):
        return None
