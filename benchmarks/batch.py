"""Batch scoring benchmark: `mlops score` against stock MLflow, side by side on the same rows.

One fitted scikit-learn pipeline (logistic regression on two numeric columns and a one-hot
categorical one) is registered through mlops and also logged as a stock ``mlflow.sklearn``
model. On the same Parquet file (100,000-row row groups):

- spark: our ``spark`` engine (contract check, our wrapper on Arrow batches, Parquet out)
  against ``mlflow.pyfunc.spark_udf`` of the stock model (Parquet out), one local[2] session,
  one untimed warm-up round of each on the whole input, then ``--spark-rounds`` alternating
  rounds (medians); with ``--spark-floor`` also ``spark_udf`` of a pyfunc that does nothing
  (what any engine built on ``spark_udf`` pays before its model does any work) and a
  ``mapInArrow`` step that answers constants (what our engine's way of running Python pays);
- pandas: our ``pandas`` engine (chunk_rows=100,000) against stock ``pyfunc.predict`` on
  100,000-row batches of the same file, each batch's predictions appended to a Parquet file;
- memory: the pandas engine's peak resident memory above its start (a fresh process, peak
  reset after a warm-up job), at --rows and at a quarter of it, in ``--memory-runs`` processes
  each, against one chunk's size in pandas; beside it the peak of bytes live in Arrow's pool
  (steady from run to run, where the resident peak varies with when the allocator hands freed
  pages back).

    .venv/bin/python benchmarks/batch.py [--rows 1000000] [--skip-spark] [--spark-floor]

Prints rows/s and the ratio ours/stock for each engine (goal: >= 1.5), and the memory ratio
(goal: <= 2 at both sizes). Machines are noisy: compare ratios, not absolute times.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlflow  # noqa: E402
import mlflow.pyfunc  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from mlops.config import load_config  # noqa: E402
from mlops.scoring import score  # noqa: E402
from mlops.training import train  # noqa: E402

NAME = "batch-bench"
CHUNK = 100_000
FEATURES = ["x1", "x2", "color"]


def make_rows(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    x1, x2 = rng.normal(size=n), rng.normal(size=n)
    color = rng.choice(np.array(["red", "green", "blue"], dtype=object), size=n)
    label = np.where(x1 + 0.5 * x2 + (color == "red") > 0.3, "yes", "no")
    return pd.DataFrame({"id": np.arange(n), "x1": x1, "x2": x2, "color": color, "label": label})


def setup(root: Path, rows: int) -> tuple[str, Path]:
    """Register the mlops model, log the stock twin; the stock model's local folder."""
    from mlops.artifacts import download_model, load_pipeline, verify_registered

    make_rows(2000).drop(columns="id").to_csv(root / "train.csv", index=False)
    config = load_config(
        overrides=[
            f"data.dataset={root / 'train.csv'}",
            "data.target=label",
            "data.categorical=[color]",
            f"registry.model_name={NAME}",
            "experiment=batch-bench",
        ]
    )
    version = train(config, register=True).registered_version
    assert version is not None
    model_dir = download_model(NAME, version, root / "ours")
    verify_registered(NAME, version, model_dir)
    pipeline = load_pipeline(next(model_dir.rglob("pipeline.skops")))
    sample = make_rows(50)[FEATURES]
    with mlflow.start_run(run_name="stock-sklearn"):
        info = mlflow.sklearn.log_model(
            pipeline, name="stock", input_example=sample, skops_trusted_types=["numpy.dtype"]
        )
    stock = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(root / "stock")))
    return version, stock


def write_input(path: Path, rows: int) -> None:
    with _writer(path) as w:
        for start in range(0, rows, CHUNK):
            part = make_rows(min(CHUNK, rows - start), seed=start + 1)
            part["id"] += start
            w.write_table(pa.Table.from_pandas(part.drop(columns="label"), preserve_index=False))


class _writer:
    """A ParquetWriter opened on the first table (its schema)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.writer: pq.ParquetWriter | None = None

    def __enter__(self) -> _writer:
        return self

    def write_table(self, table: pa.Table) -> None:
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.path, table.schema)
        self.writer.write_table(table)

    def __exit__(self, *exc: object) -> None:
        if self.writer is not None:
            self.writer.close()


def stock_pandas(stock: Path, data: Path, out: Path) -> float:
    """Stock pyfunc.predict on 100,000-row batches, appended to a Parquet file: seconds
    (loading the model included, as in ours)."""
    start = time.perf_counter()
    model = mlflow.pyfunc.load_model(str(stock))
    with _writer(out) as w:
        for batch in pq.ParquetFile(data).iter_batches(batch_size=CHUNK):
            frame = batch.to_pandas()
            prediction = np.asarray(model.predict(frame[FEATURES]))
            table = pa.Table.from_pandas(frame, preserve_index=False)
            w.write_table(table.append_column("prediction", pa.array(prediction)))
    return time.perf_counter() - start


def stock_spark(spark: object, stock: Path, data: Path, out: Path) -> float:
    """Stock spark_udf over the same file, Parquet out: seconds."""
    from pyspark.sql import functions as F

    start = time.perf_counter()
    udf = mlflow.pyfunc.spark_udf(spark, str(stock), result_type="double", env_manager="local")
    frame = spark.read.parquet(str(data))  # type: ignore[attr-defined]
    scored = frame.withColumn("prediction", udf(F.struct(*[F.col(c) for c in FEATURES])))
    scored.write.mode("overwrite").parquet(str(out))
    return time.perf_counter() - start


class _Nothing(mlflow.pyfunc.PythonModel):
    """A pyfunc that answers its input's x1: what spark_udf costs without any model."""

    def predict(self, context: Any, model_input: pd.DataFrame, params: Any = None) -> Any:
        return model_input["x1"].to_numpy()


def arrow_floor(spark: object, data: Path, out: Path) -> float:
    """``mapInArrow`` over the same file that answers every row with constants in the columns
    our engine adds (prediction, one probability per class; name, version and run id as Spark
    literals), Parquet out: seconds. What any
    engine that hands every row to Python on Arrow batches pays before checking a row or
    running a model (our engine's floor)."""
    start = time.perf_counter()
    frame = spark.read.parquet(str(data))  # type: ignore[attr-defined]
    answers = [("prediction", "string"), ("proba_no", "double"), ("proba_yes", "double")]
    schema = ", ".join(
        [
            *(f"{f.name} {f.dataType.simpleString()}" for f in frame.schema),
            *(f"{n} {t}" for n, t in answers),
        ]
    )
    names = [*frame.columns, *(n for n, _ in answers)]

    def constant(batches: Any) -> Any:
        for batch in batches:
            n = batch.num_rows
            extra = [pa.array(["yes"] * n), pa.array([0.5] * n), pa.array([0.5] * n)]
            yield pa.RecordBatch.from_arrays([*batch.columns, *extra], names=names)

    from pyspark.sql import functions as F

    answered = frame.mapInArrow(constant, schema).select(  # the literals our engine adds too
        "*",
        *(
            F.lit(v).alias(n)
            for n, v in (("model_name", NAME), ("model_version", "1"), ("scoring_run_id", "0" * 32))
        ),
    )
    answered.write.mode("overwrite").parquet(str(out))
    return time.perf_counter() - start


def nothing_model(root: Path) -> Path:
    """The do-nothing pyfunc, logged with the same input example as the stock model."""
    with mlflow.start_run(run_name="nothing"):
        info = mlflow.pyfunc.log_model(
            name="nothing", python_model=_Nothing(), input_example=make_rows(50)[FEATURES]
        )
    return Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(root / "nothing")))


def memory_child(data: str, out: str, version: str) -> None:
    """In a fresh process: the pandas engine's peak RSS above its start and the peak of the
    bytes live in Arrow's memory pool (sampled every half millisecond), in bytes (printed)."""
    import threading

    config = load_config(overrides=["experiment=batch-bench"])
    # a small job first loads the libraries and the model once; the peak so far is theirs,
    # not the engine's: reset it, then read it after the real job
    warm = Path(out).with_name("warm.parquet")
    write_input(warm, CHUNK)
    score(
        config,
        NAME,
        version=version,
        input_uri=str(warm),
        engine="pandas",
        output_uri=str(warm.with_name("warm-out.parquet")),
        chunk_rows=CHUNK,
        overwrite=True,
    )
    Path("/proc/self/clear_refs").write_text("5")
    before, arrow_before = _status("VmRSS"), pa.total_allocated_bytes()
    arrow_peak, done = [0], threading.Event()

    def sample() -> None:
        while not done.wait(0.0005):
            arrow_peak[0] = max(arrow_peak[0], pa.total_allocated_bytes() - arrow_before)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    score(
        config,
        NAME,
        version=version,
        input_uri=data,
        output_uri=out,
        engine="pandas",
        chunk_rows=CHUNK,
    )
    done.set()
    sampler.join()
    print(json.dumps({"peak_above_start": _status("VmHWM") - before, "arrow": arrow_peak[0]}))


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def pandas_peak(data: Path, out: Path, version: str) -> dict[str, int]:
    env = {**os.environ}
    done = subprocess.run(
        [sys.executable, __file__, "--memory-child", str(data), str(out), version],
        env=env,
        capture_output=True,
        text=True,
    )
    if done.returncode:
        raise RuntimeError(f"memory run failed:\n{done.stderr[-3000:]}")
    return {k: int(v) for k, v in json.loads(done.stdout.strip().splitlines()[-1]).items()}


def chunk_bytes(data: Path) -> int:
    batch = next(pq.ParquetFile(data).iter_batches(batch_size=CHUNK))
    return int(batch.to_pandas().memory_usage(deep=True).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--skip-spark", action="store_true")
    parser.add_argument("--spark-rounds", type=int, default=3, help="timed rounds per side")
    parser.add_argument(
        "--spark-floor",
        action="store_true",
        help="also time, in the same rounds, spark_udf of a pyfunc that does nothing (the floor "
        "of any spark_udf engine) and mapInArrow answering constants (our engine's floor)",
    )
    parser.add_argument(
        "--memory-runs", type=int, default=3, help="fresh processes per input size (memory)"
    )
    parser.add_argument("--memory-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(*args.memory_child)
        return
    root = Path(tempfile.mkdtemp(prefix="batch-bench-"))
    os.environ["MLFLOW_TRACKING_URI"] = os.environ["MLFLOW_REGISTRY_URI"] = (
        f"sqlite:///{root / 'mlflow.db'}"
    )
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        version, stock = setup(root, args.rows)
        data = root / "rows.parquet"
        write_input(data, args.rows)
        config = load_config(overrides=["experiment=batch-bench"])
        n = args.rows
        print(f"{n:,} rows, chunks of {CHUNK:,}; model {NAME} v{version} (logreg, one-hot)")
        print(f"{'engine':<8}{'ours rows/s':>14}{'stock rows/s':>14}{'ours/stock':>12}  goal")

        stock_s = stock_pandas(stock, data, root / "stock-pandas.parquet")
        ours = score(
            config,
            NAME,
            version=version,
            input_uri=str(data),
            output_uri=str(root / "ours-pandas.parquet"),
            engine="pandas",
            chunk_rows=CHUNK,
        )
        ratio = stock_s / ours.seconds
        print(f"{'pandas':<8}{n / ours.seconds:>14,.0f}{n / stock_s:>14,.0f}{ratio:>12.2f}  >= 1.5")

        if not args.skip_spark:
            from mlops.scoring.spark_engine import BATCH_ROWS, spark_session

            with spark_session("local[2]", "2g", BATCH_ROWS) as spark:
                # the first job of each side on the whole input warms the JVM's compiled code
                # and the Python workers (a first job ran up to 3x slower than the next on this
                # machine): neither side's warm-up is timed; then alternating rounds, medians
                stock_times, ours_times, floor_times, arrow_times = [], [], [], []
                nothing = nothing_model(root) if args.spark_floor else None
                for r in range(args.spark_rounds + 1):
                    stock_s = stock_spark(spark, stock, data, root / f"stock-spark-{r}")
                    if nothing is not None:
                        floor_s = stock_spark(spark, nothing, data, root / f"floor-spark-{r}")
                        arrow_s = arrow_floor(spark, data, root / f"arrow-floor-{r}")
                        if r:
                            floor_times.append(floor_s)
                            arrow_times.append(arrow_s)
                    ours = score(
                        config,
                        NAME,
                        version=version,
                        input_uri=str(data),
                        output_uri=str(root / f"ours-spark-{r}"),
                        engine="spark",
                        chunk_rows=CHUNK,
                    )
                    if r:
                        stock_times.append(stock_s)
                        ours_times.append(ours.seconds)
            stock_s, ours_s = statistics.median(stock_times), statistics.median(ours_times)
            ratio = stock_s / ours_s
            rounds = ", ".join(f"{a / b:.2f}" for a, b in zip(stock_times, ours_times, strict=True))
            print(
                f"{'spark':<8}{n / ours_s:>14,.0f}{n / stock_s:>14,.0f}{ratio:>12.2f}  >= 1.5"
                f"  (median of {args.spark_rounds} rounds after one warm-up round each;"
                f" ratios {rounds})"
            )
            if floor_times:
                floor_s = statistics.median(floor_times)
                print(
                    f"{'floor':<8}{n / floor_s:>14,.0f}{n / stock_s:>14,.0f}"
                    f"{stock_s / floor_s:>12.2f}  (spark_udf of a pyfunc that does nothing)"
                )
                arrow_s = statistics.median(arrow_times)
                print(
                    f"{'arrow':<8}{n / arrow_s:>14,.0f}{n / stock_s:>14,.0f}"
                    f"{stock_s / arrow_s:>12.2f}  (mapInArrow answering constants: no check, "
                    "no model)"
                )

        one_chunk = chunk_bytes(data)
        print(
            f"\npandas engine peak memory above a warmed-up process, {args.memory_runs} fresh "
            f"processes per size (one chunk in pandas: {one_chunk / 1e6:.1f} MB); resident "
            "memory (RSS, what the goal counts) and the peak of bytes live in Arrow's pool"
        )
        small = root / "quarter.parquet"
        write_input(small, max(n // 4, CHUNK))
        for label, path in ((f"{n:,} rows", data), (f"{max(n // 4, CHUNK):,} rows", small)):
            peaks = [
                pandas_peak(path, root / f"mem-{path.stem}-{i}.parquet", version)
                for i in range(args.memory_runs)
            ]
            rss = [p["peak_above_start"] / one_chunk for p in peaks]
            arrow = [p["arrow"] / one_chunk for p in peaks]
            print(
                f"  {label:<14} RSS x one chunk: {', '.join(f'{r:.2f}' for r in rss)}"
                f" (median {statistics.median(rss):.2f}, max {max(rss):.2f}; goal <= 2);"
                f" Arrow live: {', '.join(f'{a:.2f}' for a in arrow)}"
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
