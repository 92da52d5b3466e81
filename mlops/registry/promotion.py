"""The registry layer: stages as aliases, promotions behind gates, audit, rollback.

Aliases are the truth: ``staging`` and ``production`` on the registered model, served as
``models:/NAME@production``. Legacy stages are mirrored while MLflow still has them. Every
promotion, refusal and rollback is audited (model-version tags and the append-only table of
:mod:`mlops.audit`), and runs under a per-model lock, so two promoters racing are serialized:
exactly one production version, and each audit row names the version it really replaced.
"""

from __future__ import annotations

import getpass
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from mlops.config import Config
from mlops.errors import ConfigError, GateFailed, RegistryError
from mlops.registry import gates as v
from mlops.registry.audit import AuditLog, AuditRecord
from mlops.tracking import project_store_url

logger = logging.getLogger(__name__)

STAGING, PRODUCTION = "staging", "production"
TARGETS = (STAGING, PRODUCTION)
REPLACED_TAG = "mlops.replaced_version"
LAST_CHANGE_TAG = "mlops.last_change"  # one compact line; the full record is in the audit table
CREATOR_TAG = "mlops.created_by"
FAMILY_TAG = "mlops.family"
TASK_TAG = "mlops.task"
AUDIT_FILE = "mlops.db"
_LEGACY_STAGE = {STAGING: "Staging", PRODUCTION: "Production"}


@dataclass(frozen=True)
class Promotion:
    """What a promotion or rollback did (or, with ``outcome="refused"``, would have done)."""

    model: str
    action: str
    target: str
    from_version: str | None
    to_version: str
    who: str
    reason: str | None
    forced: bool
    gates: tuple[v.GateResult, ...]
    audit_id: int


@dataclass(frozen=True)
class VersionStatus:
    version: str
    family: str
    task: str
    aliases: tuple[str, ...]
    stage: str
    metrics: dict[str, float]
    data_hash: str | None
    created: datetime


def current_user() -> str:
    """The MLflow user if one is configured, else the OS user."""
    return os.environ.get("MLFLOW_TRACKING_USERNAME") or getpass.getuser()


def register(model_uri: str, name: str) -> ModelVersion:
    """Register ``model_uri`` as a new version of ``name`` and record its artifact checksum."""
    client = mlflow.MlflowClient()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        version = mlflow.register_model(model_uri, name)
    with tempfile.TemporaryDirectory() as tmp:
        path = mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{name}/{version.version}", dst_path=tmp
        )
        checksum = v.model_checksum(Path(path))
    run = client.get_run(version.run_id) if version.run_id else None
    run_tags = run.data.tags if run else {}
    family, task = run_tags.get(FAMILY_TAG, ""), run_tags.get(TASK_TAG, "")
    who = current_user()
    tags = {
        v.CHECKSUM_TAG: checksum,
        CREATOR_TAG: who,
        FAMILY_TAG: family,
        TASK_TAG: task,
        "mlops.data_hash": run_tags.get("mlops.data_hash", ""),
    }
    for key, value in tags.items():
        if value:
            client.set_model_version_tag(name, version.version, key, value)
    metrics = run.data.metrics if run else {}
    shown = ", ".join(
        f"{k} {metrics[k]:.4f}"
        for k in sorted(metrics)
        if k.startswith(("validation_", "test_"))
        and k.split("_", 1)[1] in ("accuracy", "f1", "roc_auc", "rmse", "mae", "r2")
    )
    description = (
        f"{family or 'model'} ({task or 'task unknown'}) registered by {who}"
        f" from run {version.run_id}; data {run_tags.get('mlops.data_source', '?')} "
        f"(hash {run_tags.get('mlops.data_hash', '?')[:12]}); {shown or 'no metrics logged'}."
    )
    client.update_model_version(name, version.version, description=description)
    model = client.get_registered_model(name)
    if not model.description:
        client.update_registered_model(
            name,
            description=(
                f"{family or 'model'} for {task or 'an unknown task'}, trained and registered by "
                "mlops. Aliases: "
                "'staging' and 'production' are moved only by `mlops promote` / `mlops rollback` "
                "(gated, audited)."
            ),
        )
    logger.info("registered %s version %s (checksum %s)", name, version.version, checksum[:12])
    return client.get_model_version(name, version.version)


def promote(
    config: Config,
    name: str,
    version: str,
    to: str,
    *,
    reason: str | None = None,
    force: bool = False,
    who: str | None = None,
) -> Promotion:
    """Move alias ``to`` (staging or production) to ``version`` if every gate passes.

    Raises:
        GateFailed: a gate refused; aliases are unchanged and the refusal is audited.
    """
    if to not in TARGETS:
        raise ConfigError(f"--to: unknown stage '{to}'; use one of {', '.join(TARGETS)}")
    if force and not reason:
        raise ConfigError("--force needs --reason: a forced promotion must say why")
    client = mlflow.MlflowClient()
    _get_version(client, name, version)
    who = who or current_user()
    audit = AuditLog(project_store_url(config.registry.audit_url, AUDIT_FILE))
    with audit.lock(name, who) as conn, tempfile.TemporaryDirectory() as tmp:
        if _alias_version(client, name, to) == str(version):
            raise RegistryError(f"{name} version {version} is already {to}; nothing to do")
        current, gates = _promotion_gates(
            client, config, name, str(version), to, force, reason, Path(tmp)
        )
        done = _finish(
            client,
            audit,
            conn,
            action="promote",
            name=name,
            target=to,
            current=current,
            version=str(version),
            who=who,
            reason=reason,
            forced=force,
            gates=gates,
        )
    return _raise_if_refused(done)


def evaluate(config: Config, name: str, version: str, to: str = PRODUCTION) -> list[v.GateResult]:
    """The gates a promotion of ``version`` to ``to`` would face now; changes nothing."""
    if to not in TARGETS:
        raise ConfigError(f"--to: unknown stage '{to}'; use one of {', '.join(TARGETS)}")
    client = mlflow.MlflowClient()
    with tempfile.TemporaryDirectory() as tmp:
        current, gates = _promotion_gates(
            client, config, name, str(version), to, False, None, Path(tmp)
        )
    if current == str(version):
        raise RegistryError(f"{name} version {version} is already {to}")
    return gates


def _promotion_gates(
    client,
    config: Config,
    name: str,
    version: str,
    to: str,
    force: bool,
    reason: str | None,
    tmp: Path,
) -> tuple[str | None, list[v.GateResult]]:
    current = _alias_version(client, name, to)
    if current == version:
        return current, []
    challenger = v.Candidate(client, _get_version(client, name, version), tmp)
    if to == STAGING:
        thresholds = getattr(config.registry.staging, challenger.task)
        return current, [
            *v.threshold_gates(challenger, thresholds),
            v.signature_gate(challenger),
            v.checksum_gate(challenger),
        ]
    staged = _alias_version(client, name, STAGING) == version
    measured = (
        "in staging"
        if staged
        else (f"not in staging, forced: {reason}" if force else "not in staging")
    )
    gates = [
        v.GateResult(
            "in staging", staged or force, measured, "the staging alias (or --force with a reason)"
        )
    ]
    champion = v.Candidate(client, _get_version(client, name, current), tmp) if current else None
    gates += [
        v.checksum_gate(challenger),
        v.schema_gate(challenger, champion),
        v.smoke_gate(challenger),
        v.champion_gate(challenger, champion, config),
    ]
    return current, gates


def rollback(
    config: Config,
    name: str,
    *,
    to_version: str | None = None,
    reason: str | None = None,
    who: str | None = None,
) -> Promotion:
    """Move ``production`` back to the version it replaced (or to ``to_version``)."""
    client = mlflow.MlflowClient()
    who = who or current_user()
    audit = AuditLog(project_store_url(config.registry.audit_url, AUDIT_FILE))
    with audit.lock(name, who) as conn, tempfile.TemporaryDirectory() as tmp:
        current = _alias_version(client, name, PRODUCTION)
        if current is None:
            raise RegistryError(f"{name} has no production version to roll back")
        current_mv = _get_version(client, name, current)
        target = str(to_version) if to_version else current_mv.tags.get(REPLACED_TAG)
        if not target:
            raise RegistryError(
                f"{name} version {current} replaced no earlier version; pass --to VERSION"
            )
        if target == current:
            raise RegistryError(
                f"{name} version {target} is already production; nothing to roll back"
            )
        candidate = v.Candidate(client, _get_version(client, name, target), Path(tmp))
        gates = [
            v.schema_gate(candidate, v.Candidate(client, current_mv, Path(tmp))),
            v.checksum_gate(candidate),
        ]
        done = _finish(
            client,
            audit,
            conn,
            action="rollback",
            name=name,
            target=PRODUCTION,
            current=current,
            version=target,
            who=who,
            reason=reason,
            forced=False,
            gates=gates,
        )
    return _raise_if_refused(done)


def status(name: str) -> list[VersionStatus]:
    """Every version of ``name`` with its aliases, stage, key metrics, data hash and creation
    time."""
    client = mlflow.MlflowClient()
    try:
        model = client.get_registered_model(name)
    except MlflowException as exc:
        raise RegistryError(
            f"registered model '{name}' not found ({exc.error_code}); check the name"
        ) from None
    aliases: dict[str, list[str]] = {}
    for alias, ver in (model.aliases or {}).items():
        aliases.setdefault(str(ver), []).append(alias)
    out = []
    for mv in sorted(
        client.search_model_versions(f"name = '{name}'"), key=lambda m: int(m.version)
    ):
        metrics = {}
        if mv.run_id:
            try:
                run_metrics = client.get_run(mv.run_id).data.metrics
                metrics = {
                    k: run_metrics[k]
                    for k in sorted(run_metrics)
                    if k.startswith(("validation_", "test_"))
                }
            except MlflowException:
                pass
        out.append(
            VersionStatus(
                version=str(mv.version),
                family=mv.tags.get(FAMILY_TAG, "-"),
                task=mv.tags.get(TASK_TAG, "-"),
                aliases=tuple(sorted(aliases.get(str(mv.version), []))),
                stage=mv.current_stage or "None",
                metrics=metrics,
                data_hash=mv.tags.get("mlops.data_hash"),
                created=datetime.fromtimestamp(mv.creation_timestamp / 1000, tz=timezone.utc),
            )
        )
    return out


def audit_trail(config: Config, name: str) -> list[AuditRecord]:
    """The audit rows of ``name``, oldest first."""
    return AuditLog(project_store_url(config.registry.audit_url, AUDIT_FILE)).records(name)


def _finish(
    client,
    audit: AuditLog,
    conn,
    *,
    action: str,
    name: str,
    target: str,
    current: str | None,
    version: str,
    who: str,
    reason: str | None,
    forced: bool,
    gates: list[v.GateResult],
) -> Promotion:
    failed = [g for g in gates if not g.passed]
    outcome = "refused" if failed else "done"
    if not failed:
        _move(client, name, target, version, current, rollback=action == "rollback")
    record = audit.record(
        who=who,
        action=action,
        outcome=outcome,
        model=name,
        target=target,
        from_version=current,
        to_version=version,
        reason=reason,
        forced=forced,
        gates=[g.as_dict() for g in gates],
        conn=conn,
    )
    client.set_model_version_tag(
        name,
        version,
        LAST_CHANGE_TAG,
        f"{action} to {target} {outcome} by {who} at {record.at:%Y-%m-%d %H:%M:%S} UTC "
        f"(audit #{record.id})",
    )
    promotion = Promotion(
        model=name,
        action=action,
        target=target,
        from_version=current,
        to_version=version,
        who=who,
        reason=reason,
        forced=forced,
        gates=tuple(gates),
        audit_id=record.id,
    )
    return promotion


def _raise_if_refused(promotion: Promotion) -> Promotion:
    """Raised only after the lock's transaction committed, so the refusal's audit row stays."""
    failed = [g for g in promotion.gates if not g.passed]
    if failed:
        raise GateFailed(
            f"{promotion.action} of {promotion.model} version {promotion.to_version} to "
            f"{promotion.target} "
            f"refused by {len(failed)} gate(s): " + "; ".join(g.line() for g in failed),
            list(promotion.gates),
        )
    return promotion


def _move(
    client, name: str, alias: str, version: str, previous: str | None, *, rollback: bool
) -> None:
    """Point ``alias`` at ``version``, mirror legacy stages, mark what was replaced.

    Any failure after the alias moved puts the alias back, so a failed move changes nothing.
    """
    client.set_registered_model_alias(name, alias, version)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # MLflow's stage deprecation notice
            client.transition_model_version_stage(name, version, _LEGACY_STAGE[alias])
            if alias == PRODUCTION:
                if previous:
                    client.transition_model_version_stage(name, previous, "Archived")
                    if rollback:
                        client.set_model_version_tag(name, previous, "mlops.rolled_back", "true")
                    else:
                        client.set_model_version_tag(name, version, REPLACED_TAG, previous)
                if _alias_version(client, name, STAGING) == version:
                    client.delete_registered_model_alias(name, STAGING)
            elif previous and _alias_version(client, name, PRODUCTION) != previous:
                client.transition_model_version_stage(name, previous, "None")
    except Exception:
        if previous:
            client.set_registered_model_alias(name, alias, previous)
        else:
            client.delete_registered_model_alias(name, alias)
        raise


def _alias_version(client, name: str, alias: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def _get_version(client, name: str, version: str | int | None) -> ModelVersion:
    try:
        return client.get_model_version(name, str(version))
    except MlflowException:
        versions = [str(m.version) for m in client.search_model_versions(f"name = '{name}'")]
        if not versions:
            raise RegistryError(
                f"registered model '{name}' not found; register one with `mlops train --register`"
            ) from None
        raise RegistryError(
            f"{name} has no version {version}; existing versions: "
            f"{', '.join(sorted(versions, key=int))}"
        ) from None
