"""Data quality rules (``data.rules``): the dataset report at prepare and train, and the same
rules on served rows (reject or flag), counted in the prediction log and the monitoring check."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from mlflow.exceptions import MlflowException

from mlops.cli import cli
from mlops.config import RulesConfig, load_config
from mlops.data import prepare
from mlops.errors import DataValidationError
from mlops.monitoring.checks import check
from mlops.monitoring.store import PREDICTIONS
from mlops.rules import check_dataset
from mlops.training import train
from tests.conftest import free_port, using_store
from tests.helpers import make_csv
from tests.servers import BIN, models_serve, post, running, server_env

NAME = "rules-model"
FEATURES = ["x1", "x2", "color", "age"]
RULES = (
    "data.rules={columns: {age: {min: 0, max: 120, not_null: true}, "
    "color: {allowed: [red, green, blue]}}, tolerance: 0.05}"
)


def people() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "age": [30.0, 45.0, 150.0, None, -1.0, 60.0],
            "plan": ["basic", "pro", "gold", None, "basic", "pro"],
            "tier": [1, 2, 3, 2, 1, 9],
            "label": ["a", "b", "a", "b", "a", "b"],
        }
    )


# ---- the dataset report ----
def test_report_lists_each_broken_rule_with_count_limit_and_examples() -> None:
    rules = RulesConfig.model_validate(
        {
            "columns": {
                "age": {"min": 0, "max": 120, "not_null": True},
                "plan": {"allowed": ["basic", "pro"]},
                "tier": {"allowed": [1, 2, 3]},
            },
            "tolerance": 0.9,
        }
    )
    report = check_dataset(people(), rules, source="people.csv")
    assert report is not None and report["passed"]
    found = {(v["column"], v["rule"]): v for v in report["violations"]}
    assert set(found) == {
        ("age", "min"),
        ("age", "max"),
        ("age", "not_null"),
        ("plan", "allowed"),
        ("tier", "allowed"),
    }
    assert found["age", "max"]["limit"] == 120 and found["age", "max"]["count"] == 1
    assert found["age", "max"]["examples"] == [
        {"age": 150.0, "plan": "gold", "tier": 3, "label": "a"}
    ]
    assert found["age", "min"]["examples"][0]["age"] == -1.0
    # a null breaks not_null only: not min, max nor allowed (plan's null row is not counted)
    assert found["plan", "allowed"]["count"] == 1
    assert found["plan", "allowed"]["limit"] == ["basic", "pro"]
    assert found["tier", "allowed"]["examples"][0]["tier"] == 9  # compared as numbers
    assert report["rows_violating"] == 4 and report["share_violating"] == pytest.approx(4 / 6)
    json.dumps(report)  # what is logged as data/quality_report.json


def test_allowed_compares_numbers_as_numbers_and_text_as_text() -> None:
    frame = pd.DataFrame({"n": [1, 2, 2.0], "s": ["1", "2", "3"]})
    rules = RulesConfig.model_validate(
        {"columns": {"n": {"allowed": ["1", 2]}, "s": {"allowed": [1, 2, 3]}}}
    )
    report = check_dataset(frame, rules, source="t")
    assert report is not None and report["violations"] == []


def test_violations_past_the_tolerance_fail_naming_column_rule_count_and_value() -> None:
    rules = RulesConfig.model_validate({"columns": {"age": {"max": 120}}, "tolerance": 0.1})
    with pytest.raises(DataValidationError) as err:
        check_dataset(people(), rules, source="people.csv")
    message = str(err.value)
    assert "'age'" in message and "max 120" in message and "1 of 6 rows" in message
    assert "150.0" in message and "tolerance" in message
    # within the tolerance: reported, not refused
    rules = RulesConfig.model_validate({"columns": {"age": {"max": 120}}, "tolerance": 0.2})
    assert check_dataset(people(), rules, source="people.csv")["rows_violating"] == 1


def test_dataset_rules_null_share_and_duplicate_share() -> None:
    frame = pd.concat([people()] * 2, ignore_index=True)  # every row twice
    ok = RulesConfig.model_validate(
        {"columns": {"age": {"max_null_share": 0.2}}, "max_duplicate_share": 0.5}
    )
    report = check_dataset(frame, ok, source="t")
    assert report is not None
    shares = {d["rule"]: d for d in report["dataset"]}
    assert shares["max_null_share"]["share"] == pytest.approx(1 / 6)
    assert shares["max_duplicate_share"]["share"] == pytest.approx(0.5)
    assert all(d["passed"] for d in report["dataset"])
    with pytest.raises(DataValidationError, match=r"'age' is null in 16\.7% .*max_null_share 0\.1"):
        check_dataset(
            frame,
            RulesConfig.model_validate({"columns": {"age": {"max_null_share": 0.1}}}),
            source="t",
        )
    with pytest.raises(DataValidationError, match=r"duplicates in 50\.0% .*max_duplicate_share"):
        check_dataset(frame, RulesConfig(max_duplicate_share=0.25), source="t")


def test_a_rule_on_an_unknown_column_or_min_on_text_is_an_error() -> None:
    with pytest.raises(DataValidationError, match=r"\['weight'\].*people\.csv"):
        check_dataset(
            people(),
            RulesConfig.model_validate({"columns": {"weight": {"min": 0}}}),
            source="people.csv",
        )
    with pytest.raises(DataValidationError, match="'plan'.*not numeric.*allowed"):
        check_dataset(
            people(), RulesConfig.model_validate({"columns": {"plan": {"min": 0}}}), source="t"
        )


def test_min_on_a_categorical_column_holding_numbers_is_refused_at_prepare(
    tmp_path: Path,
) -> None:
    """A zip code declared categorical is text to the model (served as text, where min/max
    cannot be checked): a min on it is refused when the data is prepared, although the file
    holds integers; 'allowed' compares its values as text."""
    csv = make_csv(tmp_path / "z.csv", n=60, zip=np.tile([1000, 2000, 3000], 20))
    base = [f"data.dataset={csv}", "data.target=label", "data.categorical=[color, zip]"]
    with pytest.raises(DataValidationError, match=r"rules\.columns\.zip\.min.*text column"):
        prepare(load_config(overrides=[*base, "data.rules={columns: {zip: {min: 1500}}}"]))
    split = prepare(
        load_config(
            overrides=[*base, "data.rules={columns: {zip: {allowed: ['1000', 2000, 3000]}}}"]
        )
    )
    assert split.quality is not None and split.quality["violations"] == []


def test_no_rules_no_report() -> None:
    assert check_dataset(people(), RulesConfig(), source="t") is None


def test_prepare_refuses_and_the_cli_prints_a_summary(tmp_path: Path) -> None:
    csv = tmp_path / "people.csv"
    frame = pd.DataFrame(
        {
            "x": np.arange(40.0),
            "age": 20.0 + np.arange(40.0),
            "plan": ["basic", "pro"] * 20,
            "label": ["a", "a", "b", "b"] * 10,
        }
    )
    frame.loc[[1, 5, 9, 13], "age"] = 150.0
    frame.loc[[2, 6], "plan"] = "gold"
    frame.to_csv(csv, index=False)
    base = [f"data.dataset={csv}", "data.target=label", "data.categorical=[plan]"]
    with pytest.raises(DataValidationError, match="'age'.*max 120"):
        prepare(load_config(overrides=[*base, "data.rules.columns={age: {max: 120}}"]))
    result = CliRunner().invoke(
        cli,
        [
            "prepare",
            *(a for kv in base for a in ("--set", kv)),
            "--set",
            "data.rules={columns: {age: {max: 120}, plan: {allowed: [basic, pro]}}, "
            "tolerance: 0.5}",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "data quality: 6 of 40 rows (15.0%) break a rule" in result.output
    assert "age>max(120) 4; plan not in allowed 2" in result.output


# ---- a trained model with rules: report, pyfunc, served ----
@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, template_store: Path) -> Iterator[dict]:
    """NAME version 1 at @production, trained with rules on age and color (two ages break
    age's max, within the tolerance)."""
    root = tmp_path_factory.mktemp("rules")
    shutil.copy(template_store, root / "mlflow.db")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    ages = np.random.default_rng(1).integers(18, 90, size=200).astype(float)
    ages[[3, 50]] = 130.0
    csv = make_csv(root / "data.csv", n=200, age=ages)
    overrides = [
        f"data.dataset={csv}",
        "data.target=label",
        "data.categorical=[color]",
        RULES,
        f"registry.model_name={NAME}",
        f"registry.audit_url=sqlite:///{root / 'audit.db'}",
        f"monitoring.log_url=sqlite:///{root / 'predictions.db'}",
        "monitoring.min_rows=1",
        "explain.enabled=false",
        "experiment=rules",
    ]
    with using_store(uri):
        result = train(load_config(overrides=overrides), register=True)
        mlflow.MlflowClient().set_registered_model_alias(
            NAME, "production", result.registered_version
        )
    yield {"uri": uri, "root": root, "overrides": overrides, "result": result}


def rows(**changes: object) -> pd.DataFrame:
    frame = pd.DataFrame(
        {"x1": [0.1, -0.4, 1.2], "x2": [0.3, 0.0, -1.0], "color": ["red", "blue", "green"]}
    )
    frame["age"] = [30.0, 40.0, 50.0]
    for col, values in changes.items():
        frame[col] = values
    return frame[FEATURES]


def test_training_run_logs_the_quality_report(store: dict) -> None:
    with using_store(store["uri"]):
        path = mlflow.artifacts.download_artifacts(
            run_id=store["result"].run_id, artifact_path="data/quality_report.json"
        )
    report = json.loads(Path(path).read_text())
    assert report["rows"] == 200 and report["passed"]
    [violation] = report["violations"]
    assert violation["column"] == "age" and violation["rule"] == "max"
    assert violation["count"] == 2 and violation["examples"][0]["age"] == 130.0


def test_training_succeeds_when_its_own_rows_break_rules_within_the_tolerance(
    tmp_path: Path,
) -> None:
    """The logged model's example rows are training rows: one breaking a rule (within the
    tolerance) must not stop the model from being logged."""
    ages = np.full(100, 40.0)
    ages[::3] = 150.0
    csv = make_csv(tmp_path / "d.csv", n=100, age=ages)
    result = train(
        load_config(
            overrides=[
                f"data.dataset={csv}",
                "data.target=label",
                "data.categorical=[color]",
                "data.rules={columns: {age: {max: 120}}, tolerance: 0.5}",
                "explain.enabled=false",
            ]
        )
    )
    model = mlflow.pyfunc.load_model(result.model_uri)
    assert len(model.predict(rows())) == 3
    with pytest.raises(MlflowException, match="'age' is above its max 120"):
        model.predict(rows(age=150.0))
    # the input example (what MLflow and a reader send the served model) keeps the rules,
    # although a third of the training rows do not, so the served model answers it
    example = model.input_example
    assert len(example) == 5 and (example["age"] <= 120).all()
    assert len(model.predict(example)) == 5


def test_pyfunc_rejects_a_row_breaking_a_rule_naming_column_rule_limit_value_and_row(
    store: dict,
) -> None:
    with using_store(store["uri"]):
        model = mlflow.pyfunc.load_model(f"models:/{NAME}@production")
        assert "violations" not in model.predict(rows()).columns
        with pytest.raises(MlflowException) as err:
            model.predict(rows(age=[30.0, 40.0, 150.0]))
    message = err.value.message
    assert "column 'age' is above its max 120 (data.rules), got 150.0 in row 2" in message
    with using_store(store["uri"]), pytest.raises(MlflowException, match="'color'.*allowed"):
        model.predict(rows(color=["red", "purple", "green"]))


def test_pyfunc_flags_rows_in_a_violations_column(store: dict) -> None:
    with using_store(store["uri"]):
        model = mlflow.pyfunc.load_model(
            f"models:/{NAME}@production",
            model_config={"on_rule_violation": "flag", "impute_missing": True},
        )
        out = model.predict(rows(age=[30.0, 150.0, None], color=["red", "purple", "green"]))
    assert out["violations"].tolist() == ["", "age>max(120);color not in allowed", "age is null"]
    assert out["prediction"].notna().all()


def test_a_model_without_rules_answers_as_before(tmp_path: Path) -> None:
    csv = make_csv(tmp_path / "plain.csv", n=120)
    config = load_config(
        overrides=[
            f"data.dataset={csv}",
            "data.target=label",
            "data.categorical=[color]",
            "explain.enabled=false",
        ]
    )
    result = train(config)
    model = mlflow.pyfunc.load_model(result.model_uri, model_config={"on_rule_violation": "flag"})
    out = model.predict(rows()[["x1", "x2", "color"]])
    assert "violations" not in out.columns and len(out) == 3


# ---- served over HTTP, logged and checked ----
def log_url(store: dict) -> str:
    return f"sqlite:///{store['root'] / 'predictions.db'}"


@pytest.fixture(scope="module")
def reject_server(store: dict) -> Iterator[str]:
    """`mlflow models serve` of @production as logged (reject), logging its requests."""
    port = free_port()
    cmd = models_serve(f"models:/{NAME}@production", port)
    config = {"monitoring": True, "monitoring_url": log_url(store)}
    env = server_env(store["uri"], SERVING_MODEL_CONFIG=json.dumps(config))
    with running(cmd, env, port, store["root"] / "reject.log") as base:
        yield base


@pytest.fixture(scope="module")
def flag_server(store: dict) -> Iterator[str]:
    """`mlops serve` of @production with on_rule_violation=flag, logging its requests."""
    port = free_port()
    cmd = [str(BIN / "mlops"), "serve", NAME, "--alias", "production", "--port", str(port)]
    config = {"on_rule_violation": "flag", "monitoring": True, "monitoring_url": log_url(store)}
    env = server_env(store["uri"], SERVING_MODEL_CONFIG=json.dumps(config))
    with running(cmd, env, port, store["root"] / "flag.log") as base:
        yield base


def split(frame: pd.DataFrame) -> dict:
    return {"dataframe_split": json.loads(frame.to_json(orient="split", index=False))}


def logged(url: str, expect_rows: int, timeout: float = 20) -> pd.DataFrame:
    engine = sa.create_engine(url)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                with engine.connect() as conn:
                    table = pd.DataFrame(conn.execute(sa.select(PREDICTIONS)).mappings().all())
            except sa.exc.DBAPIError:  # no table yet
                table = pd.DataFrame()
            if len(table) >= expect_rows or time.monotonic() > deadline:
                return table
            time.sleep(0.2)
    finally:
        engine.dispose()


@pytest.mark.slow
def test_served_rules_reject_or_flag_and_are_counted_in_the_log_and_the_check(
    store: dict, reject_server: str, flag_server: str
) -> None:
    status, body = post(reject_server, split(rows()))
    assert status == 200 and "violations" not in body["predictions"][0]
    status, body = post(reject_server, split(rows(age=[30.0, 40.0, 150.0])))
    assert status == 400, body
    assert "column 'age' is above its max 120 (data.rules), got 150.0 in row 2" in body["message"]

    status, body = post(
        flag_server, split(rows(age=[30.0, 150.0, 40.0], color=["red", "red", "x"]))
    )
    assert status == 200, body
    assert [r["violations"] for r in body["predictions"]] == [
        "",
        "age>max(120)",
        "color not in allowed",
    ]
    status, body = post(flag_server, split(rows()))
    assert [r["violations"] for r in body["predictions"]] == ["", "", ""]

    # 3 + 1 (refused) rows from the rejecting server, 3 + 3 from the flagging one
    table = logged(log_url(store), 10)
    assert len(table) == 10
    refused = table[table["status"] == 400]
    assert refused["violations"].tolist() == [1] and "data.rules" in refused["error"].iloc[0]
    answered = table[table["status"] == 200]
    assert sorted(answered["violations"].tolist()) == [0] * 7 + [1, 1]

    with using_store(store["uri"]):
        result = check(load_config(overrides=store["overrides"]), NAME, window="1h")
        metrics = mlflow.MlflowClient().get_run(result.run_id).data.metrics
    assert result.metrics["rule_violations"] == 3
    assert result.metrics["rule_violation_rate"] == pytest.approx(3 / 10)
    assert metrics["rule_violation_rate"] == pytest.approx(3 / 10)


@pytest.mark.parametrize("mode", ["reject", "flag"])
def test_a_shadows_batch_keeps_the_rules_and_logs_each_requests_violations(
    store: dict, tmp_path: Path, mode: str
) -> None:
    """``answer_many`` (a shadow's queue): with reject, the breaking request alone is refused
    (and logged so); with flag, every request is scored and its rows' violations logged."""
    with using_store(store["uri"]):
        model = mlflow.pyfunc.load_model(
            f"models:/{NAME}@production", model_config={"on_rule_violation": mode}
        )
    wrapper = model.unwrap_python_model()
    good = wrapper.contract.from_frame(rows())
    bad = wrapper.contract.from_frame(rows(age=[30.0, 150.0, 130.0]))
    url = f"sqlite:///{tmp_path / 'log.db'}"
    wrapper.enable_monitoring(url)
    try:
        outcomes = wrapper.answer_many([("good", *good), ("bad", *bad)])
        assert wrapper.monitor.flush(10)
    finally:
        wrapper.monitor.close()
    table = logged(url, 1, timeout=1)
    per_request = table.groupby("request_id")["violations"].apply(list).to_dict()
    if mode == "reject":
        assert outcomes == [True, False]
        assert per_request == {"good": [0, 0, 0], "bad": [2]}
    else:
        assert outcomes == [True, True]
        assert per_request == {"good": [0, 0, 0], "bad": [0, 1, 1]}
