"""Serving benchmark: stock MLflow sklearn serving vs. our pyfunc wrapper, side by side.

Both are the same fitted scikit-learn pipeline (breast cancer, logistic regression), served
by `mlflow models serve` (one worker each) on loopback and sent the same requests, measured
in alternating rounds so machine noise hits both alike. The floor is the bare estimator's
predict on one preprocessed NumPy row, in-process.

    .venv/bin/python benchmarks/serving.py [--requests 400] [--batches 20] [--explain]

Prints 1-row p50/p99 latency, 1-row requests/s with 8 concurrent clients, rows/s for
1000-row batches, and the ratios ours/stock. With ``--explain``, also the cost of
``{"params": {"explain": 3}}`` on our server: 1-row and 100-row p50 without and with it, in
alternating rounds on the same server, their ratio and the added milliseconds per row.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import mlflow  # noqa: E402
import numpy as np  # noqa: E402
from mlflow.models import infer_signature  # noqa: E402

from mlops.config import load_config  # noqa: E402
from mlops.data import prepare  # noqa: E402
from mlops.serving import log_model  # noqa: E402
from mlops.training import fit_and_evaluate  # noqa: E402


def request(
    conn: http.client.HTTPConnection, body: str, headers: dict[str, str] | None = None
) -> float:
    start = time.perf_counter()
    conn.request(
        "POST", "/invocations", body, {"Content-Type": "application/json", **(headers or {})}
    )
    resp = conn.getresponse()
    data = resp.read()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {data[:300]!r}")
    return time.perf_counter() - start


def latencies(port: int, body: str, n: int) -> list[float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    out = [request(conn, body) for _ in range(n)]
    conn.close()
    return out


def throughput(port: int, body: str, total: int, clients: int = 8) -> float:
    per_client = total // clients
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            latencies(port, body, per_client)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return per_client * clients / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--requests", type=int, default=400, help="1-row requests per latency round"
    )
    parser.add_argument("--batches", type=int, default=20, help="1000-row requests per batch round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--explain",
        action="store_true",
        help='also measure {"params": {"explain": 3}} against no params on our server',
    )
    args = parser.parse_args()

    from conftest import free_port
    from servers import running, server_env  # tests/servers.py: start, await /ping, always stop

    work = Path(tempfile.mkdtemp(prefix="mlops-bench-"))
    os.chdir(work)
    uri = f"sqlite:///{work / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    config = load_config()
    split = prepare(config)
    X = split.train[list(split.feature_columns)]
    with mlflow.start_run():
        pipeline, _ = fit_and_evaluate(config, split, log=False)
        ours = log_model(pipeline, split, config, name="ours")
        stock = mlflow.sklearn.log_model(
            pipeline,
            name="stock",
            signature=infer_signature(X.head(), pipeline.predict(X.head())),
            input_example=X.head(),
            serialization_format="cloudpickle",
        )

    row = X.head(1)
    one = json.dumps(
        {"dataframe_split": {"columns": list(row.columns), "data": row.to_numpy().tolist()}}
    )
    big = X.sample(1000, replace=True, random_state=0)
    batch = json.dumps(
        {"dataframe_split": {"columns": list(big.columns), "data": big.to_numpy().tolist()}}
    )

    # (c) the floor: the bare estimator on one preprocessed NumPy row
    estimator = pipeline.steps[-1][1]
    Xt = pipeline.steps[0][1].transform(row)
    for _ in range(200):
        estimator.predict(Xt)
    t0 = time.perf_counter()
    for _ in range(2000):
        estimator.predict(Xt)
    floor_ms = (time.perf_counter() - t0) / 2000 * 1000

    env = server_env(uri, MLFLOW_MODELS_WORKERS="1")
    results: dict[str, dict[str, list[float]]] = {
        k: {"lat": [], "rps": [], "rows": []} for k in ("stock", "ours")
    }
    ps, po = free_port(), free_port()

    def cmd(uri_: str, port: int) -> list[str]:
        return [
            sys.executable,
            "-m",
            "mlflow",
            "models",
            "serve",
            "-m",
            uri_,
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "--workers",
            "1",
        ]

    with (
        running(cmd(stock.model_uri, ps), env, ps, work / "stock.log") as _,
        running(cmd(ours.model_uri, po), env, po, work / "ours.log") as _,
    ):
        ports = {"stock": ps, "ours": po}
        for port in ports.values():  # warm up
            latencies(port, one, 50)
            latencies(port, batch, 3)
        for _ in range(args.rounds):
            for name, port in ports.items():
                results[name]["lat"] += latencies(port, one, args.requests)
                results[name]["rps"].append(throughput(port, one, args.requests))
                t0 = time.perf_counter()
                latencies(port, batch, args.batches)
                results[name]["rows"].append(1000 * args.batches / (time.perf_counter() - t0))
        explained = explain_costs(po, X, args) if args.explain else None

    summary = {}
    for name, r in results.items():
        lat = np.array(r["lat"]) * 1000
        summary[name] = {
            "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)),
            "rps_8_clients": statistics.median(r["rps"]),
            "batch_rows_per_s": statistics.median(r["rows"]),
        }
    s, o = summary["stock"], summary["ours"]
    print(
        f"machine: {os.cpu_count()} cores; {args.rounds} alternating rounds; one worker per server"
    )
    print(f"{'':28}{'stock':>12}{'ours':>12}{'ours/stock':>12}   goal")
    print(
        f"{'1-row latency p50 (ms)':28}{s['p50_ms']:12.2f}{o['p50_ms']:12.2f}"
        f"{o['p50_ms'] / s['p50_ms']:12.2f}   <= 0.33"
    )
    print(
        f"{'1-row latency p99 (ms)':28}{s['p99_ms']:12.2f}{o['p99_ms']:12.2f}"
        f"{o['p99_ms'] / s['p99_ms']:12.2f}"
    )
    print(
        f"{'1-row req/s, 8 clients':28}{s['rps_8_clients']:12.0f}{o['rps_8_clients']:12.0f}"
        f"{o['rps_8_clients'] / s['rps_8_clients']:12.2f}   >= 3.0"
    )
    print(
        f"{'1000-row batches, rows/s':28}{s['batch_rows_per_s']:12.0f}{o['batch_rows_per_s']:12.0f}"
        f"{o['batch_rows_per_s'] / s['batch_rows_per_s']:12.2f}   >= 1.5"
    )
    print(f"{'floor: bare predict (ms)':28}{floor_ms:12.3f}")
    print(
        "ours keeps its signature: "
        f"{mlflow.models.get_model_info(ours.model_uri).signature is not None}"
    )
    if explained is not None:
        print('\nexplain: {"params": {"explain": 3}} on our server (p50, same server, alternating)')
        print(f"{'rows':>6}{'plain ms':>12}{'explain ms':>12}{'ratio':>8}{'ms/row added':>15}")
        for rows, (plain, with_explain) in explained.items():
            print(
                f"{rows:>6}{plain:12.2f}{with_explain:12.2f}{with_explain / plain:8.1f}"
                f"{(with_explain - plain) / rows:15.3f}"
            )


def explain_costs(port: int, X: Any, args: argparse.Namespace) -> dict[int, tuple[float, float]]:
    """p50 ms per request size: without params, and with explain: 3 (alternating rounds)."""
    out = {}
    for rows in (1, 100):
        sample = X.sample(rows, replace=True, random_state=1)
        split = {"columns": list(sample.columns), "data": sample.to_numpy().tolist()}
        plain = json.dumps({"dataframe_split": split})
        explain = json.dumps({"dataframe_split": split, "params": {"explain": 3}})
        n = max(args.requests // (10 if rows > 1 else 1), 5)
        latencies(port, explain, 5)  # the explainer is built at the first explain request
        times: dict[str, list[float]] = {"plain": [], "explain": []}
        for _ in range(args.rounds):
            times["plain"] += latencies(port, plain, n)
            times["explain"] += latencies(port, explain, n)
        out[rows] = (
            float(np.percentile(times["plain"], 50)) * 1000,
            float(np.percentile(times["explain"], 50)) * 1000,
        )
    return out


if __name__ == "__main__":
    main()
