"""Validation gates for promotions: each check returns a :class:`GateResult` as data.

A gate never raises for a model that fails it: it reports what it measured against what
it required, so a refusal can show every failing gate at once.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.entities import Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.models import Model

from mlops import metrics
from mlops.config import CONFIG_ARTIFACT, Config, Threshold, read_resolved_config
from mlops.data import DatasetSplit, prepare
from mlops.errors import RegistryError

logger = logging.getLogger(__name__)

CHECKSUM_TAG = "mlops.checksum"


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
        return self.client.get_run(self.version.run_id) if self.version.run_id else None

    @cached_property
    def path(self) -> Path:
        dst = self.workdir / f"v{self.version.version}"
        dst.mkdir(parents=True, exist_ok=True)
        uri = f"models:/{self.version.name}/{self.version.version}"
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))

    @cached_property
    def mlmodel(self) -> Model:
        return Model.load(str(self.path / "MLmodel"))

    @cached_property
    def pyfunc(self) -> Any:
        return mlflow.pyfunc.load_model(str(self.path))

    @cached_property
    def task(self) -> str:
        return (self.mlmodel.metadata or {}).get("mlops_task", "classification")


def model_checksum(path: Path) -> str:
    """SHA-256 over every file of a model directory: relative paths and contents."""
    digest = hashlib.sha256()
    for file in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with open(file, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()


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
    recorded = candidate.version.tags.get(CHECKSUM_TAG)
    if not recorded:
        return GateResult(
            "artifact checksum",
            False,
            "none recorded",
            "recorded at registration",
            "register versions through mlops (train --register) so the checksum is recorded",
        )
    actual = model_checksum(candidate.path)
    return GateResult(
        "artifact checksum",
        actual == recorded,
        actual[:16],
        f"{recorded[:16]} (recorded)",
        "" if actual == recorded else "the model files changed since registration; refusing them",
    )


def schema_gate(challenger: Candidate, champion: Candidate | None) -> GateResult:
    if champion is None:
        return GateResult(
            "input schema compatible", True, "no champion", "compatible with the champion"
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
    with tempfile.TemporaryDirectory() as tmp:
        path = mlflow.artifacts.download_artifacts(
            run_id=candidate.run.info.run_id, artifact_path=CONFIG_ARTIFACT, dst_path=tmp
        )
        config = read_resolved_config(path)
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


def champion_gate(challenger: Candidate, champion: Candidate | None, config: Config) -> GateResult:
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
