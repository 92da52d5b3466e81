"""The ``mlops`` command line and the MLflow project entry points, end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from tests.conftest import REPO
from tests.helpers import make_csv, run_cli


def test_prepare_logs_a_data_run(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    csv = make_csv(tmp_path / "churn.csv")
    code, out, err = run_cli(
        [
            "prepare",
            "--dataset",
            str(csv),
            "--target",
            "label",
            "--set",
            "data.categorical=[color]",
        ],
        capsys,
    )
    assert code == 0, err
    assert "84/24/12" in out
    run = mlflow.search_runs(experiment_names=["mlops"], output_format="list")[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlops.step"] == "prepare"
    assert len(run.inputs.dataset_inputs) == 3


def test_train_prints_metrics_and_where_to_look(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(
        [
            "train",
            "--model",
            "hist_gb",
            "--dataset",
            "sklearn:wine",
            "--set",
            "model.params.max_iter=10",
            "--register",
        ],
        capsys,
    )
    assert code == 0, err
    assert "trained hist_gb (classification)" in out and "test_accuracy=" in out
    assert "registered version 1" in out
    assert "mlflow ui --backend-store-uri sqlite:///" in out
    version = mlflow.MlflowClient().get_model_version("mlops-model", "1")
    assert version.status == "READY"


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["train", "--model", "xgboost"],
            "unknown model family 'xgboost'; choose one of: logreg, ridge, random_forest, hist_gb, "
            "keras_mlp",
        ),
        (["train", "--dataset", "nowhere.csv", "--target", "y"], "file 'nowhere.csv' not found"),
        (["prepare", "--set", "data.colour=red"], "unknown key 'data.colour'"),
        (["train", "--set", "model.params.C=strong"], "model.params for logreg"),
    ],
)
def test_bad_input_is_one_line_and_exit_1(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
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


def mlflow_run(tracking_uri: str, cwd: Path, *args: str, timeout: int = 300):
    """`mlflow run <this project> --env-manager local ARGS` in ``cwd`` on ``tracking_uri``."""
    mlflow_bin = str(Path(sys.executable).parent / "mlflow")
    return subprocess.run(
        [mlflow_bin, "run", str(REPO), "--env-manager", "local", *args],
        cwd=cwd,
        env=_env(tracking_uri),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_mlflow_run_main_end_to_end(tracking_uri: str, tmp_path: Path) -> None:
    """`mlflow run . --env-manager local` with no parameter: prepare + train on the default."""
    proc = mlflow_run(
        tracking_uri,
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["model.family"] == "logreg"
    assert run.data.params["data.dataset"] == "sklearn:breast_cancer"
    assert run.data.metrics["test_accuracy"] > 0.9
    assert run.data.tags["mlflow.project.entryPoint"] == "main"
    models = mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id], output_format="list"
    )
    assert len(models) == 1 and models[0].source_run_id == run.info.run_id


@pytest.mark.slow
def test_mlflow_run_entry_point_failure_is_marked_failed(tracking_uri: str, tmp_path: Path) -> None:
    proc = mlflow_run(tracking_uri, tmp_path, "-e", "train", "-P", "model=bogus")
    assert proc.returncode != 0
    assert "error: model.family: unknown model family 'bogus'" in proc.stderr
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert [r.info.status for r in runs] == ["FAILED"]


@pytest.mark.slow
def test_mlflow_run_main_names_its_run_and_keeps_params_readable(
    tracking_uri: str, tmp_path: Path
) -> None:
    """What a person sees in the UI: a named run, few params, the whole config as an artifact."""
    proc = mlflow_run(
        tracking_uri,
        tmp_path,
        "--experiment-name",
        "mlops",
        "-P",
        "seed=3",
        "-P",
        "overrides='model.params.max_iter=300' data.task=classification",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert run.info.run_name == "train-logreg"
    assert run.data.params["model.params.max_iter"] == "300" and run.data.params["seed"] == "3"
    assert len(run.data.params) <= 40, sorted(run.data.params)
    # no config section but model, data and split settings; the serving options MLflow logs from
    # the model config appear once, and the prediction log's URL is not among them
    assert not [
        k for k in run.data.params if k.startswith(("monitoring.", "registry.", "serving."))
    ]
    assert run.data.params["max_rows"] == "10000" and run.data.params["monitoring_url"] == ""
    path = mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="config.yaml", dst_path=str(tmp_path / "cfg")
    )
    from mlops.config import read_resolved_config

    resolved = read_resolved_config(path)
    assert resolved.seed == 3 and resolved.model.params["max_iter"] == 300


@pytest.mark.slow
def test_mlflow_run_tune_then_promote_to_staging_passes_the_default_gates(
    tracking_uri: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The flow across commands: `mlflow run . -e tune`, then `mlops promote ... --to staging`."""
    proc = mlflow_run(
        tracking_uri,
        tmp_path,
        "-e",
        "tune",
        "--experiment-name",
        "mlops",
        "-P",
        "n_trials=4",
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # MLproject's --no-progress reached the command: no progress bar
    assert "trials:" not in proc.stderr
    assert (
        "RuntimeWarning" not in proc.stderr
    )  # the trial-run writer starts without runpy's warning
    client = mlflow.MlflowClient()
    (version,) = client.search_model_versions("name = 'mlops-model'")
    parent = client.get_run(version.run_id)
    assert parent.info.run_name == "tune-logreg"
    # honest: measured on the validation split, which the retrained model never saw
    assert (
        parent.data.metrics["validation_accuracy"] > 0.8 and "test_accuracy" in parent.data.metrics
    )
    trials = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert sorted(r.info.run_name for r in trials) == [f"trial-{i}" for i in range(4)]
    assert {r.info.status for r in trials} == {"FINISHED"}

    code, out, err = run_cli(
        ["promote", "mlops-model", "--version", str(version.version), "--to", "staging"], capsys
    )
    assert code == 0, err
    assert "staging is now version" in out
    assert client.get_model_version_by_alias("mlops-model", "staging").version == version.version


def test_named_options_are_typed_values_not_yaml(tmp_path: Path) -> None:
    """`--target yes` is the column "yes", `--dataset 2024` the file "2024": never re-read as
    YAML."""
    from mlops.cli import build_config

    config = build_config(None, ["data.task=classification"], dataset="2024", target="yes", seed=7)
    assert config.data.dataset == "2024" and config.data.target == "yes" and config.seed == 7
    config = build_config(None, [], target="1")
    assert config.data.target == "1"


def test_entry_point_arguments_split_like_a_shell_and_keep_flags() -> None:
    from mlops.cli import entry_args

    args = entry_args(
        "tune",
        [
            "--model",
            "",
            "--n-trials",
            "5",
            "--overrides",
            "'model.params.hidden_units=[64, 32]' seed=3",
            "--no-progress",
        ],
    )
    assert args == [
        "--n-trials",
        "5",
        "--set=model.params.hidden_units=[64, 32]",
        "--set=seed=3",
        "--no-progress",
    ]
    with pytest.raises(SystemExit, match="quote"):
        entry_args("train", ["--overrides", "'unclosed"])


def test_audit_trail_follows_the_tracking_store_not_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlops.tracking import project_store_url

    store = tmp_path / "store"
    store.mkdir()
    uri = f"sqlite:///{store / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    seen = set()
    for cwd in (tmp_path, store, Path("/")):
        monkeypatch.chdir(cwd)
        seen.add(project_store_url(None, "mlops.db"))
    assert seen == {f"sqlite:///{store / 'mlops.db'}"}
    assert project_store_url("sqlite:///elsewhere.db", "mlops.db") == "sqlite:///elsewhere.db"
    monkeypatch.setenv("MLOPS_HOME", str(tmp_path / "home"))
    mlflow.set_tracking_uri("http://127.0.0.1:9")
    server_store = project_store_url(None, "mlops.db")
    assert server_store.startswith(
        f"sqlite:///{tmp_path / 'home'}"
    ) and server_store == project_store_url(None, "mlops.db")


def test_every_mlproject_option_is_an_option_of_its_command() -> None:
    """An MLproject parameter passed as --name to a command that has no such option would only
    fail when a user runs that entry point."""
    import re
    from pathlib import Path

    import yaml

    from mlops.cli import cli

    root = Path(__file__).resolve().parent.parent
    project = yaml.safe_load((root / "MLproject").read_text())
    checked = 0
    for name, entry in project["entry_points"].items():
        module = re.search(r"python -m pipelines\.(\w+)", entry["command"]).group(1)
        source = (root / "pipelines" / f"{module}.py").read_text()
        command = re.search(r'entry_point\("(\w+)"\)', source).group(1)
        known = {o for p in cli.commands[command].params for o in getattr(p, "opts", [])}
        for option in re.findall(r"(--[\w-]+) \{", entry["command"]):
            assert option == "--overrides" or option in known, (name, option)
            checked += 1
    assert checked > 20
