"""The pyfunc wrapper that is logged, registered and served for every model family.

Everything a request needs is prepared once in ``load_context``: the fitted pipeline and its
NumPy form, column order, which columns may be null, the label mapping, the row limit and
the name and version of the model. ``predict`` validates, transforms, predicts and decodes
with no file or network I/O. Invalid input raises ``MlflowException`` with
``INVALID_PARAMETER_VALUE``, which MLflow's scoring server answers with HTTP 400.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from mlops.serving.compiled import compile_pipeline

logger = logging.getLogger(__name__)

PIPELINE_ARTIFACT = "pipeline"
METADATA_ARTIFACT = "metadata"
PREDICTION_COLUMN = "prediction"
PROBA_PREFIX = "proba_"
NAME_COLUMN = "model_name"
VERSION_COLUMN = "model_version"
REQUEST_ID_COLUMN = "request_id"  # with monitoring on: the id `mlops feedback` joins labels on
PROBA_KEY = "__proba__"
_SERVER_MODEL_PATH_ENV = "__pyfunc_model_path__"  # set by `mlflow models serve` for its workers


class MlopsModel(mlflow.pyfunc.PythonModel):
    """Preprocessing, model and label decoding as one MLflow pyfunc model."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        import joblib

        missing = [a for a in (PIPELINE_ARTIFACT, METADATA_ARTIFACT) if a not in (context.artifacts or {})]
        if missing:
            raise MlflowException(f"model artifacts {missing} are missing; re-log the model with mlops.serving.log_model")
        with open(context.artifacts[METADATA_ARTIFACT]) as fh:
            meta = json.load(fh)
        options = dict(context.model_config or {})
        model_dir = Path(context.artifacts[METADATA_ARTIFACT]).resolve().parent.parent
        name, version = options.get("model_name"), options.get("model_version")
        if not (name and version):
            name, version = _identify(model_dir, meta, serving=_SERVER_MODEL_PATH_ENV in os.environ)
        self._configure(
            joblib.load(context.artifacts[PIPELINE_ARTIFACT]), meta,
            max_rows=options.get("max_rows"), impute_missing=options.get("impute_missing"),
            model_name=str(name), model_version=str(version),
        )
        if _truthy(options.get("monitoring")) and _SERVER_MODEL_PATH_ENV in os.environ:
            from mlops.config import MonitoringConfig

            defaults = MonitoringConfig()  # for keys a model config leaves out
            self.enable_monitoring(
                options.get("monitoring_url") or defaults.log_url,
                sensitive=options.get("sensitive_columns") or (),
                sensitive_mode=options.get("sensitive_mode") or defaults.sensitive_mode,
                capacity=int(options.get("monitoring_queue_rows") or defaults.queue_rows),
            )
        if os.environ.get("MLOPS_FAST_SERVING", "1") != "0" and _SERVER_MODEL_PATH_ENV in os.environ:
            from mlops.serving.fastpath import install

            install(self)

    def _configure(self, pipeline: Any, meta: dict[str, Any], *, max_rows: int | None = None,
                   impute_missing: bool | None = None, model_name: str = "", model_version: str = "") -> None:
        self.pipeline = pipeline
        self.meta = meta
        self.task: str = meta["task"]
        self.numeric: list[str] = list(meta["numeric_columns"])
        self.categorical: list[str] = list(meta["categorical_columns"])
        self.features: list[str] = self.numeric + self.categorical
        self.feature_set = frozenset(self.features)
        self.max_rows = int(max_rows) if max_rows is not None else 10_000
        impute = _truthy(impute_missing)
        self.monitor = None
        nullable = set(self.features) if impute else set(meta.get("nullable_columns", []))
        self.required_numeric = np.array([c not in nullable for c in self.numeric], dtype=bool)
        self.required_categorical = [c not in nullable for c in self.categorical]
        self.classes = np.asarray(meta["classes"], dtype=object) if meta.get("classes") else None
        self.model_name, self.model_version = model_name, model_version
        self.estimator = pipeline.steps[-1][1]
        for attr in ("n_jobs",):  # one request is small: thread fan-out only adds latency
            if hasattr(self.estimator, attr):
                setattr(self.estimator, attr, 1)
        self.has_proba = self.classes is not None and hasattr(pipeline, "predict_proba")
        self.output_columns = [PREDICTION_COLUMN]
        if self.has_proba:
            self.output_columns += [f"{PROBA_PREFIX}{c}" for c in self.classes]
        self.output_columns += [NAME_COLUMN, VERSION_COLUMN]
        sample = pd.DataFrame(meta["sample"]) if meta.get("sample") else None
        self.compiled = compile_pipeline(pipeline, self.numeric, self.categorical, sample)

    def enable_monitoring(self, url: str, *, sensitive: Any = (), sensitive_mode: str = "hash",
                          capacity: int = 10_000, **options: Any) -> None:
        """Log every request from now on to the monitoring store at ``url`` (in the background).

        Done by ``load_context`` in a scoring server when the model config says
        ``monitoring: true``; never while the registry's gates evaluate a model.
        """
        from mlops.monitoring.logger import PredictionLogger

        self.monitor = PredictionLogger(
            url, model=self.model_name, version=self.model_version, numeric=self.numeric,
            categorical=self.categorical, classes=list(self.classes) if self.has_proba else None,
            sensitive=list(sensitive), sensitive_mode=sensitive_mode, capacity=capacity, **options)
        self._shutdown_hooked = False
        if REQUEST_ID_COLUMN not in self.output_columns:
            self.output_columns.append(REQUEST_ID_COLUMN)
        from mlops.db import mask_url

        logger.info("prediction log on: %s as %s version %s", mask_url(url), self.model_name, self.model_version)

    def _hook_shutdown(self) -> None:
        """Flush the prediction log when the scoring server shuts down gracefully.

        uvicorn re-raises SIGTERM after its graceful shutdown, so ``atexit`` never runs there;
        the app's shutdown event does, after the last request was answered. The app exists
        only once the model is loaded, hence on the first request.
        """
        import sys

        self._shutdown_hooked = True
        app = getattr(sys.modules.get("mlflow.pyfunc.scoring_server.app"), "app", None)
        handlers = getattr(getattr(app, "router", None), "on_shutdown", None)
        if isinstance(handlers, list):
            monitor = self.monitor
            handlers.append(lambda: monitor.close(timeout=5.0))

    # A DataFrame hint is one MLflow does not turn into a schema: the logged signature stays
    # the one inferred from the training data.
    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        return pd.DataFrame(self.answer(lambda: self.arrays_from_frame(model_input)), columns=self.output_columns)

    def answer(self, parse: Callable[[], tuple[np.ndarray, np.ndarray | None]]) -> dict[str, Any]:
        """Parse, validate and score one request; with monitoring on, also log it (and its failure)."""
        monitor = self.monitor
        if monitor is None:
            return self.score(*parse())
        if not self._shutdown_hooked:
            self._hook_shutdown()
        started = time.perf_counter()
        request_id = os.urandom(16).hex()  # 128 random bits, as uuid4 has, at a quarter of its cost
        try:
            numeric, categorical = parse()
            result = self.score(numeric, categorical)
        except MlflowException as exc:
            monitor.submit(request_id, latency_ms=(time.perf_counter() - started) * 1000,
                           status=exc.get_http_status_code(), error=exc.message[:1000])
            raise
        except Exception as exc:
            monitor.submit(request_id, latency_ms=(time.perf_counter() - started) * 1000, status=500,
                           error=repr(exc)[:1000])
            raise
        result[REQUEST_ID_COLUMN] = np.full(numeric.shape[0], request_id, dtype=object)
        monitor.submit(request_id, latency_ms=(time.perf_counter() - started) * 1000, numeric=numeric,
                       categorical=categorical, predictions=result[PREDICTION_COLUMN], scores=result.get(PROBA_KEY))
        return result

    # ---- input: everything becomes (float matrix, object matrix) in feature order ----
    def arrays_from_frame(self, frame: Any) -> tuple[np.ndarray, np.ndarray | None]:
        if not isinstance(frame, pd.DataFrame):
            try:
                frame = pd.DataFrame(frame)
            except (ValueError, TypeError) as exc:
                raise invalid(f"input cannot be read as a table ({exc}); send columns {self.features}") from None
        self.check_rows(len(frame))
        missing = [c for c in self.features if c not in frame.columns]
        if missing:
            raise invalid(f"input is missing required column(s) {missing}; send every column of {self.features}")
        if not self.numeric:
            numeric = np.zeros((len(frame), 0))
        else:
            part = frame[self.numeric]
            all_numbers = all(pd.api.types.is_numeric_dtype(t) and not pd.api.types.is_bool_dtype(t) for t in part.dtypes)
            numeric = self.numeric_block(part.to_numpy(dtype=float if all_numbers else object))
        categorical = self.categorical_block(frame[self.categorical].to_numpy(dtype=object)) if self.categorical else None
        return numeric, categorical

    def check_rows(self, n: int) -> None:
        if n == 0:
            raise invalid(f"input has no rows; send at least one row with columns {self.features}")
        if n > self.max_rows:
            raise invalid(f"input has {n} rows, more than the limit of {self.max_rows}; split it into batches of at most {self.max_rows}")

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
                            f"column '{col}' must be numeric, got {value!r} in row {i}; send a number"
                        ) from None
            raise
        if self.required_numeric.any():
            nulls = np.isnan(values[:, self.required_numeric])
            if nulls.any():
                row, j = map(int, np.argwhere(nulls)[0])
                col = np.asarray(self.numeric)[self.required_numeric][j]
                raise invalid(
                    f"column '{col}' is null in row {row}, but the model was trained without missing values there; "
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
                            f"column '{col}' is null in row {i}, but the model was trained without missing values there; "
                            "send one of its categories"
                        )
                    column[i] = np.nan
                elif not isinstance(value, str):
                    column[i] = str(value)
        return block

    # ---- model ----
    def score(self, numeric: np.ndarray, categorical: np.ndarray | None) -> dict[str, Any]:
        """Predictions as output columns (``prediction``, ``proba_<class>``, name, version)."""
        if self.compiled is not None:
            X = self.compiled.transform(numeric, categorical)
            model = self.estimator
        else:
            X = pd.DataFrame(numeric, columns=self.numeric)
            for j, col in enumerate(self.categorical):
                X[col] = categorical[:, j]
            model = self.pipeline
        n = numeric.shape[0]
        out: dict[str, Any] = {}
        if self.task == "classification":
            if self.has_proba:
                proba = np.asarray(model.predict_proba(X))
                out[PROBA_KEY] = proba
                out[PREDICTION_COLUMN] = self.classes[np.argmax(proba, axis=1)]
                for i, col in enumerate(self.output_columns[1:1 + proba.shape[1]]):
                    out[col] = proba[:, i]
            else:
                out[PREDICTION_COLUMN] = self.classes[np.asarray(model.predict(X), dtype=int)]
        else:
            out[PREDICTION_COLUMN] = np.asarray(model.predict(X), dtype=float).reshape(-1)
        out[NAME_COLUMN] = np.full(n, self.model_name, dtype=object)
        out[VERSION_COLUMN] = np.full(n, self.model_version, dtype=object)
        return out


def _truthy(value: Any) -> bool:
    return value.strip().lower() in ("1", "true", "yes") if isinstance(value, str) else bool(value)


def invalid(message: str) -> MlflowException:
    """The error MLflow's scoring server turns into an HTTP 400 with ``message``."""
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def _identify(model_dir: Path, meta: dict[str, Any], *, serving: bool) -> tuple[str, str]:
    """The registered name and version this model was loaded as, looked up once at load.

    Outside a scoring server (a notebook, batch scoring) no store is contacted: the logged
    model id stands in for the version.
    """
    from mlflow.models import Model

    mlmodel = Model.load(str(model_dir / "MLmodel"))
    fallback = (meta.get("registered_model_name") or "unregistered", mlmodel.model_id or mlmodel.run_id or "unknown")
    if not serving or not mlmodel.run_id:
        return fallback
    try:
        client = mlflow.MlflowClient()
        versions = [
            v for v in client.search_model_versions(f"run_id = '{mlmodel.run_id}'")
            if not mlmodel.model_id or getattr(v, "model_id", None) in (None, mlmodel.model_id)
        ]
    except Exception as exc:  # the store may be unreachable from the server: serve anyway
        logger.warning("could not look up the registered version of this model (%s); answering as %s", exc, fallback)
        return fallback
    if not versions:
        return fallback
    preferred = [v for v in versions if v.name == meta.get("registered_model_name")] or versions
    best = max(preferred, key=lambda v: int(v.version))
    return best.name, str(best.version)
