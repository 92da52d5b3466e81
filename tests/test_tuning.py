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

SMALL_LOGREG = [
    "model.family=logreg",
    "tuning.search_space={C: {type: float, low: 0.00001, high: 10.0, log: true}}",
]


def children(parent_id: str) -> list:
    exp = mlflow.MlflowClient().get_run(parent_id).info.experiment_id
    return mlflow.search_runs(
        [exp], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'", output_format="list"
    )


def _slow_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """Every new Python process (the trial-run writer included) gets a tracking client that
    answers ``create_run`` ``seconds`` late."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(
        "import time\n"
        "import mlflow\n"
        "_create = mlflow.MlflowClient.create_run\n"
        "def create_run(self, *args, **kwargs):\n"
        f"    time.sleep({seconds})\n"
        f"    with open({str(tmp_path / 'slow-calls')!r}, 'a') as calls:\n"
        "        calls.write('create_run\\n')\n"
        "    return _create(self, *args, **kwargs)\n"
        "mlflow.MlflowClient.create_run = create_run\n"
    )
    monkeypatch.setenv("PYTHONPATH", str(hooks))


@pytest.mark.parametrize("writer", ["process", "thread"])
def test_trials_faster_than_the_store_still_get_complete_runs(
    writer: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slow tracking store: each trial ends before its run exists; every run is still finished."""
    if writer == "process":
        _slow_store(tmp_path, monkeypatch, 0.4)  # trials of this size take a few ms
    else:  # the in-process writer's store calls, slowed the same way
        from mlops.tuning import trial_runs

        real_open = trial_runs._open_run

        def slow_open(*args):
            time.sleep(0.4)
            with open(tmp_path / "slow-calls", "a") as calls:
                calls.write("create_run\n")
            return real_open(*args)

        monkeypatch.setattr(trial_runs, "_open_run", slow_open)
    config = load_config(
        overrides=[
            *SMALL_LOGREG,
            "tuning.n_trials=5",
            "tuning.register_best=false",
            "tuning.pruner=none",
            "tuning.storage=sqlite:///optuna.db",
            "tuning.study_name=slow-store",
            f"tuning.trial_writer={writer}",
        ]
    )
    result = tune(config, progress=False)
    # the trial runs went through the slowed client (the parent run was made before the hook)
    assert (tmp_path / "slow-calls").read_text().split() == ["create_run"] * 5
    runs = children(result.parent_run_id)
    assert len(runs) == 5
    assert all(
        r.info.status == "FINISHED" and r.data.tags["mlops.trial_state"] == "COMPLETE" for r in runs
    )
    assert sorted(int(r.data.tags["mlops.trial_number"]) for r in runs) == list(range(5))
    assert all(r.data.params["C"] and "validation_accuracy" in r.data.metrics for r in runs)


def test_the_trial_writer_is_a_process_for_one_process_studies_and_a_thread_on_a_server() -> None:
    from mlops.tuning import trial_writer_process

    def pick(*overrides: str) -> bool:
        return trial_writer_process(load_config(overrides=list(overrides)))

    assert pick() and pick("tuning.storage=sqlite:///optuna.db")
    assert not pick("tuning.storage=postgresql://u@db/optuna")
    assert pick("tuning.storage=postgresql://u@db/optuna", "tuning.trial_writer=process")
    assert not pick("tuning.trial_writer=thread")
    with pytest.raises(ConfigError, match="trial_writer"):
        load_config(overrides=["tuning.trial_writer=fork"])


def _trial_runs_of(parent_id: str) -> dict[int, mlflow.entities.Run]:
    runs = children(parent_id)
    numbers = [int(r.data.tags["mlops.trial_number"]) for r in runs]
    assert len(numbers) == len(set(numbers)), f"duplicate trial runs: {sorted(numbers)}"
    return dict(zip(numbers, runs, strict=False))


@pytest.mark.parametrize("kill_after", ["open sent", "open confirmed"])
def test_trial_runs_survive_their_writer_process_dying(kill_after: str) -> None:
    """The writer process is SIGKILLed mid-search: what it had not confirmed, and every later
    trial, is written by the tuning process itself; no run is lost, doubled or left RUNNING."""
    from mlops.tuning.trial_runs import TrialRuns

    mlflow.set_experiment("writer-dies")
    with mlflow.start_run() as parent:
        study = optuna.create_study()
        runs = TrialRuns()
        runs.start(parent.info.experiment_id, parent.info.run_id, "writer-dies")
        first = study.ask()
        runs.open(first, int(time.time() * 1000))
        if kill_after == "open confirmed":
            deadline = time.monotonic() + 60
            while first.number not in runs._run_ids and time.monotonic() < deadline:
                time.sleep(0.05)
            assert first.number in runs._run_ids
        runs._proc.kill()
        runs.finish(
            first.number,
            [("cv_accuracy", 0.5, 1, 0), ("validation_accuracy", 0.75, 2, 0)],
            {"C": "1.0"},
            "COMPLETE",
            "FINISHED",
            int(time.time() * 1000),
        )
        study.tell(first, 0.75)
        time.sleep(0.5)  # the reader notices the exit
        second = study.ask()
        runs.open(second, int(time.time() * 1000))
        runs.finish(second.number, [], {"C": "2.0"}, "PRUNED", "FINISHED", int(time.time() * 1000))
        study.tell(second, state=TrialState.PRUNED)
        runs.close()
        assert not runs.errors
    by_number = _trial_runs_of(parent.info.run_id)
    assert sorted(by_number) == [0, 1]
    assert by_number[0].info.status == "FINISHED" and by_number[0].data.params == {"C": "1.0"}
    assert by_number[0].data.metrics == {"cv_accuracy": 0.5, "validation_accuracy": 0.75}
    assert (
        by_number[1].info.status == "FINISHED"
        and by_number[1].data.tags["mlops.trial_state"] == "PRUNED"
    )
    if kill_after == "open confirmed":  # the run the process opened is the one finished
        assert study.trials[0].user_attrs["mlflow_run_id"] == by_number[0].info.run_id


def test_a_search_process_counts_as_gone_only_when_surely_gone() -> None:
    """What decides whether the next search ends a search's runs (see end_dead_searches)."""
    import sys

    from mlops.tuning.trial_runs import process_gone, process_key

    mine = process_key()
    assert not process_gone(mine)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    key = process_key(child.pid)
    assert not process_gone(key)
    child.kill()
    child.wait()
    assert process_gone(key)
    host, boot, namespace, pid, start = mine.split("|")
    if start:  # Linux: the pid of a process started at another time is another process
        assert process_gone("|".join((host, boot, namespace, pid, str(int(start) + 1))))
    # another machine, or another container on this one: not ours to tell
    assert not process_gone("|".join(("elsewhere", boot, namespace, str(child.pid), start)))
    if namespace:
        assert not process_gone("|".join((host, boot, "pid:[1]", str(child.pid), start)))
    assert not process_gone("") and not process_gone("a|b|c|d|e")


def test_a_trial_run_never_finished_is_ended_when_the_search_closes() -> None:
    from mlops.tuning.trial_runs import TrialRuns

    mlflow.set_experiment("never-finished")
    with mlflow.start_run() as parent:
        study = optuna.create_study()
        runs = TrialRuns()
        runs.start(parent.info.experiment_id, parent.info.run_id, "never-finished")
        runs.open(study.ask(), int(time.time() * 1000))
        runs.close()
        assert not runs.errors
    by_number = _trial_runs_of(parent.info.run_id)
    assert by_number[0].info.status == "FAILED"
    assert mlflow.MlflowClient().get_run(parent.info.run_id).info.status == "FINISHED"


def test_a_sigkilled_search_leaves_no_run_running(tmp_path: Path, tracking_uri: str) -> None:
    """Only the tuning process is killed: its writer process ends its runs as FAILED."""
    extra = [
        "model.family=keras_mlp",
        "model.params.epochs=400",
        "model.params.patience=400",
        "model.params.hidden_units=[8]",
        "tuning.pruner=none",
        "tuning.register_best=false",
        "tuning.search_space={learning_rate: {type: float, low: 0.0001, high: 0.01, log: true}}",
    ]
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    proc = subprocess.Popen(
        _tune_cmd(storage, "killed-alone", 3, *extra),
        env=server_env(tracking_uri),
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:  # until a trial's run exists
            time.sleep(0.5)
            runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
            if any("mlops.trial_number" in r.data.tags for r in runs):
                break
        else:
            pytest.fail("no trial run within 120 s")
    finally:
        proc.kill()  # SIGKILL, to the tuning process only
        proc.wait(timeout=10)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
        if all(r.info.status != "RUNNING" for r in runs):
            break
        time.sleep(0.5)
    statuses = {r.info.run_name: r.info.status for r in runs}
    assert any(name.startswith("trial-") for name in statuses)
    assert set(statuses.values()) == {"FAILED"}, statuses


def test_nested_runs_best_params_artifacts_and_registered_version() -> None:
    config = load_config(
        overrides=[*SMALL_LOGREG, "tuning.n_trials=8", "registry.model_name=tuned"]
    )
    result = tune(config, progress=False)
    assert result.n_complete + result.n_pruned == 8
    client = mlflow.MlflowClient()
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    # the parent holds the retrained best model: its params are the best trial's
    assert parent.data.params["model.params.C"] == str(result.best_params["C"])
    assert "best_C" not in parent.data.params
    assert parent.data.metrics["best_trial_accuracy"] == pytest.approx(result.best_value)
    assert parent.data.tags["mlops.best_trial"] == str(result.best_trial)
    files = {a.path for a in client.list_artifacts(result.parent_run_id, "study")}
    assert {
        "study/trials.csv",
        "study/optimization_history.png",
        "study/param_importances.png",
    } <= files
    runs = children(result.parent_run_id)
    assert len(runs) == 8
    numbers = sorted(int(r.data.tags["mlops.trial_number"]) for r in runs)
    assert numbers == list(range(8))
    for run in runs:
        state = run.data.tags["mlops.trial_state"]
        assert "C" in run.data.params
        if state == "PRUNED":
            assert run.info.status == "FINISHED"
        else:
            assert state == "COMPLETE" and run.info.status == "FINISHED"
            assert "validation_accuracy" in run.data.metrics
    version = client.get_model_version("tuned", result.registered_version)
    assert version.tags["mlops.study_name"] == result.study_name
    assert version.tags["mlops.best_trial"] == str(result.best_trial)
    assert len(version.tags["mlops.checksum"]) == 64
    assert not client.get_registered_model(
        "tuned"
    ).aliases  # promotion belongs to the registry layer
    assert "test_accuracy" in result.test_metrics


def test_pruning_happens_for_a_scikit_learn_family() -> None:
    config = load_config(
        overrides=[
            *SMALL_LOGREG,
            "tuning.n_trials=12",
            "tuning.register_best=false",
            "tuning.sampler=random",
        ]
    )
    result = tune(config, progress=False)
    assert result.n_pruned >= 1
    pruned = [
        r for r in children(result.parent_run_id) if r.data.tags["mlops.trial_state"] == "PRUNED"
    ]
    assert len(pruned) == result.n_pruned
    assert all(
        len(mlflow.MlflowClient().get_metric_history(r.info.run_id, "cv_accuracy")) < 3
        for r in pruned
    )


def test_pruning_happens_for_keras_per_epoch() -> None:
    config = load_config(
        overrides=[
            "model.family=keras_mlp",
            "model.params.epochs=12",
            "model.params.patience=50",
            "model.params.hidden_units=[8]",
            "tuning.search_space={learning_rate: {type: float, low: 0.00001, high: 0.05, log: "
            "true}}",
            "tuning.n_trials=8",
            "tuning.sampler=random",
            "tuning.register_best=false",
        ]
    )
    result = tune(config, progress=False)
    assert result.n_pruned >= 1
    pruned = [
        r for r in children(result.parent_run_id) if r.data.tags["mlops.trial_state"] == "PRUNED"
    ]
    steps = [
        len(mlflow.MlflowClient().get_metric_history(r.info.run_id, "val_accuracy")) for r in pruned
    ]
    assert steps and all(s < 12 for s in steps)  # stopped before the last epoch


@pytest.mark.parametrize(
    "override,message",
    [
        (
            "tuning.search_space={C: {type: float, low: 5, high: 1}}",
            r"tuning.search_space.C.*'low' \(5\) must be below 'high' \(1\)",
        ),
        (
            "tuning.search_space={C: {type: gaussian, low: 1, high: 2}}",
            r"tuning.search_space.C.type",
        ),
        (
            "tuning.search_space={C: {type: float, low: 0, high: 1, log: true}}",
            r"log scale needs 'low' > 0",
        ),
        (
            "tuning.search_space={depth: {type: int, low: 1, high: 3}}",
            r"\['depth'\] not parameters of logreg",
        ),
        ("tuning.search_space={C: {type: categorical, choices: []}}", r"non-empty 'choices'"),
    ],
)
def test_invalid_search_space_names_the_parameter(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        tune(load_config(overrides=["model.family=logreg", override]), progress=False)


def test_unreachable_storage_fails_fast_with_the_password_masked() -> None:
    config = load_config(
        overrides=[*SMALL_LOGREG, "tuning.storage=postgresql://optuna:s3cret@127.0.0.1:1/optuna"]
    )
    start = time.monotonic()
    with pytest.raises(ConfigError) as info:
        tune(config, progress=False)
    assert time.monotonic() - start < 10
    message = str(info.value)
    assert "postgresql://optuna:***@127.0.0.1:1/optuna" in message and "s3cret" not in message


def test_rerunning_the_same_study_resumes_it(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    base = [
        *SMALL_LOGREG,
        f"tuning.storage={storage}",
        "tuning.study_name=resumable",
        "tuning.register_best=false",
    ]
    first = tune(load_config(overrides=[*base, "tuning.n_trials=4"]), progress=False)
    second = tune(load_config(overrides=[*base, "tuning.n_trials=7"]), progress=False)
    study = optuna.load_study(study_name="resumable", storage=storage)
    finished = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 7
    assert len(children(first.parent_run_id)) == 4 and len(children(second.parent_run_id)) == 3
    assert (
        len({t.params["C"] for t in finished}) == 7
    )  # the resumed run did not redraw the first ones


def _tune_cmd(storage: str, study: str, n: int, *extra: str) -> list[str]:
    return [
        str(BIN / "mlops"),
        "tune",
        "--storage",
        storage,
        "--study-name",
        study,
        "--n-trials",
        str(n),
        "--no-progress",
        *[f"--set={e}" for e in extra],
    ]


@pytest.mark.postgres
def test_two_workers_on_postgresql_share_one_study(postgres_databases, tmp_path: Path) -> None:
    tracking, storage = postgres_databases(), postgres_databases()
    with using_store(tracking):  # the team's tracking store exists before its workers start
        mlflow.set_experiment("mlops")
    env = server_env(tracking)
    cmd = _tune_cmd(storage, "shared", 10, *SMALL_LOGREG, "registry.model_name=shared-model")
    procs = [
        subprocess.Popen(
            cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for _ in range(2)
    ]
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
    trial_runs = [
        r
        for r in runs
        if "mlops.trial_number" in r.data.tags and r.data.tags.get("mlops.trial_state") != "FAIL"
    ]
    assert len(trial_runs) == 10
    assert all(r.info.status != "RUNNING" for r in runs)


def test_a_sigkilled_worker_loses_no_trial_and_leaves_no_run_running(
    tmp_path: Path, tracking_uri: str
) -> None:
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    extra = [
        "model.family=keras_mlp",
        "model.params.epochs=400",
        "model.params.patience=400",
        "model.params.hidden_units=[8]",
        "tuning.pruner=none",
        "tuning.heartbeat_interval=1",
        "tuning.grace_period=3",
        "tuning.register_best=false",
        "tuning.search_space={learning_rate: {type: float, low: 0.0001, high: 0.01, log: true}}",
    ]
    cmd = _tune_cmd(storage, "killable", 3, *extra)
    proc = subprocess.Popen(
        cmd,
        env=server_env(tracking_uri),
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:  # wait until a trial is under way
            time.sleep(0.5)
            try:
                study = optuna.load_study(study_name="killable", storage=storage)
            except KeyError:
                continue
            if any(
                t.state == TrialState.RUNNING and "mlflow_run_id" in t.user_attrs
                for t in study.trials
            ):
                break  # a trial and its run are under way
        else:
            pytest.fail("no trial run started within 120 s")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    time.sleep(3.5)  # past the grace period: the heartbeat has gone stale
    result = tune(
        load_config(
            overrides=[
                *extra,
                f"tuning.storage={storage}",
                "tuning.study_name=killable",
                "tuning.n_trials=3",
                "model.params.epochs=3",
            ]
        ),
        progress=False,
    )
    study = optuna.load_study(study_name="killable", storage=storage)
    states = [t.state for t in study.trials]
    assert states.count(TrialState.FAIL) >= 1
    assert states.count(TrialState.COMPLETE) + states.count(TrialState.PRUNED) == 3
    failed = next(t for t in study.trials if t.state == TrialState.FAIL)
    retried = [t for t in study.trials if t.system_attrs.get("failed_trial") == failed.number]
    assert retried and retried[0].state == TrialState.COMPLETE
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert all(r.info.status != "RUNNING" for r in runs), [
        (r.info.run_name, r.info.status) for r in runs
    ]
    killed_run = mlflow.MlflowClient().get_run(failed.user_attrs["mlflow_run_id"])
    assert killed_run.info.status == "FAILED"
    assert result.n_complete >= 1


def test_grid_search_tries_every_point_once_then_stops() -> None:
    """tuning.sampler=grid: 3 values of C (log-spaced) x 2 class weights = 6 trials, each point
    once, and the study stops there although n_trials allows more."""
    config = load_config(
        overrides=[
            *SMALL_LOGREG,
            "tuning.n_trials=20",
            "tuning.sampler=grid",
            "tuning.pruner=none",
            "tuning.register_best=false",
            "tuning.search_space={C: {type: float, low: 0.01, high: 1.0, log: true, grid: 3}, "
            "class_weight: {type: categorical, choices: [null, balanced]}}",
        ]
    )
    result = tune(config, progress=False)
    assert result.n_complete == 6
    tried = sorted(
        (float(r.data.params["C"]), r.data.params["class_weight"])
        for r in children(result.parent_run_id)
    )
    assert tried == sorted((c, w) for c in (0.01, 0.1, 1.0) for w in ("None", "balanced")), tried


@pytest.mark.parametrize(
    "space,message",
    [
        (
            "{max_iter: {type: int, low: 1, high: 200000}, C: {type: float, low: 0.1, high: 1}}",
            r"1,000,000 points \(max_iter: 200000, C: 5\)",
        ),
    ],
)
def test_a_grid_too_large_is_refused_before_any_trial(space: str, message: str) -> None:
    config = load_config(
        overrides=["model.family=logreg", "tuning.sampler=grid", f"tuning.search_space={space}"]
    )
    with pytest.raises(ConfigError, match=message):
        tune(config, progress=False)
    assert not mlflow.search_runs(search_all_experiments=True).shape[0]
