"""The ``spark`` engine: the same verified model, in Spark's Python workers, on Arrow batches.

Spark reads the input (Parquet, or CSV as text) once: ``mapInArrow`` hands each batch to
Python, where the pandas engine's own code holds its rows to the model's input contract (and
the data rules that refuse rows) and scores the rows it accepts (:func:`_scorer`: the model
folder loaded through ``mlflow.pyfunc`` once per Python worker, checksum checked; the answer
built in Arrow), and Spark writes them as Parquet partitions. Accumulators count the rows
scored and refused. Only where rows were refused does a second job find them again, with
the contract's reasons, and write them as CSV with a ``reason``: where the input's types
allow (Parquet with the model's numeric columns as integers or floats and its categorical
ones as strings), only the rows Spark itself finds doubtful (:func:`_doubt`) go through
Python for that.

Not ``mlflow.pyfunc.spark_udf``: through ``spark_udf`` even a model that does nothing reached
only 1.32-1.48x the stock model's rows/s (``benchmarks/batch.py --spark-floor``), its pandas
round trip and schema enforcement per batch. The model's name and version and the scoring run
are literals in Spark.

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

from mlops.errors import MlopsError, first_line
from mlops.scoring.model import ScoringFailed
from mlops.scoring.pandas_engine import Counts, rejecting_rules
from mlops.scoring.rows import (
    REASON_COLUMN,
    RUN_ID_COLUMN,
    check_columns,
    check_rows,
)
from mlops.scoring.sinks import answer_fields
from mlops.scoring.sources import CSV, ScoringInputError, Source
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


def _checker(model_ref: str, model_config: dict[str, Any], text: bool, names: list[str]) -> Any:
    """The ``mapInPandas`` function over a :func:`_positional` frame whose columns are
    ``names``: each batch with the contract's reason for each row (``_mlops_reason``, None
    where accepted), by the worker's loaded wrapper (:func:`_worker_wrapper`)."""

    def check(batches: Iterator[Any]) -> Iterator[Any]:
        wrapper = _worker_wrapper(model_ref, model_config)
        contract, rules = wrapper.contract, rejecting_rules(wrapper)
        for frame in batches:
            frame = frame.reset_index(drop=True)
            positions = list(frame.columns)
            frame.columns = names
            reasons = check_rows(contract, rules, frame, text=text).reasons
            frame.columns = positions
            frame[_REASON] = [reasons.get(i) for i in range(len(frame))] if reasons else None
            yield frame

    return check


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
        kind, c = kinds[col], _col(col)
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
        c = _col(col)
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
    """Score ``sources`` with the model at ``model_dir`` (verified) in Spark's Python workers.

    One job reads the input once and writes the scored rows: each Arrow batch is held to the
    contract (and the data rules that refuse rows) and its accepted rows scored, in the same
    Python pass (:func:`_scorer`); the rows scored and refused are counted by accumulators,
    which Spark applies once per partition of a job's final stage, so the counts are exact
    under task retries. Only where rows were refused, a second job finds them again, with
    their reasons, and writes the rejects file.
    """
    import pyarrow as pa
    from pyspark.sql import functions as F
    from pyspark.sql.types import DoubleType, StructField, StructType

    contract = wrapper.contract
    paths = [_spark_path(s.uri) for s in sources]
    text = sources[0].format == CSV
    try:
        if text:  # as text: the contract reads CSV values, as the pandas engine does
            frame = spark.read.option("header", True).option("inferSchema", False).csv(paths)
        else:
            frame = spark.read.parquet(*paths)
    except Exception as exc:  # noqa: BLE001 - no Parquet, columns Spark takes for one: one line
        kind = "CSV files with a header row" if text else "Parquet files"
        raise ScoringInputError(
            f"input {sources[0].uri!r} cannot be read by Spark ({_spark_error(exc)}); pass "
            f"readable {kind} with column names that differ in more than letter case, or use "
            "--engine pandas"
        ) from None
    check_columns(contract, frame.columns, f"input {sources[0].uri!r}")
    fields = answer_fields(wrapper)
    # the model's name, version and the run are the same in every row: literals in Spark,
    # not columns of text per row sent back from Python
    constant = {
        NAME_COLUMN: wrapper.model_name,
        VERSION_COLUMN: wrapper.model_version,
        RUN_ID_COLUMN: run_id,
    }
    answer = [(n, k) for n, k in fields if n not in constant]
    # an input column named like an answer column is replaced (by default Spark takes
    # ``Prediction`` for ``prediction``)
    same = _same_name(spark)
    kept = [f for f in frame.schema.fields if not any(same(f.name, n) for n, _ in fields)]
    target = None  # the Arrow types of a CSV's answer (its batches are built from pandas)
    if text:  # the model's numbers as the contract read them, not as Spark would cast text
        kept = [
            StructField(f.name, DoubleType()) if f.name in contract.numeric else f for f in kept
        ]
        target = [
            *((f.name, pa.float64() if f.name in contract.numeric else pa.string()) for f in kept),
            *answer,
        ]
    answered = [*kept, *_struct_type(answer).fields]
    sc = spark.sparkContext
    scored_rows, refused_rows = sc.accumulator(0), sc.accumulator(0)
    model_ref = _model_ref(spark, model_dir)
    scorer = _scorer(
        model_ref,
        model_config,
        frame.columns,
        [f.name for f in answered],
        target=target,
        counters=(scored_rows, refused_rows),
    )
    positional, _ = _positional(frame)
    out = [_OUT + str(i) for i in range(len(answered))]
    place = {f.name: p for f, p in zip(answered[len(kept) :], out[len(kept) :], strict=True)}
    scored = positional.mapInArrow(
        scorer, StructType([StructField(p, f.dataType) for p, f in zip(out, answered, strict=True)])
    ).select(
        *[F.col(p).alias(f.name) for p, f in zip(out, kept, strict=False)],
        *[
            F.lit(constant[n]).alias(n) if n in constant else F.col(place[n]).alias(n)
            for n, _ in fields
        ],
    )
    try:
        _write(scored.write.format("parquet"), output, overwrite)
    except Exception as exc:  # noqa: BLE001 - a Java trace is no answer: its message, one line
        if isinstance(exc, MlopsError):
            raise
        raise ScoringFailed(
            f"the Spark job scoring {sources[0].uri!r} failed ({_spark_error(exc)}); nothing was "
            f"written to {output!r}"
        ) from exc
    counts = Counts(scored_rows.value, refused_rows.value)
    if counts.rejected:
        _write_rejects(
            spark,
            wrapper,
            model_ref,
            model_config,
            frame,
            text,
            rejects,
            counts.rejected,
            overwrite,
        )
    return counts


def _write_rejects(
    spark: Any,
    wrapper: Any,
    model_ref: str,
    model_config: dict[str, Any],
    frame: Any,
    text: bool,
    uri: str,
    expected: int,
    overwrite: bool,
) -> None:
    """The refused rows of ``frame`` with their reasons, as CSV: where the input's types allow,
    only the rows Spark finds doubtful (:func:`_doubt`) go through the contract in Python.

    The check runs in parallel and the refused rows (few) are kept while they are counted and
    written as one file. The scoring job counted ``expected`` refused rows; should the doubtful
    rows hold fewer (a refusal Spark's condition did not foresee), every row is checked again,
    so the file holds every row the scoring job refused."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F
    from pyspark.sql.types import StringType, StructField, StructType

    # rows breaking a data rule are refused by name: every row goes to the check in Python
    # (Spark's own doubts know the contract, not the rules)
    rules = rejecting_rules(wrapper)
    doubt = None if text or rules is not None else _doubt(wrapper.contract, frame.schema)
    same = _same_name(spark)
    found = 0
    for condition in (doubt, None) if doubt is not None else (None,):
        source, names = _positional(frame if condition is None else frame.filter(condition))
        marked = StructType([*source.schema.fields, StructField(_REASON, StringType())])
        refused = (
            source.mapInPandas(_checker(model_ref, model_config, text, names), marked)
            .filter(F.col(_REASON).isNotNull())
            .select(  # an input column named like ``reason`` is replaced, as pandas' engine does
                *[
                    F.col(p).alias(n)
                    for p, n in zip(source.columns, names, strict=True)
                    if not same(n, REASON_COLUMN)
                ],
                F.col(_REASON).alias(REASON_COLUMN),
            )
            .persist(StorageLevel.MEMORY_AND_DISK)
        )
        try:
            found = refused.count()
            if found >= expected or condition is None:
                writer = refused.coalesce(1).write.format("csv").option("header", True)
                _write(writer, uri, overwrite)
        finally:
            refused.unpersist()
        if found >= expected:
            return
    raise ScoringFailed(
        f"the scoring job refused {expected} rows, but checking every row again found "
        f"{found}; the rejects file {uri!r} holds those"
    )


def _spark_error(exc: BaseException) -> str:
    """A Spark error's own message, one line: a Python worker's error (its traceback's last
    line), a JVM error's (not py4j's 'An error occurred while calling o123.save'), a converted
    one's without its JVM stack."""
    from pyspark.errors import PythonException

    if isinstance(exc, PythonException):  # a worker's traceback: its last line is the error
        lines = [line for line in str(exc).splitlines() if line.strip()]
        if lines:
            return first_line(RuntimeError(lines[-1].strip()))
    java = getattr(exc, "java_exception", None)
    if java is not None:
        try:
            return first_line(RuntimeError(str(java.getMessage())))
        except Exception:  # noqa: BLE001 - the JVM is gone: what Python has
            pass
    return first_line(exc)


def _same_name(spark: Any) -> Any:
    """Whether Spark takes two names for one column (by default, whatever their case): the
    session's setting read once."""
    if spark.conf.get("spark.sql.caseSensitive", "false").lower() == "true":
        return lambda a, b: a == b
    return lambda a, b: a.lower() == b.lower()


_IN, _OUT, _REASON = "_mlops_in_", "_mlops_out_", "_mlops_reason"


def _positional(frame: Any) -> tuple[Any, list[str]]:
    """``frame`` with its columns renamed by position, and their names: ``mapInArrow`` and
    ``mapInPandas`` look every input column up by its name, which a dot in it (``note.text``)
    turns into a struct field that is not there; the Python side puts the names back."""
    names = list(frame.columns)
    return frame.toDF(*[_IN + str(i) for i in range(len(names))]), names


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


def _worker_wrapper(model_ref: str, model_config: dict[str, Any]) -> Any:
    """The verified model's wrapper in a Python worker, loaded once per worker process (a
    reused worker keeps the last one): the folder itself, or the archive Spark shipped."""
    from mlops.scoring.model import load_wrapper

    wrapper = _WORKER_MODELS.get(model_ref)
    if wrapper is None:
        path = model_ref
        if model_ref.startswith(_SHIPPED):
            from pyspark import SparkFiles

            path = SparkFiles.get(model_ref[len(_SHIPPED) :])
        wrapper = load_wrapper(Path(path), model_config)
        _WORKER_MODELS.clear()
        _WORKER_MODELS[model_ref] = wrapper
    return wrapper


def _scorer(
    model_ref: str,
    model_config: dict[str, Any],
    names: list[str],
    columns: list[str],
    *,
    target: list[tuple[str, Any]] | None,
    counters: tuple[Any, Any],
) -> Any:
    """The ``mapInArrow`` function over a :func:`_positional` frame whose columns are ``names``:
    each batch's rows that the contract (and the data rules that refuse rows) accepts, as
    read, with the wrapper's answer columns appended; exactly ``columns``, in that order,
    named by position (``_mlops_out_<i>``). The rows scored and refused are added to
    ``counters``.

    The same code as the pandas engine (:func:`mlops.scoring.rows.split_rows`, then
    :class:`mlops.scoring.pandas_engine.Answer`) on Arrow batches, with the wrapper loaded once
    per Python worker through ``mlflow.pyfunc`` (its ``load_context`` checks the pipeline's
    checksum before deserialising it). A CSV (``target``: its answer's Arrow types) has its
    model columns answered as the contract read them (numbers as numbers), its other columns
    as read.
    """
    scored_rows, refused_rows = counters

    def score(batches: Iterator[Any]) -> Iterator[Any]:
        import pyarrow as pa

        from mlops.scoring.pandas_engine import Answer

        wrapper = _worker_wrapper(model_ref, model_config)
        contract, rules = wrapper.contract, rejecting_rules(wrapper)
        build = Answer(wrapper, "")
        positions = [_OUT + str(i) for i in range(len(columns))]
        for batch in batches:
            if not batch.num_rows:
                continue
            table = pa.Table.from_batches([batch]).rename_columns(names)
            text = target is not None  # CSV: every column as read; the contract reads its own
            frame = (table if text else table.select(contract.features)).to_pandas()
            checked = check_rows(contract, rules, frame, text=text)
            read = None if text else table
            refused_rows.add(len(checked.reasons))
            if checked.arrays is None:
                continue
            scored_rows.add(len(checked.good))
            answered = build.table(checked, read).select(columns)
            if target is not None:  # a column of nothing but nulls comes as Arrow's null type
                answered = answered.cast(pa.schema(target))
            yield from answered.rename_columns(positions).to_batches()

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
