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
``mlflow_run_id``) while the trial is still running. If the child cannot start or dies, the
tuning process writes what the child did not confirm itself, on a thread, and carries on.

When the tuning process dies
----------------------------
The child outlives it long enough to leave no run RUNNING:

* it runs in a session of its own and ignores SIGINT, SIGTERM and SIGHUP, so neither Ctrl-C,
  ``kill -TERM -PGID``, ``kill -KILL -PGID`` nor a closed terminal reaches it: signals sent to
  the search's process group stop the search alone;
* it learns of the death from end-of-file on its pipe, or, where another process still holds
  the pipe open (a forked child of the search), from its parent process id changing; it polls
  every half second;
* answers to a dead process (a broken pipe) are dropped instead of stopping it; the messages
  already in the pipe are still written (for up to :data:`DRAIN_SECONDS`), then every run it
  opened and did not close, and the search's parent run it was told about (``init``), are
  ended as FAILED, and it exits (within :data:`CLEANUP_SECONDS` at the latest).

With the thread writer (``tuning.trial_writer: thread``, the default on a database server) the
runs are written by the tuning process itself. Ctrl-C still ends them (the trial's run and the
parent run end as FAILED while the exception unwinds), but SIGKILL, or SIGTERM with no handler,
ends the whole process at once and its runs stay RUNNING. They are ended later: every search
tags its parent run with the process that runs it (:data:`TUNER_TAG`: host, boot, pid
namespace, pid and start time), and :meth:`TrialRuns.start` ends, as FAILED, every RUNNING run
of the experiment whose tuning process is provably gone (same machine, process no longer
there) along with its RUNNING trial runs; so the next ``mlops tune`` in the experiment on that
machine cleans up. A stored study's killed trial is also found by Optuna's heartbeat, by any
worker on any machine, once it is stale (``mlops.tuning.storage.end_orphan_runs``).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import select
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# a trial's metrics: (key, value, timestamp ms, step)
MetricRow = tuple[str, float, int, int]

# the parent run's tag naming the process that runs the search (see process_key)
TUNER_TAG = "mlops.tuning_process"
# once the tuning process is gone: how long the writer keeps writing what is still in its pipe
# before it ends the runs left open, and how long it may live at all
DRAIN_SECONDS = 15.0
CLEANUP_SECONDS = 120
# how often the writer checks that its parent process is still there
_POLL_SECONDS = 0.5


# ---- which process runs a search, and whether it is gone ----
def _read(path: str) -> str:
    try:
        with open(path) as stream:
            return stream.read().strip()
    except OSError:
        return ""


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux), "" where unknown."""
    stat = _read(f"/proc/{pid}/stat")
    # the command name, in parentheses, may hold spaces: the fields after it are fixed
    fields = stat[stat.rfind(")") + 2 :].split() if stat else []
    return fields[19] if len(fields) > 19 else ""


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def process_key(pid: int | None = None) -> str:
    """``host|boot|pid namespace|pid|start time`` of a process of this machine (the parts not
    known off Linux are empty): a pid reused after the process ended gives another key."""
    pid = os.getpid() if pid is None else pid
    boot = _read("/proc/sys/kernel/random/boot_id")
    return "|".join((os.uname().nodename, boot, _pid_namespace(), str(pid), _start_time(pid)))


def process_gone(key: str) -> bool:
    """Whether the process named by :func:`process_key` surely no longer runs: it ran on this
    machine (same host, and same pid namespace where known) and is not there now. A process of
    another machine or namespace, or one that cannot be told, counts as running."""
    parts = key.split("|")
    if len(parts) != 5 or not parts[3].isdigit():
        return False
    host, boot, namespace, pid, start = parts
    if host != os.uname().nodename:
        return False
    here = _read("/proc/sys/kernel/random/boot_id")
    if boot and here and boot != here:
        return True  # the machine restarted since
    if namespace != _pid_namespace():
        return False  # another container's pids are not ours to see
    now = _start_time(int(pid))
    if start and now:
        return now != start  # another process since has the pid
    try:  # no /proc, or the process is gone or hidden (hidepid): ask the kernel
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:  # e.g. another user's process: it is there
        return False
    return False


def end_dead_searches(client: Any, experiment_id: str) -> list[str]:
    """End as FAILED every RUNNING search of the experiment whose tuning process is gone (see
    :func:`process_gone`), with its RUNNING trial runs; the ids it ended. Never raises."""
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    from mlops.tracking import end_runs

    host = os.uname().nodename.replace("'", "''")
    try:
        searches = client.search_runs(
            [experiment_id],
            filter_string=(f"attributes.status = 'RUNNING' and tags.`{TUNER_TAG}` LIKE '{host}|%'"),
            max_results=1000,
        )
        ended: list[str] = []
        for run in searches:
            if not process_gone(run.data.tags.get(TUNER_TAG, "")):
                continue
            trials = client.search_runs(
                [experiment_id],
                filter_string=(
                    f"attributes.status = 'RUNNING' and "
                    f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{run.info.run_id}'"
                ),
                max_results=10000,
            )
            ended += end_runs(client, [*(t.info.run_id for t in trials), run.info.run_id])
    except Exception as exc:  # noqa: BLE001 - cleaning up after others must not stop a search
        logger.warning("could not look for the runs of killed searches: %s", exc)
        return []
    if ended:
        logger.warning(
            "ended %d run(s) left RUNNING by a killed search as FAILED: %s",
            len(ended),
            ", ".join(ended),
        )
    return ended


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
        """The search's parent run exists: trial runs go under it, in its experiment.

        The writer is told of the parent run first, so that it ends it should this process die;
        the run is tagged with this process (:data:`TUNER_TAG`), and the experiment's runs left
        RUNNING by searches killed earlier on this machine are ended (in the background).
        """
        import mlflow

        self.experiment_id, self.parent_id, self.study_name = experiment_id, parent_id, study_name
        with self._lock:
            in_process = self._proc is None
            if not in_process:
                # the tracking URI goes over the pipe, not the command line (it may hold a
                # password)
                self._outbox.put(
                    {
                        "op": "init",
                        "tracking_uri": mlflow.get_tracking_uri(),
                        "parent_id": parent_id,
                        "experiment_id": experiment_id,
                    }
                )
        try:  # at once, not in the background: a search killed a moment later is still found
            mlflow.MlflowClient().set_tag(parent_id, TUNER_TAG, process_key())
        except Exception as exc:  # noqa: BLE001 - a missing tag only loses the later clean-up
            logger.warning("could not tag run %s with its process: %s", parent_id, exc)
        if in_process:
            self._submit(lambda: end_dead_searches(self._client_here(), experiment_id))

    # ---- the tuning process's side ----
    def _start_child(self) -> None:
        root = str(Path(__file__).resolve().parent.parent)
        env = dict(
            os.environ,
            PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p),
        )
        proc = subprocess.Popen(
            # -c, not -m: the package mlops.tuning imports this module first, which -m warns about
            [
                sys.executable,
                "-c",
                f"from mlops.tuning.trial_runs import main; main({os.getpid()})",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            close_fds=True,
            # signals to the search's process group (Ctrl-C, kill -PGID, a closed terminal) do
            # not reach the writer: it outlives the search to end its runs (module docstring)
            start_new_session=True,
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
        self._submit(self._write_here, number, messages)

    def _submit(self, fn: Any, *args: Any) -> None:
        with self._lock:
            if self._thread_writer is None:
                self._thread_writer = ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix="mlops-trial-runs"
                )
            self._thread_futures.append(self._thread_writer.submit(fn, *args))

    def _client_here(self) -> Any:
        import mlflow

        if self._client is None:
            self._client = mlflow.MlflowClient()
        return self._client

    def _write_here(self, number: int, messages: dict) -> None:
        self._client_here()
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
class _Pipe:
    """The lines the tuning process sends; ``None`` once it closed the pipe or is gone."""

    def __init__(self, fd: int, parent_pid: int) -> None:
        self.fd, self.parent_pid = fd, parent_pid
        self.buffer = b""
        self.ended = False  # end-of-file, or the parent is gone

    def readline(self) -> bytes | None:
        while True:
            end = self.buffer.find(b"\n")
            if end >= 0:
                line, self.buffer = self.buffer[:end], self.buffer[end + 1 :]
                return line
            if self.ended:
                return None  # a last line without its end: the tuning process died writing it
            ready, _, _ = select.select([self.fd], [], [], _POLL_SECONDS)
            if ready:
                chunk = os.read(self.fd, 1 << 16)
                if chunk:
                    self.buffer += chunk
                else:
                    self.ended = True
            elif os.getppid() != self.parent_pid:
                # adopted by init or a subreaper: the tuning process died, and something it forked
                # keeps the pipe open
                self.ended = True


class _Answers:
    """Answer lines to the tuning process; once it is gone (a broken pipe) they are dropped."""

    def __init__(self, fd: int) -> None:
        self.stream = os.fdopen(fd, "w", buffering=1)
        self.broken = False

    def write(self, answer: dict) -> None:
        if self.broken:
            return
        try:
            self.stream.write(json.dumps(answer) + "\n")
        except (OSError, ValueError):
            self.broken = True


class _Quiet:
    """stderr that outlives its reader: a write to a closed pipe is dropped, not raised."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except (OSError, ValueError):
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except (OSError, ValueError):
            pass

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _decode(line: bytes | None) -> dict[str, Any] | None:
    if not line:
        return None
    try:
        message = json.loads(line)
    except ValueError:
        return None
    return message if isinstance(message, dict) and "op" in message else None


def _serve(parent_pid: int) -> int:
    """Read JSON lines from stdin and make the MLflow calls; answer JSON lines on stdout."""
    # the search stops on these, then closes the pipe (or dies): this process ends the runs
    for name in ("SIGINT", "SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    out = _Answers(os.dup(1))
    os.dup2(2, 1)  # whatever else prints goes to stderr, not into the answers
    sys.stdout = sys.stderr = _Quiet(sys.stderr)
    pipe = _Pipe(sys.stdin.fileno(), parent_pid)
    # while the search gets ready: started early, the process is ready for the first trial
    import mlflow

    init = _decode(pipe.readline())
    while init is not None and init["op"] != "init":  # nothing to write before the parent run
        if init["op"] == "close":
            return 0
        init = _decode(pipe.readline())
    if init is None:
        return 0
    mlflow.set_tracking_uri(init["tracking_uri"])
    client = mlflow.MlflowClient()
    if init.get("experiment_id"):
        end_dead_searches(client, init["experiment_id"])
    opened: dict[int, str] = {}
    failed_open: dict[int, dict] = {}  # retried when the trial finishes
    closed = False
    gone_at: float | None = None  # when the tuning process was found gone

    def gone() -> bool:
        # end-of-file alone is no sign: the search closes the pipe after "close" too
        nonlocal gone_at
        if gone_at is None and (out.broken or os.getppid() != parent_pid):
            gone_at = time.monotonic()
            signal.alarm(CLEANUP_SECONDS)  # whatever hangs, this process does not outlive that
        return gone_at is not None

    while True:
        line = pipe.readline()
        if line is None:
            break
        if gone() and time.monotonic() - (gone_at or 0.0) > DRAIN_SECONDS:
            break  # the store is too slow to write the rest: end the runs instead
        message = _decode(line)
        if message is None:
            continue
        op: str = message["op"]
        number: Any = message.get("trial")
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
                out.write({"trial": number, "run_id": opened[number]})
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
                out.write({"trial": number, "finished": True})
        except Exception as exc:  # noqa: BLE001 - one trial's failed write must not stop the others
            out.write(
                {"trial": number, "op": op, "error": f"{exc.__class__.__name__}: {exc}"[:500]}
            )
    from mlops.tracking import end_runs

    if closed:
        # the search is over: a run opened and never finished (its trial never reported) ends
        end_runs(client, opened.values(), "FAILED")
    else:
        # no "close": the tuning process died; leave no run RUNNING, the parent run included
        if gone_at is None:
            signal.alarm(CLEANUP_SECONDS)
        end_runs(client, [*opened.values(), init["parent_id"]], "FAILED")
    return 0


def main(parent_pid: int | None = None) -> None:
    """The writer process: serve the pipe, then exit at once."""
    code = _serve(os.getppid() if parent_pid is None else parent_pid)
    sys.stderr.flush()
    # every call is committed and every answer written (line-buffered): skip the interpreter's
    # teardown of MLflow's modules, over half a second the search would wait for
    os._exit(code)


if __name__ == "__main__":
    main()
