"""What an exported graph must do: its input/output contract, and parity with the native model.

:func:`io_contract` and :func:`onnx_inputs` are the contract the serving side relies on (one
input per feature column, float32 NaN-missing numbers and ``""``-missing strings); parity
(:func:`check_parity`) compares the graph with the native pipeline on the run's test split.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from mlops.config import Config
from mlops.errors import ExportError

BOUNDARY = 1e-4  # a label may differ where the native top-2 probabilities are this close
MISSING_STRING = ""  # a missing categorical value as the graph takes it


def io_contract(meta: dict[str, Any]) -> dict[str, Any]:
    """The graph's inputs and outputs for a model with ``metadata.json`` ``meta``."""
    inputs = [{"name": c, "type": "float32", "shape": [None, 1]} for c in meta["numeric_columns"]]
    inputs += [
        {"name": c, "type": "string", "shape": [None, 1]} for c in meta["categorical_columns"]
    ]
    if meta["task"] == "classification":
        outputs = [
            {"name": "label", "type": "int64", "shape": [None]},
            {"name": "probabilities", "type": "float32", "shape": [None, len(meta["classes"])]},
        ]
    else:
        outputs = [{"name": "variable", "type": "float32", "shape": [None, 1]}]
    return {
        "inputs": inputs,
        "outputs": outputs,
        "missing": {"float32": "NaN", "string": MISSING_STRING},
        "label": "index into classes",
    }


def onnx_inputs(frame: pd.DataFrame, numeric: list[str], categorical: list[str]) -> dict[str, Any]:
    """The graph's input feed for ``frame``: float32 ``[N, 1]`` per numeric column (NaN
    missing), string ``[N, 1]`` per categorical one (missing as ``""``)."""
    feed: dict[str, Any] = {}
    for col in numeric:
        values = pd.to_numeric(frame[col], errors="coerce")
        feed[col] = values.to_numpy(dtype=np.float32, na_value=np.nan).reshape(-1, 1)
    for col in categorical:
        values = frame[col]
        text = np.where(values.isna(), MISSING_STRING, values.astype(str)).astype(object)
        feed[col] = text.reshape(-1, 1)
    return feed


def check_parity(
    pipeline: Any,
    meta: dict[str, Any],
    model_bytes: bytes,
    run_id: str,
    variant: str,
    config: Config,
) -> dict[str, Any]:
    """Native vs ONNX on the run's test split: the report, with ``passed`` and, when it did
    not pass, ``failure`` (the rule broken and the worst rows)."""
    import onnxruntime as ort

    from mlops import metrics
    from mlops.data import encode_target
    from mlops.lineage import load_logged_split

    split = load_logged_split(run_id)
    numeric, categorical = list(meta["numeric_columns"]), list(meta["categorical_columns"])
    X = split.test[numeric + categorical].reset_index(drop=True)
    if X.empty:
        raise ExportError(
            f"run {run_id} has no test rows to compare the export with; retrain on more rows "
            "or with a larger data.split.test"
        )
    y = encode_target(split, split.test[split.target])
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    got = dict(
        zip(
            [o.name for o in session.get_outputs()],
            session.run(None, onnx_inputs(X, numeric, categorical)),
            strict=True,
        )
    )
    classify = meta["task"] == "classification"
    if classify:
        native = np.asarray(pipeline.predict_proba(X), dtype=np.float64)
        onnx_values = np.asarray(got["probabilities"], dtype=np.float64)
        native_label, onnx_label = native.argmax(axis=1), np.asarray(got["label"]).ravel()
        top2 = np.sort(native, axis=1)[:, -2:] if native.shape[1] > 1 else native
        near = (top2[:, -1] - top2[:, 0]) <= BOUNDARY
        mismatched = (native_label != onnx_label) & ~near
        codes = list(range(native.shape[1]))
        name = "accuracy"
        before = metrics.classification(y, native_label, codes)[name]
        after = metrics.classification(y, onnx_label, codes)[name]
        drop = before - after
    else:
        native = np.asarray(pipeline.predict(X), dtype=np.float64).reshape(-1, 1)
        onnx_values = np.asarray(got["variable"], dtype=np.float64).reshape(-1, 1)
        mismatched = np.zeros(len(X), dtype=bool)
        name = "rmse"
        before = metrics.regression(y, native.ravel()).get(name, float("nan"))
        after = metrics.regression(y, onnx_values.ravel()).get(name, float("nan"))
        drop = after - before
    # a value the export cannot represent (fp16 overflows past 65504 to inf) is a difference
    # too: NaN and inf count as infinitely far, never as "within the bound"
    finite = np.isfinite(onnx_values).all(axis=1)
    diff = np.where(finite, np.abs(native - onnx_values).max(axis=1), np.inf)
    max_diff = float(diff.max())
    report: dict[str, Any] = {
        "variant": variant,
        "rows_compared": len(X),
        "max_abs_difference": max_diff,
        "label_mismatches": int(mismatched.sum()),
        "metric": {"name": name, "native": before, "onnx": after, "drop": drop},
        "rule": (
            f"max_abs_difference <= export.tolerance ({config.export.tolerance}) and no label "
            f"mismatch outside native top-2 within {BOUNDARY}"
            if variant == "float32"
            else f"metric drop <= export.max_metric_drop ({config.export.max_metric_drop})"
        ),
    }
    broken = []
    if not finite.all():
        broken.append(f"{int((~finite).sum())} rows answered with NaN or infinity")
    if variant == "float32":
        if not max_diff <= config.export.tolerance:
            broken.append(
                f"values differ by up to {max_diff:.3g} > export.tolerance "
                f"{config.export.tolerance:g}"
            )
        if mismatched.any():
            broken.append(f"{int(mismatched.sum())} labels differ away from a decision boundary")
    elif not drop <= config.export.max_metric_drop:
        broken.append(
            f"{name} drop {drop:.4g} > export.max_metric_drop {config.export.max_metric_drop:g}"
        )
    report["passed"] = not broken
    if broken:
        order = np.lexsort((-diff, ~mismatched))[:5]  # mismatched labels first, then largest
        rows = "; ".join(
            f"row {i}: native {_shown(native[i])} vs onnx {_shown(onnx_values[i])}" for i in order
        )
        report["failure"] = (
            f"ONNX {variant} export fails parity on {len(X)} test rows of run {run_id}: "
            f"{' and '.join(broken)}; worst rows: {rows}. Nothing was logged; serve the "
            "version natively, or export another variant"
        )
    return report


def _shown(values: np.ndarray) -> str:
    return "[" + ", ".join(f"{v:.6g}" for v in np.ravel(values)) + "]"
