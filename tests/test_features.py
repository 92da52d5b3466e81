"""data.features: each transform fitted in the pipeline, served as trained, checked up front."""

from __future__ import annotations

import logging
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from mlops.config import load_config
from mlops.data import prepare
from mlops.errors import ConfigError, DataValidationError
from mlops.features import ENTRY_PREFIX, check_features
from mlops.models import build_model, build_preprocessor, fit_model
from mlops.monitoring.profile import MAX_CATEGORIES, categorical_reference
from mlops.serving.compiled import CompiledFeatures, CompiledPreprocess, compile_pipeline
from mlops.training import fit_and_evaluate, train
from tests.helpers import make_csv

WORDS = ["great", "product", "bad", "service", "would", "buy", "again", "terrible", "quality"]


def feature_frame(n: int = 240, seed: int = 0) -> pd.DataFrame:
    """Numbers, ISO date strings (one unparseable), free text, a city and a binary label."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        {
            "income": rng.exponential(1000.0, n),
            "age": rng.normal(40, 25, n),
            "score": rng.normal(size=n),
            "q": rng.normal(size=n),
            "signup": pd.date_range("2023-01-01", periods=n, freq="37h")
            .strftime("%Y-%m-%dT%H:%M:%S")
            .astype(object),
            "comment": [" ".join(rng.choice(WORDS, 3)) for _ in range(n)],
            "city": rng.choice(["paris", "rome", "oslo"], n, p=[0.5, 0.3, 0.2]).astype(object),
        }
    )
    frame.loc[5, "signup"] = "not a date"
    frame.loc[::15, "comment"] = np.nan  # in every split, so served rows may miss it too
    frame.loc[::17, "city"] = np.nan
    good = frame["comment"].fillna("").str.contains("great") | (frame["score"] > 0.5)
    frame["label"] = np.where(good, "yes", "no")
    return frame


FEATURES = {
    "income": {"transform": "log"},
    "age": {"transform": "clip", "min": 0, "max": 60},
    "score": {"transform": "bins", "n_bins": 4},
    "signup": {"transform": "date", "parts": ["year", "month", "dayofweek", "is_weekend"]},
    "comment": {"transform": "tfidf", "max_features": 5},
    "city": {"transform": "frequency"},
    "q": {
        "transform": "sklearn.preprocessing.QuantileTransformer",
        "params": {"n_quantiles": 50},
    },
}
NUMERIC = ["income", "age", "score", "q"]
STRINGS = ["signup", "comment", "city"]


@pytest.fixture
def fitted() -> tuple[pd.DataFrame, object]:
    frame = feature_frame()
    pre = build_preprocessor(NUMERIC, STRINGS, features=FEATURES)
    pre.fit(frame[NUMERIC + STRINGS])
    return frame, pre


def _entry(pre, column: str):
    return pre.named_transformers_[ENTRY_PREFIX + column]


def test_every_configured_column_is_its_own_entry(fitted) -> None:
    frame, pre = fitted
    entries = {name: cols for name, _, cols in pre.transformers_ if name != "remainder"}
    assert entries == {ENTRY_PREFIX + c: [c] for c in FEATURES}  # no numeric/categorical left
    out = pre.transform(frame.head(10))
    assert out.shape == (10, len(pre.get_feature_names_out()))
    assert np.isfinite(out).all()


def test_log_and_clip_values(fitted) -> None:
    frame, pre = fitted
    log = _entry(pre, "income")[:-1].transform(frame[["income"]])  # before the scaler
    assert np.allclose(log.ravel(), np.log1p(frame["income"]))
    clipped = _entry(pre, "age")[:-1].transform(frame[["age"]]).ravel()
    assert clipped.min() == 0 and clipped.max() == 60
    inside = frame["age"].between(0, 60).to_numpy()
    assert np.allclose(clipped[inside], frame["age"][inside])


def test_bins_one_hot(fitted) -> None:
    frame, pre = fitted
    onehot = _entry(pre, "score").transform(frame[["score"]])
    assert onehot.shape == (len(frame), 4)
    assert (onehot.sum(axis=1) == 1).all()
    assert np.allclose(onehot.mean(axis=0), 0.25, atol=0.02)  # quantile bins: equal shares


def test_date_parts_and_unparseable_dates(fitted) -> None:
    frame, pre = fitted
    parts = _entry(pre, "signup")[:-1]  # parse + impute, before the scaler
    rows = pd.DataFrame({"signup": ["2024-03-16T10:00:00", "never", np.nan]}, dtype=object)
    out = parts.transform(rows)
    assert out[0].tolist() == [2024, 3, 5, 1]  # a Saturday
    median = parts.named_steps["impute"].statistics_
    assert np.allclose(out[1], median) and np.allclose(out[2], median)
    assert list(_entry(pre, "signup").get_feature_names_out(["signup"])) == [
        "signup_year",
        "signup_month",
        "signup_dayofweek",
        "signup_is_weekend",
    ]


def test_tfidf_vocabulary_and_unseen_text(fitted) -> None:
    frame, pre = fitted
    tfidf = _entry(pre, "comment")
    rows = pd.DataFrame({"comment": ["great great", "zzz unknown words", np.nan]}, dtype=object)
    out = tfidf.transform(rows)
    assert out.shape == (3, 5)  # max_features
    assert out[0].max() == pytest.approx(1.0)  # one known word, normalized
    assert (out[1] == 0).all() and (out[2] == 0).all()


def test_frequency_encoding(fitted) -> None:
    frame, pre = fitted
    rows = pd.DataFrame({"city": ["paris", "rome", "tokyo", np.nan]}, dtype=object)
    out = _entry(pre, "city").transform(rows).ravel()
    n = len(frame)
    assert out[0] == pytest.approx((frame["city"] == "paris").sum() / n)
    assert out[1] == pytest.approx((frame["city"] == "rome").sum() / n)
    assert out[2] == 0.0  # unseen
    assert out[3] == pytest.approx(frame["city"].isna().sum() / n)  # missing counts as a value


def test_custom_import_path_transformer(fitted) -> None:
    frame, pre = fitted
    quantiles = _entry(pre, "q").transform(frame[["q"]]).ravel()
    assert quantiles.min() == 0.0 and quantiles.max() == 1.0
    assert pd.Series(quantiles).rank().corr(frame["q"].rank()) == pytest.approx(1.0)


def test_log_refuses_negative_values_naming_the_column() -> None:
    frame = pd.DataFrame({"income": [1.0, -2.0, 3.0]})
    pre = build_preprocessor(["income"], [], features={"income": {"transform": "log"}})
    with pytest.raises(DataValidationError, match=r"column 'income' \(transform 'log'\)"):
        pre.fit(frame)


@pytest.fixture
def feature_csv(tmp_path: Path) -> tuple[Path, pd.DataFrame]:
    frame = feature_frame()
    path = tmp_path / "features.csv"
    frame.to_csv(path, index=False)
    return path, frame


def _overrides(csv: Path, features: dict | None = None) -> list[str]:
    features = FEATURES if features is None else features
    spec = ", ".join(
        f"{col}: {{{', '.join(f'{k}: {_yaml(v)}' for k, v in opts.items())}}}"
        for col, opts in features.items()
    )
    return [
        f"data.dataset={csv}",
        "data.target=label",
        "explain.enabled=false",
        f"data.features={{{spec}}}",
    ]


def _yaml(value: object) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_yaml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    return str(value)


def test_trained_model_serves_what_was_fitted(feature_csv, caplog) -> None:
    csv, frame = feature_csv
    config = load_config(overrides=_overrides(csv))
    split = prepare(config)
    assert set(STRINGS) <= set(split.categorical_columns)  # string columns of the contract
    result = train(config)
    with caplog.at_level(logging.INFO, logger="mlops.serving.compiled"):
        model = mlflow.pyfunc.load_model(result.model_uri)
    wrapper = model._model_impl.python_model
    assert wrapper.compiled is None
    assert "data.features transform 'tfidf' of column 'comment' has no NumPy form" in caplog.text

    rows = frame[NUMERIC + STRINGS].head(20).copy()
    rows.loc[0, "signup"] = "31/02/never"  # unparseable: missing, imputed
    rows.loc[1, "comment"] = "entirely unseen vocabulary"
    rows.loc[2, "city"] = "tokyo"  # unseen: frequency 0
    pipeline, _ = fit_and_evaluate(config, split, log=False)
    expected = pipeline.predict_proba(rows)
    out = model.predict(rows)
    classes = np.asarray(split.classes)
    assert out["prediction"].tolist() == classes[expected.argmax(axis=1)].tolist()
    assert np.allclose(out[[f"proba_{c}" for c in classes]].to_numpy(), expected)


@pytest.mark.parametrize(
    "features,message",
    [
        ({"income": {"transform": "logarithm"}}, r"data.features.income: unknown transform"),
        (
            {"income": {"transform": "log", "base": 2}},
            r"income \(transform 'log'\): unknown option\(s\) \['base'\]",
        ),
        ({"age": {"transform": "clip"}}, r"age \(transform 'clip'\): give 'min', 'max'"),
        (
            {"age": {"transform": "clip", "min": 5, "max": 1}},
            r"age \(transform 'clip'\): 'min' \(5\) must not be above",
        ),
        (
            {"score": {"transform": "bins", "strategy": "kmeans"}},
            r"score \(transform 'bins'\): option 'strategy'",
        ),
        (
            {"signup": {"transform": "date", "parts": ["week"]}},
            r"signup \(transform 'date'\): option 'parts' has unknown part",
        ),
        (
            {"comment": {"transform": "tfidf", "max_features": 0}},
            r"comment \(transform 'tfidf'\): option 'max_features'",
        ),
        (
            {"q": {"transform": "nowhere.Transformer"}},
            r"q \(transform 'nowhere.Transformer'\): 'nowhere.Transformer' does not import",
        ),
        (
            {"q": {"transform": "collections.OrderedDict"}},
            r"q \(transform 'collections.OrderedDict'\): .* not a transformer class",
        ),
        (
            {"q": {"transform": "sklearn.preprocessing.QuantileTransformer", "params": {"nq": 3}}},
            r"q \(transform 'sklearn.preprocessing.QuantileTransformer'\): .*'nq'",
        ),
    ],
)
def test_config_refuses_bad_features(tmp_path: Path, features: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=_overrides(tmp_path / "unused.csv", features))


@pytest.mark.parametrize(
    "features,message",
    [
        ({"salary": {"transform": "log"}}, r"column 'salary' \(transform 'log'\) is not in"),
        ({"comment": {"transform": "log"}}, r"column 'comment' \(transform 'log'\) needs numbers"),
        (
            {"comment": {"transform": "sklearn.preprocessing.QuantileTransformer"}},
            r"column 'comment' \(transform 'sklearn.preprocessing.QuantileTransformer'\) needs "
            "numbers",
        ),
        ({"label": {"transform": "frequency"}}, r"column 'label' \(transform 'frequency'\) is "),
        ({"score": {"transform": "log"}}, r"column 'score' \(transform 'log'\) has negative"),
        ({"city": {"transform": "date"}}, r"column 'city' \(transform 'date'\): no value parses"),
    ],
)
def test_prepare_refuses_features_that_do_not_fit_the_data(
    feature_csv, features: dict, message: str
) -> None:
    csv, _ = feature_csv
    with pytest.raises(DataValidationError, match=message):
        prepare(load_config(overrides=_overrides(csv, features)))


def test_check_features_passes_a_good_configuration() -> None:
    frame = feature_frame(n=30)
    check_features(FEATURES, frame, "label")  # no error


def test_without_features_the_pipeline_is_as_before(tmp_path: Path) -> None:
    frame = pd.read_csv(make_csv(tmp_path / "d.csv"))
    X, y = frame[["x1", "x2", "color"]], (frame["label"] == "yes").to_numpy().astype(int)
    kwargs = {"numeric_columns": ["x1", "x2"], "categorical_columns": ["color"], "seed": 0}
    plain = build_model("logreg", "classification", {}, **kwargs)
    for same in (
        build_model("logreg", "classification", {}, **kwargs, features=None),
        build_model("logreg", "classification", {}, **kwargs, features={}),
    ):
        assert repr(same) == repr(plain)
        assert same.steps[0][1].get_params(deep=False)["sparse_threshold"] == 0.3
    fit_model(plain, X, y)
    assert isinstance(compile_pipeline(plain, ["x1", "x2"], ["color"], X), CompiledPreprocess)

    dated = X.assign(color=np.where(y == 1, "2024-01-05", "2023-06-01"))
    featured = build_model(
        "logreg", "classification", {}, **kwargs, features={"color": {"transform": "date"}}
    )
    fit_model(featured, dated, y)
    assert compile_pipeline(featured, ["x1", "x2"], ["color"], dated) is None


COMPILABLE = {
    "income": {"transform": "log"},
    "age": {"transform": "clip", "min": 0, "max": 60},
    "city": {"transform": "frequency"},
}


def test_log_clip_frequency_compile_to_numpy(caplog) -> None:
    frame = feature_frame()
    numeric, strings = ["income", "age", "score"], ["city", "comment"]
    pipeline = build_model(
        "logreg",
        "classification",
        {},
        numeric_columns=numeric,
        categorical_columns=strings,
        features=COMPILABLE,
    )
    fit_model(pipeline, frame[numeric + strings], (frame["label"] == "yes").to_numpy().astype(int))
    rows = frame[numeric + strings].head(40).copy()
    rows.loc[0, "income"] = -5.0  # counts as 0
    rows.loc[1, ["income", "age", "score"]] = np.nan  # imputed
    rows.loc[2, "age"] = 1000.0  # clipped
    rows.loc[3, "city"] = "tokyo"  # unseen: 0
    rows.loc[4, ["city", "comment"]] = np.nan
    rows.loc[5, "comment"] = "a comment never seen"
    with caplog.at_level(logging.INFO, logger="mlops.serving.compiled"):
        compiled = compile_pipeline(pipeline, numeric, strings, frame.head(20))
    assert isinstance(compiled, CompiledFeatures)
    assert "scikit-learn's path" not in caplog.text
    cat = rows[strings].astype(object).where(rows[strings].notna(), np.nan).to_numpy(dtype=object)
    expected = pipeline.steps[0][1].transform(rows)
    for n in (1, len(rows)):  # one row, and a batch
        got = compiled.transform(rows[numeric].to_numpy(dtype=float)[:n], cat[:n])
        assert np.allclose(got, expected[:n], rtol=1e-12, atol=1e-12)


def test_compiled_features_serve_what_was_fitted(feature_csv) -> None:
    csv, frame = feature_csv
    config = load_config(
        overrides=[*_overrides(csv, COMPILABLE), "data.categorical=[signup, comment]"]
    )
    result = train(config)
    model = mlflow.pyfunc.load_model(result.model_uri)
    assert isinstance(model._model_impl.python_model.compiled, CompiledFeatures)
    rows = frame[NUMERIC + STRINGS].head(20).copy()
    rows.loc[0, "city"] = "tokyo"
    rows.loc[1, "age"] = 500.0
    pipeline, _ = fit_and_evaluate(config, prepare(config), log=False)
    expected = pipeline.predict_proba(rows)
    out = model.predict(rows)
    assert np.allclose(out[["proba_no", "proba_yes"]].to_numpy(), expected)


def test_profile_caps_a_free_text_column() -> None:
    values = [f"comment number {i}" for i in range(3000)] + ["common"] * 500
    ref = categorical_reference(values)
    assert len(ref["shares"]) == MAX_CATEGORIES
    assert ref["shares"]["common"] == pytest.approx(500 / 3500)
    assert ref["distinct"] == 3001
    assert ref["other_share"] + sum(ref["shares"].values()) == pytest.approx(1.0)
    small = categorical_reference(["a", "b", "b"])
    assert small == {"kind": "categorical", "shares": {"a": 1 / 3, "b": 2 / 3}}


def test_the_model_loader_trusts_exactly_the_feature_transforms() -> None:
    """A logged model with a feature transform loads through skops only if the loader's list
    names the transform's class: the two lists must not drift apart."""
    from mlops.artifacts import TRUSTED_EXACT
    from mlops.features import TRUSTED_TYPES

    ours = {name for name in TRUSTED_EXACT if name.startswith("mlops.features.")}
    assert ours == set(TRUSTED_TYPES)
