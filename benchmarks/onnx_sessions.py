"""ONNX Runtime session options: the small-request session vs the batch session, side by side.

For one family (trained and exported as ``mlops train --register`` and ``mlops export`` do), the
same verified export is loaded into both sessions of :class:`mlops.serving.onnx_runtime.OnnxScorer`
and given, in alternating rounds in-process, 1-row requests and 1,000-row batches:

    .venv/bin/python benchmarks/onnx_sessions.py [--family random_forest] [--rounds 5]

Prints the 1-row p50 and the 1,000-row rows/s of each session and their ratios: the small-request
session should win (or tie) on one row, the batch session on batches (it is what a request of
``BATCH_ROWS`` rows or more runs on).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlflow  # noqa: E402
import numpy as np  # noqa: E402

from mlops.config import load_config  # noqa: E402
from mlops.data import prepare  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--family",
        choices=["logreg", "random_forest", "hist_gb", "keras_mlp"],
        default="random_forest",
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=300, help="1-row requests per round")
    parser.add_argument("--batches", type=int, default=20, help="1,000-row batches per round")
    args = parser.parse_args()

    import onnxruntime as ort

    from mlops.export import export
    from mlops.serving.onnx_runtime import batch_session_options, session_options
    from mlops.training import train

    work = Path(tempfile.mkdtemp(prefix="mlops-bench-"))
    os.chdir(work)
    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
    name = f"sessions-{args.family}"
    overrides = [f"model.family={args.family}", f"registry.model_name={name}"]
    overrides += ["explain.enabled=false"]
    config = load_config(overrides=overrides)
    result = train(config, register=True)
    done = export(name, str(result.registered_version), config)
    path = mlflow.artifacts.download_artifacts(
        run_id=done.run_id, artifact_path=done.artifact_path, dst_path=str(work)
    )
    data = Path(path).read_bytes()
    sessions = {
        "small": ort.InferenceSession(data, session_options(), providers=["CPUExecutionProvider"]),
        "batch": ort.InferenceSession(
            data, batch_session_options(), providers=["CPUExecutionProvider"]
        ),
    }
    split = prepare(config)
    X = split.train[list(split.feature_columns)]
    names = [i.name for i in sessions["small"].get_inputs()]

    def feeds(rows: int) -> dict[str, np.ndarray]:
        sample = X.sample(rows, replace=True, random_state=rows)
        return {n: sample[[n]].to_numpy(np.float32) for n in names}

    one, batch = feeds(1), feeds(1000)
    out = sessions["small"].get_outputs()[-1].name
    lat: dict[str, list[float]] = {k: [] for k in sessions}
    rps: dict[str, list[float]] = {k: [] for k in sessions}
    for s in sessions.values():  # warm up
        for _ in range(20):
            s.run([out], one)
        s.run([out], batch)
    for _ in range(args.rounds):
        for key, s in sessions.items():
            for _ in range(args.requests):
                t0 = time.perf_counter()
                s.run([out], one)
                lat[key].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for _ in range(args.batches):
                s.run([out], batch)
            rps[key].append(1000 * args.batches / (time.perf_counter() - t0))
    p50 = {k: float(np.percentile(v, 50)) * 1e6 for k, v in lat.items()}
    rows = {k: statistics.median(v) for k, v in rps.items()}
    print(
        f"family {args.family}: {os.cpu_count()} cores; {args.rounds} alternating rounds, "
        "in-process, the same verified export"
    )
    print(f"{'session':10}{'1-row p50 us':>14}{'1000-row rows/s':>18}")
    for key in sessions:
        print(f"{key:10}{p50[key]:14.1f}{rows[key]:18.0f}")
    print(
        f"1-row p50 small/batch: {p50['small'] / p50['batch']:.2f} (small should be <= 1); "
        f"batch rows/s batch/small: {rows['batch'] / rows['small']:.2f} (batch should be >= 1)"
    )


if __name__ == "__main__":
    main()
