"""``score``: a registered version scores a table, as one MLflow run.

The version (given, or resolved from an alias) is downloaded, its files verified against the
checksum recorded at registration, and only then loaded, from that local folder, by either
engine. The run ``score-<name>-v<version>`` records what was scored (name, version, engine,
input with credentials stripped) and how it went (rows scored and rejected, seconds, rows per
second); its id is written into every output row as ``scoring_run_id``.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
from mlflow.exceptions import MlflowException

from mlops.errors import RegistryError
from mlops.scoring.model import ScoringFailed, load_wrapper
from mlops.scoring.sinks import (
    Sink,
    check_destination,
    output_format,
    rejects_path,
)
from mlops.scoring.sources import CSV, ScoringInputError, resolve_inputs

if TYPE_CHECKING:
    from mlops.config import Config

logger = logging.getLogger(__name__)
ENGINES = ("pandas", "spark")


@dataclass(frozen=True)
class ScoringResult:
    """What one scoring job did."""

    name: str
    version: str
    engine: str
    run_id: str
    rows_scored: int
    rows_rejected: int
    seconds: float
    output: str
    rejects: str

    @property
    def rows_per_second(self) -> float:
        return (self.rows_scored + self.rows_rejected) / max(self.seconds, 1e-9)


def resolve_version(name: str, *, alias: str | None, version: str | None) -> str:
    """``version`` (canonical) or the version ``alias`` points to (default ``production``)."""
    from mlops.registry import canonical_version

    if version is not None:
        return canonical_version(version)
    alias = alias or "production"
    try:
        return str(mlflow.MlflowClient().get_model_version_by_alias(name, alias).version)
    except MlflowException as exc:
        raise RegistryError(
            f"model {name!r} has no alias {alias!r} in {mlflow.get_registry_uri()} "
            f"({exc.error_code}); promote a version to it (`mlops promote {name} --version N "
            f"--to {alias}`) or pass --version N"
        ) from None


def score(
    config: Config,
    name: str,
    *,
    input_uri: str,
    output_uri: str,
    alias: str | None = None,
    version: str | None = None,
    engine: str | None = None,
    rejects_uri: str | None = None,
    spark_master: str | None = None,
    chunk_rows: int | None = None,
    overwrite: bool = False,
) -> ScoringResult:
    """Score every row of ``input_uri`` with registered ``name`` (``alias`` or ``version``).

    Rows the model's input contract refuses go to ``rejects_uri`` (CSV, default
    ``<output>-rejects.csv``) with a ``reason``; the job fails only for a problem that is not
    a row's: a missing input or column, an unknown format or alias, a model failure.

    Example:
        >>> score(load_config(), "churn-model", alias="production",
        ...       input_uri="s3://data/2026-12/*.parquet", output_uri="scores.parquet")
    """
    engine = engine or config.scoring.engine
    if engine not in ENGINES:
        raise ScoringInputError(f"--engine {engine!r}: choose one of {list(ENGINES)}")
    chunk_rows = chunk_rows or config.scoring.chunk_rows
    sources = resolve_inputs(input_uri)
    out_format = output_format(output_uri) if engine == "pandas" else "parquet"
    rejects_uri = rejects_uri or rejects_path(output_uri)
    if output_format(rejects_uri, "--rejects") != CSV:
        raise ScoringInputError(
            f"--rejects {rejects_uri!r}: rejected rows are written as CSV; end the name in .csv"
        )
    check_destination(output_uri, overwrite=overwrite)
    check_destination(rejects_uri, overwrite=overwrite, option="--rejects")
    version = resolve_version(name, alias=alias, version=version)
    with tempfile.TemporaryDirectory(prefix="mlops-score-") as tmp:
        model_dir = _verified_model(name, version, Path(tmp) / "model")
        model_config = {"model_name": name, "model_version": version, "max_rows": chunk_rows}
        from mlops.tracking import step_run

        with step_run(config, run_name=f"score-{name}-v{version}") as run:
            run_id = run.info.run_id
            mlflow.log_params(
                {
                    "model_name": name,
                    "model_version": version,
                    "engine": engine,
                    "input": _shown(input_uri),
                    "input_files": len(sources),
                    "output": _shown(output_uri),
                    "chunk_rows": chunk_rows,
                }
            )
            started = time.perf_counter()
            try:
                if engine == "pandas":
                    counts = _run_pandas(
                        model_dir,
                        model_config,
                        sources,
                        output_uri,
                        out_format,
                        rejects_uri,
                        chunk_rows=chunk_rows,
                        run_id=run_id,
                    )
                else:
                    counts = _run_spark(
                        config,
                        model_dir,
                        model_config,
                        sources,
                        output_uri,
                        rejects_uri,
                        spark_master=spark_master,
                        chunk_rows=chunk_rows,
                        run_id=run_id,
                        overwrite=overwrite,
                    )
            except MlflowException as exc:
                raise ScoringFailed(
                    f"{name} version {version} failed to score ({exc.message[:300]}); check "
                    "that this environment has the model's libraries, or score with the other "
                    "--engine"
                ) from exc
            seconds = time.perf_counter() - started
            result = ScoringResult(
                name,
                version,
                engine,
                run_id,
                counts.scored,
                counts.rejected,
                seconds,
                output_uri,
                rejects_uri,
            )
            mlflow.log_metrics(
                {
                    "rows_scored": counts.scored,
                    "rows_rejected": counts.rejected,
                    "seconds": seconds,
                    "rows_per_second": result.rows_per_second,
                }
            )
    return result


def _shown(uri: str) -> str:
    """A URI as it may be logged: credentials stripped."""
    from mlops.config import strip_secrets

    return strip_secrets(uri) if "://" in uri else uri


def _verified_model(name: str, version: str, dst: Path) -> Path:
    """Download ``name`` version ``version`` and verify it; nothing of it is read before."""
    from mlops.artifacts import download_model, verify_registered

    try:
        path = download_model(name, version, dst)
    except MlflowException as exc:
        raise RegistryError(
            f"{name} version {version} cannot be downloaded ({exc.message[:200]}); check the "
            "name and version (`mlops status NAME`) and the artifact store's credentials"
        ) from None
    verify_registered(name, version, path)
    return path


def _run_pandas(
    model_dir: Path,
    model_config: dict[str, Any],
    sources: list[Any],
    output_uri: str,
    out_format: str,
    rejects_uri: str,
    *,
    chunk_rows: int,
    run_id: str,
) -> Any:
    from mlops.scoring.pandas_engine import score_pandas

    wrapper = load_wrapper(model_dir, model_config)
    output, rejects = Sink(output_uri, out_format), Sink(rejects_uri, CSV)
    try:
        counts = score_pandas(
            wrapper, sources, output, rejects, chunk_rows=chunk_rows, run_id=run_id
        )
    except BaseException:
        output.discard()
        rejects.discard()
        raise
    output.commit()
    if counts.rejected:
        rejects.commit()
    else:
        rejects.discard()
    return counts


def _run_spark(
    config: Config,
    model_dir: Path,
    model_config: dict[str, Any],
    sources: list[Any],
    output_uri: str,
    rejects_uri: str,
    *,
    spark_master: str | None,
    chunk_rows: int,
    run_id: str,
    overwrite: bool,
) -> Any:
    from mlops.scoring.spark_engine import BATCH_ROWS, score_spark, spark_session

    batch = min(BATCH_ROWS, chunk_rows)
    master = spark_master or config.scoring.spark_master
    with spark_session(master, config.scoring.spark_driver_memory, batch) as spark:
        configured = spark.conf.get("spark.sql.execution.arrow.maxRecordsPerBatch", str(batch))
        model_config = {**model_config, "max_rows": max(chunk_rows, int(configured))}
        wrapper = load_wrapper(model_dir, model_config)
        return score_spark(
            spark,
            wrapper,
            model_dir,
            sources,
            output_uri,
            rejects_uri,
            model_config=model_config,
            run_id=run_id,
            overwrite=overwrite,
        )
