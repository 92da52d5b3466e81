"""The pyfunc wrapper that is logged, registered and served for every model family.

Everything a request needs is prepared once in ``load_context``: the fitted pipeline and its
NumPy form, the input contract (column order, which columns may be null, the row limit), the
label mapping and the name and version of the model. ``predict`` validates, transforms,
predicts and decodes with no file or network I/O. Invalid input raises ``MlflowException``
with ``INVALID_PARAMETER_VALUE``, which MLflow's scoring server answers with HTTP 400.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModel, PythonModelContext

from mlops.artifacts import CHECKSUM_TAG, checksum_of
from mlops.rules import RowRules, RowViolations
from mlops.serving.compiled import compile_pipeline
from mlops.serving.inputs import (
    Arrays,
    InputContract,
    InvalidInput,
    Unavailable,
    clip,
    explain_param,
    failed,
    unreadable,
)
from mlops.serving.onnx_runtime import OnnxScorer, load_runtime

logger = logging.getLogger(__name__)

# a server's callback for each scored request: (request id, numeric, categorical arrays)
Scored = Callable[[str, np.ndarray, "np.ndarray | None"], None]

PIPELINE_ARTIFACT = "pipeline"
METADATA_ARTIFACT = "metadata"
PREDICTION_COLUMN = "prediction"
PROBA_PREFIX = "proba_"
NAME_COLUMN = "model_name"
VERSION_COLUMN = "model_version"
VIOLATIONS_COLUMN = "violations"  # on_rule_violation=flag: the data rules each row broke
REQUEST_ID_COLUMN = "request_id"  # with monitoring on: the id `mlops feedback` joins labels on
# with {"params": {"explain": k}}: per row, what is explained, its value and expected value, the
# top k contributions per original feature and the sum of the rest (mlops.explain.RowContributions)
EXPLANATION_COLUMN = "explanation"
PROBA_KEY = "__proba__"
# a classifier's answer also carries each row's class as an index into ``classes`` (a batch
# engine builds its label column from it without converting a column of Python strings)
CLASS_KEY = "__class__"
# serving options: logged in metadata.json; a server may override each through its model
# config (SERVING_MODEL_CONFIG, or load_model(model_config=...))
DEFAULT_OPTIONS: dict[str, Any] = {
    "max_rows": 10_000,
    "impute_missing": False,
    "max_body_bytes": 10 * 1024 * 1024,
    "coerce_numbers": False,
    "on_rule_violation": "reject",  # a served row breaking a data rule: reject (400) | flag
    "runtime": "auto",  # auto | native | onnx (a version's ONNX export, see mlops.export)
    "onnx_variant": "float32",  # the export auto/onnx serve: float32 | int8 | fp16
    "max_explain": 20,  # the most contributions a request may ask for ({"params": {"explain": k}})
    "max_explain_rows": 100,  # the most rows one request may ask explanations of
    "model_name": "",
    "model_version": "",
    "model_checksum": "",  # from a server that verified a bundled copy (serve --model-dir)
    "monitoring": False,
    "monitoring_url": "",
    "sensitive_columns": [],
    "sensitive_mode": "hash",
    "mask_key_env": "MLOPS_MASK_KEY",
    "monitoring_queue_rows": 10_000,
}


class MlopsModel(PythonModel):
    """Preprocessing, model and label decoding as one MLflow pyfunc model."""

    def load_context(self, context: PythonModelContext) -> None:
        from mlops.artifacts import UntrustedArtifact, load_pipeline, verify_model_dir
        from mlops.serving import adapter

        missing = [
            a for a in (PIPELINE_ARTIFACT, METADATA_ARTIFACT) if a not in (context.artifacts or {})
        ]
        if missing:
            raise MlflowException(
                f"model artifacts {missing} are missing; re-log the model with "
                "mlops.serving.log_model"
            )
        with open(context.artifacts[METADATA_ARTIFACT]) as fh:
            meta = json.load(fh)
        # logged defaults (metadata.json), then what a server passed; an empty value keeps the
        # default
        given = {k: v for k, v in (context.model_config or {}).items() if v not in (None, "")}
        options = {**DEFAULT_OPTIONS, **(meta.get("serving") or {}), **given}
        serving = adapter.in_scoring_server()
        model_dir = Path(context.artifacts[METADATA_ARTIFACT]).resolve().parent.parent
        name, version = options.get("model_name"), options.get("model_version")
        recorded, registered = None, None  # registered: the version's ModelVersion, where looked up
        runtime = str(options.get("runtime") or "auto")
        downloaded = _downloaded_as(model_dir)
        if downloaded is not None and not (name and version):
            # loaded from models:/NAME/V or models:/NAME@ALIAS (in a server or not): that very
            # version's recorded checksum, wherever else its files are registered
            name, version = downloaded
            registered, recorded = _registered(name, version)
        elif not (name and version):
            name, version, registered = _identify(model_dir, meta, serving=serving)
            recorded = (registered.tags or {}).get(CHECKSUM_TAG) if registered else None
        elif serving and options.get("model_checksum"):
            # a server that verified a bundled copy itself names its checksum (no registry; its
            # ONNX export is looked up only when runtime onnx asks for it)
            recorded = options["model_checksum"]
            if runtime == "onnx":
                registered, _ = _registered(str(name), str(version))
        elif serving or runtime == "onnx":
            registered, recorded = _registered(str(name), str(version))
            recorded = recorded if serving else None
        try:
            if recorded:  # a registered version: every file as registered, before any is read
                verify_model_dir(model_dir, recorded, f"{name} version {version}")
            pipeline = load_pipeline(
                context.artifacts[PIPELINE_ARTIFACT], sha256=meta.get("pipeline_sha256")
            )
        except UntrustedArtifact as exc:
            raise MlflowException(str(exc)) from None
        estimator = pipeline.steps[-1][1]
        if "n_jobs" in estimator.get_params(
            deep=False
        ):  # one request is small: thread fan-out only adds latency
            estimator.set_params(n_jobs=1)
        self._configure(
            pipeline,
            meta,
            max_rows=options["max_rows"],
            impute_missing=options["impute_missing"],
            max_body_bytes=options["max_body_bytes"],
            coerce_numbers=options["coerce_numbers"],
            on_rule_violation=options["on_rule_violation"],
            model_name=str(name),
            model_version=str(version),
        )
        self.max_explain = int(options.get("max_explain") or DEFAULT_OPTIONS["max_explain"])
        self.max_explain_rows = int(
            options.get("max_explain_rows") or DEFAULT_OPTIONS["max_explain_rows"]
        )
        self.onnx = load_runtime(
            runtime,
            str(options.get("onnx_variant") or "float32"),
            name=str(name),
            version=str(version),
            registered=registered,
            numeric=self.numeric,
            categorical=self.categorical,
            n_classes=len(self.classes) if self.classes is not None else None,
        )
        self.runtime = "native" if self.onnx is None else f"onnx/{self.onnx.variant}"
        logger.info(
            "serving %s version %s %s",
            name,
            version,
            "natively" if self.onnx is None else f"with onnxruntime ({self.onnx.variant} export)",
        )
        if _truthy(options["monitoring"]) and serving:
            from mlops.monitoring.store import LOG_FILE
            from mlops.tracking import project_store_url

            # no URL given: the prediction log lives with this server's tracking store, where
            # `mlops monitor` on the same store looks for it
            self.enable_monitoring(
                project_store_url(options["monitoring_url"] or None, LOG_FILE),
                sensitive=options["sensitive_columns"] or (),
                sensitive_mode=options["sensitive_mode"] or "hash",
                mask_key_env=options["mask_key_env"] or DEFAULT_OPTIONS["mask_key_env"],
                capacity=int(
                    options["monitoring_queue_rows"] or DEFAULT_OPTIONS["monitoring_queue_rows"]
                ),
            )
        if serving:  # one strict contract on every path: the guard, then (by default) our parsing
            if os.environ.get("MLOPS_FAST_SERVING", "1") != "0":
                adapter.install_fast_path(self)
            else:
                adapter.install_guard()

    def _configure(
        self,
        pipeline: Any,
        meta: dict[str, Any],
        *,
        max_rows: int | None = None,
        impute_missing: bool | None = None,
        max_body_bytes: int | None = None,
        coerce_numbers: bool | None = None,
        on_rule_violation: str | None = None,
        model_name: str = "",
        model_version: str = "",
    ) -> None:
        self.pipeline = pipeline
        self.meta = meta
        self.task: str = meta["task"]
        self.numeric: list[str] = list(meta["numeric_columns"])
        self.categorical: list[str] = list(meta["categorical_columns"])
        self.features: list[str] = self.numeric + self.categorical
        nullable = self.features if _truthy(impute_missing) else meta.get("nullable_columns", [])
        self.contract = InputContract(
            self.numeric,
            self.categorical,
            nullable=nullable,
            max_rows=int(max_rows) if max_rows is not None else 10_000,
            coerce_numbers=_truthy(coerce_numbers),
        )
        self.max_body_bytes = int(max_body_bytes or DEFAULT_OPTIONS["max_body_bytes"])
        # explanations on request: the logged limits (a server's options override them at load)
        logged = {**DEFAULT_OPTIONS, **(meta.get("serving") or {})}
        self.max_explain = int(logged["max_explain"] or DEFAULT_OPTIONS["max_explain"])
        self.max_explain_rows = int(
            logged["max_explain_rows"] or DEFAULT_OPTIONS["max_explain_rows"]
        )
        self.monitor: Any = None
        self.classes = np.asarray(meta["classes"], dtype=object) if meta.get("classes") else None
        self.model_name, self.model_version = model_name, model_version
        self.estimator = pipeline.steps[-1][1]
        self.has_proba = self.classes is not None and hasattr(pipeline, "predict_proba")
        self.output_columns = [PREDICTION_COLUMN]
        if self.has_proba and self.classes is not None:
            self.output_columns += [f"{PROBA_PREFIX}{c}" for c in self.classes]
        self.output_columns += [NAME_COLUMN, VERSION_COLUMN]
        # data.rules on served rows: None (no work per request) without a rule on an input
        # column, or when configured to log a model (no on_rule_violation: its example rows are
        # training rows, which may break a rule within data.rules.tolerance)
        mode = on_rule_violation
        if mode not in (None, "reject", "flag"):
            raise MlflowException(
                f"serving option on_rule_violation is {mode!r}; use 'reject' (a 400) or 'flag' "
                f"(a '{VIOLATIONS_COLUMN}' output column)"
            )
        rules = meta.get("rules") if mode is not None else None
        self.rules = RowRules.build(rules, self.numeric, self.categorical)
        self.flag_violations = self.rules is not None and mode == "flag"
        if self.flag_violations:
            self.output_columns.append(VIOLATIONS_COLUMN)
        sample = pd.DataFrame(meta["sample"]) if meta.get("sample") else None
        self.compiled = compile_pipeline(pipeline, self.numeric, self.categorical, sample)
        # what scores (load_context may set the version's ONNX export): "native" | "onnx/<variant>"
        self.onnx = None
        self.runtime = "native"

    def enable_monitoring(
        self,
        url: str,
        *,
        sensitive: Any = (),
        sensitive_mode: str = "hash",
        capacity: int = 10_000,
        **options: Any,
    ) -> None:
        """Log every request from now on to the monitoring store at ``url`` (in the background).

        Done by ``load_context`` in a scoring server when the serving options say
        ``monitoring: true``; never while the registry's gates evaluate a model.
        """
        from mlops.db import mask_url
        from mlops.monitoring.logger import PredictionLogger

        self.monitor = PredictionLogger(
            url,
            model=self.model_name,
            version=self.model_version,
            numeric=self.numeric,
            categorical=self.categorical,
            classes=list(self.classes) if self.has_proba and self.classes is not None else None,
            sensitive=list(sensitive),
            sensitive_mode=sensitive_mode,
            capacity=capacity,
            **options,
        )
        if REQUEST_ID_COLUMN not in self.output_columns:
            self.output_columns.append(REQUEST_ID_COLUMN)
        logger.info(
            "prediction log on: %s as %s version %s",
            mask_url(url),
            self.model_name,
            self.model_version,
        )

    # A DataFrame hint is one MLflow does not turn into a schema: the logged signature stays
    # the one inferred from the training data.
    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        """Scores for a DataFrame (MLflow's own parsing, a notebook), checked by the same
        contract as a raw body: a refusal is an ``InvalidInput`` (400), a model failure a
        ``PredictionFailed`` (500). ``params={"explain": k}`` adds the ``explanation`` column
        (see :meth:`explain_rows`)."""
        k = explain_param(params, self.max_explain) if params else None
        if k is None:
            return pd.DataFrame(
                self.answer(lambda: self.contract.from_frame(model_input)),
                columns=self.output_columns,
            )
        result = self.answer(
            lambda: self._explainable(self.contract.from_frame(model_input)),
            then=lambda numeric, categorical: {
                EXPLANATION_COLUMN: self.explain_rows(numeric, categorical, k)
            },
        )
        frame = pd.DataFrame(result, columns=self.output_columns)
        frame[EXPLANATION_COLUMN] = result[EXPLANATION_COLUMN]
        return frame

    def respond(
        self,
        data: bytes | str,
        mime: str,
        *,
        request_id: str | None = None,
        scored: Scored | None = None,
    ) -> str:
        """The scoring server's JSON body for a raw request body (``{"predictions": [...]}``);
        ``request_id`` and ``scored`` as for :meth:`answer`.

        A JSON body with ``{"params": {"explain": k}}`` also gets an ``explanation`` per row
        (:meth:`explain_rows`); a body without ``"params"`` costs one substring test more."""
        if mime == JSON_MIME and _mentions_params(data):
            return self._respond_with_params(data, mime, request_id=request_id, scored=scored)
        result = self.answer(
            lambda: self.contract.parse(data, mime), request_id=request_id, scored=scored
        )
        return records_json([(name, result[name]) for name in self.output_columns])

    def _respond_with_params(
        self,
        data: bytes | str,
        mime: str,
        *,
        request_id: str | None,
        scored: Scored | None,
    ) -> str:
        asked: list[int | None] = [None]

        def parse() -> Arrays:  # a bad `explain` is refused like bad input (400, logged)
            arrays, params = self.contract.parse_with_params(data, mime)
            asked[0] = explain_param(params, self.max_explain)
            return arrays if asked[0] is None else self._explainable(arrays)

        def explain(numeric: np.ndarray, categorical: np.ndarray | None) -> dict[str, Any]:
            k = asked[0]
            return (
                {}
                if k is None
                else {EXPLANATION_COLUMN: self.explain_rows(numeric, categorical, k)}
            )

        result = self.answer(parse, request_id=request_id, scored=scored, then=explain)
        columns = [(name, result[name]) for name in self.output_columns]
        if EXPLANATION_COLUMN in result:
            columns.append((EXPLANATION_COLUMN, result[EXPLANATION_COLUMN]))
        return records_json(columns)

    def _explainable(self, arrays: Arrays) -> Arrays:
        """``arrays``, or the 400 for a request asking explanations of more rows than the
        serving option ``max_explain_rows`` (an explanation costs far more than an answer:
        Keras's kernel explainer calls the model hundreds of times a row), or the 501 of a
        server that cannot explain (no shap): refused before anything is scored."""
        self._explainer_once()
        rows = arrays[0].shape[0]
        limit = self.max_explain_rows
        if rows > limit:
            raise InvalidInput(
                f"params 'explain' explains at most {limit} rows per request (serving option "
                f"max_explain_rows), this one has {rows}; send fewer rows, or ask without "
                "'explain'"
            )
        return arrays

    def explain_rows(
        self, numeric: np.ndarray, categorical: np.ndarray | None, k: int
    ) -> np.ndarray:
        """Per row, a dict ``{"explains": what output, "value": it, "expected_value": ...,
        "contributions": [{"feature": ..., "contribution": ...}, ... the top k by size],
        "others": sum of the rest}``; ``expected_value + sum(contributions) + others ==
        value``. The explainer is built at the first call from the model's metadata alone."""
        explainer = self._explainer_once()
        try:
            if self.compiled is not None:  # the preprocessing as scoring runs it (no DataFrame)
                Xt = np.asarray(self.compiled.transform(numeric, categorical), dtype=float)
                contributions = explainer.explain_transformed(Xt)
            else:
                X = pd.DataFrame(numeric, columns=self.numeric)
                for j, col in enumerate(self.categorical):
                    assert categorical is not None  # parsed whenever the model has them
                    X[col] = categorical[:, j]
                contributions = explainer.explain(X[self.features])
            records = contributions.as_records(k)
        except Exception as exc:  # noqa: BLE001 - the model's failure, not the input's
            logger.exception("explanation failed")
            raise failed(exc) from exc
        out = np.empty(len(records), dtype=object)
        for i, record in enumerate(records):
            out[i] = record
        return out

    def _explainer_once(self) -> Any:
        explainer = getattr(self, "explainer", None)
        if explainer is not None:
            return explainer
        with _EXPLAINER_LOCK:
            explainer = getattr(self, "explainer", None)
            if explainer is None:
                try:
                    from mlops.explain import Explainer

                    explainer = Explainer.for_model(self.pipeline, self.meta)
                except ImportError as exc:
                    raise Unavailable(
                        "explanations need the shap package in the serving environment "
                        f"({clip(exc)}); install shap where the model is served, or ask "
                        "without params 'explain'"
                    ) from exc
                except ValueError as exc:
                    raise InvalidInput(
                        f"model version {self.model_version} cannot explain its answers ({exc}); "
                        "ask without params 'explain'"
                    ) from exc
                self.explainer = explainer
        return explainer

    def answer(
        self,
        parse: Callable[[], Arrays],
        *,
        request_id: str | None = None,
        scored: Scored | None = None,
        then: Callable[[np.ndarray, np.ndarray | None], dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """Parse, validate and score one request; with monitoring on, also log it (and its
        failure). ``then`` adds columns computed from the scored rows (explanations) within
        the same step, so that its failure is the request's, logged with its status.

        Whatever goes wrong leaves as an ``MlflowException`` with the right status: the
        input's fault is a 400 (``InvalidInput``, a reader's unexpected error included),
        the model's a 500 (``PredictionFailed``, the cause chained); the prediction log
        records that status.

        A server may give the ``request_id`` to log under (else a new one), and a ``scored``
        callback that gets it with the parsed arrays of a scored request (``mlops serve``
        counts the rows and hands them to a shadow); it must be quick and must not raise.
        """
        monitor = self.monitor
        started = time.perf_counter()
        try:
            numeric, categorical = _parsed(parse)
            found = None if self.rules is None else self._ruled(numeric, categorical)
            result = _scored(self, numeric, categorical)
            if then is not None:
                result.update(then(numeric, categorical))
        except MlflowException as exc:
            if monitor is not None:
                monitor.submit(
                    request_id or os.urandom(16).hex(),
                    latency_ms=(time.perf_counter() - started) * 1000,
                    status=exc.get_http_status_code(),
                    error=getattr(exc, "detail", exc.message)[:1000],
                    violations=getattr(exc, "violations", None),
                )
            raise
        if self.flag_violations:
            result[VIOLATIONS_COLUMN] = (
                found.labels() if found is not None else np.full(numeric.shape[0], "", dtype=object)
            )
        if scored is not None:
            request_id = request_id or os.urandom(16).hex()
            scored(request_id, numeric, categorical)
        if monitor is None:
            return result
        # 128 random bits, as uuid4 has, at a quarter of its cost
        request_id = request_id or os.urandom(16).hex()
        result[REQUEST_ID_COLUMN] = np.full(numeric.shape[0], request_id, dtype=object)
        monitor.submit(
            request_id,
            latency_ms=(time.perf_counter() - started) * 1000,
            numeric=numeric,
            categorical=categorical,
            predictions=result[PREDICTION_COLUMN],
            scores=result.get(PROBA_KEY),
            violations=None if self.rules is None else 0 if found is None else found.counts,
        )
        return result

    def _ruled(self, numeric: np.ndarray, categorical: np.ndarray | None) -> RowViolations | None:
        """The data rules the rows broke (``flag``), or the 400 naming the first (``reject``)."""
        assert self.rules is not None  # called only when the model has row rules
        found = self.rules.check(numeric, categorical)
        if found is not None and not self.flag_violations:
            raise RuleViolated(found.message(numeric, categorical), found.rows)
        return found

    def answer_many(self, parts: list[tuple[str, np.ndarray, np.ndarray | None]]) -> list[bool]:
        """Score several parsed requests in one call (a shadow's queue) and, with monitoring
        on, log each under its own request id; True for each request scored.

        One model call for the lot is what makes a shadow cheap: its cost per request is a
        slice, not a call. Each request's logged latency is its share (by rows) of the call.
        Should the call fail, each request is answered again on its own, so a failure is
        logged against the request that caused it.
        """
        if not parts:
            return []
        started = time.perf_counter()
        try:
            numeric = np.concatenate([n for _, n, _ in parts])
            categorical = None
            if parts[0][2] is not None:
                categorical = np.concatenate([c for _, _, c in parts])
            # reject mode: a broken rule refuses its request alone, on the one-by-one path
            found = None if self.rules is None else self._ruled(numeric, categorical)
            result = self.score(numeric, categorical)
        except Exception:  # noqa: BLE001 - one by one: each failure logged against its request
            outcomes = []
            for rid, n, c in parts:
                try:
                    self.answer(lambda n=n, c=c: (n, c), request_id=rid)  # type: ignore[misc]
                    outcomes.append(True)
                except MlflowException:
                    outcomes.append(False)
            return outcomes
        monitor = self.monitor
        if monitor is not None:
            elapsed_ms = (time.perf_counter() - started) * 1000
            total = numeric.shape[0]
            scores = result.get(PROBA_KEY)
            counts = None if self.rules is None else 0 if found is None else found.counts
            start = 0
            for rid, n, c in parts:
                stop = start + n.shape[0]
                monitor.submit(
                    rid,
                    latency_ms=elapsed_ms * n.shape[0] / max(total, 1),
                    numeric=n,
                    categorical=c,
                    predictions=result[PREDICTION_COLUMN][start:stop],
                    scores=None if scores is None else scores[start:stop],
                    violations=counts[start:stop] if isinstance(counts, np.ndarray) else counts,
                )
                start = stop
        return [True] * len(parts)

    # ---- model ----
    def score(self, numeric: np.ndarray, categorical: np.ndarray | None) -> dict[str, Any]:
        """Predictions as output columns (``prediction``, ``proba_<class>``, name, version)."""
        if self.onnx is not None:
            return self._scored_onnx(self.onnx, numeric, categorical)
        if self.compiled is not None:
            X = self.compiled.transform(numeric, categorical)
            model = self.estimator
        else:
            X = pd.DataFrame(numeric, columns=self.numeric)
            if self.categorical:
                assert categorical is not None  # parsed whenever the model has categorical columns
                for j, col in enumerate(self.categorical):
                    X[col] = categorical[:, j]
            model = self.pipeline
        n = numeric.shape[0]
        out: dict[str, Any] = {}
        if self.task == "classification":
            classes = self.classes
            assert classes is not None  # a classifier's metadata lists its classes
            if self.has_proba:
                proba = np.asarray(model.predict_proba(X))
                out[PROBA_KEY] = proba
                out[CLASS_KEY] = index = np.argmax(proba, axis=1)
                out[PREDICTION_COLUMN] = classes[index]
                for i, col in enumerate(self.output_columns[1 : 1 + proba.shape[1]]):
                    out[col] = proba[:, i]
            else:
                out[CLASS_KEY] = index = np.asarray(model.predict(X), dtype=int)
                out[PREDICTION_COLUMN] = classes[index]
        else:
            out[PREDICTION_COLUMN] = np.asarray(model.predict(X), dtype=float).reshape(-1)
        return self._named(out, n)

    def _scored_onnx(
        self, onnx: OnnxScorer, numeric: np.ndarray, categorical: np.ndarray | None
    ) -> dict[str, Any]:
        """:meth:`score` through the version's ONNX export: the same columns, decoded alike."""
        values = onnx.run(numeric, categorical)
        out: dict[str, Any] = {}
        if self.task != "classification":
            out[PREDICTION_COLUMN] = values
        else:
            classes = self.classes
            assert classes is not None  # a classifier's metadata lists its classes
            out[CLASS_KEY] = index = np.argmax(values, axis=1)
            out[PREDICTION_COLUMN] = classes[index]
            if self.has_proba:
                out[PROBA_KEY] = values
                for i, col in enumerate(self.output_columns[1 : 1 + values.shape[1]]):
                    out[col] = values[:, i]
        return self._named(out, numeric.shape[0])

    def _named(self, out: dict[str, Any], n: int) -> dict[str, Any]:
        out[NAME_COLUMN] = self._constant(NAME_COLUMN, self.model_name, n)
        out[VERSION_COLUMN] = self._constant(VERSION_COLUMN, self.model_version, n)
        return out

    def _constant(self, key: str, value: Any, n: int) -> np.ndarray:
        """``n`` rows of ``value`` (a read-only view of one array kept per column and grown as
        needed): filling a fresh object array per batch costs more than the model itself on a
        large batch of a linear model."""
        cache: dict[str, np.ndarray] = self.__dict__.setdefault("_constants", {})
        column = cache.get(key)
        if column is None or len(column) < n or column[0] != value:
            column = np.full(max(n, 1024), value, dtype=object)
            column.flags.writeable = False
            cache[key] = column
        return column[:n]


class RuleViolated(InvalidInput):
    """A served row broke a data rule (``on_rule_violation: reject``): the contract's 400,
    with the count of rows of the request that broke one (for the prediction log)."""

    def __init__(self, message: str, violations: int) -> None:
        super().__init__(message)
        self.violations = violations


_EXPLAINER_LOCK = threading.Lock()
JSON_MIME = "application/json"
_PARAMS, _PARAMS_BYTES = '"params"', b'"params"'


def _mentions_params(data: bytes | str) -> bool:
    """Whether a JSON body may hold ``"params"`` (a substring test: no parsing)."""
    return _PARAMS_BYTES in data if isinstance(data, bytes) else _PARAMS in data


def _truthy(value: Any) -> bool:
    return value.strip().lower() in ("1", "true", "yes") if isinstance(value, str) else bool(value)


def records_json(columns: list[tuple[str, np.ndarray]]) -> str:
    """``json.dumps({"predictions": [{column: value, ...} per row]})``, the same text, built
    column by column: each numeric column is encoded by one ``json.dumps`` of its list (a
    number, ``null`` or ``true`` never holds ``", "``, so the text splits into values), each
    other column through a cache of its distinct values; rows are then one ``%`` format each.
    On a 1000-row answer that is a fraction of encoding 1000 dicts."""
    names = [name for name, _ in columns]
    encoded: list[list[str]] = []
    try:
        for _, array in columns:
            values = _jsonable(array)
            if array.dtype.kind in "biuf":
                text = json.dumps(values)[1:-1]
                encoded.append(text.split(", ") if text else [])
            else:
                cache = {v: json.dumps(v) for v in set(values)}
                encoded.append([cache[v] for v in values])
    except TypeError:  # an unhashable value: the plain way
        table = zip(*(_jsonable(a) for _, a in columns), strict=True)
        return json.dumps({"predictions": [dict(zip(names, row, strict=True)) for row in table]})
    template = _row_template(tuple(names))
    rows = [template % row for row in zip(*encoded, strict=True)]
    return '{"predictions": [' + ", ".join(rows) + "]}"


@functools.lru_cache(maxsize=64)
def _row_template(names: tuple[str, ...]) -> str:
    """``{"name": %s, ...}`` for one answer row (a model's output columns: made once)."""
    return "{" + ", ".join(json.dumps(n).replace("%", "%%") + ": %s" for n in names) + "}"


def _jsonable(values: np.ndarray) -> list[Any]:
    """A column as JSON values: a non-finite float (a model's NaN) is null, never ``NaN``."""
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        out = values.astype(object)
        out[~np.isfinite(values)] = None
        return out.tolist()
    return values.tolist()


def _downloaded_as(model_dir: Path) -> tuple[str, str] | None:
    """The registered name and version MLflow downloaded ``model_dir`` as, from the note it
    writes into a download of a ``models:/`` URI (an alias resolved to its version)."""
    import yaml

    from mlops.artifacts import DOWNLOAD_NOTE

    try:
        note = yaml.safe_load((model_dir / DOWNLOAD_NOTE).read_text())
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(note, dict):
        return None
    name, version = note.get("model_name"), note.get("model_version")
    if not name or not re.fullmatch(r"\d+", str(version or "")):
        return None
    return str(name), str(version)


def _registered(name: str, version: str) -> tuple[Any, str | None]:
    """Registered ``name`` version ``version`` (an MLflow ``ModelVersion``: its tags name the
    recorded checksum and any ONNX export, its run holds the export) and its recorded checksum;
    one registry call at load. (None, None) where the store cannot be reached."""
    try:
        registered = mlflow.MlflowClient().get_model_version(name, version)
    except Exception as exc:  # the store may be unreachable from the server
        logger.warning("could not read the recorded checksum of %s v%s: %s", name, version, exc)
        return None, None
    return registered, checksum_of(registered)


def _identify(model_dir: Path, meta: dict[str, Any], *, serving: bool) -> tuple[str, str, Any]:
    """The registered name and version this model was loaded as, and the registered version
    (its tags: the recorded checksum, any ONNX export), looked up once at load.

    Outside a scoring server (a notebook, batch scoring) no store is contacted: the logged
    model id stands in for the version, and only the pipeline file's own checksum is checked.
    """
    from mlflow.models import Model

    mlmodel = Model.load(str(model_dir / "MLmodel"))
    fallback = (
        meta.get("registered_model_name") or "unregistered",
        mlmodel.model_id or mlmodel.run_id or "unknown",
        None,
    )
    # a run id is hexadecimal: anything else in the MLmodel file is not put into a filter
    if not serving or not mlmodel.run_id or not _HEX.fullmatch(str(mlmodel.run_id)):
        return fallback
    try:
        client = mlflow.MlflowClient()
        versions = [
            v
            for v in client.search_model_versions(f"run_id = '{mlmodel.run_id}'")
            if not mlmodel.model_id or getattr(v, "model_id", None) in (None, mlmodel.model_id)
        ]
    except Exception as exc:  # the store may be unreachable from the server: serve anyway
        logger.warning(
            "could not look up the registered version of this model (%s); answering as %s",
            exc,
            fallback[:2],
        )
        return fallback
    if not versions:
        return fallback
    preferred = [v for v in versions if v.name == meta.get("registered_model_name")] or versions
    best = max(preferred, key=lambda v: int(v.version))
    return best.name, str(best.version), best


_HEX = re.compile(r"[0-9a-f]{1,64}")


def _parsed(parse: Callable[[], Arrays]) -> Arrays:
    """``parse()``; a reader's unexpected error on this input is still the input's fault."""
    try:
        return parse()
    except MlflowException:
        raise
    except Exception as exc:  # noqa: BLE001 - a 400 that says what broke, logged for us
        logger.warning("input could not be read: %s", clip(exc), exc_info=True)
        raise unreadable(exc) from exc


def _scored(
    model: MlopsModel, numeric: np.ndarray, categorical: np.ndarray | None
) -> dict[str, Any]:
    """``model.score``; any failure is the server's (500), without a traceback in the answer."""
    try:
        return model.score(numeric, categorical)
    except InvalidInput:  # the input's fault found while scoring (text the runtime cannot take)
        raise
    except Exception as exc:  # noqa: BLE001 - a bug or a model failure: say so, keep serving
        logger.exception("prediction failed")
        raise failed(exc) from exc
