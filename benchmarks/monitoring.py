"""Monitoring benchmark: serving with the prediction log off vs. on, and one check over 100,000
predictions.

(1) The same registered model (breast cancer, logistic regression, our pyfunc wrapper) is
served twice by `mlflow models serve` (one worker each) on loopback: once with monitoring
off, once with every request logged to a SQLite prediction log. Both get the same requests
in alternating rounds, so machine noise hits both alike. Printed: 1-row p50 latency and
1-row requests/s with 8 concurrent clients, and the ratios on/off.

(2) 100,000 predictions (test-split rows resampled, with a shift on one feature) are logged
through the same background writer the server uses, 10% of them get labels, and one
`mlops monitor` check (drift on every feature, prediction drift, latency, errors, accuracy,
the MLflow run, the drift report with its plots, the alert rules) is timed.

    .venv/bin/python benchmarks/monitoring.py [--requests 400] [--rounds 9] [--logged 100000]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from benchmarks.serving import latencies, serve_cmd, throughput  # noqa: E402
from mlops.config import load_config  # noqa: E402
from mlops.data import prepare  # noqa: E402
from mlops.monitoring.checks import check  # noqa: E402
from mlops.monitoring.logger import PredictionLogger  # noqa: E402
from mlops.monitoring.store import MonitoringStore  # noqa: E402
from mlops.training import train  # noqa: E402

NAME = "bench-monitored"


def serving(
    work: Path, uri: str, model_uri: str, log_url: str, requests: int, rounds: int, one: str
) -> dict:
    from conftest import free_port
    from servers import running, server_env

    results = {k: {"lat": [], "rps": []} for k in ("off", "on")}
    ports = {"off": free_port(), "on": free_port()}
    configs = {"off": {"monitoring": False}, "on": {"monitoring": True, "monitoring_url": log_url}}

    def cmd(port: int) -> list[str]:
        return serve_cmd(model_uri, port)

    env = {k: server_env(uri, SERVING_MODEL_CONFIG=json.dumps(c)) for k, c in configs.items()}
    with (
        running(cmd(ports["off"]), env["off"], ports["off"], work / "off.log"),
        running(cmd(ports["on"]), env["on"], ports["on"], work / "on.log"),
    ):
        for port in ports.values():  # warm up
            latencies(port, one, 100)
        for i in range(
            rounds
        ):  # off first in even rounds, on first in odd ones: drift hits both alike
            for name in ("off", "on") if i % 2 == 0 else ("on", "off"):
                results[name]["lat"] += latencies(ports[name], one, requests)
                results[name]["rps"].append(throughput(ports[name], one, requests))
    # the server flushes its log as it shuts down: give it up to 20 s
    sent = 100 + rounds * (requests + requests // 8 * 8)  # warm-up, latency rounds, 8-client rounds
    store, deadline = MonitoringStore(log_url), time.monotonic() + 20
    while True:
        logged = len(store.predictions(NAME, None, 0, time.time() + 60))
        if logged >= sent or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    paired = sorted(
        on / off for on, off in zip(results["on"]["rps"], results["off"]["rps"], strict=False)
    )
    return {
        name: {
            "p50": float(np.percentile(np.array(r["lat"]) * 1000, 50)),
            "rps": statistics.median(r["rps"]),
        }
        for name, r in results.items()
    } | {"logged": logged, "sent": sent, "paired": paired}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--requests", type=int, default=400, help="1-row requests per round and server"
    )
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument(
        "--logged", type=int, default=100_000, help="predictions in the timed check's window"
    )
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="mlops-monitor-bench-"))
    os.chdir(work)
    uri = f"sqlite:///{work / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    config = load_config(
        overrides=[
            f"registry.model_name={NAME}",
            f"registry.audit_url=sqlite:///{work / 'audit.db'}",
            f"monitoring.log_url=sqlite:///{work / 'check.db'}",
        ]
    )
    result = train(config, register=True)
    mlflow.MlflowClient().set_registered_model_alias(NAME, "production", result.registered_version)
    split = prepare(config)  # the same split as training's (same seed)
    X = split.test[list(split.feature_columns)]
    row = X.head(1)
    one = json.dumps(
        {"dataframe_split": {"columns": list(row.columns), "data": row.to_numpy().tolist()}}
    )

    # (1) serving with the prediction log off and on
    served = serving(
        work,
        uri,
        f"models:/{NAME}/{result.registered_version}",
        f"sqlite:///{work / 'served.db'}",
        args.requests,
        args.rounds,
        one,
    )
    off, on = served["off"], served["on"]

    # (2) one check over --logged predictions, written by the server's own background writer:
    # rows of the whole dataset resampled, the first feature scaled by 1.3 (a drift to find),
    # predicted by the registered model, and the true label fed back for every tenth request
    rng = np.random.default_rng(0)
    everything = pd.concat([split.train, split.validation, split.test])
    picked = everything.sample(args.logged, replace=True, random_state=0)
    sample = picked[list(split.feature_columns)].copy()
    sample.iloc[:, 0] *= 1.3
    model = mlflow.pyfunc.load_model(
        f"models:/{NAME}/{result.registered_version}", model_config={"max_rows": args.logged}
    )
    predicted = model.predict(sample)["prediction"].to_numpy(dtype=object)
    truth = picked[split.target].astype(str).to_numpy(dtype=object)
    writer = PredictionLogger(
        config.monitoring.log_url,
        model=NAME,
        version=str(result.registered_version),
        numeric=list(split.numeric_columns),
        categorical=[],
        capacity=args.logged + 1,
        batch_rows=5000,
    )
    values = sample.to_numpy(dtype=float)
    label_rows = []
    t0 = time.perf_counter()
    for n, start in enumerate(range(0, args.logged, 100)):  # requests of 100 rows
        request_id = uuid.uuid4().hex
        writer.submit(
            request_id,
            latency_ms=float(rng.gamma(2.0, 0.5)),
            numeric=values[start : start + 100],
            predictions=predicted[start : start + 100],
        )
        if n % 10 == 0:
            label_rows += [
                (request_id, i, truth[start + i]) for i in range(len(values[start : start + 100]))
            ]
    assert writer.flush(timeout=600), "the writer did not finish"
    write_s = time.perf_counter() - t0
    labels = pd.DataFrame(label_rows, columns=["request_id", "row", "label"])
    MonitoringStore(config.monitoring.log_url).add_labels(NAME, labels, time.time())

    t0 = time.perf_counter()
    checked = check(config, NAME, window="1h")
    check_s = time.perf_counter() - t0

    print(
        f"machine: {os.cpu_count()} cores; {args.rounds} alternating rounds of {args.requests} "
        "requests; "
        "one worker per server; SQLite prediction log"
    )
    print(f"{'':30}{'log off':>10}{'log on':>10}{'on/off':>10}   goal")
    print(
        f"{'1-row latency p50 (ms)':30}{off['p50']:10.2f}{on['p50']:10.2f}"
        f"{on['p50'] / off['p50']:10.2f}   <= 1.10"
    )
    print(
        f"{'1-row req/s, 8 clients':30}{off['rps']:10.0f}{on['rps']:10.0f}"
        f"{on['rps'] / off['rps']:10.2f}   >= 0.90"
    )
    paired = served["paired"]
    print(
        f"req/s on/off round by round: median {statistics.median(paired):.2f}, range "
        f"{paired[0]:.2f}-{paired[-1]:.2f} "
        f"over {len(paired)} rounds"
    )
    print(
        f"predictions logged by the monitored server: {served['logged']} of the {served['sent']} "
        "it answered"
    )
    print(
        f"one check over {int(checked.metrics['predictions'])} logged predictions "
        f"({int(checked.metrics['labelled'])} labelled, {len(split.feature_columns)} features): "
        f"{check_s:.1f} s "
        f"(goal < 10 s); writing them took {write_s:.1f} s in the background writer"
    )
    print(
        f"check found: drifted {checked.drifted or 'none'}; alerts "
        f"{[a.rule for a in checked.alerts]}"
    )


if __name__ == "__main__":
    main()
