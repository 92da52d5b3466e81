"""The registry layer against real MLflow registries (SQLite here, PostgreSQL for the race)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from mlops.cli import main
from mlops.config import load_config
from mlops.errors import ConfigError, GateFailed, RegistryError
from mlops.registry import promote, rollback, status
from mlops.registry.audit import AuditLog
from mlops.training import train
from tests.conftest import free_port
from tests.helpers import make_csv
from tests.servers import BIN, models_serve, post, running, server_env

NAME = "reg-model"


def config_for(tmp_path: Path, *extra: str):
    return load_config(
        overrides=[
            f"registry.model_name={NAME}",
            f"registry.audit_url=sqlite:///{tmp_path / 'audit.db'}",
            *extra,
        ]
    )


@pytest.fixture
def versions(tmp_path: Path):
    """v1: good logistic regression; v2: a much weaker one (C=0.001) on the same data."""
    cfg = config_for(tmp_path)
    v1 = train(config_for(tmp_path), register=True)
    v2 = train(config_for(tmp_path, "model.params.C=0.001"), register=True)
    assert (v1.registered_version, v2.registered_version) == ("1", "2")
    return cfg


def aliases() -> dict[str, str]:
    return {k: str(v) for k, v in mlflow.MlflowClient().get_registered_model(NAME).aliases.items()}


def audit_rows(cfg) -> list:
    return AuditLog(cfg.registry.audit_url).records(NAME)


def test_registration_records_checksum_and_data_hash(versions) -> None:
    mv = mlflow.MlflowClient().get_model_version(NAME, "1")
    assert len(mv.tags["mlops.checksum"]) == 64
    assert len(mv.tags["mlops.data_hash"]) == 64


def test_staging_then_production_with_audit_and_stage_mirror(versions) -> None:
    cfg = versions
    p = promote(cfg, NAME, "1", "staging", reason="first candidate", who="alice")
    assert {g.gate: g.passed for g in p.gates} == {
        "threshold validation_accuracy": True,
        "signature and input example": True,
        "artifact checksum": True,
    }
    assert aliases() == {"staging": "1"}
    p = promote(cfg, NAME, "1", "production", who="bob")
    assert all(g.passed for g in p.gates) and p.from_version is None
    assert aliases() == {"production": "1"}  # staging moved on with the version
    with _no_future_warning():
        staged = mlflow.pyfunc.load_model(f"models:/{NAME}/Production")
    assert staged.metadata.run_id == mlflow.MlflowClient().get_model_version(NAME, "1").run_id
    rows = audit_rows(cfg)
    assert [(r.who, r.action, r.outcome, r.target, r.from_version, r.to_version) for r in rows] == [
        ("alice", "promote", "done", "staging", None, "1"),
        ("bob", "promote", "done", "production", None, "1"),
    ]
    assert rows[0].reason == "first candidate"
    version = mlflow.MlflowClient().get_model_version(NAME, "1")
    # one compact tag: the latest change; the full record stays in the audit table
    assert not [k for k in version.tags if k.startswith("mlops.audit.")]
    assert version.tags["mlops.last_change"].startswith("promote to production done by bob at ")
    assert f"(audit #{rows[1].id})" in version.tags["mlops.last_change"]
    assert (
        version.tags["mlops.family"] == "logreg" and version.tags["mlops.task"] == "classification"
    )
    assert version.description.startswith("logreg (classification) registered by ")
    assert "validation_accuracy" in version.description
    assert (
        mlflow.MlflowClient()
        .get_registered_model(NAME)
        .description.startswith("logreg for classification")
    )


class _no_future_warning:
    def __enter__(self):
        import warnings

        self._cm = warnings.catch_warnings()
        self._cm.__enter__()
        warnings.simplefilter("ignore", FutureWarning)

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)


def test_threshold_gate_refuses_and_changes_nothing(versions, tmp_path: Path) -> None:
    strict = config_for(
        tmp_path,
        "registry.staging.classification=[{metric: validation_accuracy, threshold: 0.999}]",
    )
    with pytest.raises(GateFailed) as info:
        promote(strict, NAME, "1", "staging")
    failed = [g for g in info.value.gates if not g.passed]
    assert [g.gate for g in failed] == ["threshold validation_accuracy"]
    assert failed[0].required == ">= 0.999" and float(failed[0].measured) < 0.999
    assert aliases() == {}
    (row,) = audit_rows(strict)
    assert (row.outcome, row.to_version) == ("refused", "1")


def test_production_needs_staging_or_force_with_reason(versions) -> None:
    cfg = versions
    with pytest.raises(GateFailed, match="in staging"):
        promote(cfg, NAME, "1", "production")
    with pytest.raises(ConfigError, match="--force needs --reason"):
        promote(cfg, NAME, "1", "production", force=True)
    p = promote(cfg, NAME, "1", "production", force=True, reason="hotfix")
    assert p.forced and aliases() == {"production": "1"}
    assert [(r.outcome, r.forced) for r in audit_rows(cfg)] == [("refused", False), ("done", True)]


def test_challenger_must_beat_champion_unless_within_tolerance(versions, tmp_path: Path) -> None:
    cfg = versions
    promote(cfg, NAME, "1", "staging")
    promote(cfg, NAME, "1", "production")
    promote(cfg, NAME, "2", "staging")
    with pytest.raises(GateFailed) as info:
        promote(cfg, NAME, "2", "production")
    gate = next(g for g in info.value.gates if g.gate == "beats champion")
    assert not gate.passed and "vs" in gate.measured and "reg-model v1" in gate.measured
    assert aliases() == {"production": "1", "staging": "2"}
    lenient = config_for(tmp_path, "registry.production.tolerance=0.5")
    p = promote(lenient, NAME, "2", "production")
    assert (p.from_version, p.to_version) == ("1", "2")
    assert aliases() == {"production": "2"}


def test_tampered_artifact_is_refused(versions) -> None:
    cfg = versions
    # tamper with the stored files of version 1 in the artifact store
    source = mlflow.MlflowClient().get_model_version_download_uri(NAME, "1")
    stored = Path(source.replace("file://", ""))
    target = stored / "artifacts" / "metadata.json"
    assert target.is_file(), list(stored.rglob("*"))[:10]
    target.write_text(target.read_text().replace('"task"', '"task" ', 1))
    with pytest.raises(GateFailed, match="artifact checksum"):
        promote(cfg, NAME, "1", "staging")
    assert aliases() == {}


def test_schema_change_is_refused(tmp_path: Path) -> None:
    full = make_csv(tmp_path / "full.csv", n=200)
    cut = tmp_path / "cut.csv"
    pd.read_csv(full).drop(columns=["x2"]).to_csv(cut, index=False)
    base = ["data.target=label", "data.categorical=[color]"]
    train(config_for(tmp_path, f"data.dataset={full}", *base), register=True)
    train(config_for(tmp_path, f"data.dataset={cut}", *base), register=True)
    cfg = config_for(tmp_path, "registry.staging.classification=[]")
    promote(cfg, NAME, "1", "production", force=True, reason="seed")
    with pytest.raises(GateFailed) as info:
        promote(cfg, NAME, "2", "production", force=True, reason="try")
    gate = next(g for g in info.value.gates if g.gate == "input schema compatible")
    assert not gate.passed and "'x2' removed" in gate.measured
    assert aliases() == {"production": "1"}


def test_rollback_restores_the_replaced_version_and_serves_it(
    versions, tmp_path: Path, tracking_uri: str
) -> None:
    lenient = config_for(tmp_path, "registry.production.tolerance=0.5")
    promote(lenient, NAME, "1", "production", force=True, reason="seed")
    promote(lenient, NAME, "2", "production", force=True, reason="next")
    with pytest.raises(RegistryError, match="no version 9"):
        rollback(lenient, NAME, to_version="9")
    r = rollback(lenient, NAME, reason="alert")
    assert (r.action, r.from_version, r.to_version) == ("rollback", "2", "1")
    assert aliases() == {"production": "1"}
    v2 = mlflow.MlflowClient().get_model_version(NAME, "2")
    assert v2.tags.get("mlops.rolled_back") == "true" and v2.current_stage == "Archived"
    assert audit_rows(lenient)[-1].action == "rollback"
    rows = {s.version: s for s in status(NAME)}
    assert rows["1"].aliases == ("production",) and rows["1"].stage == "Production"
    port = free_port()
    cmd = models_serve(f"models:/{NAME}@production", port)
    frame = pd.DataFrame(mlflow.pyfunc.load_model(f"models:/{NAME}/1").input_example).head(2)
    with running(cmd, server_env(tracking_uri), port, tmp_path / "serve.log") as base:
        code, answer = post(base, {"dataframe_split": json.loads(frame.to_json(orient="split"))})
    assert code == 200 and {p["model_version"] for p in answer["predictions"]} == {"1"}


def test_cli_refusal_prints_each_gate_and_exits_1(
    versions, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conf = tmp_path / "exp.yaml"
    conf.write_text(
        f"registry:\n  model_name: {NAME}\n  audit_url: sqlite:///{tmp_path / 'audit.db'}\n"
    )
    with pytest.raises(SystemExit) as info:
        main(["promote", "--version", "2", "--to", "production", "--config", str(conf)])
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert "[FAIL] in staging: measured not in staging" in err
    assert (
        err.strip()
        .splitlines()[-1]
        .startswith("error: promote of reg-model version 2 to production refused")
    )
    main(["promote", "--version", "1", "--to", "staging", "--config", str(conf)])
    main(["status", "--config", str(conf)])
    main(["audit", "--config", str(conf)])
    out = capsys.readouterr().out
    assert "staging is now version 1" in out
    assert (
        re.search(r"^\s+1  logreg\s+classification\s+staging ", out, re.M)
        and "test_accuracy=" in out
    )
    assert "promote refused: production - -> 2" in out and "promote done: staging - -> 1" in out


@pytest.mark.postgres
def test_two_processes_racing_leave_one_production_and_a_true_audit(
    postgres_url: str, tmp_path: Path
) -> None:
    """Two real processes promote v2 and v3 at once against a shared PostgreSQL store."""
    mlflow.set_tracking_uri(postgres_url)
    mlflow.set_registry_uri(postgres_url)
    os.environ["MLFLOW_TRACKING_URI"] = os.environ["MLFLOW_REGISTRY_URI"] = postgres_url
    conf = tmp_path / "race.yaml"
    conf.write_text(
        f"registry:\n  model_name: {NAME}\n  audit_url: {postgres_url}\n"
        "  production: {tolerance: 1.0}\n"
    )
    cfg = load_config(conf)
    for c in (1.0, 0.5, 0.2):
        train(load_config(conf, [f"model.params.C={c}"]), register=True)
    promote(cfg, NAME, "1", "production", force=True, reason="seed")
    env = server_env(postgres_url)
    procs = [
        subprocess.Popen(
            [
                str(BIN / "mlops"),
                "promote",
                NAME,
                "--version",
                v,
                "--to",
                "production",
                "--force",
                "--reason",
                f"race {v}",
                "--config",
                str(conf),
            ],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for v in ("2", "3")
    ]
    outs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    rows = [
        r for r in AuditLog(postgres_url).records(NAME) if r.reason and r.reason.startswith("race")
    ]
    assert len(rows) == 2 and all(r.outcome == "done" for r in rows)
    first, second = rows
    assert first.from_version == "1"  # the first replaced the seed...
    assert second.from_version == first.to_version  # ...and the second replaced the first
    assert aliases() == {"production": second.to_version}
    client = mlflow.MlflowClient()
    with _no_future_warning():
        stages = {
            str(mv.version): mv.current_stage
            for mv in client.search_model_versions(f"name = '{NAME}'")
        }
    assert (
        list(stages.values()).count("Production") == 1 and stages[second.to_version] == "Production"
    )
