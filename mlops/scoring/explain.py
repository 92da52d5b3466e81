"""``mlops explain``: a registered version explains rows (a file, or one logged request), as one
MLflow run.

Like batch scoring, the version is downloaded and its files verified against the checksum
recorded at registration before anything of it is deserialised; the rows pass the model's
input contract; every row's contributions (:mod:`mlops.explain`) are logged as a table.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import sqlalchemy as sa
from mlflow.exceptions import MlflowException

from mlops.config import Config
from mlops.errors import MlopsError
from mlops.explain import Explainer, RowContributions
from mlops.monitoring.store import LOG_FILE, PREDICTIONS, MonitoringStore
from mlops.scoring.core import _verified_model, resolve_version
from mlops.scoring.model import load_wrapper
from mlops.tracking import project_store_url, step_run


@dataclass(frozen=True)
class Explanation:
    """What ``mlops explain`` computed and logged."""

    name: str
    version: str
    run_id: str
    contributions: RowContributions


def explain_version(
    config: Config,
    name: str,
    *,
    alias: str | None = None,
    version: str | None = None,
    input_path: str | None = None,
    request_id: str | None = None,
) -> Explanation:
    """Per-row contributions of registered ``name`` (``version``, or ``alias``, default
    ``production``) for the rows of ``input_path`` (CSV or Parquet) or of one logged request
    (``request_id``, from the prediction log), logged as the table
    ``explain/contributions.json`` of a new run ``explain-<name>-v<version>``.

    The version is downloaded and its files verified against the checksum recorded at
    registration before anything of it is deserialised (as ``mlops score`` does).

    Example:
        >>> result = explain_version(load_config(), "churn-model", input_path="rows.csv")
        >>> result.contributions.top(3)
    """
    if (input_path is None) == (request_id is None):
        raise MlopsError("give the rows to explain: --input FILE or --request-id ID (one of them)")
    if request_id is not None:
        frame, logged_version = _logged_rows(config, name, request_id)
        if version is None and alias is None and logged_version.isdigit():
            version = logged_version  # the version that answered the request
    else:
        assert input_path is not None
        frame = _read_rows(input_path)
    version = resolve_version(name, alias=alias, version=version)
    with tempfile.TemporaryDirectory(prefix="mlops-explain-") as tmp:
        model_dir = _verified_model(name, version, Path(tmp) / "model")
        wrapper = load_wrapper(
            model_dir,
            {"model_name": name, "model_version": version, "max_rows": max(len(frame), 1)},
        )
        masked = (wrapper.meta.get("serving") or {}).get("sensitive_columns") or []
        if request_id is not None and masked:
            raise MlopsError(
                f"--request-id: the prediction log holds masked values of {masked}, so the rows "
                "it logged cannot be explained; pass the original rows with --input"
            )
        try:
            numeric, categorical = wrapper.contract.from_frame(frame)
        except MlflowException as exc:  # the contract's refusal, in its own words
            raise MlopsError(
                f"the rows to explain: {getattr(exc, 'detail', exc.message)}"
            ) from None
        X = pd.DataFrame(numeric, columns=wrapper.numeric)
        for j, col in enumerate(wrapper.categorical):
            X[col] = categorical[:, j] if categorical is not None else None
        try:
            explainer = Explainer.for_model(wrapper.pipeline, wrapper.meta)
        except ValueError as exc:
            raise MlopsError(f"{name} version {version} cannot explain rows: {exc}") from None
        contributions = explainer.explain(X[wrapper.features])
    with step_run(config, run_name=f"explain-{name}-v{version}") as run:
        mlflow.log_params(
            {
                "model_name": name,
                "model_version": version,
                "rows": len(frame),
                "source": f"request {request_id}" if request_id else Path(str(input_path)).name,
            }
        )
        # the contributions under their features' names, after four columns of our own (a
        # feature may be called "value" too: ours are prefixed, so no name can clash)
        table = pd.concat(
            [
                pd.DataFrame(
                    {
                        "_row": np.arange(len(contributions.output)),
                        "_explains": contributions.explains,
                        "_value": contributions.output,
                        "_expected_value": contributions.expected,
                    }
                ),
                pd.DataFrame(contributions.values, columns=contributions.features),
            ],
            axis=1,
        )
        mlflow.log_table(table, "explain/contributions.json")
        return Explanation(name, version, run.info.run_id, contributions)


def _read_rows(path: str) -> pd.DataFrame:
    try:
        if path.lower().endswith((".parquet", ".pq")):
            return pd.read_parquet(path)
        return pd.read_csv(path)
    except (OSError, ValueError) as exc:
        raise MlopsError(
            f"--input {path!r} cannot be read ({exc}); give a CSV with a header row or a "
            "Parquet file"
        ) from None


def _logged_rows(config: Config, name: str, request_id: str) -> tuple[pd.DataFrame, str]:
    """The features of the rows of logged request ``request_id`` of model ``name``, in order,
    and the version that answered it."""
    store = MonitoringStore(project_store_url(config.monitoring.log_url, LOG_FILE))
    p = PREDICTIONS
    names = ["row", "version", "layout", "numeric", "features"]
    query = (
        sa.select(*(p.c[n] for n in names))
        .where(p.c.request_id == request_id, p.c.model == name, p.c.shadow == sa.false())
        .where(p.c.status == 200)
        .order_by(p.c.row)
    )
    try:
        with store.engine.connect() as conn:
            logged = pd.DataFrame(conn.execute(query).all(), columns=names)
        if logged.empty:
            raise MlopsError(
                f"--request-id {request_id!r}: the prediction log has no answered request of "
                f"that id for model {name!r}; take the id from a served answer's request_id "
                "(monitoring on), or pass the rows with --input"
            )
        return store.features(logged).reset_index(drop=True), str(logged["version"].iloc[0])
    finally:
        store.engine.dispose()  # its connections closed now, not when a collector gets to them
