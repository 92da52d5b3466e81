"""Kubernetes manifests for the image ``mlops package`` built: ``mlops k8s``.

One kustomize-ready folder per deployment: a Deployment, a Service, a HorizontalPodAutoscaler
and a PodDisruptionBudget, the non-secret settings as a ``settings.env`` that kustomize turns
into a ConfigMap, and a ``secrets.env.example`` naming the keys of the Secret a team creates
itself. Port, probe path, user and labels come from :mod:`mlops.delivery.contract`, so the
manifests and the image cannot disagree; secret values never appear in a manifest.

Example:
    >>> facts = version_facts("churn-model", alias="production")  # doctest: +SKIP
    >>> paths = write_manifests(facts, "registry.example/churn:1", Path("deploy"))  # doctest: +SKIP
    >>> validate_manifests(paths)  # doctest: +SKIP
    ('1.35', '1.36', '1.37')
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Iterable, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import yaml

from mlops.delivery import contract
from mlops.delivery.contract import VersionFacts
from mlops.errors import MlopsError

logger = logging.getLogger(__name__)

# Kubernetes minor versions supported upstream in December 2026 that kubernetes-validate ships
# schemas for: upstream supports the three newest minors (about 14 months each). 1.35
# (Dec 2025) is supported until about Feb 2027, 1.36 (Apr 2026) and 1.37 (Aug 2026) are
# current; 1.34 left support around Oct 2026. Add 1.38 once kubernetes-validate ships it.
SUPPORTED_VERSIONS: tuple[str, ...] = ("1.35", "1.36", "1.37")

INSTALL_VALIDATOR = "pip install 'kubernetes-validate>=1.30,<2' (or pip install -e '.[test]')"

DEPLOYMENT_FILE = "deployment.yaml"
SERVICE_FILE = "service.yaml"
HPA_FILE = "hpa.yaml"
PDB_FILE = "pdb.yaml"
SETTINGS_FILE = "settings.env"
SECRETS_EXAMPLE_FILE = "secrets.env.example"
KUSTOMIZATION_FILE = "kustomization.yaml"

TMP_DIR = "/tmp"  # the server writes temporary files; the root filesystem is read-only
GRACE_SECONDS = 45  # SIGTERM: finish answers in flight, then flush the prediction log
DRAIN_SECONDS = 5  # preStop: let endpoints drop the pod before the server hears SIGTERM

_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_QUANTITY = re.compile(r"^(\d+(?:\.\d+)?|\.\d+)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
_SUFFIX: dict[str, Decimal] = {
    "": Decimal(1),
    "m": Decimal("0.001"),
    **{s: Decimal(1000) ** (i + 1) for i, s in enumerate("kMGTPE")},
    **{f"{s}i": Decimal(1024) ** (i + 1) for i, s in enumerate("KMGTPE")},
}


class ManifestError(MlopsError, ValueError):
    """An option, a name or a manifest is not valid for Kubernetes; the message says how to fix."""


class ValidatorMissing(ManifestError):
    """kubernetes-validate is not installed: the manifests were written but not validated."""


@dataclasses.dataclass(frozen=True)
class ManifestOptions:
    """What a team tunes per deployment; everything the image fixes comes from the contract."""

    app_name: str | None = None  # default: derived from the model name
    replicas: int = 2
    max_replicas: int | None = None  # default: max(5, replicas)
    target_cpu: int = 70  # HPA: average CPU utilisation, percent of the request
    cpu_request: str = "250m"
    cpu_limit: str = "1"
    memory_request: str = "512Mi"
    memory_limit: str = "1Gi"
    tracking_uri: str = ""


def app_name_for(model_name: str, app_name: str | None = None) -> str:
    """The Kubernetes name of the deployment: ``app_name`` as given, else from the model name.

    Raises:
        ManifestError: the name is not (and cannot be made) an RFC 1035 label, which a
            Service name must be.
    """
    rule = (
        "Kubernetes names here must be RFC 1035 labels (a Service is named after the app): "
        "at most 63 characters of lowercase letters, digits and '-', starting with a letter "
        "and ending with a letter or digit"
    )
    if app_name is not None:
        if not _DNS_LABEL.match(app_name) or len(app_name) > 63:
            raise ManifestError(f"--app-name {app_name!r}: {rule}; pass a name that is")
        return app_name
    derived = re.sub(r"[^a-z0-9]+", "-", model_name.lower()).strip("-")[:63].rstrip("-")
    if not _DNS_LABEL.match(derived):
        raise ManifestError(
            f"model name {model_name!r} cannot be made a Kubernetes name ({rule}); "
            "pass one with --app-name"
        )
    return derived


def write_manifests(
    facts: VersionFacts,
    image: str,
    out: Path,
    options: ManifestOptions | None = None,
    *,
    force: bool = False,
) -> list[Path]:
    """Write the manifests that run ``image`` (the image of ``facts``) into folder ``out``.

    Files already there with other content are refused unless ``force``; identical ones are
    left as they are. Nothing is written unless every option is valid.

    Returns:
        The paths of every file of the set, kustomization.yaml last.

    Example:
        >>> write_manifests(facts, "ghcr.io/acme/churn:v4", Path("k8s"))  # doctest: +SKIP
    """
    options = options or ManifestOptions()
    files = render_manifests(facts, image, options)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ManifestError(f"--out {out}: is a file; name a folder for the manifests")
    clashes = [
        name
        for name, text in files.items()
        if (out / name).exists() and (out / name).read_text(encoding="utf-8") != text
    ]
    if clashes and not force:
        raise ManifestError(
            f"--out {out}: {', '.join(clashes)} already there with other content; "
            "pass --force to overwrite them, or choose another folder"
        )
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in files.items():
        path = out / name
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            partial = path.with_name(f".{name}.partial")
            partial.write_text(text, encoding="utf-8")
            partial.replace(path)  # a reader never sees half a file
        paths.append(path)
    logger.debug("wrote %d files to %s", len(paths), out)
    return paths


def render_manifests(facts: VersionFacts, image: str, options: ManifestOptions) -> dict[str, str]:
    """File name -> content of the manifest set, in the order kustomization.yaml lists them."""
    app = app_name_for(facts.name, options.app_name)
    max_replicas = _check_options(options)
    repository, tag, digest = _split_image(image)
    selector = {"app.kubernetes.io/name": app, "app.kubernetes.io/instance": app}
    labels = {
        **selector,
        "app.kubernetes.io/version": _label_value(facts.version),
        "app.kubernetes.io/component": "model-server",
        "app.kubernetes.io/part-of": "mlops",
        "app.kubernetes.io/managed-by": "mlops",
        contract.LABEL_NAME: _label_value(facts.name),
        contract.LABEL_VERSION: _label_value(facts.version),
    }
    labels = {k: v for k, v in labels.items() if v}
    annotations = facts.labels()  # checksum, commit, run id: too long or free-form for labels
    docs = {
        DEPLOYMENT_FILE: _deployment(app, image, labels, selector, annotations, options),
        SERVICE_FILE: _service(app, labels, selector, annotations),
        HPA_FILE: _hpa(app, labels, annotations, options.replicas, max_replicas, options),
        PDB_FILE: _pdb(app, labels, selector, annotations),
    }
    files = {name: yaml.safe_dump(doc, sort_keys=False) for name, doc in docs.items()}
    files[SETTINGS_FILE] = _settings_env(app, options)
    image_entry: dict[str, str] = {"name": repository}
    if tag:
        image_entry["newTag"] = tag
    if digest:
        image_entry["digest"] = digest
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": list(docs),
        # a change of settings renames the ConfigMap (hash suffix), which rolls the pods
        "configMapGenerator": [{"name": f"{app}-settings", "envs": [SETTINGS_FILE]}],
        # retag without editing the Deployment: kustomize edit set image REPO:TAG
        "images": [image_entry],
    }
    files[SECRETS_EXAMPLE_FILE] = _secrets_example(app)
    files[KUSTOMIZATION_FILE] = yaml.safe_dump(kustomization, sort_keys=False)
    return files


def validate_manifests(
    paths: Iterable[Path], versions: Sequence[str] | None = None
) -> tuple[str, ...]:
    """Validate every Kubernetes object in the YAML files of ``paths``, strictly (no unknown
    field), for each of ``versions`` (default :data:`SUPPORTED_VERSIONS`).

    Files that hold no Kubernetes object (``.env`` files, ``kustomization.yaml``) are skipped.

    Returns:
        The versions validated against.

    Raises:
        ValidatorMissing: kubernetes-validate is not installed.
        ManifestError: an object is invalid; the message names the file, object, field
            and Kubernetes version.
    """
    try:
        import kubernetes_validate
        from kubernetes_validate import utils as kv_utils
    except ImportError:
        raise ValidatorMissing(
            f"manifests not validated: kubernetes-validate is not installed; {INSTALL_VALIDATOR}"
        ) from None
    versions = tuple(kv_utils.major_minor(v.lstrip("v")) for v in versions or SUPPORTED_VERSIONS)
    shipped = {kv_utils.major_minor(v) for v in kv_utils.all_versions()}
    unknown = [v for v in versions if v not in shipped]
    if unknown:
        raise ManifestError(
            f"Kubernetes {', '.join(unknown)}: kubernetes-validate {kv_utils.__version__} has no "
            f"schemas for it (it has {', '.join(sorted(shipped, key=_minor))}); name one of "
            "those as MAJOR.MINOR, or upgrade kubernetes-validate"
        )
    problems: list[str] = []
    for path in paths:
        path = Path(path)
        if path.suffix not in (".yaml", ".yml"):
            continue
        try:
            documents = list(yaml.safe_load_all(path.read_text(encoding="utf-8")))
        except yaml.YAMLError as exc:
            raise ManifestError(f"{path}: not valid YAML ({exc}); fix the file") from None
        for doc in documents:
            if not isinstance(doc, dict) or str(doc.get("apiVersion", "")).startswith(
                "kustomize.config.k8s.io/"
            ):
                continue
            what = f"{doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"
            if not doc.get("apiVersion") or not doc.get("kind"):
                problems.append(f"{path.name}: {what} names no apiVersion or kind")
                continue
            for version in versions:
                try:
                    kubernetes_validate.validate(doc, version, strict=True)
                except kv_utils.ValidationError as exc:
                    field = "".join(
                        f"[{p}]" if isinstance(p, int) else f".{p}" for p in exc.absolute_path
                    ).lstrip(".")
                    problems.append(
                        f"{path.name}: {what} is invalid for Kubernetes {version} at "
                        f"{field or '(top level)'}: {exc.message}"
                    )
                    break  # the same mistake for the next version is noise
                except kv_utils.SchemaNotFoundError as exc:
                    problems.append(f"{path.name}: {what}: {exc.message}")
                    break
    if problems:
        raise ManifestError(
            "; ".join(problems) + " (strict: unknown fields are refused); fix the manifest"
        )
    return versions


# ---- the objects ----
def _meta(name: str, labels: dict[str, str], annotations: dict[str, str]) -> dict[str, Any]:
    return {"name": name, "labels": dict(labels), "annotations": dict(annotations)}


def _probe(failure_threshold: int, period: int, timeout: int, delay: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": contract.PROBE_PATH, "port": "http"},
        "initialDelaySeconds": delay,
        "periodSeconds": period,
        "timeoutSeconds": timeout,
        "failureThreshold": failure_threshold,
    }


def _deployment(
    app: str,
    image: str,
    labels: dict[str, str],
    selector: dict[str, str],
    annotations: dict[str, str],
    options: ManifestOptions,
) -> dict[str, Any]:
    scrape = {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(contract.PORT),
        "prometheus.io/path": contract.METRICS_PATH,
    }
    container = {
        "name": "model",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "ports": [{"name": "http", "containerPort": contract.PORT, "protocol": "TCP"}],
        "envFrom": [
            {"configMapRef": {"name": f"{app}-settings"}},
            # optional: a cluster without the Secret still starts (no auth, no log password)
            {"secretRef": {"name": f"{app}-secrets", "optional": True}},
        ],
        "env": [{"name": "TMPDIR", "value": TMP_DIR}],
        # the model loads in seconds: up to 2 minutes before liveness starts counting
        "startupProbe": _probe(60, 2, 2, 2),
        "readinessProbe": _probe(3, 5, 2, 0),
        "livenessProbe": _probe(3, 10, 5, 0),
        "lifecycle": {"preStop": {"sleep": {"seconds": DRAIN_SECONDS}}},
        "resources": {
            "requests": {"cpu": options.cpu_request, "memory": options.memory_request},
            "limits": {"cpu": options.cpu_limit, "memory": options.memory_limit},
        },
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": contract.USER_ID,
            "runAsGroup": contract.USER_ID,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [{"name": "tmp", "mountPath": TMP_DIR}],
    }
    pod_spec = {
        "automountServiceAccountToken": False,  # the server never calls the Kubernetes API
        "terminationGracePeriodSeconds": GRACE_SECONDS,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": contract.USER_ID,
            "runAsGroup": contract.USER_ID,
            "fsGroup": contract.USER_ID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "256Mi"}}],
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(app, labels, annotations),
        "spec": {
            "replicas": options.replicas,
            "revisionHistoryLimit": 5,
            "selector": {"matchLabels": dict(selector)},
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
            },
            "template": {
                "metadata": {"labels": dict(labels), "annotations": {**annotations, **scrape}},
                "spec": pod_spec,
            },
        },
    }


def _service(
    app: str, labels: dict[str, str], selector: dict[str, str], annotations: dict[str, str]
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(app, labels, annotations),
        "spec": {
            "type": "ClusterIP",
            "selector": dict(selector),
            "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def _hpa(
    app: str,
    labels: dict[str, str],
    annotations: dict[str, str],
    min_replicas: int,
    max_replicas: int,
    options: ManifestOptions,
) -> dict[str, Any]:
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": _meta(app, labels, annotations),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": app},
            "minReplicas": min_replicas,
            "maxReplicas": max_replicas,
            "metrics": [
                {
                    "type": "Resource",
                    "resource": {
                        "name": "cpu",
                        "target": {"type": "Utilization", "averageUtilization": options.target_cpu},
                    },
                }
            ],
        },
    }


def _pdb(
    app: str, labels: dict[str, str], selector: dict[str, str], annotations: dict[str, str]
) -> dict[str, Any]:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _meta(app, labels, annotations),
        "spec": {
            # one pod at a time: with 2+ replicas one keeps serving; with 1 a drain still works
            "maxUnavailable": 1,
            "selector": {"matchLabels": dict(selector)},
            # a crash-looping pod must not block a node drain
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }


def _settings_env(app: str, options: ManifestOptions) -> str:
    values = {
        "MLFLOW_TRACKING_URI": options.tracking_uri,
        "MLOPS_FOLLOW_ALIAS": "",
        "MLOPS_WORKERS": "2",
        "MLOPS_MONITORING": "false",
    }
    described = {name: what for name, _, what in contract.SETTINGS}
    lines = [
        f"# Settings of {app} (no secrets): kustomize makes the ConfigMap {app}-settings of them.",
        "# Secrets go in the Secret, never here: see secrets.env.example.",
    ]
    for key in contract.CONFIG_KEYS:
        lines += [f"# {described[key]}", f"{key}={values.get(key, '')}"]
    return "\n".join(lines) + "\n"


def _secrets_example(app: str) -> str:
    described = {name: what for name, _, what in contract.SETTINGS}
    lines = [
        f"# The keys of the Secret {app}-secrets (the manifests reference it, never contain it).",
        "# Fill in a copy outside version control, create the Secret, then delete the copy:",
        f"#   kubectl create secret generic {app}-secrets --from-env-file=secrets.env",
        "# Leave a key out to leave that feature off; without the Secret the server still starts.",
    ]
    for key in contract.SECRET_KEYS:
        lines += [f"# {described[key]}", f"{key}="]
    return "\n".join(lines) + "\n"


# ---- checks ----
def _check_options(options: ManifestOptions) -> int:
    """Refuse what Kubernetes would refuse or misbehave on; the HPA's maximum."""
    if options.replicas < 1:
        raise ManifestError(f"--replicas {options.replicas}: run at least 1")
    max_replicas = options.max_replicas or max(5, options.replicas)
    if max_replicas < options.replicas:
        raise ManifestError(
            f"--max-replicas {max_replicas} is below --replicas {options.replicas}: "
            "raise --max-replicas or lower --replicas"
        )
    if not 1 <= options.target_cpu <= 100:
        raise ManifestError(f"--target-cpu {options.target_cpu}: a percentage from 1 to 100")
    for kind, request, limit in (
        ("cpu", options.cpu_request, options.cpu_limit),
        ("memory", options.memory_request, options.memory_limit),
    ):
        if _quantity(f"--{kind}-request", request) > _quantity(f"--{kind}-limit", limit):
            raise ManifestError(
                f"--{kind}-request {request} is above --{kind}-limit {limit}: "
                "Kubernetes refuses a request above its limit; lower it or raise the limit"
            )
    if re.search(r"//[^/@]*@", options.tracking_uri):
        raise ManifestError(
            "--tracking-uri holds credentials, and settings.env is not secret: pass the URL "
            "without them and put them in the Secret (MLFLOW_TRACKING_USERNAME/PASSWORD)"
        )
    return max_replicas


def _quantity(option: str, value: str) -> Decimal:
    match = _QUANTITY.match(value)
    if not match:
        raise ManifestError(
            f"{option} {value!r}: not a Kubernetes quantity; write e.g. 250m or 1 (cpu), "
            "512Mi or 1Gi (memory)"
        )
    amount = Decimal(match.group(1)) * _SUFFIX[match.group(2) or ""]
    if amount <= 0:
        raise ManifestError(f"{option} {value!r}: must be above zero")
    return amount


def _split_image(image: str) -> tuple[str, str | None, str | None]:
    """(repository, tag, digest) of an image reference; refuse one that names no version."""
    if not image or re.search(r"\s", image):
        raise ManifestError(f"--image {image!r}: name the image `mlops package` built (REPO:TAG)")
    rest, _, digest = image.partition("@")
    repository, tag = rest, None
    last = rest.rsplit("/", 1)[-1]
    if ":" in last:
        repository, tag = rest.rsplit(":", 1)
    if not tag and not digest:
        raise ManifestError(
            f"--image {image}: name a tag or digest (REPO:TAG or REPO@sha256:...), the one "
            "`mlops package` built; an untagged image is whatever :latest is on the day"
        )
    path = repository.split("/", 1)[-1] if "/" in repository else repository
    if path != path.lower():
        raise ManifestError(f"--image {image}: image repositories are lowercase; fix the name")
    return repository, tag, digest or None


def _minor(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def _label_value(value: str) -> str:
    """``value`` as a valid label value: at most 63 of [A-Za-z0-9._-], alphanumeric ends."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", value)[:63]
    return re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", cleaned)
