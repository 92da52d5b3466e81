"""Production monitoring: the prediction log, reference profiles, checks, alerts and rollback.

- :mod:`mlops.monitoring.logger`: served models log every request in the background.
- :mod:`mlops.monitoring.profile`: the training-data profile logged inside every model.
- :mod:`mlops.monitoring.checks`: ``mlops monitor``, one MLflow run per check.
- :mod:`mlops.monitoring.drift`: PSI and KS statistics against that profile.
- :mod:`mlops.monitoring.compare`: two versions on the same live traffic (a split or a shadow).
- :mod:`mlops.monitoring.feedback`: ``mlops feedback``, ground-truth labels joined on request ids.
- :mod:`mlops.monitoring.report`: the drift report of a check.

``check`` is imported from :mod:`mlops.monitoring.checks`, not re-exported here: a check acts
on the registry (reconciliation, rollback), while the registry's ``live_comparison`` gate reads
the prediction log through this package, so the package itself stays below the registry.
"""

from mlops.monitoring.compare import (
    Comparison,
    Difference,
    accuracy_difference,
    compare_versions,
    squared_error_difference,
)
from mlops.monitoring.feedback import feedback, read_labels
from mlops.monitoring.store import CheckResult

__all__ = [
    "CheckResult",
    "Comparison",
    "Difference",
    "accuracy_difference",
    "compare_versions",
    "feedback",
    "read_labels",
    "squared_error_difference",
]
