"""The ``mlops`` command line and the MLflow project entry points, end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from mlops.cli import main
from tests.conftest import REPO
from tests.helpers import make_csv


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_prepare_logs_a_data_run(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    csv = make_csv(tmp_path / "churn.csv")
    code, out, err = run_cli(["prepare", "--dataset", str(csv), "--target", "label", "--set", "data.categorical=[color]"], capsys)
    assert code == 0, err
    assert "84/24/12" in out
    run = mlflow.search_runs(experiment_names=["mlops"], output_format="list")[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlops.step"] == "prepare"
    assert len(run.inputs.dataset_inputs) == 3


def test_train_prints_metrics_and_where_to_look(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(["train", "--model", "hist_gb", "--dataset", "sklearn:wine",
                              "--set", "model.params.max_iter=10", "--register"], capsys)
    assert code == 0, err
    assert "trained hist_gb (classification)" in out and "test_accuracy=" in out
    assert "registered version 1" in out
    assert "mlflow ui --backend-store-uri sqlite:///" in out
    version = mlflow.MlflowClient().get_model_version("mlops-model", "1")
    assert version.status == "READY"


@pytest.mark.parametrize(
    "args,message",
    [
        (["train", "--model", "xgboost"], "unknown model family 'xgboost'; choose one of: logreg, ridge, random_forest, hist_gb, keras_mlp"),
        (["train", "--dataset", "nowhere.csv", "--target", "y"], "file 'nowhere.csv' not found"),
        (["prepare", "--set", "data.colour=red"], "unknown key 'data.colour'"),
        (["train", "--set", "model.params.C=strong"], "model.params for logreg"),
    ],
)
def test_bad_input_is_one_line_and_exit_1(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(args, capsys)
    assert code == 1
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], err
    for run in mlflow.search_runs(search_all_experiments=True, output_format="list"):
        assert run.info.status != "RUNNING"


def test_help_shows_an_example(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("prepare", "train"):
        code, out, _ = run_cli([command, "--help"], capsys)
        assert code == 0
        assert "Example:" in out and f"mlops {command} --" in out


def _env(tracking_uri: str) -> dict[str, str]:
    env = dict(os.environ)
    env["MLFLOW_TRACKING_URI"] = tracking_uri
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return env


@pytest.mark.slow
def test_mlflow_run_main_end_to_end(tracking_uri: str, tmp_path: Path) -> None:
    """`mlflow run . --env-manager local` with no parameter: prepare + train on the default."""
    mlflow_bin = str(Path(sys.executable).parent / "mlflow")
    proc = subprocess.run([mlflow_bin, "run", str(REPO), "--env-manager", "local"],
                          cwd=tmp_path, env=_env(tracking_uri), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["model.family"] == "logreg"
    assert run.data.params["data.dataset"] == "sklearn:breast_cancer"
    assert run.data.metrics["test_accuracy"] > 0.9
    assert run.data.tags["mlflow.project.entryPoint"] == "main"
    models = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")
    assert len(models) == 1 and models[0].source_run_id == run.info.run_id


@pytest.mark.slow
def test_mlflow_run_entry_point_failure_is_marked_failed(tracking_uri: str, tmp_path: Path) -> None:
    mlflow_bin = str(Path(sys.executable).parent / "mlflow")
    proc = subprocess.run([mlflow_bin, "run", str(REPO), "-e", "train", "--env-manager", "local",
                           "-P", "model=bogus"],
                          cwd=tmp_path, env=_env(tracking_uri), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "error: model.family: unknown model family 'bogus'" in proc.stderr
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert [r.info.status for r in runs] == ["FAILED"]
