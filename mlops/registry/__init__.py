"""The registry layer: stages as aliases, promotions behind gates, an audit trail, rollback.

- :mod:`.promotion`: ``register``, ``promote``, ``evaluate``, ``rollback``, ``status``,
  ``reconcile`` (intents left pending, changes made outside mlops) and ``record_traffic`` (a
  split or shadow started or stopped, for the audit trail).
- :mod:`.gates`: each validation gate, returning its verdict as data.
- :mod:`.audit`: the audit table (intents first, then changes) and the per-model promotion lock.
"""

from mlops.registry.audit import AuditLog, AuditRecord
from mlops.registry.gates import CHECKSUM_TAG, GateResult, model_checksum
from mlops.registry.promotion import (
    PRODUCTION,
    STAGING,
    Promotion,
    VersionStatus,
    audit_trail,
    canonical_version,
    check_name,
    current_user,
    evaluate,
    promote,
    reconcile,
    record_traffic,
    register,
    rollback,
    status,
)

__all__ = [
    "CHECKSUM_TAG",
    "PRODUCTION",
    "STAGING",
    "AuditLog",
    "AuditRecord",
    "GateResult",
    "Promotion",
    "VersionStatus",
    "audit_trail",
    "canonical_version",
    "check_name",
    "current_user",
    "evaluate",
    "model_checksum",
    "promote",
    "reconcile",
    "record_traffic",
    "register",
    "rollback",
    "status",
]
