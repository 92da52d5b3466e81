"""`mlops k8s`: manifests that validate strictly and match the image `mlops package` builds.

One model is trained and registered once per module (version 1 @production) in its own
store; each test points MLflow at it and writes manifests into its own folder.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import pytest
import yaml

from mlops.artifacts import CHECKSUM_TAG
from mlops.config import load_config
from mlops.delivery import contract
from mlops.delivery.contract import version_facts
from mlops.delivery.k8s import (
    KUSTOMIZATION_FILE,
    SECRETS_EXAMPLE_FILE,
    SETTINGS_FILE,
    SUPPORTED_VERSIONS,
    ManifestError,
    app_name_for,
    validate_manifests,
)
from mlops.training import train
from tests.conftest import skip_or_fail, using_store
from tests.helpers import make_csv, run_cli

NAME = "K8s_Churn.Model"  # not a Kubernetes name as it is: the app name is derived
APP = "k8s-churn-model"
IMAGE = "registry.example:5000/acme/churn-model:v1"
SECRETS = {
    "MLFLOW_TRACKING_USERNAME": "reader-user-7f3a",
    "MLFLOW_TRACKING_PASSWORD": "hunter2-password-9c1e",
    "MLOPS_LOG_URL": "postgresql://log:pg-secret-5d2b@db:5432/log",
    "MLOPS_AUTH_TOKEN": "bearer-token-0a8e6c",
}
RESOURCES = {"deployment.yaml", "service.yaml", "hpa.yaml", "pdb.yaml"}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, template_store: Path) -> str:
    """A store holding NAME version 1 (trained with mlops, so checksummed) as @production."""
    root = tmp_path_factory.mktemp("k8s")
    shutil.copy(template_store, root / "mlflow.db")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    csv = make_csv(root / "data.csv", n=80)
    overrides = [
        f"data.dataset={csv}",
        "data.target=label",
        "data.categorical=[color]",
        f"registry.model_name={NAME}",
        f"registry.audit_url=sqlite:///{root / 'audit.db'}",
    ]
    with using_store(uri):
        assert train(load_config(overrides=overrides), register=True).registered_version == "1"
        mlflow.MlflowClient().set_registered_model_alias(NAME, "production", "1")
    return uri


@pytest.fixture
def registry(store: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """This test reads the module's store (the CLI through the environment too)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", store)
    with using_store(store):
        yield store


def k8s(out: Path, *extra: str) -> list[str]:
    return ["k8s", NAME, "--alias", "production", "--image", IMAGE, "--out", str(out), *extra]


def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


@pytest.fixture
def written(registry: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[Path, str]:
    """The manifests `mlops k8s` wrote for NAME@production, and what it printed."""
    out = tmp_path / "deploy"
    code, stdout, stderr = run_cli(k8s(out), capsys)
    assert code == 0, stderr
    return out, stdout


def test_cli_writes_every_file_and_reports_validation(written: tuple[Path, str]) -> None:
    out, stdout = written
    expected = RESOURCES | {SETTINGS_FILE, SECRETS_EXAMPLE_FILE, KUSTOMIZATION_FILE}
    assert {p.name for p in out.iterdir()} == expected
    for name in expected:
        assert str(out / name) in stdout
    assert f"valid (strict) for Kubernetes {', '.join(SUPPORTED_VERSIONS)}" in stdout
    kinds = {load(out / name)["kind"] for name in RESOURCES}
    assert kinds == {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"}


def test_every_document_validates_strictly_for_every_supported_version(
    written: tuple[Path, str],
) -> None:
    import kubernetes_validate

    out, _ = written
    assert len(SUPPORTED_VERSIONS) >= 3
    for name in RESOURCES:
        for version in SUPPORTED_VERSIONS:
            assert kubernetes_validate.validate(load(out / name), version, strict=True) == version
    assert validate_manifests(sorted(out.iterdir())) == SUPPORTED_VERSIONS


def test_manifests_match_the_image_contract_and_the_registered_version(
    written: tuple[Path, str],
) -> None:
    out, _ = written
    facts = version_facts(NAME, alias="production")
    recorded = mlflow.MlflowClient().get_model_version(NAME, "1").tags[CHECKSUM_TAG]
    assert facts.version == "1" and facts.checksum == recorded

    deployment = load(out / "deployment.yaml")
    template = deployment["spec"]["template"]
    pod = template["spec"]
    (container,) = pod["containers"]
    assert container["image"] == IMAGE
    assert container["ports"] == [
        {"name": "http", "containerPort": contract.PORT, "protocol": "TCP"}
    ]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": contract.PROBE_PATH, "port": "http"}
    for context in (pod["securityContext"], container["securityContext"]):
        assert context["runAsNonRoot"] is True
        assert context["runAsUser"] == context["runAsGroup"] == contract.USER_ID
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["securityContext"]["fsGroup"] == contract.USER_ID
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert {"name": "TMPDIR", "value": "/tmp"} in container["env"]
    assert container["volumeMounts"] == [{"name": "tmp", "mountPath": "/tmp"}]
    assert container["resources"] == {
        "requests": {"cpu": "250m", "memory": "512Mi"},
        "limits": {"cpu": "1", "memory": "1Gi"},
    }
    assert container["envFrom"] == [
        {"configMapRef": {"name": f"{APP}-settings"}},
        {"secretRef": {"name": f"{APP}-secrets", "optional": True}},
    ]
    assert template["metadata"]["annotations"]["prometheus.io/path"] == contract.METRICS_PATH
    assert template["metadata"]["annotations"]["prometheus.io/port"] == str(contract.PORT)
    assert pod["terminationGracePeriodSeconds"] >= 30

    # what the image's labels say, every object and the pods say too
    assert facts.run_id and facts.commit
    for meta in [load(out / n)["metadata"] for n in RESOURCES] + [template["metadata"]]:
        assert meta["annotations"][contract.LABEL_CHECKSUM] == recorded
        assert meta["annotations"][contract.LABEL_COMMIT] == facts.commit
        assert meta["annotations"][contract.LABEL_SOURCE_RUN] == facts.run_id
        assert {k: meta["annotations"][k] for k in facts.labels()} == facts.labels()
        labels = meta["labels"]
        assert labels[contract.LABEL_NAME] == "K8s_Churn.Model"  # a valid label value as is
        assert labels[contract.LABEL_VERSION] == labels["app.kubernetes.io/version"] == "1"
        assert labels["app.kubernetes.io/name"] == APP
        assert all(len(v) <= 63 for v in labels.values())
    assert deployment["spec"]["selector"]["matchLabels"] == {
        "app.kubernetes.io/name": APP,
        "app.kubernetes.io/instance": APP,
    }

    service = load(out / "service.yaml")["spec"]
    assert service["type"] == "ClusterIP"
    assert service["ports"] == [
        {"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}
    ]
    assert service["selector"] == deployment["spec"]["selector"]["matchLabels"]
    hpa = load(out / "hpa.yaml")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": APP}
    assert hpa["minReplicas"] == deployment["spec"]["replicas"] == 2
    pdb = load(out / "pdb.yaml")["spec"]
    assert pdb["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]


def test_options_reach_the_manifests(
    registry: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "tuned"
    code, _, stderr = run_cli(
        [
            "k8s",
            NAME,
            "--version",
            "1",
            "--image",
            "ghcr.io/acme/churn@sha256:" + "ab" * 32,
            "--out",
            str(out),
            "--replicas",
            "3",
            "--max-replicas",
            "9",
            "--target-cpu",
            "60",
            "--cpu-request",
            "500m",
            "--cpu-limit",
            "2",
            "--memory-request",
            "1Gi",
            "--memory-limit",
            "2Gi",
            "--tracking-uri",
            "https://mlflow.example",
            "--app-name",
            "churn",
        ],
        capsys,
    )
    assert code == 0, stderr
    deployment = load(out / "deployment.yaml")
    assert deployment["metadata"]["name"] == "churn"
    assert deployment["spec"]["replicas"] == 3
    assert deployment["spec"]["template"]["spec"]["containers"][0]["resources"] == {
        "requests": {"cpu": "500m", "memory": "1Gi"},
        "limits": {"cpu": "2", "memory": "2Gi"},
    }
    hpa = load(out / "hpa.yaml")["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (3, 9)
    assert hpa["metrics"][0]["resource"]["target"]["averageUtilization"] == 60
    kustomization = load(out / KUSTOMIZATION_FILE)
    assert kustomization["images"] == [
        {"name": "ghcr.io/acme/churn", "digest": "sha256:" + "ab" * 32}
    ]
    settings = (out / SETTINGS_FILE).read_text().splitlines()
    assert "MLFLOW_TRACKING_URI=https://mlflow.example" in settings


def test_no_secret_value_reaches_any_file(
    registry: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for key, value in SECRETS.items():
        monkeypatch.setenv(key, value)
    out = tmp_path / "deploy"
    code, stdout, stderr = run_cli(k8s(out), capsys)
    assert code == 0, stderr
    everything = stdout + stderr + "".join(p.read_text() for p in out.iterdir())
    for value in SECRETS.values():
        assert value not in everything
    settings = (out / SETTINGS_FILE).read_text()
    keys = [line.split("=")[0] for line in settings.splitlines() if not line.startswith("#")]
    assert keys == list(contract.CONFIG_KEYS)
    assert "MLOPS_WORKERS=2" in settings and "MLOPS_MONITORING=false" in settings
    example = (out / SECRETS_EXAMPLE_FILE).read_text().splitlines()
    assert [line for line in example if not line.startswith("#")] == [
        f"{key}=" for key in contract.SECRET_KEYS
    ]
    assert any(
        f"kubectl create secret generic {APP}-secrets --from-env-file=" in line for line in example
    )
    for name in RESOURCES:  # no Secret object, no secret key with a value
        assert load(out / name)["kind"] != "Secret"
        for key in contract.SECRET_KEYS:
            assert f"name: {key}" not in (out / name).read_text()


def test_kustomization_lists_exactly_the_files_written(written: tuple[Path, str]) -> None:
    out, _ = written
    kustomization = load(out / KUSTOMIZATION_FILE)
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    (generator,) = kustomization["configMapGenerator"]
    assert generator["name"] == f"{APP}-settings"
    listed = set(kustomization["resources"]) | set(generator["envs"])
    # everything written but the kustomization itself and the example (never applied)
    assert listed == {p.name for p in out.iterdir()} - {KUSTOMIZATION_FILE, SECRETS_EXAMPLE_FILE}
    assert kustomization["images"] == [
        {"name": "registry.example:5000/acme/churn-model", "newTag": "v1"}
    ]


def test_kustomize_builds_what_validates(written: tuple[Path, str], tmp_path: Path) -> None:
    """`kubectl kustomize` renders the folder: the ConfigMap (hash-named) is what pods read."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        skip_or_fail("kubectl (with its built-in kustomize) is not installed")
        return
    out, _ = written
    rendered = subprocess.run(
        [kubectl, "kustomize", str(out)], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    docs = {d["kind"]: d for d in yaml.safe_load_all(rendered)}
    assert set(docs) == {
        "ConfigMap",
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
    }
    config_map = docs["ConfigMap"]
    assert set(config_map["data"]) == set(contract.CONFIG_KEYS)
    env_from = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]["envFrom"]
    assert env_from[0]["configMapRef"]["name"] == config_map["metadata"]["name"]
    assert config_map["metadata"]["name"].startswith(f"{APP}-settings-")
    assert docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]["image"] == IMAGE
    (tmp_path / "rendered.yaml").write_text(rendered)
    assert validate_manifests([tmp_path / "rendered.yaml"]) == SUPPORTED_VERSIONS


def test_a_broken_manifest_is_refused_naming_the_field(written: tuple[Path, str]) -> None:
    out, _ = written
    deployment = load(out / "deployment.yaml")
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGett"] = {}
    (out / "deployment.yaml").write_text(yaml.safe_dump(deployment, sort_keys=False))
    with pytest.raises(ManifestError) as caught:
        validate_manifests(sorted(out.iterdir()))
    message = str(caught.value)
    assert "'httpGett' was unexpected" in message
    assert "deployment.yaml" in message and f"Deployment/{APP}" in message
    assert "spec.template.spec.containers[0].livenessProbe" in message

    service = load(out / "service.yaml")
    service["spec"]["ports"][0]["port"] = "eighty"
    (out / "service.yaml").write_text(yaml.safe_dump(service, sort_keys=False))
    with pytest.raises(ManifestError, match=r"spec\.ports\[0\]\.port"):
        validate_manifests([out / "service.yaml"])


def test_existing_files_are_kept_unless_forced(
    written: tuple[Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    out, _ = written
    code, _, _ = run_cli(k8s(out), capsys)  # the same content again: nothing to refuse
    assert code == 0
    (out / "service.yaml").write_text("# edited by hand\n")
    code, _, stderr = run_cli(k8s(out), capsys)
    assert code == 1
    assert "service.yaml" in stderr and "--force" in stderr
    assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr
    assert (out / "service.yaml").read_text() == "# edited by hand\n"
    code, _, stderr = run_cli(k8s(out, "--force"), capsys)
    assert code == 0, stderr
    assert load(out / "service.yaml")["kind"] == "Service"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--app-name", "Churn_Model"], "RFC 1035"),
        (["--app-name", "1churn"], "starting with a letter"),
        (["--cpu-request", "2", "--cpu-limit", "1"], "--cpu-request 2 is above --cpu-limit 1"),
        (["--memory-limit", "lots"], "not a Kubernetes quantity"),
        (["--replicas", "6", "--max-replicas", "4"], "--max-replicas 4 is below --replicas 6"),
        (["--tracking-uri", "https://u:p@mlflow.example"], "put them in the Secret"),
    ],
)
def test_bad_options_are_one_line_errors(
    registry: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    expected: str,
) -> None:
    out = tmp_path / "deploy"
    code, _, stderr = run_cli(k8s(out, *args), capsys)
    assert code == 1
    assert expected in stderr
    assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr
    assert not out.exists()  # nothing written


def test_bad_references_are_one_line_errors(
    registry: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "deploy"
    cases = [
        (["k8s", NAME, "--alias", "canary", "--image", IMAGE, "--out", str(out)], "@canary"),
        (["k8s", NAME, "--alias", "canary", "--image", IMAGE, "--out", str(out)], "mlops status"),
        (["k8s", "no-such-model", "--image", IMAGE, "--out", str(out)], "no-such-model"),
        (["k8s", NAME, "--version", "7", "--image", IMAGE, "--out", str(out)], "version 7"),
        (["k8s", NAME, "--image", "acme/churn", "--out", str(out)], "name a tag or digest"),
        (["k8s", NAME, "--image", "Acme/Churn:1", "--out", str(out)], "lowercase"),
        (
            [
                "k8s",
                NAME,
                "--alias",
                "production",
                "--version",
                "1",
                "--image",
                IMAGE,
                "--out",
                "x",
            ],
            "leave out --alias",
        ),
    ]
    for args, expected in cases:
        code, _, stderr = run_cli(args, capsys)
        assert code != 0, args
        assert expected in stderr, (args, stderr)
        assert "Traceback" not in stderr
    assert not out.exists()
    code, _, stderr = run_cli(["k8s", NAME, "--image", IMAGE], capsys)
    assert code == 2 and "--out" in stderr


def test_app_names_are_derived_or_refused() -> None:
    assert app_name_for("Churn Model v2") == "churn-model-v2"
    assert app_name_for("x" * 80) == "x" * 63
    assert app_name_for("anything", "given-name") == "given-name"
    for hopeless in ("___", "2024-churn", "模型"):
        with pytest.raises(ManifestError, match="--app-name"):
            app_name_for(hopeless)


def test_unknown_kubernetes_versions_are_refused(written: tuple[Path, str]) -> None:
    out, _ = written
    with pytest.raises(ManifestError, match=r"Kubernetes 1\.20: .* has no schemas"):
        validate_manifests(sorted(out.iterdir()), versions=["1.20"])
    assert validate_manifests([out / "service.yaml"], versions=["v1.36.2"]) == ("1.36",)
    (out / "extra.yaml").write_text("metadata: {name: orphan}\n")
    with pytest.raises(ManifestError, match="extra.yaml: None/orphan names no apiVersion or kind"):
        validate_manifests([out / "extra.yaml"])


def test_without_the_validator_the_manifests_are_written_with_a_one_line_warning(
    registry: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "kubernetes_validate", None)  # import fails
    out = tmp_path / "deploy"
    code, stdout, stderr = run_cli(k8s(out), capsys)
    assert code == 0, stderr
    assert (out / "deployment.yaml").exists() and "valid (strict)" not in stdout
    (line,) = stderr.strip().splitlines()
    assert "kubernetes-validate is not installed" in line and "pip install" in line
