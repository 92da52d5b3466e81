"""`mlops reproduce RUN_ID`: a training run re-run from its own record gives its metrics again."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from click.testing import CliRunner

from mlops.cli import cli
from mlops.config import load_config
from mlops.errors import ReproductionError
from mlops.reproduce import REPRODUCES_TAG, reproduce
from mlops.tracking import GIT_COMMIT_TAG
from mlops.training import train
from tests.helpers import make_csv

ROOT = Path(__file__).resolve().parent.parent


def _config(csv: Path, *extra: str):
    return load_config(
        overrides=[
            f"data.dataset={csv}",
            "data.target=label",
            "data.categorical=[color]",
            "explain.enabled=false",
            *extra,
        ]
    )


@pytest.mark.parametrize("family", ["logreg", "random_forest", "hist_gb"])
def test_a_scikit_learn_run_reproduces_with_identical_metrics(tmp_path: Path, family: str) -> None:
    csv = make_csv(tmp_path / "data.csv", n=150)
    original = train(_config(csv, f"model.family={family}", "model.params={}", "seed=7"))
    # the source is gone: the run's own record (its Parquet splits) is what is trained on
    csv.unlink()
    outcome = reproduce(original.run_id)
    assert not outcome.checked_out  # the code here is the run's
    assert outcome.tolerance == 0.0
    names = {m.name for m in outcome.metrics}
    assert {"validation_accuracy", "test_accuracy", "test_f1", "test_log_loss"} <= names
    for m in outcome.metrics:
        assert m.reproduced == m.original, m  # exactly, not approximately
    assert outcome.matches
    new = mlflow.MlflowClient().get_run(outcome.run_id)
    assert new.data.tags[REPRODUCES_TAG] == original.run_id
    assert new.data.params["data_hash"] == original.data_hash
    assert outcome.run_id != original.run_id


def test_the_cli_prints_each_metric_beside_the_original(tmp_path: Path) -> None:
    original = train(_config(make_csv(tmp_path / "data.csv")))
    result = CliRunner().invoke(cli, ["reproduce", original.run_id])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    # (MLflow's own log lines may come in between)
    first = next(i for i, line in enumerate(lines) if line.startswith("reproduced run"))
    assert lines[first].startswith(f"reproduced run {original.run_id} as run ")
    assert lines[first + 1].startswith("data: the same (")
    row = next(line for line in lines if line.startswith("test_accuracy"))
    value = f"{original.metrics['test_accuracy']:.6g}"
    assert row.split()[1:5] == [value, value, "0", "ok"]


def test_a_metric_beyond_the_tolerance_fails_the_command(tmp_path: Path) -> None:
    """A run whose logged metric was changed afterwards no longer reproduces: exit 1."""
    original = train(_config(make_csv(tmp_path / "data.csv")))
    client = mlflow.MlflowClient()
    client.log_metric(original.run_id, "test_accuracy", 0.123)
    result = CliRunner().invoke(cli, ["reproduce", original.run_id])
    assert result.exit_code == 1
    assert "DIFFERS" in result.output
    assert "does not reproduce run" in result.output


def test_only_a_training_run_with_a_record_can_be_reproduced(tmp_path: Path) -> None:
    with pytest.raises(ReproductionError, match="no such run|not found|does not exist"):
        reproduce("0" * 32)
    with mlflow.start_run() as run:
        mlflow.log_metric("x", 1.0)
    with pytest.raises(ReproductionError, match="reproduce a training run"):
        reproduce(run.info.run_id)


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_changed_code_trains_at_the_runs_commit_in_a_worktree(
    tmp_path: Path, tracking_uri: str
) -> None:
    """A clone of this checkout whose mlops/ changed after the run: reproduce checks the run's
    commit out into a worktree and trains with that commit's code, in a child process."""
    if subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True).returncode:
        pytest.skip("not a git checkout")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", "--shared", str(ROOT), str(clone)], check=True)
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=clone, capture_output=True, text=True, check=True
    ).stdout.strip()
    original = train(_config(make_csv(tmp_path / "data.csv")))
    client = mlflow.MlflowClient()
    # the run as the clone's code at HEAD, committed, would have recorded it
    client.set_tag(original.run_id, GIT_COMMIT_TAG, commit)
    if "mlops.git_dirty" in client.get_run(original.run_id).data.tags:
        client.delete_tag(original.run_id, "mlops.git_dirty")
    with open(clone / "mlops" / "__init__.py", "a") as fh:
        fh.write("\n# a change after the run\n")
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    child = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; sys.path.insert(0, sys.argv[1]); from mlops.cli import main; "
            "main(['reproduce', sys.argv[2]])",
            str(clone),
            original.run_id,
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == 0, child.stdout + child.stderr
    assert f"at the run's commit {commit[:12]}" in child.stdout
    assert "test_accuracy" in child.stdout
    # the worktree is gone again
    listed = subprocess.run(
        ["git", "worktree", "list"], cwd=clone, capture_output=True, text=True, check=True
    ).stdout
    assert len(listed.strip().splitlines()) == 1, listed


@pytest.mark.slow
def test_a_keras_run_reproduces_within_its_stated_tolerance(tmp_path: Path) -> None:
    csv = make_csv(tmp_path / "data.csv", n=150)
    original = train(_config(csv, "model.family=keras_mlp", "model.params.epochs=5"))
    outcome = reproduce(original.run_id)
    assert outcome.tolerance == 0.01
    assert outcome.matches, [m for m in outcome.metrics if m.difference != 0]
