"""Where a study lives: Optuna storage opened from a URL, stale trials cleaned up, a study-wide
lock.

In memory (no URL), SQLite for one process, PostgreSQL for many workers. A worker that stops
sending heartbeats has its trial failed and retried, and its MLflow runs ended as FAILED.
"""

from __future__ import annotations

import inspect
import logging
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import mlflow
import optuna
import sqlalchemy as sa
import sqlalchemy.exc as sa_exc
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from mlops.config import Config
from mlops.db import expand_env, mask_url
from mlops.errors import ConfigError
from mlops.tracking import end_runs

logger = logging.getLogger(__name__)


def open_storage(config: Config) -> optuna.storages.RDBStorage | None:
    """The study storage named by ``tuning.storage``; fails within seconds with the URL masked."""
    url = config.tuning.storage
    if not url:
        return None
    masked = mask_url(url)
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("postgres"):
        kwargs["connect_args"] = {"connect_timeout": 10}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = (
            optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2)
            if hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback")
            else optuna.storages.RetryFailedTrialCallback(max_retry=2)
        )

    def on_stale(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        end_orphan_runs(study.study_name, trial)
        retry(study, trial)

    callback_kw = (
        "heartbeat_stale_trial_callback"
        if "heartbeat_stale_trial_callback"
        in inspect.signature(optuna.storages.RDBStorage).parameters
        else "failed_trial_callback"
    )

    callback: dict[str, Any] = {callback_kw: on_stale}

    def connect() -> optuna.storages.RDBStorage:
        return optuna.storages.RDBStorage(
            expand_env(url),  # a ${VAR} in it is read now, at connecting, never logged
            engine_kwargs=kwargs,
            heartbeat_interval=config.tuning.heartbeat_interval,
            grace_period=config.tuning.grace_period,
            **callback,
        )

    try:
        try:
            return connect()
        except (sa_exc.IntegrityError, sa_exc.ProgrammingError):
            # workers started together on a new database race to create Optuna's tables;
            # the loser finds them made a moment later
            time.sleep(1.0)
            return connect()
    except Exception as exc:  # noqa: BLE001 - any driver or connection error ends here
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise ConfigError(
            f"tuning.storage: cannot open study storage {masked} ({first[:200]}); "
            "check the URL and that the database is reachable"
        ) from None


def end_orphan_runs(study_name: str, trial: optuna.trial.FrozenTrial) -> None:
    """A stale trial's worker is gone: end its trial run and its parent run as FAILED.

    The runs are found by the trial's user attributes and by their study and trial-number tags
    (the run of a worker killed early may exist before its trial got the attribute).
    """
    client = mlflow.MlflowClient()
    run_ids: set[str] = {
        run_id
        for run_id in (
            trial.user_attrs.get("mlflow_run_id"),
            trial.user_attrs.get("mlflow_parent_run_id"),
        )
        if run_id is not None
    }
    # MLflow's filter parser has no escapes: quote the name with a character it lacks (a name
    # with both quotes is unquotable; its runs are then found by the trial's attributes only)
    name = next((f"{q}{study_name}{q}" for q in "\"'" if q not in study_name), "''")
    try:
        found = mlflow.search_runs(
            search_all_experiments=True,
            output_format="list",
            filter_string=(
                f"tags.`mlops.study_name` = {name} and tags.`mlops.trial_number` = "
                f"'{trial.number}' "
                "and attributes.status = 'RUNNING'"
            ),
        )
    except Exception as exc:  # noqa: BLE001 - cleaning up must not stop the study
        logger.warning("could not look for the runs of stale trial %d: %s", trial.number, exc)
        found = []
    for run in found:
        run_ids.add(run.info.run_id)
        if run.data.tags.get(MLFLOW_PARENT_RUN_ID):
            run_ids.add(run.data.tags[MLFLOW_PARENT_RUN_ID])
    end_runs(client, sorted(run_ids), "FAILED")


@contextmanager
def advisory_lock(storage: Any, key: str) -> Iterator[None]:
    engine = getattr(storage, "engine", None)
    if engine is None or engine.dialect.name != "postgresql":
        yield
        return
    with engine.connect() as conn:
        conn.execute(sa.text("select pg_advisory_lock(hashtext(:k))"), {"k": key})
        try:
            yield
        finally:
            conn.execute(sa.text("select pg_advisory_unlock(hashtext(:k))"), {"k": key})
            conn.commit()
