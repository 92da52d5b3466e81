"""The registry under attack (issue 12), against real stores: the SQLite tracking store of the
fixtures, SQLite and PostgreSQL audit stores.

Audit first, then change; versions in MLflow's canonical form; rollback to an arbitrary version
gated; changes made outside mlops noticed, recorded once and mirrored; model names never in a
filter string; tampered files never loaded.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import mlflow
import pytest
from mlflow.exceptions import MlflowException

from mlops.cli import main
from mlops.config import load_config
from mlops.errors import ConfigError, GateFailed, RegistryError
from mlops.registry import evaluate, promote, reconcile, rollback, status
from mlops.registry.audit import AuditLog
from mlops.training import train
from tests.test_registry import NAME, aliases, audit_rows, config_for, versions  # noqa: F401


def write_conf(tmp_path: Path, audit_url: str, *extra: str) -> str:
    conf = tmp_path / "exp.yaml"
    conf.write_text(f"registry:\n  model_name: {NAME}\n  audit_url: {audit_url}\n" + "".join(extra))
    return str(conf)


def run_cli(*args: str) -> int:
    """``mlops ARGS``: 0, or the exit code of the one-line error."""
    try:
        main(list(args))
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def stage(version: str) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return mlflow.MlflowClient().get_model_version(NAME, version).current_stage


def production_stage_run_id() -> str:
    """The run of the version ``models:/NAME/Production`` (MLflow's legacy stage) resolves to."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return mlflow.pyfunc.load_model(f"models:/{NAME}/Production").metadata.run_id


def run_id(version: str) -> str:
    return mlflow.MlflowClient().get_model_version(NAME, version).run_id


# ---- audit first, then change ----


@pytest.mark.postgres
def test_long_version_is_normalised_and_an_unwritable_row_moves_nothing_on_postgres(
    versions,  # noqa: F811
    postgres_url: str,
    tmp_path: Path,
) -> None:
    conf = write_conf(tmp_path, postgres_url, "  production: {tolerance: 0.5}\n")
    assert (
        run_cli(
            "promote",
            NAME,
            "--version",
            "000000000000000000001",  # 21 characters: too long for the audit column as given
            "--to",
            "production",
            "--force",
            "--reason",
            "x",
            "--config",
            conf,
        )
        == 0
    )
    cfg = load_config(conf)
    (row,) = AuditLog(postgres_url).records(NAME)
    assert (row.action, row.outcome, row.to_version, row.forced) == ("promote", "done", "1", True)
    assert aliases() == {"production": "1"}
    tag = mlflow.MlflowClient().get_model_version(NAME, "1").tags["mlops.last_change"]
    assert f"(audit #{row.id})" in tag

    # a row the store refuses (who: 300 characters, the column holds 200): the alias stays
    with pytest.raises(
        RegistryError, match="cannot write the audit record.*production is unchanged"
    ):
        promote(cfg, NAME, "2", "production", force=True, reason="x", who="w" * 300)
    assert aliases() == {"production": "1"} and stage("1") == "Production"
    assert stage("2") == "None"
    assert "mlops.last_change" not in mlflow.MlflowClient().get_model_version(NAME, "2").tags
    assert [r.id for r in AuditLog(postgres_url).records(NAME)] == [row.id]


def test_a_failed_alias_move_is_put_back_and_its_intent_settled_failed(
    versions,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cfg = config_for(tmp_path, "registry.production.tolerance=0.5")
    promote(cfg, NAME, "1", "production", force=True, reason="seed")
    real = mlflow.MlflowClient.transition_model_version_stage

    def failing(self, name, version, stage, *args, **kwargs):  # noqa: ANN001
        if str(version) == "2":
            raise MlflowException("registry write refused")
        return real(self, name, version, stage, *args, **kwargs)

    monkeypatch.setattr(mlflow.MlflowClient, "transition_model_version_stage", failing)
    with pytest.raises(
        RegistryError, match="failed while moving the alias.*production is unchanged"
    ):
        promote(cfg, NAME, "2", "production", force=True, reason="next")
    assert aliases() == {"production": "1"}
    last = audit_rows(cfg)[-1]
    assert (last.action, last.outcome, last.to_version) == ("promote", "failed", "2")
    assert "registry write refused" in last.detail and "aliases restored" in last.detail
    assert last.settled_at is not None
    monkeypatch.undo()
    assert reconcile(NAME, cfg) == []  # nothing left to settle, nothing external


def test_an_interrupted_promotion_is_settled_against_the_registry(
    versions,  # noqa: F811
    tmp_path: Path,
) -> None:
    cfg = config_for(tmp_path, "registry.production.tolerance=0.5")
    log = AuditLog(cfg.registry.audit_url)
    client = mlflow.MlflowClient()
    intent = dict(
        who="alice", action="promote", model=NAME, target="production", forced=True, gates=[]
    )
    # the process died after moving the alias, before settling its row
    log.record(outcome="pending", from_version=None, to_version="1", reason="a", **intent)
    client.set_registered_model_alias(NAME, "production", "1")
    (settled,) = reconcile(NAME, cfg)
    assert (settled.outcome, settled.to_version) == ("done", "1")
    assert "interrupted after the alias moved" in settled.detail
    assert stage("1") == "Production"  # what the move had left undone is finished
    # the process died after writing its intent, before moving the alias
    log.record(outcome="pending", from_version="1", to_version="2", reason="b", **intent)
    (settled,) = reconcile(NAME, cfg)
    assert (settled.outcome, settled.to_version) == ("failed", "2")
    assert "interrupted before the alias moved" in settled.detail
    assert aliases() == {"production": "1"} and stage("2") == "None"
    assert reconcile(NAME, cfg) == []
    assert [(r.outcome, r.to_version) for r in audit_rows(cfg)] == [("done", "1"), ("failed", "2")]
    p = promote(cfg, NAME, "2", "production", force=True, reason="c")
    assert (p.from_version, p.reconciled) == ("1", ())
    assert rollback(cfg, NAME).to_version == "1"


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def test_the_promotion_lock_excludes_a_second_holder_and_lets_rows_commit(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = (
        f"sqlite:///{tmp_path / 'audit.db'}"
        if backend == "sqlite"
        else request.getfixturevalue("postgres_url")
    )
    first, second = AuditLog(url), AuditLog(url)
    with first.lock("m", "alice") as held:
        assert held
        with second.lock("m", "bob", timeout=0) as other:
            assert not other
        with second.lock("m", "bob", timeout=0.3) as other:
            assert not other
        # an intent commits at once, while the lock is held: another reader sees it
        row = first.record(
            who="alice",
            action="promote",
            outcome="pending",
            model="m",
            target="production",
            from_version=None,
            to_version="1",
            reason=None,
            forced=False,
            gates=[],
        )
        assert [(r.id, r.outcome) for r in second.records("m")] == [(row.id, "pending")]
        assert second.settle(row.id, "done").outcome == "done"
        with pytest.raises(RegistryError, match="not pending"):
            second.settle(row.id, "failed")
    with second.lock("m", "bob", timeout=0) as other:
        assert other


# ---- versions in canonical form ----


def test_versions_are_canonical_before_any_gate(
    versions,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cfg = versions
    promote(cfg, NAME, " 01 ", "staging")
    p = promote(cfg, NAME, "0001", "production")
    assert p.to_version == "1" and aliases() == {"production": "1"}
    rows = len(audit_rows(cfg))
    for given in ("01", " 1", "1 ", "000000000000000000001"):
        with pytest.raises(RegistryError, match="version 1 is already production"):
            promote(cfg, NAME, given, "production", force=True, reason="again")
        with pytest.raises(RegistryError, match="version 1 is already production"):
            rollback(cfg, NAME, to_version=given)
    with pytest.raises(RegistryError, match="version 1 is production; staging is for"):
        promote(cfg, NAME, "01", "staging")
    assert len(audit_rows(cfg)) == rows  # no duplicate rows
    assert aliases() == {"production": "1"} and stage("1") == "Production"
    assert production_stage_run_id() == run_id("1")  # /Production still resolves
    assert {g.gate for g in evaluate(cfg, NAME, " 02", "staging")} >= {"artifact checksum"}
    conf = write_conf(tmp_path, cfg.registry.audit_url)
    capsys.readouterr()
    for bad in ("1.0", "abc", "-1", "0", "1_0", "", "99999999999999999999999"):
        assert run_cli("promote", NAME, "--version", bad, "--to", "staging", "--config", conf) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: --version: "), err
        assert "is not a model version" in err[0]
    with pytest.raises(ConfigError, match="--to: '2.5' is not a model version"):
        rollback(cfg, NAME, to_version="2.5")


# ---- rollback to any version is gated ----


def test_rollback_to_a_version_faces_the_staging_gates_unless_forced(
    versions,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    strict = config_for(
        tmp_path,
        "registry.staging.classification=[{metric: validation_accuracy, threshold: 0.999}]",
    )
    promote(strict, NAME, "1", "production", force=True, reason="seed")
    with pytest.raises(GateFailed) as info:
        rollback(strict, NAME, to_version="2", reason="probe")
    gates = {g.gate: g for g in info.value.gates}
    assert list(gates)[0] == "artifact checksum"
    assert {
        "threshold validation_accuracy",
        "signature and input example",
        "smoke prediction",
        "input schema compatible",
    } <= set(gates)
    assert not gates["threshold validation_accuracy"].passed
    assert aliases() == {"production": "1"}
    assert (audit_rows(strict)[-1].action, audit_rows(strict)[-1].outcome) == (
        "rollback",
        "refused",
    )
    with pytest.raises(ConfigError, match="--force needs --reason"):
        rollback(strict, NAME, to_version="2", force=True)
    conf = write_conf(
        tmp_path,
        strict.registry.audit_url,
        "  staging:\n    classification: [{metric: validation_accuracy, threshold: 0.999}]\n",
    )
    capsys.readouterr()
    assert run_cli("rollback", "--to", "2", "--config", conf) == 1
    assert "[FAIL] threshold validation_accuracy" in capsys.readouterr().err
    assert run_cli("rollback", "--to", "2", "--force", "--reason", "hotfix", "--config", conf) == 0
    out = capsys.readouterr().out
    assert "[PASS] artifact checksum" in out and "threshold" not in out
    assert aliases() == {"production": "2"}
    last = audit_rows(strict)[-1]
    assert (last.action, last.outcome, last.forced, last.reason) == (
        "rollback",
        "done",
        True,
        "hotfix",
    )
    assert [g["gate"] for g in last.gates] == ["artifact checksum", "input schema compatible"]


# ---- changes made outside mlops ----


def test_alias_moved_outside_mlops_is_recorded_once_mirrored_and_rolled_back_right(
    versions,  # noqa: F811
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cfg = versions
    conf = write_conf(tmp_path, cfg.registry.audit_url)
    client = mlflow.MlflowClient()
    promote(cfg, NAME, "1", "production", force=True, reason="seed")
    client.set_registered_model_alias(NAME, "production", "2")  # MLflow's own client, no mlops
    before = len(audit_rows(cfg))
    with caplog.at_level("WARNING"):
        assert run_cli("status", "--config", conf) == 0
    assert "production moved outside mlops: 1 -> 2" in caplog.text
    external, mirror = audit_rows(cfg)[before:]
    assert (external.action, external.outcome, external.target) == (
        "external",
        "done",
        "production",
    )
    assert (external.from_version, external.to_version) == ("1", "2")
    assert external.who == "unknown (outside mlops)" and "outside mlops" in external.detail
    assert (mirror.action, mirror.outcome) == ("mirror", "done")
    assert stage("2") == "Production" and stage("1") == "Archived"
    assert production_stage_run_id() == run_id("2")  # /Production agrees with @production
    capsys.readouterr()
    assert run_cli("audit", "--config", conf) == 0  # once per change: nothing new
    out = capsys.readouterr().out
    assert "unknown (outside mlops) external done: production 1 -> 2" in out
    assert len(audit_rows(cfg)) == before + 2
    rows = {s.version: s for s in status(NAME)}
    assert rows["2"].aliases == ("production",) and rows["2"].stage == "Production"

    # the next rollback goes to the version production replaced: 1
    r = rollback(cfg, NAME, reason="back")
    assert (r.from_version, r.to_version) == ("2", "1") and aliases() == {"production": "1"}

    # a legacy stage set outside mlops: put back, so /Production follows @production again
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        client.transition_model_version_stage(NAME, "2", "Production")
    (fixed,) = reconcile(NAME, cfg)
    assert (fixed.action, fixed.outcome) == ("mirror", "done") and "v2 Production -> Archived" in (
        fixed.detail or ""
    )
    assert production_stage_run_id() == run_id("1") and reconcile(NAME, cfg) == []

    # staging set, then production removed, outside mlops
    client.set_registered_model_alias(NAME, "staging", "2")
    client.delete_registered_model_alias(NAME, "production")
    found = reconcile(NAME, cfg)
    assert [(r.action, r.target, r.from_version, r.to_version) for r in found[:2]] == [
        ("external", "production", "1", None),
        ("external", "staging", None, "2"),
    ]
    assert stage("2") == "Staging" and stage("1") == "Archived"
    assert reconcile(NAME, cfg) == []
    with pytest.raises(RegistryError, match="no production version"):
        rollback(cfg, NAME)


# ---- names never in a filter string ----


def test_model_names_are_never_pasted_into_a_filter(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conf = write_conf(tmp_path, f"sqlite:///{tmp_path / 'audit.db'}")
    for args in (
        ("promote", "x' OR '1'='1", "--version", "1", "--to", "staging"),
        ("evaluate", "x' OR '1'='1", "--version", "1"),
        ("rollback", "x' OR '1'='1"),
        ("status", "x' OR '1'='1"),
        ("audit", "a/b"),
    ):
        assert run_cli(*args, "--config", conf) == 1, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), (args, err)
        assert "not found" in err[0] or "cannot contain '/'" in err[0], err

    # a registered name with both quotes works everywhere
    quoted = """it's a "quoted" \\ name"""
    cfg = load_config(
        overrides=[
            f"registry.model_name={quoted}",
            f"registry.audit_url=sqlite:///{tmp_path / 'audit.db'}",
        ]
    )
    assert train(cfg, register=True).registered_version == "1"
    assert promote(cfg, quoted, "1", "staging").to_version == "1"
    assert [s.version for s in status(quoted)] == ["1"]
    assert reconcile(quoted, cfg) == []
    with pytest.raises(RegistryError, match="has no version 7; existing versions: 1"):
        promote(cfg, quoted, "7", "staging")


# ---- tampered files are never loaded ----


class _Payload:
    """A pickle that creates ``marker`` when it is loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):  # noqa: ANN204
        return (open, (self.marker, "w"))


def tamper_pipeline(version: str, marker: Path) -> Path:
    """Replace the stored pipeline file of ``version`` (whatever its format) with the payload."""
    uri = mlflow.MlflowClient().get_model_version_download_uri(NAME, version)
    stored = Path(uri.removeprefix("file://"))
    (pipeline,) = [p for p in (stored / "artifacts").iterdir() if p.name.startswith("pipeline")]
    pipeline.write_bytes(pickle.dumps(_Payload(marker)))
    return pipeline


NOT_RUN = "not run: the artifact checksum failed"


def test_a_tampered_version_is_never_loaded(
    versions,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MLOPS_ALLOW_PICKLE", "1")  # even a loader that would unpickle: never called
    marker = tmp_path / "pwned"
    conf = write_conf(tmp_path, versions.registry.audit_url, "  production: {tolerance: 0.5}\n")
    for step in (
        ("promote", NAME, "--version", "1", "--to", "production", "--force", "--reason", "a"),
        ("promote", NAME, "--version", "2", "--to", "production", "--force", "--reason", "b"),
    ):
        assert run_cli(*step, "--config", conf) == 0
    tamper_pipeline("1", marker)
    capsys.readouterr()

    assert run_cli("evaluate", NAME, "--version", "1", "--to", "production", "--config", conf) == 1
    err = capsys.readouterr().err
    assert "[FAIL] artifact checksum" in err
    for gate in ("input schema compatible", "smoke prediction", "beats champion"):
        assert f"[FAIL] {gate}: measured {NOT_RUN}" in err, gate
    assert run_cli("evaluate", NAME, "--version", "1", "--to", "staging", "--config", conf) == 1
    assert f"[FAIL] signature and input example: measured {NOT_RUN}" in capsys.readouterr().err
    promote_args = ("promote", NAME, "--version", "1", "--to", "production", "--force")
    assert run_cli(*promote_args, "--reason", "c", "--config", conf) == 1
    assert f"[FAIL] smoke prediction: measured {NOT_RUN}" in capsys.readouterr().err
    assert run_cli("rollback", NAME, "--config", conf) == 1  # back to 1, the one 2 replaced
    assert "[FAIL] artifact checksum" in capsys.readouterr().err
    assert run_cli("rollback", NAME, "--to", "1", "--force", "--reason", "d", "--config", conf) == 1
    err = capsys.readouterr().err
    assert "[FAIL] artifact checksum" in err
    assert f"[FAIL] input schema compatible: measured {NOT_RUN}" in err
    assert aliases() == {"production": "2"}
    assert not marker.exists()


def test_a_tampered_champion_is_checked_before_it_is_loaded(
    versions,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MLOPS_ALLOW_PICKLE", "1")
    marker = tmp_path / "pwned"
    conf = write_conf(tmp_path, versions.registry.audit_url, "  production: {tolerance: 0.5}\n")
    force = ("--force", "--reason", "seed")
    assert (
        run_cli("promote", NAME, "--version", "1", "--to", "production", *force, "--config", conf)
        == 0
    )
    tamper_pipeline("1", marker)
    capsys.readouterr()
    assert run_cli("evaluate", NAME, "--version", "2", "--config", conf) == 1
    shown = capsys.readouterr()
    assert "[PASS] artifact checksum" in shown.out and "[PASS] smoke prediction" in shown.out
    assert "[FAIL] beats champion: measured reg-model v1 fails its artifact checksum" in shown.err
    assert "[FAIL] input schema compatible: measured reg-model v1 fails its" in shown.err
    # forced, with a reason, a tampered champion may be replaced (without loading it)
    replace = ("--force", "--reason", "v1 was tampered with")
    assert (
        run_cli("promote", NAME, "--version", "2", "--to", "production", *replace, "--config", conf)
        == 0
    )
    assert aliases() == {"production": "2"}
    # and a rollback to it is refused on its checksum
    assert run_cli("rollback", NAME, "--config", conf) == 1
    assert "[FAIL] artifact checksum" in capsys.readouterr().err
    assert not marker.exists()


def test_storage_filter_quotes_a_study_name(tmp_path: Path) -> None:
    """end_orphan_runs finds a stale trial's runs by tags whatever quotes the study name holds."""
    import optuna

    from mlops.tuning.storage import end_orphan_runs

    client = mlflow.MlflowClient()
    experiment = client.create_experiment("orphans")
    for study in ("it's", 'say "hi"', "x' OR '1'='1"):
        run = client.create_run(
            experiment, tags={"mlops.study_name": study, "mlops.trial_number": "3"}
        )
        other = client.create_run(
            experiment, tags={"mlops.study_name": "other", "mlops.trial_number": "3"}
        )
        trial = optuna.trial.create_trial(value=1.0)
        trial.number = 3
        end_orphan_runs(study, trial)
        assert client.get_run(run.info.run_id).info.status == "FAILED", study
        assert client.get_run(other.info.run_id).info.status == "RUNNING", study
