"""A search killed mid-trial leaves no MLflow run RUNNING.

A real ``mlops tune`` runs in a subprocess on the breast-cancer data with trials slowed down (a
``sitecustomize`` hook makes every fit sleep, so each trial lasts seconds and the kill lands in
one); it is killed once a trial's run exists, and the test store is polled through
MlflowClient for up to 30 s. With the writer process (the default for in-memory and SQLite
studies) the writer ends the runs itself; with the thread writer the next search does.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import mlflow
import pytest

from mlops.config import load_config
from mlops.tuning import tune
from tests.servers import BIN, server_env

# once: our process supervision; the MLflow calls it makes are covered on the lowest MLflow too
pytestmark = [pytest.mark.slow, pytest.mark.once]

FIT_SECONDS = 1.5  # per fit; a trial fits cv_folds (3) times
OPEN_SECONDS = 2.0  # per trial run opened, where a test asks for slow opens
CLEANUP_S = 30.0
SEARCH = [
    "model.family=logreg",
    "tuning.search_space={C: {type: float, low: 0.001, high: 10.0, log: true}}",
    "tuning.pruner=none",
    "tuning.register_best=false",
]


def _slow_hooks(tmp_path: Path, open_seconds: float = 0.0) -> dict[str, str]:
    """A PYTHONPATH whose ``sitecustomize`` slows the search down, in every process (the
    writer's included): each fit sleeps :data:`FIT_SECONDS` first, each trial run takes
    ``open_seconds`` to open; each notes in ``tmp_path/opening`` that it started. The
    functions are patched as their module loads: a process that does not tune imports nothing.
    """
    hooks = tmp_path / "hooks"
    hooks.mkdir(exist_ok=True)
    (hooks / "sitecustomize.py").write_text(
        textwrap.dedent(
            f"""
            import importlib.abc, importlib.util, sys, time

            SLOW = {{
                "mlops.tuning.search": ("fit_model", {FIT_SECONDS}),
                "mlops.tuning.trial_runs": ("_open_run", {open_seconds}),
            }}

            def slowed(fn, name, seconds):
                def slow(*args, **kwargs):
                    with open({str(tmp_path / "opening")!r}, "a") as notes:
                        notes.write(name + "\\n")
                    time.sleep(seconds)
                    return fn(*args, **kwargs)
                return slow

            class Slow(importlib.abc.MetaPathFinder):
                def find_spec(self, name, path=None, target=None):
                    if name not in SLOW:
                        return None
                    sys.meta_path.remove(self)
                    try:
                        spec = importlib.util.find_spec(name)
                    finally:
                        sys.meta_path.insert(0, self)
                    run = spec.loader.exec_module
                    attr, seconds = SLOW[name]

                    def exec_module(module):
                        run(module)
                        setattr(module, attr, slowed(getattr(module, attr), attr, seconds))

                    spec.loader.exec_module = exec_module
                    return spec

            sys.meta_path.insert(0, Slow())
            """
        )
    )
    paths = [str(hooks), str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")]
    return {"PYTHONPATH": os.pathsep.join(p for p in paths if p)}


def _opening(tmp_path: Path) -> bool:
    """Whether a trial's run is being opened (see :func:`_slow_hooks`)."""
    notes = tmp_path / "opening"
    return notes.exists() and "_open_run" in notes.read_text().split()


def _start_search(
    tmp_path: Path,
    tracking_uri: str,
    study: str,
    *extra: str,
    storage: str | None = None,
    open_seconds: float = 0.0,
) -> subprocess.Popen[bytes]:
    """``mlops tune`` in a process group of its own (so that the group can be signalled)."""
    cmd = [str(BIN / "mlops"), "tune", "--study-name", study, "--n-trials", "3", "--no-progress"]
    if storage:
        cmd += ["--storage", storage]
    cmd += [f"--set={o}" for o in (*SEARCH, *extra)]
    return subprocess.Popen(
        cmd,
        env=server_env(tracking_uri, **_slow_hooks(tmp_path, open_seconds)),
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / f"{study}.log", "wb"),
        start_new_session=True,
    )


def _all_runs() -> list:
    return mlflow.search_runs(search_all_experiments=True, output_format="list")


def _kill_mid_trial(
    proc: subprocess.Popen[bytes], kill: object, tmp_path: Path, log: Path, when: str = "opened"
) -> None:
    """``kill(proc)`` while a trial runs, then wait for the process: once the trial's run is
    RUNNING (``opened``), or while the writer is still opening it (``opening``: its answer then
    meets a dead search)."""
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"the search ended before it was killed:\n{log.read_text()[-3000:]}")
            if when == "opening" and _opening(tmp_path):
                break
            if when == "opened" and any(
                "mlops.trial_number" in r.data.tags and r.info.status == "RUNNING"
                for r in _all_runs()
            ):
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"no trial run within 120 s:\n{log.read_text()[-3000:]}")
    finally:
        kill(proc)  # type: ignore[operator]
        proc.wait(timeout=30)


def _wait_for_no_running(seconds: float = CLEANUP_S) -> dict[str, str]:
    """The run name → status of every run, once none is RUNNING (or after ``seconds``)."""
    deadline = time.monotonic() + seconds
    while True:
        runs = _all_runs()
        if all(r.info.status != "RUNNING" for r in runs) or time.monotonic() > deadline:
            return {r.info.run_name: r.info.status for r in runs}
        time.sleep(0.5)


def _assert_killed(statuses: dict[str, str]) -> None:
    """No run RUNNING: the search's parent run FAILED, its last trial's run (the one killed)
    FAILED, the trials before it FINISHED. On a loaded machine the trial seen running may finish
    before the kill lands, and the kill then falls between trials: every trial FINISHED."""
    trials = sorted((n for n in statuses if n.startswith("trial-")), key=lambda n: int(n[6:]))
    assert trials and statuses.pop("tune-logreg") == "FAILED", statuses
    assert statuses.pop(trials[-1]) in ("FAILED", "FINISHED"), statuses
    assert set(statuses.values()) <= {"FINISHED"}, statuses


def _sigkill(proc: subprocess.Popen[bytes]) -> None:
    proc.kill()  # the tuning process alone


def _group(sig: signal.Signals):
    def send(proc: subprocess.Popen[bytes]) -> None:
        os.killpg(proc.pid, sig)  # the search's whole process group, as a terminal or a shell does

    return send


@pytest.mark.parametrize("when", ["opened", "opening"])
@pytest.mark.parametrize("storage", ["memory", "sqlite"])
def test_a_sigkilled_search_leaves_no_run_running_within_30_s(
    storage: str, when: str, tmp_path: Path, tracking_uri: str
) -> None:
    """SIGKILL to the tuning process alone, mid-trial: once the trial's run is RUNNING, or while
    the writer still opens it (its answer then meets a broken pipe)."""
    url = f"sqlite:///{tmp_path / 'optuna.db'}" if storage == "sqlite" else None
    study = f"killed-{storage}-{when}"
    proc = _start_search(
        tmp_path, tracking_uri, study, storage=url, open_seconds=OPEN_SECONDS * (when == "opening")
    )
    _kill_mid_trial(proc, _sigkill, tmp_path, tmp_path / f"{study}.log", when)
    killed = time.monotonic()
    if when == "opening":
        time.sleep(OPEN_SECONDS)  # the run being opened exists, RUNNING, before it is ended
    statuses = _wait_for_no_running()
    assert time.monotonic() - killed < CLEANUP_S
    _assert_killed(statuses)


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM", "SIGINT"])
def test_signals_to_the_search_process_group_still_end_its_runs(
    how: str, tmp_path: Path, tracking_uri: str
) -> None:
    """Ctrl-C (SIGINT), ``kill -TERM -PGID`` and ``kill -KILL -PGID`` reach the whole group; the
    writer runs in a session of its own (and ignores them), so it still ends the runs."""
    study = f"group-{how}"
    proc = _start_search(tmp_path, tracking_uri, study)
    _kill_mid_trial(proc, _group(signal.Signals[how]), tmp_path, tmp_path / f"{study}.log")
    _assert_killed(_wait_for_no_running())


@pytest.mark.parametrize("storage", ["memory", "sqlite"])
def test_runs_of_a_killed_thread_writer_search_are_ended_by_the_next_search(
    storage: str, tmp_path: Path, tracking_uri: str
) -> None:
    """The thread writer dies with its process: the runs stay RUNNING until the next search in
    the experiment, on this machine, finds their process gone and ends them."""
    url = f"sqlite:///{tmp_path / 'optuna.db'}" if storage == "sqlite" else None
    study = f"thread-{storage}"
    proc = _start_search(tmp_path, tracking_uri, study, "tuning.trial_writer=thread", storage=url)
    _kill_mid_trial(proc, _group(signal.SIGKILL), tmp_path, tmp_path / f"{study}.log")
    orphans = {r.info.run_id: r.info.run_name for r in _all_runs() if r.info.status == "RUNNING"}
    names = sorted(orphans.values())  # the parent run, and the trial run being written
    assert len(names) == 2 and names[0].startswith("trial-") and names[1] == "tune-logreg", names

    overrides = [*SEARCH, "tuning.n_trials=2", "tuning.trial_writer=thread", "tuning.cv_folds=2"]
    if url:
        overrides.append(f"tuning.storage={url}")
    tune(load_config(overrides=[*overrides, f"tuning.study_name={study}"]), progress=False)
    client = mlflow.MlflowClient()
    assert {client.get_run(run_id).info.status for run_id in orphans} == {"FAILED"}
    assert all(r.info.status != "RUNNING" for r in _all_runs())


def _wait_for_exit(pid: int, seconds: float = CLEANUP_S) -> None:
    """Until process ``pid`` (not a child of this one) exits."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return
        if state == "Z":  # exited, not yet reaped by its new parent
            return
        time.sleep(0.2)
    pytest.fail(f"process {pid} still runs {seconds:.0f} s later")


def test_the_writer_notices_its_parent_gone_while_a_forked_child_holds_the_pipe(
    tmp_path: Path,
) -> None:
    """No end-of-file comes (a forked child of the dead search keeps the pipe open): the writer
    sees its parent process change, and ends the runs all the same."""
    script = tmp_path / "search.py"
    script.write_text(
        textwrap.dedent(
            """
            import os, signal, time
            import mlflow, optuna
            from mlops.tuning.trial_runs import TrialRuns

            mlflow.set_experiment("forked")
            parent = mlflow.start_run(run_name="tune-direct")
            runs = TrialRuns()
            with open("writer.pid", "w") as pid_file:
                pid_file.write(str(runs._proc.pid))
            runs.start(parent.info.experiment_id, parent.info.run_id, "forked")
            trial = optuna.create_study().ask()
            runs.open(trial, int(time.time() * 1000))
            while trial.number not in runs._run_ids:  # until the writer opened the trial's run
                time.sleep(0.05)
            child = os.fork()
            if child == 0:  # holds every pipe to the writer open, and waits
                time.sleep(120)
                os._exit(0)
            with open("forked.pid", "w") as pid_file:
                pid_file.write(str(child))
            os.kill(os.getpid(), signal.SIGKILL)
            """
        )
    )
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        env=server_env(mlflow.get_tracking_uri(), **_slow_hooks(tmp_path)),
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "search.log", "wb"),
    )
    try:
        assert proc.wait(timeout=120) == -signal.SIGKILL, (tmp_path / "search.log").read_text()
        assert (tmp_path / "forked.pid").exists()
        _wait_for_exit(int((tmp_path / "writer.pid").read_text()))
        statuses = _wait_for_no_running(0)
        assert statuses == {"tune-direct": "FAILED", "trial-0": "FAILED"}, statuses
    finally:
        if (tmp_path / "forked.pid").exists():
            try:
                os.kill(int((tmp_path / "forked.pid").read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass
