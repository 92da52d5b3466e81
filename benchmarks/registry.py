"""Registry benchmark: the team server (`mlops server`: PostgreSQL, S3 on moto, the mlops auth
app) against the local embedded store (SQLite file, local artifacts), side by side in one run.

1. Promotion: the same `promote()` (staging, then production: every gate, the audit row) of a
   freshly registered version, timed on each store in alternating rounds. Through the server the
   gates read the model's files through its artifact proxy from S3, and the audit row is the
   server's. Goal: server/local <= 1.5.
2. Metric logging: 1,000 metrics into one run, as mlops logs per-epoch metrics (each epoch's
   `log_metrics(..., synchronous=False)` under `batched_async_logging`: queued and sent in
   batches by MLflow's async logger, timed until flushed), and for comparison one synchronous
   `log_metric` call each and one `log_batch` call; rate server/local. Goal: at least half the
   local rate.

Needs PostgreSQL at 127.0.0.1:5432 (trust auth; MLOPS_TEST_PG names another admin URL) and the
test dependencies (moto's server).

    .venv/bin/python benchmarks/registry.py [--rounds 3] [--metrics 1000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlflow  # noqa: E402
import sqlalchemy as sa  # noqa: E402
from mlflow.entities import Metric  # noqa: E402

from mlops.config import load_config  # noqa: E402
from mlops.registry import promote, register  # noqa: E402
from mlops.tracking import batched_async_logging  # noqa: E402
from mlops.training import train  # noqa: E402
from tests.conftest import PG_ADMIN_URL, free_port  # noqa: E402
from tests.helpers import make_csv  # noqa: E402
from tests.servers import BIN, running  # noqa: E402

NAME = "bench-registry"
BUCKET = "bench-artifacts"
PASSWORD = "bench-" + uuid.uuid4().hex
S3 = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@contextmanager
def environment(values: dict[str, str]):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    mlflow.set_tracking_uri(values["MLFLOW_TRACKING_URI"])
    mlflow.set_registry_uri(values["MLFLOW_TRACKING_URI"])
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextmanager
def team_server(work: Path):
    """moto, a PostgreSQL database and `mlops server`; the client environment of its admin."""
    import boto3

    name = f"mlops_bench_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'create database "{name}"'))
    database = (
        sa.engine.make_url(PG_ADMIN_URL)
        .set(drivername="postgresql+psycopg", database=name)
        .render_as_string(hide_password=False)
    )
    try:
        with ExitStack() as stack:
            moto_port = free_port()
            s3 = stack.enter_context(
                running(
                    [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(moto_port)],
                    {**os.environ, **S3},
                    moto_port,
                    work / "moto.log",
                    timeout=60,
                    health="/moto-api/",
                )
            )
            boto3.client(
                "s3",
                endpoint_url=s3,
                aws_access_key_id="bench",
                aws_secret_access_key="bench",
                region_name="us-east-1",
            ).create_bucket(Bucket=BUCKET)
            port = free_port()
            env = {**os.environ, **S3, "MLFLOW_S3_ENDPOINT_URL": s3}
            command = [str(BIN / "mlops"), "server", "--backend-store-uri", database]
            command += ["--artifacts-destination", f"s3://{BUCKET}/mlflow", "--port", str(port)]
            uri = stack.enter_context(
                running(
                    command,
                    {**env, "MLOPS_ADMIN_PASSWORD": PASSWORD},
                    port,
                    work / "server.log",
                    health="/health",
                )
            )
            yield {
                **S3,
                "MLFLOW_S3_ENDPOINT_URL": s3,
                "MLFLOW_TRACKING_URI": uri,
                "MLFLOW_TRACKING_USERNAME": "admin",
                "MLFLOW_TRACKING_PASSWORD": PASSWORD,
            }
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'drop database if exists "{name}" with (force)'))
        admin.dispose()


def promotion_seconds(config: Any) -> float:
    """Register a fresh version, then time its promotion to staging and to production."""
    version = register(train(config).model_uri, NAME).version
    started = time.perf_counter()
    promote(config, NAME, str(version), "staging", reason="benchmark")
    promote(config, NAME, str(version), "production", reason="benchmark", force=True)
    return time.perf_counter() - started


def metric_rates(count: int) -> tuple[float, float, float]:
    """Metrics/s: as mlops logs per-epoch metrics (queued, ``synchronous=False``, then
    flushed), one synchronous call each, and one log_batch call."""
    client = mlflow.MlflowClient()
    mlflow.set_experiment("bench-metrics")
    with mlflow.start_run() as run:
        started = time.perf_counter()
        with batched_async_logging():  # as mlops.training wraps a model's fit
            for step in range(count):
                mlflow.log_metrics({"loss": 1.0 / (step + 1)}, step=step, synchronous=False)
            mlflow.flush_async_logging()
        queued = count / (time.perf_counter() - started)
        run_id = run.info.run_id
        started = time.perf_counter()
        for step in range(count):
            client.log_metric(run_id, "sync_loss", 1.0 / (step + 1), step=step)
        single = count / (time.perf_counter() - started)
        now = int(time.time() * 1000)
        batch = [Metric("batch_loss", 1.0 / (s + 1), now, s) for s in range(count)]
        started = time.perf_counter()
        client.log_batch(run_id, metrics=batch)
        batched = count / (time.perf_counter() - started)
    logged = client.get_metric_history(run_id, "loss")
    assert len(logged) == count, f"{len(logged)} of {count} queued metrics arrived"
    return queued, single, batched


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--metrics", type=int, default=1000)
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ["MLOPS_CONF_DIR"] = str(Path(__file__).resolve().parent.parent / "conf")
    total = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        csv = make_csv(work / "d.csv", n=300)
        config = load_config(
            overrides=[
                f"data.dataset={csv}",
                "data.target=label",
                "data.categorical=[color]",
                "registry.production.margin=-1",  # every new version may replace the last
            ]
        )
        local = {"MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"}
        seconds: dict[str, list[float]] = {"local": [], "server": []}
        queued: dict[str, list[float]] = {"local": [], "server": []}
        single: dict[str, list[float]] = {"local": [], "server": []}
        batched: dict[str, list[float]] = {"local": [], "server": []}
        with team_server(work) as server:
            stores = {"local": local, "server": server}
            for r in range(args.rounds):
                order = ("local", "server") if r % 2 == 0 else ("server", "local")
                for which in order:
                    with environment(stores[which]):
                        seconds[which].append(promotion_seconds(config))
                        epochs, one, many = metric_rates(args.metrics)
                        queued[which].append(epochs)
                        single[which].append(one)
                        batched[which].append(many)
    med = {k: statistics.median(v) for k, v in seconds.items()}
    epoch = {k: statistics.median(v) for k, v in queued.items()}
    rate = {k: statistics.median(v) for k, v in single.items()}
    batch = {k: statistics.median(v) for k, v in batched.items()}
    print(f"machine: {os.cpu_count()} cores; {args.rounds} alternating rounds")
    print(f"{'':34}{'local':>10}{'server':>10}{'server/local':>14}   goal")
    print(
        f"{'promotion (staging+production), s':34}{med['local']:>10.2f}{med['server']:>10.2f}"
        f"{med['server'] / med['local']:>14.2f}   <= 1.5"
    )
    print(
        f"{'metrics/s, as training logs them':34}{epoch['local']:>10.0f}{epoch['server']:>10.0f}"
        f"{epoch['server'] / epoch['local']:>14.2f}   >= 0.5"
    )
    print(
        f"{'metrics/s, synchronous calls':34}{rate['local']:>10.0f}{rate['server']:>10.0f}"
        f"{rate['server'] / rate['local']:>14.2f}"
    )
    print(
        f"{'metrics/s, one log_batch':34}{batch['local']:>10.0f}{batch['server']:>10.0f}"
        f"{batch['server'] / batch['local']:>14.2f}"
    )
    for which in ("local", "server"):
        print(
            f"  {which} rounds: promotion "
            + ", ".join(f"{s:.2f}" for s in seconds[which])
            + " s; metrics/s as training logs them "
            + ", ".join(f"{s:.0f}" for s in queued[which])
        )
    print(f"total {time.perf_counter() - total:.0f} s")


if __name__ == "__main__":
    main()
    sys.exit(0)
