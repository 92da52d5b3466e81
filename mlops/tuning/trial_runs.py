"""The MLflow runs of a search's trials, written by a child process.

Every Optuna trial is a nested MLflow run: opened when the trial starts, then filled with its
params and intermediate and final metrics and closed with its state when it ends. MLflow's
SQLAlchemy store spends about 20 ms of Python on those calls per trial (one ``log_batch``
alone issues dozens of statements). Made by a thread of the tuning process they would hold
the GIL while the trial trains, and a search of short trials would pay for its logging in
wall time. So :class:`TrialRuns` hands them, as JSON lines over a pipe, to a child process
(:func:`main` in ``python -c``) that makes the MLflow calls; a trial pays for encoding a
line. Trials never wait for their runs.

The child answers each opened run's id, which is stored on the trial (user attribute
``mlflow_run_id``) while the trial is still running. If the tuning process dies, even by
SIGKILL, the child reads end-of-file on its pipe and ends every run it opened and did not
close as FAILED, the parent run included. If the child cannot start or dies, the tuning
process writes what the child did not confirm itself, on a thread, and carries on.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# a trial's metrics: (key, value, timestamp ms, step)
MetricRow = tuple[str, float, int, int]


def _open_run(
    client: Any, experiment_id: str, parent_id: str, study_name: str, number: int, start_ms: int
) -> str:
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    run = client.create_run(
        experiment_id,
        start_time=start_ms,
        run_name=f"trial-{number}",
        tags={
            MLFLOW_PARENT_RUN_ID: parent_id,
            "mlops.trial_number": str(number),
            "mlops.study_name": study_name,
        },
    )
    return run.info.run_id


def _finish_run(
    client: Any,
    run_id: str,
    metrics: list[MetricRow],
    params: dict[str, str],
    state: str,
    status: str,
    end_ms: int,
) -> None:
    from mlflow.entities import Metric, Param, RunTag

    client.log_batch(
        run_id,
        metrics=[Metric(k, float(v), int(t), int(s)) for k, v, t, s in metrics],
        params=[Param(k, v) for k, v in params.items()],
        tags=[RunTag("mlops.trial_state", state)],
    )
    client.set_terminated(run_id, status, end_time=end_ms)


class TrialRuns:
    """Opens and finishes the trial runs of one search; :meth:`close` waits for all of them."""

    def __init__(self, *, use_process: bool = True) -> None:
        """Start the writer process: it imports MLflow while the search gets ready (see
        :meth:`start`)."""
        self.experiment_id = self.parent_id = self.study_name = ""
        self._lock = threading.Lock()
        self._live: dict[int, Any] = {}  # trial number -> optuna.Trial, until it ends
        self._run_ids: dict[int, str] = {}  # runs the child confirmed opening
        self._unconfirmed: dict[
            int, dict
        ] = {}  # trial number -> its messages the child has not confirmed
        self.errors: list[str] = []
        self._thread_writer: ThreadPoolExecutor | None = None
        self._thread_futures: list = []
        self._client: Any = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._closing = False
        if use_process:
            try:
                self._start_child()
            except OSError as exc:
                logger.warning(
                    "trial runs are written in-process: the writer process did not start (%s)", exc
                )
                self._proc = None

    def start(self, experiment_id: str, parent_id: str, study_name: str) -> None:
        """The search's parent run exists: trial runs go under it, in its experiment."""
        import mlflow

        self.experiment_id, self.parent_id, self.study_name = experiment_id, parent_id, study_name
        if self._proc is not None:
            # the tracking URI goes over the pipe, not the command line (it may hold a password)
            self._outbox.put(
                {"op": "init", "tracking_uri": mlflow.get_tracking_uri(), "parent_id": parent_id}
            )

    # ---- the tuning process's side ----
    def _start_child(self) -> None:
        root = str(Path(__file__).resolve().parent.parent)
        env = dict(
            os.environ,
            PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p),
        )
        proc = subprocess.Popen(
            # -c, not -m: the package mlops.tuning imports this module first, which -m warns about
            [sys.executable, "-c", "from mlops.tuning.trial_runs import main; main()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            close_fds=True,
        )
        self._proc = proc
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._sender = threading.Thread(
            target=self._send, args=(proc,), name="mlops-trial-runs-send", daemon=True
        )
        self._reader = threading.Thread(
            target=self._read, args=(proc,), name="mlops-trial-runs-read", daemon=True
        )
        self._sender.start()
        self._reader.start()

    def open(self, trial: Any, start_ms: int) -> None:
        """Open the trial's run (in the background)."""
        number = trial.number
        # set here, at once: a worker killed before its trial's run exists still names the parent
        # run that the surviving workers must end (see mlops.tuning.storage.end_orphan_runs)
        trial.set_user_attr("mlflow_parent_run_id", self.parent_id)
        with self._lock:
            self._live[number] = trial
            if self._proc is not None:
                message = {
                    "op": "open",
                    "trial": number,
                    "experiment_id": self.experiment_id,
                    "study_name": self.study_name,
                    "start": start_ms,
                }
                self._unconfirmed[number] = {"open": message}
                self._outbox.put(message)
                return
        self._in_thread(number, {"open": {"start": start_ms}})

    def finish(
        self,
        number: int,
        metrics: list[MetricRow],
        params: dict[str, str],
        state: str,
        status: str,
        end_ms: int,
    ) -> None:
        """Fill and close the trial's run (in the background); the trial no longer takes
        attributes."""
        message = {
            "op": "finish",
            "trial": number,
            "metrics": metrics,
            "params": params,
            "state": state,
            "status": status,
            "end": end_ms,
        }
        with self._lock:
            self._live.pop(number, None)
            if self._proc is not None:
                self._unconfirmed.setdefault(number, {})["finish"] = message
                self._outbox.put(message)
                return
        self._in_thread(number, {"finish": message})

    def close(self, timeout: float = 600.0) -> None:
        """Wait until every run is finished; what could not be written is logged as a warning."""
        proc = self._proc
        if proc is not None:
            with self._lock:
                self._closing = True
            self._outbox.put({"op": "close"})
            self._outbox.put(None)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                logger.warning(
                    "the trial-run writer did not finish within %.0f s; stopping it", timeout
                )
                proc.kill()
                proc.wait()
            self._reader.join(timeout=10)
            self._sender.join(timeout=10)
            # not everything confirmed: write the rest here
            if proc.returncode or self._unconfirmed:
                self._take_over(
                    f"exit code {proc.returncode}" if proc.returncode else "runs left unwritten"
                )
        if self._thread_writer is not None:
            self._thread_writer.shutdown(wait=True)
            for future in self._thread_futures:
                if future.exception() is not None:
                    self.errors.append(str(future.exception()))
        for error in self.errors:
            logger.warning("could not write a trial's MLflow run: %s", error)

    def _send(self, proc: subprocess.Popen[bytes]) -> None:
        stdin = proc.stdin
        assert stdin is not None  # opened with stdin=PIPE
        while True:
            message = self._outbox.get()
            if message is None:
                break
            try:
                stdin.write(json.dumps(message).encode() + b"\n")
                stdin.flush()
            except (BrokenPipeError, OSError, ValueError):
                break  # the child is gone: the reader sees it and takes over
        try:
            stdin.close()
        except (BrokenPipeError, OSError):
            pass

    def _read(self, proc: subprocess.Popen[bytes]) -> None:
        stdout = proc.stdout
        assert stdout is not None  # opened with stdout=PIPE
        for line in stdout:
            try:
                reply = json.loads(line)
            except ValueError:
                continue
            number = reply.get("trial")
            if "error" in reply:
                self.errors.append(f"trial {number}: {reply['error']}")
            trial = None
            with self._lock:
                if "run_id" in reply:
                    self._run_ids[number] = reply["run_id"]
                    self._unconfirmed.get(number, {}).pop("open", None)
                    trial = self._live.get(number)
                elif reply.get("finished"):
                    self._unconfirmed.pop(number, None)
            if trial is not None:
                # the trial → run link for trials.csv and for ending a killed worker's runs; a trial
                # that ended meanwhile cannot take it (its run carries the study and trial number
                # tags)
                try:
                    trial.set_user_attr("mlflow_run_id", reply["run_id"])
                except Exception:  # noqa: BLE001 - optuna's "trial already finished"
                    pass
        proc.wait()
        with self._lock:
            closing = self._closing
        if proc.returncode and not closing:
            self._take_over(f"exit code {proc.returncode}")

    def _take_over(self, why: str) -> None:
        """The child died: write here what it did not confirm, and every later trial."""
        with self._lock:
            if self._proc is None:
                return
            self._proc = None
            left = dict(self._unconfirmed)
            self._unconfirmed.clear()
        logger.warning(
            "the trial-run writer process stopped (%s); %d trial run(s) it had not confirmed and "
            "all "
            "later ones are written in-process",
            why,
            len(left),
        )
        for number, messages in sorted(left.items()):
            self._in_thread(number, messages)

    def _in_thread(self, number: int, messages: dict) -> None:
        """The in-process writer: one thread, open before finish for each trial."""
        with self._lock:
            if self._thread_writer is None:
                self._thread_writer = ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix="mlops-trial-runs"
                )
            self._thread_futures.append(
                self._thread_writer.submit(self._write_here, number, messages)
            )

    def _write_here(self, number: int, messages: dict) -> None:
        import mlflow

        if self._client is None:
            self._client = mlflow.MlflowClient()
        if "open" in messages:
            run_id = _open_run(
                self._client,
                self.experiment_id,
                self.parent_id,
                self.study_name,
                number,
                messages["open"]["start"],
            )
            with self._lock:
                self._run_ids[number] = run_id
                trial = self._live.get(number)
            if trial is not None:
                try:
                    trial.set_user_attr("mlflow_run_id", run_id)
                except Exception:  # noqa: BLE001 - optuna's "trial already finished"
                    pass
        if "finish" in messages:
            m = messages["finish"]
            with self._lock:
                opened = self._run_ids.get(number)
            if opened is None:
                raise RuntimeError(f"trial {number}: its run was never opened")
            _finish_run(
                self._client, opened, m["metrics"], m["params"], m["state"], m["status"], m["end"]
            )


# ---- the child process ----
def _serve() -> int:
    """Read JSON lines from stdin and make the MLflow calls; answer JSON lines on stdout."""
    signal.signal(
        signal.SIGINT, signal.SIG_IGN
    )  # Ctrl-C stops the search; the search then closes us
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever else prints goes to stderr, not into the answers
    # while the search gets ready: started early, the process is ready for the first trial
    import mlflow

    first = sys.stdin.readline()
    init = json.loads(first) if first else {"op": "close"}
    if init["op"] != "init":
        return 0
    mlflow.set_tracking_uri(init["tracking_uri"])
    client = mlflow.MlflowClient()
    opened: dict[int, str] = {}
    failed_open: dict[int, dict] = {}  # retried when the trial finishes
    closed = False
    for line in sys.stdin:
        message = json.loads(line)
        op, number = message["op"], message.get("trial")
        if op == "close":
            closed = True
            break
        try:
            if op == "open":
                failed_open[number] = message
                opened[number] = _open_run(
                    client,
                    message["experiment_id"],
                    init["parent_id"],
                    message["study_name"],
                    number,
                    message["start"],
                )
                del failed_open[number]
                out.write(json.dumps({"trial": number, "run_id": opened[number]}) + "\n")
            elif op == "finish":
                if number in failed_open:
                    first = failed_open[number]
                    opened[number] = _open_run(
                        client,
                        first["experiment_id"],
                        init["parent_id"],
                        first["study_name"],
                        number,
                        first["start"],
                    )
                    del failed_open[number]
                run_id = opened.pop(number)
                _finish_run(
                    client,
                    run_id,
                    message["metrics"],
                    message["params"],
                    message["state"],
                    message["status"],
                    message["end"],
                )
                out.write(json.dumps({"trial": number, "finished": True}) + "\n")
        except Exception as exc:  # noqa: BLE001 - one trial's failed write must not stop the others
            out.write(
                json.dumps(
                    {"trial": number, "op": op, "error": f"{exc.__class__.__name__}: {exc}"[:500]}
                )
                + "\n"
            )
    if not closed:
        # end-of-file without "close": the tuning process died; leave no run RUNNING
        from mlops.tracking import end_runs

        end_runs(client, [*opened.values(), init["parent_id"]], "FAILED")
    return 0


def main() -> None:
    """The writer process: serve the pipe, then exit at once."""
    code = _serve()
    sys.stderr.flush()
    # every call is committed and every answer written (line-buffered): skip the interpreter's
    # teardown of MLflow's modules, over half a second the search would wait for
    os._exit(code)


if __name__ == "__main__":
    main()
