"""Delivery (issue 15): the model workflow's own steps, run here on local stores; the image they
build, run as a container and asked every input format; the manifests checked against it.

The steps are read from .github/workflows/model.yml and run as written (each a `make model-*`
target), so the workflow cannot drift from what this test runs. The image is built by Docker
(scripts/delivery.sh starts the daemon and builds the base image from Debian's mirror); its
layers stay cached between runs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml

from mlops.artifacts import CHECKSUM_TAG
from mlops.delivery import contract
from mlops.delivery.image import DEFAULT_BASE_IMAGE, docker, image_exists, inspect_labels
from tests.conftest import REPO, free_port, skip_or_fail
from tests.servers import get, post

WORKFLOW = REPO / ".github" / "workflows" / "model.yml"
NAME = "delivery-model"
IMAGE = "mlops-test/delivery-model:pytest"
# set up by the suite itself (make test depends on the install): not run again here
SETUP_STEPS = {"make install"}


def docker_ready() -> None:
    try:
        ok = docker("info", check=False).returncode == 0
    except Exception as exc:  # noqa: BLE001 - no client at all
        skip_or_fail(f"no Docker here ({exc}); scripts/delivery.sh installs and starts it")
        return
    if not ok:
        skip_or_fail("the Docker daemon is not running; scripts/delivery.sh starts it")
    if not image_exists(DEFAULT_BASE_IMAGE):
        skip_or_fail(f"base image {DEFAULT_BASE_IMAGE} missing; `make base-image` builds it")


def test_workflows_pass_actionlint() -> None:
    tool = Path(sys.executable).parent / "actionlint"
    if not tool.exists():
        tool = Path(shutil.which("actionlint") or "actionlint")
    files = sorted((REPO / ".github" / "workflows").glob("*.yml"))
    assert WORKFLOW in files
    result = subprocess.run(
        [str(tool), *map(str, files)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def workflow_steps() -> list[tuple[str, str, str]]:
    """(job, step name, command) of every `run:` step, jobs in the order `needs` gives."""
    flow = yaml.safe_load(WORKFLOW.read_text())
    jobs: dict[str, Any] = flow["jobs"]
    order: list[str] = []
    while len(order) < len(jobs):
        ready = [
            j for j, spec in jobs.items() if j not in order and set(_needs(spec)) <= set(order)
        ]
        assert ready, "the workflow's jobs need each other in a cycle"
        order += sorted(ready)
    steps = []
    for job in order:
        for step in jobs[job]["steps"]:
            if "run" not in step:
                continue
            condition = str(step.get("if", ""))
            if "vars." in condition:  # a team's own setting (cluster, registry): unset here
                continue
            steps.append((job, step.get("name", step["run"]), step["run"].strip()))
    return steps


def _needs(spec: dict[str, Any]) -> list[str]:
    needs = spec.get("needs", [])
    return [needs] if isinstance(needs, str) else list(needs)


def test_the_workflow_runs_mlops_and_make_commands_only() -> None:
    steps = workflow_steps()
    commands = [cmd for _, _, cmd in steps]
    assert [c.split()[1] for c in commands if c not in SETUP_STEPS] == [
        "model-train",
        "model-staging",
        "base-image",
        "model-package",
        "model-production",
        "model-rollout",
    ]
    flow = yaml.safe_load(WORKFLOW.read_text())
    assert flow["jobs"]["production"]["environment"] == "production"  # the manual approval
    assert flow["jobs"]["production"]["needs"] == "staging"
    assert set(flow[True]["push"]["paths"]) == {"conf/**", "data/**"}  # `on:` reads as True


def run_step(command: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-e", "-c", command],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )


def pipeline_env(work: Path, uri: str) -> dict[str, str]:
    venv = Path(sys.executable).parent.parent
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(
        # the workflow's env, with this machine's values
        MLFLOW_TRACKING_URI=uri,
        MODEL_NAME=NAME,
        IMAGE=IMAGE,
        REASON="pytest: the model workflow's steps",
        CICD_DIR=str(work / ".cicd"),
        PUSH="false",
        APPLY="false",
        GITHUB_STEP_SUMMARY=str(work / "summary.md"),
        RUNNER_TEMP=str(work),
        # this test's Python environment (the main one, or the lowest-MLflow one)
        VENV=str(venv),
        MLOPS=str(Path(sys.executable).parent / "mlops"),
        MLFLOW_DISABLE_TELEMETRY="true",
        MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false",
    )
    return env


def checkout(work: Path) -> Path:
    """What the workflow's `actions/checkout` gives it, as far as its steps read it."""
    root = work / "checkout"
    root.mkdir()
    for part in ("Makefile", "conf", "scripts", ".github"):
        source = REPO / part
        if source.is_dir():
            shutil.copytree(source, root / part)
        else:
            shutil.copy2(source, root / part)
    return root


@pytest.fixture(scope="module")
def delivered(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The workflow's steps, run in order on a fresh SQLite store: trained, promoted to staging,
    packaged, promoted to production, manifests written."""
    docker_ready()
    work = tmp_path_factory.mktemp("delivery")
    uri = f"sqlite:///{work / 'mlflow.db'}"
    root = checkout(work)
    env = pipeline_env(work, uri)
    ran = []
    for job, name, command in workflow_steps():
        if command in SETUP_STEPS:
            continue
        started = time.monotonic()
        result = run_step(command, env, root)
        assert result.returncode == 0, (
            f"{job} / {name}: `{command}` failed ({result.returncode}):\n"
            f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
        ran.append((name, round(time.monotonic() - started, 1)))
    yield {"work": work, "uri": uri, "root": root, "env": env, "ran": ran}


def use_store(uri: str) -> mlflow.MlflowClient:
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return mlflow.MlflowClient()


@pytest.mark.slow
@pytest.mark.image
def test_workflow_steps_promote_package_and_write_manifests(delivered: dict[str, Any]) -> None:
    client = use_store(delivered["uri"])
    trained = json.loads((delivered["work"] / ".cicd" / "train.json").read_text())
    version = trained["registered_version"]
    # production took the version from staging (and used up the staging alias)
    assert str(client.get_model_version_by_alias(NAME, "production").version) == version
    assert "staging" not in client.get_registered_model(NAME).aliases
    summary = (delivered["work"] / "summary.md").read_text()
    assert f"{NAME} version {version} -> staging: promoted" in summary
    assert f"{NAME} version {version} -> production: promoted" in summary
    assert "| artifact checksum | pass |" in summary
    recorded = client.get_model_version(NAME, version).tags[CHECKSUM_TAG]
    labels = inspect_labels(IMAGE)
    assert labels[contract.LABEL_NAME] == NAME
    assert labels[contract.LABEL_VERSION] == version
    assert labels[contract.LABEL_CHECKSUM] == recorded
    assert labels[contract.LABEL_SOURCE_RUN] == trained["run_id"]
    assert len(labels[contract.LABEL_COMMIT]) == 40
    config = json.loads(docker("image", "inspect", "--format", "{{json .Config}}", IMAGE).stdout)
    assert config["User"] == f"{contract.USER_ID}:{contract.USER_ID}"
    assert list(config["ExposedPorts"]) == [f"{contract.PORT}/tcp"]
    assert not any(k.startswith(("MLOPS_AUTH_TOKEN", "MLOPS_LOG_URL")) for k in config["Env"])

    # the manifests name this image and keep its contract
    k8s = delivered["work"] / ".cicd" / "k8s"
    deployment = yaml.safe_load((k8s / "deployment.yaml").read_text())
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    assert container["image"] == IMAGE
    assert container["ports"][0]["containerPort"] == contract.PORT
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == contract.PROBE_PATH
    assert pod["spec"]["securityContext"]["runAsUser"] == contract.USER_ID
    for key, value in labels.items():
        assert pod["metadata"]["annotations"][key] == value, key
    from mlops.delivery.k8s import validate_manifests

    assert validate_manifests(sorted(k8s.glob("*.yaml")))


@pytest.fixture
def container(delivered: dict[str, Any]) -> Iterator[tuple[str, str]]:
    token = "pytest-" + os.urandom(8).hex()
    port = free_port()
    name = f"mlops-pytest-{os.getpid()}-{port}"
    result = subprocess.run(
        [
            "/usr/bin/docker" if Path("/usr/bin/docker").exists() else "docker",
            "run",
            "--detach",
            "--rm",
            "--name",
            name,
            "--publish",
            f"127.0.0.1:{port}:{contract.PORT}",
            "--env",
            "MLOPS_AUTH_TOKEN",
            "--env",
            "MLFLOW_TRACKING_URI=",
            "--read-only",
            "--tmpfs",
            "/tmp",
            IMAGE,
        ],
        env={**os.environ, "MLOPS_AUTH_TOKEN": token},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if get(base, contract.PROBE_PATH)[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            running = docker("inspect", "--format", "{{.State.Running}}", name, check=False)
            if running.stdout.strip() != "true" or time.monotonic() > deadline:
                logs = docker("logs", name, check=False)
                pytest.fail(f"the container never answered /ping:\n{logs.stdout}{logs.stderr}")
            time.sleep(0.5)
        yield base, token
    finally:
        logs = docker("logs", name, check=False)
        docker("rm", "--force", name, check=False)
        assert token not in logs.stdout + logs.stderr  # the secret is never logged


@pytest.mark.slow
@pytest.mark.image
def test_the_container_answers_every_format_as_the_pyfunc_does(
    delivered: dict[str, Any], container: tuple[str, str]
) -> None:
    base, token = container
    assert get(base, "/health")[0] == 200
    status, body = post(base, {"dataframe_records": [{}]})
    assert status == 401 and "Bearer" in body["message"]
    use_store(delivered["uri"])
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@production")
    from sklearn.datasets import load_breast_cancer

    frame = load_breast_cancer(as_frame=True).frame.drop(columns=["target"]).head(7)
    frame = frame[[c for c in model.metadata.get_input_schema().input_names()]]
    want = model.predict(frame)
    records = json.loads(frame.to_json(orient="records"))
    formats = {
        "dataframe_split": (
            {"dataframe_split": json.loads(frame.to_json(orient="split"))},
            "application/json",
        ),
        "dataframe_records": ({"dataframe_records": records}, "application/json"),
        "instances": ({"instances": records}, "application/json"),
        "inputs": (
            {"inputs": {c: frame[c].tolist() for c in frame.columns}},
            "application/json; charset=utf-8",
        ),
        "csv": (frame.to_csv(index=False), "text/csv"),
    }
    version = str(want["model_version"].iloc[0])
    for fmt, (body, content_type) in formats.items():
        status, answer = post(base, body, content_type, token=token)
        assert status == 200, (fmt, answer)
        got = pd.DataFrame(answer["predictions"])
        assert list(got.columns) == list(want.columns), fmt
        assert got["prediction"].astype(str).tolist() == want["prediction"].astype(str).tolist()
        probas = [c for c in want.columns if c.startswith("proba_")]
        assert probas and np.allclose(got[probas].to_numpy(float), want[probas].to_numpy(float))
        assert set(got["model_version"].astype(str)) == {version}, fmt
    status, answer = post(base, {"dataframe_records": [{"nope": 1}]}, token=token)
    assert status == 400 and "missing required column" in answer["message"]


@pytest.mark.slow
@pytest.mark.image
def test_a_refused_gate_stops_the_step_with_the_report_as_summary(
    delivered: dict[str, Any], tmp_path: Path
) -> None:
    """The staging step on a version the gates refuse: a non-zero exit, the verdicts in the job
    summary, and no alias moved."""
    env = dict(delivered["env"])
    env["GITHUB_STEP_SUMMARY"] = str(tmp_path / "summary.md")
    strict = tmp_path / "conf"
    shutil.copytree(delivered["root"] / "conf", strict)
    conf = yaml.safe_load((strict / "default.yaml").read_text())
    conf["registry"]["staging"]["classification"] = [
        {"metric": "validation_accuracy", "threshold": 1.01, "higher_is_better": True}
    ]
    (strict / "default.yaml").write_text(yaml.safe_dump(conf))
    env["MLOPS_CONF_DIR"] = str(strict)
    env["CICD_DIR"] = str(tmp_path / ".cicd")
    steps = {cmd.split()[1]: cmd for _, _, cmd in workflow_steps() if cmd.startswith("make ")}
    trained = run_step(steps["model-train"], env, delivered["root"])  # a new version
    assert trained.returncode == 0, trained.stdout[-2000:] + trained.stderr[-2000:]
    client = use_store(delivered["uri"])
    before = dict(client.get_registered_model(NAME).aliases)
    result = run_step(steps["model-staging"], env, delivered["root"])
    assert result.returncode != 0
    assert "validation_accuracy" in result.stderr, result.stdout + result.stderr
    summary = (tmp_path / "summary.md").read_text()
    assert "-> staging: refused" in summary and "**FAIL**" in summary
    assert dict(client.get_registered_model(NAME).aliases) == before


@pytest.fixture
def bundled(tmp_path: Path, tracking_uri: str) -> dict[str, Any]:
    """A registered version's files in a folder, as a serving image holds them."""
    from mlops.artifacts import download_model
    from mlops.config import load_config
    from mlops.training import train
    from tests.helpers import make_csv

    csv = make_csv(tmp_path / "d.csv")
    config = load_config(
        overrides=[
            f"data.dataset={csv}",
            "data.target=label",
            "data.categorical=[color]",
            "registry.model_name=bundled",
        ]
    )
    assert train(config, register=True).registered_version == "1"
    folder = download_model("bundled", "1", tmp_path / "model")
    checksum = mlflow.MlflowClient().get_model_version("bundled", "1").tags[CHECKSUM_TAG]
    return {"dir": folder, "checksum": checksum}


def serve_bundle(folder: Path, checksum: str, port: int) -> list[str]:
    mlops = str(Path(sys.executable).parent / "mlops")
    return [mlops, "serve", "bundled", "--version", "1", "--model-dir", str(folder)] + [
        "--checksum",
        checksum,
        "--port",
        str(port),
    ]


def no_registry_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    # a registry that does not exist: the bundle must not need one
    env["MLFLOW_TRACKING_URI"] = "http://127.0.0.1:9"
    return env


@pytest.mark.slow
def test_serve_model_dir_needs_no_registry_and_refuses_other_files(
    bundled: dict[str, Any], tmp_path: Path
) -> None:
    from tests.servers import running

    port = free_port()
    env = no_registry_env(tmp_path)
    command = serve_bundle(bundled["dir"], bundled["checksum"], port)
    with running(command, env, port, tmp_path / "serve.log", timeout=120) as base:
        frame = pd.read_csv(tmp_path / "d.csv").drop(columns=["label"]).head(3)
        status, answer = post(
            base, {"dataframe_records": json.loads(frame.to_json(orient="records"))}
        )
        assert status == 200, answer
        assert {row["model_version"] for row in answer["predictions"]} == {"1"}
    # the wrong checksum, then one changed file: refused before anything is read
    wrong = subprocess.run(
        serve_bundle(bundled["dir"], "0" * 64, free_port()),
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert wrong.returncode != 0 and "checksum" in wrong.stderr, wrong.stderr
    marker = tmp_path / "ran"
    (bundled["dir"] / "artifacts" / "metadata.json").write_text(json.dumps({"x": str(marker)}))
    tampered = subprocess.run(
        serve_bundle(bundled["dir"], bundled["checksum"], free_port()),
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert tampered.returncode != 0 and "checksum" in tampered.stderr, tampered.stderr
    assert "Traceback" not in tampered.stderr


def test_serve_model_dir_options_are_checked(bundled: dict[str, Any]) -> None:
    from click.testing import CliRunner

    from mlops.cli import cli

    runner = CliRunner()
    out = runner.invoke(cli, ["serve", "bundled", "--model-dir", str(bundled["dir"])])
    assert out.exit_code == 2 and "--version" in out.output and "--checksum" in out.output
    out = runner.invoke(cli, ["serve", "bundled", "--version", "1", "--checksum", "ab"])
    assert out.exit_code == 2 and "--model-dir" in out.output


def test_build_context_is_mlflows_dockerfile_with_the_server_and_verified_files(
    bundled: dict[str, Any], tmp_path: Path
) -> None:
    """What `mlops package` hands to Docker (no Docker needed): MLflow's Dockerfile for the local
    environment manager, then the server's layer; the model's files as registered."""
    from mlops.artifacts import model_checksum
    from mlops.delivery.contract import version_facts
    from mlops.delivery.image import write_context

    facts = version_facts("bundled", version="1")
    context = tmp_path / "context"
    context.mkdir()
    dockerfile = write_context(facts, context, base_image="example/base:1").read_text()
    assert dockerfile.startswith("# Build an image that can serve mlflow models.")
    assert "FROM example/base:1" in dockerfile
    assert f"RUN pip install mlflow=={mlflow.__version__}" in dockerfile
    lines = dockerfile.splitlines()
    # the server's packages and user before MLflow's install, the package before the model
    assert lines.index(
        next(x for x in lines if x.startswith("RUN pip install --no-cache-dir"))
    ) < lines.index(f"RUN pip install mlflow=={mlflow.__version__}")
    assert dockerfile.index("COPY mlops-lib") < dockerfile.index("COPY model_dir")
    assert f"USER {contract.USER_ID}:{contract.USER_ID}" in lines
    assert f"EXPOSE {contract.PORT}" in lines
    assert lines[-2] == 'ENTRYPOINT ["python", "-m", "mlops.delivery.entrypoint"]'
    assert f"MLOPS_MODEL_CHECKSUM={bundled['checksum']}" in dockerfile
    copied = [p.parent for p in context.rglob("MLmodel")]
    assert len(copied) == 1 and model_checksum(copied[0]) == bundled["checksum"]
    assert (context / "mlops-lib" / "mlops" / "conf" / "default.yaml").is_file()
    assert (context / "mlops-lib" / "mlops" / "delivery" / "entrypoint.py").is_file()


def test_build_context_refuses_a_tampered_version(bundled: dict[str, Any], tmp_path: Path) -> None:
    """A registered version whose stored files changed is not packaged, and nothing of it is
    handed to Docker."""
    from urllib.parse import unquote, urlparse

    from mlops.artifacts import UntrustedArtifact
    from mlops.delivery.contract import version_facts
    from mlops.delivery.image import write_context

    location = mlflow.MlflowClient().get_model_version_download_uri("bundled", "1")
    stored = Path(unquote(urlparse(location).path))
    (stored / "artifacts" / "metadata.json").write_text("{}")
    context = tmp_path / "context"
    context.mkdir()
    with pytest.raises(UntrustedArtifact, match="checksum"):
        write_context(version_facts("bundled", version="1"), context, base_image="b")
    assert not (context / "Dockerfile").exists()


def test_entrypoint_arguments_come_from_the_environment() -> None:
    from mlops.delivery.entrypoint import arguments

    base = {
        "MLOPS_MODEL_NAME": "m",
        "MLOPS_MODEL_VERSION": "3",
        "MLOPS_MODEL_CHECKSUM": "ab" * 32,
    }
    pinned = arguments(base, [])
    assert pinned[:3] == ["serve", "m", "--version"] and "--model-dir" in pinned
    assert pinned[pinned.index("--port") + 1] == str(contract.PORT)
    assert "--auth-token-env" not in pinned
    secret = arguments({**base, "MLOPS_AUTH_TOKEN": "t0ken", "MLOPS_MONITORING": "true"}, [])
    assert secret[secret.index("--auth-token-env") + 1] == "MLOPS_AUTH_TOKEN"
    assert "t0ken" not in secret and "--monitor" in secret  # the token by name, never in argv
    follow = arguments({**base, "MLOPS_FOLLOW_ALIAS": "production", "MLFLOW_TRACKING_URI": "x"}, [])
    assert follow[:4] == ["serve", "m", "--alias", "production"] and "--model-dir" not in follow
    with pytest.raises(SystemExit, match="MLFLOW_TRACKING_URI"):
        arguments({**base, "MLOPS_FOLLOW_ALIAS": "production"}, [])
