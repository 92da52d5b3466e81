"""The pyfunc wrapper that is logged, registered and served for every model family.

Everything a request needs is prepared once in ``load_context``: the fitted pipeline
(preprocessing + model), column order, dtypes and the label mapping. ``predict`` validates,
transforms, predicts and decodes, with no file or network I/O.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np
import pandas as pd
import mlflow.pyfunc
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

logger = logging.getLogger(__name__)

PIPELINE_ARTIFACT = "pipeline"
METADATA_ARTIFACT = "metadata"
PREDICTION_COLUMN = "prediction"
PROBA_PREFIX = "proba_"


class MlopsModel(mlflow.pyfunc.PythonModel):
    """Preprocessing, model and label decoding as one MLflow pyfunc model."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        import joblib

        missing = [a for a in (PIPELINE_ARTIFACT, METADATA_ARTIFACT) if a not in context.artifacts]
        if missing:
            raise MlflowException(f"model artifacts {missing} are missing; re-log the model with mlops.serving.log_model")
        with open(context.artifacts[METADATA_ARTIFACT]) as fh:
            meta = json.load(fh)
        self._configure(joblib.load(context.artifacts[PIPELINE_ARTIFACT]), meta)

    def _configure(self, pipeline: Any, meta: dict[str, Any]) -> None:
        self.pipeline = pipeline
        self.meta = meta
        self.task: str = meta["task"]
        self.numeric: list[str] = list(meta["numeric_columns"])
        self.categorical: list[str] = list(meta["categorical_columns"])
        self.features: list[str] = self.numeric + self.categorical
        self.classes = np.asarray(meta["classes"], dtype=object) if meta.get("classes") else None
        self.proba_columns = [f"{PROBA_PREFIX}{c}" for c in self.classes] if self.classes is not None else []
        self.has_proba = self.classes is not None and hasattr(pipeline, "predict_proba")

    # A DataFrame hint is one MLflow does not turn into a schema: the logged signature stays
    # the one inferred from the training data.
    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        frame = self._validate(model_input)
        if self.task == "classification":
            if self.has_proba:
                proba = self.pipeline.predict_proba(frame)
                codes = np.argmax(proba, axis=1)
            else:
                codes = np.asarray(self.pipeline.predict(frame), dtype=int)
                proba = None
            out = pd.DataFrame({PREDICTION_COLUMN: self.classes[codes]})
            if proba is not None:
                for i, col in enumerate(self.proba_columns):
                    out[col] = proba[:, i]
            return out
        return pd.DataFrame({PREDICTION_COLUMN: np.asarray(self.pipeline.predict(frame), dtype=float)})

    def _validate(self, model_input: Any) -> pd.DataFrame:
        if not isinstance(model_input, pd.DataFrame):
            try:
                model_input = pd.DataFrame(model_input)
            except (ValueError, TypeError) as exc:
                raise _invalid(f"input cannot be read as a table ({exc}); send columns {self.features}")
        if len(model_input) == 0:
            raise _invalid(f"input has no rows; send at least one row with columns {self.features}")
        missing = [c for c in self.features if c not in model_input.columns]
        if missing:
            raise _invalid(f"input is missing required column(s) {missing}; send every column of {self.features}")
        frame = model_input[self.features]
        for col in self.numeric:
            if not pd.api.types.is_numeric_dtype(frame[col]):
                converted = pd.to_numeric(frame[col], errors="coerce")
                bad = frame[col][converted.isna() & frame[col].notna()]
                if len(bad):
                    raise _invalid(f"column '{col}' must be numeric, got {bad.iloc[0]!r}; send a number or null")
                frame = frame.assign(**{col: converted})
        return frame


def _invalid(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)
