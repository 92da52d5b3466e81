"""Serving benchmark: stock MLflow sklearn serving vs. our pyfunc wrapper, side by side.

Both are the same fitted scikit-learn pipeline (breast cancer, logistic regression), served
by `mlflow models serve` (one worker each) on loopback and sent the same requests, measured
in alternating rounds so machine noise hits both alike. The floor is the bare estimator's
predict on one preprocessed NumPy row, in-process.

    .venv/bin/python benchmarks/serving.py [--requests 400] [--batches 20] [--explain]
    .venv/bin/python benchmarks/serving.py --family random_forest [--requests 400]

Prints 1-row p50/p99 latency, 1-row requests/s with 8 concurrent clients, rows/s for
1000-row batches, and the ratios ours/stock. With ``--explain``, also the cost of
``{"params": {"explain": 3}}`` on our server: 1-row and 100-row p50 without and with it, in
alternating rounds on the same server, their ratio and the added milliseconds per row.

With ``--family F`` (logreg, random_forest, hist_gb, keras_mlp) it compares, for that family
trained and registered as ``mlops train --register`` does, four servers of the same fitted
model in one run: stock MLflow (the sklearn flavor of the pipeline, cloudpickled), ours on the
native runtime, ours on the ONNX export (``mlops export``, float32) and ours on its int8
export, ours through ``mlflow models serve`` or, with ``--server mlops``, through the
production server (``mlops serve --version V --runtime R``); it prints
1-row p50/p99, 1-row requests/s with 8 clients, each ratio to stock, ONNX
against native, and the exports' sizes and metric drops from their parity reports.
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
    parser.add_argument(
        "--family",
        choices=["logreg", "random_forest", "hist_gb", "keras_mlp"],
        default=None,
        help="compare stock, ours native, ours ONNX and ours ONNX int8 for this family",
    )
    parser.add_argument(
        "--server",
        choices=["mlflow", "mlops"],
        default="mlflow",
        help="with --family: serve ours through `mlflow models serve` (default) or the "
        "production server, `mlops serve --runtime R` (stock is always `mlflow models serve`)",
    )
    args = parser.parse_args()
    if args.family:
        family_runtimes(args)
        return

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

    with (
        running(serve_cmd(stock.model_uri, ps), env, ps, work / "stock.log") as _,
        running(serve_cmd(ours.model_uri, po), env, po, work / "ours.log") as _,
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


def serve_cmd(uri_: str, port: int) -> list[str]:
    """`mlflow models serve` of ``uri_`` on ``port`` (one worker) with this interpreter's MLflow."""
    from servers import models_serve

    return [sys.executable, "-m", "mlflow", *models_serve(uri_, port)[1:]]


def family_runtimes(args: argparse.Namespace) -> None:
    """Stock vs ours native vs ours ONNX (float32, int8) for one family, in one run."""
    from contextlib import ExitStack

    from conftest import free_port
    from servers import running, server_env

    from mlops.artifacts import download_model, load_pipeline
    from mlops.export import export
    from mlops.training import train

    work = Path(tempfile.mkdtemp(prefix="mlops-bench-"))
    os.chdir(work)
    uri = f"sqlite:///{work / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    name = f"bench-{args.family}"
    overrides = [
        f"model.family={args.family}",
        f"registry.model_name={name}",
        "explain.enabled=false",
    ]
    if args.family == "keras_mlp":
        overrides.append("model.params.epochs=20")
    config = load_config(overrides=overrides)
    result = train(config, register=True)
    version = str(result.registered_version)
    reports = {
        variant: export(name, version, config, quantize=None if variant == "float32" else variant)
        for variant in ("float32", "int8")
    }
    folder = download_model(name, version, work / "native")
    meta = json.loads((folder / "artifacts" / "metadata.json").read_text())
    pipeline = load_pipeline(
        folder / "artifacts" / "pipeline.skops", sha256=meta.get("pipeline_sha256")
    )
    split = prepare(config)
    X = split.train[list(split.feature_columns)]
    with mlflow.start_run():
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
    servers = {
        "stock": (stock.model_uri, None),
        "native": (f"models:/{name}/{version}", {"runtime": "native"}),
        "onnx": (f"models:/{name}/{version}", {"runtime": "onnx"}),
        "onnx_int8": (f"models:/{name}/{version}", {"runtime": "onnx", "onnx_variant": "int8"}),
    }
    results: dict[str, dict[str, list[float]]] = {k: {"lat": [], "rps": []} for k in servers}
    with ExitStack() as stack:
        ports = {}
        for key, (model_uri, model_config) in servers.items():
            port = free_port()
            if model_config and args.server == "mlops":  # the production server, pinned
                cmd = [sys.executable, "-m", "mlops", "serve", name, "--version", version]
                cmd += ["-p", str(port), "--runtime", model_config["runtime"]]
                if "onnx_variant" in model_config:
                    cmd += ["--onnx-variant", model_config["onnx_variant"]]
                env = server_env(uri)
            else:
                cmd = serve_cmd(model_uri, port)
                extra = {"SERVING_MODEL_CONFIG": json.dumps(model_config)} if model_config else {}
                env = server_env(uri, MLFLOW_MODELS_WORKERS="1", **extra)
            stack.enter_context(running(cmd, env, port, work / f"{key}.log"))
            ports[key] = port
        for port in ports.values():  # warm up
            latencies(port, one, 50)
        for _ in range(args.rounds):
            for key, port in ports.items():
                results[key]["lat"] += latencies(port, one, args.requests)
                results[key]["rps"].append(throughput(port, one, args.requests))
    summary = {
        key: (
            float(np.percentile(np.array(r["lat"]) * 1000, 50)),
            float(np.percentile(np.array(r["lat"]) * 1000, 99)),
            statistics.median(r["rps"]),
        )
        for key, r in results.items()
    }
    stock_p50, _, stock_rps = summary["stock"]
    print(
        f"family {args.family}: machine {os.cpu_count()} cores; {args.rounds} alternating "
        "rounds; one worker per server; breast cancer, 1-row requests; stock on `mlflow models "
        f"serve`, ours on `{'mlops serve' if args.server == 'mlops' else 'mlflow models serve'}`"
    )
    print(
        f"{'server':12}{'p50 ms':>10}{'p99 ms':>10}{'req/s (8)':>12}"
        f"{'p50/stock':>11}{'rps/stock':>11}"
    )
    for key, (p50, p99, rps) in summary.items():
        print(
            f"{key:12}{p50:10.2f}{p99:10.2f}{rps:12.0f}"
            f"{p50 / stock_p50:11.2f}{rps / stock_rps:11.2f}"
        )
    best = min(("native", "onnx", "onnx_int8"), key=lambda k: summary[k][0])
    print(
        f"best of ours ({best}): p50 {summary[best][0] / stock_p50:.2f} of stock (goal <= 0.33), "
        f"req/s {summary[best][2] / stock_rps:.2f}x stock (goal >= 3)"
    )
    print(
        f"ONNX / native 1-row p50: {summary['onnx'][0] / summary['native'][0]:.2f} "
        "(goal for tree families <= 0.2)"
    )
    for variant, done in reports.items():
        report, metric = done.report, done.report["metric"]
        print(
            f"export {variant}: {report['size_bytes']:,} bytes, {report['size_ratio']:.3f} of the "
            f"native pipeline file; {metric['name']} native {metric['native']:.4f}, onnx "
            f"{metric['onnx']:.4f}, drop {metric['drop']:+.4f}"
        )
    int8, float32 = (reports[v].report["size_bytes"] for v in ("int8", "float32"))
    print(f"int8 / float32 size: {int8 / float32:.2f} (goal <= 0.5)")


if __name__ == "__main__":
    main()
