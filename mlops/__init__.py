"""mlops: an MLflow extension that takes a model from raw data to a monitored REST endpoint."""

from mlops.errors import ConfigError, DataValidationError, MlopsError

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DataValidationError",
    "MlopsError",
    "__version__",
]
