"""Typed, validated configuration: loaded once from ``conf/`` and passed down.

``load_config()`` reads the experiment YAML, merges the chosen model family's default
hyperparameters from ``conf/models/<family>.yaml``, applies ``key=value`` overrides (dotted
keys, values parsed as YAML) and validates the result into a frozen :class:`Config`.
Unknown keys, wrong types and invalid YAML fail with the file, the key and what was expected.
"""

from __future__ import annotations

import copy
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from mlops.errors import ConfigError

logger = logging.getLogger(__name__)

# the defaults ship inside the package (mlops/conf in a wheel; the checkout's conf/ otherwise)
_INSTALLED_CONF = Path(__file__).resolve().parent / "conf"
_SOURCE_CONF = Path(__file__).resolve().parent.parent / "conf"
CONFIG_ARTIFACT = "config.yaml"  # the full resolved config, logged on every training and tuning run


class _Strict(BaseModel):
    # kedro-mlflow's habit: unknown keys are an error, not silently ignored.
    model_config = ConfigDict(extra="forbid", frozen=True)


class SplitConfig(_Strict):
    train: float = Field(0.7, gt=0, lt=1)
    validation: float = Field(0.2, gt=0, lt=1)
    test: float = Field(0.1, gt=0, lt=1)

    @model_validator(mode="after")
    def _sums_to_one(self) -> SplitConfig:
        total = self.train + self.validation + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(
                f"train + validation + test must be 1.0, got {total:g}; adjust the three fractions"
            )
        return self


class ColumnRule(_Strict):
    """Data quality rules for one column (``data.rules.columns.<name>``)."""

    min: float | None = None  # values below are a violation
    max: float | None = None  # values above are a violation
    allowed: list[Any] | None = None  # any other (non-null) value is a violation
    not_null: bool = False  # a null is a violation
    max_null_share: float | None = Field(None, ge=0, le=1)  # of a dataset (not checked per row)

    @model_validator(mode="after")
    def _consistent(self) -> ColumnRule:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"'min' ({self.min:g}) must not be above 'max' ({self.max:g})")
        if self.allowed is not None and not self.allowed:
            raise ValueError("'allowed' must list at least one value (or be left out)")
        return self


class RulesConfig(_Strict):
    """Data quality rules: checked at prepare and train, written into the model's contract and
    checked again on every served row."""

    columns: dict[str, ColumnRule] = Field(default_factory=dict)
    max_duplicate_share: float | None = Field(None, ge=0, le=1)  # per dataset
    # the share of rows that may break row rules before prepare/train fails (0: any breaks it)
    tolerance: float = Field(0.0, ge=0, le=1)


class DataConfig(_Strict):
    dataset: str = "sklearn:breast_cancer"
    target: str | None = None
    task: Literal["auto", "classification", "regression"] = "auto"
    categorical: list[str] = Field(default_factory=list)
    split: SplitConfig = Field(default_factory=SplitConfig)
    max_columns: int = Field(10_000, gt=0)  # a file with more columns is refused before it is read
    # the database a ``sql:SELECT ...`` dataset is read from (SQLAlchemy URL; a password as ${VAR})
    sql_url: str | None = None
    # per column: {transform: NAME, ...its options} (see mlops/features.py and conf/default.yaml)
    features: dict[str, dict[str, Any]] = Field(default_factory=dict)
    rules: RulesConfig = Field(default_factory=RulesConfig)
    # each training run stores its splits as Parquet up to this size; beyond: source and digest
    log_data_max_mb: float = Field(50.0, ge=0)

    @field_validator("features")
    @classmethod
    def _known_features(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        if not value:
            return value
        from mlops.features import validate_features  # lazily: it imports scikit-learn

        return validate_features(value)


class ExportConfig(_Strict):
    """``mlops export``: ONNX conversion of a registered version, with parity checked."""

    opset: int = Field(17, ge=13)  # the ONNX operator set the graph targets
    # float32 parity: probabilities (or regression values) within this of the native model's
    tolerance: float = Field(1e-4, gt=0)
    # a quantized (int8/fp16) export may lose at most this much accuracy (or add this much RMSE)
    max_metric_drop: float = Field(0.005, ge=0)


class ExplainConfig(_Strict):
    """Global explanations logged by every training run, and per-row ones on request."""

    enabled: bool = True  # permutation importance and SHAP on every training run
    permutation_repeats: int = Field(5, gt=0)
    background_rows: int = Field(100, gt=0)  # SHAP background sample drawn from training data
    sample_rows: int = Field(200, gt=0)  # validation rows explained for the global summary
    kernel_samples: int = Field(200, gt=0)  # kernel/deep explainers: model calls per explained row
    max_top_k: int = Field(20, gt=0)  # the most contributions a request may ask for
    max_rows: int = Field(100, gt=0)  # the most rows one request may ask explanations of


class ModelConfig(_Strict):
    family: str = "logreg"
    params: dict[str, Any] = Field(default_factory=dict)


class Threshold(_Strict):
    """A validation gate as data: ``metric`` must be at or past ``threshold``."""

    metric: str
    threshold: float
    higher_is_better: bool = True


class StagingGates(_Strict):
    classification: list[Threshold] = Field(
        default_factory=lambda: [Threshold(metric="validation_accuracy", threshold=0.8)]
    )
    regression: list[Threshold] = Field(
        default_factory=lambda: [Threshold(metric="validation_r2", threshold=0.0)]
    )


class ProductionGates(_Strict):
    # accuracy | f1 | rmse | mae | r2, measured now on the challenger's held-out test split
    metric_classification: Literal["accuracy", "f1"] = "accuracy"
    metric_regression: Literal["rmse", "mae", "r2"] = "rmse"
    margin: float = 0.0  # the challenger must beat the champion by at least this
    tolerance: float | None = None  # ...or be no worse than this (None: the margin rule alone)
    # on live traffic (a split or shadow): the challenger must not be significantly worse than
    # production on the labelled predictions of the last live_window (one-sided test at
    # live_alpha; fewer than monitoring.compare_min_labels labels per version: refused)
    live_comparison: bool = False
    live_window: str = "24h"
    live_alpha: float = Field(0.05, gt=0, lt=1)

    @field_validator("live_window")
    @classmethod
    def _a_duration(cls, value: str) -> str:
        try:
            parse_duration(value, "live_window")
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return value


class RegistryConfig(_Strict):
    model_name: str = "mlops-model"
    # None: beside the tracking store (see mlops.tracking.project_store_url)
    audit_url: str | None = None
    staging: StagingGates = Field(default_factory=StagingGates)
    production: ProductionGates = Field(default_factory=ProductionGates)


class ServingConfig(_Strict):
    max_rows: int = Field(10_000, gt=0)
    impute_missing: bool = False
    max_body_bytes: int = Field(10 * 1024 * 1024, gt=0)  # larger request bodies get a 413
    coerce_numbers: bool = False  # true: numeric strings ("1.5") and booleans accepted as numbers
    reload_interval: float = Field(10.0, gt=0)  # seconds between mlops serve's alias checks
    shadow_queue: int = Field(1000, gt=0)  # requests waiting for a shadow; beyond: dropped, counted
    # a served row that breaks a data rule: reject (400 naming column, rule, value) | flag
    # (answered, with a ``violations`` column)
    on_rule_violation: Literal["reject", "flag"] = "reject"
    # auto: ONNX Runtime where the version has an export that passed parity, else native |
    # native (scikit-learn / Keras) | onnx (the export, or no start)
    runtime: Literal["auto", "native", "onnx"] = "auto"
    onnx_variant: Literal["float32", "int8", "fp16"] = "float32"  # which export auto/onnx use


class TeamServerConfig(_Strict):
    """``mlops server``: the team's MLflow tracking and registry server (see the README)."""

    # PostgreSQL for runs, registry and audit trail; a password as ${VAR} or in PGPASSWORD
    backend_store_uri: str = "postgresql+psycopg://postgres@127.0.0.1:5432/mlflow"
    # where artifacts go, proxied by the server: s3://bucket/prefix (MLFLOW_S3_ENDPOINT_URL
    # for any S3-compatible store) or a local folder
    artifacts_destination: str = "s3://mlflow/artifacts"
    auth_database_uri: str | None = None  # users and permissions; None: the backend store
    admin_username: str = "admin"
    admin_password_env: str = "MLOPS_ADMIN_PASSWORD"  # the variable that holds it; no default
    default_permission: Literal["READ", "USE", "EDIT", "MANAGE", "NO_PERMISSIONS"] = "READ"
    host: str = "127.0.0.1"
    port: int = Field(5000, gt=0, lt=65536)
    workers: int = Field(2, gt=0)
    # a verified login is remembered this long in each worker (0: every request checks the
    # password hash, about 0.3 s of CPU); a changed password or removed user may still be
    # accepted by a worker for this long
    auth_cache_seconds: int = Field(60, ge=0)
    # model files the server read from S3, kept on its disk (shared by its workers) for the next
    # download of the same version through mlops's files endpoint (0: none kept)
    file_cache_mb: int = Field(256, ge=0)

    @field_validator("admin_password_env")
    @classmethod
    def _a_variable_name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
            raise ValueError(
                f"{value!r} is not an environment variable name; name the variable that holds "
                "the admin password (never the password itself), e.g. MLOPS_ADMIN_PASSWORD"
            )
        return value


class ParamSpace(_Strict):
    """One hyperparameter's search range (see ``conf/search_spaces/``)."""

    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list[Any] | None = None
    # tuning.sampler=grid: points tried between low and high of a float without a step (evenly
    # spaced, or geometrically with log); ints and stepped floats try every step
    grid: int = Field(5, ge=2)

    @model_validator(mode="after")
    def _consistent(self) -> ParamSpace:
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("a categorical parameter needs a non-empty 'choices' list")
            return self
        if self.low is None or self.high is None:
            raise ValueError(f"a {self.type} parameter needs 'low' and 'high'")
        if not self.low < self.high:
            raise ValueError(f"'low' ({self.low:g}) must be below 'high' ({self.high:g})")
        if self.log and self.low <= 0:
            raise ValueError(f"log scale needs 'low' > 0, got {self.low:g}")
        if self.step is not None and (self.step <= 0 or self.log):
            raise ValueError("'step' must be > 0 and cannot be combined with log scale")
        if self.type == "int" and (self.low != int(self.low) or self.high != int(self.high)):
            raise ValueError("an int parameter needs whole-number 'low' and 'high'")
        return self


class ScoringConfig(_Strict):
    """``mlops score``: batch scoring of tables with a registered version."""

    chunk_rows: int = Field(100_000, gt=0)  # pandas engine: the most rows held at once
    engine: Literal["pandas", "spark"] = "pandas"
    spark_master: str = "local[2]"  # any Spark master URL: spark://host:7077, yarn, k8s://...
    spark_driver_memory: str = "1g"


class TuningConfig(_Strict):
    n_trials: int = Field(20, gt=0)
    timeout: float | None = Field(None, gt=0)
    storage: str | None = None  # None: in memory; sqlite:///optuna.db; postgresql://...
    study_name: str | None = None  # default: "<experiment>-<family>"
    sampler: Literal["tpe", "random", "grid"] = "tpe"
    pruner: Literal["median", "hyperband", "none"] = "median"
    cv_folds: int = Field(3, ge=2)  # scikit-learn families: fold scores feed the pruner
    heartbeat_interval: int = Field(10, gt=0)
    grace_period: int = Field(30, gt=0)
    register_best: bool = True
    log_trials: bool = True  # one nested MLflow run per trial (off: only the parent run)
    # who writes the trial runs: a child process (off the training thread's GIL; costs one MLflow
    # import, ~4 s of CPU, per search), a thread of the tuning process, or auto: the process for a
    # study of one process (memory/SQLite storage, a spare core likely), the thread for a study
    # on a database server (many workers, usually one per core, no core to spare)
    trial_writer: Literal["auto", "process", "thread"] = "auto"
    search_space: dict[str, ParamSpace] = Field(default_factory=dict)


class AlertRule(_Strict):
    """An alert: ``metric`` (a check metric; ``psi/*`` matches every feature) above or below a
    bound."""

    name: str
    metric: str
    above: float | None = None
    below: float | None = None
    auto_rollback: bool = False  # also move production back to the version it replaced
    # fewer requests in the window: the rule does not fire (the check says so). Requests refused
    # as the client's error (4xx) do not count, except for a rule on client_error_rate.
    min_requests: int = Field(100, ge=0)

    @model_validator(mode="after")
    def _one_bound(self, info: ValidationInfo) -> AlertRule:
        if (self.above is None) == (self.below is None):
            raise ValueError(f"rule '{self.name}' needs exactly one of 'above' or 'below'")
        if self.metric == "error_rate" and not _logged(info):
            raise ValueError(
                f"rule '{self.name}': metric 'error_rate' no longer exists: it mixed the clients' "
                "errors (4xx, which any client can cause) with the server's (5xx); use "
                "server_error_rate (5xx among the requests the model accepted) or "
                "client_error_rate (4xx among all requests)"
            )
        return self


def _default_rules() -> list[AlertRule]:
    return [
        AlertRule(name="feature_drift", metric="psi/*", above=0.2),
        AlertRule(name="prediction_drift", metric="prediction_psi", above=0.2),
        AlertRule(name="accuracy_drop", metric="accuracy_drop", above=0.05),
        AlertRule(name="latency_p99", metric="latency_p99_ms", above=250.0),
        AlertRule(name="server_error_rate", metric="server_error_rate", above=0.01),
    ]


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str | float | int, what: str = "window") -> float:
    """Seconds in ``90s``, ``5m``, ``1h``, ``2d`` (or a plain number of seconds)."""
    if isinstance(text, (int, float)):
        seconds = float(text)
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", str(text))
        if not match:
            raise ConfigError(f"{what} '{text}' is not a duration; write it like 90s, 5m, 1h or 2d")
        seconds = float(match.group(1)) * _UNITS[match.group(2) or "s"]
    if seconds <= 0:
        raise ConfigError(f"{what} '{text}' must be longer than zero")
    return seconds


class MonitoringConfig(_Strict):
    enabled: bool = False  # log every served prediction (model config of the logged model)
    log_url: str | None = (
        None  # SQLAlchemy URL of the prediction log; None: beside the tracking store
    )
    sensitive_columns: list[str] = Field(default_factory=list)
    # hash: HMAC-SHA256 keyed by the variable named in mask_key_env (no key set: masked as ***)
    sensitive_mode: Literal["hash", "mask"] = "hash"
    mask_key_env: str = "MLOPS_MASK_KEY"  # the environment variable holding the hashing key
    queue_rows: int = Field(
        10_000, gt=0
    )  # rows buffered in the server process before new ones are dropped
    window: str = "1h"  # mlops monitor: the span of predictions one check looks at
    min_rows: int = Field(100, gt=0)  # fewer predictions than this: drift is not computed
    min_labels: int = Field(30, gt=0)  # fewer labelled predictions: accuracy is not computed
    # mlops monitor --compare, live_comparison gate: fewer labelled predictions on an arm, the
    # difference between the arms is not tested
    compare_min_labels: int = Field(100, ge=2)
    bins: int = Field(10, ge=2)  # reference histogram bins (quantiles of the training data)
    webhook: str | None = None  # alerts are POSTed here as JSON
    rules: list[AlertRule] = Field(default_factory=_default_rules)

    @field_validator("window")
    @classmethod
    def _a_duration(cls, value: str) -> str:
        try:
            parse_duration(value)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("mask_key_env")
    @classmethod
    def _a_variable_name(cls, value: str) -> str:
        if not _ENV_NAME.fullmatch(value):
            raise ValueError(
                "must be the name of an environment variable (letters, digits and _, not "
                "starting with a digit), e.g. MLOPS_MASK_KEY; the key itself goes in that "
                "variable, never in the config"
            )
        return value

    @field_validator("webhook")
    @classmethod
    def _http_only(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and not _logged(info):
            check_webhook_url(value)
        return value


def _logged(info: ValidationInfo) -> bool:
    """Validating a config logged by an older mlops (``read_resolved_config``): what is no longer
    accepted in a new config is read as it was (it is read for its data settings, not run)."""
    return bool(info.context and info.context.get("logged"))


class Config(_Strict):
    """The whole experiment configuration (see ``conf/default.yaml``)."""

    experiment: str = "mlops"
    seed: int = 42
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    serving: ServingConfig = Field(default_factory=ServingConfig)
    tuning: TuningConfig = Field(default_factory=TuningConfig)
    monitoring: MonitoringConfig = Field(default_factory=MonitoringConfig)
    server: TeamServerConfig = Field(default_factory=TeamServerConfig)
    scoring: ScoringConfig = Field(default_factory=ScoringConfig)
    explain: ExplainConfig = Field(default_factory=ExplainConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)

    def flat(self) -> dict[str, Any]:
        """The config as ``{"dotted.key": value}``, credentials in its URLs hidden (for showing
        or logging; ``${VAR}`` placeholders are kept as written)."""
        flat = _flatten(self.model_dump())
        for section, key in _URL_KEYS:
            if flat.get(f"{section}.{key}"):
                flat[f"{section}.{key}"] = redact_url(flat[f"{section}.{key}"])
        return flat

    def params(self, *, tuning: bool = False, model_params: bool = True) -> dict[str, Any]:
        """What a person compares between runs: model, data and split (and search) settings.

        Everything else (gates, monitoring rules, stores) is in the run's ``config.yaml``.
        """
        out: dict[str, Any] = {
            "model.family": self.model.family,
            "seed": self.seed,
            "data.dataset": self.data.dataset,
            "data.target": self.data.target,
            "data.task": self.data.task,
            "data.categorical": ",".join(self.data.categorical),
            "data.split": f"{self.data.split.train:g}/{self.data.split.validation:g}/"
            f"{self.data.split.test:g}",
        }
        if model_params:
            out.update({f"model.params.{k}": v for k, v in sorted(self.model.params.items())})
        if tuning:
            t = self.tuning
            out.update(
                {
                    "tuning.n_trials": t.n_trials,
                    "tuning.timeout": t.timeout,
                    "tuning.sampler": t.sampler,
                    "tuning.pruner": t.pruner,
                    "tuning.cv_folds": t.cv_folds,
                    "tuning.search_space": ",".join(sorted(t.search_space)),
                }
            )
        # no URL is among them; should one ever be (a dataset URL, say), it is logged redacted
        return {
            k: ("" if v is None else redact_url(v) if isinstance(v, str) and "://" in v else v)
            for k, v in out.items()
        }

    def to_yaml(self) -> str:
        """The whole resolved config as YAML, credentials in its URLs hidden (for a run artifact).

        ``read_resolved_config`` reads it back; a URL that named its secrets as ``${VAR}``
        still connects where the variables are set, one that held them literally shows ``***``
        in their place and is for a person to read, not to connect with.
        """
        tree = self.model_dump(mode="json")
        for section, key in _URL_KEYS:
            if tree[section].get(key):
                tree[section][key] = redact_url(tree[section][key])
        return yaml.safe_dump(tree, sort_keys=False)


_URL_KEYS = (
    ("data", "sql_url"),
    ("registry", "audit_url"),
    ("monitoring", "log_url"),
    ("monitoring", "webhook"),
    ("tuning", "storage"),
    ("server", "backend_store_uri"),
    ("server", "auth_database_uri"),
)


# ---- secrets in URLs ----
# A configured URL may name a secret instead of holding it: ``${VAR}`` is kept as written in
# everything logged and replaced by the environment's value only when connecting or posting
# (mlops.db.expand_env). A literal secret (a password, a token in the query string or in the
# userinfo of a web URL) is shown as *** wherever the URL is logged or shown.
PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_NAMED = re.compile(r"(?:\$\{[A-Za-z_][A-Za-z0-9_]*\})+")  # a value that only names secrets
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*")
HIDDEN = "***"
# query parameters that configure a connection and hold no secret; any other value in a query
# string is treated as a token
SAFE_QUERY_KEYS = frozenset(
    {
        "application_name",
        "charset",
        "check_same_thread",
        "client_encoding",
        "connect_timeout",
        "fallback_application_name",
        "gssencmode",
        "keepalives",
        "keepalives_count",
        "keepalives_idle",
        "keepalives_interval",
        "load_balance_hosts",
        "mode",
        "options",
        "sslcert",
        "sslkey",
        "sslmode",
        "sslrootcert",
        "target_session_attrs",
        "timeout",
        "uri",
    }
)
_WEB_SCHEMES = frozenset({"http", "https"})


@dataclass(frozen=True)
class UrlParts:
    """A URL cut into the parts that may hold a secret, each as written (nothing decoded)."""

    scheme: str
    user: str | None  # None: no userinfo
    password: str | None  # None: no ``:`` in the userinfo
    host: str  # host[:port]
    path: str  # from the first ``/`` after the host, up to ``?`` or ``#``
    query: tuple[tuple[str, str | None], ...] | None  # None: no ``?``
    fragment: str | None

    def __str__(self) -> str:
        out = f"{self.scheme}://"
        if self.user is not None:
            out += self.user + (f":{self.password}" if self.password is not None else "") + "@"
        out += self.host + self.path
        if self.query is not None:
            out += "?" + "&".join(k if v is None else f"{k}={v}" for k, v in self.query)
        if self.fragment is not None:
            out += f"#{self.fragment}"
        return out

    @property
    def web(self) -> bool:
        return self.scheme.lower() in _WEB_SCHEMES


def split_url(url: str) -> UrlParts | None:
    """``url`` in parts, read as SQLAlchemy reads a database URL (the userinfo ends at the first
    ``@``; a password may hold ``/``); None when it is no ``scheme://...`` URL."""
    scheme, sep, rest = url.partition("://")
    if not sep or not _SCHEME.fullmatch(scheme):
        return None
    user = password = None
    at = rest.find("@")
    if at >= 0:
        name, colon, secret = rest[:at].partition(":")
        if not any(ch in name for ch in "/?#"):
            user, password = name, (secret if colon else None)
            rest = rest[at + 1 :]
    rest, hash_, fragment = rest.partition("#")
    rest, mark, query_text = rest.partition("?")
    slash = rest.find("/")
    host, path = (rest, "") if slash < 0 else (rest[:slash], rest[slash:])
    query = None
    if mark:
        query = tuple(
            (k, v if eq else None)
            for k, eq, v in (piece.partition("=") for piece in query_text.split("&"))
        )
    return UrlParts(scheme, user, password, host, path, query, fragment if hash_ else None)


def _is_secret(value: str | None) -> bool:
    """A literal value in a place where secrets live (not empty, not only ``${VAR}``s)."""
    return bool(value) and not _NAMED.fullmatch(value or "")


def _hide(parts: UrlParts, drop: bool) -> UrlParts:
    """``parts`` with every literal secret replaced by ``***`` (or, with ``drop``, removed)."""
    user, password = parts.user, parts.password
    if _is_secret(password):
        password = None if drop else HIDDEN
    if parts.web and password is None and _is_secret(user):  # https://TOKEN@host
        user = None if drop else HIDDEN
    query = parts.query
    if query is not None:
        kept = []
        for key, value in query:
            literal = (
                _is_secret(value) and key.lower() not in SAFE_QUERY_KEYS
                if value is not None
                else _is_secret(key)
            )
            if not literal:
                kept.append((key, value))
            elif not drop:
                kept.append((key, HIDDEN) if value is not None else (HIDDEN, None))
        query = tuple(kept) if kept or not drop else None
    fragment = parts.fragment
    if _is_secret(fragment):
        fragment = None if drop else HIDDEN
    return replace(parts, user=user, password=password, query=query, fragment=fragment)


def redact_url(url: str) -> str:
    """``url`` as it may be logged or shown: each literal password or token (the password, every
    query value but connection settings such as ``sslmode``, the userinfo of a web URL, the
    fragment) replaced by ``***``; ``${VAR}`` placeholders kept as written.

    A value that is no URL is shown only when it is nothing but placeholders (``${DB_URL}``).
    """
    parts = split_url(url)
    if parts is None:
        return url if _NAMED.fullmatch(url.strip()) else HIDDEN
    return str(_hide(parts, drop=False))


_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>]+")


def redact_urls_in(text: str) -> str:
    """``text`` with each URL in it redacted (:func:`redact_url`)."""
    return _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), text)


def strip_secrets(url: str) -> str:
    """``url`` with each literal password or token removed (see :func:`redact_url`), so that
    what connects with it reads the secret from its own sources; placeholders kept."""
    parts = split_url(url)
    if parts is None:
        return url if _NAMED.fullmatch(url.strip()) else ""
    return str(_hide(parts, drop=True))


def literal_secrets(url: str) -> list[str]:
    """The literal secrets written in ``url``, as written and percent-decoded (for scrubbing
    them out of messages)."""
    parts = split_url(url)
    if parts is None:
        return [] if _NAMED.fullmatch(url.strip()) else [url]
    found: list[str] = []
    if _is_secret(parts.password):
        found.append(parts.password or "")
    if parts.web and parts.password is None and _is_secret(parts.user):
        found.append(parts.user or "")
    for key, value in parts.query or ():
        if value is None:
            if _is_secret(key):
                found.append(key)
        elif _is_secret(value) and key.lower() not in SAFE_QUERY_KEYS:
            found.append(value)
    if _is_secret(parts.fragment):
        found.append(parts.fragment or "")
    return sorted({*found, *(unquote(f) for f in found)} - {""}, key=len, reverse=True)


def check_webhook_url(url: str, *, expanded: bool = False) -> None:
    """Refuse a webhook that is not ``http(s)://host...`` (ValueError naming the fix).

    Before expansion a URL that is only a placeholder (``${ALERT_HOOK}``) passes: it is
    checked again, expanded, when an alert is posted.
    """
    if not expanded and _NAMED.fullmatch(url.strip()):
        return
    parts = split_url(url.strip())
    if parts is None or not parts.web or not PLACEHOLDER.sub("x", parts.host):
        scheme = parts.scheme if parts is not None else "no scheme"
        raise ValueError(
            f"monitoring.webhook must be an http:// or https:// URL with a host, got {scheme!r} "
            f"({redact_url(url)}); write it like https://hooks.example/alerts?token=${{HOOK_TOKEN}}"
            " (the token in the environment variable HOOK_TOKEN)"
        )


def warn_literal_secrets(config: Config) -> list[str]:
    """Warn (once per key and process) about URLs holding a literal password or token; the
    keys warned about."""
    keys = []
    for section, key in _URL_KEYS:
        url = getattr(getattr(config, section), key)
        if not url or not literal_secrets(url):
            continue
        keys.append(f"{section}.{key}")
        if (section, key, url) in _WARNED:
            continue
        _WARNED.add((section, key, url))
        logger.warning(
            "%s.%s holds a literal password or token (%s): it is never logged, but a config "
            "should name the secret, not hold it: write ${VAR} in its place (e.g. "
            "postgresql+psycopg://app:${MLOPS_LOG_DB_PASSWORD}@db/mlops or "
            "https://hooks.example/x?token=${HOOK_TOKEN}) and set VAR in the environment",
            section,
            key,
            redact_url(url),
        )
    return keys


_WARNED: set[tuple[str, str, str]] = set()


def conf_dir() -> Path:
    """The folder holding the YAML files: ``$MLOPS_CONF_DIR``, ``./conf`` or the packaged
    defaults."""
    env = os.environ.get("MLOPS_CONF_DIR")
    if env:
        return Path(env)
    for folder in (Path.cwd() / "conf", _INSTALLED_CONF, _SOURCE_CONF):
        if (folder / "default.yaml").is_file():
            return folder
    raise ConfigError(
        f"no conf/default.yaml found in ./conf, {_INSTALLED_CONF} or {_SOURCE_CONF}; "
        "reinstall mlops or set MLOPS_CONF_DIR to a folder holding default.yaml"
    )


def read_resolved_config(path: str | os.PathLike[str]) -> Config:
    """A config written by :meth:`Config.to_yaml` (a run's ``config.yaml``), validated as it is."""
    try:
        return Config.model_validate(_read_yaml(Path(path)), context={"logged": True})
    except ValidationError as exc:
        raise ConfigError(_describe(exc, Path(path))) from None


def load_config(
    path: str | os.PathLike[str] | None = None,
    overrides: Iterable[str] | dict[str, Any] = (),
    *,
    values: dict[str, Any] | None = None,
) -> Config:
    """Load, merge and validate the configuration.

    Args:
        path: the experiment YAML; ``conf/default.yaml`` when omitted.
        overrides: ``"data.dataset=sklearn:wine"``-style strings (values read as YAML), or a
            dict of dotted keys.
        values: dotted keys with values already typed (a CLI option's), applied last as they are.

    Example:
        >>> cfg = load_config(overrides=["model.family=random_forest", "seed=7"])
    """
    base_dir = conf_dir()
    cfg_path = Path(path) if path else base_dir / "default.yaml"
    raw = _read_yaml(cfg_path)
    pairs = {**_parse_overrides(overrides), **(values or {})}

    family = pairs.get(
        "model.family",
        raw.get("model", {}).get("family") if isinstance(raw.get("model"), dict) else None,
    )
    family = family or ModelConfig.model_fields["family"].default
    family_file = base_dir / "models" / f"{family}.yaml"
    if family_file.is_file():
        fam_raw = _read_yaml(family_file)
        unknown = set(fam_raw) - {"params"}
        if unknown:
            raise ConfigError(
                f"{family_file}: unknown key(s) {sorted(unknown)}; a model family file holds only "
                "'params'"
            )
        defaults = fam_raw.get("params") or {}
        model_section = raw.setdefault("model", {})
        if not isinstance(model_section, dict):
            raise ConfigError(f"{cfg_path}: key 'model' must be a mapping, got {model_section!r}")
        model_section["params"] = {**defaults, **(model_section.get("params") or {})}

    space_file = base_dir / "search_spaces" / f"{family}.yaml"
    if space_file.is_file():
        space_raw = _read_yaml(space_file)
        if set(space_raw) - {"params"}:
            raise ConfigError(
                f"{space_file}: unknown key(s) {sorted(set(space_raw) - {'params'})}; "
                "a search space file holds only 'params'"
            )
        tuning = raw.setdefault("tuning", {})
        if isinstance(tuning, dict) and not tuning.get("search_space"):
            tuning["search_space"] = space_raw.get("params") or {}

    for key, value in pairs.items():
        _set_dotted(raw, key, value, cfg_path)
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, cfg_path)) from None
    warn_literal_secrets(config)
    return config


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(
            f"config file '{path}' not found; pass an existing YAML file with --config"
        )
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(
            f"{path}: invalid YAML{where}: {problem}; fix the file's syntax"
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: expected a mapping of keys at the top level, got {type(data).__name__}"
        )
    return copy.deepcopy(data)


def _parse_overrides(overrides: Iterable[str] | dict[str, Any]) -> dict[str, Any]:
    if isinstance(overrides, dict):
        return dict(overrides)
    pairs: dict[str, Any] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(
                f"override '{item}' is not key=value; write it like model.params.C=0.5"
            )
        try:
            pairs[key.strip()] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            pairs[key.strip()] = value
    return pairs


def _set_dotted(tree: dict[str, Any], key: str, value: Any, source: Path) -> None:
    parts = key.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(
                f"override '{key}': '{'.'.join(parts[: i + 1])}' in {source} is a value, not a "
                "section"
            )
        node = child
    node[parts[-1]] = value


def _describe(exc: ValidationError, source: Path) -> str:
    problems = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            problems.append(f"unknown key '{key}'; remove it or check its spelling")
        else:
            # a URL that failed validation may still hold a password
            got = redact_urls_in(repr(err.get("input")))
            problems.append(f"key '{key}': {err['msg']} (got {got})")
    return f"{source}: " + "; ".join(problems)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out
