"""A registered version's files in one answer: the team server's ``model-versions/files``.

Through MLflow's artifact proxy a client downloads a model one file at a time, after one listing
per folder: for a model of 92 files (most of them the project's code under ``code/``) that is
some 200 round trips through the server to S3, and a promotion downloads two versions. The
``mlops`` app answers ``GET /api/2.0/mlops/model-versions/files?name=NAME&version=V`` with the
version's files as one uncompressed tar (READ on the registered model, as any read of it): the
server lists the version's folder in S3 once and reads its files concurrently.

The server keeps what it read in a bounded cache on its disk that its workers share
(``server.file_cache_mb``), keyed by the object's key, size and ETag from that one listing, so
an object that changed in S3 is read again. The cache saves the server work, not the client
its check: the client verifies the files it received against the checksum recorded at
registration before anything reads them (:func:`mlops.artifacts.download_model`).

An answer carries the header ``X-Mlops-Files``; a server without it (a plain ``mlflow
server``), or a 409 (files outside the server's artifact proxy, or a version larger than
:data:`MAX_ARCHIVE_BYTES`), leaves the client to MLflow's file-by-file download.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import logging
import os
import posixpath
import re
import tarfile
import tempfile
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

FILES_ENDPOINT = "/api/2.0/mlops/model-versions/files"
FILES_PATHS = frozenset((FILES_ENDPOINT, FILES_ENDPOINT.replace("/api/", "/ajax-api/", 1)))
MARK_HEADER = "X-Mlops-Files"
CACHE_MB_ENV = "MLOPS_FILE_CACHE_MB"  # set by `mlops server` from server.file_cache_mb
CACHE_DIR_ENV = "MLOPS_FILE_CACHE_DIR"  # set by `mlops server`: a folder its workers share
DEFAULT_CACHE_MB = 256
MAX_ARCHIVE_BYTES = 256 << 20  # larger versions go file by file (an answer is built in memory)
_READERS = 8
_VERSION = re.compile(r"[1-9][0-9]{0,9}")


class FilesRefused(Exception):
    """Why the files cannot be answered: an HTTP status, an MLflow error code and a message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code = status, code


class FileCache:
    """Objects read from the store, as files in one folder that every worker of the server
    shares, named by a digest of (bucket, key, size, ETag); least recently used go first once
    their total passes ``limit_bytes`` (0: nothing is kept)."""

    def __init__(self, folder: str | os.PathLike[str], limit_bytes: int) -> None:
        self.folder = Path(folder)
        self.limit = limit_bytes
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)

    def _path(self, key: tuple[str, ...]) -> Path:
        return self.folder / hashlib.sha256("\0".join(key).encode()).hexdigest()

    def get(self, key: tuple[str, ...]) -> bytes | None:
        path = self._path(key)
        try:
            data = path.read_bytes()
            os.utime(path)  # recently used
        except OSError:  # not cached, or dropped by another worker meanwhile
            return None
        return data

    def put(self, key: tuple[str, ...], data: bytes) -> None:
        if not 0 < len(data) <= self.limit:
            return
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".part-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, self._path(key))
        except OSError as exc:  # a full disk costs the cache, not the answer
            logger.warning("the files cache could not keep an object: %s", exc)
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    def trim(self) -> None:
        """Drop the least recently used files until the rest fit the limit, and parts a
        crashed worker left (older than an hour)."""
        entries = []
        stale = time.time() - 3600
        with os.scandir(self.folder) as found:
            for entry in found:
                with contextlib.suppress(OSError):
                    if not entry.is_file():
                        continue
                    stat = entry.stat()
                    if entry.name.startswith("."):
                        if stat.st_mtime < stale:
                            os.unlink(entry.path)
                        continue
                    entries.append((stat.st_mtime, stat.st_size, entry.path))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= self.limit:
                break
            with contextlib.suppress(OSError):
                os.unlink(path)
            total -= size


@functools.cache
def cache() -> FileCache | None:
    """This worker's view of the cache: the folder `mlops server` shares between its workers
    (``MLOPS_FILE_CACHE_DIR``); None (nothing kept) without one."""
    try:
        mb = int(os.environ.get(CACHE_MB_ENV, DEFAULT_CACHE_MB))
    except ValueError:
        mb = DEFAULT_CACHE_MB
    folder = os.environ.get(CACHE_DIR_ENV)
    return FileCache(folder, mb << 20) if folder and mb > 0 else None


def parameters(args: Any) -> tuple[str, str]:
    """``name`` and ``version`` of the request's query string, checked."""
    name, version = args.get("name", ""), args.get("version", "")
    if not name:
        raise FilesRefused(
            400, "INVALID_PARAMETER_VALUE", "'name' (the registered model) is required"
        )
    if not _VERSION.fullmatch(version):
        raise FilesRefused(
            400,
            "INVALID_PARAMETER_VALUE",
            f"'version' must be a registered version number such as 3, not {version[:40]!r}",
        )
    return name, version


def proxied_path(download_uri: str) -> str:
    """The folder of ``download_uri`` inside the server's artifacts destination."""
    parsed = urllib.parse.urlparse(download_uri)
    if parsed.scheme != "mlflow-artifacts":
        raise FilesRefused(
            409,
            "INVALID_STATE",
            "this version's files are not behind the server's artifact proxy; download them "
            "from their store",
        )
    path = posixpath.normpath(parsed.path.lstrip("/"))
    if path in ("", ".") or path.startswith(".."):
        raise FilesRefused(409, "INVALID_STATE", "this version's artifact location is not a folder")
    return path


def archive(destination: str, path: str) -> bytes:
    """The files under ``path`` of the artifacts destination ``destination``, as one tar."""
    if destination.startswith("s3://"):
        files = _read_s3(destination, path)
    else:
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        files = _read_generic(get_artifact_repository(destination), path)
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for rel, data in sorted(files.items()):
            info = tarfile.TarInfo(rel)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


@functools.cache
def _s3() -> Any:
    """One client per worker (thread-safe once made, on a session of its own), on MLflow's S3
    settings (:func:`mlops.sources.s3_client`)."""
    from mlops.sources import s3_client

    return s3_client()


def _read_s3(destination: str, path: str) -> dict[str, bytes]:
    """One paginated listing of the folder, then the objects not cached, concurrently."""
    from mlops.sources import split_s3

    bucket, root = split_s3(destination)
    prefix = posixpath.join(root, path).strip("/") + "/"
    client = _s3()
    owner = os.environ.get("MLFLOW_S3_EXPECTED_BUCKET_OWNER")
    extra = {"ExpectedBucketOwner": owner} if owner else {}
    listed: list[tuple[str, int, str]] = []
    total = 0
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, **extra)
    for page in pages:
        for obj in page.get("Contents", []):
            key, size = obj["Key"], int(obj["Size"])
            if key.endswith("/") and size == 0:  # a folder marker
                continue
            total += size
            if total > MAX_ARCHIVE_BYTES:
                raise _too_large()
            listed.append((key, size, str(obj.get("ETag", ""))))
    if not listed:
        raise FilesRefused(404, "RESOURCE_DOES_NOT_EXIST", "this version has no files in the store")
    store = cache()
    found: dict[str, bytes] = {}
    missing = []
    for key, size, etag in listed:
        data = store.get((bucket, key, str(size), etag)) if store and etag else None
        if data is not None:
            found[key] = data
        else:
            missing.append((key, size, etag))

    def get(item: tuple[str, int, str]) -> tuple[str, bytes]:
        key, size, etag = item
        answer = client.get_object(Bucket=bucket, Key=key, **extra)
        data = answer["Body"].read()
        if store and etag and answer.get("ETag") == etag and len(data) == size:
            store.put((bucket, key, str(size), etag), data)
        return key, data

    if missing:
        with ThreadPoolExecutor(max_workers=min(_READERS, len(missing))) as pool:
            found.update(pool.map(get, missing))
        if store:
            store.trim()
    return {_relative(key, prefix): data for key, data in found.items()}


def _read_generic(repo: Any, path: str) -> dict[str, bytes]:
    """Any other artifact store (a local folder): its own listing and download."""
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(repo.download_artifacts(path, tmp))
        files = [p for p in local.rglob("*") if p.is_file()]
        if sum(p.stat().st_size for p in files) > MAX_ARCHIVE_BYTES:
            raise _too_large()
        if not files:
            raise FilesRefused(
                404, "RESOURCE_DOES_NOT_EXIST", "this version has no files in the store"
            )
        return {p.relative_to(local).as_posix(): p.read_bytes() for p in files}


def _relative(key: str, prefix: str) -> str:
    rel = key[len(prefix) :]
    parts = rel.split("/")
    if not key.startswith(prefix) or any(p in ("", ".", "..") for p in parts):
        raise FilesRefused(
            409, "INVALID_STATE", f"the store lists {key!r}, which is no file of this version"
        )
    return rel


def _too_large() -> FilesRefused:
    return FilesRefused(
        409,
        "INVALID_STATE",
        f"this version's files exceed {MAX_ARCHIVE_BYTES >> 20} MB; download them file by file",
    )
