"""mlops: an MLflow extension that takes a model from raw data to a monitored REST endpoint."""

from mlops.errors import ConfigError, DataValidationError, InvalidRequest, MlopsError, TrainingError

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DataValidationError",
    "InvalidRequest",
    "MlopsError",
    "TrainingError",
    "__version__",
]
