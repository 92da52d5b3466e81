"""MLflow run handling shared by every step: experiments, step runs, ending runs, model files.

Each concept lives here once: creating an experiment (tolerating a worker that creates it at
the same moment), starting or resuming the run of a step under a readable name, ending runs
that are still RUNNING, and fetching one file of a registered model version.
"""

from __future__ import annotations

import logging
import os
import subprocess
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from mlops.config import CONFIG_ARTIFACT, Config

logger = logging.getLogger(__name__)

GIT_COMMIT_TAG = "mlops.git_commit"
GIT_DIRTY_TAG = "mlops.git_dirty"  # "true": the package had uncommitted changes at that commit
CODE_HASH_TAG = "mlops.code_hash"  # SHA-256 of the package's Python files as they ran
STEP_TAG = "mlops.step"
CONFIG_SHA_TAG = "mlops.config_sha256"  # the SHA-256 of the run's config.yaml


# MLflow's async logger sends each queued call as its own request unless this is set: then it
# waits this long (whole seconds: MLflow reads an integer) and merges what was queued into one
# log_batch; a flush does not wait for it
ASYNC_BUFFER_ENV = "MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS"
ASYNC_BUFFER_SECONDS = 1
_buffering_lock = threading.Lock()
_buffering_users = 0


@contextmanager
def batched_async_logging(seconds: int = ASYNC_BUFFER_SECONDS) -> Iterator[None]:
    """For the block, MLflow's async logger (``synchronous=False``) merges what was queued in
    ``seconds`` into one request: per-epoch metrics cost a round trip per batch, not per epoch
    (through a tracking server, one ``log_batch`` each otherwise). A value the user set is
    kept."""
    global _buffering_users
    with _buffering_lock:
        ours = _buffering_users > 0 or not os.environ.get(ASYNC_BUFFER_ENV)
        if ours:
            _buffering_users += 1
            os.environ[ASYNC_BUFFER_ENV] = str(int(seconds))
    try:
        yield
    finally:
        if ours:
            with _buffering_lock:
                _buffering_users -= 1
                if _buffering_users == 0:
                    os.environ.pop(ASYNC_BUFFER_ENV, None)


def ensure_experiment(name: str, client: mlflow.MlflowClient | None = None) -> str:
    """The id of experiment ``name``, created if missing (another process may create it
    meanwhile)."""
    client = client or mlflow.MlflowClient()
    for _ in range(3):
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            if experiment.lifecycle_stage == "deleted":
                client.restore_experiment(experiment.experiment_id)
            return experiment.experiment_id
        try:
            return client.create_experiment(name)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            time.sleep(
                0.1
            )  # another worker created it between our lookup and our create: use theirs
    raise MlflowException(f"experiment '{name}' could not be created or found")


@contextmanager
def step_run(config: Config, run_name: str) -> Iterator[Run]:
    """Start (or, under ``mlflow run``, resume) the run of one step, named ``run_name``.

    The experiment comes from the config unless ``mlflow run`` already created the run (it
    passes ``MLFLOW_RUN_ID``); that run gets ``run_name`` too, in place of MLflow's random
    one. Any exception ends the run as FAILED, so no half-finished run stays RUNNING.
    """
    active = mlflow.active_run()
    if active is not None:
        yield active
        return
    resumed = os.environ.get("MLFLOW_RUN_ID")
    experiment_id = None if resumed else ensure_experiment(config.experiment)
    with mlflow.start_run(
        run_id=resumed or None, experiment_id=experiment_id, run_name=run_name
    ) as run:
        if resumed:
            name_project_run(run_name)
        commit = git_commit()
        tags = {STEP_TAG: run_name.split("-")[0], CODE_HASH_TAG: code_hash()}
        if commit:
            tags[GIT_COMMIT_TAG] = commit
            if git_dirty():
                tags[GIT_DIRTY_TAG] = "true"
        mlflow.set_tags(tags)
        yield mlflow.get_run(run.info.run_id)


def log_config(config: Config, *, tuning: bool = False, model_params: bool = True) -> None:
    """Log the params a person compares, and the full resolved config as ``config.yaml``."""
    mlflow.log_params(config.params(tuning=tuning, model_params=model_params))
    mlflow.set_tag("mlops.family", config.model.family)
    log_config_file(config)


def log_config_file(config: Config) -> None:
    """The resolved config as the run's ``config.yaml``, and its SHA-256 as the run's tag
    ``mlops.config_sha256``: the tracking store vouches for the file, which lives in the
    artifact store, before anything parses it again (:func:`read_run_config`)."""
    import hashlib

    text = config.to_yaml()
    mlflow.log_text(text, CONFIG_ARTIFACT)
    mlflow.set_tag(CONFIG_SHA_TAG, hashlib.sha256(text.encode("utf-8")).hexdigest())


def read_run_config(
    run_id: str, tags: dict[str, str] | None = None, artifact_uri: str | None = None
) -> Config:
    """Run ``run_id``'s ``config.yaml``, verified (:func:`verified_config_file`), then parsed."""
    import tempfile

    from mlops.config import read_resolved_config

    with tempfile.TemporaryDirectory() as tmp:
        return read_resolved_config(verified_config_file(run_id, tmp, tags, artifact_uri))


def verified_config_file(
    run_id: str,
    dst: str | os.PathLike[str],
    tags: dict[str, str] | None = None,
    artifact_uri: str | None = None,
) -> Path:
    """Run ``run_id``'s ``config.yaml`` downloaded into ``dst`` and verified against the run's
    ``mlops.config_sha256`` tag before anything parses it (it names data sources, a database
    URL, transformer classes to import).

    ``tags`` and ``artifact_uri`` are the run's, where the caller has read them.
    A run logged before the tag existed is read with a warning; a file that does not match
    the tag is refused (:class:`mlops.artifacts.UntrustedArtifact`). A run without the file
    raises ``MlflowException`` as MLflow's download does.
    """
    import hashlib

    from mlops.artifacts import UntrustedArtifact

    if tags is None:
        tags = mlflow.MlflowClient().get_run(run_id).data.tags
    if artifact_uri:  # the run's artifact root, known to the caller: no run lookup again
        where = {"artifact_uri": f"{artifact_uri.rstrip('/')}/{CONFIG_ARTIFACT}"}
    else:
        where = {"run_id": run_id, "artifact_path": CONFIG_ARTIFACT}
    path = Path(mlflow.artifacts.download_artifacts(dst_path=str(dst), **where))
    recorded = tags.get(CONFIG_SHA_TAG)
    if recorded is None:
        logger.warning(
            "run %s was logged before mlops recorded its config's checksum: its %s is read "
            "unverified",
            run_id,
            CONFIG_ARTIFACT,
        )
    elif hashlib.sha256(path.read_bytes()).hexdigest() != recorded:
        raise UntrustedArtifact(
            f"run {run_id}: its {CONFIG_ARTIFACT} does not match the checksum the run "
            f"recorded ({CONFIG_SHA_TAG} {recorded[:12]}...); the artifact was changed after "
            "the run: refusing to read it"
        )
    return path


def name_project_run(run_name: str) -> None:
    """Under `mlflow run`, give the run MLflow made for this step a readable name.

    MLflow names a project's run at random (``masked-shoat-30``); outside `mlflow run` there is
    no such run and nothing happens.
    """
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if run_id:
        mlflow.MlflowClient().update_run(run_id, name=run_name)


def end_runs(
    client: mlflow.MlflowClient, run_ids: Iterable[str], status: str = "FAILED"
) -> list[str]:
    """End every run of ``run_ids`` that is still RUNNING with ``status``; the ids it ended.

    Clean-up must not fail the caller: a run that cannot be read or ended is logged and skipped.
    """
    ended = []
    for run_id in dict.fromkeys(r for r in run_ids if r):
        try:
            if client.get_run(run_id).info.status == "RUNNING":
                client.set_terminated(run_id, status)
                ended.append(run_id)
        except MlflowException as exc:
            logger.warning("could not end run %s as %s: %s", run_id, status, exc)
    return ended


def download_model_file(name: str, version: str, path: str, dst: str | os.PathLike[str]) -> str:
    """Download one file (``path`` inside the model directory) of a registered model version."""
    uri = mlflow.MlflowClient().get_model_version_download_uri(name, version)
    return mlflow.artifacts.download_artifacts(
        artifact_uri=f"{uri.rstrip('/')}/{path}", dst_path=str(dst)
    )


def git_commit() -> str | None:
    """The commit of the working tree the code runs from, when it is a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def project_store_url(configured: str | None, filename: str) -> str:
    """The URL of one of the project's own stores (audit trail, prediction log).

    An explicit URL is used as it is. Otherwise the store lives with the tracking store, so
    every command that uses one tracking store shares one audit trail and one lock, whatever
    its working directory: a SQLite tracking file gets ``filename`` beside it; a database
    server holds the project's tables (all named ``mlops_*``) itself; any other store (an
    HTTP tracking server, a folder) gets a fixed per-user file for that store.
    """
    if configured:
        return configured
    import hashlib

    import sqlalchemy as sa

    tracking = mlflow.get_tracking_uri()
    try:
        url = sa.engine.make_url(tracking)
    except sa.exc.ArgumentError:
        url = None
    if (
        url is not None
        and url.get_backend_name() == "sqlite"
        and url.database not in (None, "", ":memory:")
    ):
        folder = Path(url.database).expanduser().resolve().parent
        return f"sqlite:///{folder / filename}"
    if url is not None and url.get_backend_name() in ("postgresql", "mysql", "mssql"):
        return tracking
    key = hashlib.sha256(tracking.encode()).hexdigest()[:16]
    folder = Path(os.environ.get("MLOPS_HOME", Path.home() / ".mlops")) / "stores" / key
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / filename}"


def git_dirty() -> bool:
    """Whether the package's files differ from the checkout's commit (uncommitted changes)."""
    package = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--", str(package)],
            cwd=package,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and bool(out.stdout.strip())


def code_hash() -> str:
    """SHA-256 of the package's Python files (paths and contents, in path order): the code that
    runs, committed or not."""
    import hashlib

    package = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()
