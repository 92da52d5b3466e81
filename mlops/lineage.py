"""What a run records of its data, and the split rebuilt from that record.

:func:`log_split` records a split on the active MLflow run as dataset inputs (contexts
``train``, ``validation``, ``test``; each with its source and digest) and, for a training run,
the parts as Parquet with a manifest (within ``data.log_data_max_mb``; beyond, the manifest
alone), from which :func:`load_logged_split` rebuilds the very same split (``mlops
reproduce``).
"""

from __future__ import annotations

import json
import logging
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from mlops.data import (
    MANIFEST,
    PARTS,
    QUALITY_REPORT,
    SKLEARN_PREFIX,
    DatasetSplit,
    _clip_text,
    _source_parts,
    content_hash,
    prepare,
)
from mlops.errors import DataValidationError
from mlops.sources import is_glob

if TYPE_CHECKING:
    from mlflow.data.dataset import Dataset
    from mlflow.data.dataset_source import DatasetSource

logger = logging.getLogger(__name__)

MANIFEST_SHA_TAG = "mlops.data_manifest_sha256"  # on the run: the SHA-256 of data/manifest.json


def log_split(
    split: DatasetSplit, *, with_files: bool = False, max_mb: float | None = None
) -> None:
    """Log the three parts as MLflow dataset inputs and the hash as a tag, on the active run.

    Each input names its source (path, ``s3://`` URI, or a query with its redacted URL) and
    carries the part's digest. With ``with_files``, the parts are also stored as CSV artifacts
    under ``data/``. With ``max_mb`` (a training run passes ``data.log_data_max_mb``) the run
    also gets ``data/manifest.json`` (source, hashes, rows, columns, task, classes) and, when
    together no larger than ``max_mb`` MiB, the parts as Parquet beside it: from these
    :func:`load_logged_split` rebuilds the very split (beyond the cap, by reading the source
    again).
    """
    import mlflow

    base = _dataset_name(split.source)
    for context in PARTS:
        frame = getattr(split, context)
        with warnings.catch_warnings():
            # MLflow registers the local-file source under two schemes and warns that a plain
            # path matches both; either reading is the same source.
            warnings.filterwarnings(
                "ignore", message="The specified dataset source can be interpreted"
            )
            dataset = _as_dataset(split, frame, f"{base}-{context}")
        _log_input(dataset, context, split.content_hash)
    mlflow.set_tags(
        {
            "mlops.data_hash": split.content_hash,
            "mlops.data_source": _clip_text(split.source, 5000),
            "mlops.task": split.task,
        }
    )
    mlflow.log_params(
        {"data_hash": split.content_hash, "data_rows": split.n_rows, "task": split.task}
    )
    mlflow.log_metrics(
        {
            "data_duplicates_dropped": split.n_duplicates_dropped,
            "data_train_rows": len(split.train),
            "data_validation_rows": len(split.validation),
            "data_test_rows": len(split.test),
        }
    )
    if split.quality is not None:
        mlflow.log_dict(split.quality, QUALITY_REPORT)
    if with_files:
        with tempfile.TemporaryDirectory() as tmp:
            for context in PARTS:
                getattr(split, context).to_csv(Path(tmp) / f"{context}.csv", index=False)
            mlflow.log_artifacts(tmp, artifact_path="data")
    if max_mb is not None:
        _log_parts(split, max_mb)


def _dataset_name(source: str) -> str:
    """A short name for a source: the file's stem, the folder's name, ``sql``, the dataset."""
    url, _ = _source_parts(source)
    if url is not None:
        return "sql"
    if source.startswith(SKLEARN_PREFIX):
        return source[len(SKLEARN_PREFIX) :]
    path = source[len("s3://") :] if source.startswith("s3://") else source
    parts = [p for p in path.rstrip("/").split("/") if p]
    if is_glob(path):  # the folder the pattern is in
        parts = parts[: next(i for i, p in enumerate(parts) if is_glob(p))] or parts
        return parts[-1] if not is_glob(parts[-1]) else "data"
    name = parts[-1] if parts else "data"
    for suffix in (".gz", ".csv", ".parquet", ".pq", ".parq"):
        name = name.removesuffix(suffix)
    return name or "data"


def _as_dataset(split: DatasetSplit, frame: pd.DataFrame, name: str) -> Dataset:
    """One part as an MLflow dataset: its source and a digest of all its values."""
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.pandas_dataset import from_pandas

    url, query = _source_parts(split.source)
    source: str | DatasetSource
    if url is not None:
        # no MLflow source type for a query: the redacted URL and the query as the source's tags
        source = CodeDatasetSource(tags={"sql_url": url, "query": query})
    elif split.source.startswith(SKLEARN_PREFIX):
        source = CodeDatasetSource(tags={"dataset": split.source})
    else:  # a path, folder or glob (LocalArtifactDatasetSource), or s3:// (S3ArtifactDatasetSource)
        source = split.source
    # MLflow's digest column holds 36 characters: the first 32 of the part's SHA-256
    return from_pandas(
        frame, source=source, targets=split.target, name=name, digest=content_hash(frame)[:32]
    )


def _log_parts(split: DatasetSplit, max_mb: float) -> None:
    """``data/manifest.json`` and, within ``max_mb`` MiB, the parts as Parquet (see log_split)."""
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "data"
        folder.mkdir()
        for context in PARTS:
            getattr(split, context).to_parquet(folder / f"{context}.parquet", index=False)
        size = sum((folder / f"{c}.parquet").stat().st_size for c in PARTS)
        stored = size <= max_mb * 2**20
        if not stored:
            logger.info(
                "the split's Parquet files (%.1f MiB) exceed data.log_data_max_mb (%g): the run "
                "keeps the source and its digest only",
                size / 2**20,
                max_mb,
            )
            for context in PARTS:
                (folder / f"{context}.parquet").unlink()
        manifest = _manifest(split, stored, size, max_mb)
        if stored:  # each file's checksum, checked before the file is read back
            for context in PARTS:
                manifest["parts"][context]["sha256"] = _sha256(
                    (folder / f"{context}.parquet").read_bytes()
                )
        text = json.dumps(manifest, indent=2)
        (folder / "manifest.json").write_text(text)
        mlflow.log_artifacts(str(folder), artifact_path="data")
        # the tracking store vouches for the manifest (which vouches for the parts): nothing of
        # the artifact store is parsed again unless it matches (load_logged_split)
        mlflow.set_tag(MANIFEST_SHA_TAG, _sha256(text.encode("utf-8")))


def _manifest(split: DatasetSplit, stored: bool, size: int, max_mb: float) -> dict[str, Any]:
    url, dataset = _source_parts(split.source)
    return {
        "version": 1,
        "source": split.source,
        "dataset": dataset,  # what data.dataset reads again (a local path made absolute)
        "sql_url": url,  # redacted; the logged config.yaml holds the URL that connects
        "content_hash": split.content_hash,
        "n_rows": split.n_rows,
        "n_duplicates_dropped": split.n_duplicates_dropped,
        "target": split.target,
        "task": split.task,
        "numeric_columns": list(split.numeric_columns),
        "categorical_columns": list(split.categorical_columns),
        "classes": list(split.classes) if split.classes is not None else None,
        "parts": {
            c: {
                "rows": len(getattr(split, c)),
                "digest": content_hash(getattr(split, c)),
                "file": f"data/{c}.parquet" if stored else None,
            }
            for c in PARTS
        },
        "quality": split.quality,  # the data quality report (data.rules), as at prepare
        "files_stored": stored,
        "parquet_bytes": size,
        "log_data_max_mb": max_mb,
    }


def load_logged_split(run_id: str) -> DatasetSplit:
    """The split a run trained on, rebuilt exactly (values, dtypes, order) from its artifacts.

    From the run's Parquet parts when it stored them; else the source is read again through
    the run's ``config.yaml`` and must hash as it did then.

    Raises:
        DataValidationError: the run has no ``data/manifest.json``, a stored part does not
            match its digest, or the source changed since the run.

    Example:
        >>> split = load_logged_split(result.run_id)
    """
    import mlflow

    recorded = mlflow.MlflowClient().get_run(run_id).data.tags.get(MANIFEST_SHA_TAG)
    if recorded is None:
        raise DataValidationError(
            f"run {run_id} records no checksum of its {MANIFEST} (tag {MANIFEST_SHA_TAG}): it "
            "was logged before runs kept their data, or not by mlops train; retrain with mlops "
            "train"
        )
    with tempfile.TemporaryDirectory() as tmp:
        raw = _verified(_download(run_id, MANIFEST, tmp), recorded, run_id, MANIFEST)
        try:
            manifest = json.loads(raw)
            stored = bool(manifest["files_stored"])
        except (ValueError, KeyError, TypeError):
            raise DataValidationError(
                f"run {run_id}: its {MANIFEST} is not a manifest mlops wrote; retrain"
            ) from None
        if stored:
            parts = {}
            for c in PARTS:
                entry = manifest["parts"][c]
                path = _download(run_id, entry["file"], tmp)
                _verified(path, entry.get("sha256"), run_id, entry["file"])
                parts[c] = _read_logged_part(path, manifest)
        else:
            parts = _prepare_again(run_id, manifest, tmp)
        quality = manifest.get("quality")
    for context in PARTS:
        if content_hash(parts[context]) != manifest["parts"][context]["digest"]:
            raise DataValidationError(
                f"run {run_id}: its {context} part does not match the digest in {MANIFEST}; "
                "the run's data artifacts were altered: retrain on the current data"
            )
    classes = manifest["classes"]
    return DatasetSplit(
        train=parts["train"],
        validation=parts["validation"],
        test=parts["test"],
        target=manifest["target"],
        task=manifest["task"],
        numeric_columns=tuple(manifest["numeric_columns"]),
        categorical_columns=tuple(manifest["categorical_columns"]),
        classes=tuple(classes) if classes is not None else None,
        content_hash=manifest["content_hash"],
        source=manifest["source"],
        n_rows=manifest["n_rows"],
        n_duplicates_dropped=manifest["n_duplicates_dropped"],
        quality=quality,
    )


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def _verified(path: Path, recorded: str | None, run_id: str, artifact: str) -> bytes:
    """The bytes of ``path`` if they hash to ``recorded``; else refused, before any parsing."""
    data = path.read_bytes()
    if recorded is None or _sha256(data) != recorded:
        raise DataValidationError(
            f"run {run_id}: its artifact {artifact} does not match the checksum the run "
            "recorded; the run's data artifacts were changed after the run: refusing to read "
            "them (retrain on the current data)"
        )
    return data


def _read_logged_part(path: Path, manifest: dict[str, Any]) -> pd.DataFrame:
    frame = pd.read_parquet(path)
    # Parquet gives a missing string as None; the split held NaN, as scikit-learn expects
    for col in manifest["categorical_columns"]:
        frame[col] = frame[col].astype(object).where(frame[col].notna(), np.nan)
    return frame


def _prepare_again(run_id: str, manifest: dict[str, Any], tmp: str) -> dict[str, pd.DataFrame]:
    """The parts made again from the source, with the run's own config (seed, split, rules)."""
    from mlops.tracking import read_run_config

    config = read_run_config(run_id)
    config = config.model_copy(
        update={"data": config.data.model_copy(update={"dataset": manifest["dataset"]})}
    )
    split = prepare(config)
    if split.content_hash != manifest["content_hash"]:
        raise DataValidationError(
            f"data.dataset: {_clip_text(manifest['source'], 300)} changed since run {run_id} "
            f"(hash {split.content_hash[:12]} now, {manifest['content_hash'][:12]} then) and "
            "the run kept no copy (larger than data.log_data_max_mb="
            f"{manifest['log_data_max_mb']:g}); restore the data it was trained on, or retrain "
            "on the current data"
        )
    return {c: getattr(split, c) for c in PARTS}


def _download(run_id: str, artifact: str, tmp: str) -> Path:
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return Path(
            mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact, dst_path=tmp)
        )
    except (MlflowException, OSError) as exc:
        raise DataValidationError(
            f"run {run_id}: cannot read its artifact {artifact} ({_clip_text(str(exc))}); only "
            "a training run logged with its data (data/manifest.json) can be rebuilt: retrain "
            "with mlops train"
        ) from None


_CONFLICT_CODES = frozenset({"BAD_REQUEST", "RESOURCE_ALREADY_EXISTS"})


def _log_input(dataset: Dataset, context: str, data_hash: str, attempts: int = 3) -> None:
    """``mlflow.log_input``, retried when another process logged the same dataset meanwhile.

    MLflow's SQL store looks the dataset up and then inserts it: two workers of one tuning
    study starting together both miss it and one insert fails on the unique key, which the
    store reports as ``BAD_REQUEST`` (a tracking server: ``RESOURCE_ALREADY_EXISTS``). On a
    retry the dataset is there and is only linked to this run; any other error is raised at
    once, and a conflict that outlives the retries too.
    """
    import time

    import mlflow
    from mlflow.exceptions import MlflowException

    for attempt in range(attempts):
        try:
            mlflow.log_input(dataset, context=context, tags={"mlops.data_hash": data_hash})
            return
        except MlflowException as exc:
            if attempt == attempts - 1 or exc.error_code not in _CONFLICT_CODES:
                raise
            time.sleep(0.2 * (attempt + 1))
