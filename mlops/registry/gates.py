"""Validation gates for promotions: each check returns a :class:`GateResult` as data.

A gate never raises for a model that fails it: it reports what it measured against what
it required, so a refusal can show every failing gate at once.

Verify, then load: a :class:`Candidate`'s files are checked against the checksum recorded at
registration before anything reads them, and a candidate whose files fail the check is never
loaded (its ``pyfunc`` refuses). Every gate that would read the files of a version that failed
its checksum reports itself as not run; the champion's files are checked before it is scored.

The ``live_comparison`` gate (``registry.production.live_comparison``, off by default) reads no
model file: it reads the prediction log, where a split or shadow server has logged the
challenger's answers beside production's on the same traffic, and refuses a challenger that is
significantly worse than production on the labelled ones (:mod:`mlops.monitoring.compare`).
"""

from __future__ import annotations

import hmac
import logging
import time
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.entities import Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.models import Model
from sqlalchemy.exc import SQLAlchemyError

from mlops import metrics
from mlops.artifacts import CHECKSUM_TAG, checksum_matches, download_model, model_checksum
from mlops.config import Config, Threshold, parse_duration
from mlops.data import DatasetSplit, prepare
from mlops.errors import MlopsError, RegistryError
from mlops.monitoring.compare import compare_versions
from mlops.monitoring.store import LOG_FILE, MonitoringStore
from mlops.tracking import project_store_url, read_run_config

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GateResult:
    """One gate's verdict, with what was measured and what was required."""

    gate: str
    passed: bool
    measured: str
    required: str
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        mark = "PASS" if self.passed else "FAIL"
        text = f"[{mark}] {self.gate}: measured {self.measured}, required {self.required}"
        return text + (f" ({self.detail})" if self.detail else "")


class Candidate:
    """A registered model version, downloaded once for the checks that need its files."""

    def __init__(self, client: mlflow.MlflowClient, version: ModelVersion, workdir: Path) -> None:
        self.client = client
        self.version = version
        self.workdir = workdir

    @property
    def name(self) -> str:
        return f"{self.version.name} v{self.version.version}"

    @cached_property
    def run(self) -> Run | None:
        return self._read_run()

    @cached_property
    def path(self) -> Path:
        return self._download()

    def _read_run(self) -> Run | None:
        return self.client.get_run(self.version.run_id) if self.version.run_id else None

    def _download(self) -> Path:
        dst = self.workdir / f"v{self.version.version}"
        dst.mkdir(parents=True, exist_ok=True)
        return download_model(self.version.name, str(self.version.version), dst)

    @cached_property
    def mlmodel(self) -> Model:
        return Model.load(str(self.path / "MLmodel"))

    @cached_property
    def actual_checksum(self) -> str:
        """The checksum of the downloaded files (the very files any gate goes on to load)."""
        return model_checksum(self.path)

    @property
    def recorded_checksum(self) -> str | None:
        return self.version.tags.get(CHECKSUM_TAG) or None

    @property
    def trusted(self) -> bool:
        """Whether the files match the checksum recorded at registration."""
        recorded = self.recorded_checksum
        return bool(recorded) and (
            hmac.compare_digest(self.actual_checksum, str(recorded))
            or checksum_matches(self.path, str(recorded))  # one recorded before DOWNLOAD_NOTE
        )

    @cached_property
    def pyfunc(self) -> Any:
        if not self.trusted:  # never deserialise files that fail their checksum
            raise RegistryError(
                f"{self.name}: its files do not match the checksum recorded at registration; "
                "refusing to load them"
            )
        return mlflow.pyfunc.load_model(str(self.path))

    @cached_property
    def task(self) -> str:
        recorded = self.version.tags.get("mlops.task")  # set at registration, before any file
        if recorded in ("classification", "regression"):
            return recorded
        if not self.trusted:
            return "classification"
        return (self.mlmodel.metadata or {}).get("mlops_task", "classification")


def prefetch(*candidates: Candidate | None) -> None:
    """Download the candidates' files and read their runs at the same time (through a tracking
    server each is its own round trips); a failure is left to the gate that needs the value,
    which tries again and reports it. Downloading reads nothing: every load still waits for
    the checksum."""
    from concurrent.futures import ThreadPoolExecutor

    todo = [c for c in candidates if c is not None]
    if not todo:
        return
    # plain methods in the pool, the values stored after: Python 3.11's cached_property holds
    # one lock per attribute for every instance, which would make the downloads take turns
    with ThreadPoolExecutor(max_workers=2 * len(todo)) as pool:
        futures = {
            (c, attr): pool.submit(getattr(c, method))
            for c in todo
            for attr, method in (("path", "_download"), ("run", "_read_run"))
        }
    for (candidate, attr), future in futures.items():
        if future.exception() is None:  # a failure: the gate's own access tries again
            candidate.__dict__.setdefault(attr, future.result())


def threshold_gates(candidate: Candidate, thresholds: list[Threshold]) -> list[GateResult]:
    metrics = candidate.run.data.metrics if candidate.run else {}
    out = []
    for t in thresholds:
        op = ">=" if t.higher_is_better else "<="
        value = metrics.get(t.metric)
        if value is None:
            out.append(
                GateResult(
                    f"threshold {t.metric}",
                    False,
                    "not logged",
                    f"{op} {t.threshold:g}",
                    "the training run has no such metric",
                )
            )
            continue
        ok = value >= t.threshold if t.higher_is_better else value <= t.threshold
        out.append(GateResult(f"threshold {t.metric}", ok, f"{value:.4f}", f"{op} {t.threshold:g}"))
    return out


def signature_gate(candidate: Candidate) -> GateResult:
    if not candidate.trusted:
        return not_run("signature and input example", "both present", candidate)
    has_sig = candidate.mlmodel.signature is not None
    has_example = candidate.mlmodel.saved_input_example_info is not None
    measured = (
        f"signature {'present' if has_sig else 'missing'}, "
        f"input example {'present' if has_example else 'missing'}"
    )
    return GateResult(
        "signature and input example", has_sig and has_example, measured, "both present"
    )


def checksum_gate(candidate: Candidate) -> GateResult:
    recorded = candidate.recorded_checksum
    if not recorded:
        return GateResult(
            "artifact checksum",
            False,
            "none recorded",
            "recorded at registration",
            "register versions through mlops (train --register) so the checksum is recorded",
        )
    actual = candidate.actual_checksum
    return GateResult(
        "artifact checksum",
        candidate.trusted,
        actual[:16],
        f"{recorded[:16]} (recorded)",
        "" if candidate.trusted else "the model files changed since registration; refusing them",
    )


def not_run(gate: str, required: str, candidate: Candidate) -> GateResult:
    """The verdict of a gate that would read the files of a candidate that failed its checksum."""
    return GateResult(
        gate,
        False,
        "not run: the artifact checksum failed",
        required,
        f"the files of {candidate.name} are not loaded",
    )


def staging_gates(
    candidate: Candidate, thresholds: list[Threshold], *, smoke: bool = False
) -> list[GateResult]:
    """Into staging: checksum first, logged metrics, signature (and, with ``smoke``, a smoke
    prediction); nothing reads the files unless the checksum passed."""
    gates = [checksum_gate(candidate), *threshold_gates(candidate, thresholds)]
    gates.append(signature_gate(candidate))
    if smoke:
        gates.append(smoke_gate(candidate))
    return gates


def production_gates(
    challenger: Candidate, champion: Candidate | None, config: Config, *, force: bool = False
) -> list[GateResult]:
    """Into production: checksum first, then schema, smoke and champion (each of them not run
    if the challenger's checksum failed; the champion is checked before it is loaded), and,
    with ``registry.production.live_comparison``, the live comparison (no file read)."""
    gates = [
        checksum_gate(challenger),
        schema_gate(challenger, champion, untrusted_champion_ok=force),
        smoke_gate(challenger),
        champion_gate(challenger, champion, config, untrusted_champion_ok=force),
    ]
    if config.registry.production.live_comparison:
        gates.append(live_comparison_gate(challenger, champion, config))
    return gates


def rollback_gates(candidate: Candidate, live: Candidate) -> list[GateResult]:
    """Back to the version production replaced (or a forced rollback): checksum, schema."""
    return [checksum_gate(candidate), schema_gate(candidate, live, untrusted_champion_ok=True)]


def _untrusted_champion(gate: str, champion: Candidate, ok: bool, required: str) -> GateResult:
    return GateResult(
        gate,
        ok,
        f"{champion.name} fails its artifact checksum: not loaded, not compared",
        required + ("" if ok else " (or --force with a reason to replace it)"),
        "its files changed since registration",
    )


def schema_gate(
    challenger: Candidate, champion: Candidate | None, *, untrusted_champion_ok: bool = False
) -> GateResult:
    """No required input column of the champion removed or retyped.

    ``untrusted_champion_ok``: a champion whose files fail their checksum is not read; the gate
    then passes (leaving such a version is the point of a rollback) or fails (a promotion, unless
    forced)."""
    if not challenger.trusted:
        return not_run("input schema compatible", "compatible with the champion", challenger)
    if champion is None:
        return GateResult(
            "input schema compatible", True, "no champion", "compatible with the champion"
        )
    if not champion.trusted:
        return _untrusted_champion(
            "input schema compatible",
            champion,
            untrusted_champion_ok,
            "a champion whose files match their checksum",
        )
    new = challenger.mlmodel.get_input_schema()
    old = champion.mlmodel.get_input_schema()
    if new is None or old is None:
        return GateResult(
            "input schema compatible", False, "schema missing", "both versions have a signature"
        )
    new_cols = {c.name: c for c in new.inputs}
    problems = []
    for col in old.inputs:
        if not col.required:
            continue
        if col.name not in new_cols:
            problems.append(f"'{col.name}' removed")
        elif str(new_cols[col.name].type) != str(col.type):
            problems.append(f"'{col.name}' retyped {col.type} -> {new_cols[col.name].type}")
    measured = "; ".join(problems) if problems else "all champion columns kept with their types"
    return GateResult(
        "input schema compatible",
        not problems,
        measured,
        f"no required column of {champion.name} removed or retyped",
    )


def smoke_gate(candidate: Candidate) -> GateResult:
    if not candidate.trusted:
        return not_run("smoke prediction", "predicts on its input example", candidate)
    try:
        example = candidate.mlmodel.load_input_example(str(candidate.path))
        if example is None:  # logged without an input example: nothing to predict on
            return GateResult(
                "smoke prediction",
                False,
                "no input example saved with the model",
                "predicts on its input example",
            )
        out = candidate.pyfunc.predict(pd.DataFrame(example))
        ok = len(out) == len(example) and "prediction" in out.columns
        return GateResult(
            "smoke prediction",
            ok,
            f"{len(out)} rows for {len(example)} inputs",
            "one prediction per input example row",
        )
    except Exception as exc:  # noqa: BLE001 - the verdict is the point
        return GateResult(
            "smoke prediction",
            False,
            f"error: {str(exc).splitlines()[0][:200]}",
            "predicts on its input example",
        )


def held_out_split(candidate: Candidate) -> DatasetSplit:
    """Re-create the held-out test split the candidate was trained with, from its run's
    config.yaml."""
    if candidate.run is None:
        raise RegistryError(f"{candidate.name} has no training run to read its data settings from")
    run = candidate.run
    config = read_run_config(run.info.run_id, run.data.tags, run.info.artifact_uri)
    return prepare(config)


def score(candidate: Candidate, split: DatasetSplit, part: str = "test") -> dict[str, float]:
    """The candidate's metrics on ``part`` of ``split``, through its served predictions."""
    X, y = split.xy(part)
    out = candidate.pyfunc.predict(X)
    if split.task == "classification":
        return metrics.classification(
            y.astype(str).to_numpy(),
            out["prediction"].astype(str).to_numpy(),
            list(split.classes or ()),
        )
    return metrics.regression(y.to_numpy(dtype=float), out["prediction"].to_numpy(dtype=float))


def champion_gate(
    challenger: Candidate,
    champion: Candidate | None,
    config: Config,
    *,
    untrusted_champion_ok: bool = False,
) -> GateResult:
    if not challenger.trusted:
        return not_run("beats champion", "re-evaluation on the test split", challenger)
    if champion is not None and not champion.trusted:
        return _untrusted_champion(
            "beats champion",
            champion,
            untrusted_champion_ok,
            "a champion whose files match their checksum",
        )
    gates = config.registry.production
    task = challenger.task
    metric = gates.metric_classification if task == "classification" else gates.metric_regression
    higher = metrics.higher_is_better(metric)
    try:
        split = held_out_split(challenger)
    except Exception as exc:  # noqa: BLE001
        return GateResult(
            "beats champion",
            False,
            f"test split unavailable: {exc}",
            "re-evaluation on the test split",
        )
    recorded = challenger.run.data.tags.get("mlops.data_hash") if challenger.run else None
    if recorded and recorded != split.content_hash:
        return GateResult(
            "beats champion",
            False,
            f"data hash {split.content_hash[:12]}",
            f"{recorded[:12]} (the data it was trained on)",
            "the dataset changed since training",
        )
    n_rows = len(split.test)
    mine = score(challenger, split)[metric]
    if champion is None:
        return GateResult("beats champion", True, f"{metric} {mine:.4f}", "no champion yet")
    try:
        theirs = score(champion, split)[metric]
    except Exception as exc:  # noqa: BLE001 - e.g. the champion needs a column this data lacks
        return GateResult(
            "beats champion",
            False,
            f"{champion.name} cannot score this test split: {str(exc).splitlines()[0][:200]}",
            "both versions scored on the same rows",
        )
    delta = (mine - theirs) if higher else (theirs - mine)
    ok = delta >= gates.margin or (gates.tolerance is not None and delta >= -gates.tolerance)
    required = f"improvement >= {gates.margin:g}" + (
        f" or loss <= {gates.tolerance:g}" if gates.tolerance is not None else ""
    )
    return GateResult(
        "beats champion",
        ok,
        f"{metric} {mine:.4f} vs {theirs:.4f} ({champion.name}), improvement {delta:+.4f}",
        required,
        f"on {n_rows} held-out test rows",
    )


LIVE_GATE = "live comparison"


def live_comparison_gate(
    challenger: Candidate,
    champion: Candidate | None,
    config: Config,
    *,
    now: float | None = None,
) -> GateResult:
    """The challenger is not significantly worse than the champion on live labelled traffic.

    Its rows are the prediction log's rows of its version in the last
    ``registry.production.live_window`` (as a split's arm or a shadow); the champion's are its
    answered rows in the same window. Accuracy (two-proportion z-test) or squared errors
    (Welch's t-test), one-sided at ``live_alpha``; fewer than ``monitoring.compare_min_labels``
    labelled predictions of either version and the gate refuses: it cannot tell.
    """
    gates = config.registry.production
    min_labels = config.monitoring.compare_min_labels
    window_s = parse_duration(gates.live_window, "registry.production.live_window")
    required = (
        f"not significantly worse than production on live labelled traffic of the last "
        f"{gates.live_window} (one-sided p >= {gates.live_alpha:g}, at least {min_labels} "
        "labelled predictions of each version)"
    )
    if champion is None:
        return GateResult(LIVE_GATE, True, "no production version to compare with", required)
    mine, theirs = str(challenger.version.version), str(champion.version.version)
    at = time.time() if now is None else float(now)
    try:
        store = MonitoringStore(project_store_url(config.monitoring.log_url, LOG_FILE))
        comparison = compare_versions(
            store,
            challenger.version.name,
            challenger.task,
            version_a=theirs,
            version_b=mine,
            since=at - window_s,
            until=at,
            min_labels=min_labels,
            name_a=f"v{theirs}",
            name_b=f"v{mine}",
        )
    except (MlopsError, SQLAlchemyError) as exc:
        return GateResult(
            LIVE_GATE,
            False,
            f"prediction log unreadable: {str(exc).splitlines()[0][:200]}",
            required,
            "set monitoring.log_url to the log the servers write",
        )
    labelled_b = int(comparison.b.metrics["labelled"])
    labelled_a = int(comparison.a.metrics["labelled"])
    d = comparison.difference
    if d is None:
        served = int(comparison.b.metrics["requests"])
        return GateResult(
            LIVE_GATE,
            False,
            f"{labelled_b} labelled predictions of v{mine} ({served} requests) and "
            f"{labelled_a} of v{theirs} (production) in the last {gates.live_window}",
            required,
            "too few labels to decide: "
            + (
                f"v{mine} has no predictions in the prediction log: serve it beside production "
                "(mlops serve --split or --shadow, with the prediction log on) and feed labels "
                "with mlops feedback"
                if not served
                else "feed labels with mlops feedback, or wait for more traffic"
            ),
        )
    if d.metric == "accuracy":
        measured = (
            f"accuracy {d.b:.4f} (v{mine}, {d.n_b} labelled) vs {d.a:.4f} (v{theirs}, "
            f"{d.n_a} labelled), difference {d.diff:+.4f} "
            f"(95% CI {d.ci_low:+.4f} to {d.ci_high:+.4f}), one-sided p = {d.p_worse:.3g}"
        )
    else:
        measured = (
            f"RMSE {d.b**0.5:.4g} (v{mine}, {d.n_b} labelled) vs {d.a**0.5:.4g} (v{theirs}, "
            f"{d.n_a} labelled), MSE difference {d.diff:+.4g} "
            f"(95% CI {d.ci_low:+.4g} to {d.ci_high:+.4g}), one-sided p = {d.p_worse:.3g}"
        )
    passed = d.p_worse >= gates.live_alpha
    return GateResult(
        LIVE_GATE,
        passed,
        measured,
        required,
        f"{d.test} on the last {gates.live_window}"
        + ("" if passed else f": v{mine} is significantly worse than v{theirs}"),
    )
