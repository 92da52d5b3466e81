"""The ``spark`` engine: the same verified model, in Spark's Python workers, on Arrow batches.

Spark reads the input (Parquet, or CSV as text) and holds every row to the model's input
contract. Where the input's types allow (Parquet with the model's numeric columns as integers or
floats and its categorical ones as strings), Spark itself sets aside the rows the contract may
refuse (a null where training had none, an infinity, an over-long text: :func:`_doubt`), and
only those go through the contract in Python (:mod:`mlops.scoring.rows`, the same code as the
pandas engine), which gives each its reason; every other row goes through Python once, to the
model. Otherwise a ``mapInPandas`` step checks every row and the checked table is persisted
(memory, then disk) so the input is read and checked once. Accepted rows are scored by
``mapInArrow`` with the pandas engine's own code (:func:`_scorer`: the model folder loaded
through ``mlflow.pyfunc`` once per Python worker, checksum checked; the answer built in Arrow),
not by ``mlflow.pyfunc.spark_udf``: through ``spark_udf`` even a model that does nothing
reached only 1.35-1.38x the stock model's rows/s (``benchmarks/batch.py --spark-floor``), its
pandas round trip and schema enforcement per batch. The model's name and version and the
scoring run are literals in Spark; the output is written as Parquet partitions; refused rows
are written as CSV with their ``reason``.

Locally Spark runs as ``local[2]``; ``--spark-master`` names any cluster (whose executors need
this package and its model's libraries; the model folder is shipped to them by Spark).
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mlops.errors import MlopsError
from mlops.scoring.pandas_engine import Counts, rejecting_rules
from mlops.scoring.rows import (
    REASON_COLUMN,
    RUN_ID_COLUMN,
    check_columns,
    from_text,
    split_by_rules,
    split_rows,
)
from mlops.scoring.sinks import answer_fields
from mlops.scoring.sources import CSV, Source
from mlops.serving.wrapper import NAME_COLUMN, VERSION_COLUMN

BATCH_ROWS = 50_000  # rows per Arrow batch handed to Python (check and model) in a new session


class SparkUnavailable(MlopsError, RuntimeError):
    """Spark could not start (no Java, a master that cannot be reached)."""


@contextmanager
def spark_session(master: str, driver_memory: str, batch_rows: int) -> Iterator[Any]:
    """The active Spark session (a notebook's), or a new quiet one stopped at the end."""
    try:
        from pyspark.sql import SparkSession
    except ImportError:
        raise SparkUnavailable(
            "pyspark is not installed; pip install pyspark (or use --engine pandas)"
        ) from None
    active = SparkSession.getActiveSession()
    if active is not None:
        yield active
        return
    # the Python workers run this interpreter, where mlops and the model's libraries are
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    builder = SparkSession.builder
    endpoint = os.environ.get("MLFLOW_S3_ENDPOINT_URL")
    if endpoint:  # s3:// inputs are read as s3a:// (the cluster needs hadoop-aws for them)
        builder = builder.config("spark.hadoop.fs.s3a.endpoint", endpoint).config(
            "spark.hadoop.fs.s3a.path.style.access", "true"
        )
    try:
        spark = (
            builder.master(master)
            .appName("mlops-score")
            .config("spark.driver.memory", driver_memory)
            .config("spark.ui.enabled", "false")
            .config("spark.ui.showConsoleProgress", "false")
            .config("spark.sql.shuffle.partitions", "8")
            .config("spark.sql.execution.arrow.maxRecordsPerBatch", str(batch_rows))
            .getOrCreate()
        )
    except Exception as exc:  # noqa: BLE001 - Java missing, master unreachable: one line
        raise SparkUnavailable(
            f"Spark could not start on {master!r} ({type(exc).__name__}: {str(exc)[:160]}); "
            "install Java 17 (or set JAVA_HOME), check --spark-master, or use --engine pandas"
        ) from None
    spark.sparkContext.setLogLevel("ERROR")
    try:
        yield spark
    finally:
        spark.stop()


def _spark_path(uri: str) -> str:
    return "s3a://" + uri[len("s3://") :] if uri.startswith("s3://") else uri


def _contract_spec(contract: Any) -> dict[str, Any]:
    """What rebuilds the contract in a Python worker (plain lists and numbers)."""
    nullable = [
        c for c, req in zip(contract.numeric, contract.required_numeric, strict=True) if not req
    ]
    nullable += [
        c
        for c, req in zip(contract.categorical, contract.required_categorical, strict=True)
        if not req
    ]
    return {
        "numeric": list(contract.numeric),
        "categorical": list(contract.categorical),
        "nullable": nullable,
        "max_rows": contract.max_rows,
        "coerce_numbers": contract.coerce_numbers,
    }


def _checker(spec: dict[str, Any], text: bool) -> Any:
    """The ``mapInPandas`` function: each batch with a ``reason`` (None where accepted)."""

    def check(batches: Iterator[Any]) -> Iterator[Any]:
        from mlops.rules import RowRules
        from mlops.serving.inputs import InputContract

        contract = InputContract(
            spec["numeric"],
            spec["categorical"],
            nullable=spec["nullable"],
            max_rows=spec["max_rows"],
            coerce_numbers=spec["coerce_numbers"],
        )
        rules = RowRules.build(spec.get("rules"), spec["numeric"], spec["categorical"])
        for frame in batches:
            frame = frame.reset_index(drop=True)
            checked = split_by_rules(
                rules, split_rows(contract, from_text(contract, frame) if text else frame)
            )
            reasons = checked.reasons
            frame[REASON_COLUMN] = [reasons.get(i) for i in range(len(frame))] if reasons else None
            yield frame

    return check


_DOUBT = "__mlops_doubt__"


def _doubt(contract: Any, schema: Any) -> Any:
    """A Spark SQL condition true for every row the contract may refuse, or None where the
    input's types leave that to Python (text, booleans, decimals, dates: the contract's own
    judgement).

    With the model's numeric columns typed as integers or floats and its categorical ones as
    strings, the contract refuses a row only for a null (or NaN) where training had none, an
    infinity, or a text longer than ``MAX_FIELD_CHARS``. Rows without any of these are scored
    straight away, so the rows pass through Python once (the scorer) instead of twice; the
    doubtful ones, few in any real table, are checked by the contract itself, which gives their
    reasons (and scores any it accepts after all).
    """
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    from mlops.serving.inputs import MAX_FIELD_CHARS

    kinds = {field.name: field.dataType for field in schema.fields}
    integers = (T.ByteType, T.ShortType, T.IntegerType, T.LongType)
    condition = F.lit(False)
    for col, required in zip(contract.numeric, contract.required_numeric, strict=True):
        kind, c = kinds[col], F.col(col)
        if isinstance(kind, integers):
            terms = [c.isNull()] if required else []
        elif isinstance(kind, (T.FloatType, T.DoubleType)):
            terms = [c.isin(float("inf"), float("-inf"))]
            if required:
                terms += [c.isNull(), F.isnan(c)]
        else:
            return None
        for term in terms:
            condition = condition | F.coalesce(term, F.lit(False))
    for col, required in zip(contract.categorical, contract.required_categorical, strict=True):
        if not isinstance(kinds[col], T.StringType):
            return None
        c = F.col(col)
        condition = condition | F.coalesce(F.length(c) > MAX_FIELD_CHARS, F.lit(False))
        if required:
            condition = condition | c.isNull()
    return condition


def _struct_type(fields: Sequence[tuple[str, Any]]) -> Any:
    import pyarrow as pa
    from pyspark.sql.types import DoubleType, LongType, StringType, StructField, StructType

    def spark_type(kind: Any) -> Any:
        if pa.types.is_floating(kind):
            return DoubleType()
        return LongType() if pa.types.is_integer(kind) else StringType()

    return StructType([StructField(name, spark_type(kind)) for name, kind in fields])


def score_spark(
    spark: Any,
    wrapper: Any,
    model_dir: Path,
    sources: Sequence[Source],
    output: str,
    rejects: str,
    *,
    model_config: dict[str, Any],
    run_id: str,
    overwrite: bool,
) -> Counts:
    """Score ``sources`` with the model at ``model_dir`` (verified) in Spark's Python workers."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F
    from pyspark.sql.types import StringType, StructField, StructType

    contract = wrapper.contract
    paths = [_spark_path(s.uri) for s in sources]
    text = sources[0].format == CSV
    if text:  # as text: the contract reads CSV values, as the pandas engine does
        frame = spark.read.option("header", True).option("inferSchema", False).csv(paths)
    else:
        frame = spark.read.parquet(*paths)
    check_columns(contract, frame.columns, f"input {sources[0].uri!r}")
    marked_schema = StructType([*frame.schema.fields, StructField(REASON_COLUMN, StringType())])
    rules = rejecting_rules(wrapper)
    # rows breaking a data rule are refused by name: the rules go to the check in Python, and
    # every row with them (Spark's own doubts know the contract, not the rules)
    spec = {**_contract_spec(contract), "rules": wrapper.meta.get("rules") if rules else None}
    checker = _checker(spec, text)
    doubt = None if text or rules is not None else _doubt(contract, frame.schema)
    if doubt is None:  # every row through the contract in Python, the checked table kept
        marked = frame.mapInPandas(checker, marked_schema).persist(StorageLevel.MEMORY_AND_DISK)
        clean = None
    else:  # only the rows Spark finds doubtful go through the contract (for their reasons)
        flagged = frame.withColumn(_DOUBT, doubt)
        clean = flagged.filter(~F.col(_DOUBT)).drop(_DOUBT)
        doubtful = flagged.filter(F.col(_DOUBT)).drop(_DOUBT)
        marked = doubtful.mapInPandas(checker, marked_schema).persist(StorageLevel.MEMORY_AND_DISK)
    try:
        refused = marked.filter(F.col(REASON_COLUMN).isNotNull())
        rejected = refused.count()
        good = marked.filter(F.col(REASON_COLUMN).isNull()).drop(REASON_COLUMN)
        if clean is not None:
            total = frame.count()
            good = clean.unionByName(good)
        else:
            total = marked.count()
        if text:
            for col in contract.numeric:
                good = good.withColumn(col, F.col(col).cast("double"))
        fields = answer_fields(wrapper)
        # the model's name, version and the run are the same in every row: literals in Spark,
        # not columns of text per row sent back from Python
        constant = {
            NAME_COLUMN: wrapper.model_name,
            VERSION_COLUMN: wrapper.model_version,
            RUN_ID_COLUMN: run_id,
        }
        answer = [(n, k) for n, k in fields if n not in constant]
        names = {n for n, _ in fields}
        kept = [f for f in good.schema.fields if f.name not in names]
        answered = StructType([*kept, *_struct_type(answer).fields])
        columns = [f.name for f in answered.fields]
        scorer = _scorer(_model_ref(spark, model_dir), model_config, columns)
        scored = good.mapInArrow(scorer, answered).select(
            *[_col(f.name) for f in kept],
            *[F.lit(constant[n]).alias(n) if n in constant else _col(n) for n, _ in fields],
        )
        _write(scored.write.format("parquet"), output, overwrite)
        if rejected:
            _write(
                refused.coalesce(1).write.format("csv").option("header", True), rejects, overwrite
            )
    finally:
        marked.unpersist()
    return Counts(total - rejected, rejected)


def _col(name: str) -> Any:
    """A top-level column by its name, whatever it holds (a dot in ``proba_v1.2`` too)."""
    from pyspark.sql import functions as F

    return F.col("`" + name.replace("`", "``") + "`")


def _model_ref(spark: Any, model_dir: Path) -> str:
    """Where a Python worker finds the verified model folder: the folder itself when Spark runs
    in this process (``local``, ``local[N]``); on a cluster (``local-cluster`` included), a zip
    of it that Spark ships to every executor and unpacks there (``addArchive``), by its name.

    The zip is named by the folder's checksum and kept in the temporary folder: a session keeps
    what it was given for its lifetime (an executor that joins later fetches it too), and a
    notebook's session scoring the same version again reuses it."""
    if re.fullmatch(r"local(\[[^\]]*\])?", spark.sparkContext.master):
        return str(model_dir)
    from mlops.artifacts import model_checksum

    folder = Path(tempfile.gettempdir()) / "mlops-spark-models"
    folder.mkdir(exist_ok=True)
    base = folder / f"model-{model_checksum(model_dir)[:24]}"
    archive = Path(f"{base}.zip")
    if not archive.exists():
        partial = shutil.make_archive(f"{base}.{uuid.uuid4().hex[:8]}", "zip", root_dir=model_dir)
        os.replace(partial, archive)
    key = (id(spark.sparkContext), archive.name)
    if key not in _ADDED:
        spark.sparkContext.addArchive(str(archive))
        _ADDED.add(key)
    return _SHIPPED + archive.name


_SHIPPED = "spark-files:"
_ADDED: set[tuple[int, str]] = set()  # archives given to this process's Spark sessions
_WORKER_MODELS: dict[str, Any] = {}  # the model a reused Python worker loaded last


def _scorer(model_ref: str, model_config: dict[str, Any], columns: list[str]) -> Any:
    """The ``mapInArrow`` function: each batch of checked rows, as read, with the wrapper's
    answer columns appended; exactly ``columns``, in that order.

    The same code as the pandas engine (:class:`mlops.scoring.pandas_engine.Answer`) on Arrow
    batches, with the wrapper loaded once per Python worker through ``mlflow.pyfunc`` (its
    ``load_context`` checks the pipeline's checksum before deserialising it). Every row here
    passed the contract already (Spark found no doubt about it, or the contract accepted it), so
    a refusal now is a fault, not a reject.
    """

    def score(batches: Iterator[Any]) -> Iterator[Any]:
        import pyarrow as pa

        from mlops.scoring.model import load_wrapper
        from mlops.scoring.pandas_engine import Answer

        wrapper = _WORKER_MODELS.get(model_ref)
        if wrapper is None:
            path = model_ref
            if model_ref.startswith(_SHIPPED):
                from pyspark import SparkFiles

                path = SparkFiles.get(model_ref[len(_SHIPPED) :])
            wrapper = load_wrapper(Path(path), model_config)
            _WORKER_MODELS.clear()
            _WORKER_MODELS[model_ref] = wrapper
        build = Answer(wrapper, "")
        for batch in batches:
            if not batch.num_rows:
                continue
            table = pa.Table.from_batches([batch])
            features = table.select(wrapper.contract.features).to_pandas()
            checked = split_rows(wrapper.contract, features)
            if checked.reasons:
                raise MlopsError(
                    "a row that passed the input contract was refused when scored: "
                    + next(iter(checked.reasons.values()))
                )
            yield from build.table(checked, table).select(columns).to_batches()

    return score


def _write(writer: Any, uri: str, overwrite: bool) -> None:
    """Write a Spark output; a local one beside its place first, then moved in (a failure
    leaves nothing where the output belongs)."""
    if uri.startswith("s3://"):
        writer.mode("overwrite" if overwrite else "errorifexists").save(_spark_path(uri))
        return
    target = Path(uri).resolve()
    partial = target.with_name(f".{target.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        writer.mode("overwrite").save(str(partial))
        if target.exists() and overwrite:
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        os.replace(partial, target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
