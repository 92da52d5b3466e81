"""Logging the project's pyfunc model (see :mod:`mlops.serving.wrapper`): signature, example,
artifacts."""

from __future__ import annotations

import json
import logging
import math
import tempfile
from collections.abc import Sequence
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import mlflow
from mlflow.models import infer_signature
from mlflow.models.model import ModelInfo

from mlops.artifacts import file_sha256, save_pipeline
from mlops.config import Config
from mlops.data import DatasetSplit
from mlops.db import secret_free_url
from mlops.errors import ConfigError
from mlops.monitoring.profile import PROFILE_ARTIFACT, build_profile
from mlops.rules import keeping
from mlops.serving.wrapper import METADATA_ARTIFACT, PIPELINE_ARTIFACT, MlopsModel

_PACKAGE_DIR = Path(__file__).resolve().parent.parent


logger = logging.getLogger(__name__)


def model_metadata(split: DatasetSplit, config: Config) -> dict[str, Any]:
    """What the wrapper needs at load time, derived from the data split and the config."""
    features = list(split.feature_columns)
    train = split.train[features]
    head = masked(train.head(20).reset_index(drop=True), train, config)
    sample = head.reindex(
        range(len(head) + 1)
    )  # the added last row is all missing: checks imputation
    return {
        "task": split.task,
        "family": config.model.family,
        "target": split.target,
        "numeric_columns": list(split.numeric_columns),
        "categorical_columns": list(split.categorical_columns),
        "nullable_columns": [c for c in features if train[c].isna().any()],
        "classes": list(split.classes) if split.classes else None,
        "data_hash": split.content_hash,
        "registered_model_name": config.registry.model_name,
        # the data contract beyond types: rules checked on every served row, declared transforms
        "rules": config.data.rules.model_dump(mode="json"),
        "features": config.data.features,
        # serving defaults; a server may override each through its model config
        "serving": {
            "max_rows": config.serving.max_rows,
            "impute_missing": config.serving.impute_missing,
            "max_body_bytes": config.serving.max_body_bytes,
            "coerce_numbers": config.serving.coerce_numbers,
            "on_rule_violation": config.serving.on_rule_violation,
            "runtime": config.serving.runtime,
            "onnx_variant": config.serving.onnx_variant,
            "max_explain": config.explain.max_top_k,
            "max_explain_rows": config.explain.max_rows,
            "monitoring": config.monitoring.enabled,
            # "": beside the serving process's tracking store, resolved at load; a literal
            # password or token is never stored with the model, a ${VAR} placeholder is
            "monitoring_url": secret_free_url(config.monitoring.log_url or ""),
            "sensitive_columns": list(config.monitoring.sensitive_columns),
            "sensitive_mode": config.monitoring.sensitive_mode,
            "mask_key_env": config.monitoring.mask_key_env,  # the key's name, never the key
            "monitoring_queue_rows": config.monitoring.queue_rows,
        },
        "sample": {
            c: [None if isinstance(v, float) and math.isnan(v) else v for v in sample[c].tolist()]
            for c in features
        },
    }


def masked(frame: Any, train: Any, config: Config) -> Any:
    """``frame`` with no real value of a sensitive column: the column's training mean for a
    number, ``***`` for a category. The example and sample a model carries are for checking
    shape and types, and are read by anyone who can read the model."""
    sensitive = [c for c in config.monitoring.sensitive_columns if c in frame.columns]
    if not sensitive:
        return frame
    frame = frame.copy()
    for col in sensitive:
        if col in config.data.categorical or not _numeric(train[col]):
            frame[col] = "***"
        else:
            frame[col] = float(train[col].mean())
    return frame


def _numeric(column: Any) -> bool:
    import pandas as pd

    return bool(pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column))


def requirements_for(family: str) -> list[str]:
    """Pinned pip requirements of a served model of ``family``."""
    names = [
        "mlflow",
        "scikit-learn",
        "pandas",
        "numpy",
        "scipy",
        "skops",
        "pyyaml",
        "pydantic",
        "shap",  # per-row explanations on request ({"params": {"explain": k}})
        "onnxruntime",  # serving.runtime auto/onnx: a version's ONNX export (mlops export)
        "orjson",  # decodes JSON bodies (mlops.serving.inputs; json where it is missing)
    ]
    if family == "keras_mlp":
        names += ["tensorflow", "keras"]
    return pinned(names)


def pinned(names: Sequence[str]) -> list[str]:
    """``name==version`` as installed here (the bare name where a package is not installed)."""
    pins = []
    for name in names:
        try:
            pins.append(f"{name}=={importlib_metadata.version(name)}")
        except importlib_metadata.PackageNotFoundError:
            pins.append(name)
    return pins


def log_model(
    pipeline: Any,
    split: DatasetSplit,
    config: Config,
    *,
    name: str = "model",
) -> ModelInfo:
    """Log ``pipeline`` through :class:`MlopsModel` on the active run.

    The model carries a signature and an input example taken from the training split, the
    ``mlops`` package as code, and pinned requirements, so it serves on its own. Register it
    with :func:`mlops.registry.register`, which also records its checksum.
    """
    unknown = sorted(set(config.monitoring.sensitive_columns) - set(split.feature_columns))
    if unknown:
        raise ConfigError(
            f"monitoring.sensitive_columns: {unknown} are not feature columns of the data; "
            f"choose from {list(split.feature_columns)}"
        )
    meta = model_metadata(split, config)
    # what the model explains rows with (serving's {"params": {"explain": k}}): aggregates of
    # the transformed training data, so no file is read on the request path
    from mlops.explain import METADATA_KEY, explain_metadata

    meta[METADATA_KEY] = explain_metadata(pipeline, split, config)
    if config.monitoring.log_url and meta["serving"]["monitoring_url"] != config.monitoring.log_url:
        logger.warning(
            "monitoring.log_url: its password is not stored with the model; name it as a "
            "${VAR} placeholder in the URL, or give it to the serving process (PGPASSWORD or "
            "~/.pgpass for PostgreSQL)"
        )
    features = split.train[list(split.feature_columns)]
    # the example is what MLflow (and a reader) sends the served model: rows that keep the data
    # rules, or a served model in reject mode would refuse its own example
    keep = keeping(features, config.data.rules)
    rows = features[keep] if keep.any() else features
    X_example = masked(rows.head(5), split.train, config).reset_index(drop=True)
    wrapper = (
        MlopsModel()
    )  # configured, not loaded: the caller's pipeline is used as it is, never changed
    wrapper._configure(pipeline, meta, model_name=config.registry.model_name, model_version="1")
    # `explain` declared (0: no explanation), so MLflow's own predict passes it to the wrapper
    signature = infer_signature(X_example, wrapper.predict(None, X_example), params={"explain": 0})
    with tempfile.TemporaryDirectory() as tmp:
        pipe_path = save_pipeline(pipeline, tmp)
        meta["pipeline_sha256"] = file_sha256(pipe_path)  # checked before the file is read
        meta_path = Path(tmp) / "metadata.json"
        meta_path.write_text(json.dumps(meta, indent=2))
        profile_path = Path(tmp) / f"{PROFILE_ARTIFACT}.json"
        profile_path.write_text(
            json.dumps(
                build_profile(
                    pipeline,
                    split,
                    bins=config.monitoring.bins,
                    sensitive=config.monitoring.sensitive_columns,
                )
            )
        )
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(Path(__file__).with_name("model_code.py")),
            artifacts={
                PIPELINE_ARTIFACT: str(pipe_path),
                METADATA_ARTIFACT: str(meta_path),
                PROFILE_ARTIFACT: str(profile_path),
            },
            code_paths=[str(_PACKAGE_DIR)],
            signature=signature,
            input_example=X_example,
            pip_requirements=requirements_for(config.model.family),
            # the keys a server may override (MLflow accepts only logged keys, and logs them as
            # params); the prediction log's URL stays in metadata.json, out of the run's params
            model_config={
                **{k: v for k, v in meta["serving"].items()},
                "monitoring_url": "",
                "model_name": "",
                "model_version": "",
                "model_checksum": "",
            },
            metadata={
                "mlops_family": config.model.family,
                "mlops_task": split.task,
                "mlops_data_hash": split.content_hash,
            },
        )
