"""Real Optuna studies on small data, read back through MlflowClient and Optuna's storage."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import mlflow
import optuna
import pytest
from optuna.trial import TrialState

from mlops.config import load_config
from mlops.errors import ConfigError
from mlops.tuning import tune
from tests.conftest import using_store
from tests.servers import BIN, server_env

SMALL_LOGREG = ["model.family=logreg", "tuning.search_space={C: {type: float, low: 0.00001, high: 10.0, log: true}}"]


def children(parent_id: str) -> list:
    exp = mlflow.MlflowClient().get_run(parent_id).info.experiment_id
    return mlflow.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'", output_format="list")


def test_trials_faster_than_the_store_still_get_complete_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """A slow tracking store: each trial ends before its run exists; every run is still finished."""
    slow = mlflow.MlflowClient.create_run

    def create_run(self, *args, **kwargs):
        time.sleep(0.4)  # the store answers slowly; trials of this size take a few ms
        return slow(self, *args, **kwargs)

    monkeypatch.setattr(mlflow.MlflowClient, "create_run", create_run)
    config = load_config(overrides=[*SMALL_LOGREG, "tuning.n_trials=5", "tuning.register_best=false",
                                    "tuning.pruner=none", "tuning.storage=sqlite:///optuna.db",
                                    "tuning.study_name=slow-store"])
    result = tune(config, progress=False)
    runs = children(result.parent_run_id)
    assert len(runs) == 5
    assert all(r.info.status == "FINISHED" and r.data.tags["mlops.trial_state"] == "COMPLETE" for r in runs)
    assert sorted(int(r.data.tags["mlops.trial_number"]) for r in runs) == list(range(5))


def test_nested_runs_best_params_artifacts_and_registered_version() -> None:
    config = load_config(overrides=[*SMALL_LOGREG, "tuning.n_trials=8", "registry.model_name=tuned"])
    result = tune(config, progress=False)
    assert result.n_complete + result.n_pruned == 8
    client = mlflow.MlflowClient()
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["best_C"] == str(result.best_params["C"])
    assert parent.data.metrics["best_validation_accuracy"] == pytest.approx(result.best_value)
    assert parent.data.tags["mlops.best_trial"] == str(result.best_trial)
    files = {a.path for a in client.list_artifacts(result.parent_run_id, "study")}
    assert {"study/trials.csv", "study/optimization_history.png", "study/param_importances.png"} <= files
    runs = children(result.parent_run_id)
    assert len(runs) == 8
    numbers = sorted(int(r.data.tags["mlops.trial_number"]) for r in runs)
    assert numbers == list(range(8))
    for run in runs:
        state = run.data.tags["mlops.trial_state"]
        assert "C" in run.data.params
        if state == "PRUNED":
            assert run.info.status == "KILLED"
        else:
            assert state == "COMPLETE" and run.info.status == "FINISHED"
            assert "validation_accuracy" in run.data.metrics
    version = client.get_model_version("tuned", result.registered_version)
    assert version.tags["mlops.study_name"] == result.study_name
    assert version.tags["mlops.best_trial"] == str(result.best_trial)
    assert len(version.tags["mlops.checksum"]) == 64
    assert not client.get_registered_model("tuned").aliases  # promotion belongs to the registry layer
    assert "test_accuracy" in result.test_metrics


def test_pruning_happens_for_a_scikit_learn_family() -> None:
    config = load_config(overrides=[*SMALL_LOGREG, "tuning.n_trials=12", "tuning.register_best=false",
                                    "tuning.sampler=random"])
    result = tune(config, progress=False)
    assert result.n_pruned >= 1
    pruned = [r for r in children(result.parent_run_id) if r.data.tags["mlops.trial_state"] == "PRUNED"]
    assert len(pruned) == result.n_pruned
    assert all(len(mlflow.MlflowClient().get_metric_history(r.info.run_id, "cv_accuracy")) < 3 for r in pruned)


def test_pruning_happens_for_keras_per_epoch() -> None:
    config = load_config(overrides=[
        "model.family=keras_mlp", "model.params.epochs=12", "model.params.patience=50", "model.params.hidden_units=[8]",
        "tuning.search_space={learning_rate: {type: float, low: 0.00001, high: 0.05, log: true}}",
        "tuning.n_trials=8", "tuning.sampler=random", "tuning.register_best=false"])
    result = tune(config, progress=False)
    assert result.n_pruned >= 1
    pruned = [r for r in children(result.parent_run_id) if r.data.tags["mlops.trial_state"] == "PRUNED"]
    steps = [len(mlflow.MlflowClient().get_metric_history(r.info.run_id, "val_accuracy")) for r in pruned]
    assert steps and all(s < 12 for s in steps)  # stopped before the last epoch


@pytest.mark.parametrize("override,message", [
    ("tuning.search_space={C: {type: float, low: 5, high: 1}}", r"tuning.search_space.C.*'low' \(5\) must be below 'high' \(1\)"),
    ("tuning.search_space={C: {type: gaussian, low: 1, high: 2}}", r"tuning.search_space.C.type"),
    ("tuning.search_space={C: {type: float, low: 0, high: 1, log: true}}", r"log scale needs 'low' > 0"),
    ("tuning.search_space={depth: {type: int, low: 1, high: 3}}", r"\['depth'\] not parameters of logreg"),
    ("tuning.search_space={C: {type: categorical, choices: []}}", r"non-empty 'choices'"),
])
def test_invalid_search_space_names_the_parameter(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        tune(load_config(overrides=["model.family=logreg", override]), progress=False)


def test_unreachable_storage_fails_fast_with_the_password_masked() -> None:
    config = load_config(overrides=[*SMALL_LOGREG, "tuning.storage=postgresql://optuna:s3cret@127.0.0.1:1/optuna"])
    start = time.monotonic()
    with pytest.raises(ConfigError) as info:
        tune(config, progress=False)
    assert time.monotonic() - start < 10
    message = str(info.value)
    assert "postgresql://optuna:***@127.0.0.1:1/optuna" in message and "s3cret" not in message


def test_rerunning_the_same_study_resumes_it(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    base = [*SMALL_LOGREG, f"tuning.storage={storage}", "tuning.study_name=resumable", "tuning.register_best=false"]
    first = tune(load_config(overrides=[*base, "tuning.n_trials=4"]), progress=False)
    second = tune(load_config(overrides=[*base, "tuning.n_trials=7"]), progress=False)
    study = optuna.load_study(study_name="resumable", storage=storage)
    finished = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 7
    assert len(children(first.parent_run_id)) == 4 and len(children(second.parent_run_id)) == 3
    assert len({t.params["C"] for t in finished}) == 7  # the resumed run did not redraw the first ones


def _tune_cmd(storage: str, study: str, n: int, *extra: str) -> list[str]:
    return [str(BIN / "mlops"), "tune", "--storage", storage, "--study-name", study, "--n-trials", str(n),
            "--no-progress", *[f"--set={e}" for e in extra]]


@pytest.mark.postgres
def test_two_workers_on_postgresql_share_one_study(postgres_databases, tmp_path: Path) -> None:
    tracking, storage = postgres_databases(), postgres_databases()
    with using_store(tracking):  # the team's tracking store exists before its workers start
        mlflow.set_experiment("mlops")
    env = server_env(tracking)
    cmd = _tune_cmd(storage, "shared", 10, *SMALL_LOGREG, "registry.model_name=shared-model")
    procs = [subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    study = optuna.load_study(study_name="shared", storage=storage)
    finished = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 10
    params = [t.params["C"] for t in finished]
    assert len(set(params)) == len(params)  # no trial duplicated
    mlflow.set_tracking_uri(tracking)
    mlflow.set_registry_uri(tracking)
    versions = mlflow.MlflowClient().search_model_versions("name = 'shared-model'")
    assert len(versions) == 1  # exactly one worker retrained and registered the best
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    trial_runs = [r for r in runs if "mlops.trial_number" in r.data.tags and r.data.tags.get("mlops.trial_state") != "FAIL"]
    assert len(trial_runs) == 10
    assert all(r.info.status != "RUNNING" for r in runs)


def test_a_sigkilled_worker_loses_no_trial_and_leaves_no_run_running(tmp_path: Path, tracking_uri: str) -> None:
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    extra = ["model.family=keras_mlp", "model.params.epochs=400", "model.params.patience=400",
             "model.params.hidden_units=[8]", "tuning.pruner=none", "tuning.heartbeat_interval=1",
             "tuning.grace_period=3", "tuning.register_best=false",
             "tuning.search_space={learning_rate: {type: float, low: 0.0001, high: 0.01, log: true}}"]
    cmd = _tune_cmd(storage, "killable", 3, *extra)
    proc = subprocess.Popen(cmd, env=server_env(tracking_uri), cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:  # wait until a trial is under way
            time.sleep(0.5)
            try:
                study = optuna.load_study(study_name="killable", storage=storage)
            except KeyError:
                continue
            if any(t.state == TrialState.RUNNING for t in study.trials):
                break
        else:
            pytest.fail("no trial started within 120 s")
        time.sleep(1.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    time.sleep(3.5)  # past the grace period: the heartbeat has gone stale
    result = tune(load_config(overrides=[*extra, f"tuning.storage={storage}", "tuning.study_name=killable",
                                         "tuning.n_trials=3", "model.params.epochs=3"]), progress=False)
    study = optuna.load_study(study_name="killable", storage=storage)
    states = [t.state for t in study.trials]
    assert states.count(TrialState.FAIL) >= 1
    assert states.count(TrialState.COMPLETE) + states.count(TrialState.PRUNED) == 3
    failed = next(t for t in study.trials if t.state == TrialState.FAIL)
    retried = [t for t in study.trials if t.system_attrs.get("failed_trial") == failed.number]
    assert retried and retried[0].state == TrialState.COMPLETE
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert all(r.info.status != "RUNNING" for r in runs), [(r.info.run_name, r.info.status) for r in runs]
    killed_run = mlflow.MlflowClient().get_run(failed.user_attrs["mlflow_run_id"])
    assert killed_run.info.status == "FAILED"
    assert result.n_complete >= 1
