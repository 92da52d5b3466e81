"""The verified model folder as the scoring engines use it: its ``MlopsModel`` wrapper.

Both engines load it here (the pandas engine in its process, the Spark engine in each Python
worker); ``mlflow.pyfunc`` runs the wrapper's ``load_context``, which checks the pipeline's
checksum before it deserialises anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow

from mlops.errors import MlopsError


class ScoringFailed(MlopsError, RuntimeError):
    """The model failed on rows its contract accepted (a model or environment problem)."""


def load_wrapper(model_dir: Path, model_config: dict[str, Any]) -> Any:
    """The verified model's wrapper (``MlopsModel``); other models are refused by name."""
    from mlops.serving.wrapper import MlopsModel

    model = mlflow.pyfunc.load_model(str(model_dir), model_config=model_config)
    wrapper = model.unwrap_python_model()
    if not isinstance(wrapper, MlopsModel):
        raise ScoringFailed(
            f"model at {model_dir} is no mlops model ({type(wrapper).__name__}); `mlops score` "
            "needs a version logged by mlops (its input contract decides what is rejected)"
        )
    return wrapper
