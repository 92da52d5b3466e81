"""MLflow run handling shared by every step: experiment choice, run start, failure status."""

from __future__ import annotations

import logging
import os
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import mlflow
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from mlops.config import Config

logger = logging.getLogger(__name__)


@contextmanager
def step_run(config: Config, run_name: str) -> Iterator[Run]:
    """Start (or, under ``mlflow run``, resume) the run of one step.

    The experiment comes from the config unless ``mlflow run`` already created the run (it
    passes ``MLFLOW_RUN_ID``). Any exception ends the run as FAILED, so no half-finished run
    stays RUNNING.
    """
    active = mlflow.active_run()
    if active is not None:
        yield active
        return
    resumed = bool(os.environ.get("MLFLOW_RUN_ID"))
    if not resumed:
        try:
            mlflow.set_experiment(config.experiment)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            # another worker created it between our lookup and our create: use theirs
            mlflow.set_experiment(config.experiment)
    with mlflow.start_run(run_name=None if resumed else run_name) as run:
        commit = git_commit()
        if commit:
            mlflow.set_tag("mlops.git_commit", commit)
        mlflow.set_tag("mlops.step", run_name)
        yield run


def git_commit() -> str | None:
    """The commit of the working tree the code runs from, when it is a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
            text=True, timeout=5, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None
