"""Serving: the pyfunc wrapper, how it is logged, its input contract and its server.

- :mod:`.flavor`: ``log_model``, the model with signature, input example and artifacts.
- :mod:`.wrapper`: ``MlopsModel``, preprocessing + model + label decoding per request.
- :mod:`.inputs`: the one input contract every request format goes through.
- :mod:`.compiled`: the NumPy form of the fitted preprocessing.
- :mod:`.server`: the server of ``mlops serve``; :mod:`.adapter`: MLflow internals, in one place.
"""

from mlops.serving.flavor import log_model, model_metadata, requirements_for
from mlops.serving.wrapper import MlopsModel

__all__ = ["MlopsModel", "log_model", "model_metadata", "requirements_for"]
