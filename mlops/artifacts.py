"""Model files that are verified before they are read, and read without running code.

A fitted pipeline is persisted with skops (``pipeline.skops``), whose loader rebuilds objects
from a description instead of unpickling them, and accepts only types on a trusted list:
scikit-learn's own, the project's estimators (``mlops.models``) and NumPy's dtype. A Keras
network inside the project's estimator travels in Keras's native ``.keras`` format, loaded
with Keras's safe mode. A pickle (``pipeline.joblib``, written by earlier releases) is loaded
only with the explicit opt-in ``MLOPS_ALLOW_PICKLE=1``, because unpickling runs whatever code
the file names.

Every read is preceded by a checksum: :func:`model_checksum` over a whole model directory
(recorded on the registered version by :func:`mlops.registry.register`) and :func:`file_sha256`
over the pipeline file (recorded in the model's ``metadata.json`` when it is logged).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from pathlib import Path
from typing import Any

from mlops.errors import MlopsError

logger = logging.getLogger(__name__)

PIPELINE_FILE = "pipeline.skops"
CHECKSUM_TAG = "mlops.checksum"  # on a registered version: model_checksum of its files
PICKLE_OPT_IN_ENV = "MLOPS_ALLOW_PICKLE"
# types outside skops's defaults that a project pipeline is made of
TRUSTED_PREFIXES = ("sklearn.",)
TRUSTED_EXACT = frozenset(
    {
        "numpy.dtype",
        "mlops.models.keras_mlp.KerasMLPClassifier",
        "mlops.models.keras_mlp.KerasMLPRegressor",
        # the declarative feature transforms (data.features), plain attributes and arrays
        "mlops.features.Log1p",
        "mlops.features.Clip",
        "mlops.features.DateParts",
        "mlops.features.TextTfidf",
        "mlops.features.FrequencyEncoder",
    }
)


class UntrustedArtifact(MlopsError):
    """A model file failed its checksum, or would need code execution (or an unknown type) to
    load."""


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# written by MLflow into each download of a models:/ URI, naming how it was asked for (a version
# or an alias): not part of the model
DOWNLOAD_NOTE = "registered_model_meta"


def model_checksum(path: str | Path, *, legacy: bool = False) -> str:
    """SHA-256 over every file of a model directory: relative paths and contents.

    MLflow's download note (:data:`DOWNLOAD_NOTE`) is left out, so the files of one version give
    one checksum however they were downloaded; ``legacy`` includes it, as checksums recorded
    before that rule did.
    """
    root = Path(path)
    digest = hashlib.sha256()
    files = (
        p
        for p in root.rglob("*")
        if p.is_file() and (legacy or p.relative_to(root).as_posix() != DOWNLOAD_NOTE)
    )
    for file in sorted(files):
        digest.update(file.relative_to(root).as_posix().encode() + b"\0")
        with open(file, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()


def checksum_matches(path: str | Path, recorded: str) -> bool:
    """Whether the model directory at ``path`` has the ``recorded`` checksum (in either form)."""
    if hmac.compare_digest(model_checksum(path), recorded):
        return True
    return (Path(path) / DOWNLOAD_NOTE).exists() and hmac.compare_digest(
        model_checksum(path, legacy=True), recorded
    )


def verify_model_dir(path: str | Path, recorded: str, what: str) -> None:
    """Raise :class:`UntrustedArtifact` unless the model directory has the ``recorded``
    checksum."""
    if not checksum_matches(path, recorded):
        verify_checksum(model_checksum(path), recorded, what)


def recorded_checksum(name: str, version: str) -> str | None:
    """The checksum recorded on registered ``name`` version ``version`` (None, with a warning,
    when it has none: registered outside mlops)."""
    import mlflow

    return checksum_of(mlflow.MlflowClient().get_model_version(name, version))


def checksum_of(registered: Any) -> str | None:
    """The checksum recorded on a registered version (an MLflow ``ModelVersion``), or None,
    with a warning, when it has none (registered outside mlops)."""
    recorded = (registered.tags or {}).get(CHECKSUM_TAG)
    if not recorded:
        logger.warning(
            "%s version %s has no recorded checksum (registered outside mlops): its files "
            "cannot be verified; register versions with mlops",
            registered.name,
            registered.version,
        )
    return recorded


def verify_registered(name: str, version: str, path: str | Path) -> None:
    """Refuse the files at ``path`` unless they are registered ``name`` version ``version``
    as recorded (:class:`UntrustedArtifact`); called before anything of them is read."""
    recorded = recorded_checksum(name, version)
    if recorded:
        verify_model_dir(path, recorded, f"{name} version {version}")


def verify_checksum(actual: str, recorded: str, what: str) -> None:
    """Raise :class:`UntrustedArtifact` unless ``actual`` equals ``recorded``."""
    if not hmac.compare_digest(actual, recorded):
        raise UntrustedArtifact(
            f"{what}: checksum {actual[:16]} does not match the recorded {recorded[:16]}; the "
            "files changed after they were recorded, so they are not loaded. Re-register the "
            "model from its training run, or find out who changed the files"
        )


def save_pipeline(pipeline: Any, directory: str | Path) -> Path:
    """Write ``pipeline`` as ``directory/pipeline.skops``; refuses types the loader would not
    trust."""
    import skops.io as sio

    path = Path(directory) / PIPELINE_FILE
    data = sio.dumps(pipeline)
    untrusted = [t for t in sio.get_untrusted_types(data=data) if not _trusted(t)]
    if untrusted:
        raise UntrustedArtifact(
            f"the pipeline holds types {untrusted} that a served model would refuse to load; "
            "use scikit-learn estimators or the project's model families"
        )
    path.write_bytes(data)
    return path


def load_pipeline(path: str | Path, *, sha256: str | None = None) -> Any:
    """The pipeline at ``path``, after its checksum (when recorded) matched.

    skops files load with only the trusted types; a pickle needs ``MLOPS_ALLOW_PICKLE=1``.
    """
    path = Path(path)
    if sha256:
        verify_checksum(file_sha256(path), sha256, f"model file {path.name}")
    if path.suffix == ".skops":
        import skops.io as sio

        data = path.read_bytes()
        try:
            named = sio.get_untrusted_types(data=data)
        except Exception as exc:  # not a skops archive at all: say so, without its contents
            raise UntrustedArtifact(
                f"model file {path.name} is not a readable skops file ({type(exc).__name__})"
            ) from None
        untrusted = [t for t in named if not _trusted(t)]
        if untrusted:
            raise UntrustedArtifact(
                f"model file {path.name} names types {untrusted[:5]} outside the trusted list "
                "(scikit-learn, mlops.models); refusing to load it"
            )
        try:
            return sio.loads(data, trusted=named)
        except Exception as exc:  # a malformed file: say so, without its contents
            raise UntrustedArtifact(
                f"model file {path.name} is not a readable skops file ({type(exc).__name__})"
            ) from None
    if os.environ.get(PICKLE_OPT_IN_ENV, "") != "1":
        raise UntrustedArtifact(
            f"model file {path.name} is a pickle, and loading a pickle runs any code it holds; "
            f"re-log the model (pipelines are now saved as {PIPELINE_FILE}), or, for a file you "
            f"trust, set {PICKLE_OPT_IN_ENV}=1"
        )
    import joblib

    logger.warning("loading pickle %s because %s=1", path.name, PICKLE_OPT_IN_ENV)
    return joblib.load(path)


def _trusted(type_name: str) -> bool:
    return type_name in TRUSTED_EXACT or type_name.startswith(TRUSTED_PREFIXES)


def download_model(
    name: str, version: str, dst: str | os.PathLike[str], *, workers: int = 8
) -> Path:
    """Download registered ``name`` version ``version`` into ``dst``; returns the model folder.

    From an ``mlops server`` registry, the version's files in one answer (its
    ``model-versions/files``, :mod:`mlops.team.files`); elsewhere what
    :func:`mlflow.artifacts.download_artifacts` does for a ``models:/`` URI, with the
    folders listed concurrently: MLflow lists them one after another, one round trip each, which
    through a tracking server's artifact proxy is most of a download. Files are written only
    under ``dst`` (a listed path that would leave it is refused).
    """
    from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    root = Path(dst).resolve()
    if _from_team_server(name, version, root):
        return root
    repo = get_artifact_repository(f"models:/{name}/{version}")
    files: list[str] = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: set[Future[Any]] = {pool.submit(repo.list_artifacts, None)}
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                for info in future.result():
                    if info.is_dir:
                        pending.add(pool.submit(repo.list_artifacts, info.path))
                    else:
                        files.append(info.path)
        targets = []
        root.mkdir(parents=True, exist_ok=True)
        for path in files:
            if _inside(root, path) is None:
                raise UntrustedArtifact(
                    f"{name} version {version}: the artifact store lists {path!r}, a path "
                    "outside the model folder; refusing to download it"
                )
            # the public call: it asks the store whether ``path`` is a folder (one more
            # round trip per file, concurrent here) before it downloads the file
            targets.append(pool.submit(repo.download_artifacts, path, str(root)))
        for future in targets:
            future.result()
    return root


def _from_team_server(name: str, version: str, root: Path) -> bool:
    """Download through the team server's one-answer endpoint; False where the registry is no
    ``mlops server`` (not HTTP, or the endpoint is absent) or the server leaves the version to
    MLflow's file-by-file download: a 409 (files outside its proxy, or too large), a 403 (MLflow
    itself decides, with grants through roles the endpoint does not see) or a 5xx. A bad
    request, an unknown version or a failed login raises, naming the server's reason; so does an
    answer that breaks off or is no tar."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    uri = mlflow.get_registry_uri()
    if not uri.startswith(("http://", "https://")):
        return False
    from mlops.team.files import FILES_ENDPOINT, MARK_HEADER

    response = http_request(
        get_default_host_creds(uri),
        FILES_ENDPOINT,
        "GET",
        params={"name": name, "version": version},
        stream=True,
        raise_on_status=False,
        max_retries=0,  # a failure goes to MLflow's own download, which retries its requests
    )
    with response:
        status = response.status_code
        if MARK_HEADER not in response.headers or status in (403, 409) or status >= 500:
            return False
        if status != 200:
            try:
                message = response.json().get("message", "")
            except ValueError:
                message = response.text[:300]
            raise MlflowException(
                f"{name} version {version}: the server refused its files "
                f"(HTTP {response.status_code}): {message}"
            )
        response.raw.decode_content = True  # a proxy in between may have compressed it
        try:
            _extract(response.raw, root, f"{name} version {version}")
        except UntrustedArtifact:
            raise
        except Exception as exc:  # noqa: BLE001 - a broken-off or malformed answer
            raise MlflowException(
                f"{name} version {version}: the server's answer with its files broke off or is "
                f"no tar ({exc.__class__.__name__}); try again"
            ) from None
    return True


def _extract(stream: Any, root: Path, what: str) -> None:
    """Write the regular files of the tar ``stream`` under ``root``; anything else (a link, a
    device, a path leaving ``root``) refuses the whole answer."""
    import tarfile

    root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            target = _inside(root, member.name)
            if target is None or not member.isfile():
                raise UntrustedArtifact(
                    f"{what}: the server's answer holds {member.name!r}, which is no file inside "
                    "the model folder; refusing it"
                )
            source = tar.extractfile(member)
            assert source is not None  # a regular file
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "wb") as out:
                while block := source.read(1 << 20):
                    out.write(block)


def _inside(root: Path, path: str) -> Path | None:
    """Where ``path`` lands under the resolved folder ``root``; None where it would leave it
    (``../``, an absolute path) or name the folder itself."""
    target = (root / path).resolve()
    return target if target.is_relative_to(root) and target != root else None
