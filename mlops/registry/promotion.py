"""The registry layer: stages as aliases, promotions behind gates, audit, rollback.

Aliases are the truth: ``staging`` and ``production`` on the registered model, served as
``models:/NAME@production``. Legacy stages are mirrored while MLflow still has them, so
``models:/NAME/Production`` never disagrees with ``@production``.

Every change is audited first, then made (:mod:`mlops.registry.audit`): under the model's
promotion lock, the row is written as a ``pending`` intent and committed, the alias is moved,
and the row is settled ``done`` (or ``failed``, the aliases put back). A row that cannot be
written stops the change before anything moved; a process that dies between the steps leaves a
pending row that the next command settles against the registry (:func:`reconcile`). Two
promoters racing are serialised by the lock: exactly one production version, and each audit row
names the version it really replaced.

Changes made outside mlops (``MlflowClient().set_registered_model_alias``, the MLflow UI, a
stage transition) are noticed by comparing the trail's last recorded ``production`` and
``staging`` versions with the registry: each is recorded once as an ``external`` row (and
logged as a warning) and the stages are mirrored again, so the next rollback goes where the
trail says.

Model names are never pasted into MLflow filter strings; versions are read through
``get_registered_model``, ``get_model_version`` and ``get_model_version_by_alias`` only.
"""

from __future__ import annotations

import getpass
import logging
import os
import tempfile
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import mlflow
from mlflow.entities.model_registry import ModelVersion, RegisteredModel
from mlflow.exceptions import MlflowException

from mlops.artifacts import download_model
from mlops.config import Config
from mlops.errors import ConfigError, GateFailed, RegistryError, first_line
from mlops.registry import gates as v
from mlops.registry.audit import (
    DONE,
    EXTERNAL,
    FAILED,
    LAST_CHANGE_TAG,
    MIRROR,
    PENDING,
    REFUSED,
    TRAFFIC_ACTIONS,
    AuditLog,
    AuditRecord,
    last_change,
)
from mlops.registry.remote import ServerAudit, server_audited
from mlops.tracking import project_store_url

logger = logging.getLogger(__name__)

STAGING, PRODUCTION = "staging", "production"
TARGETS = (STAGING, PRODUCTION)
REPLACED_TAG = "mlops.replaced_version"
ROLLED_BACK_TAG = "mlops.rolled_back"
CREATOR_TAG = "mlops.created_by"
FAMILY_TAG = "mlops.family"
TASK_TAG = "mlops.task"
AUDIT_FILE = "mlops.db"
EXTERNAL_WHO = "unknown (outside mlops)"
MAX_NAME = 256  # MLflow's column for registered model names, and the audit trail's
_MAX_VERSION = 2**31 - 1  # MLflow stores versions as integers
_LEGACY_STAGE = {STAGING: "Staging", PRODUCTION: "Production"}
_LEFT_STAGE = {"Production": "Archived", "Staging": "None"}  # a stage its alias left
_MIRROR_ROUNDS = 20


@dataclass(frozen=True)
class Promotion:
    """What a promotion or rollback did (or, with refused gates, would have done)."""

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
    # rows written by the reconciliation this command ran first (changes made outside mlops)
    reconciled: tuple[AuditRecord, ...] = ()


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


def canonical_version(version: object, option: str = "--version") -> str:
    """``version`` in MLflow's canonical form (``" 01"`` -> ``"1"``); anything else is refused.

    Raises:
        ConfigError: not a positive whole number MLflow could have given a version.
    """
    text = str(version).strip()
    if text.isascii() and text.isdigit() and 0 < int(text) <= _MAX_VERSION:
        return str(int(text))
    raise ConfigError(
        f"{option}: {str(version)!r} is not a model version; pass the version number "
        "as `mlops status NAME` lists it (1, 2, 3, ...)"
    )


def check_name(name: str) -> str:
    """``name`` if MLflow could have registered a model by that name; else a one-line error."""
    if not name or not name.strip():
        raise ConfigError("model name is empty: pass NAME or set registry.model_name")
    if "/" in name or ":" in name:
        raise ConfigError(
            f"model name {name!r}: MLflow model names cannot contain '/' or ':'; pass the "
            "registered model's name as the MLflow UI shows it"
        )
    if len(name) > MAX_NAME:
        raise ConfigError(
            f"model name {name[:40]!r}... is {len(name)} characters; MLflow model names have "
            f"at most {MAX_NAME}: pass the registered model's name as the MLflow UI shows it"
        )
    return name


def register(model_uri: str, name: str) -> ModelVersion:
    """Register ``model_uri`` as a new version of ``name`` and record its artifact checksum."""
    client = mlflow.MlflowClient()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        version = mlflow.register_model(model_uri, name)
    with tempfile.TemporaryDirectory() as tmp:
        checksum = v.model_checksum(download_model(name, str(version.version), tmp))
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


# ---- promote, evaluate, rollback ----


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
        RegistryError: the change could not be audited or made; aliases are unchanged.
    """
    _check_target(to)
    if force and not reason:
        raise ConfigError("--force needs --reason: a forced promotion must say why")
    name, version = check_name(name), canonical_version(version)
    client = mlflow.MlflowClient()
    registered = _get_version(client, name, version)
    who = who or current_user()
    audit = _audit_log(config)
    with audit.lock(name, who), tempfile.TemporaryDirectory() as tmp:
        reconciled = _reconcile_locked(client, audit, name, who)
        aliases = _aliases(client, name)
        current = aliases.get(to)
        if current == version:
            raise RegistryError(f"{name} version {version} is already {to}; nothing to do")
        if to == STAGING and aliases.get(PRODUCTION) == version:
            raise RegistryError(
                f"{name} version {version} is production; staging is for the versions on "
                "their way there (promote a newer version, or roll back with `mlops rollback`)"
            )
        gates = _promotion_gates(client, config, registered, aliases, to, force, reason, Path(tmp))
        done = _apply(
            client,
            audit,
            action="promote",
            name=name,
            target=to,
            current=current,
            version=version,
            who=who,
            reason=reason,
            forced=force,
            gates=gates,
            reconciled=reconciled,
        )
    return _raise_if_refused(done)


def evaluate(config: Config, name: str, version: str, to: str = PRODUCTION) -> list[v.GateResult]:
    """The gates a promotion of ``version`` to ``to`` would face now; changes nothing."""
    _check_target(to)
    name, version = check_name(name), canonical_version(version)
    client = mlflow.MlflowClient()
    registered = _get_version(client, name, version)
    aliases = _aliases(client, name)
    if aliases.get(to) == version:
        raise RegistryError(f"{name} version {version} is already {to}")
    with tempfile.TemporaryDirectory() as tmp:
        return _promotion_gates(client, config, registered, aliases, to, False, None, Path(tmp))


def _promotion_gates(
    client: mlflow.MlflowClient,
    config: Config,
    registered: ModelVersion,
    aliases: dict[str, str],
    to: str,
    force: bool,
    reason: str | None,
    tmp: Path,
) -> list[v.GateResult]:
    """The gates of moving ``to`` to ``registered``, with the model's ``aliases`` as read
    (under the lock, for a promotion)."""
    name, version, current = registered.name, str(registered.version), aliases.get(to)
    challenger = v.Candidate(client, registered, tmp)
    if to == STAGING:
        v.prefetch(challenger)
        return v.staging_gates(challenger, getattr(config.registry.staging, challenger.task))
    staged = aliases.get(STAGING) == version
    measured = (
        "in staging"
        if staged
        else (f"not in staging, forced: {reason}" if force else "not in staging")
    )
    in_staging = v.GateResult(
        "in staging", staged or force, measured, "the staging alias (or --force with a reason)"
    )
    champion = v.Candidate(client, _get_version(client, name, current), tmp) if current else None
    v.prefetch(challenger, champion)
    checksum, *rest = v.production_gates(challenger, champion, config, force=force)
    return [checksum, in_staging, *rest]


def rollback(
    config: Config,
    name: str,
    *,
    to_version: str | None = None,
    reason: str | None = None,
    force: bool = False,
    who: str | None = None,
) -> Promotion:
    """Move ``production`` back to the version it replaced (or to ``to_version``).

    The version production replaced comes from the (reconciled) audit trail. Going back to it
    passes the checksum and schema gates; any other ``to_version`` faces the staging gates
    (checksum, thresholds, signature) and a smoke prediction as well, unless ``force`` (with a
    ``reason``).
    """
    if force and not reason:
        raise ConfigError("--force needs --reason: a forced rollback must say why")
    name = check_name(name)
    wanted = canonical_version(to_version, "--to") if to_version not in (None, "") else None
    client = mlflow.MlflowClient()
    if wanted:
        _get_version(client, name, wanted)
    who = who or current_user()
    audit = _audit_log(config)
    with audit.lock(name, who), tempfile.TemporaryDirectory() as tmp:
        reconciled = _reconcile_locked(client, audit, name, who)
        current = _aliases(client, name).get(PRODUCTION)
        if current is None:
            raise RegistryError(f"{name} has no production version to roll back")
        current_mv = _get_version(client, name, current)
        replaced = _replaced_version(audit.records(name), current_mv)
        target = wanted or replaced
        if not target:
            raise RegistryError(
                f"{name} version {current} replaced no earlier version; pass --to VERSION"
            )
        if target == current:
            raise RegistryError(
                f"{name} version {target} is already production; nothing to roll back"
            )
        candidate = v.Candidate(client, _get_version(client, name, target), Path(tmp))
        live = v.Candidate(client, current_mv, Path(tmp))
        if target == replaced or force:
            gates = v.rollback_gates(candidate, live)
        else:
            thresholds = getattr(config.registry.staging, candidate.task)
            gates = [
                *v.staging_gates(candidate, thresholds, smoke=True),
                v.schema_gate(candidate, live, untrusted_champion_ok=True),
            ]
        done = _apply(
            client,
            audit,
            action="rollback",
            name=name,
            target=PRODUCTION,
            current=current,
            version=target,
            who=who,
            reason=reason,
            forced=force,
            gates=gates,
            reconciled=reconciled,
        )
    return _raise_if_refused(done)


def _replaced_version(trail: list[AuditRecord], current: ModelVersion) -> str | None:
    """The version ``current`` replaced in production: per the trail's latest promotion (or
    change outside mlops) that made it production; the version's tag if the trail never saw
    one (promoted before this trail existed)."""
    version = str(current.version)
    for row in reversed(trail):
        if (
            row.target == PRODUCTION
            and row.outcome == DONE
            and row.action in ("promote", EXTERNAL)
            and row.to_version == version
            # first sighting of a production the trail never knew: no record of what it replaced
            and not (row.action == EXTERNAL and row.from_version is None)
        ):
            return row.from_version
    return current.tags.get(REPLACED_TAG)


# ---- status, audit ----


def status(name: str) -> list[VersionStatus]:
    """Every version of ``name`` with its aliases, stage, key metrics, data hash and creation
    time."""
    client = mlflow.MlflowClient()
    model = _registered_model(client, check_name(name))
    aliases: dict[str, list[str]] = {}
    for alias, ver in (model.aliases or {}).items():
        aliases.setdefault(str(ver), []).append(alias)
    out = []
    for mv in _versions(client, model):
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
    return _audit_log(config).records(check_name(name))


TrafficAction = Literal["split_start", "split_stop", "shadow_start", "shadow_stop"]


def record_traffic(
    config: Config,
    name: str,
    action: TrafficAction,
    detail: str,
    who: str | None = None,
    reason: str | None = None,
) -> AuditRecord:
    """Record that a production server of ``name`` started or stopped a split or a shadow.

    ``detail`` says what is served (e.g. ``production=90,challenger=10`` or ``shadow
    challenger (version 4)``). The row (outcome ``done``, target ``production``) moves no alias
    and counts for no rollback; ``mlops audit`` lists it with the promotions.

    Raises:
        ConfigError: an unknown action or an empty detail.
        RegistryError: the row could not be written.
    """
    if action not in TRAFFIC_ACTIONS:
        raise ConfigError(
            f"traffic action {action!r} is unknown; use one of {', '.join(TRAFFIC_ACTIONS)}"
        )
    if not str(detail).strip():
        raise ConfigError(
            f"{action}: detail is empty; say what is served, e.g. 'production=90,challenger=10'"
        )
    return _audit_log(config).record(
        who=who or current_user(),
        action=action,
        outcome=DONE,
        model=check_name(name),
        target=PRODUCTION,
        from_version=None,
        to_version=None,
        reason=reason,
        forced=False,
        gates=[],
        detail=str(detail).strip(),
    )


# ---- reconciliation: intents left pending, changes made outside mlops ----


def reconcile(
    name: str, config: Config, *, who: str | None = None, timeout: float = 0.0
) -> list[AuditRecord]:
    """Bring the audit trail and the registry of ``name`` back in line; the rows it wrote.

    - A ``pending`` row (a process died between writing its intent and settling it) is
      settled against the registry: ``done`` if the alias did move, ``failed`` if not.
    - An alias whose version differs from the trail's last recorded one was moved outside
      mlops: it is recorded once as an ``external`` row (and logged as a warning), so the next
      rollback goes to the version production really replaced.
    - Legacy stages that disagree with the aliases are mirrored again (a ``mirror`` row), so
      ``models:/NAME/Production`` and ``models:/NAME@production`` name the same version.

    Runs under the model's promotion lock; if a promotion holds it for longer than
    ``timeout`` seconds, nothing is done now (that promotion reconciles first) and ``[]`` is
    returned. Monitoring checks call this before they read production.
    """
    name = check_name(name)
    client = mlflow.MlflowClient()
    _registered_model(client, name)
    who = who or current_user()
    audit = _audit_log(config)
    if isinstance(audit, ServerAudit):
        return []  # the team server records every change itself: nothing can be missed
    with audit.lock(name, who, timeout=timeout) as held:
        if not held:
            logger.info(
                "%s: a promotion holds the registry lock (%s); not reconciled now",
                name,
                audit.holders(),
            )
            return []
        return _reconcile_locked(client, audit, name, who)


def _reconcile_locked(
    client: mlflow.MlflowClient, audit: AuditLog | ServerAudit, name: str, who: str
) -> list[AuditRecord]:
    """:func:`reconcile` for a caller that holds the lock."""
    if isinstance(audit, ServerAudit):
        return []
    out = [
        _settle_interrupted(client, audit, row, who) for row in audit.records(name, outcome=PENDING)
    ]
    expected = _trail_state(audit.records(name))
    actual = _aliases(client, name)
    for target in (PRODUCTION, STAGING):
        before, now = expected[target], actual.get(target)
        if before == now:
            continue
        record = audit.record(
            who=EXTERNAL_WHO,
            action=EXTERNAL,
            outcome=DONE,
            model=name,
            target=target,
            from_version=before,
            to_version=now,
            reason=None,
            forced=False,
            gates=[],
            detail=(
                f"the {target} alias was "
                + (f"moved {before or 'none'} -> {now}" if now else f"removed from {before}")
                + f" outside mlops (MLflow client, REST API or UI); noticed by {who}"
            ),
        )
        logger.warning(
            "%s: %s moved outside mlops: %s -> %s (MLflow client, REST API or UI); "
            "recorded as audit #%d",
            name,
            target,
            before or "none",
            now or "none",
            record.id,
        )
        if now:
            if target == PRODUCTION and before:
                _try(client.set_model_version_tag, name, now, REPLACED_TAG, before)
            _tag_last_change(client, record)
        out.append(record)
    out += _mirror_stages(client, audit, name, actual, who)
    return out


def _settle_interrupted(
    client: mlflow.MlflowClient, audit: AuditLog, row: AuditRecord, who: str
) -> AuditRecord:
    """Settle a pending row whose process died between its intent and its settlement."""
    if row.action == MIRROR:
        return audit.settle(
            row.id, FAILED, f"interrupted; the stages were compared with the aliases again by {who}"
        )
    now = _aliases(client, row.model).get(row.target)
    if now is not None and now == row.to_version:
        try:  # finish what the interrupted move may not have done; all of it is idempotent
            _after_move(
                client,
                row.model,
                row.target,
                now,
                row.from_version,
                rollback=row.action == "rollback",
            )
        except Exception as exc:  # noqa: BLE001 - the stage mirror below tries again
            logger.warning("could not finish the interrupted move of %s: %s", row.model, exc)
        settled = audit.settle(
            row.id,
            DONE,
            f"interrupted after the alias moved ({row.target} found at {now}); settled by {who}",
        )
        _tag_last_change(client, settled)
    else:
        settled = audit.settle(
            row.id,
            FAILED,
            f"interrupted before the alias moved ({row.target} found at {now or 'none'}); "
            f"nothing changed; settled by {who}",
        )
    logger.warning(
        "%s: audit #%d (%s to %s, version %s) was left pending by an interrupted command; "
        "settled as %s",
        row.model,
        row.id,
        row.action,
        row.target,
        row.to_version,
        settled.outcome,
    )
    return settled


def _trail_state(trail: Iterable[AuditRecord]) -> dict[str, str | None]:
    """The production and staging versions the trail's settled changes leave behind.

    Replays what :func:`_move` does: a promotion or rollback to production of the staging
    version also takes the staging alias away.
    """
    state: dict[str, str | None] = {PRODUCTION: None, STAGING: None}
    for row in trail:
        if row.outcome != DONE or row.action not in ("promote", "rollback", EXTERNAL):
            continue
        state[row.target] = row.to_version
        if (
            row.target == PRODUCTION
            and row.action != EXTERNAL
            and row.to_version is not None
            and state[STAGING] == row.to_version
        ):
            state[STAGING] = None
    return state


def _mirror_stages(
    client: mlflow.MlflowClient,
    audit: AuditLog | None,
    name: str,
    aliases: dict[str, str],
    who: str,
) -> list[AuditRecord]:
    """Put the legacy stages back in line with the aliases, each round audited first (without
    ``audit``: by a caller whose own row already covers them, the team server's)."""
    out: list[AuditRecord] = []
    for _ in range(_MIRROR_ROUNDS):
        plan = _stage_plan(client, name, aliases)
        if not plan:
            return out
        if audit is None:
            for ver, _old, new in plan:
                _transition(client, name, ver, new)
            continue
        detail = "legacy stages put back in line with the aliases: " + "; ".join(
            f"v{ver} {old} -> {new}" for ver, old, new in plan
        )
        target = PRODUCTION if any("Production" in (old, new) for _, old, new in plan) else STAGING
        intent = audit.record(
            who=who,
            action=MIRROR,
            outcome=PENDING,
            model=name,
            target=target,
            from_version=None,
            to_version=aliases.get(target),
            reason=None,
            forced=False,
            gates=[],
            detail=detail,
        )
        try:
            for ver, _old, new in plan:
                _transition(client, name, ver, new)
        except Exception as exc:  # noqa: BLE001 - audited, and tried again next time
            out.append(audit.settle(intent.id, FAILED, f"{detail}; failed: {exc}"))
            logger.warning("%s: could not mirror the stages: %s", name, exc)
            return out
        out.append(audit.settle(intent.id, DONE))
        logger.warning("%s: %s (audit #%d)", name, detail, intent.id)
    return out


def _stage_plan(
    client: mlflow.MlflowClient, name: str, aliases: dict[str, str]
) -> list[tuple[str, str, str]]:
    """(version, stage, new stage) for each version whose stage disagrees with the aliases.

    The versions checked are those the aliases name and the latest of each live stage (the
    ones ``models:/NAME/Production`` and ``/Staging`` resolve to); a round that fixes one may
    uncover the next.
    """
    wanted: dict[str, str] = {}
    if aliases.get(PRODUCTION):
        wanted[aliases[PRODUCTION]] = "Production"
    if aliases.get(STAGING) and aliases[STAGING] not in wanted:
        wanted[aliases[STAGING]] = "Staging"
    plan = []
    for ver, stage in wanted.items():
        found = _get_version(client, name, ver).current_stage or "None"
        if found != stage:
            plan.append((ver, found, stage))
    for mv in _registered_model(client, name).latest_versions or []:
        ver, stage = str(mv.version), mv.current_stage or "None"
        if stage in _LEFT_STAGE and ver not in wanted:
            plan.append((ver, stage, _LEFT_STAGE[stage]))
    return plan


# ---- making a change: audited first ----


def _apply(
    client: mlflow.MlflowClient,
    audit: AuditLog | ServerAudit,
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
    reconciled: Iterable[AuditRecord],
) -> Promotion:
    """Audit, then change: a refusal is a row; a change is a pending row, the move, then the
    row settled. Nothing moves unless its row is written first."""
    refused = any(not g.passed for g in gates)
    row = dict(
        who=who,
        action=action,
        model=name,
        target=target,
        from_version=current,
        to_version=version,
        reason=reason,
        forced=forced,
        gates=[g.as_dict() for g in gates],
    )
    if refused:
        record = audit.record(outcome=REFUSED, **row)  # type: ignore[arg-type]
    else:
        try:
            intent = audit.record(outcome=PENDING, **row)  # type: ignore[arg-type]
        except RegistryError as exc:
            raise RegistryError(
                f"{exc}; {target} is unchanged: nothing moves before its audit row is written"
            ) from None
        try:
            _move(
                client,
                name,
                target,
                version,
                current,
                rollback=action == "rollback",
                server_follows=isinstance(audit, ServerAudit) and audit.mirrors_stages,
            )
        except Exception as exc:
            if isinstance(audit, ServerAudit):  # the server refused or failed it, and audited it
                raise audit.failed(exc) from exc
            raise _failed_move(client, audit, intent, exc, who) from exc
        try:
            record = audit.settle(intent.id, DONE)
        except RegistryError as exc:
            # the alias moved and its intent is on record: the next command settles it
            logger.warning(
                "%s: %s is now version %s, but audit #%d stays pending (%s); the next mlops "
                "command on %s settles it",
                name,
                target,
                version,
                intent.id,
                exc,
                name,
            )
            record = intent
    if not isinstance(audit, ServerAudit):  # a team server tags the version itself
        _tag_last_change(client, record)
    return Promotion(
        model=name,
        action=action,
        target=target,
        from_version=record.from_version if isinstance(audit, ServerAudit) else current,
        to_version=version,
        who=record.who,
        reason=reason,
        forced=forced,
        gates=tuple(gates),
        audit_id=record.id,
        reconciled=tuple(reconciled),
    )


def _failed_move(
    client: mlflow.MlflowClient,
    audit: AuditLog | ServerAudit,
    intent: AuditRecord,
    exc: Exception,
    who: str,
) -> RegistryError:
    """Settle the intent of a move that raised, by what the registry now says."""
    first = first_line(exc)
    name, target = intent.model, intent.target
    try:
        now = _aliases(client, name).get(target)
    except Exception:  # noqa: BLE001 - the registry is unreachable: leave the row pending
        now = "unknown"
    if now == intent.from_version:
        try:
            audit.settle(intent.id, FAILED, f"the alias move failed ({first}); aliases restored")
        except RegistryError as settle_exc:
            logger.warning("%s: %s", name, settle_exc)
        try:  # the stages may be half-mirrored: put them back in line now
            if isinstance(audit, AuditLog):  # (a team server records its own mirroring)
                _mirror_stages(client, audit, name, _aliases(client, name), who)
        except Exception as mirror_exc:  # noqa: BLE001 - the next command tries again
            logger.warning("%s: could not mirror the stages: %s", name, mirror_exc)
        return RegistryError(
            f"{intent.action} of {name} version {intent.to_version} to {target} failed while "
            f"moving the alias ({first}); {target} is unchanged (audit #{intent.id})"
        )
    return RegistryError(
        f"{intent.action} of {name} version {intent.to_version} to {target} failed while "
        f"moving the alias ({first}) and {target} is now {now or 'none'}; audit #{intent.id} "
        f"stays pending until the next mlops command on {name} settles it"
    )


def _raise_if_refused(promotion: Promotion) -> Promotion:
    """Raised after the lock is released; the refusal's audit row is already committed."""
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
    client: mlflow.MlflowClient,
    name: str,
    alias: str,
    version: str,
    previous: str | None,
    *,
    rollback: bool,
    server_follows: bool = False,
) -> None:
    """Point ``alias`` at ``version``, mirror legacy stages, mark what was replaced.

    Any failure after the alias moved puts the alias back, so a failed move changes nothing.
    With ``server_follows`` (a team server that does what follows a move itself, in the same
    step as its audit row, see :func:`mlops.team.app._follow`) only the alias is moved here.
    """
    if previous == version:
        raise RegistryError(f"{name} version {version} is already {alias}")
    client.set_registered_model_alias(name, alias, version)
    if server_follows:
        return
    try:
        _after_move(client, name, alias, version, previous, rollback=rollback)
    except Exception:
        if previous:
            client.set_registered_model_alias(name, alias, previous)
        else:
            client.delete_registered_model_alias(name, alias)
        raise


def _after_move(
    client: mlflow.MlflowClient,
    name: str,
    alias: str,
    version: str,
    previous: str | None,
    *,
    rollback: bool,
) -> list[str]:
    """What follows an alias move (idempotent): stages, tags, the staging alias it used up.

    Production's stage wins: a staging alias on the production version leaves it in
    Production. Returns what was done, one phrase each.
    """
    done: list[str] = []
    if alias == PRODUCTION:
        _transition(client, name, version, "Production")
        done.append(f"v{version} Production")
        if previous and previous != version:
            _transition(client, name, previous, "Archived")
            done.append(f"v{previous} Archived")
            if rollback:
                client.set_model_version_tag(name, previous, ROLLED_BACK_TAG, "true")
                done.append(f"v{previous} tagged {ROLLED_BACK_TAG}")
            else:
                client.set_model_version_tag(name, version, REPLACED_TAG, previous)
                done.append(f"v{version} tagged {REPLACED_TAG}={previous}")
        if _aliases(client, name).get(STAGING) == version:
            client.delete_registered_model_alias(name, STAGING)
            done.append(f"staging alias removed from v{version}")
        return done
    production = _aliases(client, name).get(PRODUCTION)
    if production != version:
        _transition(client, name, version, _LEGACY_STAGE[alias])
        done.append(f"v{version} {_LEGACY_STAGE[alias]}")
    if previous and previous != version and production != previous:
        _transition(client, name, previous, "None")
        done.append(f"v{previous} None")
    return done


def _transition(client: mlflow.MlflowClient, name: str, version: str, stage: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # MLflow's stage deprecation notice
        client.transition_model_version_stage(name, version, stage)


def _tag_last_change(client: mlflow.MlflowClient, record: AuditRecord) -> None:
    """The compact ``mlops.last_change`` tag on the version a row names (best effort)."""
    if record.to_version:
        _try(
            client.set_model_version_tag,
            record.model,
            record.to_version,
            LAST_CHANGE_TAG,
            last_change(record),
        )


def _try(call, *args: str) -> None:  # noqa: ANN001 - an MlflowClient method
    try:
        call(*args)
    except MlflowException as exc:
        logger.warning("%s%s failed: %s", getattr(call, "__name__", "call"), args, exc)


# ---- reading the registry (never through a filter string) ----


def _audit_log(config: Config) -> AuditLog | ServerAudit:
    """The audit trail: the team server's when the tracking URI is one (and no audit store is
    configured), else the project's own store."""
    if server_audited(config.registry.audit_url):
        return ServerAudit(mlflow.get_tracking_uri())
    return AuditLog(project_store_url(config.registry.audit_url, AUDIT_FILE))


def _check_target(to: str) -> None:
    if to not in TARGETS:
        raise ConfigError(f"--to: unknown stage '{to}'; use one of {', '.join(TARGETS)}")


def _registered_model(client: mlflow.MlflowClient, name: str) -> RegisteredModel:
    try:
        return client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise RegistryError(
                f"cannot read registered model {name!r}: {str(exc.message).splitlines()[0]}"
            ) from None
    try:
        known = [m.name for m in client.search_registered_models(max_results=10)]
    except MlflowException:
        known = []
    hint = f" (registered models: {', '.join(known)})" if known else ""
    raise RegistryError(
        f"registered model {name!r} not found{hint}; check the name, or register one with "
        "`mlops train --register`"
    )


def _aliases(client: mlflow.MlflowClient, name: str) -> dict[str, str]:
    """The model's aliases (alias -> version); any failure to read them raises."""
    model = _registered_model(client, name)
    return {alias: str(ver) for alias, ver in (model.aliases or {}).items()}


def _versions(client: mlflow.MlflowClient, model: RegisteredModel) -> list[ModelVersion]:
    """Every version of ``model``, oldest first, read one by one (no filter string)."""
    top = max((int(mv.version) for mv in model.latest_versions or []), default=0)
    out = []
    for number in range(1, top + 1):
        try:
            out.append(client.get_model_version(model.name, str(number)))
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
    return out


def _get_version(client: mlflow.MlflowClient, name: str, version: str | int | None) -> ModelVersion:
    try:
        return client.get_model_version(name, str(version))
    except MlflowException:
        pass
    model = _registered_model(client, name)
    versions = [str(m.version) for m in _versions(client, model)]
    if not versions:
        raise RegistryError(
            f"registered model {name!r} has no versions; register one with `mlops train --register`"
        ) from None
    raise RegistryError(
        f"{name} has no version {version}; existing versions: {', '.join(versions)}"
    ) from None
