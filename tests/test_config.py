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
    assert (
        "postgresql+psycopg://mlops:***@db/audit" in text and "https://hooks.example/x?***" in text
    )
    assert "sqlite:////tmp/x.db" == __import__("mlops.config").config.redact_url(
        "sqlite:////tmp/x.db"
    )
