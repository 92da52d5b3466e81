"""Where scores go: the output columns, and files written chunk by chunk.

The output of both engines is the input row, then the wrapper's answer (``prediction``,
``proba_<class>``, ``model_name``, ``model_version``), then ``scoring_run_id``, typed by
:func:`answer_fields` so the two engines agree. A :class:`Sink` writes a Parquet or CSV file
incrementally into a temporary file beside its destination and moves it into place only when
the job succeeded (an ``s3://`` destination is uploaded with boto3 then): nothing half-written
is left where the output belongs.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from mlops.scoring.rows import RUN_ID_COLUMN
from mlops.scoring.sources import CSV, PARQUET, ScoringInputError, format_of, s3_client, split_s3


def answer_fields(wrapper: Any) -> list[tuple[str, pa.DataType]]:
    """The wrapper's output columns and their Arrow types, then ``scoring_run_id``."""
    fields: list[tuple[str, pa.DataType]] = []
    for name in wrapper.output_columns:
        if name == "prediction":
            fields.append((name, prediction_type(wrapper)))
        elif name.startswith("proba_"):
            fields.append((name, pa.float64()))
        else:
            fields.append((name, pa.string()))
    return [*fields, (RUN_ID_COLUMN, pa.string())]


def prediction_type(wrapper: Any) -> pa.DataType:
    """A regressor's prediction is a float; a classifier's the type of its labels (integer
    labels stay integers, any other label is text)."""
    if wrapper.task != "classification":
        return pa.float64()
    classes = list(wrapper.classes) if wrapper.classes is not None else []
    if classes and all(isinstance(c, int) and not isinstance(c, bool) for c in classes):
        return pa.int64()
    return pa.string()


def output_format(uri: str, option: str = "--output") -> str:
    """The format an output path asks for by its suffix."""
    fmt = format_of(uri.rstrip("/"))
    if fmt is None:
        raise ScoringInputError(
            f"{option} {uri!r}: unknown format; end the file name with .parquet or .csv"
        )
    return fmt


def rejects_path(output: str) -> str:
    """Where rejected rows go by default: ``<output stem>-rejects.csv`` beside the output."""
    base = output.rstrip("/")
    fmt_suffix = next(
        (s for s in (".csv.gz", ".parquet", ".parq", ".pq", ".csv") if base.lower().endswith(s)), ""
    )
    return base[: len(base) - len(fmt_suffix)] + "-rejects.csv"


def check_destination(uri: str, *, overwrite: bool, option: str = "--output") -> None:
    """Refuse to replace an existing local output unless asked to."""
    if uri.startswith("s3://") or overwrite:
        return
    if Path(uri).exists():
        raise ScoringInputError(
            f"{option} {uri!r} already exists; choose another path or pass --overwrite"
        )


class Sink:
    """A Parquet or CSV file written chunk by chunk, moved into place on :meth:`commit`."""

    def __init__(self, uri: str, fmt: str) -> None:
        self.uri, self.format = uri, fmt
        local_dir = None if uri.startswith("s3://") else Path(uri).resolve().parent
        if local_dir is not None:
            local_dir.mkdir(parents=True, exist_ok=True)
        handle, self.tmp = tempfile.mkstemp(
            suffix=f".{fmt}.partial", prefix=".mlops-score-", dir=local_dir
        )
        os.close(handle)
        self.rows = 0
        self._parquet: pq.ParquetWriter | None = None
        self._closed = False
        self._schema: pa.Schema | None = None
        self._csv: Any = open(self.tmp, "w", newline="") if fmt == CSV else None  # noqa: SIM115

    def write(self, table: pa.Table | pd.DataFrame) -> None:
        """Append rows (a DataFrame or an Arrow table) to the file."""
        if self.format == CSV:
            frame = table.to_pandas() if isinstance(table, pa.Table) else table
            frame.to_csv(self._csv, header=self.rows == 0, index=False)
            self.rows += len(frame)
            return
        if isinstance(table, pd.DataFrame):
            table = pa.Table.from_pandas(table, preserve_index=False)
        if self._parquet is None:
            self._schema = table.schema
            # dictionary pages only where values repeat (labels, versions, the run id): trying
            # them on measured floats is most of the write time, for nothing
            text = [
                f.name
                for f in table.schema
                if pa.types.is_string(f.type)
                or pa.types.is_large_string(f.type)
                or pa.types.is_dictionary(f.type)
            ]
            self._parquet = pq.ParquetWriter(self.tmp, table.schema, use_dictionary=text)
        elif self._schema is not None and not table.schema.equals(self._schema):
            try:
                table = table.select(self._schema.names).cast(self._schema)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, KeyError) as exc:
                raise ScoringInputError(
                    f"rows {self.rows}+ of the input have other column types than the first rows "
                    f"({str(exc)[:120]}); give the column one type in every file and row"
                ) from None
        self._parquet.write_table(table)
        self.rows += table.num_rows

    def commit(self) -> None:
        """Close the file and move it to its destination (uploaded for ``s3://``)."""
        self._close()
        if self.format == PARQUET and self._parquet is None:  # no rows at all: an empty file
            pq.write_table(pa.table({}), self.tmp)
        if self.uri.startswith("s3://"):
            bucket, key = split_s3(self.uri)
            s3_client().upload_file(self.tmp, bucket, key)
            os.unlink(self.tmp)
        else:
            os.replace(self.tmp, self.uri)

    def discard(self) -> None:
        """Close and delete the partial file (the job failed)."""
        self._close()
        Path(self.tmp).unlink(missing_ok=True)

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._parquet is not None:
            self._parquet.close()
        if self._csv is not None:
            self._csv.close()
            self._csv = None
