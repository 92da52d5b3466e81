"""Re-run a training run from its own record: its resolved config, its data and its code.

The public entry point is :func:`reproduce`. A training run logs its resolved ``config.yaml``,
its three splits (Parquet within ``data.log_data_max_mb``, else their source and digest) and the
git commit of the code that ran it. Reproducing trains again on exactly that data with that
config and compares every evaluation metric with the original's:

- the code has not changed since the run (or the run records no commit, or git is not there to
  check out another one: a warning, and it goes on): the training runs here, in this process;
- the code has changed: the run's commit is checked out in a temporary ``git worktree`` and the
  training runs there, in a child process with that commit's ``mlops`` (the data is re-read
  from the logged source, which must still have the logged digest).

scikit-learn families seeded alike give identical metrics; Keras is held to a tolerance
(:data:`KERAS_TOLERANCE`), since TensorFlow's CPU kernels may sum in another order.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException

from mlops.config import CONFIG_ARTIFACT, Config, read_resolved_config
from mlops.errors import ReproductionError
from mlops.tracking import (
    CODE_HASH_TAG,
    GIT_COMMIT_TAG,
    GIT_DIRTY_TAG,
    STEP_TAG,
    code_hash,
    git_commit,
    verified_config_file,
)

logger = logging.getLogger(__name__)

REPRODUCES_TAG = "mlops.reproduces"  # on the new run: the id of the run it reproduces
_COMMIT = re.compile(r"[0-9a-f]{7,40}")
KERAS_TOLERANCE = 0.01  # the largest absolute metric difference accepted for keras_mlp
_PACKAGE_DIR = Path(__file__).resolve().parent
# run by the child process in a worktree at the run's commit: that commit's own train()
_CHILD = """
import json, sys
sys.path.insert(0, sys.argv[2])  # that commit's mlops before any other on the path
from mlops.config import read_resolved_config
from mlops.training import train
result = train(read_resolved_config(sys.argv[1]))
print("MLOPS-REPRODUCED " + json.dumps({"run_id": result.run_id, "metrics": result.metrics}))
"""


@dataclass(frozen=True)
class MetricComparison:
    name: str
    original: float
    reproduced: float | None  # None: the new run has no such metric

    @property
    def difference(self) -> float | None:
        if self.reproduced is None:
            return None
        if math.isnan(self.original) and math.isnan(self.reproduced):
            return 0.0  # undefined both times (e.g. R² of one row): the same outcome
        return abs(self.reproduced - self.original)


@dataclass(frozen=True)
class Reproduction:
    """What :func:`reproduce` did and how the metrics compare."""

    original_run_id: str
    run_id: str
    family: str
    commit: str | None  # the run's recorded commit
    checked_out: bool  # True: trained at that commit in a worktree; False: with the code here
    tolerance: float
    metrics: list[MetricComparison] = field(default_factory=list)
    data_hash: tuple[str | None, str | None] = (None, None)  # the original's, the new run's

    @property
    def same_data(self) -> bool:
        return self.data_hash[0] == self.data_hash[1]

    @property
    def matches(self) -> bool:
        return self.same_data and all(
            m.difference is not None and m.difference <= self.tolerance for m in self.metrics
        )


def reproduce(
    run_id: str, *, checkout: bool = True, tolerance: float | None = None
) -> Reproduction:
    """Train again from run ``run_id``'s record and compare its metrics.

    ``checkout=False`` always uses the code here, even when it changed since the run.
    ``tolerance`` (absolute) defaults to 0 for scikit-learn families and
    :data:`KERAS_TOLERANCE` for Keras.

    Example:
        >>> outcome = reproduce("3f2a...")
        >>> outcome.matches
    """
    client = mlflow.MlflowClient()
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        raise ReproductionError(f"run {run_id!r}: {exc.message}") from None
    step = run.data.tags.get(STEP_TAG)
    if step != "train":
        raise ReproductionError(
            f"run {run_id} is a {step or 'non-mlops'} run; reproduce a training run (its "
            f"'{STEP_TAG}' tag is 'train')"
        )
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = str(verified_config_file(run_id, tmp, run.data.tags, run.info.artifact_uri))
        except (MlflowException, OSError):
            raise ReproductionError(
                f"run {run_id} has no {CONFIG_ARTIFACT} artifact; it was not logged by "
                "mlops train and cannot be reproduced from its record"
            ) from None
        config = read_resolved_config(local)
        commit = run.data.tags.get(GIT_COMMIT_TAG)
        tol = tolerance if tolerance is not None else _default_tolerance(config)
        changed = checkout and _code_changed(run.data.tags)
        if changed:
            new_run_id, metrics = _train_at_commit(str(commit), local)
        else:
            new_run_id, metrics = _train_here(run_id, config)
    client.set_tag(new_run_id, REPRODUCES_TAG, run_id)
    hashes = (
        run.data.params.get("data_hash"),
        client.get_run(new_run_id).data.params.get("data_hash"),
    )
    original = {k: v for k, v in run.data.metrics.items() if k.startswith(("validation_", "test_"))}
    compared = [
        MetricComparison(name, value, metrics.get(name)) for name, value in sorted(original.items())
    ]
    return Reproduction(
        original_run_id=run_id,
        run_id=new_run_id,
        family=config.model.family,
        commit=commit,
        checked_out=changed,
        tolerance=tol,
        metrics=compared,
        data_hash=hashes,
    )


def _default_tolerance(config: Config) -> float:
    return KERAS_TOLERANCE if config.model.family == "keras_mlp" else 0.0


def _train_here(run_id: str, config: Config) -> tuple[str, dict[str, float]]:
    from mlops.lineage import load_logged_split
    from mlops.training import train

    split = load_logged_split(run_id)
    result = train(config, split)
    return result.run_id, result.metrics


def _code_changed(tags: dict[str, str]) -> bool:
    """Whether to train at the run's commit: the code here is not the run's, and the commit is.

    The run's code hash (or, for a run without one, git) tells whether the code changed. A run
    that had uncommitted changes has no commit holding its code, and a run without a commit, a
    checkout without git or without that commit cannot check it out: a warning, and the code
    here."""
    commit = tags.get(GIT_COMMIT_TAG)
    if commit is not None and not _COMMIT.fullmatch(commit):
        # a tag is anyone's to write: what reaches git is a commit id, never an option
        logger.warning(
            "the run's %s tag %r is not a git commit id: reproducing with the code here",
            GIT_COMMIT_TAG,
            commit[:60],
        )
        return False
    recorded = tags.get(CODE_HASH_TAG)
    if recorded is not None and recorded == code_hash():
        return False
    if tags.get(GIT_DIRTY_TAG) == "true":
        logger.warning(
            "the run's code had uncommitted changes to commit %s, which no record holds: "
            "reproducing with the code here, which differs from it",
            (commit or "?")[:12],
        )
        return False
    if recorded is None:
        return _code_changed_since(commit)
    if not commit:
        logger.warning(
            "the code changed since the run, which records no git commit: reproducing with "
            "the code here"
        )
        return False
    if _git("cat-file", "-e", f"{commit}^{{commit}}").returncode != 0:
        logger.warning(
            "the code changed since the run, whose commit %s is not in this checkout: "
            "reproducing with the code here",
            commit[:12],
        )
        return False
    return True


def _code_changed_since(commit: str | None) -> bool:
    """For a run without a code hash: whether the package differs from ``commit`` (uncommitted
    changes included). No commit, no git, or a commit this checkout lacks: the code here."""
    if not commit:
        logger.warning("the run records no git commit: reproducing with the code here")
        return False
    here = git_commit()
    if here is None:
        logger.warning(
            "the code here is not a git checkout: reproducing with it, not with the run's "
            "commit %s",
            commit[:12],
        )
        return False
    out = _git("diff", "--quiet", commit, "--", str(_PACKAGE_DIR))
    if out.returncode == 0:
        return False
    if out.returncode != 1:
        logger.warning(
            "commit %s of the run is not in this checkout (%s): reproducing with the code here",
            commit[:12],
            (out.stderr.strip().splitlines() or ["git diff failed"])[0],
        )
        return False
    logger.info("the code changed since commit %s: training at that commit", commit[:12])
    return True


def _train_at_commit(commit: str, config_path: str) -> tuple[str, dict[str, float]]:
    """Check ``commit`` out into a temporary worktree and train there in a child process."""
    top = _git("rev-parse", "--show-toplevel")
    if top.returncode != 0:
        raise ReproductionError(f"cannot find the git checkout: {top.stderr.strip()}")
    with tempfile.TemporaryDirectory(prefix="mlops-reproduce-") as tmp:
        tree = Path(tmp) / "tree"
        added = _git("worktree", "add", "--detach", str(tree), commit, cwd=top.stdout.strip())
        if added.returncode != 0:
            raise ReproductionError(
                f"cannot check out commit {commit[:12]} of the run: {added.stderr.strip()}; "
                "reproduce with the code here (--no-checkout)"
            )
        try:
            env = {k: v for k, v in os.environ.items() if k != "MLFLOW_RUN_ID"}
            # run from here, so a relative data path means what it meant
            child = subprocess.run(
                [sys.executable, "-c", _CHILD, config_path, str(tree)],
                env=env,
                capture_output=True,
                text=True,
                check=False,
            )
        finally:
            _git("worktree", "remove", "--force", str(tree), cwd=top.stdout.strip())
    for line in reversed(child.stdout.splitlines()):
        if line.startswith("MLOPS-REPRODUCED "):
            record = json.loads(line.split(" ", 1)[1])
            return record["run_id"], {k: float(v) for k, v in record["metrics"].items()}
    last = (child.stderr.strip().splitlines() or ["no output"])[-1]
    raise ReproductionError(f"training at commit {commit[:12]} failed: {last}")


def _git(*args: str, cwd: str | Path | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            ["git", *args],
            cwd=cwd or _PACKAGE_DIR,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return subprocess.CompletedProcess(["git", *args], 128, "", str(exc))


def describe(outcome: Reproduction) -> list[str]:
    """The comparison as lines for a terminal: each metric beside the original."""
    where = (
        f"at the run's commit {outcome.commit[:12]}"
        if outcome.checked_out and outcome.commit
        else "with the code here"
    )
    lines = [
        f"reproduced run {outcome.original_run_id} as run {outcome.run_id} ({outcome.family}, "
        f"{where}; tolerance {outcome.tolerance:g})",
    ]
    original, new = outcome.data_hash
    if outcome.same_data:
        lines.append(f"data: the same ({(original or '?')[:12]})")
    else:
        lines.append(
            f"data: DIFFERS: the run saw {(original or '?')[:12]}, this one "
            f"{(new or '?')[:12]} (the source changed since the run)"
        )
    lines.append(f"{'metric':<28} {'original':>12} {'reproduced':>12} {'difference':>12}")
    for m in outcome.metrics:
        diff = m.difference
        mark = "ok" if diff is not None and diff <= outcome.tolerance else "DIFFERS"
        lines.append(
            f"{m.name:<28} {_fmt(m.original):>12} {_fmt(m.reproduced):>12} {_fmt(diff):>12}  {mark}"
        )
    return lines


def _fmt(value: float | None) -> str:
    if value is None:
        return "missing"
    return "nan" if math.isnan(value) else f"{value:.6g}"
