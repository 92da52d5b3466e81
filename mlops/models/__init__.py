"""Model families behind one scikit-learn contract.

Every family builds a scikit-learn ``Pipeline(preprocess, estimator)``: hyperparameters in
the constructor, learning in ``fit``, fitted state in ``*_`` attributes. Training, tuning and
serving never branch on the family; estimators that can report per-epoch progress accept
``eval_set`` and ``on_epoch_end`` in ``fit`` (see :func:`fit_model`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from mlops.errors import ConfigError

EpochCallback = Callable[[int, dict[str, float]], None]


@dataclass(frozen=True)
class ModelFamily:
    """A named family: which estimator class to build for each task it supports."""

    name: str
    estimators: dict[str, Callable[..., BaseEstimator]]  # task -> estimator factory
    seed_param: str | None = "random_state"
    description: str = ""

    def estimator_class(self, task: str) -> Callable[..., BaseEstimator]:
        if task not in self.estimators:
            others = [f.name for f in FAMILIES.values() if task in f.estimators]
            raise ConfigError(
                f"model.family '{self.name}' does not do {task}; for {task} use one of: "
                f"{', '.join(others)}"
            )
        return self.estimators[task]


def _sk(module: str, name: str) -> Callable[..., BaseEstimator]:
    def factory(**params: Any) -> BaseEstimator:
        import importlib

        return getattr(importlib.import_module(module), name)(**params)

    factory.__qualname__ = name
    return factory


def _keras(name: str) -> Callable[..., BaseEstimator]:
    def factory(**params: Any) -> BaseEstimator:
        from mlops.models import keras_mlp

        return getattr(keras_mlp, name)(**params)

    factory.__qualname__ = name
    return factory


FAMILIES: dict[str, ModelFamily] = {
    f.name: f
    for f in (
        ModelFamily(
            "logreg",
            {"classification": _sk("sklearn.linear_model", "LogisticRegression")},
            description="logistic regression",
        ),
        ModelFamily(
            "ridge",
            {"regression": _sk("sklearn.linear_model", "Ridge")},
            description="ridge regression",
        ),
        ModelFamily(
            "random_forest",
            {
                "classification": _sk("sklearn.ensemble", "RandomForestClassifier"),
                "regression": _sk("sklearn.ensemble", "RandomForestRegressor"),
            },
            description="random forest",
        ),
        ModelFamily(
            "hist_gb",
            {
                "classification": _sk("sklearn.ensemble", "HistGradientBoostingClassifier"),
                "regression": _sk("sklearn.ensemble", "HistGradientBoostingRegressor"),
            },
            description="histogram gradient boosting",
        ),
        ModelFamily(
            "keras_mlp",
            {
                "classification": _keras("KerasMLPClassifier"),
                "regression": _keras("KerasMLPRegressor"),
            },
            description="TensorFlow/Keras multilayer perceptron",
        ),
    )
}


def get_family(name: str) -> ModelFamily:
    """The family called ``name``; the error lists the valid names."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ConfigError(
            f"model.family: unknown model family '{name}'; choose one of: {', '.join(FAMILIES)}"
        ) from None


def build_model(
    family_name: str,
    task: str,
    params: dict[str, Any],
    *,
    numeric_columns: tuple[str, ...] | list[str],
    categorical_columns: tuple[str, ...] | list[str] = (),
    seed: int | None = None,
    features: dict[str, dict[str, Any]] | None = None,
) -> Pipeline:
    """A fresh, unfitted ``Pipeline(preprocess, model)`` for the family and task.

    Unknown hyperparameters fail with the family's valid parameter names. ``features``
    (``data.features``) gives configured columns their own transform (see
    :func:`build_preprocessor`).
    """
    family = get_family(family_name)
    factory = family.estimator_class(task)
    valid = set(factory().get_params(deep=False))
    unknown = sorted(set(params) - valid)
    if unknown:
        raise ConfigError(
            f"model.params: {unknown} not accepted by {family_name} ({task}); valid parameters: "
            f"{', '.join(sorted(valid))}"
        )
    kwargs = dict(params)
    seed_param = family.seed_param
    if seed is not None and seed_param is not None and seed_param in valid:
        if kwargs.get(seed_param) is None:
            kwargs[seed_param] = seed
    try:
        estimator = factory(**kwargs)
        # our own estimators check their values now, before any run work; scikit-learn's check
        # theirs at the start of fit() (see fit_model)
        validate = getattr(estimator, "validate_params", None)
        if callable(validate):
            validate()
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"model.params for {family_name}: {exc} Fix it in conf/models/{family_name}.yaml or "
            "with --set"
        ) from None
    return Pipeline(
        [
            (
                "preprocess",
                build_preprocessor(numeric_columns, categorical_columns, features=features),
            ),
            ("model", estimator),
        ]
    )


def build_preprocessor(
    numeric_columns: tuple[str, ...] | list[str],
    categorical_columns: tuple[str, ...] | list[str],
    *,
    features: dict[str, dict[str, Any]] | None = None,
) -> ColumnTransformer:
    """Imputation and scaling for numeric columns, imputation and one-hot for categorical ones.

    Each column of ``features`` (``data.features``) is instead its own entry
    ``feature_<column>`` over that single column (:func:`mlops.features.feature_entries`); the
    ``numeric`` and ``categorical`` entries leave those columns out.
    """
    transformers: list[tuple[str, Any, list[str]]] = []
    if features:
        numeric_columns = [c for c in numeric_columns if c not in features]
        categorical_columns = [c for c in categorical_columns if c not in features]
    if numeric_columns:
        transformers.append(
            (
                "numeric",
                Pipeline(
                    [("impute", SimpleImputer(strategy="median")), ("scale", StandardScaler())]
                ),
                list(numeric_columns),
            )
        )
    if categorical_columns:
        transformers.append(
            (
                "categorical",
                Pipeline(
                    [
                        ("impute", SimpleImputer(strategy="most_frequent")),
                        ("onehot", OneHotEncoder(handle_unknown="ignore", sparse_output=False)),
                    ]
                ),
                list(categorical_columns),
            )
        )
    if not features:
        return ColumnTransformer(transformers, remainder="drop", verbose_feature_names_out=False)
    from mlops.features import feature_entries

    transformers.extend(feature_entries(features))
    # dense output whatever a transform returns: every model family and the wrapper take arrays
    return ColumnTransformer(
        transformers, remainder="drop", verbose_feature_names_out=False, sparse_threshold=0.0
    )


def fit_model(
    pipeline: Pipeline,
    X_train: pd.DataFrame,
    y_train: np.ndarray,
    X_val: pd.DataFrame | None = None,
    y_val: np.ndarray | None = None,
    on_epoch_end: EpochCallback | None = None,
    *,
    family: str = "the model",
) -> Pipeline:
    """Fit preprocessing on train only, then the model, passing validation data where it helps."""
    preprocess, estimator = pipeline.steps[0][1], pipeline.steps[-1][1]
    Xt = preprocess.fit_transform(X_train, y_train)
    accepted = inspect.signature(estimator.fit).parameters
    kwargs: dict[str, Any] = {}
    if "eval_set" in accepted and X_val is not None:
        kwargs["eval_set"] = (preprocess.transform(X_val), y_val)
    if "on_epoch_end" in accepted and on_epoch_end is not None:
        kwargs["on_epoch_end"] = on_epoch_end
    try:
        estimator.fit(Xt, y_train, **kwargs)
    except ValueError as exc:
        # scikit-learn's InvalidParameterError is both a ValueError and a TypeError: a
        # hyperparameter value it refused, which the user fixes in the config
        if isinstance(exc, TypeError):
            raise ConfigError(
                f"model.params for {family}: {exc} "
                f"Fix it in conf/models/{family}.yaml or with --set"
            ) from None
        raise
    return pipeline
