"""Production-server benchmark: `mlops serve` vs stock `mlflow models serve`, side by side.

One registered model (breast cancer, logistic regression), trained and registered twice with
mlops.training.train. Measured in one run, on loopback, one worker per server:

1. `mlops serve NAME --alias production` vs `mlflow models serve` of the same fitted pipeline
   through the sklearn flavor (stock) and of our wrapper (`models:/NAME@production`), in
   alternating rounds: 1-row p50, 1-row requests/s with 8 clients, rows/s on 1000-row batches.
2. An alias swap under 8-client load (`--reload-interval 1`, version 2 promoted while the
   clients run): failed requests, and the p99 of the swap window vs the steady p99 before it.
3. Shadow cost: `--shadow challenger` vs the same server without the shadow (both `--monitor`,
   as a shadowed server logs its answers), requests/s with 8 clients, alternating rounds.
4. A 10/90 split over distinct `X-Mlops-Route-Key` values: the challenger's observed share,
   read from the server's /metrics.

    .venv/bin/python benchmarks/production.py [--rounds 3] [--requests 400] [--batches 20]
        [--swap-seconds 12] [--shadow-rounds 5] [--split-requests 5000]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import mlflow  # noqa: E402
import numpy as np  # noqa: E402
from mlflow.models import infer_signature  # noqa: E402

from benchmarks.serving import latencies, request, serve_cmd, throughput  # noqa: E402
from mlops.config import load_config  # noqa: E402
from mlops.data import prepare  # noqa: E402
from mlops.registry.promotion import promote  # noqa: E402
from mlops.training import train  # noqa: E402

NAME = "bench-production"
ROUTE_KEY = "X-Mlops-Route-Key"


# ---- clients: request, latencies and throughput are serving.py's ----
def load_for(
    port: int, body: str, seconds: float, clients: int = 8
) -> tuple[list[tuple[float, float]], list[tuple[float, str]]]:
    """8 clients for ``seconds``: (start time, latency) of each answer, and each failure."""
    done: list[tuple[float, float]] = []
    failed: list[tuple[float, str]] = []
    stop = time.perf_counter() + seconds

    def worker() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        while (start := time.perf_counter()) < stop:
            try:
                done.append((start, request(conn, body)))
            except Exception as exc:  # noqa: BLE001 - a failed request is what we count
                failed.append((start, repr(exc)[:200]))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.close()

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return done, failed


def served(port: int) -> dict[str, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/version")
    resp = conn.getresponse()
    resp.read()
    conn.close()
    return json.loads(resp.getheader("X-Mlops-Served") or "{}")


def requests_by_alias(port: int) -> dict[str, float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("mlops_requests_total{") and 'status_class="2xx"' in line:
            alias = re.search(r'alias="([^"]*)"', line)
            if alias:
                out[alias.group(1)] = out.get(alias.group(1), 0.0) + float(line.split()[-1])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--requests", type=int, default=400, help="1-row requests per latency round"
    )
    parser.add_argument("--batches", type=int, default=20, help="1000-row requests per batch round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds, part 1")
    parser.add_argument("--swap-seconds", type=float, default=12.0, help="load run around the swap")
    parser.add_argument("--shadow-rounds", type=int, default=5, help="alternating rounds, part 3")
    parser.add_argument("--split-requests", type=int, default=5000)
    args = parser.parse_args()

    from conftest import free_port
    from servers import running, server_env  # tests/servers.py: start, await /ping, always stop

    began = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="mlops-bench-prod-"))
    os.chdir(work)
    uri = f"sqlite:///{work / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    config = load_config(overrides=[f"registry.model_name={NAME}"])
    split = prepare(config)
    X = split.train[list(split.feature_columns)]
    v1 = train(config, split, register=True).registered_version
    v2 = train(config, split, register=True).registered_version
    assert v1 and v2
    promote(config, NAME, v1, "production", force=True, reason="bench")
    client = mlflow.MlflowClient()
    client.set_registered_model_alias(NAME, "challenger", v2)

    # stock: the very pipeline registered as version 1, through the sklearn flavor
    wrapped = mlflow.pyfunc.load_model(f"models:/{NAME}/{v1}").unwrap_python_model()
    pipeline = getattr(wrapped, "pipeline", None) or wrapped.model.pipeline  # type: ignore[attr-defined]
    with mlflow.start_run(run_name="stock"):
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

    env = server_env(uri, MLFLOW_MODELS_WORKERS="1")

    def mlops_serve(port: int, *extra: str) -> list[str]:
        return [sys.executable, "-m", "mlops", "serve", NAME, "-p", str(port), *extra]

    # ---- 1. production server vs stock vs our wrapper under mlflow models serve ----
    kinds = ("stock", "wrapper", "production")
    results: dict[str, dict[str, list[float]]] = {
        k: {"lat": [], "rps": [], "rows": []} for k in kinds
    }
    ports = {k: free_port() for k in kinds}
    with (
        running(serve_cmd(stock.model_uri, ports["stock"]), env, ports["stock"], work / "s.log"),
        running(
            serve_cmd(f"models:/{NAME}@production", ports["wrapper"]),
            env,
            ports["wrapper"],
            work / "w.log",
        ),
        running(
            mlops_serve(ports["production"], "--alias", "production", "--no-monitor"),
            env,
            ports["production"],
            work / "p.log",
        ),
    ):
        for port in ports.values():  # warm up
            latencies(port, one, 50)
            latencies(port, batch, 3)
        for r in range(args.rounds):
            order = kinds if r % 2 == 0 else kinds[::-1]
            for name in order:
                port = ports[name]
                results[name]["lat"] += latencies(port, one, args.requests)
                results[name]["rps"].append(throughput(port, one, args.requests))
                t0 = time.perf_counter()
                latencies(port, batch, args.batches)
                results[name]["rows"].append(1000 * args.batches / (time.perf_counter() - t0))
    summary = {
        name: {
            "p50": float(np.percentile(np.array(r["lat"]) * 1000, 50)),
            "p99": float(np.percentile(np.array(r["lat"]) * 1000, 99)),
            "rps": statistics.median(r["rps"]),
            "rows": statistics.median(r["rows"]),
        }
        for name, r in results.items()
    }

    # ---- 2. alias swap under 8-client load ----
    port = free_port()
    with running(
        mlops_serve(port, "--alias", "production", "--reload-interval", "1", "--no-monitor"),
        env,
        port,
        work / "swap.log",
    ):
        latencies(port, one, 50)
        box: dict[str, object] = {}
        t_start = time.perf_counter()
        loader = threading.Thread(
            target=lambda: box.update(load=load_for(port, one, args.swap_seconds))
        )
        loader.start()
        time.sleep(args.swap_seconds / 3)
        t_promote = time.perf_counter()
        promote(config, NAME, v2, "production", force=True, reason="bench")
        while served(port).get("production") != v2:
            if time.perf_counter() - t_promote > args.swap_seconds:
                raise RuntimeError("the production server did not swap to version 2 in time")
            time.sleep(0.05)
        t_swapped = time.perf_counter()
        loader.join()
    done, failed = box["load"]  # type: ignore[misc]
    steady = [lat for t, lat in done if t_start + 1 <= t < t_promote]
    window_end = t_swapped + 1.0  # a second past the swap being seen
    swapping = [lat for t, lat in done if t_promote <= t < window_end]
    swap = {
        "requests": len(done) + len(failed),
        "failed": len(failed),
        "steady_p99": float(np.percentile(np.array(steady) * 1000, 99)),
        "swap_p99": float(np.percentile(np.array(swapping) * 1000, 99)),
        "swap_n": len(swapping),
        "steady_n": len(steady),
        "seen_after": t_swapped - t_promote,
        "errors": sorted({e for _, e in failed})[:3],
    }

    # production is now v2; the challenger becomes v1
    client.set_registered_model_alias(NAME, "challenger", v1)

    # ---- 3. shadow cost ----
    shadow_ports = {"plain": free_port(), "shadow": free_port()}
    rps: dict[str, list[float]] = {"plain": [], "shadow": []}
    with (
        running(
            mlops_serve(
                shadow_ports["plain"],
                "--alias",
                "production",
                "--monitor",
                "--log-url",
                f"sqlite:///{work / 'log-plain.db'}",
            ),
            env,
            shadow_ports["plain"],
            work / "plain.log",
        ),
        running(
            mlops_serve(
                shadow_ports["shadow"],
                "--alias",
                "production",
                "--shadow",
                "challenger",
                "--monitor",
                "--log-url",
                f"sqlite:///{work / 'log-shadow.db'}",
            ),
            env,
            shadow_ports["shadow"],
            work / "shadow.log",
        ),
    ):
        for port in shadow_ports.values():
            latencies(port, one, 50)
        for r in range(args.shadow_rounds):
            order = ("plain", "shadow") if r % 2 == 0 else ("shadow", "plain")
            for name in order:
                rps[name].append(throughput(shadow_ports[name], one, args.requests))
    ratios = [s / p for s, p in zip(rps["shadow"], rps["plain"], strict=True)]

    # ---- 4. a 10/90 split over distinct route keys ----
    port = free_port()
    with running(
        mlops_serve(port, "--split", "production=90,challenger=10", "--no-monitor"),
        env,
        port,
        work / "split.log",
    ):
        before = requests_by_alias(port)
        keys = iter(range(args.split_requests))
        lock = threading.Lock()
        split_errors: list[BaseException] = []

        def keyed() -> None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            try:
                while True:
                    with lock:
                        key = next(keys, None)
                    if key is None:
                        break
                    request(conn, one, {ROUTE_KEY: f"user-{key}"})
            except BaseException as exc:  # noqa: BLE001 - reported below
                split_errors.append(exc)
            conn.close()

        threads = [threading.Thread(target=keyed) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if split_errors:
            raise split_errors[0]
        after = requests_by_alias(port)
    counts = {a: after.get(a, 0.0) - before.get(a, 0.0) for a in after}
    share = counts.get("challenger", 0.0) / sum(counts.values())

    # ---- report ----
    s, w, p = (summary[k] for k in kinds)
    print(
        f"machine: {os.cpu_count()} cores; one worker per server; {args.rounds} alternating "
        f"rounds of {args.requests} 1-row requests and {args.batches} 1000-row batches"
    )
    print(
        f"{'':26}{'stock':>10}{'wrapper':>10}{'mlops':>10}"
        f"{'mlops/stock':>13}{'mlops/wrap':>12}   goal (mlops/stock)"
    )

    def line(label: str, key: str, fmt: str, goal: str) -> None:
        print(
            f"{label:26}{s[key]:10{fmt}}{w[key]:10{fmt}}{p[key]:10{fmt}}"
            f"{p[key] / s[key]:13.2f}{p[key] / w[key]:12.2f}   {goal}"
        )

    line("1-row p50 (ms)", "p50", ".2f", "<= 0.2")
    line("1-row p99 (ms)", "p99", ".2f", "")
    line("1-row req/s, 8 clients", "rps", ".0f", ">= 5")
    line("1000-row batches, rows/s", "rows", ".0f", ">= 2")
    print(
        f"alias swap under 8 clients ({args.swap_seconds:g} s, --reload-interval 1): "
        f"{swap['failed']} failed of {swap['requests']} (goal 0); swap seen "
        f"{swap['seen_after']:.2f} s after promote; p99 swap window {swap['swap_p99']:.2f} ms "
        f"({swap['swap_n']} req) vs steady {swap['steady_p99']:.2f} ms ({swap['steady_n']} req): "
        f"{swap['swap_p99'] / swap['steady_p99']:.2f}x (goal <= 3)"
    )
    if swap["errors"]:
        print(f"  failures: {swap['errors']}")
    print(
        f"shadow (both --monitor, {args.shadow_rounds} alternating rounds): req/s "
        f"{statistics.median(rps['plain']):.0f} without vs {statistics.median(rps['shadow']):.0f} "
        f"with: {statistics.median(rps['shadow']) / statistics.median(rps['plain']):.2f} "
        f"(round by round median {statistics.median(ratios):.2f}, range "
        f"{min(ratios):.2f}-{max(ratios):.2f}; goal >= 0.90)"
    )
    print(
        f"split production=90,challenger=10 over {args.split_requests} distinct route keys: "
        f"challenger {counts.get('challenger', 0):.0f}, "
        f"production {counts.get('production', 0):.0f}: {share:.2%} (goal 10% +/- 2 points)"
    )
    print(f"total {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
