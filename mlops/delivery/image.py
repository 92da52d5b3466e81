"""``mlops package``: a serving image of one registered version, through MLflow's own Docker
support.

MLflow writes the Dockerfile (``PyFuncBackend.generate_dockerfile`` with the local environment
manager: the base image's Python, MLflow and the model's pinned requirements, the model's files
in :data:`~mlops.delivery.contract.MODEL_DIR`). The version's files are downloaded and verified
against the checksum recorded at registration before MLflow sees them, and the copy MLflow puts
into the build context is verified again. To that Dockerfile this module adds what the
production server needs: its few extra packages (pinned to this environment's versions; a
PostgreSQL driver for the prediction log), the mlops package itself and its configuration, a
non-root user, one exposed port, the version's labels, and ``mlops serve`` as the entry point
(:mod:`mlops.delivery.entrypoint`), which reads its settings from the environment.

No image registry is needed: ``--base-image`` names any base with Python and pip on its PATH,
and ``scripts/base-image.sh`` (``make base-image``) builds the default one from Debian's
package mirror.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from mlops.artifacts import download_model, model_checksum, verify_model_dir
from mlops.delivery import contract
from mlops.delivery.contract import VersionFacts
from mlops.errors import MlopsError
from mlops.serving.flavor import pinned

logger = logging.getLogger(__name__)

DEFAULT_BASE_IMAGE = "mlops/python:3.11-bookworm"  # scripts/base-image.sh builds it
# beyond MLflow and the model's own requirements: what `mlops serve` imports
# (and skops, which every model pins too: installed once here, not again per model)
SERVER_PACKAGES = (
    "prometheus-client",
    "psycopg",
    "psycopg-binary",
    "boto3",
    "skops",
    "orjson",
)
_LIB = "/opt/mlops/lib"


class PackageError(MlopsError):
    """The image could not be built (no Docker, a failed build, files that fail their check)."""


@dataclasses.dataclass(frozen=True)
class PackagedImage:
    image: str
    image_id: str
    facts: VersionFacts
    seconds: float


def docker_binary() -> str:
    """Debian's Docker client first (``/usr/bin/docker``: the classic builder, no buildx
    needed), else the first ``docker`` on PATH."""
    for candidate in ("/usr/bin/docker", shutil.which("docker")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise PackageError(
        "no docker client found: install Docker (Debian: apt-get install docker.io) and start "
        "its daemon (scripts/docker.sh does both)"
    )


def docker(
    *args: str, check: bool = True, capture: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run the Docker client; a failure is a :class:`PackageError` naming the command."""
    env = {**os.environ, "DOCKER_BUILDKIT": "0"}  # the classic builder: no buildx plugin needed
    result = subprocess.run(
        [docker_binary(), *args], env=env, text=True, capture_output=capture, check=False
    )
    if check and result.returncode != 0:
        said = (result.stderr or result.stdout or "").strip().splitlines()
        raise PackageError(
            f"docker {args[0]} failed (exit {result.returncode}): "
            + (said[-1] if said else "no message")
        )
    return result


def image_exists(image: str) -> bool:
    return docker("image", "inspect", image, check=False).returncode == 0


def _copy_mlops(dst: Path) -> None:
    """The running mlops package (and its YAML configuration, as mlops.conf) into ``dst``."""
    import mlops
    from mlops.config import conf_dir

    package = Path(mlops.__file__).resolve().parent
    shutil.copytree(package, dst / "mlops", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    conf = dst / "mlops" / "conf"
    if not (conf / "default.yaml").is_file():
        shutil.copytree(conf_dir(), conf, dirs_exist_ok=True)
        (conf / "__init__.py").touch()


def server_layer(facts: VersionFacts) -> str:
    """The Dockerfile lines mlops adds after MLflow's: run ``mlops serve`` as a non-root user."""
    labels = " \\\n      ".join(
        f"{key}={json.dumps(value)}" for key, value in sorted(facts.labels().items())
    )
    return f"""
# ---- mlops: the production server (mlops serve) as a non-root user ----
ENV PYTHONPATH={_LIB} \\
    PYTHONDONTWRITEBYTECODE=1 \\
    MLOPS_CONF_DIR={_LIB}/mlops/conf \\
    MLOPS_MODEL_NAME={json.dumps(facts.name)} \\
    MLOPS_MODEL_VERSION={json.dumps(facts.version)} \\
    MLOPS_MODEL_CHECKSUM={facts.checksum} \\
    MLOPS_MODEL_DIR={contract.MODEL_DIR} \\
    MLOPS_PORT={contract.PORT} \\
    MLFLOW_DISABLE_TELEMETRY=true
LABEL {labels}
EXPOSE {contract.PORT}
USER {contract.USER_ID}:{contract.USER_ID}
WORKDIR /tmp
ENTRYPOINT ["python", "-m", "mlops.delivery.entrypoint"]
CMD []
"""


def prelude() -> str:
    """The lines mlops puts right after MLflow's ``WORKDIR``, before anything of the model: MLflow
    itself, the server's packages (pinned to this environment's versions) and its user. They
    stay cached while only the model changes; :func:`warm_cache` builds them ahead of time."""
    packages = " ".join(f"'{pin}'" for pin in pinned(("mlflow", *SERVER_PACKAGES)))
    return (
        "# mlops: MLflow and what its server needs beyond the model's requirements, its user\n"
        f"RUN pip install --no-cache-dir {packages}\n"
        f"RUN groupadd --system --gid {contract.USER_ID} {contract.USER_NAME} \\\n"
        f" && useradd --system --uid {contract.USER_ID} --gid {contract.USER_ID} "
        f"--no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin "
        f"{contract.USER_NAME}\n"
    )


def warm_cache(base_image: str = DEFAULT_BASE_IMAGE) -> None:
    """Build the layers every image of this environment starts with (:func:`prelude` on
    ``base_image``), so that a later ``mlops package`` finds them in Docker's cache."""
    with tempfile.TemporaryDirectory(prefix="mlops-warm-") as tmp:
        (Path(tmp) / "Dockerfile").write_text(
            f"FROM {base_image}\nWORKDIR /opt/mlflow\n" + prelude()
        )
        docker("build", "--quiet", "--tag", "mlops/warm-cache:latest", tmp)


def write_context(facts: VersionFacts, folder: Path, *, base_image: str) -> Path:
    """Write the build context of ``facts``'s image into ``folder``; returns its Dockerfile."""
    from mlflow.pyfunc.backend import PyFuncBackend

    what = f"{facts.name} version {facts.version}"
    verified = download_model(facts.name, facts.version, folder / "verified")
    verify_model_dir(verified, facts.checksum, what)  # before MLflow reads any of it
    PyFuncBackend(config={}, env_manager="local").generate_dockerfile(
        model_uri=str(verified), output_dir=str(folder), base_image=base_image
    )
    shutil.rmtree(verified)
    copied = [p.parent for p in folder.rglob("MLmodel")]
    if len(copied) != 1:
        raise PackageError(f"MLflow's build context holds {len(copied)} models, expected one")
    if model_checksum(copied[0]) != facts.checksum:  # what the image will hold, checked again
        raise PackageError(f"{what}: the files copied into the image differ from the verified ones")
    _copy_mlops(folder / "mlops-lib")
    dockerfile = folder / "Dockerfile"
    text = dockerfile.read_text()
    anchor = "WORKDIR /opt/mlflow\n"
    extra = prelude()
    text = text.replace(anchor, anchor + "\n" + extra, 1) if anchor in text else text + extra
    code = f"# mlops: the package itself (its server), its configuration\nCOPY mlops-lib {_LIB}\n"
    model = "# Copy model to image"  # after MLflow's install, before the model: cached longer
    text = text.replace(model, code + "\n" + model, 1) if model in text else text + code
    dockerfile.write_text(text + server_layer(facts))
    return dockerfile


def package(
    facts: VersionFacts,
    image: str,
    *,
    base_image: str = DEFAULT_BASE_IMAGE,
    context_out: Path | None = None,
    quiet: bool = False,
) -> PackagedImage:
    """Build ``image`` serving ``facts``'s version; ``context_out`` keeps the build context."""
    if not image_exists(base_image):
        hint = (
            "build it with `make base-image` (scripts/base-image.sh: Debian's mirror, no image "
            "registry needed)"
            if base_image == DEFAULT_BASE_IMAGE
            else "pull or build it first"
        )
        raise PackageError(f"base image {base_image} is not on this Docker host: {hint}")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mlops-image-") as tmp:
        folder = Path(tmp)
        write_context(facts, folder, base_image=base_image)
        if context_out is not None:
            shutil.copytree(folder, context_out, dirs_exist_ok=True)
        args = ["build", "--tag", image, str(folder)]
        if quiet:
            docker(*args)
        else:
            logger.info("docker build --tag %s (MLflow's Dockerfile, with mlops serve)", image)
            docker(*args, capture=False)
    image_id = docker("image", "inspect", "--format", "{{.Id}}", image).stdout.strip()
    built = inspect_labels(image)
    missing = {k: v for k, v in facts.labels().items() if built.get(k) != v}
    if missing:
        raise PackageError(f"{image} was built without its labels {sorted(missing)}")
    return PackagedImage(image, image_id, facts, time.monotonic() - started)


def inspect_labels(image: str) -> dict[str, str]:
    out = docker("image", "inspect", "--format", "{{json .Config.Labels}}", image).stdout
    return json.loads(out or "null") or {}


if __name__ == "__main__":  # python -m mlops.delivery.image --warm-cache [BASE]
    import sys

    if sys.argv[1:2] != ["--warm-cache"]:
        raise SystemExit("usage: python -m mlops.delivery.image --warm-cache [BASE_IMAGE]")
    warm_cache(*sys.argv[2:3])
