"""The registry layer: stages as aliases, promotions behind gates, an audit trail, rollback.

- :mod:`.promotion`: ``register``, ``promote``, ``evaluate``, ``rollback``, ``status``.
- :mod:`.gates`: each validation gate, returning its verdict as data.
- :mod:`.audit`: the append-only audit table and the per-model promotion lock.
"""

from mlops.registry.audit import AuditLog, AuditRecord
from mlops.registry.gates import CHECKSUM_TAG, GateResult, model_checksum
from mlops.registry.promotion import (
    PRODUCTION,
    STAGING,
    Promotion,
    VersionStatus,
    audit_trail,
    current_user,
    evaluate,
    promote,
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
    "current_user",
    "evaluate",
    "model_checksum",
    "promote",
    "register",
    "rollback",
    "status",
]
