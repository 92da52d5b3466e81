"""Revisions of the audit trail tables (mlops_audit, mlops_registry_lock); run by Alembic."""
