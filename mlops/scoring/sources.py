"""Where a batch comes from: a CSV or Parquet file, a folder or a glob, local or on S3.

:func:`resolve_inputs` turns what a user typed into a checked list of files of one format
(an empty glob, an unknown suffix or an unreadable S3 key is a :class:`ScoringInputError`
naming the fix); :func:`read_chunks` reads one of them as pandas frames of at most
``chunk_rows`` rows, never the whole file: Parquet by record batches, CSV by pandas chunks.
Listing and opening files (S3 through boto3 on ``MLFLOW_S3_ENDPOINT_URL``, a Parquet object by
ranged GETs, so only its footer and the row groups being scored are fetched) live in
:mod:`mlops.sources`, which training data reads through too.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from typing import Any

import pandas as pd
import pyarrow as pa

# the listing and opening of files are shared with training data (mlops.data), one level down
from mlops.sources import (
    CSV,
    PARQUET,
    SUFFIXES,
    Source,
    SourceError,
    format_of,
    list_sources,
    open_source,
    s3_client,
    split_s3,
)

__all__ = [
    "CSV",
    "PARQUET",
    "SUFFIXES",
    "Chunk",
    "ScoringInputError",
    "Source",
    "format_of",
    "open_source",
    "read_chunks",
    "resolve_inputs",
    "s3_client",
    "split_s3",
]

# the input (or output) of a scoring job cannot be used as given: a source error by its
# scoring name, so what catches one catches the other
ScoringInputError = SourceError


def resolve_inputs(uri: str) -> list[Source]:
    """The files ``uri`` names (a file, a folder, a glob; local or ``s3://``), all of one format.

    Raises:
        ScoringInputError: nothing there, an empty glob or folder, an unknown or mixed format,
            an S3 bucket or key that cannot be listed.
    """
    if not uri or not uri.strip():
        raise ScoringInputError("--input is empty; pass a CSV or Parquet file, folder or glob")
    sources = list_sources(uri)
    found = sorted({s.format for s in sources})
    if len(found) > 1:
        raise ScoringInputError(
            f"input {uri!r} mixes formats {found}; score CSV and Parquet files separately"
        )
    return sources


class Chunk:
    """Consecutive rows of one input: as pandas, and (Parquet) as the Arrow table read.

    A Parquet chunk becomes a DataFrame when its :attr:`frame` is first asked for, in the
    thread that asks: a reader thread only decodes into Arrow's memory pool, and the pandas
    arrays are made and freed by the thread that scores them (arrays freed by another thread
    than their maker's go back to that thread's heap, where they fragment it).
    """

    def __init__(self, frame: pd.DataFrame | None, table: pa.Table | None) -> None:
        self._frame, self.table = frame, table

    @property
    def frame(self) -> pd.DataFrame:
        if self._frame is None:
            assert self.table is not None  # a chunk holds a frame, a table, or both
            self._frame = self.table.to_pandas()
        return self._frame

    @property
    def columns(self) -> list[str]:
        """The chunk's column names, without making its DataFrame."""
        return self.table.column_names if self.table is not None else list(self.frame.columns)


def read_chunks(
    source: Source, chunk_rows: int, *, text_columns: Sequence[str] = ()
) -> Generator[Chunk, None, None]:
    """``source`` as chunks of at most ``chunk_rows`` rows, read one at a time.

    ``text_columns`` are read from a CSV as text (a categorical column of digits stays
    ``"01"``); Parquet keeps its own types.
    """
    if source.format == PARQUET and not source.on_s3:
        # a local file through Arrow's own reader: its buffers come from Arrow's pool and go
        # back to it, where a Python file's reads are Python bytes that the C heap keeps
        # (tens of MB of resident memory that grows with the input); column chunks are read
        # as they are decoded (pre_buffer off), through a 64 KiB buffer (buffer_size), not a
        # whole column chunk at once: on a 1,000,000-row file of 100,000-row groups, the peak
        # of bytes live in Arrow's pool (sampled as benchmarks/batch.py does) fell from
        # 1.62-1.70 to 1.32-1.36 times one chunk's pandas size, at the same speed
        opened: Any = pa.OSFile(source.uri)
        options: dict[str, Any] = {"pre_buffer": False, "buffer_size": 1 << 16}
    else:  # S3 objects are read by ranged GETs, coalesced ahead (pre_buffer) to save round trips
        opened, options = open_source(source), {}
    with opened as fh:
        if source.format == PARQUET:
            import pyarrow.parquet as pq

            try:
                reader = pq.ParquetFile(fh, **options)
            except Exception as exc:  # noqa: BLE001 - any unreadable file: name it
                raise ScoringInputError(
                    f"input {source.uri!r} is not a readable Parquet file ({type(exc).__name__}: "
                    f"{str(exc)[:100]}); pass Parquet files, or CSV with a .csv suffix"
                ) from None
            for batch in reader.iter_batches(batch_size=chunk_rows):
                table = pa.Table.from_batches([batch])
                yield Chunk(None, table)
            return
        compression = "gzip" if source.uri.lower().endswith(".gz") else None
        try:
            reader = pd.read_csv(
                fh,
                chunksize=chunk_rows,
                dtype={c: str for c in text_columns},
                compression=compression,
            )
            for frame in reader:
                yield Chunk(frame, None)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
            raise ScoringInputError(
                f"input {source.uri!r} cannot be read as CSV ({type(exc).__name__}: "
                f"{str(exc)[:100]}); pass a UTF-8 CSV with a header row"
            ) from None
