from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from mlops.config import Config, load_config
from mlops.errors import ConfigError


def test_default_config_loads_with_family_defaults() -> None:
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.data.dataset == "sklearn:breast_cancer"
    assert cfg.model.family == "logreg"
    assert cfg.model.params["max_iter"] == 1000  # from conf/models/logreg.yaml
    assert (cfg.data.split.train, cfg.data.split.validation, cfg.data.split.test) == (0.7, 0.2, 0.1)


def test_overrides_are_typed_and_pick_the_family_file() -> None:
    cfg = load_config(
        overrides=[
            "model.family=random_forest",
            "model.params.n_estimators=7",
            "seed=3",
            "data.categorical=[a, b]",
        ]
    )
    assert cfg.model.family == "random_forest"
    assert cfg.model.params["n_estimators"] == 7
    assert cfg.model.params["min_samples_leaf"] == 1  # family default kept
    assert "max_iter" not in cfg.model.params  # logreg's defaults are not mixed in
    assert cfg.seed == 3
    assert cfg.data.categorical == ["a", "b"]


def test_flat_gives_dotted_keys() -> None:
    flat = load_config().flat()
    assert flat["data.split.train"] == 0.7
    assert flat["model.params.C"] == 1.0
    assert flat["registry.model_name"] == "mlops-model"


def test_config_file_values_are_used(tmp_path: Path) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text("experiment: demo\nmodel:\n  family: hist_gb\n  params: {max_iter: 5}\n")
    cfg = load_config(path)
    assert cfg.experiment == "demo"
    assert cfg.model.params["max_iter"] == 5
    assert cfg.model.params["learning_rate"] == 0.1


def test_invalid_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("seed: 1\ndata: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: invalid YAML at line \d+"):
        load_config(path)


def test_unknown_key_is_named(tmp_path: Path) -> None:
    path = tmp_path / "typo.yaml"
    path.write_text("data:\n  datset: x.csv\n")
    with pytest.raises(ConfigError, match=r"typo\.yaml: unknown key 'data\.datset'"):
        load_config(path)


def test_wrong_type_names_key_and_value() -> None:
    with pytest.raises(ConfigError, match=r"key 'seed'.*valid integer.*'abc'"):
        load_config(overrides=["seed=abc"])


def test_bad_task_lists_choices() -> None:
    with pytest.raises(
        ConfigError, match=r"key 'data.task'.*'auto', 'classification' or 'regression'"
    ):
        load_config(overrides=["data.task=clustering"])


def test_split_must_sum_to_one() -> None:
    with pytest.raises(ConfigError, match=r"data.split.*must be 1.0, got 1.1"):
        load_config(overrides=["data.split.train=0.8"])


def test_override_without_equals_sign() -> None:
    with pytest.raises(ConfigError, match=r"override 'seed' is not key=value"):
        load_config(overrides=["seed"])


def test_missing_config_file() -> None:
    with pytest.raises(ConfigError, match=r"config file 'nope.yaml' not found"):
        load_config("nope.yaml")


def test_config_is_frozen() -> None:
    cfg = load_config()
    with pytest.raises(ValidationError):
        cfg.seed = 5  # type: ignore[misc]


def test_config_artifact_hides_credentials() -> None:
    """The config.yaml logged on every run keeps URLs readable and their secrets out."""
    cfg = load_config(
        overrides=[
            "registry.audit_url=postgresql+psycopg://mlops:AUDITPW@db/audit",
            "monitoring.log_url=postgresql+psycopg://mon:LOGPW@db/log",
            "monitoring.webhook=https://hooks.example/x?token=HOOKTOKEN",
            "tuning.storage=postgresql+psycopg://optuna:STUDYPW@db/optuna",
        ]
    )
    text = cfg.to_yaml()
    for secret in ("AUDITPW", "LOGPW", "HOOKTOKEN", "STUDYPW"):
        assert secret not in text
        assert secret not in str(cfg.flat()) and secret not in str(cfg.params(tuning=True))
    assert (
        "postgresql+psycopg://mlops:***@db/audit" in text
        and "https://hooks.example/x?token=***" in text
    )
    assert "sqlite:////tmp/x.db" == __import__("mlops.config").config.redact_url(
        "sqlite:////tmp/x.db"
    )


def test_placeholders_are_logged_as_written() -> None:
    """A URL that names its secret as ${VAR} is logged with the placeholder, not the value."""
    cfg = load_config(
        overrides=[
            "monitoring.log_url=postgresql+psycopg://app:${MLOPS_LOG_DB_PASSWORD}@db/mlops",
            "monitoring.webhook=https://hooks.example/x?token=${HOOK_TOKEN}",
        ]
    )
    text = cfg.to_yaml()
    assert "postgresql+psycopg://app:${MLOPS_LOG_DB_PASSWORD}@db/mlops" in text
    assert "https://hooks.example/x?token=${HOOK_TOKEN}" in text
    assert cfg.flat()["monitoring.webhook"] == "https://hooks.example/x?token=${HOOK_TOKEN}"


def test_a_literal_secret_warns_and_suggests_a_placeholder(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level("WARNING", logger="mlops.config"):
        load_config(overrides=["registry.audit_url=postgresql://a:WarnedPW1@db/audit"])
    (record,) = [r for r in caplog.records if "registry.audit_url" in r.getMessage()]
    assert "${" in record.getMessage() and "WarnedPW1" not in record.getMessage()
    assert "postgresql://a:***@db/audit" in record.getMessage()


@pytest.mark.parametrize(
    "url", ["file:///etc/passwd", "ftp://user:FtpSecret1@files.example/x", "hooks.example/x"]
)
def test_webhook_must_be_http(url: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(overrides={"monitoring.webhook": url})
    message = str(info.value)
    assert "monitoring.webhook" in message and "http:// or https://" in message
    assert "https://hooks.example/alerts?token=${HOOK_TOKEN}" in message  # the fix
    assert "FtpSecret1" not in message


def test_webhook_may_be_one_placeholder_or_https() -> None:
    for url in ("${ALERT_HOOK}", "https://h.example/a?token=${T}", "http://127.0.0.1:9/x"):
        assert load_config(overrides={"monitoring.webhook": url}).monitoring.webhook == url


def test_a_failed_validation_does_not_echo_a_password() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(overrides={"registry.audit_url": ["postgresql://a:EchoedPW1@db/x"]})
    assert "EchoedPW1" not in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_config(overrides={"tuning.storage": 5, "monitoring.webhook": "ftp://x/?k=EchoTok1"})
    assert "EchoTok1" not in str(info.value)


def test_mask_key_env_names_a_variable_and_error_rate_is_gone() -> None:
    assert load_config().monitoring.mask_key_env == "MLOPS_MASK_KEY"
    with pytest.raises(ConfigError, match=r"monitoring.mask_key_env.*name of an environment"):
        load_config(overrides={"monitoring.mask_key_env": "not a name"})
    with pytest.raises(ConfigError, match=r"'error_rate' no longer exists.*server_error_rate"):
        load_config(
            overrides={"monitoring.rules": [{"name": "e", "metric": "error_rate", "above": 0.1}]}
        )
    rules = {r.name: r for r in load_config().monitoring.rules}
    assert rules["server_error_rate"].metric == "server_error_rate"
    assert all(r.min_requests == 100 for r in rules.values())


def test_a_config_logged_by_an_older_mlops_still_reads(tmp_path: Path) -> None:
    """Runs logged before error_rate was split (or with another webhook) keep their config.yaml
    readable: the registry's gates read it back for the data settings."""
    import yaml

    from mlops.config import read_resolved_config

    tree = yaml.safe_load(load_config().to_yaml())
    tree["monitoring"]["rules"].append({"name": "error_rate", "metric": "error_rate", "above": 0.1})
    tree["monitoring"]["webhook"] = "ftp://files.example/x?***"
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(tree))
    logged = read_resolved_config(path)
    assert logged.monitoring.rules[-1].metric == "error_rate"
    assert logged.data.dataset == "sklearn:breast_cancer"
