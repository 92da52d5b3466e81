"""Real data in, explanations out, across commands: a CSV with dates, free text and a category,
declared feature transforms and data rules -> `mlops train --register` -> `mlops promote`
(staging, production) -> a real `mlops serve` over HTTP (answers, explanations, rule refusals)
-> `mlops explain` -> `mlops reproduce`; and a Parquet folder, an S3 prefix and a SQL query each
trained on and explained by the served wrapper."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import mlflow
import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa

from mlops.config import load_config
from mlops.training import train
from tests.conftest import free_port, using_store
from tests.helpers import run_cli
from tests.servers import BIN, MOTO_S3_ENV, moto_s3, post, running, server_env

NAME = "flow-model"
WORDS_YES = ["great", "fast", "love", "happy"]
WORDS_NO = ["slow", "broken", "refund", "angry"]
FEATURES = (
    "{income: {transform: log}, signup: {transform: date, parts: [month, dayofweek]}, "
    "comment: {transform: tfidf, max_features: 20}}"
)
RULES = (
    "{columns: {age: {min: 0, max: 120, not_null: true}, city: {allowed: [north, south, east]}}}"
)


def table(n: int = 300, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    label = rng.random(n) < 0.5
    words = [" ".join(rng.choice(WORDS_YES if y else WORDS_NO, size=3)) + " ok" for y in label]
    days = pd.Timestamp("2025-01-01") + pd.to_timedelta(rng.integers(0, 365, n), unit="D")
    return pd.DataFrame(
        {
            "age": rng.integers(18, 90, n).astype(float),
            "income": np.exp(rng.normal(10, 1, n)) + 500 * label,
            "city": rng.choice(["north", "south", "east"], n),
            "signup": days.strftime("%Y-%m-%d"),
            "comment": words,
            "label": np.where(label, "yes", "no"),
        }
    )


def overrides(dataset: str) -> list[str]:
    return [
        f"data.dataset={dataset}",
        "data.target=label",
        "data.categorical=[city]",
        f"data.features={FEATURES}",
        f"data.rules={RULES}",
        f"registry.model_name={NAME}",
    ]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("flow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    csv = root / "customers.csv"
    table().to_csv(csv, index=False)
    with using_store(uri):
        yield {"root": root, "uri": uri, "csv": csv}


def test_csv_with_dates_and_text_trains_promotes_serves_explains_and_reproduces(
    store: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    root, csv = store["root"], store["csv"]
    with using_store(store["uri"]):
        sets = [a for o in overrides(str(csv)) for a in ("--set", o)]
        code, out, err = run_cli(
            ["train", *sets, "--register", "--output-json", str(root / "t.json")], capsys
        )
        assert code == 0, out + err
        trained = json.loads((root / "t.json").read_text())
        assert trained["metrics"]["validation_accuracy"] > 0.8, trained["metrics"]
        version = trained["registered_version"]
        for stage in ("staging", "production"):
            code, out, err = run_cli(
                ["promote", NAME, "--version", version, "--to", stage, "--reason", "flow"],
                capsys,
            )
            assert code == 0, out + err
        client = mlflow.MlflowClient()
        run = client.get_run(trained["run_id"])
        # explanations per ORIGINAL column: the date's parts and the text's words add up to it
        shap_table = mlflow.artifacts.load_text(
            f"runs:/{trained['run_id']}/explain/shap_importance.csv"
        )
        named = set(pd.read_csv(pd.io.common.StringIO(shap_table)).iloc[:, 0])
        assert named == {"age", "income", "city", "signup", "comment"}, named
        assert "importance_comment" in run.data.metrics

    rows = table(4, seed=9).drop(columns="label")
    rows.loc[1, "signup"] = "not a date"  # imputed, answered
    port = free_port()
    cmd = [str(BIN / "mlops"), "serve", NAME, "--alias", "production", "--port", str(port)]
    with running(cmd, server_env(store["uri"]), port, root / "serve.log") as base:
        body = {"dataframe_split": json.loads(rows.to_json(orient="split", index=False))}
        status, answer = post(base, body)
        assert status == 200, answer
        assert [p["model_version"] for p in answer["predictions"]] == [version] * 4
        assert all("explanation" not in p for p in answer["predictions"])
        status, answer = post(base, {**body, "params": {"explain": 3}})
        assert status == 200, answer
        for p in answer["predictions"]:
            e = p["explanation"]
            assert len(e["contributions"]) == 3
            assert {c["feature"] for c in e["contributions"]} <= set(rows.columns)
            total = e["expected_value"] + sum(c["contribution"] for c in e["contributions"])
            assert total + e["others"] == pytest.approx(e["value"], abs=1e-6)
        bad = rows.copy()
        bad.loc[2, "age"] = 150.0
        status, answer = post(
            base, {"dataframe_split": json.loads(bad.to_json(orient="split", index=False))}
        )
        assert status == 400, answer
        assert re.search(r"'age' is above its max 120.*150", answer["message"]), answer
        unknown_city = rows.copy()
        unknown_city.loc[0, "city"] = "west"
        status, answer = post(base, {"dataframe_records": unknown_city.to_dict("records")})
        assert status == 400 and "'city'" in answer["message"], answer

    rows.to_csv(root / "rows.csv", index=False)
    with using_store(store["uri"]):
        code, out, err = run_cli(
            [
                "explain",
                NAME,
                "--alias",
                "production",
                "--input",
                str(root / "rows.csv"),
                "--top",
                "2",
            ],
            capsys,
        )
        assert code == 0, out + err
        assert "signup" in out or "comment" in out or "income" in out, out
        code, out, err = run_cli(["reproduce", trained["run_id"]], capsys)
        assert code == 0, out + err
        assert "data: the same" in out
        assert re.search(r"^test_accuracy\s+(\S+)\s+\1\s+0\s+ok", out, re.M), out


def _explained(model_uri: str, rows: pd.DataFrame) -> pd.DataFrame:
    model = mlflow.pyfunc.load_model(model_uri)
    out = model.predict(rows, params={"explain": 2})
    assert len(out) == len(rows)
    for e in out["explanation"]:
        assert len(e["contributions"]) == 2
    return out


def test_a_parquet_folder_trains_and_the_model_explains(store: dict) -> None:
    folder = store["root"] / "parquet"
    folder.mkdir()
    data = table(240, seed=3)
    for i, part in enumerate(np.array_split(data, 3)):
        part.to_parquet(folder / f"part-{i}.parquet", index=False)
    with using_store(store["uri"]):
        result = train(load_config(overrides=[*overrides(str(folder)), "explain.enabled=false"]))
        _explained(result.model_uri, table(5, seed=4).drop(columns="label"))


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    with moto_s3(port, tmp_path_factory.mktemp("moto") / "moto.log") as endpoint:
        yield endpoint


def test_an_s3_prefix_trains_and_the_model_explains(
    store: dict, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import boto3

    for key, value in {**MOTO_S3_ENV, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint}.items():
        monkeypatch.setenv(key, value)
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="flow")
    data = table(240, seed=5)
    for i, part in enumerate(np.array_split(data, 2)):
        s3.put_object(Bucket="flow", Key=f"customers/part-{i}.csv", Body=part.to_csv(index=False))
    with using_store(store["uri"]):
        result = train(
            load_config(overrides=[*overrides("s3://flow/customers/"), "explain.enabled=false"])
        )
        run = mlflow.MlflowClient().get_run(result.run_id)
        assert run.data.tags["mlops.data_source"] == "s3://flow/customers/"
        _explained(result.model_uri, table(5, seed=6).drop(columns="label"))


def test_a_sql_query_trains_and_the_model_explains(store: dict, postgres_url: str) -> None:
    engine = sa.create_engine(postgres_url.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        table(240, seed=7).to_sql("customers", engine, index=False)
    finally:
        engine.dispose()
    url = postgres_url.replace("postgresql://", "postgresql+psycopg://", 1)
    query = "sql:SELECT age, income, city, signup, comment, label FROM customers"
    with using_store(store["uri"]):
        result = train(
            load_config(
                overrides=[*overrides(query), f"data.sql_url={url}", "explain.enabled=false"]
            )
        )
        _explained(result.model_uri, table(5, seed=8).drop(columns="label"))
