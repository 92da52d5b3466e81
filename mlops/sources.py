"""Where a table comes from: a CSV or Parquet file, a folder or a glob, local or on S3.

:func:`list_sources` turns what a user typed into the checked list of files it names (an empty
glob or folder, an unknown suffix or an S3 bucket or key that cannot be listed is a
:class:`SourceError` naming the fix); :func:`open_source` opens one of them. S3 is reached
through boto3 with the endpoint in ``MLFLOW_S3_ENDPOINT_URL``, as the rest of the project
reaches it; a Parquet object is read by ranged GETs, so only its footer and the row groups
read are fetched.

Batch scoring (:mod:`mlops.scoring.sources`) and training data (:mod:`mlops.data`) both read
through here: it sits below both, so neither imports the other.
"""

from __future__ import annotations

import fnmatch
import glob
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlops.errors import MlopsError

PARQUET, CSV = "parquet", "csv"
SUFFIXES = {".parquet": PARQUET, ".pq": PARQUET, ".parq": PARQUET, ".csv": CSV, ".csv.gz": CSV}
GLOB_CHARS = frozenset("*?[")


class SourceError(MlopsError, ValueError):
    """A file, folder, glob or S3 object cannot be read as given."""


@dataclass(frozen=True)
class Source:
    """One file: a local path or an ``s3://bucket/key`` URI, and its format."""

    uri: str
    format: str

    @property
    def on_s3(self) -> bool:
        return self.uri.startswith("s3://")


def format_of(path: str) -> str | None:
    """``parquet`` or ``csv`` from a file name's suffix; None for anything else."""
    name = path.lower()
    return next((fmt for suffix, fmt in SUFFIXES.items() if name.endswith(suffix)), None)


def is_glob(uri: str) -> bool:
    return bool(GLOB_CHARS & set(uri))


def list_sources(uri: str) -> list[Source]:
    """The files ``uri`` names (a file, a folder, a glob; local or ``s3://``), sorted by name.

    Formats may differ from file to file (a caller that needs one format checks).

    Raises:
        SourceError: nothing there, an empty glob or folder, an unknown format, an S3 bucket
            or key that cannot be listed.
    """
    paths = _list_s3(uri) if uri.startswith("s3://") else _list_local(uri)
    formats = {p: format_of(p) for p in paths}
    unknown = [p for p, f in formats.items() if f is None]
    if unknown:
        raise SourceError(
            f"input {unknown[0]!r}: unknown format; pass .csv or .parquet files "
            f"({', '.join(sorted(SUFFIXES))})"
        )
    return [Source(p, formats[p] or "") for p in paths]


def _list_local(uri: str) -> list[str]:
    if is_glob(uri):
        paths = sorted(p for p in glob.glob(uri, recursive=True) if Path(p).is_file())
        if not paths:
            raise SourceError(
                f"input glob {uri!r} matches no file; check the pattern (quote it so the shell "
                "does not expand it) or pass a file or folder"
            )
        return paths
    path = Path(uri)
    if path.is_file():
        return [str(path)]
    if path.is_dir():
        paths = sorted(
            str(p)
            for p in path.rglob("*")
            if p.is_file() and format_of(p.name) and not _hidden(p.relative_to(path))
        )
        if not paths:
            raise SourceError(
                f"input folder {uri!r} holds no .csv or .parquet file; pass the folder that "
                "holds the data, or a glob such as data/*.parquet"
            )
        return paths
    raise SourceError(
        f"input {uri!r} does not exist; pass a CSV or Parquet file, a folder of them, or a glob "
        "such as 'data/*.parquet'"
    )


def _hidden(relative: Path) -> bool:
    """Spark's and Hadoop's bookkeeping files (``_SUCCESS``, ``.part.crc``) are not data."""
    return any(part.startswith(("_", ".")) for part in relative.parts)


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` as ``(bucket, key)``."""
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket:
        raise SourceError(f"{uri!r} names no bucket; write s3://bucket/key")
    return bucket, key


def s3_client() -> Any:
    """A boto3 S3 client on MLflow's S3 settings: ``MLFLOW_S3_ENDPOINT_URL`` (AWS when unset),
    ``MLFLOW_S3_IGNORE_TLS`` and ``MLFLOW_BOTO_CLIENT_ADDRESSING_STYLE``, signature v4; the
    credentials from boto3's usual chain (``AWS_*``, profiles, roles)."""
    import boto3
    from botocore.config import Config as BotoConfig

    endpoint = os.environ.get("MLFLOW_S3_ENDPOINT_URL") or None
    insecure = os.environ.get("MLFLOW_S3_IGNORE_TLS", "").lower() == "true"
    style = os.environ.get("MLFLOW_BOTO_CLIENT_ADDRESSING_STYLE", "auto")
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        verify=not insecure,
        config=BotoConfig(signature_version="s3v4", s3={"addressing_style": style}),
    )


def s3_problem(uri: str, exc: Exception) -> SourceError:
    """A boto3 error on ``uri`` as one line naming the endpoint, the S3 error code and the fix."""
    code = getattr(exc, "response", {}).get("Error", {}).get("Code", type(exc).__name__)
    endpoint = os.environ.get("MLFLOW_S3_ENDPOINT_URL") or "AWS S3"
    return SourceError(
        f"input {uri!r} cannot be read from {endpoint} ({code}); check the bucket and key, the "
        "AWS_* credentials and MLFLOW_S3_ENDPOINT_URL"
    )


def _list_s3(uri: str) -> list[str]:
    import botocore.exceptions

    bucket, key = split_s3(uri)
    pattern = key if is_glob(key) else None
    prefix = key[: min(key.index(c) for c in GLOB_CHARS if c in key)] if pattern else key
    client = s3_client()
    keys: list[str] = []
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            keys += [obj["Key"] for obj in page.get("Contents", [])]
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
        raise s3_problem(uri, exc) from None
    if pattern:
        parts = pattern.split("/")
        keys = [k for k in keys if _glob_match(k.split("/"), parts)]
    elif key in keys:
        keys = [key]
    else:  # a prefix: the data files under it, as a folder
        folder = key if key.endswith("/") or not key else key + "/"
        keys = [
            k
            for k in keys
            if k.startswith(folder) and format_of(k) and not _hidden(Path(k[len(folder) :]))
        ]
    if not keys:
        raise SourceError(
            f"input {uri!r} matches no object; check the bucket and key (a folder is a prefix "
            "ending in /, a glob such as s3://bucket/data/*.parquet)"
        )
    return [f"s3://{bucket}/{k}" for k in sorted(keys)]


def _glob_match(key: list[str], pattern: list[str]) -> bool:
    """Whether an S3 key's ``/``-separated parts match a glob's, as a local glob with
    ``recursive=True`` matches paths: ``*``, ``?`` and ``[...]`` within one part, a ``**`` part
    across any number of parts (none included)."""
    if not pattern:
        return not key
    if pattern[0] == "**":
        return any(_glob_match(key[i:], pattern[1:]) for i in range(len(key) + 1))
    return (
        bool(key) and fnmatch.fnmatchcase(key[0], pattern[0]) and _glob_match(key[1:], pattern[1:])
    )


class S3File(io.RawIOBase):
    """A seekable, read-only view of one S3 object through ranged GETs (for Parquet's footer
    and row groups: only what is read is fetched)."""

    def __init__(self, client: Any, bucket: str, key: str) -> None:
        self.client, self.bucket, self.key = client, bucket, key
        self.size = int(client.head_object(Bucket=bucket, Key=key)["ContentLength"])
        self.pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, buffer: Any) -> int:
        if self.pos >= self.size or not len(buffer):
            return 0
        end = min(self.pos + len(buffer), self.size) - 1
        body = self.client.get_object(
            Bucket=self.bucket, Key=self.key, Range=f"bytes={self.pos}-{end}"
        )
        data = body["Body"].read()
        buffer[: len(data)] = data
        self.pos += len(data)
        return len(data)


def open_source(source: Source) -> Any:
    """A binary file object for ``source`` (seekable for Parquet); the caller closes it."""
    if not source.on_s3:
        return open(source.uri, "rb")
    import botocore.exceptions

    bucket, key = split_s3(source.uri)
    client = s3_client()
    try:
        if source.format == PARQUET:
            return io.BufferedReader(S3File(client, bucket, key), buffer_size=8 << 20)
        return client.get_object(Bucket=bucket, Key=key)["Body"]
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
        raise s3_problem(source.uri, exc) from None
