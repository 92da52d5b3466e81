"""Production monitoring: the prediction log, reference profiles, checks, alerts and rollback.

- :mod:`mlops.monitoring.logger`: served models log every request in the background.
- :mod:`mlops.monitoring.profile`: the training-data profile logged inside every model.
- :mod:`mlops.monitoring.checks`: ``mlops monitor``, one MLflow run per check.
- :mod:`mlops.monitoring.drift`: PSI and KS statistics against that profile.
- :mod:`mlops.monitoring.feedback`: ``mlops feedback``, ground-truth labels joined on request ids.
- :mod:`mlops.monitoring.report`: the drift report of a check.
"""

from mlops.monitoring.checks import CheckResult, check
from mlops.monitoring.feedback import feedback, read_labels

__all__ = ["CheckResult", "check", "feedback", "read_labels"]
