"""What a serving image built by ``mlops package`` promises, and what ``mlops k8s`` relies on.

One module holds it so the image and the manifests cannot drift: the port the server listens
on, the probe path, the non-root user, the labels naming the version inside, and the
environment variables the container reads its settings from (plain settings from a ConfigMap,
secrets from a Secret; neither is ever baked into the image or written into a manifest).
"""

from __future__ import annotations

import dataclasses

PORT = 8080  # MLflow's own serving images listen here too
PROBE_PATH = "/ping"  # readiness and liveness: 200 once the model answers its input example
METRICS_PATH = "/metrics"  # Prometheus text format
USER_ID = 10001  # the image's non-root user (and group); no shell login, no home to write
USER_NAME = "mlops"
MODEL_DIR = "/opt/ml/model"  # the version's files, verified against its checksum at start

# image labels (and Kubernetes labels/annotations of the pods that run the image)
LABEL_NAME = "io.mlops.model.name"
LABEL_VERSION = "io.mlops.model.version"
LABEL_CHECKSUM = "io.mlops.model.checksum"
LABEL_COMMIT = "org.opencontainers.image.revision"  # the git commit the image was built from
LABEL_SOURCE_RUN = "io.mlops.model.run-id"

# settings the container reads from its environment: (variable, secret?, what it is)
SETTINGS: tuple[tuple[str, bool, str], ...] = (
    ("MLFLOW_TRACKING_URI", False, "tracking server the served model reports to and follows"),
    (
        "MLOPS_FOLLOW_ALIAS",
        False,
        "follow this alias through the registry instead of serving "
        "only the version inside the image (empty: the image's version, pinned)",
    ),
    ("MLOPS_WORKERS", False, "server worker processes"),
    ("MLOPS_MONITORING", False, "true/false: log predictions for `mlops monitor`"),
    ("MLFLOW_TRACKING_USERNAME", True, "the served model's read-only registry user"),
    ("MLFLOW_TRACKING_PASSWORD", True, "its password"),
    ("MLOPS_LOG_URL", True, "SQLAlchemy URL of the prediction log (holds a password)"),
    ("MLOPS_AUTH_TOKEN", True, "bearer token callers must send (401 without it)"),
)
CONFIG_KEYS = tuple(name for name, secret, _ in SETTINGS if not secret)
SECRET_KEYS = tuple(name for name, secret, _ in SETTINGS if secret)


def labels(
    name: str, version: str, checksum: str, commit: str | None, run_id: str | None
) -> dict[str, str]:
    """The labels an image of registered ``name`` version ``version`` carries."""
    out = {LABEL_NAME: name, LABEL_VERSION: str(version), LABEL_CHECKSUM: checksum}
    if commit:
        out[LABEL_COMMIT] = commit
    if run_id:
        out[LABEL_SOURCE_RUN] = run_id
    return out


@dataclasses.dataclass(frozen=True)
class VersionFacts:
    """The registered version an image holds, as its labels and the manifests name it."""

    name: str
    version: str
    checksum: str
    run_id: str | None
    commit: str | None

    def labels(self) -> dict[str, str]:
        return labels(self.name, self.version, self.checksum, self.commit, self.run_id)


def version_facts(
    name: str, *, alias: str | None = None, version: str | None = None
) -> VersionFacts:
    """Resolve ``alias`` (or take ``version``) of registered ``name`` in the current registry:
    its recorded checksum (required: versions registered outside mlops cannot be packaged) and
    the git commit of the run that trained it (else of this checkout)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from mlops.artifacts import CHECKSUM_TAG
    from mlops.errors import RegistryError
    from mlops.tracking import git_commit

    if (alias is None) == (version is None):
        raise RegistryError("name one of an alias or a version")
    client = mlflow.MlflowClient()
    try:
        mv = (
            client.get_model_version_by_alias(name, alias)
            if alias is not None
            else client.get_model_version(name, str(version))
        )
    except MlflowException as exc:
        what = f"@{alias}" if alias is not None else f"version {version}"
        raise RegistryError(f"{name} {what}: {exc.message}") from None
    checksum = (mv.tags or {}).get(CHECKSUM_TAG)
    if not checksum:
        raise RegistryError(
            f"{name} version {mv.version} has no recorded checksum (registered outside mlops): "
            "register it with mlops (train --register) so its files can be verified"
        )
    commit = None
    if mv.run_id:
        try:
            commit = client.get_run(mv.run_id).data.tags.get("mlflow.source.git.commit")
        except MlflowException:
            commit = None
    return VersionFacts(name, str(mv.version), checksum, mv.run_id or None, commit or git_commit())
