"""The model-from-code file MLflow loads: it names the wrapper, so nothing is pickled."""

import mlflow

from mlops.serving.wrapper import MlopsModel

mlflow.models.set_model(MlopsModel())
